"""The benchmarks in a small setting (tiny digits models trained for a few train steps, n = 20): the
harness counts what the networks really evaluate, a table has one row per (model, scale), results land
under --out (runs/benchmarks/NAME by default, never docs/), and an existing output is refused untouched."""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

import pytest
import torch

from benchmarks import frontier, guidance_routes, harness, sampling, step_distillation, time_to_quality
from cfg_minimal import (
    DistillConfig,
    StepDistillConfig,
    TeacherConfig,
    distill_student,
    halve_sampling_steps,
    load_pipeline,
    train_teacher,
    with_optim,
)
from cfg_minimal.evaluate import evals_per_image

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = ["end_to_end", "frontier", "guidance_routes", "guidance_variants", "guiders", "sampling",
              "step_distillation", "time_to_quality", "train_throughput"]  # fmt: skip
N = ["--n", "20", "--device", "cpu"]  # two samples per class


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny digits run: teacher.pt, student.pt (guided) and student_4steps.pt, student_2steps.pt."""
    out = tmp_path_factory.mktemp("run")
    optim = dict(batch_size=16, device="cpu")
    train_teacher(with_optim(TeacherConfig(arch="unet-tiny"), max_train_steps=30, **optim), out, progress=False)
    distill_student(out / "teacher.pt", with_optim(DistillConfig(), max_train_steps=10, **optim), out, progress=False)
    rounds = with_optim(StepDistillConfig(start_sampling_steps=8, target_sampling_steps=2), max_train_steps=4, **optim)
    halve_sampling_steps(out / "student.pt", rounds, out, progress=False)
    return out


@pytest.fixture(scope="module")
def judge():
    return harness.load_judge("digits", "data", torch.device("cpu"))


def call(main, args, capsys) -> tuple[int, str, str]:
    """A benchmark's main in-process -> (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table_rows(stdout: str) -> list[list[str]]:
    """The cells of the markdown rows printed (not the header or its rule)."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    after = [*lines[1:], ""]
    rows = [line for line, next_line in zip(lines, after) if line.startswith("| ") and not next_line.startswith("|---")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in rows]


def files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def has_new_guidance_api() -> bool:
    guidance = importlib.import_module("cfg_minimal.guidance")
    return hasattr(guidance, "CFG") and hasattr(guidance, "guider_from_spec")


needs_new_guidance_api = pytest.mark.skipif(not has_new_guidance_api(), reason="cfg_minimal.guidance.CFG not there")


def test_counted_evaluations_are_two_per_step_for_a_guided_teacher_and_one_otherwise(run_dir, judge, capsys):
    """k DDIM steps: the CFG teacher at s = 3 evaluates 2k images per image, at s = 0 or 1 k, a student k;
    one printed row per (model, scale), each the mean of its seeds; the hooks go away afterwards."""
    pipes = {name: load_pipeline(run_dir / f"{name}.pt") for name in ("teacher", "student")}
    k, scales = 3, [0.0, 1.0, 3.0]
    table = harness.Table(harness.QUALITY)
    rows = harness.measure(harness.grid(pipes, scales, steps=k), judge, 20, seeds=[0, 1], table=table)
    evals = {(r["model"], r["scale"]): r["evals_per_image"] for r in rows}
    assert evals == {("teacher", 0.0): k, ("teacher", 1.0): k, ("teacher", 3.0): 2 * k,
                     ("student", 0.0): k, ("student", 1.0): k, ("student", 3.0): k}  # fmt: skip
    printed = table_rows(capsys.readouterr().out)
    assert [(cells[0], float(cells[1]), int(cells[3])) for cells in printed] == [
        (r["model"], r["scale"], r["evals_per_image"]) for r in rows
    ]
    for r in rows:
        assert [s["seed"] for s in r["per_seed"]] == [0, 1]
        assert r["fd"] == pytest.approx(sum(s["fd"] for s in r["per_seed"]) / 2)
    assert rows[0]["per_seed"][0]["fd"] != rows[0]["per_seed"][1]["fd"]  # the seeds drew different noise
    assert not pipes["teacher"].model._forward_hooks and not pipes["student"].model._forward_hooks


def test_a_counter_counts_each_network_once_and_only_while_it_is_open(run_dir):
    teacher = load_pipeline(run_dir / "teacher.pt")
    x, t, y = torch.randn(5, 1, 16, 16), torch.full((5,), 10), torch.zeros(5, dtype=torch.long)
    with torch.no_grad(), harness.EvalCounter(teacher.model, teacher.model, None) as counter:
        teacher.model(x, t, y)
        teacher.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]))  # a batched CFG pass: 2B images
    with torch.no_grad():
        teacher.model(x, t, y)
    assert counter.images == 15


def test_frontier_writes_under_runs_benchmarks_by_default_and_never_into_docs(run_dir, monkeypatch, capsys, tmp_path):
    """Each route at each budget spends exactly the budget (counted), with as many rows as (route, budget, s);
    the default --out is runs/benchmarks/frontier under the working folder, and docs/ stays as it was."""
    docs_before = files(REPO / "docs")
    monkeypatch.chdir(tmp_path)
    args = ["--run-dir", run_dir, *N, "--budgets", "2", "4", "--scales", "1", "3", "--seed-budget", "4",
            "--extra-seeds", "1"]  # fmt: skip
    code, out, err = call(frontier.main, args, capsys)
    assert code == 0, err
    written = tmp_path / "runs" / "benchmarks" / "frontier"
    assert sorted(files(written)) == ["frontier_digits.json", "frontier_digits.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no docs/, nothing else
    assert files(REPO / "docs") == docs_before
    record = json.loads((written / "frontier_digits.json").read_text())
    rows = record["rows"]
    step_distilled = {2, 4}  # student_2steps.pt and student_4steps.pt
    expected = {(route, b, s) for route in frontier.ROUTES for b in (2, 4) for s in (1.0, 3.0)
                if route != frontier.ROUTES[4] or b in step_distilled}  # fmt: skip
    assert sorted((r["model"], r["budget"], r["scale"]) for r in rows) == sorted(expected)
    for r in rows:
        assert r["evals_per_image"] == r["budget"], r
        assert r["seeds"] == ([0, 1] if r["budget"] == 4 else [0])
    assert len(table_rows(out)) == len(rows) + len(record["divergence_check"])
    assert record["command"].startswith("python -m benchmarks.frontier --run-dir")


def test_an_existing_output_is_refused_before_anything_runs_and_overwrite_replaces_it(run_dir, capsys, tmp_path):
    """step_distillation: the refusal is one line with exit code 2, measures nothing and keeps the file;
    --overwrite replaces it with one row per (model, scale) and the teacher as the speed-up's reference."""
    (tmp_path / "step_distillation.json").write_text("keep me")
    args = ["--teacher", run_dir / "teacher.pt", "--student", run_dir / "student.pt", "--run-dir", run_dir, *N,
            "--sampling-steps", "4", "--out", tmp_path]  # fmt: skip
    code, out, err = call(step_distillation.main, args, capsys)
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "already exists; pass --overwrite" in err
    assert out == "" and (tmp_path / "step_distillation.json").read_text() == "keep me"

    code, out, err = call(step_distillation.main, [*args, "--overwrite"], capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "step_distillation.json").read_text())["rows"]
    models = ["teacher, CFG", "guided student"] + ["guided student, no step distillation"] * 2
    models += ["step-distilled student"] * 2
    steps = [4, 4, 8, 4, 4, 2]
    assert [(r["model"], r["sampling_steps"], r["scale"]) for r in rows] == [
        (m, k, s) for m, k in zip(models, steps) for s in (1.0, 3.0)
    ]
    assert [r["evals_per_image"] for r in rows] == [4, 8] + [k for k in steps[1:] for _ in range(2)]
    assert [r["speedup"] for r in rows[:2]] == [1.0, 1.0]
    assert len(table_rows(out)) == len(rows)


def refusal_args(name: str, run: Path) -> tuple[list, str]:
    """Arguments that would run `name` in a small setting, and the output file it writes first."""
    teacher, student = run / "teacher.pt", run / "student.pt"
    return {
        "end_to_end": (["--dataset", "digits", "--teacher-train-steps", "2"], "end_to_end.json"),
        "frontier": (["--run-dir", run], "frontier_digits.png"),
        "guidance_routes": (["--dataset", "digits", "--teacher-train-steps", "2"], "guidance_routes_digits.json"),
        "guidance_variants": (["--teacher", teacher], "guidance_variants.png"),
        "guiders": (["--dataset", "digits", "--ckpt", teacher], "guiders_digits.json"),
        "sampling": (["--arch", "unet-tiny", "--batch-sizes", "2", "--sampling-steps", "2"], "sampling.json"),
        "step_distillation": (["--teacher", teacher, "--student", student, "--run-dir", run], "step_distillation.json"),
        "time_to_quality": (["--dataset", "digits", "--teacher-train-steps", "2"], "time_to_quality.json"),
        "train_throughput": (["--archs", "unet-tiny", "--sizes", "16"], "train_throughput.json"),
    }[name]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_refuses_an_existing_output_before_it_measures_anything(name, run_dir, capsys, tmp_path):
    if name in ("guiders", "guidance_variants") and not has_new_guidance_api():
        pytest.skip("cfg_minimal.guidance.CFG not there")
    args, output = refusal_args(name, run_dir)
    (tmp_path / output).write_text("keep me")
    code, out, err = call(importlib.import_module(f"benchmarks.{name}").main,
                          [*args, "--device", "cpu", "--out", tmp_path], capsys)  # fmt: skip
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines() == [f"error: {tmp_path / output} already exists; pass --overwrite to replace it, "
                                        "or choose another --out"]  # fmt: skip
    assert not table_rows(out) and files(tmp_path) == {output: hashlib.sha256(b"keep me").hexdigest()}


def test_sampling_counts_two_passes_per_step_for_the_teacher_and_one_for_the_student(capsys, tmp_path):
    args = ["--arch", "unet-tiny", "--batch-sizes", "2", "3", "--sampling-steps", "3", "--repeats", "1",
            "--device", "cpu", "--out", tmp_path]  # fmt: skip
    code, out, err = call(sampling.main, args, capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "sampling.json").read_text())["rows"]
    assert [(r["batch"], r["sampler"], r["evals_per_image"]) for r in rows] == [
        (b, name, evals) for b in (2, 3) for name, evals in zip(sampling.RUNS, (6, 6, 3))
    ]
    assert [r["speedup"] for r in rows if r["sampler"] == "teacher, batched 2B"] == [1.0, 1.0]
    assert len(table_rows(out)) == len(rows)


def test_time_to_quality_trains_each_variant_into_its_folder_and_refuses_to_train_over_it(capsys, tmp_path):
    args = ["--dataset", "digits", "--variant", "a:", "--variant", "b:ema_decay=0.9", "--teacher-train-steps", "2",
            "--teacher-batch-size", "8", "--sampling-steps", "2", "--scales", "1", "3", *N, "--out", tmp_path,
            "--no-progress"]  # fmt: skip
    code, out, err = call(time_to_quality.main, args, capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "time_to_quality.json").read_text())["rows"]
    assert [(r["variant"], r["evals_per_image_s1"], r["evals_per_image_s3"]) for r in rows] == [
        ("a", 2, 4), ("b", 2, 4)]  # fmt: skip
    assert rows[1]["changes"] == {"ema_decay": 0.9}
    assert [cells[0] for cells in table_rows(out)] == ["a", "b"]
    before = files(tmp_path)
    (tmp_path / "time_to_quality.json").unlink()  # only a checkpoint is left to refuse
    code, out, err = call(time_to_quality.main, args, capsys)
    assert code == 2 and "a/teacher.pt already exists" in err and len(err.strip().splitlines()) == 1
    assert files(tmp_path) == {k: v for k, v in before.items() if k != "time_to_quality.json"}
    code, _, err = call(time_to_quality.main, [*args[:4], "--variant", "a:lr=1e-3", *args[4:]], capsys)
    assert code == 2 and "share a NAME" in err


def test_time_to_quality_in_minutes_trains_the_measured_steps_and_plots_runs(capsys, tmp_path, monkeypatch):
    """--minutes gives each variant the train steps budget.train_steps_in measures for it (stubbed: 3 for the
    plain variant, 5 for a batch of 4); --plot draws earlier runs' JSONs without training."""
    monkeypatch.setattr(time_to_quality, "train_steps_in", lambda minutes, cfg: 3 if cfg.optim.batch_size == 8 else 5)
    args = ["--dataset", "digits", "--variant", "a:", "--variant", "b:batch_size=4", "--minutes", "0.5",
            "--teacher-batch-size", "8", "--sampling-steps", "2", "--scales", "1", *N, "--out", tmp_path / "run",
            "--no-progress"]  # fmt: skip
    code, out, err = call(time_to_quality.main, args, capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "run" / "time_to_quality.json").read_text())
    assert [(r["variant"], r["train_steps"]) for r in record["rows"]] == [("a", 3), ("b", 5)]
    assert torch.load(tmp_path / "run" / "b" / "teacher.pt", weights_only=False)["train_step"] == 5
    assert "0.5 minutes each" in out
    code, out, err = call(time_to_quality.main, ["--plot", tmp_path / "run" / "time_to_quality.json", "--out",
                                                 tmp_path / "fig"], capsys)  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "fig" / "time_to_quality_digits.png").stat().st_size > 10_000
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == ["time_to_quality_digits.png"]  # trains nothing
    (tmp_path / "bad.json").write_text("{}")
    code, _, err = call(time_to_quality.main, ["--plot", tmp_path / "bad.json", "--out", tmp_path / "fig2"], capsys)
    assert code == 2 and "not a time_to_quality.json" in err and len(err.strip().splitlines()) == 1


def test_a_mistake_is_one_line_and_exit_code_2(run_dir, capsys, tmp_path):
    code, _, err = call(frontier.main, ["--run-dir", tmp_path / "nothing", "--out", tmp_path / "out"], capsys)
    assert code == 2 and "has no teacher.pt" in err and len(err.strip().splitlines()) == 1
    args = ["--teacher", run_dir / "teacher.pt", "--student", run_dir / "student.pt", "--run-dir", run_dir,
            "--n", "5", "--device", "cpu", "--out", tmp_path / "out"]  # fmt: skip
    code, _, err = call(step_distillation.main, args, capsys)
    assert code == 2 and "--n must be at least two samples per class (20), got 5" in err
    assert not list((tmp_path / "out").glob("*.json"))


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_states_its_defaults_for_data_and_output_in_help(name):
    if name in ("guiders", "guidance_variants") and not has_new_guidance_api():
        pytest.skip("cfg_minimal.guidance.CFG not there")
    text = " ".join(importlib.import_module(f"benchmarks.{name}").build_parser().format_help().split())
    assert f"--out OUT output folder (default: runs/benchmarks/{name})" in text
    if name not in ("sampling", "train_throughput"):  # the two that read no data
        assert "--data-dir DATA_DIR dataset folder (default: data," in text


@needs_new_guidance_api
def test_guiders_count_both_networks_of_autoguidance_and_the_kept_pass_of_cfg_plus_plus(run_dir, capsys, tmp_path):
    from benchmarks import guiders

    k = 3
    args = ["--dataset", "digits", "--ckpt", run_dir / "teacher.pt", "--guide-ckpt", run_dir / "teacher.pt",
            "--student", run_dir / "student.pt", "--methods", "cfg", "apg", "cfg++", "autoguidance",
            "--grid", "cfg=1,3", "--grid", "apg=3", "--grid", "cfg++=1", "--grid", "autoguidance=3",
            "--grid", "student=3", "--sampling-steps", k, *N, "--out", tmp_path]  # fmt: skip
    code, out, err = call(guiders.main, args, capsys)
    assert code == 0, err
    assert sorted(files(tmp_path)) == ["guiders_digits.json", "guiders_digits.png"]
    record = json.loads((tmp_path / "guiders_digits.json").read_text())
    evals = {(r["model"], r["scale"]): r["evals_per_image"] for r in record["rows"]}
    student = f"student {run_dir.name}/student"
    assert evals == {("cfg", 1.0): k, ("cfg", 3.0): 2 * k, ("apg", 3.0): 2 * k,
                     ("cfg++", 1.0): 2 * k,  # CFG++ re-noises with eps_u, even at s = 1
                     ("autoguidance", 3.0): 2 * k,  # k of the teacher and k of the guiding model
                     (student, 3.0): k}  # fmt: skip
    assert [b["method"] for b in record["best_fd"]] == ["cfg", "apg", "cfg++", "autoguidance", student]
    assert len(table_rows(out)) == len(record["rows"]) + len(record["best_fd"])


@needs_new_guidance_api
def test_guidance_variants_interval_saves_passes_and_a_student_refuses_negative_classes(run_dir, capsys, tmp_path):
    from benchmarks import guidance_variants

    k = 4
    args = ["--teacher", run_dir / "teacher.pt", "--student", run_dir / "student.pt", "--sampling-steps", k, *N,
            "--out", tmp_path]  # fmt: skip
    code, out, err = call(guidance_variants.main, args, capsys)
    assert code == 0, err
    assert sorted(files(tmp_path)) == ["guidance_variants.json", "guidance_variants.png"]
    rows = {(r["model"], r["variant"], r["scale"]): r for r in json.loads(
        (tmp_path / "guidance_variants.json").read_text())["rows"]}  # fmt: skip
    assert len(rows) == 19 and len(table_rows(out)) == 19
    assert rows["teacher", "plain", 1.0]["evals_per_image"] == k
    assert rows["teacher", "plain", 3.0]["evals_per_image"] == 2 * k
    assert rows["teacher", "rescale 0.7", 3.0]["evals_per_image"] == 2 * k
    assert k <= rows["teacher", "interval", 3.0]["evals_per_image"] < 2 * k  # one pass outside the interval
    assert rows["student", "interval", 6.0]["evals_per_image"] == k
    assert "failed" in rows["student", "negative class", 3.0]
    assert 0 <= rows["teacher", "negative class", 3.0]["p_neg"] <= 1


# --- guidance routes, and flow run directories ----------------------------------------------------------------


@pytest.fixture(scope="module")
def flow_run_dir(tmp_path_factory) -> Path:
    """A tiny rectified-flow digits run: teacher.pt and its guided student.pt (no step-distilled students)."""
    out = tmp_path_factory.mktemp("flow_run")
    optim = dict(batch_size=8, device="cpu")
    cfg = TeacherConfig(arch="unet-tiny", prediction_type="flow_prediction")
    train_teacher(with_optim(cfg, max_train_steps=5, **optim), out, progress=False)
    distill_student(out / "teacher.pt", with_optim(DistillConfig(), max_train_steps=3, **optim), out, progress=False)
    return out


ROUTES_TINY = ["--dataset", "digits", "--arch", "unet-tiny", "--teacher-train-steps", "3", "--teacher-batch-size", "8",
               "--distill-train-steps", "2", "--distill-batch-size", "8", "--scales", "1", "3", "--gft-scales", "1",
               "3", "--sampling-steps", "3", "--extra-seeds", "--no-progress", *N]  # fmt: skip


def test_guidance_routes_counts_every_route_the_same_way_and_the_student_pays_for_its_teacher(capsys, tmp_path):
    """Tiny digits, every route: each stage trained once (the student reuses its formulation's teacher, and its
    training compute is the teacher's plus its own), training evaluations counted by hooks (GFT's stop-gradient
    pass, MG's EMA guide after mg_start, the distillation teacher's 2B), one pass per sampling step for the
    one-pass routes and two for CFG at s = 3; the JSON, the figure and one table; a second run is refused."""
    code, out, err = call(guidance_routes.main, [*ROUTES_TINY, "--out", tmp_path], capsys)
    assert code == 0, err
    stages = sorted(f"{r.teacher_key}/teacher.pt" for r in guidance_routes.ROUTES if not r.distilled)
    stages += ["flow-student/student.pt", "student/student.pt"]
    assert sorted(name for name in files(tmp_path) if name.endswith(".pt")) == sorted(stages)
    assert {"guidance_routes_digits.json", "guidance_routes_digits.png"} <= set(files(tmp_path))
    record = json.loads((tmp_path / "guidance_routes_digits.json").read_text())
    training, k, B = record["training"], 3, 8
    for prefix in ("", "flow-"):
        cfg, student, gft, mg = (training[prefix + key] for key in ("cfg", "student", "gft", "mg"))
        assert (cfg["train_images"], cfg["train_evals"]) == (3 * B, 3 * B)  # one forward per image and step
        assert student["stages"][0] == cfg["stages"][0]  # the same teacher, trained once
        assert student["train_images"] == cfg["train_images"] + 2 * B
        assert student["train_evals"] == cfg["train_evals"] + 2 * (2 * B + B)  # teacher's CFG pair + the student
        assert student["train_seconds"] > cfg["train_seconds"]
        assert gft["train_evals"] == 3 * 2 * B  # + the stop-gradient unconditional pass
        assert mg["train_evals"] == 3 * B + 2 * 2 * B  # + the EMA's pair from train step 0.25 x 3 on
    evals = {(r["route"], r["scale"]): r["evals_per_image"] for r in record["rows"]}
    one_pass = {("student", 1.0), ("student", 3.0), ("gft", 1.0), ("gft", 3.0), ("mg", 1.0), ("cfg", 1.0)}
    assert evals == {(prefix + route, s): k if (route, s) in one_pass else 2 * k
                     for prefix in ("", "flow-") for route, s in [*one_pass, ("cfg", 3.0)]}  # fmt: skip
    assert sorted(r["route"] for r in record["best"]) == sorted(training)  # one best s per route
    assert all(r["train_evals"] == training[r["route"]]["train_evals"] for r in record["rows"])
    assert len(table_rows(out)) == len(record["rows"])
    before = files(tmp_path)
    code, out, err = call(guidance_routes.main, [*ROUTES_TINY, "--out", tmp_path], capsys)
    refused = tmp_path / "guidance_routes_digits.json"
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [f"error: {refused} already exists; pass --overwrite to replace it, or choose "
                                        "another --out"]  # fmt: skip
    assert files(tmp_path) == before and not table_rows(out)


def test_guidance_routes_trains_only_the_chosen_routes_and_merges_runs_made_apart(capsys, tmp_path):
    """--routes student trains its teacher too (into cfg/) but scores only the student; --from-json puts two
    runs into one table and figure without training, and refuses a route measured twice."""
    code, _, err = call(guidance_routes.main, [*ROUTES_TINY, "--routes", "student", "--out", tmp_path / "a"], capsys)
    assert code == 0, err
    assert sorted(n for n in files(tmp_path / "a") if n.endswith(".pt")) == ["cfg/teacher.pt", "student/student.pt"]
    code, _, err = call(guidance_routes.main, [*ROUTES_TINY, "--routes", "mg", "--out", tmp_path / "b"], capsys)
    assert code == 0, err
    parts = [tmp_path / part / "guidance_routes_digits.json" for part in ("a", "b")]
    code, out, err = call(guidance_routes.main, ["--from-json", *parts, "--out", tmp_path / "c"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "c" / "guidance_routes_digits.json").read_text())
    assert [(r["route"], r["scale"]) for r in record["rows"]] == [("student", 1.0), ("student", 3.0), ("mg", 1.0)]
    assert sorted(files(tmp_path / "c")) == ["guidance_routes_digits.json", "guidance_routes_digits.png"]
    code, _, err = call(guidance_routes.main, ["--from-json", parts[0], parts[0], "--out", tmp_path / "d"], capsys)
    assert code == 2 and "in two files" in err


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_evals_per_image_is_what_a_flow_sampler_counts(sampler, flow_run_dir):
    """evaluate.evals_per_image equals the evaluations the hooks count: n for Euler, 2n - 1 for Heun (its inner
    grid points twice), doubled for the CFG teacher at s = 3; the pipe's own scheduler is left as it was."""
    for name in ("teacher", "student"):
        pipe = load_pipeline(flow_run_dir / f"{name}.pt", scheduler=sampler)
        for steps in (1, 2, 5):
            for s in (1.0, 3.0):
                with harness.EvalCounter(pipe.model) as counter:
                    pipe([0, 1], s, num_steps=steps, generator=0)
                per_step = 2 * steps - 1 if sampler == "heun" else steps
                passes = 2 if name == "teacher" and s == 3.0 else 1
                timesteps = pipe.scheduler.timesteps.clone()
                assert evals_per_image(pipe, s, steps) == counter.images / 2 == per_step * passes
                assert torch.equal(pipe.scheduler.timesteps, timesteps)


def test_frontier_and_guidance_variants_take_a_flow_run_with_its_own_samplers(flow_run_dir, capsys, tmp_path):
    """A flow run's frontier routes are Euler and Heun (no DPM-Solver++, no divergence check), each spending at
    most the budget (Euler all of it); guidance_variants converts EDM's sigma interval to flow timesteps."""
    args = ["--run-dir", flow_run_dir, *N, "--budgets", "4", "8", "--scales", "1", "3", "--seed-budget", "4",
            "--extra-seeds", "--out", tmp_path / "frontier"]  # fmt: skip
    code, out, err = call(frontier.main, args, capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "frontier" / "frontier_digits.json").read_text())
    assert record["divergence_check"] == [] and "no DPM-Solver++ divergence check" in out
    assert {r["model"] for r in record["rows"]} == set(frontier.FLOW_ROUTES[:4])
    spent = {(r["model"], r["budget"], r["scale"]): r["evals_per_image"] for r in record["rows"]}
    assert spent["CFG teacher + Euler", 8, 3.0] == spent["guided student + Euler", 8, 3.0] == 8
    assert spent["CFG teacher + Heun", 8, 3.0] == 6  # 2 passes x (2 x 2 - 1)
    assert spent["guided student + Heun", 8, 1.0] == 7  # 4 Heun steps
    assert all(r["evals_per_image"] <= r["budget"] for r in record["rows"])

    from benchmarks import guidance_variants

    args = ["--teacher", flow_run_dir / "teacher.pt", "--sampling-steps", "4", *N, "--out", tmp_path / "variants"]
    code, out, err = call(guidance_variants.main, args, capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "variants" / "guidance_variants.json").read_text())
    assert record["interval"] == [219, 844]  # t / (T - t) in (0.28, 5.42], T = 1000
    rows = {(r["variant"], r["scale"]): r["evals_per_image"] for r in record["rows"]}
    assert 4 < rows["interval", 3.0] < 8 and rows["plain", 3.0] == 8

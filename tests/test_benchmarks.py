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

from benchmarks import frontier, harness, sampling, step_distillation, time_to_quality
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

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = ["end_to_end", "frontier", "guidance_variants", "guiders", "sampling", "step_distillation",
              "time_to_quality", "train_throughput"]  # fmt: skip
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

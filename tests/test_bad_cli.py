"""Probes of issue 26 on the command lines, resume and the benchmarks: what a hostile user tries.

Every mistake exits 2 with one line (argparse's own refusals: its usage, then one line), before anything is
trained or sampled, and leaves every file as it was; a command never writes over what it did not create.
The CLIs run in-process (their `main`) on one tiny digits run: a teacher, its student, one step-distilled round.
"""

from __future__ import annotations

import hashlib
import importlib
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO
from test_bad_input import call

import sample
import train_mnist
from benchmarks import end_to_end, frontier, guiders, time_to_quality, train_throughput
from cfg_minimal import (
    DistillConfig,
    StepDistillConfig,
    TeacherConfig,
    checkpoint,
    distill_student,
    halve_sampling_steps,
    train_teacher,
    with_optim,
)
from cfg_minimal import evaluate as evaluate_cli
from cfg_minimal.checkpoint import output_lock

OPTIM = dict(max_train_steps=4, batch_size=8, device="cpu")
TINY = ["--arch", "unet-tiny", "--teacher-train-steps", "4", "--teacher-batch-size", "8", "--distill-train-steps",
        "4", "--distill-batch-size", "8", "--sampling-steps", "2", "--eval-n", "20", "--device", "cpu",
        "--no-progress"]  # fmt: skip
E2E = ["--dataset", "digits", "--device", "cpu", "--teacher-train-steps", "2", "--distill-train-steps", "2",
       "--round-train-steps", "2", "--teacher-batch-size", "4", "--distill-batch-size", "4", "--round-batch-size", "4",
       "--start-sampling-steps", "8", "--target-sampling-steps", "4", "--sampling-steps", "2", "--n", "20",
       "--speed-batch", "4", "--no-progress"]  # fmt: skip
TTQ = ["--dataset", "digits", "--device", "cpu", "--teacher-train-steps", "2", "--teacher-batch-size", "4",
       "--sampling-steps", "2", "--n", "20", "--no-progress"]  # fmt: skip
# Small settings, so that a probe run on code without the fix (which does not refuse) ends quickly too.
THROUGHPUT = ["--archs", "unet-tiny", "--sizes", "16", "--batch-sizes", "2", "--repeats", "1", "--device", "cpu"]
GUIDERS = ["--dataset", "digits", "--ckpt", "{run}/teacher.pt", "--methods", "cfg", "--grid", "cfg=1", "--n", "20",
           "--sampling-steps", "2", "--device", "cpu"]  # fmt: skip
SMALL = ["--n", "20", "--sampling-steps", "2", "--scales", "1", "--device", "cpu"]  # evaluate
HUGE_SEED = "100000000000000000000000"  # 1e23: more than the 64 bits a torch generator takes


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """teacher.pt, student.pt (distilled from it) and student_2steps.pt (halved from the student), all tiny."""
    out = tmp_path_factory.mktemp("run")
    train_teacher(with_optim(TeacherConfig(arch="unet-tiny"), **OPTIM), out, progress=False)
    distill_student(out / "teacher.pt", with_optim(DistillConfig(), **OPTIM), out, progress=False)
    rounds = StepDistillConfig(start_sampling_steps=4, target_sampling_steps=2)
    halve_sampling_steps(out / "student.pt", with_optim(rounds, **{**OPTIM, "max_train_steps": 2}), out, progress=False)
    return out


def refused(result: tuple[int, str, str], message: str) -> str:
    """Exit code 2 and one line holding `message` (after argparse's usage, if argparse refused); -> stderr."""
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert message in lines[-1], err
    assert len(lines) == 1 or lines[0].startswith("usage:"), err
    return err


def files(folder: Path) -> dict[str, str]:
    """Every file under `folder` (recursively) and its hash: what 'nothing changed' compares."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}  # fmt: skip


@pytest.fixture
def copy(run, tmp_path) -> Path:
    """A copy of the run that a test may change."""
    return Path(shutil.copytree(run, tmp_path / "copy"))


# --- data loss ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("existing", ["an exported model", "a folder of other files", "a file"])
def test_end_to_end_refuses_an_existing_export_folder_before_training(existing, tmp_path, capsys):
    target = tmp_path / "export" / "digits-teacher"
    if existing == "a file":
        target.parent.mkdir()
        target.write_text("keep me")
    else:
        target.mkdir(parents=True)
        for name in ["config.json", "model.safetensors"] if existing == "an exported model" else ["notes.txt"]:
            (target / name).write_text("keep me")
    before = files(tmp_path)
    args = [*E2E, "--out", tmp_path / "run", "--export", tmp_path / "export"]
    refused(call(end_to_end.main, args, capsys), "digits-teacher")
    assert files(tmp_path) == before and not (tmp_path / "run").exists()  # nothing trained


def test_end_to_end_refuses_a_checkpoint_in_out_before_training_without_advising_resume(tmp_path, capsys):
    (tmp_path / "student.pt").write_text("keep me")
    err = refused(call(end_to_end.main, [*E2E, "--out", tmp_path], capsys), "student.pt already exists")
    assert "--resume" not in err  # end_to_end has no --resume
    assert files(tmp_path) == {"student.pt": hashlib.sha256(b"keep me").hexdigest()}


def test_time_to_quality_variant_names_cannot_reach_another_run(run, tmp_path, capsys):
    """'.' is no name, and a variant named like a run folder in --out finds its teacher.pt taken."""
    before = files(run)
    refused(call(time_to_quality.main, [*TTQ, "--out", run, "--variant", ".:lr=1e-3"], capsys), "cannot hold a path")
    args = [*TTQ, "--out", run.parent, "--variant", f"{run.name}:"]
    refused(call(time_to_quality.main, args, capsys), f"{run.name}/teacher.pt already exists")
    assert files(run) == before


def test_time_to_quality_takes_the_lock_of_its_folder(tmp_path, capsys):
    with output_lock(tmp_path):
        refused(call(time_to_quality.main, [*TTQ, "--out", tmp_path], capsys), "another run is writing into")
    assert files(tmp_path) == {}


@pytest.mark.parametrize(
    "args, extended",
    [
        (["--teacher-train-steps", "6"], "teacher.pt"),
        (["--stage", "teacher", "--teacher-train-steps", "6"], "teacher.pt"),
        (["--stage", "distill", "--distill-train-steps", "6"], "student.pt"),
    ],
)
def test_resume_never_extends_a_model_that_a_model_next_to_it_was_distilled_from(copy, args, extended, capsys):
    before = files(copy)
    err = refused(call(train_mnist.main, ["--out", copy, "--resume", "--device", "cpu", *args], capsys),
                  "was distilled from it")  # fmt: skip
    assert f"train {str(copy / extended)!r} on from train step 4 to 6" in err
    assert files(copy) == before


def test_evaluate_writes_into_eval_by_default_and_never_over_an_earlier_sweep(copy, capsys):
    (copy / "metrics.json").write_text("the run's own metrics")
    args = ["--ckpt", copy / "teacher.pt", *SMALL]
    code, out, err = call(evaluate_cli.main, args, capsys)
    assert code == 0, err
    assert (copy / "metrics.json").read_text() == "the run's own metrics"
    assert sorted(p.name for p in (copy / "eval").iterdir()) == sorted(evaluate_cli.SWEEP_FILES)
    before = files(copy)
    refused(call(evaluate_cli.main, args, capsys), "eval/metrics.json already exists; pass --overwrite")
    assert files(copy) == before
    assert call(evaluate_cli.main, [*args, "--overwrite"], capsys)[0] == 0


# --- silent wrong results -----------------------------------------------------------------------------


def test_resume_with_nothing_to_resume_is_refused_and_creates_nothing(tmp_path, capsys):
    typo = tmp_path / "runs" / "digtis"
    refused(call(train_mnist.main, ["--out", typo, "--resume", *TINY], capsys), "holds no teacher.pt or student.pt")
    refused(call(train_mnist.main, ["--out", typo, "--resume", "--stage", "step-distill", *TINY], capsys),
            "holds no student_*steps.pt")  # fmt: skip
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "main, args, message",
    [
        (time_to_quality.main, [*TTQ, "--variant", "a:compile=yes"], "compile is true or false, got 'yes'"),
        (train_throughput.main, ["--variants", "bogus", *THROUGHPUT], "a variant is one of fp32, tf32, bf16"),
        (train_throughput.main, ["--variants", "bf16", *THROUGHPUT], "bf16 changes nothing on cpu"),
        (train_throughput.main, [*THROUGHPUT, "--batch-sizes", "0"], "--batch-sizes must be a positive integer"),
        (frontier.main, ["--run-dir", "{run}", "--budgets", "3", "--scales", "3", "--n", "20", "--device", "cpu"],
         "--budgets 3 is odd"),
        (guiders.main, [*GUIDERS, "--spec", "apg=apg:eta=0"], "apg is not measured in this run"),
        (guiders.main, [*GUIDERS, "--spec", "bogus=apg"], "--spec takes NAME=VALUE with NAME one of"),
    ],
)  # fmt: skip
def test_benchmark_flags_that_would_be_silently_wrong_are_refused(main, args, message, run, tmp_path, capsys):
    args = [str(a).format(run=run) for a in args]
    refused(call(main, [*args, "--out", tmp_path / "out"], capsys), message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stage", "distill", "--teacher", "{run}/teacher.pt", "--dataset", "mnist"],
         "whose teacher was trained with dataset digits"),
        (["--stage", "distill", "--teacher", "{run}/teacher.pt", "--arch", "dit-tiny"],
         "whose teacher was trained with arch unet-tiny"),
        (["--stage", "step-distill", "--student", "{run}/student.pt", "--dataset", "mnist"],
         "whose teacher was trained with dataset digits"),
        (["--stage", "all", "--teacher", "{run}/teacher.pt"], "--stage all trains its own"),
        (["--stage", "distill", "--teacher", "{run}/teacher.pt", "--student", "{run}/student.pt"],
         "--stage distill does not read one"),
    ],
)  # fmt: skip
def test_flags_that_a_stage_would_ignore_are_refused(args, message, run, tmp_path, capsys):
    args = [a.format(run=run) for a in args]
    refused(call(train_mnist.main, [*args, "--out", tmp_path / "out", "--device", "cpu", "--no-progress"], capsys),
            message)  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_sample_out_ending_in_a_slash_is_a_folder(run, tmp_path, capsys):
    args = [run / "teacher.pt", "--n-per-class", "1", "--sampling-steps", "2", "--scales", "1", "--device", "cpu"]
    code, out, err = call(sample.main, [*args, "--out", f"{tmp_path / 'newdir'}/"], capsys)
    assert code == 0, err
    assert (tmp_path / "newdir" / "grid.png").is_file() and not (tmp_path / "newdir.png").exists()


@pytest.mark.parametrize("cli", ["sample", "evaluate"])
def test_a_shift_on_an_epsilon_model_is_one_line(cli, run, tmp_path, capsys):
    out = tmp_path / "out"
    if cli == "sample":
        main, args = sample.main, [run / "teacher.pt", "--n-per-class", "1", *SMALL[2:], "--out", out / "g.png"]
    else:
        main, args = evaluate_cli.main, ["--ckpt", run / "teacher.pt", *SMALL, "--out", out]
    refused(call(main, [*args, "--shift", "3"], capsys), "predicts epsilon on the VP process: leave it out")
    assert not out.exists()


# --- tracebacks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, args",
    [
        ("frontier", ["--run-dir", "{missing}"]),
        ("guidance_variants", ["--teacher", "{missing}/teacher.pt"]),
        ("guiders", ["--dataset", "digits", "--ckpt", "{missing}/teacher.pt"]),
        ("sampling", ["--ckpt", "{missing}/teacher.pt"]),
        ("step_distillation", ["--teacher", "{missing}/teacher.pt"]),
        ("step_distillation", ["--teacher", "{run}/teacher.pt", "--student", "{missing}/student.pt"]),
        ("guidance_variants", ["--teacher", "{run}/teacher.pt", "--student", "{missing}/student.pt", "--n", "20"]),
        ("guiders", ["--dataset", "digits", "--ckpt", "{run}/teacher.pt", "--guide-ckpt", "{missing}/teacher.pt"]),
    ],
)
def test_every_benchmark_given_a_missing_checkpoint_says_so_in_one_line(name, args, run, tmp_path, capsys):
    args = [a.format(run=run, missing=tmp_path / "missing") for a in args]
    main = importlib.import_module(f"benchmarks.{name}").main
    err = refused(call(main, [*args, "--device", "cpu", "--out", tmp_path / "out"], capsys), "missing")
    assert "does not exist" in err or "has no teacher.pt" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not even an empty --out


@pytest.mark.parametrize(
    "main, args, message",
    [
        (end_to_end.main, [*E2E, "--n", "1"], "--n must be at least two samples per class (20), got 1"),
        (end_to_end.main, [*E2E, "--n", "5"], "--n must be at least two samples per class (20), got 5"),
        (end_to_end.main, [*E2E, "--n", "0"], "--n must be a positive integer"),
        (end_to_end.main, [*E2E, "--speed-batch", "0"], "--speed-batch must be a positive integer"),
        (end_to_end.main, [*E2E, "--round-batch-size", "0"], "--round-batch-size must be a positive integer"),
        (end_to_end.main, [*E2E, "--target-sampling-steps", "3"], "is not reached by halving"),
        (end_to_end.main, [*E2E, "--start-sampling-steps", "2048", "--target-sampling-steps", "1024"],
         "--start-sampling-steps must be at most 1000"),
        (time_to_quality.main, [*TTQ, "--variant", "a:lr=abc"], "lr takes a float, got 'abc'"),
        (time_to_quality.main, [*TTQ, "--variant", "a:batch_size=1.5"], "batch_size takes an int, got '1.5'"),
        (time_to_quality.main, [*TTQ, "--variant", "x:lr"], "as FIELD=VALUE; got 'lr'"),
        (time_to_quality.main, [*TTQ, "--variant", "a:", "--variant", "b:p_uncond=1.5"], "p_uncond=1.5 is out of"),
        (time_to_quality.main, [*TTQ, "--n", "1"], "--n must be at least two samples per class (20), got 1"),
        (time_to_quality.main, [*TTQ, "--n", "0"], "--n must be a positive integer"),
        (train_throughput.main, [*THROUGHPUT, "--sizes", "0"], "--sizes must be"),
        (train_throughput.main, [*THROUGHPUT, "--archs", "bogus"], "unknown architecture"),
    ],
)  # fmt: skip
def test_bad_values_of_the_training_benchmarks_are_refused_before_any_training(main, args, message, tmp_path, capsys):
    refused(call(main, [*args, "--out", tmp_path / "out"], capsys), message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "main, args",
    [
        (train_mnist.main, ["--out", "{tmp}/out", *TINY]),
        (sample.main, ["{run}/teacher.pt", "--out", "{tmp}/out/g.png", "--n-per-class", "1", *SMALL[2:]]),
        (evaluate_cli.main, ["--ckpt", "{run}/teacher.pt", "--out", "{tmp}/out", *SMALL]),
        (end_to_end.main, [*E2E, "--out", "{tmp}/out"]),
        (time_to_quality.main, [*TTQ, "--out", "{tmp}/out"]),
        (frontier.main, ["--run-dir", "{run}", "--budgets", "2", "--out", "{tmp}/out", "--n", "20", *SMALL[4:]]),
    ],
)
@pytest.mark.parametrize("seed", [HUGE_SEED, "-1"])
def test_a_seed_out_of_range_is_one_line(main, args, seed, run, tmp_path, capsys):
    args = [a.format(run=run, tmp=tmp_path) for a in args]
    refused(call(main, [*args, "--seed", seed], capsys), "--seed must be")
    assert not (tmp_path / "out").exists()


def test_more_sampling_steps_than_timesteps_is_one_line(run, tmp_path, capsys):
    args = ["--stage", "step-distill", "--student", run / "student.pt", "--start-sampling-steps", "2048",
            "--target-sampling-steps", "1024", "--out", tmp_path / "out", *TINY]  # fmt: skip
    refused(call(train_mnist.main, args, capsys), "--start-sampling-steps must be at most 1000")
    assert not (tmp_path / "out").exists()


# --- weak messages ------------------------------------------------------------------------------------


def test_an_unknown_distill_guider_is_called_unknown(run, tmp_path, capsys):
    args = ["--stage", "distill", "--teacher", run / "teacher.pt", "--distill-guider", "bogus", "--out", tmp_path,
            *TINY]  # fmt: skip
    refused(call(train_mnist.main, args, capsys), "unknown guider 'bogus'; choose one of cfg")
    assert files(tmp_path) == {}


def test_evaluate_out_of_memory_advice_names_its_own_flag(run, tmp_path, capsys, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(evaluate_cli, "sweep", no_memory)
    args = ["--ckpt", run / "teacher.pt", "--out", tmp_path / "eval", *SMALL]
    err = refused(call(evaluate_cli.main, args, capsys), "lower --batch-size")
    assert "--teacher-batch-size" not in err


def test_the_benchmarks_and_sample_name_their_own_flags_when_memory_runs_out(run, tmp_path, capsys, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    from benchmarks import harness

    monkeypatch.setattr(harness, "measure", no_memory)
    args = ["--run-dir", run, "--budgets", "2", "--n", "20", "--device", "cpu", "--out", tmp_path / "out"]
    err = refused(call(frontier.main, args, capsys), "ran out of memory: lower --n")
    assert "--teacher-batch-size" not in err
    monkeypatch.setattr(sample, "sample_scale_grid", no_memory)
    args = [run / "teacher.pt", "--out", tmp_path / "g.png", "--device", "cpu"]
    refused(call(sample.main, args, capsys), "lower --n-per-class or give fewer --scales")


@pytest.mark.parametrize("cli", ["evaluate", "train_mnist"])
def test_an_unwritable_classifier_cache_is_refused_before_any_training(cli, run, tmp_path, capsys, monkeypatch):
    trained = []
    monkeypatch.setattr(evaluate_cli, "CACHE_DIR", Path("/proc/cfg_minimal_cache"))  # cannot be created
    monkeypatch.setattr(evaluate_cli, "load_or_train_classifier", lambda *a, **k: trained.append(a))
    if cli == "evaluate":
        main, args = evaluate_cli.main, ["--ckpt", run / "teacher.pt", *SMALL]
    else:
        main, args = train_mnist.main, [*TINY]
    refused(call(main, [*args, "--out", tmp_path / "out"], capsys), "set CFG_MINIMAL_CACHE to a writable folder")
    assert not trained and not (tmp_path / "out").exists()


def test_resume_takes_the_stored_settings_that_the_command_leaves_out(copy, capsys):
    """The run was trained with --arch unet-tiny and batch 8; `--resume` alone continues it with those, not
    with the defaults (unet, 128); a flag given that differs is refused, naming both values."""
    code, out, err = call(train_mnist.main, ["--out", copy, "--resume", "--stage", "teacher", "--device", "cpu",
                                             "--no-progress"], capsys)  # fmt: skip
    assert code == 0, err
    assert "resuming at train step 4 of 4" in out
    args = ["--out", copy, "--resume", "--stage", "teacher", "--arch", "unet", "--device", "cpu"]
    refused(call(train_mnist.main, args, capsys), "this run was trained with arch=unet-tiny, but this command asks "
                                                  "for arch=unet")  # fmt: skip
    cfg = with_optim(TeacherConfig(arch=None), **{**OPTIM, "batch_size": 8})  # the API: None is left out
    train_teacher(cfg, copy, if_exists="resume", progress=False)


def test_resume_with_a_new_learning_rate_records_where_it_changed(tmp_path, capsys):
    cfg = with_optim(TeacherConfig(arch="unet-tiny"), **OPTIM)
    train_teacher(cfg, tmp_path, progress=False)
    train_teacher(with_optim(cfg, max_train_steps=6, lr=1e-3), tmp_path, if_exists="resume", progress=False)
    assert "lr 0.001, changed from 0.002" in capsys.readouterr().out
    train_teacher(with_optim(cfg, max_train_steps=7, lr=1e-3), tmp_path, if_exists="resume", progress=False)
    ckpt = checkpoint.load_checkpoint(tmp_path / "teacher.pt")
    assert ckpt["lr_history"] == [[0, 2e-3], [4, 1e-3]]
    assert ckpt["teacher_config"]["optim"]["lr"] == 1e-3


def test_sample_checks_its_output_before_it_samples(run, tmp_path, capsys, monkeypatch):
    sampled = []
    monkeypatch.setattr(sample, "sample_scale_grid", lambda *a, **k: sampled.append(a))
    (tmp_path / "file").write_text("not a folder")
    for out in [tmp_path / "file" / "g.png", "/proc/cfg_minimal/g.png"]:  # what a read-only checkout does
        args = [run / "teacher.pt", "--out", out, "--n-per-class", "1", *SMALL[2:]]
        refused(call(sample.main, args, capsys), "cannot write to")
    assert not sampled


def test_the_package_installs_with_pip_from_its_pyproject():
    """`pip install -e .` needs a build system, the dependencies, and every subpackage listed."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["build-system"]["build-backend"] == "setuptools.build_meta"
    required = {line.strip() for line in (REPO / "requirements.txt").read_text().splitlines() if line.strip()}
    assert set(project["project"]["dependencies"]) == required
    packages = {str(p.parent.relative_to(REPO)).replace("/", ".") for p in (REPO / "cfg_minimal").rglob("__init__.py")}
    assert packages <= set(project["tool"]["setuptools"]["packages"])
    assert "pip install -e ." in (REPO / "README.md").read_text()


# --- more hostile inputs (found while probing the surfaces above) --------------------------------------

VARIANTS = ["--teacher", "{run}/teacher.pt", "--n", "20", "--sampling-steps", "2", "--device", "cpu"]
STEPS = ["--teacher", "{run}/teacher.pt", "--run-dir", "{run}", "--n", "20", "--sampling-steps", "2", "--device", "cpu"]


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("time_to_quality", [*TTQ, "--variant", "x:dataset=mnist"], "dataset is set for every variant by --dataset"),
        ("time_to_quality", [*TTQ, "--minutes", "1", "--variant", "x:max_train_steps=5"], "--minutes sets every"),
        ("time_to_quality", [*TTQ, "--variant", "x:lr=1e-3,lr=2e-3"], "give each field once"),
        ("time_to_quality", [*TTQ, "--variant", "x:num_train_timesteps=1"], "num_train_timesteps=1 is out of range"),
        ("time_to_quality", [*TTQ, "--variant", "x:seed=-3"], "seed=-3 is out of range"),
        ("train_throughput", ["--variants", "fp32+compile+compile", *THROUGHPUT], "a variant is one of"),
        ("train_throughput", [*THROUGHPUT, "--archs", "dit-tiny", "--sizes", "15"], "cannot take --sizes 15"),
        ("frontier", ["--run-dir", "{run}", "--budgets", "0", "--n", "20", "--device", "cpu"], "--budgets must be"),
        ("frontier", ["--run-dir", "{run}", "--scales", "nan", "--n", "20", "--device", "cpu"], "--scales must be"),
        ("frontier", ["--run-dir", "{run}", "--extra-seeds", "-1", "--n", "20", "--device", "cpu"], "--seed must be"),
        ("frontier", ["--run-dir", "{missing}", "--n", "20", "--device", "cpu"], "has no teacher.pt"),
        ("guiders", [*GUIDERS[:6], "--grid", "cfg=1,nan", *GUIDERS[8:]], "takes finite numbers"),
        ("guiders", [*GUIDERS, "--spec", "cfg=cfg", "--spec", "cfg=cfg"], "sets cfg twice"),
        ("guiders", [*GUIDERS, "--ckpt", "{run}/student.pt"], "is a student checkpoint, but a teacher is needed"),
        ("guiders", [*GUIDERS, "--student", "{run}/teacher.pt", "--grid", "student=1"],
         "is a teacher checkpoint, but a student is needed"),
        ("guiders", [*GUIDERS, "--methods", "student"], "pass at least one --student"),
        ("guiders", [*GUIDERS[:4], "--methods", "autoguidance", *GUIDERS[8:]], "nothing to measure"),
        ("guiders", [*GUIDERS, "--guide-ckpt", "{run}/teacher.pt"], "add autoguidance to --methods"),
        ("guiders", [*GUIDERS, "--min-accuracy", "5"], "--min-accuracy is a share in [0, 1]"),
        ("guidance_variants", [*VARIANTS, "--student", "{run}/teacher.pt"], "a student is needed"),
        ("guidance_variants", [*VARIANTS, "--phi", "3"], "rescale must be a number in [0, 1]"),
        ("guidance_variants", [*VARIANTS, "--sigma-interval", "5", "1"], "holds no timestep of this schedule"),
        ("step_distillation", [*STEPS, "--student", "{run}/teacher.pt"], "a student is needed"),
        ("step_distillation", [*STEPS, "--student", "{run}/student_2steps.pt"], "is step-distilled"),
        ("step_distillation", [*STEPS, "--student", "{run}/student.pt", "--run-dir", "{missing}"], "is not a folder"),
        ("sampling", ["--arch", "bogus", "--device", "cpu"], "unknown architecture"),
        ("sampling", ["--ckpt", "{run}/student.pt", "--device", "cpu"], "a teacher is needed"),
        ("sampling", ["--scale", "inf", "--device", "cpu"], "--scales must be finite"),
        ("sampling", ["--sampling-steps", "5000", "--device", "cpu"], "--sampling-steps must be at most 1000"),
    ],
)  # fmt: skip
def test_more_hostile_benchmark_inputs_are_one_line_before_any_work(name, args, message, run, tmp_path, capsys):
    args = [a.format(run=run, missing=tmp_path / "missing") for a in args]
    main = importlib.import_module(f"benchmarks.{name}").main
    refused(call(main, [*args, "--out", tmp_path / "out"], capsys), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "main, args, message",
    [
        (evaluate_cli.main, ["--ckpt", "{run}/teacher.pt", "--ckpt", "{run}/teacher.pt", *SMALL], "each --ckpt"),
        (evaluate_cli.main, ["--ckpt", "{run}/teacher.pt", *SMALL, "--scales", "1", "1"], "each of --scales once"),
        (evaluate_cli.main, ["--ckpt", "{run}/teacher.pt", *SMALL, "--batch-size", "0"], "--batch-size must be"),
        (evaluate_cli.main, ["--ckpt", "{run}/teacher.pt", *SMALL, "--scales", "nan"], "--scales must be finite"),
        (sample.main, ["{run}/teacher.pt", "--seed", str(2**64), *SMALL[2:]], "--seed must be"),
        (end_to_end.main, [*E2E, "--seed", "0", "-5"], "--seed must be"),
    ],
)  # fmt: skip
def test_more_hostile_cli_inputs_are_one_line(main, args, message, run, tmp_path, capsys):
    args = [a.format(run=run) for a in args]
    refused(call(main, [*args, "--out", tmp_path / "out"], capsys), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_resume_of_a_student_whose_teacher_is_gone_is_refused(copy, capsys):
    (copy / "teacher.pt").unlink()  # --stage all would train a new teacher, then refuse the student
    before = files(copy)
    refused(call(train_mnist.main, ["--out", copy, "--resume", "--device", "cpu"], capsys), "but not the teacher.pt")
    assert files(copy) == before


def test_end_to_end_takes_the_lock_of_its_folder(tmp_path, capsys):
    with output_lock(tmp_path):
        refused(call(end_to_end.main, [*E2E, "--out", tmp_path], capsys), "another run is writing into")
    assert files(tmp_path) == {}

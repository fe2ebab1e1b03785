"""The command-line tools, end to end on digits with tiny settings, and their handling of mistakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from PIL import Image

from cfg_minimal import load_checkpoint

TINY = ["--arch", "unet-tiny", "--teacher-train-steps", "40", "--distill-train-steps", "20", "--teacher-batch-size",
        "16", "--distill-batch-size", "16", "--round-batch-size", "16", "--sampling-steps", "4", "--eval-n", "20",
        "--device", "cpu", "--no-progress"]  # fmt: skip


def run(script: str, *args: str, cache=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CFG_MINIMAL_CACHE": str(cache)} if cache else None
    cmd = [sys.executable, *(["-m", script] if script.startswith("cfg_minimal") else [str(REPO / script)]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    result = run("train_mnist.py", "--dataset", "digits", "--out", str(out), *TINY, cache=out / "cache")
    assert result.returncode == 0, result.stderr
    return out


def test_train_writes_every_file(run_dir):
    for name in ["teacher.pt", "student.pt", "samples_teacher.png", "samples_student.png", "samples_compare.png",
                 "metrics.json", "guidance_sweep.png", "samples_by_scale.png", "loss.png"]:  # fmt: skip
        assert (run_dir / name).stat().st_size > 0, name
    assert load_checkpoint(run_dir / "teacher.pt", kind="teacher")["train_step"] == 40
    assert load_checkpoint(run_dir / "student.pt", kind="student")["train_step"] == 20
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [row["scale"] for row in metrics["student_vs_teacher"]] == [0, 1, 2, 3, 5]
    assert set(metrics["models"]) == {"teacher", "student"}


@pytest.mark.parametrize(
    "ckpt, sampler", [("teacher.pt", "ddim"), ("student.pt", "ddim"), ("teacher.pt", "dpmsolver++")]
)
def test_sample_reads_either_checkpoint(run_dir, ckpt, sampler, tmp_path):
    out = tmp_path / "grid.png"
    result = run("sample.py", str(run_dir / ckpt), "--scales", "0", "1", "3", "--n-per-class", "2",
                 "--sampling-steps", "3", "--sampler", sampler, "--out", str(out), "--device", "cpu")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size[0] > 100


def test_sample_flags_reach_the_sampler(run_dir, tmp_path, monkeypatch):
    """In-process, catching the grid before it is drawn (the figure titles differ anyway)."""
    import sample

    grids = {}
    monkeypatch.setattr(sample, "save_scale_grid", lambda grid, *args, **kwargs: grids.setdefault(len(grids), grid))
    common = [
        str(run_dir / "teacher.pt"),
        "--scales",
        "3",
        "--n-per-class",
        "1",
        "--sampling-steps",
        "3",
        "--device",
        "cpu",
    ]
    variants = [[], ["--negative-label", "10"], ["--negative-label", "1"], ["--guidance-rescale", "0.7"],
                ["--guidance-interval", "0", "400"]]  # fmt: skip
    for flags in variants:
        assert sample.main([*common, *flags, "--out", str(tmp_path / "grid.png")]) == 0
    plain, null_negative, *changed = grids.values()
    assert torch.equal(null_negative, plain)  # the null label as the negative class is plain CFG
    assert all(not torch.allclose(grid, plain, atol=1e-3) for grid in changed)


def test_step_distillation_stage_writes_each_round_and_measures_it(run_dir, tmp_path):
    result = run("train_mnist.py", "--stage", "step-distill", "--student", str(run_dir / "student.pt"), "--teacher",
                 str(run_dir / "teacher.pt"), "--start-sampling-steps", "8", "--target-sampling-steps", "2",
                 "--round-train-steps", "3", "--out", str(tmp_path), *TINY, cache=run_dir / "cache")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(tmp_path / "student_2steps.pt", kind="student")["sampling_steps"] == 2
    metrics = json.loads((tmp_path / "step_distill" / "metrics.json").read_text())
    steps = {name: model["per_scale"][0]["sampling_steps"] for name, model in metrics["models"].items()}
    assert steps == {"teacher 64 steps": 64, "student 4 steps": 4, "student 2 steps": 2}
    for name in ("samples_student_2_steps.png", "samples_student_4_steps.png", "loss_step_distill.png"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_evaluate_sweep_writes_every_scale_and_model(run_dir, tmp_path):
    result = run("cfg_minimal.evaluate", "--ckpt", str(run_dir / "teacher.pt"), "--ckpt", str(run_dir / "student.pt"),
                 "--scales", "0", "2", "4", "--n", "20", "--sampling-steps", "3", "--out", str(tmp_path),
                 "--device", "cpu", cache=run_dir / "cache")  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("teacher", "student"):
        assert [row["scale"] for row in metrics["models"][name]["per_scale"]] == [0, 2, 4]
        assert all(row["fd"] >= 0 and 0 <= row["accuracy"] <= 1 for row in metrics["models"][name]["per_scale"])
    assert metrics["models"]["teacher"]["per_scale"][1]["evals_per_image"] == 6  # 3 steps x 2 passes
    assert metrics["models"]["student"]["per_scale"][1]["evals_per_image"] == 3
    assert (tmp_path / "guidance_sweep.png").exists() and (tmp_path / "samples_by_scale.png").exists()


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("train_mnist.py", ["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
        ("train_mnist.py", ["--arch", "resnet"], "invalid choice: 'resnet'"),
        ("train_mnist.py", ["--teacher-train-steps", "0"], "--teacher-train-steps must be a positive integer"),
        ("train_mnist.py", ["--p-uncond", "1.5"], "--p-uncond must be in [0, 1)"),
        ("train_mnist.py", ["--out", "/proc/forbidden"], "cannot write to --out"),
        ("train_mnist.py", ["--stage", "distill", "--teacher", "missing.pt", "--out", "{tmp}"], "does not exist"),
        ("sample.py", ["missing.pt"], "does not exist"),
        ("train_mnist.py", ["--stage", "step-distill", "--student", "{run}/student.pt", "--target-sampling-steps",
                            "5", "--out", "{tmp}"], "not reached by halving"),
        ("train_mnist.py", ["--stage", "step-distill", "--student", "{run}/teacher.pt", "--out", "{tmp}"],
         "is a teacher checkpoint, but a student is needed"),
        ("sample.py", ["{run}/teacher.pt", "--scales", "nan"], "--scales must be finite"),
        ("sample.py", ["{run}/teacher.pt", "--sampling-steps", "0"], "--sampling-steps must be a positive integer"),
        ("sample.py", ["{run}/teacher.pt", "--sampling-steps", "5000"], "at most 1000"),
        ("sample.py", ["{run}/samples_teacher.png"], "not a readable checkpoint"),
        ("sample.py", ["{run}/student.pt", "--negative-label", "1"], "student cannot sample with CFG"),
        ("sample.py", ["{run}/teacher.pt", "--guidance-rescale", "2"], "CFG's rescale must be a number in [0, 1]"),
        ("sample.py", ["{run}/teacher.pt", "--guider", "apg:beta=1"], "takes the settings name=value"),
        ("sample.py", ["{run}/student.pt", "--guider", "tcfg"], "cannot sample with TangentialCFG"),
        ("train_mnist.py", ["--stage", "distill", "--teacher", "{run}/teacher.pt", "--distill-guider", "cfg++",
                            "--out", "{tmp}"], "CFG++ is a sampler: --sampler ddim-cfg++"),
        ("train_mnist.py", ["--stage", "distill", "--teacher", "{run}/student.pt", "--out", "{tmp}"],
         "is a student checkpoint, but a teacher is needed"),
        ("train_mnist.py", ["--resume", "--out", "{run}", "--arch", "dit-tiny"], "was trained with arch=unet-tiny"),
    ],
)  # fmt: skip
def test_user_mistakes_exit_2_with_one_message(run_dir, tmp_path, script, args, message):
    args = [a.format(run=run_dir, tmp=tmp_path) for a in args]
    result = run(script, *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_failed_download_names_the_fixes(tmp_path):
    result = run("train_mnist.py", "--dataset", "mnist", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path))
    assert result.returncode == 2
    assert "--data-dir" in result.stderr and "--dataset digits" in result.stderr
    assert "Traceback" not in result.stderr


def test_each_flag_sets_exactly_the_config_fields_it_names():
    """train_mnist's flag table against the config dataclasses: a changed flag changes its fields and no other."""
    from dataclasses import asdict

    import train_mnist
    from cfg_minimal.data import DATASETS

    def flat(configs) -> dict:
        return {f"{stage}.{k}": v for stage, cfg in configs.items() for k, v in _flatten(asdict(cfg)).items()}

    defaults = flat(train_mnist.configs_from(train_mnist.parse_args([])))
    for flag, targets, kwargs in train_mnist.CONFIG_FLAGS:
        default = defaults[targets[0]]
        if isinstance(default, bool):  # a switch: present means True
            changed = flat(train_mnist.configs_from(train_mnist.parse_args([flag])))
            assert {k for k in defaults if changed[k] != defaults[k]} == set(targets), flag
            assert default is False and all(changed[t] is True for t in targets), flag
            continue
        if "choices" in kwargs:
            value = next(c for c in kwargs["choices"] if c != default)
        elif isinstance(default, float):
            value = default + 0.25
        elif default is None or isinstance(default, int):
            value = (default or 0) + 2
        else:
            value = "cpu" if flag == "--device" else "elsewhere"
        changed = flat(train_mnist.configs_from(train_mnist.parse_args([flag, str(value)])))
        # --dataset also brings that data set's teacher recipe (recipes.teacher_config), and only it
        recipe = {f"teacher.{k}" for k in DATASETS[value].teacher_settings} if flag == "--dataset" else set()
        # ... and a compile mode asks for compiling
        implied = {t.replace("compile_mode", "compile") for t in targets} if flag == "--compile-mode" else set()
        assert {k for k in defaults if changed[k] != defaults[k]} == set(targets) | recipe | implied, flag
        assert all(changed[t] == value for t in targets), flag


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out

"""benchmarks.end_to_end in its small setting: the whole recipe runs, its report adds up, and what it
exports reproduces its numbers."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import end_to_end
from cfg_minimal import load_pipeline
from cfg_minimal.evaluate import Judge, generate

SMALL = ["--dataset", "digits", "--device", "cpu", "--teacher-train-steps", "40", "--distill-train-steps", "20",
         "--round-train-steps", "10", "--teacher-batch-size", "32", "--distill-batch-size", "16", "--round-batch-size",
         "16", "--start-sampling-steps", "16", "--target-sampling-steps", "4", "--sampling-steps", "16", "--scales",
         "0", "3", "--n", "40", "--seed", "0", "1", "--speed-batch", "40", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    assert end_to_end.main([*SMALL, "--out", str(out / "run"), "--export", str(out / "pretrained")]) == 0
    return out, json.loads((out / "run" / "end_to_end.json").read_text())


def test_the_report_counts_every_train_step_and_network_evaluation(report):
    _, r = report
    stages = {s["stage"]: s for s in r["stages"]}
    assert [(s["train_steps"], s["batch_size"]) for s in stages.values()] == [(40, 32), (20, 16), (20, 16)]
    for s in stages.values():  # 16 -> 8 -> 4 sampling steps: two rounds of 10
        assert s["images_per_s"] == pytest.approx(s["train_steps"] * s["batch_size"] / s["seconds"])
    evals = {(q["model"], q["scale"]): q["evals_per_image"] for q in r["quality"]}
    assert evals == {("teacher", 0): 16, ("teacher", 3): 32, ("student", 0): 16, ("student", 3): 16,
                     ("student 8 steps", 0): 8, ("student 8 steps", 3): 8,
                     ("student 4 steps", 0): 4, ("student 4 steps", 3): 4}  # fmt: skip
    assert next(s for s in r["speed"] if s["model"] == "teacher")["speedup_vs_teacher"] == 1.0


def test_the_exported_models_reproduce_the_reported_quality(report):
    """Scoring an exported folder again, with the same seed, gives the report's numbers exactly."""
    out, r = report
    pipe = load_pipeline(out / "pretrained" / "digits-student-8steps")
    row = next(q for q in r["quality"] if q["model"] == "student 8 steps" and q["scale"] == 3)
    judge = Judge.load("digits", "./data", torch.device("cpu"), progress=False)
    scores = [judge(*generate(pipe, 40, 3.0, pipe.sampling_steps, seed)[:2]) for seed in (0, 1)]
    assert [s["fd"] for s in row["per_seed"]] == [s["fd"] for s in scores]
    assert row["accuracy"] == pytest.approx(sum(s["accuracy"] for s in scores) / 2, abs=1e-12)


def test_time_to_quality_variants_set_the_fields_they_name():
    from benchmarks.time_to_quality import parse_variant
    from cfg_minimal import UserError

    name, changes = parse_variant("mix:ema_decay=0.99,p_uncond=0.2,batch_size=32,channels_last=true")
    assert name == "mix" and changes == {"ema_decay": 0.99, "p_uncond": 0.2, "batch_size": 32, "channels_last": True}
    assert [type(v) for v in changes.values()] == [float, float, int, bool]
    assert parse_variant("base:") == ("base", {})
    with pytest.raises(UserError, match="'nope' is not a TeacherConfig or OptimConfig field"):
        parse_variant("x:nope=1")


def test_on_cuda_the_defaults_are_the_gpu_recipe_and_flags_still_win():
    from cfg_minimal.recipes import GPU_RECIPES

    gpu = end_to_end.fill_defaults(end_to_end.parse_args(["--round-batch-size", "64"]), torch.device("cuda"))
    recipe = GPU_RECIPES["mnist"]
    assert (gpu.teacher_train_steps, gpu.distill_train_steps, gpu.round_train_steps) == (
        recipe["teacher_train_steps"], recipe["distill_train_steps"], recipe["round_train_steps"])  # fmt: skip
    assert (gpu.teacher_batch_size, gpu.distill_batch_size, gpu.round_batch_size) == (recipe["batch_size"],) * 2 + (64,)
    cpu = end_to_end.fill_defaults(end_to_end.parse_args([]), torch.device("cpu"))
    assert (cpu.teacher_train_steps, cpu.teacher_batch_size, cpu.distill_batch_size) == (None, 128, 64)

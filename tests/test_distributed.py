"""Two processes under torchrun (gloo on the CPU): the same weights on every rank, rank 0's checkpoint,
one global batch split between the ranks, a stop on one rank stopping all, and an exact resume."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import REPO
from ddp_worker import BATCH, LOG_EVERY, SIGTERM_AT, STEPS

from cfg_minimal import load_checkpoint
from cfg_minimal.data import load_dataset

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 ARGS` (localhost, a free port), one thread per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The worker's output folder and what each of its two ranks held at the end (see ddp_worker.py)."""
    out = tmp_path_factory.mktemp("ddp")
    result = torchrun(str(REPO / "tests" / "ddp_worker.py"), str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_both_ranks_end_with_the_same_weights_and_the_checkpoint_is_rank0s(ranks):
    out, (r0, r1) = ranks
    for name in ("a_model", "a_ema", "student_model", "student_ema"):
        assert_same(r0[name], r1[name])
    teacher, student = load_checkpoint(out / "a" / "teacher.pt"), load_checkpoint(out / "a" / "student.pt")
    assert_same(teacher["model"], r0["a_model"])
    assert_same(teacher["ema"], r0["a_ema"])
    assert_same(student["model"], r0["student_model"])
    assert_same(student["ema"], r0["student_ema"])
    assert teacher["world_size"] == 2 and teacher["effective_batch_size"] == 2 * BATCH
    assert len(teacher["losses"]) == 1 and teacher["losses"] == r0["a_losses"] == r1["a_losses"]  # mean over ranks


def test_each_rank_trains_on_its_own_half_of_one_global_batch(ranks):
    _, (r0, r1) = ranks
    data = load_dataset("digits")
    global_idx = torch.randint(0, len(data), (2 * BATCH,), generator=torch.Generator().manual_seed(0))  # seed 0
    assert torch.equal(torch.cat([r0["first_x0"], r1["first_x0"]]), data.images[global_idx])
    assert not torch.equal(r0["first_x0"], r1["first_x0"])
    assert r0["first_loss"] != r1["first_loss"]  # different data and noise: identical weights are DDP's doing


def test_a_signal_to_one_rank_stops_both_and_the_resumed_run_is_exact(ranks):
    _, (r0, r1) = ranks
    # Both processes stop together at the first log point after the signal, and before the run's end.
    assert r0["b_stopped_at"] == r1["b_stopped_at"] == LOG_EVERY < STEPS and SIGTERM_AT < LOG_EVERY
    for r in (r0, r1):
        assert_same(r["b_model"], r["a_model"])  # interrupted + resumed == straight through, on each rank
        assert_same(r["b_ema"], r["a_ema"])


def test_train_mnist_under_torchrun_writes_once_from_rank0(tmp_path):
    result = torchrun(str(REPO / "train_mnist.py"), "--stage", "teacher", "--arch", "unet-tiny",
                      "--teacher-train-steps", "4", "--teacher-batch-size", "8", "--sampling-steps", "2",
                      "--device", "cpu", "--no-progress", "--out", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("2 processes x batch 8 = effective batch 16") == 1  # printed by rank 0 only
    written = sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock")  # .lock: the output folder's lock
    assert written == ["loss.png", "samples_teacher.png", "teacher.pt"]
    ckpt = load_checkpoint(tmp_path / "teacher.pt", kind="teacher")
    assert ckpt["train_step"] == 4 and ckpt["world_size"] == 2 and len(ckpt["rng_per_rank"]) == 2

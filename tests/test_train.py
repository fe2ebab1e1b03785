"""Training: the loss goes down, an interrupted run resumes exactly, a NaN loss stops cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO

from cfg_minimal import OptimConfig, TeacherConfig, UserError, distributed, load_checkpoint, train_teacher, with_optim
from cfg_minimal.data import load_dataset
from cfg_minimal.loop import fit
from cfg_minimal.models import build_model


def test_short_training_lowers_the_loss(arch, tmp_path):
    cfg = with_optim(
        TeacherConfig(arch=arch), max_train_steps=80, batch_size=32, lr=3e-3, warmup_steps=10, device="cpu"
    )
    result = train_teacher(cfg, tmp_path, progress=False)
    first, last = result.losses[0], sum(result.losses[-2:]) / 2  # mean loss over train steps 1-10, and 61-80
    assert last < 0.6 * first, result.losses
    ckpt = load_checkpoint(tmp_path / "teacher.pt", kind="teacher")
    assert ckpt["train_step"] == 80 and ckpt["dataset"] == "digits" and ckpt["image_size"] == 16


def train_cmd(out, steps: int) -> list[str]:
    return [sys.executable, str(REPO / "train_mnist.py"), "--stage", "teacher", "--arch", "unet-tiny",
            "--teacher-train-steps", str(steps), "--teacher-batch-size", "16", "--checkpoint-every", "10000",
            "--sampling-steps", "2",
            "--device", "cpu", "--out", str(out)]  # fmt: skip


def test_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path):
    steps = 1500
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(train_cmd(tmp_path / "a", steps), stderr=subprocess.PIPE, text=True, env=env)
    seen = ""
    while "training teacher" not in seen or "it/s" not in seen:  # the bar is up and moving
        seen += proc.stderr.read(1)
        assert proc.poll() is None, seen
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    stopped = load_checkpoint(tmp_path / "a" / "teacher.pt")
    assert 0 < stopped["train_step"] < steps, "interrupt too late for the test to mean anything"
    assert not [p for p in (tmp_path / "a").iterdir() if p.suffix == ".tmp"]  # never a half-written file

    subprocess.run(train_cmd(tmp_path / "a", steps) + ["--resume"], check=True, env=env, capture_output=True)
    subprocess.run(train_cmd(tmp_path / "b", steps), check=True, env=env, capture_output=True)
    resumed, straight = load_checkpoint(tmp_path / "a" / "teacher.pt"), load_checkpoint(tmp_path / "b" / "teacher.pt")
    assert resumed["train_step"] == straight["train_step"] == steps
    assert resumed["losses"] == straight["losses"]  # the loss curve continues exactly where it stopped
    for key in straight["ema"]:
        assert torch.equal(resumed["ema"][key], straight["ema"][key]), key


@pytest.mark.parametrize(
    "checkpoint_every, message, kept",
    [(20, "in train steps 21-30; stopped, keeping the last good checkpoint", 20),  # found at the log point 30
     (28, "in train steps 21-28; stopped, no checkpoint", None)],  # found before the checkpoint due at 28
)  # fmt: skip
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, checkpoint_every, message, kept):
    """The loss is read from the device every 10 train steps and before every checkpoint, so a NaN at
    train step 26 is caught by the next of those, and no checkpoint ever holds the weights it produced."""
    calls = []

    def loss_fn(model, x0, y):
        calls.append(1)
        loss = (model(x0, torch.zeros(len(y), dtype=torch.long), y) - x0).pow(2).mean()
        return loss * float("nan") if len(calls) > 25 else loss

    data = load_dataset("digits")
    path = tmp_path / "teacher.pt"
    optim = OptimConfig(max_train_steps=100, batch_size=8, lr=1e-3, warmup_steps=1, ema_decay=0.9,
                        checkpoint_every=checkpoint_every, device="cpu")  # fmt: skip
    with pytest.raises(UserError, match=f"loss became nan {message}"):
        fit(build_model("unet-tiny"), loss_fn, data, path, {"kind": "teacher"}, optim, progress=False)
    assert (torch.load(path, weights_only=True)["train_step"] if path.exists() else None) == kept


def test_the_loop_reads_the_loss_once_per_log_interval(tmp_path, monkeypatch):
    """A GPU runs ahead of the host until something reads a value back: the loop does so only every
    log_every train steps and at checkpoints (here 30 train steps, log_every 10: three reads), and the
    logged curve is still the mean of every train step's loss."""
    reads, per_step = [], []
    real = distributed.mean_and_any
    monkeypatch.setattr(distributed, "mean_and_any", lambda value, flag: reads.append(1) or real(value, flag))

    def loss_fn(model, x0, y):
        loss = (model(x0, torch.zeros(len(y), dtype=torch.long), y) - x0).pow(2).mean()
        per_step.append(loss.item())
        return loss

    optim = OptimConfig(max_train_steps=30, batch_size=4, checkpoint_every=1000, device="cpu")
    result = fit(
        build_model("unet-tiny"), loss_fn, load_dataset("digits"), tmp_path / "t.pt", {}, optim, progress=False
    )
    assert len(reads) == 3
    expected = [sum(per_step[i : i + 10]) / 10 for i in (0, 10, 20)]
    assert result.losses == pytest.approx(expected, rel=1e-6)


def test_a_stop_during_the_last_train_step_still_stops(tmp_path):
    """Ctrl-C or SIGTERM on the last train step saves the finished run and still raises, so that a
    following stage (the student after the teacher) does not start."""
    calls = []

    def loss_fn(model, x0, y):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by fit's stop flag
        return (model(x0, torch.zeros(len(y), dtype=torch.long), y) - x0).pow(2).mean()

    optim = OptimConfig(max_train_steps=5, batch_size=4, checkpoint_every=100, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        fit(build_model("unet-tiny"), loss_fn, load_dataset("digits"), tmp_path / "t.pt", {}, optim, progress=False)
    assert torch.load(tmp_path / "t.pt", weights_only=True)["train_step"] == 5

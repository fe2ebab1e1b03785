"""Run by test_distributed.py under torchrun (gloo, CPU): tiny DDP runs on digits; each rank dumps what it holds.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py OUT

1. teacher A: STEPS train steps straight through, recording each rank's first batch and first (local) loss;
2. teacher B: the same run, but rank 1 alone gets SIGTERM during train step 3; then it resumes to STEPS;
3. a student distilled from A for a few train steps.
Each rank writes OUT/rank{r}.pt with its final weights of every run; rank 0's fit also writes the
checkpoints in OUT/a and OUT/b, as in any run.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

import cfg_minimal.guidance_free as guidance_free
import cfg_minimal.train as train
from cfg_minimal import TeacherConfig, distributed, load_checkpoint, train_teacher, with_optim
from cfg_minimal.distill import DistillConfig, distill_student

STEPS, BATCH, SIGTERM_AT = 16, 4, 2  # SIGTERM_AT: 0-based train step during which rank 1 is signalled
LOG_EVERY = 10  # fit's default: every process checks for a stop at these train steps
diffusion_loss = train.diffusion_loss


def recording_loss(record: dict, signal_at: int | None):
    """A drop-in for train.diffusion_loss that remembers the first batch and can signal this process."""

    def make(scheduler, *args):
        loss_fn, calls = diffusion_loss(scheduler, *args), [0]

        def wrapped(model, x0, y):
            if calls[0] == signal_at and distributed.rank() == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # caught by fit's stop flag, not fatal
            loss = loss_fn(model, x0, y)
            if calls[0] == 0:
                record.update(first_x0=x0.clone(), first_y=y.clone(), first_loss=loss.item())
            calls[0] += 1
            return loss

        return wrapped

    return make


def use_loss(loss) -> None:
    """The teacher's loss builder, where train_teacher looks it up (train_teacher picks it by objective)."""
    train.diffusion_loss = guidance_free.diffusion_loss = loss


def main() -> None:
    out = Path(sys.argv[1])
    distributed.init("cpu")
    cfg = with_optim(TeacherConfig(arch="unet-tiny"), max_train_steps=STEPS, batch_size=BATCH, lr=3e-3, warmup_steps=2,
                     device="cpu", checkpoint_every=1000)  # fmt: skip
    dump: dict = {}

    use_loss(recording_loss(dump, signal_at=None))
    a = train_teacher(cfg, out / "a", progress=False)
    dump.update(a_model=a.model.state_dict(), a_ema=a.ema.state_dict(), a_losses=a.losses)

    use_loss(recording_loss({}, signal_at=SIGTERM_AT))
    try:
        train_teacher(cfg, out / "b", progress=False)
        raise AssertionError("run B was not interrupted")
    except KeyboardInterrupt:
        dump["b_stopped_at"] = load_checkpoint(out / "b" / "teacher.pt")["train_step"]
    use_loss(diffusion_loss)
    b = train_teacher(cfg, out / "b", if_exists="resume", progress=False)
    dump.update(b_model=b.model.state_dict(), b_ema=b.ema.state_dict())

    student_cfg = with_optim(DistillConfig(), max_train_steps=3, batch_size=BATCH, device="cpu")
    s = distill_student(out / "a" / "teacher.pt", student_cfg, out / "a", progress=False)
    dump.update(student_model=s.model.state_dict(), student_ema=s.ema.state_dict())
    torch.save(dump, out / f"rank{distributed.rank()}.pt")
    distributed.cleanup()


if __name__ == "__main__":
    main()

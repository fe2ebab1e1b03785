"""Train for a time budget: how many train steps of a teacher fit in N minutes on this machine, measured.

A run given in minutes becomes an ordinary run of that many train steps, so its cosine learning-rate decay
is fitted to the budget, a checkpoint stores the count (a resumed run does not measure again) and the seed
reproduces it: pass the printed count as --teacher-train-steps to repeat a run exactly on another machine.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .errors import UserError
from .loop import with_optim
from .train import TeacherConfig, train_teacher

# Three short throwaway runs: the first pays one-time costs (imports, caches, allocator) and is not used; the
# difference of the other two is the cost of 30 train steps alone.
PROBE_TRAIN_STEPS = (2, 2, 32)


def train_steps_in(minutes: float, cfg: TeacherConfig) -> int:
    """The train steps of `cfg` that fit in `minutes` of wall time, the whole training command included.

    Throwaway runs of PROBE_TRAIN_STEPS train steps (same model, loss, batch and device) give the time of one
    train step (the last two runs' difference over 30) and the fixed cost of a run (loading data, building the
    model, writing the checkpoint); the probes' own time is taken off the budget."""
    start = time.perf_counter()
    seconds = []
    with tempfile.TemporaryDirectory() as folder:
        for i, k in enumerate(PROBE_TRAIN_STEPS):
            probe = with_optim(cfg, max_train_steps=k, checkpoint_every=10**9)
            tic = time.perf_counter()
            train_teacher(probe, Path(folder) / str(i), progress=False)
            seconds.append(time.perf_counter() - tic)
    (_, short, long), (_, k_short, k_long) = seconds, PROBE_TRAIN_STEPS
    per_step = max(long - short, 1e-9) / (k_long - k_short)
    fixed = max(short - k_short * per_step, 0.0)
    left = minutes * 60 - (time.perf_counter() - start) - fixed
    steps = int(left / per_step)
    if steps < 1:
        raise UserError(f"{minutes:g} minutes do not fit one train step here after measuring ({per_step:.2f} s per "
                        f"train step, {fixed:.0f} s to load and save): give more minutes")  # fmt: skip
    return steps

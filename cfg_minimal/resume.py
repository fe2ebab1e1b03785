"""Stopping a run and continuing it exactly: the resume policy, stop signals and the RNG state.

A stage first asks `existing_run` what to do with a checkpoint already at its path (an error, continue
it, or train over it), then `resume_config` which settings the continued run takes: the stored ones,
except the few that `CHANGEABLE_ON_RESUME` names. While `loop.fit` trains, `stop_requests` turns Ctrl-C
and SIGTERM into a flag checked between train steps, and each checkpoint carries `rng_state()`, which
`set_rng_state` puts back, so a resumed run draws the same noise an uninterrupted one would have.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from . import distributed
from .checkpoint import load_checkpoint
from .errors import UserError

StageConfig = TypeVar("StageConfig")  # TeacherConfig, DistillConfig or StepDistillConfig

MAX_SEED = 2**63 - 1  # the largest seed a CLI takes: torch's generators take 64 bits, the stages add small offsets
IF_EXISTS = ("error", "resume", "overwrite")  # what a stage does with a checkpoint already at its path


def existing_run(path: Path, kind: str, if_exists: str) -> dict[str, Any] | None:
    """The checkpoint at `path` to continue (if_exists='resume'), or None to start afresh. A finished or
    interrupted run is never replaced by accident: with 'error' (the default) an existing file is an error."""
    if if_exists not in IF_EXISTS:
        raise UserError(f"if_exists must be one of {IF_EXISTS}, got {if_exists!r}")
    if path.is_dir():
        raise UserError(f"{str(path)!r} is a folder, not a checkpoint file; remove it or choose another --out")
    if not path.exists() or if_exists == "overwrite":
        return None
    if if_exists == "error":
        raise UserError(f"{str(path)!r} already exists: pass --resume to continue that run, --overwrite to train "
                        "it again from scratch, or choose another --out")  # fmt: skip
    return load_checkpoint(path, kind=kind)


# What a resumed run takes from the command that resumes it; every other setting must equal the stored one.
# The learning rate may change so that a run whose loss turned NaN can go on from its last checkpoint;
# channels_last, compile, compile_mode and fused change speed, not the model (fused AdamW is the same update).
SPEED_SWITCHES = ("channels_last", "compile", "compile_mode", "fused")
CHANGEABLE_ON_RESUME = ("data_dir", "optim.device", "optim.checkpoint_every", "optim.max_train_steps", "optim.lr",
                        *(f"optim.{k}" for k in SPEED_SWITCHES))  # fmt: skip


def resume_config(
    cls: type[StageConfig],
    ckpt: dict[str, Any],
    key: str,
    requested: StageConfig,
    also_changeable: tuple[str, ...] = (),
) -> StageConfig:
    """The config a resumed run continues with: the one stored in ckpt[key], with CHANGEABLE_ON_RESUME
    from `requested` (max_train_steps where given: more train steps extend the run, the cosine decay
    stretched to the new end). A field `requested` leaves None (arch, max_train_steps) takes the stored
    value. Any other difference is a UserError: a run never silently continues with settings other than
    the ones the command asks for. A new learning rate is added to ckpt['lr_history'], [[train_step, lr], ...]."""
    optim_cls = type(requested.optim)  # OptimConfig, not imported: loop.py imports this module
    stored = cls(**{**ckpt[key], "optim": optim_cls(**ckpt[key]["optim"])})
    before, now = flat_config(asdict(stored)), flat_config(asdict(requested))
    now = {k: before[k] if now.get(k) is None else now[k] for k in before}  # left out: the stored value
    differ = [k for k in before if k not in CHANGEABLE_ON_RESUME + also_changeable and now[k] != before[k]]
    if differ:
        raise UserError(
            f"--resume: this run was trained with {', '.join(f'{k}={before[k]}' for k in differ)}, but this command "
            f"asks for {', '.join(f'{k}={now[k]}' for k in differ)}. Pass the settings it was trained with (only "
            "train steps, the learning rate, paths, the device and the checkpoint interval may change), or choose "
            "another --out"
        )
    if now["optim.max_train_steps"] < ckpt["train_step"]:
        raise UserError(
            f"--resume: this run is already at train step {ckpt['train_step']}, past the "
            f"{now['optim.max_train_steps']} train steps asked for; ask for at least that many"
        )
    changed = ("device", "checkpoint_every", "max_train_steps", "lr", *SPEED_SWITCHES)
    optim = replace(stored.optim, **{k: now[f"optim.{k}"] for k in changed})
    history = [list(change) for change in ckpt.get("lr_history") or [[0, stored.optim.lr]]]
    if optim.lr != history[-1][1]:  # a change at the train step of the last change replaces it
        history = [*history[: -1 if history[-1][0] == ckpt["train_step"] else None], [ckpt["train_step"], optim.lr]]
    ckpt["lr_history"] = history  # loop.Run keeps it in every checkpoint it writes
    if distributed.is_main():
        lr = f"lr {optim.lr:g}" + (f", changed from {stored.optim.lr:g}" if optim.lr != stored.optim.lr else "")
        print(f"resuming at train step {ckpt['train_step']} of {optim.max_train_steps} with the stored settings "
              f"({lr}); data_dir, device, checkpoint_every and speed switches as this command gives them")  # fmt: skip
    return replace(stored, data_dir=requested.data_dir, optim=optim)


def flat_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flat_config(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@contextmanager
def stop_requests() -> Iterator[Callable[[], bool]]:
    """While training, Ctrl-C and SIGTERM only raise a flag; the loop checks it between train steps, so a
    checkpoint never holds half a step (a half-applied optimizer update, a consumed RNG draw)."""
    requested: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = [signal.signal(sig, lambda signum, frame: requested.append(signum)) for sig in signals]
    except ValueError:  # not the main thread: leave signals alone
        yield lambda: False
        return
    try:
        yield lambda: bool(requested)
    finally:
        for sig, handler in zip(signals, previous):
            signal.signal(sig, handler)


def rng_state() -> dict[str, Any]:
    """This process's RNG state: the CPU generator's, and every CUDA device's where there is CUDA."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back a state from `rng_state` (its CUDA part only where this machine has CUDA)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

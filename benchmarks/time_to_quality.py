"""Teacher quality against training wall time, for variants of the training recipe (an ablation).

    python -m benchmarks.time_to_quality --dataset mnist --data-dir ../shared/data --teacher-train-steps 600 \\
        --variant base: --variant ema0.99:ema_decay=0.99 --variant lr4e-3:lr=4e-3 --variant batch128:batch_size=128

Each --variant NAME:FIELD=VALUE,... trains a teacher from scratch into OUT/NAME with the TeacherConfig /
OptimConfig fields changed (the rest: the flags, then the defaults), times the training alone, and
scores the EMA weights: n samples per scale from the same noise (the mean over --seed), --sampling-steps
DDIM steps, accuracy and FD as in `python -m cfg_minimal.evaluate`, evaluations counted. Prints one row
per variant; writes OUT/time_to_quality.json. Compare wall times within one run only: a CPU's speed
varies between sessions.
"""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from pathlib import Path

import torch

from benchmarks import harness
from cfg_minimal import OptimConfig, TeacherConfig, UserError, load_pipeline, pick_device, train_teacher, with_optim
from cfg_minimal.data import DATASETS
from cfg_minimal.evaluate import Judge


def parse_variant(text: str) -> tuple[str, dict[str, object]]:
    """'ema:ema_decay=0.99,lr=1e-3' -> ('ema', {'ema_decay': 0.99, 'lr': 0.001}), typed as the field's default."""
    name, _, settings = text.partition(":")
    defaults = {f.name: getattr(TeacherConfig(), f.name) for f in fields(TeacherConfig) if f.name != "optim"}
    defaults.update({f.name: getattr(OptimConfig(), f.name) for f in fields(OptimConfig)})
    changes: dict[str, object] = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        if key not in defaults or defaults[key] is None:
            raise UserError(f"--variant {text!r}: {key!r} is not a TeacherConfig or OptimConfig field with a default")
        kind = type(defaults[key])
        try:
            changes[key] = value.lower() in ("1", "true") if kind is bool else kind(value)
        except ValueError:
            raise UserError(f"--variant {text!r}: {key} takes a {kind.__name__}, got {value!r}") from None
    name = name or "base"
    if Path(name).name != name or name in (".", ".."):
        raise UserError(f"--variant {text!r}: its NAME is a folder in --out, so it cannot hold a path")
    return name, changes


def train(name: str, changes: dict, args: argparse.Namespace, out: harness.Outputs) -> tuple[dict, Path]:
    """Train one variant's teacher into OUT/NAME, timed -> (its row so far, its checkpoint)."""
    optim_keys = {f.name for f in fields(OptimConfig)}
    cfg = TeacherConfig(dataset=args.dataset, data_dir=args.data_dir)
    cfg = with_optim(cfg, max_train_steps=args.teacher_train_steps, batch_size=args.teacher_batch_size,
                     device=args.device, **{k: v for k, v in changes.items() if k in optim_keys})  # fmt: skip
    cfg = replace(cfg, **{k: v for k, v in changes.items() if k not in optim_keys})
    if_exists = "overwrite" if args.overwrite else "error"  # claimed up front; the loop refuses again
    with harness.Timer(pick_device(args.device)) as timer:
        train_teacher(cfg, out.folder / name, if_exists=if_exists, progress=not args.no_progress)
    out.written.add(out.folder / name / "teacher.pt")
    row = dict(variant=name, changes=changes, seconds=timer.seconds, train_steps=cfg.optim.max_train_steps,
               images_per_s=cfg.optim.max_train_steps * cfg.optim.batch_size / timer.seconds)  # fmt: skip
    return row, out.folder / name / "teacher.pt"


def score(row: dict, path: Path, args: argparse.Namespace, judge: Judge) -> dict:
    """The variant's accuracy, FD and evaluations per image at each scale, as columns accuracy_s1, fd_s1, ..."""
    pipe = load_pipeline(path, device=pick_device(args.device))
    scores = harness.measure(harness.grid({row["variant"]: pipe}, args.scales, steps=args.sampling_steps), judge,
                             args.n, args.seed)  # fmt: skip
    for s, r in zip(args.scales, scores):
        row.update({f"{key}_s{s:g}": r.get(key) for key in ("accuracy", "fd", "evals_per_image")})
    return row


def run(args: argparse.Namespace) -> None:
    variants = [parse_variant(v) for v in args.variant or ["base:"]]
    names = [name for name, _ in variants]
    if len(set(names)) < len(names):
        raise UserError(f"two --variant share a NAME ({names}); each trains into its own folder OUT/NAME")
    checkpoints = [f"{name}/teacher.pt" for name in names]
    out = harness.Outputs.of(args, "time_to_quality.json", *checkpoints)  # refused before any training
    judge = harness.load_judge(args.dataset, args.data_dir, pick_device(args.device))
    rows = [score(*train(name, changes, args, out), args, judge) for name, changes in variants]
    cols = [(f"{m}_s{s:g}", f"{m} s={s:g}", "{:.3f}") for s in args.scales for m in ("accuracy", "fd")]
    print(f"\n{torch.get_num_threads()} threads, {args.teacher_train_steps} train steps, n = {args.n}, "
          f"{args.sampling_steps} DDIM steps")  # fmt: skip
    harness.Table([("variant", "variant", "{}"), ("seconds", "wall s", "{:.0f}"),
                   ("images_per_s", "train images/s", "{:.0f}"), *cols]).print(rows)  # fmt: skip
    flags = {key: value for key, value in vars(args).items() if key != "command"}
    out.json("time_to_quality.json", harness.record(args, pick_device(args.device), args=flags, rows=rows))


def build_parser() -> argparse.ArgumentParser:
    p = harness.parser("time_to_quality", __doc__, n=500)
    p.add_argument("--dataset", default="mnist", choices=list(DATASETS), help="default: mnist")
    p.add_argument("--variant", action="append", default=None, help="NAME:FIELD=VALUE,... (repeat); default: base")
    p.add_argument("--teacher-train-steps", type=int, default=600, help="default: 600")
    p.add_argument("--teacher-batch-size", type=int, default=64, help="default: 64")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0], help="default: 1 3")
    p.add_argument("--sampling-steps", type=int, default=16, help="DDIM steps (default: 16)")
    p.add_argument("--no-progress", action="store_true")
    return p


main = harness.entry(build_parser, run, __name__)

"""Teacher quality against training wall time, for variants of the training recipe (an ablation).

    python -m benchmarks.time_to_quality --dataset mnist --data-dir ../shared/data --teacher-train-steps 600 \\
        --variant base: --variant ema0.99:ema_decay=0.99 --variant lr4e-3:lr=4e-3 --variant batch128:batch_size=128

With --minutes M instead of a count, each variant trains for the train steps that fit in M minutes on this
machine (measured first, cfg_minimal/budget.py): an ablation at equal wall time.

Each --variant NAME:FIELD=VALUE,... trains a teacher from scratch into OUT/NAME with the TeacherConfig /
OptimConfig fields changed (the rest: the flags, then the dataclass defaults, so that a row means the same
whatever a data set's recipe in data.py says; name a recipe's fields in a variant to train it), times the
training alone, and scores the EMA weights: n samples per scale from the same noise (the mean over
--seed), --sampling-steps DDIM steps, accuracy and FD as in `python -m cfg_minimal.evaluate`, evaluations
counted. Prints one row per variant; writes OUT/time_to_quality.json. Compare wall times within one run
only: a CPU's speed varies between sessions.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import fields, replace
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from benchmarks import harness
from cfg_minimal import OptimConfig, TeacherConfig, UserError, load_pipeline, pick_device, train_teacher, with_optim
from cfg_minimal.budget import train_steps_in
from cfg_minimal.checkpoint import output_lock
from cfg_minimal.data import DATASETS
from cfg_minimal.evaluate import Judge, check_classifier_cache
from cfg_minimal.loop import check_optim
from cfg_minimal.models import ARCHITECTURES
from cfg_minimal.predictions import check_prediction_type
from cfg_minimal.resume import MAX_SEED
from cfg_minimal.schedulers import BETA_SCHEDULES

# Fields a variant may not change: the flags set them for every variant, and the judge is the --dataset's.
FROM_FLAGS = {"dataset": "--dataset", "data_dir": "--data-dir", "device": "--device"}
# the type of the fields whose default is None
UNSET = {"arch": str, "max_train_steps": int, "timestep_sampling": str, "min_snr_gamma": float}
BOOLS = {"true": True, "1": True, "false": False, "0": False}


def parse_variant(text: str) -> tuple[str, dict[str, object]]:
    """'ema:ema_decay=0.99,lr=1e-3' -> ('ema', {'ema_decay': 0.99, 'lr': 0.001}), typed as the field's default."""
    name, _, settings = text.partition(":")
    defaults = {f.name: getattr(TeacherConfig(), f.name) for f in fields(TeacherConfig) if f.name != "optim"}
    defaults.update({f.name: getattr(OptimConfig(), f.name) for f in fields(OptimConfig)})
    changes: dict[str, object] = {}
    for item in filter(None, settings.split(",")):
        key, eq, value = item.partition("=")
        if key not in defaults:
            raise UserError(f"--variant {text!r}: {key!r} is not a TeacherConfig or OptimConfig field")
        if key in FROM_FLAGS:
            raise UserError(f"--variant {text!r}: {key} is set for every variant by {FROM_FLAGS[key]}")
        if not eq or key in changes:
            raise UserError(f"--variant {text!r}: give each field once, as FIELD=VALUE; got {item!r}")
        changes[key] = typed(text, key, value, defaults[key])
    name = name or "base"
    if Path(name).name != name or name in (".", ".."):
        raise UserError(f"--variant {text!r}: its NAME is a folder in --out, so it cannot hold a path")
    return name, changes


def typed(text: str, key: str, value: str, default: object) -> object:
    """A variant's VALUE as the type of the field's default (bool: true / false / 1 / 0)."""
    kind = UNSET.get(key, type(default))
    if kind is bool and value.lower() not in BOOLS:
        raise UserError(f"--variant {text!r}: {key} is true or false, got {value!r}")
    try:
        return BOOLS[value.lower()] if kind is bool else kind(value)
    except ValueError:
        article = "an" if kind.__name__[0] in "aeiou" else "a"
        raise UserError(f"--variant {text!r}: {key} takes {article} {kind.__name__}, got {value!r}") from None


def variant_config(changes: dict, args: argparse.Namespace) -> TeacherConfig:
    """The variant's TeacherConfig: its changes over the flags over the defaults; every value in its range."""
    optim_keys = {f.name for f in fields(OptimConfig)}
    cfg = TeacherConfig(dataset=args.dataset, data_dir=args.data_dir)  # the dataclass defaults, not the recipe
    flags = dict(max_train_steps=args.teacher_train_steps, batch_size=args.teacher_batch_size, device=args.device)
    cfg = with_optim(cfg, **{**flags, **{k: v for k, v in changes.items() if k in optim_keys}})
    cfg = replace(cfg, **{k: v for k, v in changes.items() if k not in optim_keys})
    check_optim(cfg.optim)
    check_prediction_type(cfg.prediction_type)
    problems = {
        "p_uncond": 0 <= cfg.p_uncond < 1,
        "beta_schedule": cfg.beta_schedule in BETA_SCHEDULES,
        "arch": cfg.arch is None or cfg.arch in ARCHITECTURES,
        "num_train_timesteps": cfg.num_train_timesteps >= args.sampling_steps,
        "seed": 0 <= cfg.optim.seed <= MAX_SEED,
    }
    bad = [f"{key}={getattr(cfg, key, None) if key != 'seed' else cfg.optim.seed}" for key, ok in problems.items()
           if not ok]  # fmt: skip
    if bad:
        raise UserError(f"--variant: {', '.join(bad)} is out of range (p_uncond in [0, 1), beta_schedule one of "
                        f"{', '.join(BETA_SCHEDULES)}, arch one of {', '.join(ARCHITECTURES)}, num_train_timesteps "
                        "at least --sampling-steps, seed in [0, 2**63 - 1])")  # fmt: skip
    return cfg


def train(name: str, changes: dict, cfg: TeacherConfig, args: argparse.Namespace, out: harness.Outputs) -> tuple:
    """Train one variant's teacher into OUT/NAME, timed -> (its row so far, its checkpoint)."""
    if_exists = "overwrite" if args.overwrite else "error"  # claimed up front; the loop refuses again
    if args.minutes is not None:  # equal wall time: each variant gets the train steps that fit, measured first
        cfg = with_optim(cfg, max_train_steps=train_steps_in(args.minutes, cfg))
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


def read_run(path: str) -> dict:
    """An earlier run's time_to_quality.json, or a UserError naming the file."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"--plot {path}: cannot read it ({err})") from None
    if not (isinstance(record, dict) and isinstance(record.get("rows"), list) and "args" in record):
        raise UserError(f"--plot {path}: not a time_to_quality.json (no rows)")
    return record


def plot(args: argparse.Namespace) -> None:
    """--plot: one figure from earlier runs' JSONs, no training: accuracy and FD at each scale against training
    minutes, a point per variant (named beside it), one marker per run."""
    runs = [read_run(path) for path in args.plot]
    scales = sorted({float(key.split("_s")[1]) for r in runs for row in r["rows"] for key in row if "fd_s" in key})
    fig, axes = plt.subplots(2, len(scales), figsize=(5 * len(scales), 7), squeeze=False)
    for run_, marker in zip(runs, "os^Dv<>"):
        label = f"{run_['args']['minutes']:g} min each" if run_["args"].get("minutes") else "equal train steps"
        for col, s in enumerate(scales):
            for row_axes, metric in zip(axes, ("accuracy", "fd")):
                ax = row_axes[col]
                points = [(r["seconds"] / 60, r.get(f"{metric}_s{s:g}"), r["variant"]) for r in run_["rows"]]
                points = [p for p in points if p[1] is not None]
                ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, label=label)
                for x, y, name in points:
                    ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
                ax.set(xlabel="training wall time (minutes)", ylabel=f"{metric} at s = {s:g}")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Teacher quality against CPU training time, one point per recipe variant")
    fig.tight_layout()
    out = harness.Outputs.of(args, f"time_to_quality_{runs[0]['args']['dataset']}.png")
    out.figure(f"time_to_quality_{runs[0]['args']['dataset']}.png", fig)


def run(args: argparse.Namespace) -> None:
    if args.plot:
        return plot(args)
    variants = [parse_variant(v) for v in args.variant or ["base:"]]
    names = [name for name, _ in variants]
    if len(set(names)) < len(names):
        raise UserError(f"two --variant share a NAME ({names}); each trains into its own folder OUT/NAME")
    harness.require_positive(args, "teacher_train_steps", "teacher_batch_size")
    if args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes > 0):
        raise UserError(f"--minutes must be a positive number, got {args.minutes}")
    counted = [name for name, changes in variants if "max_train_steps" in changes]
    if args.minutes is not None and counted:
        raise UserError(f"--minutes sets every variant's train steps; variant {counted[0]} sets max_train_steps too: "
                        "give one of them")  # fmt: skip
    configs = [variant_config(changes, args) for _, changes in variants]  # every variant checked before any trains
    classes = DATASETS[args.dataset].num_classes
    if args.n < 2 * classes:  # diversity needs two samples of every class
        raise UserError(f"--n must be at least two samples per class ({2 * classes}), got {args.n}")
    checkpoints = [f"{name}/teacher.pt" for name in names]
    out = harness.Outputs.of(args, "time_to_quality.json", *checkpoints)  # refused before any training
    check_classifier_cache(args.dataset)
    with output_lock(out.folder):  # a second run into the same folder is refused, not interleaved
        judge = harness.load_judge(args.dataset, args.data_dir, pick_device(args.device))
        rows = [score(*train(name, changes, cfg, args, out), args, judge)
                for (name, changes), cfg in zip(variants, configs)]  # fmt: skip
        cols = [(f"{m}_s{s:g}", f"{m} s={s:g}", "{:.3f}") for s in args.scales for m in ("accuracy", "fd")]
        steps = f"{args.minutes:g} minutes each" if args.minutes else f"{args.teacher_train_steps} train steps"
        print(f"\n{torch.get_num_threads()} threads, {steps}, n = {args.n}, "
              f"{args.sampling_steps} DDIM steps")  # fmt: skip
        harness.Table([("variant", "variant", "{}"), ("seconds", "wall s", "{:.0f}"), ("train_steps", "train steps",
                       "{:d}"), ("images_per_s", "train images/s", "{:.0f}"), *cols]).print(rows)  # fmt: skip
        flags = {key: value for key, value in vars(args).items() if key != "command"}
        out.json("time_to_quality.json", harness.record(args, pick_device(args.device), args=flags, rows=rows))


def build_parser() -> argparse.ArgumentParser:
    p = harness.parser("time_to_quality", __doc__, n=500)
    p.add_argument("--dataset", default="mnist", choices=list(DATASETS), help="default: mnist")
    p.add_argument("--variant", action="append", default=None, help="NAME:FIELD=VALUE,... (repeat); default: base")
    p.add_argument("--teacher-train-steps", type=int, default=600, help="default: 600")
    p.add_argument("--minutes", type=float, default=None,
                   help="train each variant for about this many minutes (its train steps measured first, budget.py) "
                   "instead of --teacher-train-steps: equal wall time")  # fmt: skip
    p.add_argument("--teacher-batch-size", type=int, default=64, help="default: 64")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0], help="default: 1 3")
    p.add_argument("--sampling-steps", type=int, default=16, help="DDIM steps (default: 16)")
    p.add_argument("--plot", nargs="+", metavar="JSON", help="no training: a figure from earlier runs' JSONs")
    p.add_argument("--no-progress", action="store_true")
    return p


main = harness.entry(build_parser, run, __name__)

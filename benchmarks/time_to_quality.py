"""Teacher quality against training wall time, for variants of the training recipe (an ablation).

    python -m benchmarks.time_to_quality --dataset mnist --data-dir ../shared/data --teacher-train-steps 600 \
        --variant base: --variant ema0.99:ema_decay=0.99 --variant lr4e-3:lr=4e-3 --variant batch128:batch_size=128

Each --variant NAME:FIELD=VALUE,... trains a teacher from scratch with the TeacherConfig / OptimConfig
fields changed (the rest: the flags, then the defaults), times the training alone, and scores the EMA
weights: n samples per scale from the same noise, --sampling-steps DDIM steps, accuracy and FD as in
`python -m cfg_minimal.evaluate`. Prints one row per variant and budget; writes time_to_quality.json
into --out. Compare wall times within one run only: a CPU's speed varies between sessions.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

from cfg_minimal import OptimConfig, TeacherConfig, UserError, load_pipeline, pick_device, train_teacher, with_optim
from cfg_minimal.errors import report
from cfg_minimal.evaluate import Judge, generate


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
        changes[key] = value.lower() in ("1", "true") if kind is bool else kind(value)
    return name or "base", changes


def train_and_score(name: str, changes: dict, args: argparse.Namespace, judge: Judge) -> dict:
    """Train one variant's teacher into OUT/NAME and score it -> its table row."""
    optim_keys = {f.name for f in fields(OptimConfig)}
    cfg = TeacherConfig(dataset=args.dataset, data_dir=args.data_dir)
    cfg = with_optim(cfg, max_train_steps=args.teacher_train_steps, batch_size=args.teacher_batch_size,
                     device=args.device, **{k: v for k, v in changes.items() if k in optim_keys})  # fmt: skip
    cfg = replace(cfg, **{k: v for k, v in changes.items() if k not in optim_keys})
    start = time.perf_counter()
    train_teacher(cfg, Path(args.out) / name, if_exists="overwrite", progress=not args.no_progress)
    seconds = time.perf_counter() - start
    pipe = load_pipeline(Path(args.out) / name / "teacher.pt", device=pick_device(args.device))
    row = dict(variant=name, changes=changes, seconds=seconds, train_steps=cfg.optim.max_train_steps,
               images_per_s=cfg.optim.max_train_steps * cfg.optim.batch_size / seconds)  # fmt: skip
    for s in args.scales:
        score = judge(*generate(pipe, args.n, s, args.sampling_steps, args.seed)[:2])
        row.update({f"accuracy_s{s:g}": score["accuracy"], f"fd_s{s:g}": score["fd"]})
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--variant", action="append", default=None, help="NAME:FIELD=VALUE,... (repeat); default: base")
    p.add_argument("--teacher-train-steps", type=int, default=600)
    p.add_argument("--teacher-batch-size", type=int, default=64)
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--sampling-steps", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/time_to_quality")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variant or ["base:"]]
        judge = Judge.load(args.dataset, args.data_dir, pick_device(args.device), progress=False)
        rows = [train_and_score(name, changes, args, judge) for name, changes in variants]
    except Exception as err:
        return report(err)
    Path(args.out, "time_to_quality.json").write_text(json.dumps(dict(args=vars(args), rows=rows), indent=2))
    cols = [f"{m}_s{s:g}" for s in args.scales for m in ("accuracy", "fd")]
    print(f"\n{torch.get_num_threads()} threads, {args.teacher_train_steps} train steps, n = {args.n}, "
          f"{args.sampling_steps} DDIM steps\n")  # fmt: skip
    print("| variant | wall s | train images/s | " + " | ".join(cols) + " |")
    print("|---|---:|---:|" + "---:|" * len(cols))
    for r in rows:
        print(f"| {r['variant']} | {r['seconds']:.0f} | {r['images_per_s']:.0f} | "
              + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Sampling cost: CFG teacher (two passes, or one batched pass over 2B) versus the distilled student.

    python -m benchmarks.sampling                         # digits-sized UNet, CPU
    python -m benchmarks.sampling --ckpt runs/digits/teacher.pt --device cuda

Speed does not depend on the weights, so without --ckpt an untrained model of the default size is
timed. Prints network evaluations per image (counted in a warm-up call) and wall time per batch (median
of --repeats runs), with each speed as a ratio to the batched teacher measured in the same run; writes
the rows to OUT/sampling.json.
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch

from benchmarks import harness
from cfg_minimal import (
    ARCHITECTURES,
    DDIMScheduler,
    Pipeline,
    UserError,
    build_model,
    load_checkpoint,
    load_pipeline,
    make_student,
    pick_device,
)
from cfg_minimal.data import dataset_info

RUNS = {  # name: (pipeline, batched)
    "teacher, two passes": ("teacher", False),
    "teacher, batched 2B": ("teacher", True),
    "student, one pass": ("student", True),
}
TABLE = harness.Table([("batch", "batch", "{:d}"), ("sampler", "sampler", "{}"), "evals_per_image",
                       ("seconds", "seconds / batch", "{:.3f}"), ("images_per_s", "images / s", "{:.1f}"),
                       ("speedup", "speed vs batched teacher", "{:.2f}x")])  # fmt: skip


def pipelines(args: argparse.Namespace, device: torch.device) -> dict[str, Pipeline]:
    """The teacher (from --ckpt, or untrained) and a student made from it (untrained: speed is all we need)."""
    if args.ckpt:
        teacher = load_pipeline(args.ckpt, device=device)
        load_checkpoint(args.ckpt, kind="teacher")  # a student is refused: it has no two passes to time
    else:
        if args.arch not in ARCHITECTURES:
            raise UserError(f"--arch {args.arch!r}: unknown architecture; choose from {', '.join(ARCHITECTURES)}")
        info = dataset_info(args.dataset)
        model = build_model(args.arch, in_channels=info.channels, image_size=info.image_size).eval().to(device)
        teacher = Pipeline(model, DDIMScheduler(beta_schedule="squaredcos_cap_v2"), args.dataset, info.image_size,
                           info.channels, info.class_names)  # fmt: skip
    student = Pipeline(make_student(teacher.model).eval(), teacher.scheduler, teacher.dataset, teacher.image_size,
                       teacher.channels, teacher.class_names)  # fmt: skip
    return {"teacher": teacher, "student": student}


def run(args: argparse.Namespace) -> None:
    harness.require_positive(args, "repeats", "batch_sizes")
    device = pick_device(args.device)
    out = harness.Outputs.of(args, "sampling.json")
    pipes = pipelines(args, device)
    teacher = pipes["teacher"]
    params = sum(p.numel() for p in teacher.model.parameters())
    size = f"{teacher.image_size}x{teacher.image_size}"
    print(f"{teacher.model.arch}, {params / 1e6:.2f}M parameters, {size}, {args.sampling_steps} DDIM steps, "
          f"s = {args.scale}, device {device} ({torch.get_num_threads()} threads)")  # fmt: skip
    TABLE.header()
    rows = []
    for batch in args.batch_sizes:
        labels = torch.arange(batch) % teacher.num_classes
        x_T = teacher.initial_noise(batch, 0)  # (batch, C, H, W), from seed 0
        measured = []
        for name, (model, batched) in RUNS.items():
            pipe = pipes[model]
            call = partial(pipe, labels, args.scale, args.sampling_steps, x_T=x_T, batched=batched)
            with harness.EvalCounter(pipe.model) as counter:
                call()  # the warm-up call, counted
            seconds = statistics.median(harness.time_repeated(call, device, args.repeats, warmup=0))
            measured.append(dict(batch=batch, sampler=name, evals_per_image=counter.images / batch, seconds=seconds,
                                 images_per_s=batch / seconds))  # fmt: skip
        base = next(r["seconds"] for r in measured if r["sampler"] == "teacher, batched 2B")
        for row in measured:
            row["speedup"] = base / row["seconds"]
            TABLE.row(row)
        rows += measured
    out.json("sampling.json", harness.record(args, device, arch=teacher.model.arch, parameters=params, rows=rows,
                                             sampling_steps=args.sampling_steps, scale=args.scale))  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = harness.parser("sampling", __doc__, n=None, data=False)
    p.add_argument("--ckpt", help="teacher checkpoint (default: an untrained model of the default size)")
    p.add_argument("--arch", default="unet", help="without --ckpt (default: unet)")
    p.add_argument("--dataset", default="digits", help="its image size, without --ckpt (default: digits)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256], help="default: 1 256")
    p.add_argument("--sampling-steps", type=int, default=50, help="default: 50")
    p.add_argument("--scale", type=float, default=3.0, help="default: 3")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row, after one warm-up (default: 3)")
    return p


main = harness.entry(build_parser, run, __name__)

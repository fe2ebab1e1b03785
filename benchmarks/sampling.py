"""Sampling cost: CFG teacher (two passes, or one batched pass over 2B) versus the distilled student.

    python -m benchmarks.sampling                         # digits-sized UNet, CPU
    python -m benchmarks.sampling --ckpt runs/digits/teacher.pt --device cuda

Speed does not depend on the weights, so without --ckpt an untrained model of the default size is
timed. Prints network evaluations per image and wall time per batch (median of --repeats runs),
with each speed as a ratio to the batched teacher measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from cfg_minimal import DDIMScheduler, Pipeline, build_model, load_pipeline, make_student, pick_device
from cfg_minimal.data import dataset_info


def time_call(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="teacher checkpoint (default: an untrained model of the default size)")
    p.add_argument("--arch", default="unet")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    p.add_argument("--sampling-steps", type=int, default=50)
    p.add_argument("--scale", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = pick_device(args.device)
    if args.ckpt:
        teacher = load_pipeline(args.ckpt, device=device)
    else:
        info = dataset_info(args.dataset)
        model = build_model(args.arch, in_channels=info.channels, image_size=info.image_size).eval().to(device)
        teacher = Pipeline(model, DDIMScheduler(beta_schedule="squaredcos_cap_v2"), args.dataset, info.image_size,
                           info.channels, info.class_names)  # fmt: skip
    student = Pipeline(make_student(teacher.model).eval(), teacher.scheduler, teacher.dataset, teacher.image_size,
                       teacher.channels, teacher.class_names)  # fmt: skip
    params = sum(p.numel() for p in teacher.model.parameters())
    size = f"{teacher.image_size}x{teacher.image_size}"
    print(f"{teacher.model.arch}, {params / 1e6:.2f}M parameters, {size}, {args.sampling_steps} DDIM steps, "
          f"s = {args.scale}, device {device} ({torch.get_num_threads()} threads)\n")  # fmt: skip
    print("| batch | sampler | evals / image | seconds / batch | images / s | speed vs batched teacher |")
    print("|---:|---|---:|---:|---:|---:|")
    for batch in args.batch_sizes:
        labels = torch.arange(batch) % teacher.num_classes
        x_T = teacher.initial_noise(batch, 0)  # (batch, C, H, W), from seed 0
        runs = {  # name: (pipeline, batched, passes per step)
            "teacher, two passes": (teacher, False, 2),
            "teacher, batched 2B": (teacher, True, 2),
            "student, one pass": (student, True, 1),
        }
        seconds = {}
        for name, (pipe, batched, _) in runs.items():
            run = partial(pipe, labels, args.scale, args.sampling_steps, x_T=x_T, batched=batched)
            run()  # warm-up
            seconds[name] = time_call(run, args.repeats, device)
        base = seconds["teacher, batched 2B"]
        for name, (_, _, passes) in runs.items():
            evals = passes * args.sampling_steps
            print(f"| {batch} | {name} | {evals} | {seconds[name]:.3f} | {batch / seconds[name]:.1f} "
                  f"| {base / seconds[name]:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()

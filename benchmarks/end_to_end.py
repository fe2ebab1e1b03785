"""The whole recipe in one command: teacher, guided student, step-distilled students, evaluation, one report.

    python -m benchmarks.end_to_end --dataset mnist --data-dir ../shared/data      # the README's GPU table
    python -m benchmarks.end_to_end --dataset digits --teacher-train-steps 40 ...  # a small setting (tests)

Trains the three stages with the dataset's defaults (recipes.py and the stage configs; flags override)
into --out, then prints and writes OUT/end_to_end.json:
  stages    wall time, train steps x batch, training images/s, model FLOP/s (FLOPs counted per train
            image; on a known card also the share of its bf16 dense peak), peak memory
  quality   accuracy / FD / diversity per model and scale, n samples per point from the same noise,
            averaged over --seeds (the classifier of `python -m cfg_minimal.evaluate`)
  speed     images/s at --speed-batch for the batched CFG teacher and each student (and, on CUDA,
            with bf16 autocast and the CPU-vs-GPU difference of the same samples)
--export DIR writes the models as pretrained folders (config.json + model.safetensors) holding this
command. Numbers on a GPU are absolute; on a CPU compare them as ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from cfg_minimal import (
    DATASETS,
    DistillConfig,
    StepDistillConfig,
    TeacherConfig,
    distill_student,
    halve_sampling_steps,
    load_checkpoint,
    load_pipeline,
    pick_device,
    train_teacher,
    with_optim,
)
from cfg_minimal.distributed import device_name
from cfg_minimal.errors import report as report_error
from cfg_minimal.evaluate import Judge, evals_per_image, generate
from cfg_minimal.pretrained import save_pretrained
from cfg_minimal.recipes import GPU_RECIPES
from cfg_minimal.sampling import Pipeline

BF16_DENSE_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # FLOP/s, NVIDIA's data sheets (SXM)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args, argv)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a user's mistake: one line, exit code 2
        return report_error(err)
    return 0


def run(args: argparse.Namespace, argv: list[str] | None) -> None:
    """Train, evaluate, print and write the report; export the models if asked."""
    device = pick_device(args.device)
    args = fill_defaults(args, device)
    out = Path(args.out or f"runs/end_to_end-{args.dataset}")
    stages, paths = train_all(args, out, device)
    pipes = {name: load_pipeline(path, device=device) for name, path in paths.items()}
    for name in ("teacher", "student"):
        pipes[name].sampling_steps = args.sampling_steps
    judge = Judge.load(args.dataset, args.data_dir, device, progress=False)
    report = dict(
        command=command_line(argv), device=device_name(device), dataset=args.dataset, stages=stages,
        quality=quality(pipes, judge, args), speed=speed(pipes, args, device, judge),
    )  # fmt: skip
    if device.type == "cuda":
        report["cpu_vs_gpu"] = cpu_vs_gpu(paths["teacher"], pipes["teacher"], args)
    (out / "end_to_end.json").write_text(json.dumps(report, indent=2))
    print_report(report)
    if args.export:
        for name, path in paths.items():
            folder = Path(args.export) / f"{args.dataset}-{name.replace(' steps', 'steps').replace(' ', '-')}"
            save_pretrained(load_checkpoint(path), folder, report["command"])
            print(f"exported {folder}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=list(DATASETS))
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--out", default=None, help="run folder (default: runs/end_to_end-DATASET)")
    p.add_argument("--device", default="auto")
    for flag in ("teacher-train-steps", "distill-train-steps", "round-train-steps", "teacher-batch-size",
                 "distill-batch-size", "round-batch-size"):  # fmt: skip
        p.add_argument(
            f"--{flag}", type=int, default=None, help="default: recipes.GPU_RECIPES on CUDA, else the stage's"
        )
    p.add_argument("--channels-last", action="store_true", help="NHWC convolutions in training")
    p.add_argument("--compile", action="store_true", help="torch.compile the network in training")
    p.add_argument("--start-sampling-steps", type=int, default=64, help="what the first round halves")
    p.add_argument("--target-sampling-steps", type=int, default=4, help="halve down to this (8 on the way)")
    p.add_argument("--sampling-steps", type=int, default=64, help="DDIM steps of the teacher and guided student")
    p.add_argument("--scales", type=float, nargs="+", default=[0, 1, 2, 3, 5])
    p.add_argument("--n", type=int, default=1000, help="samples per model, scale and seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--speed-batch", type=int, default=1024)
    p.add_argument("--export", default=None, help="write pretrained folders DIR/DATASET-{teacher,student,...}")
    p.add_argument("--overwrite", action="store_true", help="train again over the checkpoints already in --out")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def fill_defaults(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """Train steps and batch sizes left out: the GPU recipe of the dataset on CUDA (recipes.GPU_RECIPES),
    else each stage's own defaults (None train steps: the per-dataset count, recipes.RECIPES)."""
    gpu = GPU_RECIPES.get(args.dataset, {}) if device.type == "cuda" else {}
    stage = {"teacher": TeacherConfig().optim, "distill": DistillConfig().optim, "round": StepDistillConfig().optim}
    for name, optim in stage.items():
        steps, batch = f"{name}_train_steps", f"{name}_batch_size"
        if getattr(args, steps) is None:
            setattr(args, steps, gpu.get(steps, optim.max_train_steps))
        if getattr(args, batch) is None:
            setattr(args, batch, gpu.get("batch_size", optim.batch_size))
    return args


def command_line(argv: list[str] | None) -> str:
    return shlex.join(["python", "-m", "benchmarks.end_to_end", *(sys.argv[1:] if argv is None else argv)])


def train_all(args: argparse.Namespace, out: Path, device: torch.device) -> tuple[list[dict], dict[str, Path]]:
    """Teacher, guided student and the step-distillation rounds, each timed -> (stage rows, model paths)."""
    speed = dict(channels_last=args.channels_last, compile=args.compile, device=str(device))
    how = dict(progress=not args.no_progress, if_exists="overwrite" if args.overwrite else "error")
    teacher = with_optim(TeacherConfig(dataset=args.dataset, data_dir=args.data_dir), **speed,
                         max_train_steps=args.teacher_train_steps, batch_size=args.teacher_batch_size)  # fmt: skip
    distill = with_optim(DistillConfig(data_dir=args.data_dir), **speed,
                         max_train_steps=args.distill_train_steps, batch_size=args.distill_batch_size)  # fmt: skip
    rounds = with_optim(StepDistillConfig(start_sampling_steps=args.start_sampling_steps,
                                          target_sampling_steps=args.target_sampling_steps, data_dir=args.data_dir),
                        **speed, max_train_steps=args.round_train_steps, batch_size=args.round_batch_size)  # fmt: skip
    # FLOPs per train image: forward + backward of the trained network (3 forwards), plus, when distilling,
    # two forwards of the frozen one (the teacher's two passes, or the previous student's two DDIM steps)
    teacher_row, _ = timed("teacher", device, lambda: train_teacher(teacher, out, **how), 3)
    student_row, _ = timed("student", device,
                           lambda: distill_student(out / "teacher.pt", distill, out, **how), 5)  # fmt: skip
    halve = lambda: halve_sampling_steps(out / "student.pt", rounds, out, **how)  # noqa: E731
    rounds_row, round_paths = timed("step rounds", device, halve, 5)
    stages = [teacher_row, student_row, rounds_row]
    for stage, paths in zip(stages, ([out / "teacher.pt"], [out / "student.pt"], round_paths)):
        stage.update(train_statistics(stage, paths))
    paths = {"teacher": out / "teacher.pt", "student": out / "student.pt"}
    paths.update({f"student {steps_of(p)} steps": p for p in round_paths if steps_of(p) in (8, 4)})
    return stages, paths


def steps_of(path: Path) -> int:
    """student_8steps.pt -> 8."""
    return int(path.stem.removeprefix("student_").removesuffix("steps"))


def timed(name: str, device: torch.device, work: Callable[[], Any], forwards_per_image: int) -> tuple[dict, Any]:
    """Run one stage -> (its wall time and peak memory (GPU: allocated by PyTorch; CPU: the process's RSS),
    what `work` returned)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated() / 1e9, "GPU allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "process RSS"  # KiB on Linux
    row = dict(stage=name, seconds=seconds, forwards_per_image=forwards_per_image, peak_memory_gb=peak,
               peak_memory_kind=kind)  # fmt: skip
    return row, result


def train_statistics(stage: dict, paths: list[Path]) -> dict:
    """Train steps, batch, images/s and model FLOP/s of a stage that wrote the checkpoints `paths`."""
    ckpts = [load_checkpoint(path) for path in paths]
    train_steps = sum(ckpt["max_train_steps"] for ckpt in ckpts)
    batch = ckpts[0]["effective_batch_size"]
    flop = forward_flop(paths[0]) * stage["forwards_per_image"]
    images_per_s = train_steps * batch / stage["seconds"]
    return dict(train_steps=train_steps, batch_size=batch, images_per_s=images_per_s, flop_per_image=flop,
                model_flop_per_s=flop * images_per_s)  # fmt: skip


def forward_flop(path: Path) -> float:
    """FLOPs of one forward of the checkpoint's network for one image (counted by PyTorch, on the CPU)."""
    pipe = load_pipeline(path, device="cpu")
    x = pipe.initial_noise(2, 0)  # (2, C, H, W)
    t, y = torch.tensor([10, 500]), torch.tensor([0, 1])
    s = torch.full((2,), 3.0) if pipe.is_student else None
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        pipe.model(x, t, y, guidance=s)
    return counter.get_total_flops() / 2


def quality(pipes: dict[str, Pipeline], judge: Judge, args: argparse.Namespace) -> list[dict]:
    """Accuracy / FD / diversity per model and scale, the mean over seeds (each seed: the same noise for all)."""
    rows = []
    for name, pipe in pipes.items():
        for s in args.scales:
            scores = [judge(*generate(pipe, args.n, s, pipe.sampling_steps, seed)[:2]) for seed in args.seeds]
            mean = {key: sum(sc[key] for sc in scores) / len(scores) for key in scores[0]}
            rows.append(dict(model=name, scale=s, sampling_steps=pipe.sampling_steps, n=args.n, seeds=args.seeds,
                             evals_per_image=evals_per_image(pipe, s, pipe.sampling_steps), **mean,
                             fd_per_seed=[sc["fd"] for sc in scores]))  # fmt: skip
            if not args.no_progress:
                print(f"  {name:>16} s={s:<4g} accuracy {mean['accuracy']:.4f}  FD {mean['fd']:.3f}", flush=True)
    return rows


def speed(pipes: dict[str, Pipeline], args: argparse.Namespace, device: torch.device, judge: Judge) -> list[dict]:
    """Images/s of each model at s = 3, --speed-batch labels at once, from the same noise (best of 3 calls).
    On CUDA also with bf16 autocast, with that run's accuracy and FD and its largest pixel difference."""
    labels = torch.arange(args.speed_batch) % pipes["teacher"].num_classes  # (B,)
    x_T = pipes["teacher"].initial_noise(args.speed_batch, 0)  # (B, C, H, W)
    rows, reference = [], None
    for name, pipe in pipes.items():
        for bf16 in (False, True) if device.type == "cuda" else (False,):
            context = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
            best, images = float("inf"), None
            for _ in range(3):
                with context:
                    start = time.perf_counter()
                    images = pipe(labels, 3.0, pipe.sampling_steps, x_T=x_T)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    best = min(best, time.perf_counter() - start)
            row = dict(model=name, autocast="bf16" if bf16 else "off", sampling_steps=pipe.sampling_steps,
                       batch=args.speed_batch, evals_per_image=evals_per_image(pipe, 3.0, pipe.sampling_steps),
                       images_per_s=args.speed_batch / best)  # fmt: skip
            if bf16:
                row.update(
                    judge(images.float().cpu(), labels), max_abs_diff_vs_fp32=float((images - reference).abs().max())
                )
            reference = images
            rows.append(row)
    teacher = next(r["images_per_s"] for r in rows if r["model"] == "teacher" and r["autocast"] == "off")
    for row in rows:
        row["speedup_vs_teacher"] = row["images_per_s"] / teacher
    return rows


def cpu_vs_gpu(path: Path, gpu: Pipeline, args: argparse.Namespace, n: int = 64) -> dict:
    """The same n samples (seed 0, s = 3) from the teacher on the CPU and on the GPU: the largest and the mean
    absolute pixel difference (images in [-1, 1])."""
    cpu = load_pipeline(path, device="cpu")
    labels = torch.arange(n) % cpu.num_classes
    a = cpu(labels, 3.0, args.sampling_steps, x_T=cpu.initial_noise(n, 0))
    b = gpu(labels, 3.0, args.sampling_steps, x_T=gpu.initial_noise(n, 0)).cpu()
    return dict(n=n, scale=3.0, sampling_steps=args.sampling_steps, max_abs_diff=float((a - b).abs().max()),
                mean_abs_diff=float((a - b).abs().mean()))  # fmt: skip


def print_report(report: dict) -> None:
    peak = next((v for k, v in BF16_DENSE_PEAK.items() if k in report["device"]), None)
    print(f"\n{report['command']}\non {report['device']}\n")
    print("| stage | wall s | train steps x batch | train images/s | model TFLOP/s | of bf16 peak | peak memory GB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for s in report["stages"]:
        share = f"{s['model_flop_per_s'] / peak:.1%}" if peak else "-"
        print(f"| {s['stage']} | {s['seconds']:.1f} | {s['train_steps']} x {s['batch_size']} | {s['images_per_s']:.0f} "
              f"| {s['model_flop_per_s'] / 1e12:.2f} | {share} | {s['peak_memory_gb']:.2f} "
              f"({s['peak_memory_kind']}) |")  # fmt: skip
    total = sum(s["seconds"] for s in report["stages"])
    print(f"\ntraining in all: {total:.0f} s\n")
    print("| model | sampling steps | s | evals / image | accuracy | FD | diversity |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in report["quality"]:
        print(f"| {r['model']} | {r['sampling_steps']} | {r['scale']:g} | {r['evals_per_image']} | {r['accuracy']:.4f} "
              f"| {r['fd']:.3f} | {r['diversity']:.3f} |")  # fmt: skip
    print("\n| model | autocast | sampling steps | images/s at s = 3 | speed-up vs CFG teacher |")
    print("|---|---|---:|---:|---:|")
    for r in report["speed"]:
        print(f"| {r['model']} | {r['autocast']} | {r['sampling_steps']} | {r['images_per_s']:.0f} "
              f"| {r['speedup_vs_teacher']:.2f}x |")  # fmt: skip
    if "cpu_vs_gpu" in report:
        c = report["cpu_vs_gpu"]
        print(f"\nCPU vs GPU, same {c['n']} samples: largest pixel difference {c['max_abs_diff']:.2e}, "
              f"mean {c['mean_abs_diff']:.2e}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())

"""The whole recipe in one command: teacher, guided student, step-distilled students, evaluation, one report.

    python -m benchmarks.end_to_end --dataset mnist --data-dir ../shared/data      # the README's GPU table
    python -m benchmarks.end_to_end --dataset digits --teacher-train-steps 40 ...  # a small setting (tests)

Trains the three stages with the dataset's defaults (recipes.py and the stage configs; flags override)
into --out, then prints and writes OUT/end_to_end.json:
  stages    wall time, train steps x batch, training images/s, model FLOP/s (FLOPs counted per train
            image; on a known card also the share of its bf16 dense peak), peak memory
  quality   accuracy / FD / diversity per model and scale, n samples per point from the same noise,
            averaged over --seed (the classifier of `python -m cfg_minimal.evaluate`); network
            evaluations per image counted
  speed     images/s at --speed-batch for the batched CFG teacher and each student (and, on CUDA,
            with bf16 autocast and the CPU-vs-GPU difference of the same samples)
--export DIR writes the models as pretrained folders (config.json + model.safetensors) holding this
command. Checkpoints, the report and exported folders that exist already are refused unless --overwrite.
Numbers on a GPU are absolute; on a CPU compare them as ratios within one run.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import harness
from cfg_minimal import (
    ARCHITECTURES,
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
from cfg_minimal.checkpoint import output_lock
from cfg_minimal.errors import UserError
from cfg_minimal.evaluate import Judge, check_classifier_cache
from cfg_minimal.loop import COMPILE_MODES
from cfg_minimal.pretrained import CONFIG, WEIGHTS, save_pretrained
from cfg_minimal.recipes import GPU_RECIPES, LR_SCALINGS, scaled_lr
from cfg_minimal.sampling import Pipeline
from cfg_minimal.step_distill import round_sizes

BF16_DENSE_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # FLOP/s, NVIDIA's data sheets (SXM)
EXPORTED_STEPS = (8, 4)  # the step-distilled students that are evaluated and exported


def run(args: argparse.Namespace) -> None:
    """Train, evaluate, print and write the report; export the models if asked. Every output (the report, the
    checkpoints, the export folders) and every flag is checked before the first train step."""
    device = pick_device(args.device)
    args = fill_defaults(args, device)
    check_args(args)
    checkpoints = ["teacher.pt", "student.pt", *(f"student_{k}steps.pt" for k in round_list(args))]
    out = harness.Outputs.of(args, "end_to_end.json", *checkpoints)
    export = claim_exports(args) if args.export else None
    check_classifier_cache(args.dataset)
    with output_lock(out.folder):  # a second run into the same folder is refused, not interleaved
        stages, paths = train_all(args, out.folder, device)
        report = evaluate_all(args, device, stages, paths)
        out.json("end_to_end.json", report)
    if export is not None:
        for name, path in paths.items():
            folder = export.folder / export_folder(args, name)
            save_pretrained(load_checkpoint(path), folder, report["command"], overwrite=args.overwrite)
            print(f"exported {folder}")


def check_args(args: argparse.Namespace) -> None:
    """The flags that would otherwise fail after minutes of training (--n, --speed-batch, the rounds)."""
    classes = DATASETS[args.dataset].num_classes
    if args.n < 2 * classes:  # diversity needs two samples of every class
        raise UserError(f"--n must be at least two samples per class ({2 * classes}), got {args.n}")
    names = ["speed_batch", "teacher_batch_size", "distill_batch_size", "round_batch_size", "round_train_steps"]
    names += [name for name in ("teacher_train_steps", "distill_train_steps") if getattr(args, name) is not None]
    harness.require_positive(args, *names)
    start, target = rounds_of(args)
    if start > TeacherConfig.num_train_timesteps:
        raise UserError(f"--start-sampling-steps must be at most {TeacherConfig.num_train_timesteps}, got {start}")
    round_sizes(start, target)  # a target that halving does not reach is a UserError
    for name in ("teacher_lr", "distill_lr", "round_lr"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            raise UserError(f"--{name.replace('_', '-')} must be a positive number, got {getattr(args, name)}")


def claim_exports(args: argparse.Namespace) -> harness.Outputs:
    """The export folders DIR/DATASET-MODEL: refused now if one exists (unless --overwrite, and then only a
    folder holding nothing but an exported model), not after the training."""
    export = harness.Outputs(args.export, args.overwrite, "--export")
    for path in export.claim(*(export_folder(args, model) for model in model_names(args))):
        if path.exists() and not path.is_dir():
            raise UserError(f"{path} is a file, not an export folder; choose another --export")
        others = sorted(p.name for p in path.iterdir() if p.name not in (CONFIG, WEIGHTS)) if path.is_dir() else []
        if others:
            raise UserError(f"{path} holds other files than an exported model ({', '.join(others[:3])}); "
                            "choose another --export")  # fmt: skip
    return export


def rounds_of(args: argparse.Namespace) -> tuple[int, int]:
    return args.start_sampling_steps, args.target_sampling_steps


def round_list(args: argparse.Namespace) -> list[int]:
    """The sampling steps of each step-distillation round's student; none with --no-step-rounds."""
    return [] if args.no_step_rounds else round_sizes(*rounds_of(args))


def evaluate_all(args: argparse.Namespace, device: torch.device, stages: list[dict], paths: dict[str, Path]) -> dict:
    """Quality and speed of every model trained -> the report (printed as it comes, then as tables)."""
    pipes = {name: load_pipeline(path, device=device) for name, path in paths.items()}
    for name in ("teacher", "student"):
        pipes[name].sampling_steps = args.sampling_steps
    judge = harness.load_judge(args.dataset, args.data_dir, device)
    progress = None if args.no_progress else harness.Table(harness.QUALITY, "quality, as measured")
    report = harness.record(
        args, device, dataset=args.dataset, stages=stages,
        quality=harness.measure(harness.grid(pipes, args.scales), judge, args.n, args.seed, table=progress),
        speed=speed(pipes, args, device, judge),
    )  # fmt: skip
    if device.type == "cuda" and not args.no_cpu_check:
        report["cpu_vs_gpu"] = cpu_vs_gpu(paths["teacher"], pipes["teacher"], args)
    print_report(report)
    return report


def model_names(args: argparse.Namespace) -> list[str]:
    """The models evaluated: teacher, student, and the step-distilled students of EXPORTED_STEPS the rounds reach."""
    return ["teacher", "student", *(f"student {k} steps" for k in round_list(args) if k in EXPORTED_STEPS)]


def export_folder(args: argparse.Namespace, model: str) -> str:
    """'student 8 steps' -> 'DATASET-student-8steps' (or --export-name instead of DATASET)."""
    return f"{args.export_name or args.dataset}-{model.replace(' steps', 'steps').replace(' ', '-')}"


def build_parser() -> argparse.ArgumentParser:
    p = harness.parser("end_to_end", __doc__, n=1000, seed=[0, 1, 2])
    p.add_argument("--dataset", default="mnist", choices=list(DATASETS), help="default: mnist")
    for flag in ("teacher-train-steps", "distill-train-steps", "round-train-steps", "teacher-batch-size",
                 "distill-batch-size", "round-batch-size"):  # fmt: skip
        p.add_argument(
            f"--{flag}", type=int, default=None, help="default: recipes.GPU_RECIPES on CUDA, else the stage's"
        )
    p.add_argument("--arch", default=None, choices=list(ARCHITECTURES), help="default: the dataset's (recipes.py)")
    for stage in ("teacher", "distill", "round"):
        p.add_argument(f"--{stage}-lr", type=float, default=None,
                       help="default: the stage's, scaled by --lr-scaling for its batch size")  # fmt: skip
    p.add_argument("--lr-scaling", default="none", choices=LR_SCALINGS,
                   help="a learning rate left out, scaled from its stage's default batch to the batch used: sqrt "
                   "(Adam's usual rule) or linear (default: none, the stage's lr as it is)")  # fmt: skip
    p.add_argument("--channels-last", action="store_true", help="NHWC convolutions in training")
    p.add_argument("--compile", action="store_true", help="torch.compile the network in training")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile's mode (implies --compile); reduce-overhead replays CUDA graphs, CUDA only "
                   "(elsewhere 'default')")  # fmt: skip
    p.add_argument("--fused", action="store_true", help="fused AdamW in training (CUDA only)")
    p.add_argument("--no-step-rounds", action="store_true", help="train and evaluate no step-distilled student")
    p.add_argument("--no-cpu-check", action="store_true", help="on CUDA, skip sampling the teacher on the CPU too")
    p.add_argument("--start-sampling-steps", type=int, default=64, help="what the first round halves (default: 64)")
    p.add_argument("--target-sampling-steps", type=int, default=4, help="halve down to this (default: 4; 8 on the way)")
    p.add_argument("--sampling-steps", type=int, default=64,
                   help="DDIM steps of the teacher and guided student (default: 64)")  # fmt: skip
    p.add_argument("--scales", type=float, nargs="+", default=[0, 1, 2, 3, 5], help="default: 0 1 2 3 5")
    p.add_argument("--speed-batch", type=int, default=1024, help="default: 1024")
    p.add_argument("--export", default=None, help="write pretrained folders DIR/DATASET-{teacher,student,...}")
    p.add_argument("--export-name", default=None, help="the folders' prefix instead of DATASET (e.g. mnist-dit)")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return fill_switches(build_parser().parse_args(argv))


def fill_switches(args: argparse.Namespace) -> argparse.Namespace:
    args.compile = args.compile or args.compile_mode != "default"  # a compile mode asks for compiling
    return args


def fill_defaults(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """Train steps and batch sizes left out: the GPU recipe of the dataset on CUDA (recipes.GPU_RECIPES),
    else each stage's own defaults (None train steps: the data set's count, recipes.recipe). A learning rate
    left out: the stage's, scaled from the stage's default batch size by --lr-scaling (recipes.scaled_lr)."""
    fill_switches(args)
    gpu = GPU_RECIPES.get(args.dataset, {}) if device.type == "cuda" else {}
    stage = {"teacher": TeacherConfig().optim, "distill": DistillConfig().optim, "round": StepDistillConfig().optim}
    for name, optim in stage.items():
        steps, batch = f"{name}_train_steps", f"{name}_batch_size"
        if getattr(args, steps) is None:
            setattr(args, steps, gpu.get(steps, optim.max_train_steps))
        if getattr(args, batch) is None:
            setattr(args, batch, gpu.get("batch_size", optim.batch_size))
        if getattr(args, f"{name}_lr") is None:
            lr = scaled_lr(optim.lr, getattr(args, batch), optim.batch_size, args.lr_scaling)
            setattr(args, f"{name}_lr", lr)
    return args


def train_all(args: argparse.Namespace, out: Path, device: torch.device) -> tuple[list[dict], dict[str, Path]]:
    """Teacher, guided student and the step-distillation rounds, each timed -> (stage rows, model paths)."""
    speed = dict(channels_last=args.channels_last, compile=args.compile, compile_mode=args.compile_mode,
                 fused=args.fused, device=str(device))  # fmt: skip
    how = dict(progress=not args.no_progress, if_exists="overwrite" if args.overwrite else "error")
    teacher = with_optim(TeacherConfig(dataset=args.dataset, data_dir=args.data_dir, arch=args.arch), **speed,
                         max_train_steps=args.teacher_train_steps, batch_size=args.teacher_batch_size,
                         lr=args.teacher_lr)  # fmt: skip
    distill = with_optim(DistillConfig(data_dir=args.data_dir), **speed, lr=args.distill_lr,
                         max_train_steps=args.distill_train_steps, batch_size=args.distill_batch_size)  # fmt: skip
    rounds = with_optim(StepDistillConfig(start_sampling_steps=args.start_sampling_steps,
                                          target_sampling_steps=args.target_sampling_steps, data_dir=args.data_dir),
                        **speed, max_train_steps=args.round_train_steps, batch_size=args.round_batch_size,
                        lr=args.round_lr)  # fmt: skip
    # FLOPs per train image: forward + backward of the trained network (3 forwards), plus, when distilling,
    # two forwards of the frozen one (the teacher's two passes, or the previous student's two DDIM steps)
    teacher_row, _ = timed("teacher", device, lambda: train_teacher(teacher, out, **how), 3)
    student_row, _ = timed("student", device,
                           lambda: distill_student(out / "teacher.pt", distill, out, **how), 5)  # fmt: skip
    stages, round_paths = [teacher_row, student_row], []
    if not args.no_step_rounds:
        halve = lambda: halve_sampling_steps(out / "student.pt", rounds, out, **how)  # noqa: E731
        rounds_row, round_paths = timed("step rounds", device, halve, 5)
        stages.append(rounds_row)
    for stage, paths in zip(stages, ([out / "teacher.pt"], [out / "student.pt"], round_paths)):
        stage.update(train_statistics(stage, paths))
    paths = {"teacher": out / "teacher.pt", "student": out / "student.pt"}
    paths.update({f"student {steps_of(p)} steps": p for p in round_paths if steps_of(p) in EXPORTED_STEPS})
    return stages, paths


def steps_of(path: Path) -> int:
    """student_8steps.pt -> 8."""
    return int(path.stem.removeprefix("student_").removesuffix("steps"))


def timed(name: str, device: torch.device, work: Callable[[], Any], forwards_per_image: int) -> tuple[dict, Any]:
    """Run one stage -> (its wall time and peak memory, what `work` returned)."""
    with harness.Timer(device, memory=True) as timer:
        result = work()
    row = dict(stage=name, seconds=timer.seconds, forwards_per_image=forwards_per_image,
               peak_memory_gb=timer.peak_memory_gb, peak_memory_kind=timer.peak_memory_kind)  # fmt: skip
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


def speed(pipes: dict[str, Pipeline], args: argparse.Namespace, device: torch.device, judge: Judge) -> list[dict]:
    """Images/s of each model at s = 3, --speed-batch labels at once, from the same noise (best of 3 calls,
    after one untimed call that also counts the network evaluations). On CUDA also with bf16 autocast, with
    that run's accuracy and FD and its largest pixel difference."""
    labels = torch.arange(args.speed_batch) % pipes["teacher"].num_classes  # (B,)
    x_T = pipes["teacher"].initial_noise(args.speed_batch, 0)  # (B, C, H, W)
    rows, reference = [], None
    for name, pipe in pipes.items():
        for bf16 in (False, True) if device.type == "cuda" else (False,):
            context = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
            with context:
                with harness.EvalCounter(pipe.model) as counter:
                    images = pipe(labels, 3.0, pipe.sampling_steps, x_T=x_T)
                call = partial(pipe, labels, 3.0, pipe.sampling_steps, x_T=x_T)
                best = min(harness.time_repeated(call, device, repeats=3, warmup=0))
            row = dict(model=name, autocast="bf16" if bf16 else "off", sampling_steps=pipe.sampling_steps,
                       batch=args.speed_batch, evals_per_image=counter.images / args.speed_batch,
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


STAGES = harness.Table([("stage", "stage", "{}"), ("seconds", "wall s", "{:.1f}"),
                        ("train_steps_x_batch", "train steps x batch", "{}"),
                        ("images_per_s", "train images/s", "{:.0f}"), ("model_tflop_per_s", "model TFLOP/s", "{:.2f}"),
                        ("of_peak", "of bf16 peak", "{:.1%}"), ("peak_memory_gb", "peak memory GB", "{:.2f}"),
                        ("peak_memory_kind", "measured as", "{}")])  # fmt: skip
QUALITY = harness.Table(["model", "sampling_steps", "scale", "evals_per_image", ("accuracy", "accuracy", "{:.4f}"),
                         ("fd", "FD", "{:.3f}"), ("diversity", "diversity", "{:.3f}")])  # fmt: skip
SPEED = harness.Table(["model", ("autocast", "autocast", "{}"), "sampling_steps", "evals_per_image",
                       ("images_per_s", "images/s at s = 3", "{:.0f}"),
                       ("speedup_vs_teacher", "speed-up vs CFG teacher", "{:.2f}x")])  # fmt: skip


def print_report(report: dict) -> None:
    peak = next((v for k, v in BF16_DENSE_PEAK.items() if k in report["device"]), None)
    print(f"\n{report['command']}\non {report['device']}\n")
    STAGES.print(dict(s, train_steps_x_batch=f"{s['train_steps']} x {s['batch_size']}",
                      model_tflop_per_s=s["model_flop_per_s"] / 1e12,
                      of_peak=s["model_flop_per_s"] / peak if peak else None) for s in report["stages"])  # fmt: skip
    print(f"\ntraining in all: {sum(s['seconds'] for s in report['stages']):.0f} s\n")
    QUALITY.print(report["quality"])
    print()
    SPEED.print(report["speed"])
    if "cpu_vs_gpu" in report:
        c = report["cpu_vs_gpu"]
        print(f"\nCPU vs GPU, same {c['n']} samples: largest pixel difference {c['max_abs_diff']:.2e}, "
              f"mean {c['mean_abs_diff']:.2e}")  # fmt: skip


main = harness.entry(build_parser, run, __name__)

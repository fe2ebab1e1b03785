"""Train a CFG teacher, distil a guidance-conditioned student, and draw the figures.

python train_mnist.py --dataset digits --out runs/digits            # teacher, student, figures
python train_mnist.py --stage distill --teacher runs/digits/teacher.pt --out runs/digits
python train_mnist.py --dataset mnist --data-dir ../shared/data --out runs/mnist
torchrun --nproc_per_node=4 train_mnist.py --dataset cifar10 --out runs/cifar10   # 4 GPUs, DDP

Under torchrun every process trains on its own shard of each batch (--batch-size is per process,
so the effective batch is batch size x processes) and only rank 0 writes checkpoints, figures and logs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from cfg_minimal import (
    ARCHITECTURES,
    DATASETS,
    TrainConfig,
    UserError,
    distributed,
    load_checkpoint,
    load_pipeline,
    train_teacher,
)
from cfg_minimal.distill import DistillConfig, distill_student
from cfg_minimal.evaluate import sweep, write_sweep
from cfg_minimal.plotting import sample_scale_grid, save_loss_curve, save_scale_grid
from cfg_minimal.schedulers import BETA_SCHEDULES
from cfg_minimal.step_distill import StepDistillConfig, distill_steps

GRID_SCALES = (0.0, 1.0, 3.0, 5.0)
TEACHER_STEPS = 64  # the reference the step students are measured against
REPORT_SCALES = (0.0, 1.0, 2.0, 3.0, 5.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", choices=list(DATASETS), help="digits needs no network")
    p.add_argument("--data-dir", default="./data", help="where torchvision datasets are (or get downloaded)")
    p.add_argument("--arch", choices=list(ARCHITECTURES), help="default: unet, and unet-cifar for cifar10")
    p.add_argument("--out", default="runs/digits", help="output folder for checkpoints and figures")
    p.add_argument("--stage", default="all", choices=["teacher", "distill", "steps", "all"],
                   help="all = teacher, then distill; steps = halve a student's sampling steps")  # fmt: skip
    p.add_argument("--teacher", help="teacher for --stage distill; the reference for --stage steps (OUT/teacher.pt)")
    p.add_argument("--student", help="guided student for --stage steps (default: OUT/student.pt)")
    p.add_argument("--target-steps", type=int, default=StepDistillConfig.target_steps, help="steps at the end")
    p.add_argument("--start-steps", type=int, help="steps the first round halves (default: the student's, else 64)")
    p.add_argument("--round-steps", type=int, default=StepDistillConfig.round_steps, help="training steps per round")
    p.add_argument("--steps-lr", type=float, default=StepDistillConfig.lr, help="step distillation learning rate")
    p.add_argument("--resume", action="store_true", help="continue interrupted runs from OUT's checkpoints")
    p.add_argument("--teacher-steps", type=int, help="training steps (default: per dataset, see RECIPES)")
    p.add_argument("--distill-steps", type=int, help="distillation steps (default: per dataset)")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="per process under torchrun")
    p.add_argument("--distill-batch-size", type=int, default=DistillConfig.batch_size, help="per process")
    p.add_argument("--lr", type=float, default=TrainConfig.lr, help="teacher learning rate")
    p.add_argument("--distill-lr", type=float, default=DistillConfig.lr)
    p.add_argument("--p-uncond", type=float, default=TrainConfig.p_uncond, help="label dropout probability")
    p.add_argument("--beta-schedule", default=TrainConfig.beta_schedule, choices=BETA_SCHEDULES)
    p.add_argument("--s-min", type=float, default=DistillConfig.s_min, help="student's guidance range, low end")
    p.add_argument("--s-max", type=float, default=DistillConfig.s_max, help="student's guidance range, high end")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for the figures")
    p.add_argument("--eval-n", type=int, default=100, help="samples per scale for the closing teacher/student sweep")
    p.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    for name in (
        "teacher_steps",
        "distill_steps",
        "batch_size",
        "distill_batch_size",
        "sample_steps",
        "checkpoint_every",
        "eval_n",
        "target_steps",
        "start_steps",
        "round_steps",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if not 0 <= args.p_uncond < 1:
        p.error(f"--p-uncond must be in [0, 1), got {args.p_uncond}")
    return args


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write_test").touch()
        (out / ".write_test").unlink()
    except OSError as err:
        raise UserError(f"cannot write to --out {str(out)!r} ({err.strerror}); choose another folder") from None


def teacher_figures(out: Path, args: argparse.Namespace) -> torch.Tensor:
    """Write samples_teacher.png; return its grid (R, S, 1, C, H, W) for the comparison figure."""
    pipe = load_pipeline(out / "teacher.pt", device=_device(args))
    grid = sample_scale_grid(pipe, GRID_SCALES, num_steps=args.sample_steps, seed=args.seed)
    save_scale_grid(grid, GRID_SCALES, pipe.class_names, out / "samples_teacher.png",
                    title=f"CFG teacher on {pipe.dataset}: rows = classes, same noise along a row")  # fmt: skip
    print(f"wrote {out / 'samples_teacher.png'}")
    return grid


def student_figures(teacher_path: Path, out: Path, args: argparse.Namespace, grid_t: torch.Tensor | None) -> None:
    device = _device(args)
    teacher, student = load_pipeline(teacher_path, device=device), load_pipeline(out / "student.pt", device=device)
    grid_s = sample_scale_grid(student, GRID_SCALES, num_steps=args.sample_steps, seed=args.seed)
    save_scale_grid(grid_s, GRID_SCALES, student.class_names, out / "samples_student.png",
                    title=f"distilled student on {student.dataset}: one pass per step")  # fmt: skip
    if grid_t is None:  # --stage distill: the teacher's grid was not drawn in this run
        grid_t = sample_scale_grid(teacher, GRID_SCALES, num_steps=args.sample_steps, seed=args.seed)
    pairs = torch.stack([grid_t[:, :, 0], grid_s[:, :, 0]], dim=2)  # (R, S, 2, C, H, W)
    save_scale_grid(pairs, GRID_SCALES, student.class_names, out / "samples_compare.png",
                    title="teacher (left) and student (right) per scale, same noise")  # fmt: skip
    metrics, images = sweep({"teacher": teacher, "student": student}, REPORT_SCALES, n=args.eval_n,
                            num_steps=args.sample_steps, seed=args.seed, data_dir=args.data_dir,
                            progress=not args.no_progress)  # fmt: skip
    write_sweep(metrics, images, teacher, out)
    print(f"wrote {out / 'samples_student.png'} and {out / 'samples_compare.png'}")
    print("  s     rel. L2(student, teacher)   accuracy teacher / student")
    for row in metrics["student_vs_teacher"]:
        print(f"  {row['scale']:<5g} {row['rel_l2']:>10.3f}{'':12}{row['acc_teacher']:.3f} / {row['acc_student']:.3f}")


def steps_figures(teacher_path: Path, paths: list[Path], out: Path, args: argparse.Namespace) -> None:
    """The step students against the teacher at TEACHER_STEPS steps: grids, a sweep and the speed-up."""
    device = _device(args)
    students = [load_pipeline(path, device=device) for path in paths]
    pipes = {f"student {pipe.default_steps} steps": pipe for pipe in students}
    for name, pipe in pipes.items():
        grid = sample_scale_grid(pipe, GRID_SCALES, seed=args.seed, num_steps=pipe.default_steps)
        path = out / f"samples_{name.replace(' ', '_')}.png"
        save_scale_grid(grid, GRID_SCALES, pipe.class_names, path, title=f"{name} on {pipe.dataset}, one pass each")
    if teacher_path.exists():
        teacher = load_pipeline(teacher_path, device=device)
        teacher.default_steps = TEACHER_STEPS
        pipes = {f"teacher {TEACHER_STEPS} steps": teacher, **pipes}
    metrics, images = sweep(pipes, REPORT_SCALES, n=args.eval_n, num_steps=None, seed=args.seed,
                            data_dir=args.data_dir, progress=not args.no_progress)  # fmt: skip
    (out / "steps").mkdir(exist_ok=True)
    write_sweep(metrics, images, next(iter(pipes.values())), out / "steps")
    reference = next(iter(metrics["models"].values()))["per_scale"]
    print(f"  {'model':<20} {'s':>4} {'accuracy':>8} {'FD':>7} {'speed-up':>8}")
    for name, model in metrics["models"].items():
        for row, ref in zip(model["per_scale"], reference):
            speedup = ref["seconds_per_image"] / row["seconds_per_image"]
            print(f"  {name:<20} {row['scale']:>4g} {row['accuracy']:>8.3f} {row['fd']:>7.2f} {speedup:>7.1f}x")


def _device(args: argparse.Namespace) -> str:
    from cfg_minimal.train import pick_device

    return str(pick_device(args.device))


def run(args: argparse.Namespace) -> None:
    """Teacher, then student; under torchrun all ranks train and rank 0 alone draws and writes figures."""
    out = Path(args.out)
    rank0 = distributed.is_main()
    if rank0:
        check_writable(out)
    curves = {}
    teacher_path = Path(args.teacher) if args.teacher else out / "teacher.pt"
    grid_t = None
    if args.stage in ("teacher", "all"):
        cfg = TrainConfig(dataset=args.dataset, data_dir=args.data_dir, arch=args.arch, steps=args.teacher_steps,
                          batch_size=args.batch_size, lr=args.lr, p_uncond=args.p_uncond,
                          beta_schedule=args.beta_schedule, seed=args.seed, device=args.device,
                          checkpoint_every=args.checkpoint_every)  # fmt: skip
        curves["teacher"] = train_teacher(cfg, out, resume=args.resume, progress=not args.no_progress).losses
        teacher_path = out / "teacher.pt"
        grid_t = teacher_figures(out, args) if rank0 else None
        distributed.barrier()  # the others wait for rank 0's figures before distilling together
    if args.stage in ("distill", "all"):
        cfg = DistillConfig(steps=args.distill_steps, batch_size=args.distill_batch_size, lr=args.distill_lr,
                            s_min=args.s_min, s_max=args.s_max, seed=args.seed, device=args.device,
                            checkpoint_every=args.checkpoint_every, data_dir=args.data_dir)  # fmt: skip
        curves["student"] = distill_student(teacher_path, cfg, out, resume=args.resume,
                                            progress=not args.no_progress).losses  # fmt: skip
        if rank0:
            student_figures(teacher_path, out, args, grid_t)
    if args.stage == "steps":
        cfg = StepDistillConfig(start_steps=args.start_steps, target_steps=args.target_steps,
                                round_steps=args.round_steps, batch_size=args.distill_batch_size, lr=args.steps_lr,
                                seed=args.seed, device=args.device, checkpoint_every=args.checkpoint_every,
                                data_dir=args.data_dir)  # fmt: skip
        paths = distill_steps(Path(args.student) if args.student else out / "student.pt", cfg, out,
                              resume=args.resume, progress=not args.no_progress)  # fmt: skip
        curves = {path.stem: load_checkpoint(path)["losses"] for path in paths}
        if rank0:
            steps_figures(teacher_path, paths, out, args)
    if rank0:
        save_loss_curve(curves, out / ("loss_steps.png" if args.stage == "steps" else "loss.png"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        distributed.init(args.device)  # joins torchrun's processes; nothing for a single process
        run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train a CFG teacher, distil a guidance-conditioned student, halve its sampling steps; draw the figures.

python train_mnist.py --dataset digits --out runs/digits            # teacher, student, figures
python train_mnist.py --stage distill --teacher runs/digits/teacher.pt --out runs/digits
python train_mnist.py --stage step-distill --target-sampling-steps 8 --out runs/digits
python train_mnist.py --dataset mnist --data-dir ../shared/data --out runs/mnist
python train_mnist.py --objective gft --out runs/digits-gft      # guidance trained in: one model, one pass per step
python train_mnist.py --objective mg --out runs/digits-mg        # (gft, mg: guidance_free.py; no student to distil)
torchrun --nproc_per_node=4 train_mnist.py --dataset cifar10 --out runs/cifar10   # 4 GPUs, DDP

"Train steps" count optimizer updates; "sampling steps" count denoising steps of the sampler.
Under torchrun every process trains on its own shard of each batch (batch sizes are per process, so
the effective batch is batch size x processes) and only rank 0 writes checkpoints, figures and logs.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

from cfg_minimal import (
    ARCHITECTURES,
    DATASETS,
    DistillConfig,
    StepDistillConfig,
    TeacherConfig,
    distill_student,
    distributed,
    halve_sampling_steps,
    load_checkpoint,
    load_pipeline,
    pick_device,
    sample_scale_grid,
    train_teacher,
    with_optim,
)
from cfg_minimal.budget import train_steps_in
from cfg_minimal.checkpoint import output_lock, weights_fingerprint, writable_folder
from cfg_minimal.distill import check_guidance_range, target_guider
from cfg_minimal.errors import UserError, report
from cfg_minimal.evaluate import check_classifier_cache, sweep, write_sweep
from cfg_minimal.flow import TIMESTEP_SAMPLINGS
from cfg_minimal.guidance_free import OBJECTIVES, check_objective
from cfg_minimal.guiders import SCHEDULES
from cfg_minimal.loop import COMPILE_MODES
from cfg_minimal.plotting import save_loss_curve, save_scale_grid
from cfg_minimal.predictions import PREDICTION_TYPES
from cfg_minimal.recipes import teacher_config
from cfg_minimal.resume import MAX_SEED, SPEED_SWITCHES, flat_config
from cfg_minimal.sampling import DEFAULT_SAMPLING_STEPS
from cfg_minimal.schedulers import BETA_SCHEDULES

GRID_SCALES = (0.0, 1.0, 3.0, 5.0)
REPORT_SCALES = (0.0, 1.0, 2.0, 3.0, 5.0)
REFERENCE_SAMPLING_STEPS = 64  # the teacher's sampling steps that the step-distilled students are measured against

# Every flag that sets a config field, and the fields it sets: its default is theirs, read from the
# dataclasses, so each default lives in one place. ALL: the field in each of the three stage configs.
STAGES = {"teacher": TeacherConfig, "distill": DistillConfig, "step_distill": StepDistillConfig}
ALL = tuple(STAGES)
PER_DATASET = "default: per dataset (recipes.py)"
CONFIG_FLAGS: list[tuple[str, tuple[str, ...], dict[str, Any]]] = [
    ("--dataset", ("teacher.dataset",), dict(choices=list(DATASETS), help="digits needs no network")),
    ("--data-dir", tuple(f"{s}.data_dir" for s in ALL), dict(help="where torchvision data sets are (or go)")),
    ("--arch", ("teacher.arch",), dict(type=str, choices=list(ARCHITECTURES), help=PER_DATASET)),
    ("--p-uncond", ("teacher.p_uncond",), dict(help="label dropout probability")),
    ("--beta-schedule", ("teacher.beta_schedule",), dict(choices=BETA_SCHEDULES, help="noise schedule")),
    ("--prediction-type", ("teacher.prediction_type",),
     dict(choices=PREDICTION_TYPES, help="what the teacher (and every student of it) predicts: eps, v, or "
          "flow_prediction (rectified flow; sampled with euler or heun)")),
    ("--timestep-sampling", ("teacher.timestep_sampling",),
     dict(type=str, choices=TIMESTEP_SAMPLINGS,
          help="the teacher's training timesteps: SD3's logit_normal or uniform (default: logit_normal for flow)")),
    ("--min-snr-gamma", ("teacher.min_snr_gamma",),
     dict(type=float, help="eps / v teacher: min-SNR-gamma loss weights (Hang et al. 2023; 5 is theirs)")),
    ("--objective", ("teacher.objective",),
     dict(choices=OBJECTIVES, help="diffusion: a CFG teacher; gft / mg: guidance trained into one model that samples "
          "in one pass (guidance_free.py; --stage all then trains it alone)")),
    ("--gft-beta-min", ("teacher.gft_beta_min",), dict(help="gft: beta ~ U(this, 1), s = 1 / beta up to 1 / this")),
    ("--mg-scale", ("teacher.mg_scale",), dict(help="mg: w of the target + (w - 1) sg[ema_c - ema_u], in [1, 2)")),
    ("--mg-start", ("teacher.mg_start",), dict(help="mg: the share of train steps with the plain target first")),
    ("--mg-t-max", ("teacher.mg_t_max",), dict(help="mg: the guidance term only where t < this x T")),
    ("--teacher-train-steps", ("teacher.optim.max_train_steps",), dict(type=int, help=PER_DATASET)),
    ("--teacher-batch-size", ("teacher.optim.batch_size",), dict(help="per process under torchrun")),
    ("--teacher-lr", ("teacher.optim.lr",), dict(help="AdamW, warm-up then cosine decay to a tenth")),
    ("--s-min", ("distill.s_min",), dict(help="the student's range of guidance scales, low end")),
    ("--s-max", ("distill.s_max",), dict(help="... and high end")),
    ("--distill-train-steps", ("distill.optim.max_train_steps",), dict(type=int, help=PER_DATASET)),
    ("--distill-batch-size", ("distill.optim.batch_size",), dict(help="per process under torchrun")),
    ("--distill-lr", ("distill.optim.lr",), dict(help="learning rate")),
    ("--distill-guider", ("distill.guider",),
     dict(help="the guidance rule the student learns: cfg, or a stateless apg / cfg-zero-star / tcfg spec such as "
          "apg:eta=0,norm_threshold=4 (guiders.py)")),
    ("--distill-schedule", ("distill.schedule",),
     dict(choices=SCHEDULES, help="a guidance-weight schedule over t baked into the student's target")),
    ("--start-sampling-steps", ("step_distill.start_sampling_steps",),
     dict(type=int, help="what the first round halves (default: the student's own, else 64)")),
    ("--target-sampling-steps", ("step_distill.target_sampling_steps",), dict(help="sampling steps at the end")),
    ("--round-train-steps", ("step_distill.optim.max_train_steps",), dict(help="train steps per halving round")),
    ("--round-batch-size", ("step_distill.optim.batch_size",), dict(help="per process under torchrun")),
    ("--round-lr", ("step_distill.optim.lr",), dict(help="learning rate")),
    ("--checkpoint-every", tuple(f"{s}.optim.checkpoint_every" for s in ALL), dict(help="train steps")),
    ("--seed", tuple(f"{s}.optim.seed" for s in ALL), dict(help="training, and the noise of the figures")),
    ("--device", tuple(f"{s}.optim.device" for s in ALL), dict(help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")),
    ("--channels-last", tuple(f"{s}.optim.channels_last" for s in ALL), dict(help="NHWC convolutions (speed only)")),
    ("--compile", tuple(f"{s}.optim.compile" for s in ALL), dict(help="torch.compile the network (speed only)")),
    ("--compile-mode", tuple(f"{s}.optim.compile_mode" for s in ALL),
     dict(choices=COMPILE_MODES, help="torch.compile's mode (implies --compile); reduce-overhead: CUDA graphs, CUDA "
          "only (elsewhere 'default')")),
    ("--fused", tuple(f"{s}.optim.fused" for s in ALL), dict(help="fused AdamW on CUDA (speed only)")),
]  # fmt: skip


def field_of(configs: dict[str, Any], target: str) -> tuple[Any, str]:
    """'distill.optim.lr' -> (configs['distill'].optim, 'lr')."""
    stage, *path, name = target.split(".")
    obj = configs[stage]
    for part in path:
        obj = getattr(obj, part)
    return obj, name


def configs_from(args: argparse.Namespace) -> dict[str, Any]:
    """The three stage configs with every flag's value in the fields it names; the teacher starts from its data
    set's measured recipe (recipes.teacher_config), whose fields a flag sets only when given."""
    configs = {stage: cls() for stage, cls in STAGES.items()}
    configs["teacher"] = teacher_config(args.dataset)
    recipe = {f"teacher.{name}" for name in DATASETS[args.dataset].teacher_settings}
    given = getattr(args, "given", set())
    for flag, targets, _ in CONFIG_FLAGS:
        dest = flag[2:].replace("-", "_")
        for target in targets:
            if dest in given or target not in recipe:
                setattr(*field_of(configs, target), getattr(args, dest))
    return configs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/digits", help="output folder for checkpoints and figures")
    p.add_argument("--stage", default="all", choices=["teacher", "distill", "step-distill", "all"],
                   help="all = teacher, then distill; step-distill = halve a student's sampling steps")  # fmt: skip
    p.add_argument(
        "--teacher", help="teacher for --stage distill, reference for step-distill (default: OUT/teacher.pt)"
    )
    p.add_argument("--student", help="guided student for --stage step-distill (default: OUT/student.pt)")
    p.add_argument("--resume", action="store_true",
                   help="continue the runs in OUT with their stored settings (more --*-train-steps extend them); "
                   "a flag given must match them")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="train again from scratch over the checkpoints in OUT")
    defaults = {stage: cls() for stage, cls in STAGES.items()}
    for flag, targets, kwargs in CONFIG_FLAGS:
        default = getattr(*field_of(defaults, targets[0]))
        assert all(getattr(*field_of(defaults, t)) == default for t in targets), flag  # one default per flag
        if isinstance(default, bool):  # a switch, off by default
            p.add_argument(flag, action="store_true", **kwargs)
            continue
        shown = "" if default is None else f" (default: {default})"
        in_recipes = sorted(
            name for name, d in DATASETS.items() if any(f"teacher.{k}" in targets for k in d.teacher_settings)
        )
        if in_recipes:  # a data set's measured recipe sets it unless the flag is given (recipes.teacher_config)
            shown = f" (default: {default}; {', '.join(in_recipes)}: their recipe in data.py)"
        p.add_argument(flag, **{"type": type(default), "default": default, **kwargs,
                                "help": kwargs.get("help", "") + shown})  # fmt: skip
    p.add_argument("--sampling-steps", type=int, default=DEFAULT_SAMPLING_STEPS,
                   help=f"DDIM steps for the teacher and student figures and sweep (default: "
                   f"{DEFAULT_SAMPLING_STEPS}); step-distilled students always use their own")  # fmt: skip
    p.add_argument("--teacher-minutes", type=float, default=None,
                   help="train the teacher for about this many minutes, the whole stage included: the train steps "
                   "that fit are measured here first (budget.py) and printed, the schedule fitted to them")  # fmt: skip
    p.add_argument("--eval-n", type=int, default=100, help="samples per scale in the closing sweep (default: 100)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    args.given = given_flags(p, argv)
    args.compile = args.compile or args.compile_mode != "default"  # a compile mode asks for compiling
    check_values(p, args)
    return args


def check_values(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every flag's value in its range, or argparse's one-line error naming the flag."""
    for flag, value in vars(args).items():
        if isinstance(value, int) and not isinstance(value, bool) and flag != "seed" and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
        if flag.endswith("lr") and not (math.isfinite(value) and value > 0):
            p.error(f"--{flag.replace('_', '-')} must be a positive number, got {value}")
    if not 0 <= args.p_uncond < 1:
        p.error(f"--p-uncond must be in [0, 1), got {args.p_uncond}")
    if args.eval_n < 2 * DATASETS[args.dataset].num_classes:
        p.error(f"--eval-n must be at least two samples per class ({2 * DATASETS[args.dataset].num_classes}), "
                f"got {args.eval_n}")  # fmt: skip
    for flag in ("sampling_steps", "start_sampling_steps", "target_sampling_steps"):
        if (getattr(args, flag) or 0) > TeacherConfig.num_train_timesteps:
            p.error(f"--{flag.replace('_', '-')} must be at most {TeacherConfig.num_train_timesteps} (the noise "
                    f"schedule's timesteps), got {getattr(args, flag)}")  # fmt: skip
    if not 0 <= args.seed <= MAX_SEED:
        p.error(f"--seed must be an integer in [0, 2**63 - 1], got {args.seed}")
    if args.teacher_minutes is not None and not (math.isfinite(args.teacher_minutes) and args.teacher_minutes > 0):
        p.error(f"--teacher-minutes must be a positive number, got {args.teacher_minutes}")
    if args.resume and args.overwrite:
        p.error("--resume continues the runs in --out and --overwrite replaces them: pass one of them")


def teacher_figures(out: Path, args: argparse.Namespace) -> torch.Tensor:
    """Write samples_teacher.png; return its grid (R, S, 1, C, H, W) for the comparison figure."""
    pipe = load_pipeline(out / "teacher.pt", device=pick_device(args.device))
    grid = sample_scale_grid(pipe, GRID_SCALES, num_steps=args.sampling_steps, seed=args.seed)
    model = {"gft": "GFT model (one pass per step)", "mg": "MG model (s = 1 is its own setting)"}
    save_scale_grid(grid, GRID_SCALES, pipe.class_names, out / "samples_teacher.png",
                    title=f"{model.get(args.objective, 'CFG teacher')} on {pipe.dataset}: rows = classes, same noise "
                    "along a row")  # fmt: skip
    print(f"wrote {out / 'samples_teacher.png'}")
    return grid


def student_figures(teacher_path: Path, out: Path, args: argparse.Namespace, grid_t: torch.Tensor | None) -> None:
    device = pick_device(args.device)
    teacher, student = load_pipeline(teacher_path, device=device), load_pipeline(out / "student.pt", device=device)
    grid_s = sample_scale_grid(student, GRID_SCALES, num_steps=args.sampling_steps, seed=args.seed)
    save_scale_grid(grid_s, GRID_SCALES, student.class_names, out / "samples_student.png",
                    title=f"distilled student on {student.dataset}: one pass per step")  # fmt: skip
    if grid_t is None:  # --stage distill: the teacher's grid was not drawn in this run
        grid_t = sample_scale_grid(teacher, GRID_SCALES, num_steps=args.sampling_steps, seed=args.seed)
    pairs = torch.stack([grid_t[:, :, 0], grid_s[:, :, 0]], dim=2)  # (R, S, 2, C, H, W)
    save_scale_grid(pairs, GRID_SCALES, student.class_names, out / "samples_compare.png",
                    title="teacher (left) and student (right) per scale, same noise")  # fmt: skip
    metrics, images = sweep({"teacher": teacher, "student": student}, REPORT_SCALES, n=args.eval_n,
                            num_steps=args.sampling_steps, seed=args.seed, data_dir=args.data_dir,
                            progress=not args.no_progress)  # fmt: skip
    write_sweep(metrics, images, teacher, out)
    print(f"wrote {out / 'samples_student.png'} and {out / 'samples_compare.png'}")
    print("  s     rel. L2(student, teacher)   accuracy teacher / student")
    for row in metrics["student_vs_teacher"]:
        print(f"  {row['scale']:<5g} {row['rel_l2']:>10.3f}{'':12}{row['acc_teacher']:.3f} / {row['acc_student']:.3f}")


def step_figures(teacher_path: Path, paths: list[Path], out: Path, args: argparse.Namespace) -> None:
    """The step-distilled students against the teacher at REFERENCE_SAMPLING_STEPS: grids, a sweep, the speed-up."""
    device = pick_device(args.device)
    pipes = {f"student {pipe.sampling_steps} steps": pipe for pipe in (load_pipeline(p, device=device) for p in paths)}
    for name, pipe in pipes.items():
        grid = sample_scale_grid(pipe, GRID_SCALES, seed=args.seed)
        path = out / f"samples_{name.replace(' ', '_')}.png"
        save_scale_grid(grid, GRID_SCALES, pipe.class_names, path, title=f"{name} on {pipe.dataset}, one pass each")
    if teacher_path.exists():
        teacher = load_pipeline(teacher_path, device=device)
        teacher.sampling_steps = REFERENCE_SAMPLING_STEPS
        pipes = {f"teacher {REFERENCE_SAMPLING_STEPS} steps": teacher, **pipes}
    metrics, images = sweep(pipes, REPORT_SCALES, n=args.eval_n, num_steps=None, seed=args.seed,
                            data_dir=args.data_dir, progress=not args.no_progress)  # fmt: skip
    (out / "step_distill").mkdir(exist_ok=True)
    write_sweep(metrics, images, next(iter(pipes.values())), out / "step_distill")
    reference = next(iter(metrics["models"].values()))["per_scale"]
    print(f"  {'model':<20} {'s':>4} {'accuracy':>8} {'FD':>7} {'speed-up':>8}")
    for name, model in metrics["models"].items():
        for row, ref in zip(model["per_scale"], reference):
            speedup = ref["seconds_per_image"] / row["seconds_per_image"]
            print(f"  {name:<20} {row['scale']:>4g} {row['accuracy']:>8.3f} {row['fd']:>7.2f} {speedup:>7.1f}x")


def run(args: argparse.Namespace) -> None:
    """Teacher, then student; under torchrun all ranks train and rank 0 alone draws and writes figures."""
    out, configs, progress = Path(args.out), configs_from(args), not args.no_progress
    pick_device(args.device)  # an unusable --device fails now, not after loading the data
    check_before_training(args, out, configs)
    if distributed.is_main():
        writable_folder(out)
        with output_lock(out):
            train_stages(args, out, configs, progress)
    else:
        train_stages(args, out, configs, progress)


def given_flags(p: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The names (dests) of the flags given on the command line, as opposed to left at their defaults."""
    defaults = {action: action.default for action in p._actions}
    try:
        for action in p._actions:
            action.default = argparse.SUPPRESS
        given, _ = p.parse_known_args(argv)
    finally:
        for action, default in defaults.items():
            action.default = default
    return set(vars(given))


def check_before_training(args: argparse.Namespace, out: Path, configs: dict[str, Any]) -> None:
    """Every mistake that can be seen before a train step, refused before any file changes."""
    if args.teacher and args.stage not in ("distill", "step-distill"):
        raise UserError(f"--teacher is the teacher of --stage distill (and the reference of step-distill); "
                        f"--stage {args.stage} trains its own into --out")  # fmt: skip
    check_minutes(args)
    if args.student and args.stage != "step-distill":
        raise UserError(f"--student is the guided student that --stage step-distill halves; --stage {args.stage} "
                        "does not read one")  # fmt: skip
    if args.resume:
        stored = resumed_runs(args, out)
        take_stored_settings(args, configs, stored)
        check_nothing_is_orphaned(args, out, configs, stored)
    source = source_checkpoint(args, out)
    if args.stage in ("teacher", "all"):
        check_objective(configs["teacher"])
    if args.stage in ("distill", "all"):
        check_guidance_range(configs["distill"])  # before the teacher trains for minutes
        target_guider(configs["distill"])
    if args.stage != "teacher" and distributed.is_main():  # the closing sweep needs the evaluation classifier
        check_classifier_cache(configs["teacher"].dataset if source is None else source["dataset"])


def check_minutes(args: argparse.Namespace) -> None:
    """--teacher-minutes: only where a teacher is trained from scratch, by one process, in place of a count."""
    if args.teacher_minutes is None:
        return
    clash = ("--teacher-train-steps gives the count itself" if "teacher_train_steps" in args.given else
             "--resume continues to the train steps stored in the run" if args.resume else
             f"--stage {args.stage} trains no teacher" if args.stage not in ("teacher", "all") else
             "under torchrun each process would measure its own" if distributed.world_size() > 1 else None)  # fmt: skip
    if clash:
        raise UserError(f"--teacher-minutes cannot be used here: {clash}; leave --teacher-minutes out")


# The checkpoint in OUT that --resume continues for each stage, and the key of the settings stored in it.
RESUMED = {"teacher": ("teacher.pt", "teacher_config"), "distill": ("student.pt", "distill_config"),
           "step_distill": ("student_*steps.pt", "step_distill_config")}  # fmt: skip
STAGES_OF = {"teacher": ("teacher",), "distill": ("distill",), "all": ("teacher", "distill"),
             "step-distill": ("step_distill",)}  # fmt: skip
FROM_THE_COMMAND = ("data_dir", "optim.device", "optim.checkpoint_every", *(f"optim.{k}" for k in SPEED_SWITCHES))


def resumed_runs(args: argparse.Namespace, out: Path) -> dict[str, dict[str, Any]]:
    """--resume: the checkpoint in OUT of each stage asked for that has one; none at all is a UserError
    (nothing to resume: most likely a typo in --out), not a new run started from scratch."""
    stored = {}
    for stage in STAGES_OF[args.stage]:
        paths = sorted(out.glob(RESUMED[stage][0])) if out.is_dir() else []
        if paths:
            stored[stage] = load_checkpoint(paths[0])
    if not stored:
        names = " or ".join(RESUMED[stage][0] for stage in STAGES_OF[args.stage])
        raise UserError(f"--resume: {str(out)!r} holds no {names} to continue (a typo in --out?); leave out "
                        "--resume to start a new run there")  # fmt: skip
    if "distill" in stored and args.stage == "all" and "teacher" not in stored:  # a new teacher would orphan it
        raise UserError(
            f"--resume: {str(out)!r} holds student.pt but not the teacher.pt it was distilled from; "
            "continue the student with --stage distill --teacher ITS_TEACHER, or choose another --out"
        )
    return stored


def take_stored_settings(args: argparse.Namespace, configs: dict[str, Any], stored: dict[str, dict]) -> None:
    """--resume: every config flag left out takes the value the run in OUT was trained with, not its default
    (only the paths, the device, the checkpoint interval and the speed switches come from this command)."""
    for flag, targets, _ in CONFIG_FLAGS:
        dest = flag[2:].replace("-", "_")
        for target in targets if dest not in args.given else ():
            stage, field = target.split(".", 1)
            if stage not in stored or field in FROM_THE_COMMAND:
                continue
            trained = flat_config(stored[stage].get(RESUMED[stage][1], {}))
            # a field the run predates: the dataclass default, which keeps what the code did before it existed
            value = trained.get(field, getattr(*field_of({stage: STAGES[stage]()}, target)))
            setattr(*field_of(configs, target), value)
            setattr(args, dest, value)


# A model in OUT, and what a later stage distilled from it there (found by the fingerprint of its weights).
DESCENDANTS = (
    ("teacher", "student.pt", "teacher_fingerprint"),
    ("distill", "student_*steps.pt", "previous_fingerprint"),
)


def check_nothing_is_orphaned(args: argparse.Namespace, out: Path, configs: dict[str, Any], stored: dict) -> None:
    """--resume must not train a model in OUT further while a model distilled from it lies next to it (a
    teacher and its student, a student and its step-distilled rounds): that model could never again be
    resumed or compared with the one it came from. Refused before anything changes."""
    for stage, pattern, key in DESCENDANTS:
        if stage not in stored:
            continue
        ckpt, name = stored[stage], RESUMED[stage][0]
        target = configs[stage].optim.max_train_steps or ckpt["max_train_steps"]
        fingerprint = weights_fingerprint(ckpt["ema"])
        for child in sorted(out.glob(pattern)):
            origin = load_checkpoint(child).get(key)
            if origin == fingerprint and target > ckpt["train_step"]:
                raise UserError(f"--resume would train {str(out / name)!r} on from train step {ckpt['train_step']} "
                                f"to {target}, but {child.name} was distilled from it and could then never be "
                                f"resumed or compared with it; to train it longer, copy {name} into a new folder and "
                                "resume it there (--out NEW_FOLDER --resume)")  # fmt: skip
            if origin != fingerprint and stage == "teacher" and args.stage == "all":
                raise UserError(f"--resume: {str(child)!r} was distilled from another teacher than "
                                f"{str(out / name)!r} (their weights differ); continue it with --stage distill "
                                "--teacher THE_TEACHER_IT_STARTED_FROM, or choose another --out")  # fmt: skip


# The flags that describe the teacher itself: --stage distill and step-distill start from a trained one.
MODEL_FLAGS = ("--dataset", "--arch", "--p-uncond", "--beta-schedule", "--prediction-type", "--timestep-sampling",
               "--min-snr-gamma", "--objective", "--gft-beta-min", "--mg-scale", "--mg-start",
               "--mg-t-max")  # fmt: skip


def source_checkpoint(args: argparse.Namespace, out: Path) -> dict[str, Any] | None:
    """--stage distill / step-distill: the teacher / guided student they start from, loaded. A model flag
    given (--dataset, --arch, ...) must be what its teacher was trained with: it cannot change it."""
    if args.stage not in ("distill", "step-distill"):
        return None
    kind, given = ("teacher", args.teacher) if args.stage == "distill" else ("student", args.student)
    path = Path(given) if given else out / f"{kind}.pt"
    ckpt = load_checkpoint(path, kind=kind)
    trained = ckpt.get("teacher_config", {})
    for flag, (target,), _ in (entry for entry in CONFIG_FLAGS if entry[0] in MODEL_FLAGS):
        dest, field = flag[2:].replace("-", "_"), target.split(".", 1)[1]
        if dest in args.given and field in trained and getattr(args, dest) != trained[field]:
            raise UserError(f"{flag} {getattr(args, dest)}: --stage {args.stage} starts from {str(path)!r}, whose "
                            f"teacher was trained with {field} {trained[field]}; leave {flag} out, or give a "
                            f"{kind} trained with it")  # fmt: skip
    return ckpt


def minutes_to_train_steps(configs: dict[str, Any], args: argparse.Namespace) -> int:
    """--teacher-minutes as a count of train steps, measured here (budget.train_steps_in) and printed."""
    print(f"measuring how many train steps fit in {args.teacher_minutes:g} minutes here ...", flush=True)
    steps = train_steps_in(args.teacher_minutes, configs["teacher"])
    print(f"--teacher-minutes {args.teacher_minutes:g}: {steps} train steps (--teacher-train-steps {steps} repeats "
          "this run on any machine)", flush=True)  # fmt: skip
    return steps


def train_stages(args: argparse.Namespace, out: Path, configs: dict[str, Any], progress: bool) -> None:
    """The stages --stage asks for, then the loss curves; only rank 0 draws."""
    if_exists = "resume" if args.resume else "overwrite" if args.overwrite else "error"
    rank0, how = distributed.is_main(), dict(if_exists=if_exists, progress=progress)
    curves = {}
    teacher_path = Path(args.teacher) if args.teacher else out / "teacher.pt"
    grid_t = None
    if args.stage in ("teacher", "all"):
        if args.teacher_minutes is not None:
            configs["teacher"] = with_optim(configs["teacher"], max_train_steps=minutes_to_train_steps(configs, args))
        curves["teacher"] = train_teacher(configs["teacher"], out, **how).losses
        teacher_path = out / "teacher.pt"
        grid_t = teacher_figures(out, args) if rank0 else None
        distributed.barrier()  # the others wait for rank 0's figures before distilling together
    if args.stage == "distill" or (args.stage == "all" and configs["teacher"].objective == "diffusion"):
        curves["student"] = distill_student(teacher_path, configs["distill"], out, **how).losses
        if rank0:
            student_figures(teacher_path, out, args, grid_t)
    if args.stage == "step-distill":
        student_path = Path(args.student) if args.student else out / "student.pt"
        paths = halve_sampling_steps(student_path, configs["step_distill"], out, **how)
        curves = {path.stem: load_checkpoint(path)["losses"] for path in paths}
        if rank0:
            step_figures(teacher_path, paths, out, args)
    if rank0:
        save_loss_curve(curves, out / ("loss_step_distill.png" if args.stage == "step-distill" else "loss.png"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        distributed.init(args.device)  # joins torchrun's processes; nothing for a single process
        run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a user's mistake: one line, exit code 2 (checkpoints already written are kept)
        return report(err)
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

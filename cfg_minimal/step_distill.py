"""Step distillation of the guided student (Salimans & Ho 2022; Meng et al. 2023, stage two).

Each round halves the number of DDIM steps. A new student, initialised from the previous model,
learns to cover in one step what the previous model covers in two, at random guidance scales s:

    previous model:  z_t --DDIM--> z_t' --DDIM--> z_t''    (t, t', t'': points of the n-step grid)
    student:         z_t ------------DDIM-------> z_t''    (t, t'': neighbours on the n/2-step grid)

A DDIM step (eta = 0) is affine in the x_0 it predicts, so exactly one x_0 lands on the previous
model's z_t'': Salimans & Ho's target x~ (their Algorithm 2, `ddim_x0_target`). The student keeps
predicting eps; its implied x_0 is regressed on x~ (`step_distillation_loss`). Both grids use the
'aligned' spacing (schedulers.py), so the n/2-step grid is every other point of the n-step grid.
The checkpoint records its step count and spacing: `load_pipeline` samples with the steps it was trained for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import distributed
from .checkpoint import load_checkpoint, model_from_checkpoint
from .data import load_dataset
from .distill import DistillConfig, sample_scales
from .errors import UserError
from .guidance import guided_noise_pred
from .models import DiffusionModel
from .schedulers import DDIMScheduler
from .train import fit, pick_device


@dataclass
class StepDistillConfig:
    start_steps: int | None = None  # what the first round halves; None: the checkpoint's, else 64
    target_steps: int = 8
    round_steps: int = 600  # training steps per round
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 20
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 500
    data_dir: str = "./data"


def round_sizes(start_steps: int, target_steps: int) -> list[int]:
    """[start/2, start/4, ..., target]: the step count of each round's student."""
    if not 1 <= target_steps < start_steps:
        raise UserError(f"--target-steps must be at least 1 and below the {start_steps} steps it starts from, "
                        f"got {target_steps}")  # fmt: skip
    sizes, n = [], start_steps
    while n > target_steps and n % 2 == 0:
        n //= 2
        sizes.append(n)
    if n != target_steps:
        raise UserError(
            f"--target-steps {target_steps} is not reached by halving --start-steps {start_steps}; "
            "pick a start that is the target times a power of two (e.g. 64 and 8)"
        )
    return sizes


def ddim_x0_target(
    scheduler: DDIMScheduler, z_t: torch.Tensor, t: int, z_target: torch.Tensor, t_target: int
) -> torch.Tensor:
    """The x_0 whose DDIM step (eta = 0) from z_t at t lands on z_target at t_target (Salimans & Ho's x~):

    a step is z_target = sqrt(abar') x_0 + sqrt(1 - abar') eps with eps = (z_t - sqrt(abar) x_0) / sqrt(1 - abar),
    so  x~ = (z_target - c z_t) / (sqrt(abar') - c sqrt(abar)),  c = sqrt((1 - abar') / (1 - abar))."""
    abar = scheduler.alphas_cumprod[t]
    abar_end = scheduler.alphas_cumprod[t_target] if t_target >= 0 else scheduler.final_alpha_cumprod
    c = ((1 - abar_end) / (1 - abar)).sqrt()
    return (z_target - c * z_t) / (abar_end.sqrt() - c * abar.sqrt())  # (B, C, H, W)


@torch.no_grad()
def two_step_target(
    previous: DiffusionModel,
    fine: DDIMScheduler,
    z_t: torch.Tensor,
    t: int,
    t_end: int,
    y: torch.Tensor,
    s: torch.Tensor,
) -> torch.Tensor:
    """x~ for z_t (B, C, H, W) at t: run the previous model's sampler steps t -> t' -> t_end, then invert."""
    z, u = z_t, t
    while u != t_end:
        eps = guided_noise_pred(previous, z, torch.full_like(y, u), y, s)  # (B, C, H, W)
        z = fine.step(eps, u, z, use_clipped_model_output=True).prev_sample  # exactly as the sampler steps
        u = fine.previous_timestep(u)
    return ddim_x0_target(fine, z_t, t, z, t_end)


def step_distillation_loss(
    previous: DiffusionModel, scheduler_config: dict, n_previous: int, scales: DistillConfig
) -> Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """max(SNR_t, 1) || clip(x_0 of the student) - x~ ||^2, at a random point t of the halved grid per sample.

    The weight is Salimans & Ho's "truncated SNR" (an eps-MSE where SNR > 1, an x_0-MSE where noise
    dominates). The clip is the sampler's; its gradient passes straight through, so an x_0 clipped onto
    the target costs nothing while one clipped on the wrong side is still pulled back."""
    fine = DDIMScheduler(**scheduler_config)
    fine.set_timesteps(n_previous)
    grid = fine.timesteps[0::2]  # (n/2,) the student's grid: every other point, from the same top
    ends = [*grid[1:].tolist(), -1]  # where a student step from grid[k] lands
    lo, hi = -fine.clip_sample_range, fine.clip_sample_range

    def loss_fn(student: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k = torch.randint(0, len(grid), (x0.shape[0],))  # (B,) a grid point per sample
        t = grid[k].to(x0.device)  # (B,)
        z_t = fine.add_noise(x0, torch.randn_like(x0), t)  # (B, C, H, W)
        s = sample_scales(x0.shape[0], scales, x0.device)  # (B,)
        x_target = torch.empty_like(x0)
        for point in k.unique().tolist():  # the scheduler steps one timestep at a time: group by grid point
            rows = (k == point).to(x0.device)
            x_target[rows] = two_step_target(previous, fine, z_t[rows], int(grid[point]), ends[point], y[rows], s[rows])
        abar = fine.alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        x0_pred = (z_t - (1 - abar).sqrt() * student(z_t, t, y, guidance=s).float()) / abar.sqrt()
        if fine.clip_sample:
            x0_pred = x0_pred + (x0_pred.clamp(lo, hi) - x0_pred).detach()  # clipped forward, identity backward
        weight = (abar / (1 - abar)).clamp(min=1.0).flatten()  # (B,) truncated SNR
        return (weight * (x0_pred - x_target.float()).pow(2).mean(dim=(1, 2, 3))).mean()

    return loss_fn


# The metadata a round's checkpoint inherits from the model it halves (everything but training state).
CARRIED = ("kind", "dataset", "image_size", "channels", "num_classes", "class_names", "model_config",
           "guidance_range", "distill_config", "teacher_train_config")  # fmt: skip


def distill_steps(
    student_path: str | Path, cfg: StepDistillConfig, out_dir: str | Path, resume: bool = False, progress: bool = True
) -> list[Path]:
    """Halve a guided student's steps round by round; writes OUT_DIR/student_{n}steps.pt per round.

    The first round halves `cfg.start_steps`, or the step count the checkpoint was distilled to."""
    previous_ckpt = load_checkpoint(student_path, kind="student")
    trained_for = previous_ckpt.get("sampling_steps")  # set when the checkpoint is already step-distilled
    if trained_for is not None and cfg.start_steps not in (None, trained_for):
        raise UserError(f"{str(student_path)!r} was step-distilled to {trained_for} steps; "
                        f"--start-steps must be {trained_for} (or left out)")  # fmt: skip
    n_previous = cfg.start_steps or trained_for or 64
    sizes = round_sizes(n_previous, cfg.target_steps)
    if previous_ckpt["scheduler_config"].get("timestep_spacing") != "aligned":  # the guided student: grid of n_previous
        previous_ckpt["scheduler_config"] = {**previous_ckpt["scheduler_config"], "timestep_spacing": "aligned",
                                             "aligned_base": n_previous}  # fmt: skip
    device = pick_device(cfg.device)
    with distributed.main_first():  # under torchrun rank 0 downloads, the others then read its copy
        data = load_dataset(previous_ckpt["dataset"], cfg.data_dir, train=True)
    lo, hi = previous_ckpt["guidance_range"]
    scales = DistillConfig(**{**previous_ckpt["distill_config"], "s_min": lo, "s_max": hi})
    paths = []
    for n in sizes:
        path = Path(out_dir) / f"student_{n}steps.pt"
        resume_from = load_checkpoint(path, kind="student") if resume and path.exists() else None
        round_cfg = cfg  # a resumed round keeps the settings it was started with
        if resume_from is not None:
            round_cfg = StepDistillConfig(**{**resume_from["step_distill_config"], "device": cfg.device})
        if resume_from is None or resume_from["step"] < resume_from["total_steps"]:
            torch.manual_seed(round_cfg.seed + n)
            previous = model_from_checkpoint(previous_ckpt, "ema").to(device).requires_grad_(False)
            metadata = {key: previous_ckpt[key] for key in CARRIED if key in previous_ckpt}
            metadata.update(
                scheduler_config=previous_ckpt["scheduler_config"], sampling_steps=n,
                step_distill_config=asdict(round_cfg),
                step_rounds=[*previous_ckpt.get("step_rounds", []), dict(from_steps=n_previous, to_steps=n)],
            )  # fmt: skip
            loss_fn = step_distillation_loss(previous, metadata["scheduler_config"], n_previous, scales)
            fit(
                model_from_checkpoint(previous_ckpt, "ema"), loss_fn, data, path, metadata,
                steps=round_cfg.round_steps, batch_size=round_cfg.batch_size, lr=round_cfg.lr,
                warmup_steps=round_cfg.warmup_steps, weight_decay=0.0, grad_clip=round_cfg.grad_clip,
                ema_decay=round_cfg.ema_decay, device=device, checkpoint_every=round_cfg.checkpoint_every,
                resume_from=resume_from, progress=progress, seed=round_cfg.seed,
            )  # fmt: skip
        previous_ckpt, n_previous = load_checkpoint(path, kind="student"), n
        paths.append(path)
    return paths

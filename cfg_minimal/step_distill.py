"""Step distillation of the guided student (Salimans & Ho 2022; Meng et al. 2023, stage two).

Each round halves the number of DDIM sampling steps. A new student, initialised from the previous model,
learns to cover in one step what the previous model covers in two, at random guidance scales s:

    previous model:  z_t --DDIM--> z_t' --DDIM--> z_t''    (t, t', t'': points of the n-step grid)
    student:         z_t ------------DDIM-------> z_t''    (t, t'': neighbours on the n/2-step grid)

A DDIM step (eta = 0) is affine in the x_0 it predicts, so exactly one x_0 lands on the previous
model's z_t'': Salimans & Ho's target x~ (their Algorithm 2, `ddim_x0_target`). The student keeps
predicting what its teacher predicts (the scheduler_config's `prediction_type`, eps or v; predictions.py);
its implied x_0 is regressed on x~ (`step_distillation_loss`). Both grids use the
'aligned' spacing (schedulers.py), so the n/2-step grid is every other point of the n-step grid.
The checkpoint records its sampling steps and spacing: `load_pipeline` samples with the steps it was trained for.
A round is one call of loop.fit, starting from the previous model's EMA weights.

A rectified-flow student (prediction_type 'flow_prediction', flow.py) is halved the same way on the Euler
sampler's grid of sigmas ('aligned' too, with the shift it was trained with): one student Euler step
sigma_a -> sigma_c covers two of the previous model's, sigma_a -> sigma_b -> sigma_c, and its velocity is
regressed on the one velocity that lands where they land (`flow_two_step_target`, `flow_step_distillation_loss`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .checkpoint import dataset_metadata, load_checkpoint, model_from_checkpoint, weights_fingerprint
from .data import ImageData, load_dataset
from .distill import DistillConfig, sample_scales
from .errors import UserError
from .guidance import guided_noise_pred
from .loop import LossFn, OptimConfig, fit
from .models import DiffusionModel
from .predictions import eps_from_x0, is_flow, to_eps, to_x0
from .resume import existing_run, resume_config
from .schedulers import DDIMScheduler, FlowMatchEulerScheduler


@dataclass
class StepDistillConfig:
    start_sampling_steps: int | None = None  # what the first round halves; None: the checkpoint's, else 64
    target_sampling_steps: int = 8
    data_dir: str = "./data"
    optim: OptimConfig = field(  # per round: each round trains max_train_steps (never None here)
        default_factory=lambda: OptimConfig(
            max_train_steps=600, batch_size=64, lr=5e-4, warmup_steps=20, ema_decay=0.995
        )
    )


def round_sizes(start: int, target: int) -> list[int]:
    """[start/2, start/4, ..., target]: the sampling steps of each round's student."""
    if not 1 <= target < start:
        raise UserError(f"--target-sampling-steps must be at least 1 and below the {start} sampling steps it "
                        f"starts from, got {target}")  # fmt: skip
    sizes, n = [], start
    while n > target and n % 2 == 0:
        n //= 2
        sizes.append(n)
    if n != target:
        raise UserError(
            f"--target-sampling-steps {target} is not reached by halving --start-sampling-steps {start}; "
            "pick a start that is the target times a power of two (e.g. 64 and 8)"
        )
    return sizes


def ddim_x0_target(
    z_t: torch.Tensor, abar: torch.Tensor, z_target: torch.Tensor, abar_end: torch.Tensor
) -> torch.Tensor:
    """The x_0 whose DDIM step (eta = 0) from z_t (abar) lands on z_target (abar_end): Salimans & Ho's x~.

    A step is z_target = sqrt(abar') x_0 + sqrt(1 - abar') eps with eps = (z_t - sqrt(abar) x_0) / sqrt(1 - abar),
    so  x~ = (z_target - c z_t) / (sqrt(abar') - c sqrt(abar)),  c = sqrt((1 - abar') / (1 - abar)).
    abar and abar_end: per sample, (B, 1, 1, 1)."""
    c = ((1 - abar_end) / (1 - abar)).sqrt()  # (B, 1, 1, 1)
    return (z_target - c * z_t) / (abar_end.sqrt() - c * abar.sqrt())  # (B, C, H, W)


def ddim_step(
    output: torch.Tensor,
    z: torch.Tensor,
    abar: torch.Tensor,
    abar_next: torch.Tensor,
    clip: float | None,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """DDIMScheduler.step (eta = 0, use_clipped_model_output) with per-sample abar, abar_next (B, 1, 1, 1):
    x_0 = clip(x_0 of the network's output), for eps clip((z - sqrt(1 - abar) eps) / sqrt(abar)); eps from the
    output, or re-derived from x_0 where clipped; then z' = sqrt(abar') x_0 + sqrt(1 - abar') eps (Song et al.
    2021, eq. 12 with sigma = 0)."""
    x0 = to_x0(output, z, abar, prediction_type)  # (B, C, H, W)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
        eps = eps_from_x0(x0, z, abar)  # (B, C, H, W)
    else:
        eps = to_eps(output, z, abar, prediction_type)
    return abar_next.sqrt() * x0 + (1 - abar_next).sqrt() * eps


@torch.no_grad()
def two_step_target(
    previous: DiffusionModel,
    z_t: torch.Tensor,
    y: torch.Tensor,
    s: torch.Tensor,
    timesteps: torch.Tensor,
    abar: torch.Tensor,
    clip: float | None,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """x~ for z_t (B, C, H, W): two DDIM steps of the previous model, then inverted (ddim_x0_target).

    timesteps, abar: (B, 3) per sample, the previous sampler's points t -> t' -> t'' and their abar (the
    last step ends at abar = the sampler's final one). All samples step at once, each at its own t.
    `prediction_type` is what the previous model outputs."""
    z = z_t
    for j in (0, 1):
        out = guided_noise_pred(previous, z, timesteps[:, j], y, s)  # (B, C, H, W) eps or v, guided
        z = ddim_step(out, z, abar[:, j, None, None, None], abar[:, j + 1, None, None, None], clip, prediction_type)
    return ddim_x0_target(z_t, abar[:, 0, None, None, None], z, abar[:, 2, None, None, None])


def step_distillation_loss(
    previous: DiffusionModel, scheduler_config: dict, n_previous: int, scales: DistillConfig
) -> LossFn:
    """max(SNR_t, 1) || clip(x_0 of the student) - x~ ||^2, at a random point t of the halved grid per sample.

    The student's and the previous model's outputs are of the scheduler_config's `prediction_type`; a flow
    model's round is `flow_step_distillation_loss`.

    The weight is Salimans & Ho's "truncated SNR" (an eps-MSE where SNR > 1, an x_0-MSE where noise
    dominates). The clip is the sampler's; its gradient passes straight through, so an x_0 clipped onto
    the target costs nothing while one clipped on the wrong side is still pulled back."""
    if is_flow(scheduler_config.get("prediction_type")):
        return flow_step_distillation_loss(previous, scheduler_config, n_previous, scales)
    fine = DDIMScheduler(**scheduler_config)
    fine.set_timesteps(n_previous)
    # The previous sampler's points, then its end (t = -1, abar = final_alpha_cumprod): the student's
    # step k goes from point 2k over 2k + 1 to 2k + 2.
    points = torch.cat([fine.timesteps, torch.tensor([-1])])  # (n + 1,)
    abar_at = torch.cat([fine.alphas_cumprod[fine.timesteps], fine.final_alpha_cumprod.view(1)])  # (n + 1,)
    spans = torch.arange(0, n_previous, 2)[:, None] + torch.arange(3)  # (n/2, 3) point indices of each step
    clip = fine.clip_sample_range if fine.clip_sample else None
    on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def loss_fn(student: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x0.device not in on_device:
            on_device[x0.device] = (points[spans].to(x0.device), abar_at[spans].to(x0.device))
        steps_t, steps_abar = on_device[x0.device]  # (n/2, 3) each
        k = torch.randint(0, len(spans), (x0.shape[0],), device=x0.device)  # (B,) the student's step per sample
        t, abar = steps_t[k, 0], steps_abar[k, 0].view(-1, 1, 1, 1)  # (B,), (B, 1, 1, 1)
        z_t = fine.add_noise(x0, torch.randn_like(x0), t)  # (B, C, H, W)
        s = sample_scales(x0.shape[0], scales, x0.device)  # (B,)
        x_target = two_step_target(previous, z_t, y, s, steps_t[k], steps_abar[k], clip, fine.prediction_type)
        x0_pred = to_x0(student(z_t, t, y, guidance=s).float(), z_t, abar, fine.prediction_type)  # (B, C, H, W)
        if clip is not None:
            x0_pred = x0_pred + (x0_pred.clamp(-clip, clip) - x0_pred).detach()  # clipped forward, identity backward
        weight = (abar / (1 - abar)).clamp(min=1.0).flatten()  # (B,) truncated SNR
        return (weight * (x0_pred - x_target.float()).pow(2).mean(dim=(1, 2, 3))).mean()

    return loss_fn


@torch.no_grad()
def flow_two_step_target(
    previous: DiffusionModel,
    x_a: torch.Tensor,
    y: torch.Tensor,
    s: torch.Tensor,
    timesteps: torch.Tensor,
    sigmas: torch.Tensor,
) -> torch.Tensor:
    """v~ for x_a (B, C, H, W): the one velocity whose Euler step sigma_a -> sigma_c lands where two Euler steps
    of the previous (guided) model land, sigma_a -> sigma_b -> sigma_c:

        1. v_a = v(x_a, sigma_a),  x_b = x_a + (sigma_b - sigma_a) v_a      (FlowMatchEulerScheduler.step)
        2. v_b = v(x_b, sigma_b),  x_c = x_b + (sigma_c - sigma_b) v_b
        3. v~  = (x_a - x_c) / (sigma_a - sigma_c)
               = ((sigma_a - sigma_b) v_a + (sigma_b - sigma_c) v_b) / (sigma_a - sigma_c)

    so that x_a + (sigma_c - sigma_a) v~ = x_c exactly: the flow form of Salimans & Ho's x~ (an Euler step is
    affine in its velocity, as a DDIM step is in its x_0). timesteps, sigmas: (B, 3) per sample, the previous
    sampler's t_k = sigma_k T and sigma_k at a, b, c (c may be the end, sigma = 0, where no network runs).
    All samples step at once, each from its own grid point."""
    x = x_a
    for j in (0, 1):
        v = guided_noise_pred(previous, x, timesteps[:, j], y, s)  # (B, C, H, W) the guided velocity
        x = x + (sigmas[:, j + 1] - sigmas[:, j]).view(-1, 1, 1, 1) * v  # (B, C, H, W) Euler
    return (x_a - x) / (sigmas[:, 0] - sigmas[:, 2]).view(-1, 1, 1, 1)  # (B, C, H, W)


def flow_step_distillation_loss(
    previous: DiffusionModel, scheduler_config: dict, n_previous: int, scales: DistillConfig
) -> LossFn:
    """|| v_student(x_a, sigma_a, y, s) - v~ ||^2 at a random point sigma_a of the halved Euler grid per sample.

    Progressive halving on the flow grid (Salimans & Ho 2022, with rectified flow's Euler step in place of DDIM's):

        1. per sample a student step k, from sigma_a = sigma_2k to sigma_c = sigma_2k+2 of the previous grid
        2. x_a = (1 - sigma_a) x_0 + sigma_a eps                           (flow.py, Esser et al. 2024, eq. 13)
        3. s from the student's range, as the guided student learnt it      (distill.sample_scales)
        4. v~ = (x_a - x_c) / (sigma_a - sigma_c), x_c two Euler steps of the previous model   (flow_two_step_target)
        5. the velocity MSE, unweighted, the flow teacher's own loss: with x_0 = x_a - sigma_a v it is
           (1 + sqrt(SNR))^2 || x_0 error ||^2, SNR = ((1 - sigma_a) / sigma_a)^2, never below 1 where noise
           dominates, as Salimans & Ho's max(SNR, 1) on the eps path

    Why this route and not a shortcut or consistency target: the student is an Euler step of the same network, so
    the sampler, the checkpoint and the Pipeline stay as they are (only the grid is 'aligned'); the target is exact
    (a student that meets it reproduces the previous model's two steps, no bootstrap from its own outputs), and it
    needs no step-size input (shortcut models, Frans et al. 2024) and no re-noising sampler (consistency models).
    There is no clip: the flow sampler does not clip x_0."""
    fine = FlowMatchEulerScheduler(**scheduler_config)
    fine.set_timesteps(n_previous)
    points = torch.cat([fine.timesteps, torch.zeros(1)])  # (n + 1,) t_k = sigma_k T, then the end (t = 0)
    spans = torch.arange(0, n_previous, 2)[:, None] + torch.arange(3)  # (n/2, 3) point indices of each step
    steps_t, steps_sigma = points[spans], fine.sigmas[spans]  # (n/2, 3) each

    def loss_fn(student: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k = torch.randint(0, len(spans), (x0.shape[0],))  # (B,) the student's step per sample
        t, sigma = steps_t[k].to(x0.device), steps_sigma[k].to(x0.device)  # (B, 3) each
        x_a = fine.add_noise(x0, torch.randn_like(x0), t[:, 0])  # (B, C, H, W)
        s = sample_scales(x0.shape[0], scales, x0.device)  # (B,)
        v_target = flow_two_step_target(previous, x_a, y, s, t, sigma)  # (B, C, H, W)
        v_student = student(x_a, t[:, 0], y, guidance=s).float()  # (B, C, H, W)
        return (v_student - v_target.float()).pow(2).mean()

    return loss_fn


# What a round's checkpoint inherits from the model it halves, besides DATASET_KEYS (not the training state).
CARRIED = ("kind", "model_config", "guidance_range", "distill_config", "teacher_config")


def halve_sampling_steps(
    student: str | Path, cfg: StepDistillConfig, out_dir: str | Path, if_exists: str = "error", progress: bool = True
) -> list[Path]:
    """Halve a guided student's sampling steps round by round; writes OUT_DIR/student_{n}steps.pt per round.

    The first round halves `cfg.start_sampling_steps`, or the sampling steps the checkpoint was distilled to."""
    previous = load_checkpoint(student, kind="student")
    trained_for = previous.get("sampling_steps")  # set when the checkpoint is already step-distilled
    if trained_for is not None and cfg.start_sampling_steps not in (None, trained_for):
        raise UserError(f"{str(student)!r} was step-distilled to {trained_for} sampling steps; "
                        f"--start-sampling-steps must be {trained_for} (or left out)")  # fmt: skip
    n_previous = cfg.start_sampling_steps or trained_for or 64
    sizes = round_sizes(n_previous, cfg.target_sampling_steps)
    previous["scheduler_config"] = aligned_config(previous["scheduler_config"], n_previous)
    with distributed.main_first():  # under torchrun rank 0 downloads, the others then read its copy
        data = load_dataset(previous["dataset"], cfg.data_dir, train=True)
    paths = []
    for n in sizes:
        path = Path(out_dir) / f"student_{n}steps.pt"
        resume_from = existing_run(path, "student", if_exists)
        distill_round(previous, n_previous, n, cfg, data, path, resume_from, progress)
        previous, n_previous = load_checkpoint(path, kind="student"), n
        paths.append(path)
    return paths


def aligned_config(config: dict[str, Any], n_previous: int) -> dict[str, Any]:
    """The scheduler_config of the first round's grid (DDIM's, or for a flow model Euler's with its shift written
    out): 'aligned' on the previous model's n_previous sampling steps. A config already aligned (a step-distilled
    student's) is kept."""
    if config.get("timestep_spacing") == "aligned":
        return config
    flow = {"shift": config.get("shift", 1.0)} if is_flow(config.get("prediction_type")) else {}
    return {**config, **flow, "timestep_spacing": "aligned", "aligned_base": n_previous}


def distill_round(
    previous: dict[str, Any],
    n_previous: int,
    n: int,
    cfg: StepDistillConfig,
    data: ImageData,
    path: Path,
    resume_from: dict[str, Any] | None,
    progress: bool,
) -> None:
    """One round: a copy of the previous checkpoint's EMA model learns to sample in n = n_previous / 2 steps.

    A resumed round must halve the same previous model (compared by weights); a finished one is kept."""
    fingerprint = weights_fingerprint(previous["ema"])
    if resume_from is not None:
        if resume_from.get("previous_fingerprint") != fingerprint:
            raise UserError(f"--resume: {str(path)!r} was distilled from another model than the one it would "
                            "halve now; pass the student it started from, redo the rounds with --overwrite, "
                            "or choose another --out")  # fmt: skip
        rounds = ("start_sampling_steps", "target_sampling_steps")  # where the rounds end may change
        cfg = resume_config(StepDistillConfig, resume_from, "step_distill_config", cfg, also_changeable=rounds)
        if resume_from["train_step"] >= cfg.optim.max_train_steps:
            return
    torch.manual_seed(cfg.optim.seed + n)
    device = distributed.pick_device(cfg.optim.device)
    previous_model = model_from_checkpoint(previous, "ema").to(device).requires_grad_(False)
    scales = DistillConfig(**{**previous["distill_config"], "optim": OptimConfig()})  # s as the student learnt it
    metadata = dict(
        **dataset_metadata(previous), **{key: previous[key] for key in CARRIED if key in previous},
        sampling_steps=n, step_distill_config=asdict(cfg), previous_fingerprint=fingerprint,
        step_rounds=[*previous.get("step_rounds", []), dict(from_sampling_steps=n_previous, to_sampling_steps=n)],
    )  # fmt: skip
    loss_fn = step_distillation_loss(previous_model, previous["scheduler_config"], n_previous, scales)
    fit(model_from_checkpoint(previous, "ema"), loss_fn, data, path, metadata, cfg.optim, resume_from, progress)

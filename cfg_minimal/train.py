"""Teacher training: a class-conditional denoiser with label dropout (Ho & Salimans 2022, Algorithm 1).

    L = E_{x_0, y, t, eps} || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t, y_dropped) ||^2
(Ho et al. 2020, eq. 14), where y_dropped is the null label with probability p_uncond (done inside
the model's LabelEmbedder, in training mode only). With `prediction_type` 'v_prediction' the network
learns v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 instead (Salimans & Ho 2022; predictions.training_target).
With 'flow_prediction' the process is rectified flow instead (flow.py):
    L = E_{x_0, y, sigma, eps} || (eps - x_0) - v_theta((1 - sigma) x_0 + sigma eps, sigma T, y_dropped) ||^2
(Liu et al. 2023, eq. 1; Esser et al. 2024, eq. 13), sigma from SD3's logit-normal density (eq. 19) or
uniform (`timestep_sampling`; an eps or v teacher may draw its integer t = floor(u T) from the same density).
`min_snr_gamma` weights an eps or v loss per timestep by min(SNR_t, gamma) / SNR_t (/ (SNR_t + 1) for v; Hang
et al. 2023: min_snr_weight). The prediction type is stored in the checkpoint's scheduler_config, which every
model distilled from it inherits; it alone says which process a checkpoint was trained on. The model starts
from scratch; the loop is loop.fit. `TeacherConfig.objective` 'gft' or 'mg' swaps this loss for one that trains
guidance into the model itself (guidance_free.py), on the same process and prediction type.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .data import dataset_info, load_dataset
from .errors import UserError
from .flow import TIMESTEP_SAMPLINGS
from .loop import FitResult, LossFn, OptimConfig, fit, with_optim
from .models import build_model
from .predictions import check_prediction_type, is_flow
from .recipes import recipe
from .resume import existing_run, resume_config
from .schedulers import DDPMScheduler, FlowMatchEulerScheduler, training_scheduler


@dataclass
class TeacherConfig:
    dataset: str = "digits"
    data_dir: str = "./data"
    arch: str | None = None  # None: the dataset's arch (its entry in data.py)
    p_uncond: float = 0.1  # label dropout: the share of labels replaced by the null label
    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"  # what the network outputs: "epsilon", "v_prediction", or "flow_prediction"
    # (rectified flow: then beta_schedule is not used)
    timestep_sampling: str | None = None  # "logit_normal" (SD3) or "uniform"; None: logit_normal for flow, else uniform
    min_snr_gamma: float | None = None  # eps / v: weight each timestep's loss by min(SNR, gamma) / SNR (Hang et al.
    # 2023; / (SNR + 1) for v); None: the plain loss
    # The loss (guidance_free.py): "diffusion" (the plain one below: a CFG teacher), or guidance trained into one
    # model that samples in one pass: "gft" (the scale s as an input) or "mg" (the target carries the guidance)
    objective: str = "diffusion"
    gft_beta_min: float = 0.1  # gft: beta ~ U(gft_beta_min, 1); the model learns s = 1 / beta in [1, 1 / gft_beta_min]
    mg_scale: float = 1.45  # mg: w in the target + (w - 1) sg[ema_c - ema_u] (Tang et al.'s w is w - 1)
    mg_start: float = 0.25  # mg: the share of the train steps with the plain target, before the EMA is any good
    mg_t_max: float = 0.75  # mg: the guidance term only where t < mg_t_max T (not at the noisiest timesteps)
    optim: OptimConfig = field(default_factory=OptimConfig)  # batch 128, lr 2e-3, 100 warm-up train steps


def diffusion_loss(
    scheduler: DDPMScheduler | FlowMatchEulerScheduler, timestep_sampling: str = "uniform",
    min_snr_gamma: float | None = None,
) -> LossFn:  # fmt: skip
    """The MSE to the scheduler's `prediction_type` target (eps, v or the flow velocity) at timesteps drawn as its
    process does (`training_point`), each sample's error weighted by `min_snr_weight` when `min_snr_gamma` is
    given; `model` may be wrapped in DDP."""

    def loss_fn(model: nn.Module, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t, x_t, target = training_point(scheduler, x0, timestep_sampling)
        if min_snr_gamma is None:
            return F.mse_loss(model(x_t, t, y).float(), target)
        error = (model(x_t, t, y).float() - target).pow(2).flatten(1).mean(1)  # (B,)
        return (min_snr_weight(scheduler, t, min_snr_gamma) * error).mean()

    return loss_fn


def min_snr_weight(scheduler: DDPMScheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (B,) (Hang et al. 2023, eq. 13 in x_0 terms): the x_0 error is weighted by
    min(SNR_t, gamma), SNR_t = abar_t / (1 - abar_t); an eps error is SNR_t times an x_0 error, so eps takes
    min(SNR_t, gamma) / SNR_t, and a v error (SNR_t + 1) times one, so v takes min(SNR_t, gamma) / (SNR_t + 1).
    Low-noise timesteps, whose error is easy and whose gradients fight the others', count less."""
    abar = scheduler.alphas_cumprod_on(t.device)[t]  # (B,)
    snr = abar / (1 - abar)  # (B,)
    return snr.clamp(max=gamma) / (snr + 1 if scheduler.prediction_type == "v_prediction" else snr)  # (B,)


def training_point(
    scheduler: DDPMScheduler | FlowMatchEulerScheduler, x0: torch.Tensor, timestep_sampling: str = "uniform"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t (B,), x_t, target (B, C, H, W)) for clean images x0: t drawn as the process does (VP: integers uniform
    in [0, T); flow: sigma T from `timestep_sampling`), then the noise, x_t = add_noise(x0, noise, t) and the
    network's target there. The loss of every stage that draws its own x_t (teacher, guided student) calls this."""
    t = scheduler.training_timesteps(x0.shape[0], x0.device, timestep_sampling)  # (B,)
    noise = torch.randn_like(x0)  # (B, C, H, W)
    x_t = scheduler.add_noise(x0, noise, t)  # (B, C, H, W)
    return t, x_t, scheduler.training_target(x0, noise, t)


def schedule_config(cfg: TeacherConfig) -> dict[str, Any]:
    """The checkpoint's scheduler_config: the noise schedule and what the network predicts (rectified flow has
    no beta schedule)."""
    if is_flow(cfg.prediction_type):
        return dict(num_train_timesteps=cfg.num_train_timesteps, prediction_type=cfg.prediction_type)
    return dict(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                prediction_type=cfg.prediction_type)  # fmt: skip


def timestep_sampling(cfg: TeacherConfig) -> str:
    """cfg.timestep_sampling, None resolved (logit_normal for flow as SD3 trains, uniform for eps and v as DDPM
    does), or a UserError naming the choices."""
    sampling = cfg.timestep_sampling or ("logit_normal" if is_flow(cfg.prediction_type) else "uniform")
    if sampling not in TIMESTEP_SAMPLINGS:
        raise UserError(f"timestep_sampling must be {' or '.join(TIMESTEP_SAMPLINGS)}, got {sampling!r}")
    return sampling


def check_min_snr(cfg: TeacherConfig) -> None:
    """cfg.min_snr_gamma None, or a positive number on an eps / v teacher with the plain objective; else a UserError."""
    gamma = cfg.min_snr_gamma
    if gamma is None:
        return
    if not (isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and math.isfinite(gamma) and gamma > 0):
        raise UserError(f"min_snr_gamma must be a positive number (5 is Hang et al.'s), got {gamma!r}")
    if is_flow(cfg.prediction_type) or cfg.objective != "diffusion":
        raise UserError(f"min_snr_gamma weights the plain eps / v loss; this run trains {cfg.prediction_type} with "
                        f"objective {cfg.objective!r} (MNIST's recipe is a flow teacher): leave it out, or pass "
                        "--prediction-type epsilon / v_prediction and --objective diffusion")  # fmt: skip


def train_teacher(
    cfg: TeacherConfig, out_dir: str | Path, if_exists: str = "error", progress: bool = True
) -> FitResult:
    """Train a CFG teacher on cfg.dataset (or, with cfg.objective 'gft' or 'mg', a model with guidance trained in:
    guidance_free.py); writes OUT_DIR/teacher.pt and returns its EMA model.

    An existing teacher.pt is an error, continued with if_exists='resume' (see resume.resume_config) or
    replaced with 'overwrite'. Under torchrun, call distributed.init() first; every process
    then runs this (see loop.fit)."""
    info = dataset_info(cfg.dataset)  # an unknown name fails here, before the recipe is looked up
    check_prediction_type(cfg.prediction_type)
    path = Path(out_dir) / "teacher.pt"
    resume_from = existing_run(path, "teacher", if_exists)
    if resume_from is not None:  # an arch or a train-step count left out (None) means the stored one
        cfg = resume_config(TeacherConfig, resume_from, "teacher_config", cfg)
    defaults = recipe(cfg.dataset, cfg.arch)
    cfg = replace(cfg, arch=cfg.arch or defaults["arch"], timestep_sampling=timestep_sampling(cfg))
    if cfg.optim.max_train_steps is None:
        cfg = with_optim(cfg, max_train_steps=defaults["teacher_train_steps"])
    # imported here: guidance_free builds on this module (training_point, diffusion_loss)
    from .guidance_free import check_objective, objective_loss, objective_metadata, objective_model_settings

    check_objective(cfg)
    check_min_snr(cfg)
    torch.manual_seed(cfg.optim.seed)  # the same initial weights in every process
    with distributed.main_first():  # rank 0 downloads, the others then read its copy
        data = load_dataset(cfg.dataset, cfg.data_dir, train=True)
    model = build_model(cfg.arch, in_channels=info.channels, image_size=info.image_size,
                        num_classes=info.num_classes, **objective_model_settings(cfg))  # fmt: skip
    metadata = dict(
        kind="teacher", model_config={"arch": cfg.arch, **model.config}, scheduler_config=schedule_config(cfg),
        dataset=cfg.dataset, image_size=info.image_size, channels=info.channels, num_classes=info.num_classes,
        class_names=list(info.class_names), teacher_config=asdict(cfg), **objective_metadata(cfg),
    )  # fmt: skip
    loss_fn = objective_loss(cfg, training_scheduler(schedule_config(cfg)), info.num_classes)
    return fit(model, loss_fn, data, path, metadata, cfg.optim, resume_from, progress)

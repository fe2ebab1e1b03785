"""Teacher training: a class-conditional denoiser with label dropout (Ho & Salimans 2022, Algorithm 1).

    L = E_{x_0, y, t, eps} || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t, y_dropped) ||^2
(Ho et al. 2020, eq. 14), where y_dropped is the null label with probability p_uncond (done inside
the model's LabelEmbedder, in training mode only). With `prediction_type` 'v_prediction' the network
learns v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 instead (Salimans & Ho 2022; predictions.training_target).
The prediction type is stored in the checkpoint's scheduler_config, which every model distilled from it
inherits. The model starts from scratch; the loop is loop.fit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .data import dataset_info, load_dataset
from .loop import FitResult, LossFn, OptimConfig, fit, with_optim
from .models import build_model
from .predictions import check_prediction_type, training_target
from .recipes import recipe
from .resume import existing_run, resume_config
from .schedulers import DDPMScheduler


@dataclass
class TeacherConfig:
    dataset: str = "digits"
    data_dir: str = "./data"
    arch: str | None = None  # None: the dataset's arch (its entry in data.py)
    p_uncond: float = 0.1  # label dropout: the share of labels replaced by the null label
    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"  # what the network learns to output: "epsilon" or "v_prediction"
    optim: OptimConfig = field(default_factory=OptimConfig)  # batch 128, lr 2e-3, 100 warm-up train steps


def diffusion_loss(scheduler: DDPMScheduler) -> LossFn:
    """The MSE to the scheduler's `prediction_type` target (eps or v) at uniformly drawn t in [0, T);
    `model` may be wrapped in DDP."""

    def loss_fn(model: nn.Module, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = torch.randint(0, scheduler.num_train_timesteps, (x0.shape[0],), device=x0.device)  # (B,)
        noise = torch.randn_like(x0)  # (B, C, H, W)
        x_t = scheduler.add_noise(x0, noise, t)  # (B, C, H, W)
        target = training_target(x0, noise, scheduler.abar_like(t, x0), scheduler.prediction_type)  # (B, C, H, W)
        return F.mse_loss(model(x_t, t, y).float(), target)

    return loss_fn


def schedule_config(cfg: TeacherConfig) -> dict[str, Any]:
    """The checkpoint's scheduler_config: the noise schedule and what the network predicts."""
    return dict(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                prediction_type=cfg.prediction_type)  # fmt: skip


def train_teacher(
    cfg: TeacherConfig, out_dir: str | Path, if_exists: str = "error", progress: bool = True
) -> FitResult:
    """Train a CFG teacher on cfg.dataset; writes OUT_DIR/teacher.pt and returns its EMA model.

    An existing teacher.pt is an error, continued with if_exists='resume' (see resume.resume_config) or
    replaced with 'overwrite'. Under torchrun, call distributed.init() first; every process
    then runs this (see loop.fit)."""
    info = dataset_info(cfg.dataset)  # an unknown name fails here, before the recipe is looked up
    check_prediction_type(cfg.prediction_type)
    defaults = recipe(cfg.dataset, cfg.arch)
    cfg = replace(cfg, arch=cfg.arch or defaults["arch"])
    path = Path(out_dir) / "teacher.pt"
    resume_from = existing_run(path, "teacher", if_exists)
    if resume_from is not None:  # a train-step count left out means the stored one
        cfg = resume_config(TeacherConfig, resume_from, "teacher_config", cfg)
    if cfg.optim.max_train_steps is None:
        cfg = with_optim(cfg, max_train_steps=defaults["teacher_train_steps"])
    torch.manual_seed(cfg.optim.seed)  # the same initial weights in every process
    with distributed.main_first():  # rank 0 downloads, the others then read its copy
        data = load_dataset(cfg.dataset, cfg.data_dir, train=True)
    model = build_model(cfg.arch, in_channels=info.channels, image_size=info.image_size,
                        num_classes=info.num_classes, p_uncond=cfg.p_uncond)  # fmt: skip
    metadata = dict(
        kind="teacher", model_config={"arch": cfg.arch, **model.config}, scheduler_config=schedule_config(cfg),
        dataset=cfg.dataset, image_size=info.image_size, channels=info.channels, num_classes=info.num_classes,
        class_names=list(info.class_names), teacher_config=asdict(cfg),
    )  # fmt: skip
    loss_fn = diffusion_loss(DDPMScheduler(**schedule_config(cfg)))
    return fit(model, loss_fn, data, path, metadata, cfg.optim, resume_from, progress)

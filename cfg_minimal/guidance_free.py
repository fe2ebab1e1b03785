"""Objectives that train guidance into the model itself: guidance-free training (GFT) and model guidance (MG).

Both train from scratch, next to the plain teacher loss (train.diffusion_loss), with no teacher, and both
give a model that samples with one network pass per step, where a CFG teacher takes two and a guided student
first needs a trained teacher. `TeacherConfig.objective` picks the loss ("diffusion", "gft" or "mg"); the
loss builders here return a loop.LossFn, (model, x_0, y) -> scalar, as train.diffusion_loss does.

GFT (Chen et al. 2025, "Visual Generation Without Guidance", ICML, Sec. 3). CFG's guided prediction at scale s,
pred_s = pred_u + s (pred_c - pred_u), solved for the conditional model reads

    pred_c = beta pred_s + (1 - beta) pred_u,        beta = 1 / s,

so GFT makes pred_s the network, model(x_t, t, y, guidance=s), and fits the conditional model this implies to
the data, with the same target as the plain loss:

    L = E || beta model(x_t, t, y, 1/beta) + (1 - beta) sg[model(x_t, t, null, 0)] - target ||^2,  beta ~ U(beta_min, 1)

A row whose label is dropped (probability p_uncond) trains the unconditional model(x_t, t, null, 0) with the
plain loss. The network has a guidance input (guidance_embed, as a guided student has), so pipe(labels, s) takes
one pass per step and s means what it means for CFG. Checked against the paper and its code (thu-ml/GFT,
DiT/diffusion/gaussian_diffusion.py `training_losses`, DiT/sample_ddp.py): the paper writes CFG as
eps_c + s'(eps_c - eps_u), so beta = 1 / (1 + s') = 1 / s here, and its sampler feeds beta = 1 / cfg_scale. Where
this file differs: (1) the code draws beta ~ U(0, 1); here U(gft_beta_min, 1), 0.1 by default, because s = 1 / beta
is unbounded at 0 and the guidance embedding is built for s in [0, 10] (embeddings.GUIDANCE_EMBED_SCALE);
(2) the code's stop-gradient pass is the online network in eval mode at the null label with beta = 1; here the
same, but at guidance s = 0, where embeddings.Conditioning drops the label entirely, so pipe(labels, 0) is exactly
the unconditional model, as for a CFG teacher and a guided student; (3) the code's dropped rows keep the formula
(same value as the plain unconditional loss, gradient scaled by beta); here they take the plain loss, weight 1.
Between s = 0 and 1 the model is not trained (the label fades in there, see embeddings.Conditioning).

MG (Tang et al. 2025, "Diffusion Models without Classifier-free Guidance", Sec. 3, the MG objective). The
regression target carries the model's own CFG direction, from its EMA weights, under a stop-gradient:

    target' = target + (w - 1) sg[ema(x_t, t, y) - ema(x_t, t, null)],     L = E || model(x_t, t, y) - target' ||^2

(the paper writes w for our w - 1). Checked against the authors' train.py (github.com/tzco/Diffusion-wo-CFG, read
via its fork Peterande/Diffusion-wo-CFG): the term comes from the EMA model under no_grad; 10% of each batch takes
the null label and the plain target; the target is plain until a start step (100k there, a share of the train
steps here: `mg_start`); the term is added only where t < 0.75 (on SiT's t, 1 = noise: `mg_t_max`); w = 1.45.
If the model reaches its target, pred_c = u + (E[target | c] - u) / (2 - w): CFG at s = 1 / (2 - w) of the data's
own conditional (1.82 at w = 1.45), which has no fixed point for w >= 2; hence w in [1, 2). An MG model is a
plain conditional model (no guidance input): its own setting is s = 1, one pass per step. Sampled at s > 1,
CFG (two passes) stacks on the guidance trained in: it works, as the null label is trained, but it is not MG.

Every rule here is linear in the network's output with weights that sum to one (GFT) or adds a difference of
two outputs (MG), and eps, v and the flow velocity are affine in one another at a fixed x_t, so both are the
same guidance whatever the teacher predicts; the formulation is the teacher's, through train.training_point.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .guidance import per_sample
from .loop import LossFn
from .schedulers import DDPMScheduler, FlowMatchEulerScheduler
from .train import TeacherConfig, diffusion_loss, training_point

OBJECTIVES = ("diffusion", "gft", "mg")  # TeacherConfig.objective
SETTINGS = {"gft": ("gft_beta_min",), "mg": ("mg_scale", "mg_start", "mg_t_max")}  # each objective's own fields


def drop_labels(y: torch.Tensor, p_uncond: float, null_class: int) -> torch.Tensor:
    """(B,) -> (B,): each label replaced by the null label with probability p_uncond, drawn here (the model itself
    drops none: a GFT or MG loss must know which rows are unconditional). The same draw as the LabelEmbedder's."""
    drop = torch.rand(y.shape, device=y.device) < p_uncond  # (B,)
    return torch.where(drop, torch.full_like(y, null_class), y)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """`module` in eval mode (no dropout) inside the block, its own mode again after it."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


# ---- GFT ----------------------------------------------------------------------------------------------------


def gft_prediction(
    model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, beta: torch.Tensor, null_class: int
) -> torch.Tensor:
    """The conditional prediction (B, C, H, W) GFT fits to the target: beta model(x_t, t, y, 1/beta) + (1 - beta)
    sg[model(x_t, t, null, 0)], beta (B,) in (0, 1]. A row with the null label is model(x_t, t, null, 0) itself."""
    uncond = y == null_class  # (B,) rows that train the unconditional model
    with torch.no_grad(), eval_mode(model):
        pred_u = model(x_t, t, torch.full_like(y, null_class), guidance=torch.zeros_like(beta))  # (B, C, H, W)
    s = torch.where(uncond, torch.zeros_like(beta), 1 / beta)  # (B,) the guidance input
    pred_s = model(x_t, t, y, guidance=s)  # (B, C, H, W) the network: what sampling at s runs
    b = per_sample(torch.where(uncond, torch.ones_like(beta), beta), pred_s)  # (B, 1, 1, 1)
    return b * pred_s + (1 - b) * pred_u


def gft_loss(
    scheduler: DDPMScheduler | FlowMatchEulerScheduler,
    timestep_sampling: str = "uniform",
    *,
    null_class: int,
    p_uncond: float = 0.1,
    beta_min: float = 0.1,
) -> LossFn:
    """GFT's loss (module docstring): the MSE between `gft_prediction` and the scheduler's target (eps, v or the
    flow velocity) at (t, x_t) drawn as train.training_point does, beta ~ U(beta_min, 1), labels dropped with
    p_uncond. `model` has a guidance input and may be wrapped in DDP."""

    def loss_fn(model: nn.Module, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t, x_t, target = training_point(scheduler, x0, timestep_sampling)  # (B,), (B, C, H, W) x 2
        y = drop_labels(y, p_uncond, null_class)  # (B,)
        beta = beta_min + (1 - beta_min) * torch.rand(x0.shape[0], device=x0.device)  # (B,)
        return F.mse_loss(gft_prediction(model, x_t, t, y, beta, null_class).float(), target.float())

    return loss_fn


# ---- MG -----------------------------------------------------------------------------------------------------


def mg_target(
    guide: nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor,
    w: torch.Tensor,
    null_class: int,
) -> torch.Tensor:
    """target + (w - 1) sg[guide(x_t, t, y) - guide(x_t, t, null)] (B, C, H, W), w (B,) per row; a row with the
    null label, or with w = 1, keeps its target exactly. Both passes of `guide` in one forward, without gradients."""
    w = torch.where(y == null_class, torch.ones_like(w), w)  # (B,)
    with torch.no_grad():
        null = torch.full_like(y, null_class)  # (B,)
        pred_c, pred_u = guide(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
    return target + per_sample(w - 1, target) * (pred_c - pred_u).to(target.dtype)  # (B, C, H, W)


class ModelGuidanceLoss:
    """MG's loss (module docstring), a loop.LossFn: the MSE between model(x_t, t, y_dropped) and `mg_target`.

    The guidance term comes from `guide` where one is given (the online model, say, in a test), else from the
    run's EMA weights: loop.fit hands the loss its Run through `bind_run` before the first train step (the hook
    loop.py documents), which also says which train step this is, so the term starts at `start` x the run's train
    steps. Before that, and for w = 1, this is the plain loss with the labels dropped here."""

    def __init__(
        self,
        scheduler: DDPMScheduler | FlowMatchEulerScheduler,
        timestep_sampling: str = "uniform",
        *,
        null_class: int,
        p_uncond: float = 0.1,
        scale: float = 1.45,
        start: float = 0.0,
        t_max: float = 1.0,
        guide: nn.Module | None = None,
    ):
        self.scheduler, self.timestep_sampling, self.null_class, self.p_uncond = (
            scheduler, timestep_sampling, null_class, p_uncond)  # fmt: skip
        self.scale, self.start, self.t_max, self.guide = scale, start, t_max, guide
        self.run: Any = None  # loop.Run, once bound

    def bind_run(self, run: Any) -> None:
        """loop.fit's hook: the run whose EMA weights give the guidance term and whose train step starts it."""
        self.run = run

    def guide_model(self) -> nn.Module | None:
        """The network of the guidance term at this train step, or None while the target is still plain."""
        if self.guide is not None:
            return self.guide
        if self.run is None:
            raise RuntimeError("ModelGuidanceLoss needs the run's EMA weights: train it through loop.fit, which "
                               "calls bind_run, or pass guide=")  # fmt: skip
        return self.run.ema if self.run.train_step >= self.start * self.run.max_train_steps else None

    def __call__(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t, x_t, target = training_point(self.scheduler, x0, self.timestep_sampling)  # (B,), (B, C, H, W) x 2
        y = drop_labels(y, self.p_uncond, self.null_class)  # (B,)
        guide = self.guide_model()
        if guide is not None and self.scale != 1:
            inside = t < self.t_max * self.scheduler.num_train_timesteps  # (B,) the rows that get the term
            w = torch.where(inside, self.scale, 1.0)  # (B,) float
            target = mg_target(guide, x_t, t, y, target, w, self.null_class)  # (B, C, H, W)
        return F.mse_loss(model(x_t, t, y).float(), target.float())


# ---- the objective a TeacherConfig names -------------------------------------------------------------------


# Each objective's own settings: the rule its value must satisfy, and the rule in words.
SETTING_RULES = {
    "gft_beta_min": (lambda v: 0 < v <= 1, "0 < gft_beta_min <= 1 (the model learns s = 1 / beta up to 1 / it)"),
    "mg_scale": (lambda v: 1 <= v < 2, "1 <= mg_scale < 2 (CFG at s = 1 / (2 - w) at the fixed point, none at w >= 2)"),
    "mg_start": (lambda v: 0 <= v < 1, "0 <= mg_start < 1 (a share of the train steps)"),
    "mg_t_max": (lambda v: 0 < v <= 1, "0 < mg_t_max <= 1 (a share of the timesteps)"),
}


def check_objective(cfg: TeacherConfig) -> None:
    """cfg.objective one of OBJECTIVES and its settings in range, or a UserError naming what is not; a setting of
    another objective changed from its default is an error too (it would be silently ignored)."""
    if cfg.objective not in OBJECTIVES:
        raise UserError(f"unknown objective {cfg.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    defaults = TeacherConfig()
    for objective, names in SETTINGS.items():
        for name in names:
            value = getattr(cfg, name)
            if objective != cfg.objective and value != getattr(defaults, name):
                raise UserError(f"{name} is a setting of the {objective} objective, but this run trains with "
                                f"objective {cfg.objective!r}; leave it out or pass that objective")  # fmt: skip
            fits, rule = SETTING_RULES[name]
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if objective == cfg.objective and not (number and fits(value)):
                raise UserError(f"{name} must satisfy {rule}, got {value!r}")
    if cfg.objective != "diffusion" and not cfg.p_uncond > 0:
        raise UserError(f"objective {cfg.objective!r} needs the unconditional model: p_uncond must be > 0")


def has_guidance_input(cfg: TeacherConfig) -> bool:
    """Whether the objective's model has a guidance input (GFT), so it samples at any s in one pass."""
    return cfg.objective == "gft"


def objective_model_settings(cfg: TeacherConfig) -> dict[str, Any]:
    """The settings build_model takes from the objective: GFT's network has a guidance input, and GFT and MG drop
    labels in the loss (which must know the rows), so their models drop none themselves."""
    if cfg.objective == "diffusion":
        return dict(p_uncond=cfg.p_uncond)
    return dict(p_uncond=0.0, guidance_embed=has_guidance_input(cfg))


def objective_metadata(cfg: TeacherConfig) -> dict[str, Any]:
    """What a checkpoint adds for its objective: a GFT model's trained scales (s = 0, and 1 to 1 / beta_min), so
    sampling beyond them warns as it does for a student."""
    return dict(guidance_range=[0.0, 1 / cfg.gft_beta_min]) if has_guidance_input(cfg) else {}


def objective_loss(cfg: TeacherConfig, scheduler: DDPMScheduler | FlowMatchEulerScheduler, null_class: int) -> LossFn:
    """The loss cfg.objective names, for cfg's formulation (the scheduler's prediction_type) and timestep_sampling;
    'diffusion' is train.diffusion_loss itself."""
    if cfg.objective == "gft":
        return gft_loss(scheduler, cfg.timestep_sampling, null_class=null_class, p_uncond=cfg.p_uncond,
                        beta_min=cfg.gft_beta_min)  # fmt: skip
    if cfg.objective == "mg":
        return ModelGuidanceLoss(scheduler, cfg.timestep_sampling, null_class=null_class, p_uncond=cfg.p_uncond,
                                 scale=cfg.mg_scale, start=cfg.mg_start, t_max=cfg.mg_t_max)  # fmt: skip
    return diffusion_loss(scheduler, cfg.timestep_sampling, cfg.min_snr_gamma)

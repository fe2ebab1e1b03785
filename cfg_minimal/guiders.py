"""Guidance rules beyond plain CFG: one small class each, behind guidance.Guider's interface.

Plain CFG (guidance.CFG) is eps = eps_u + s (eps_c - eps_u). The rules here keep the same two passes
and the same s (s = 1 is the conditional model, larger s guides more) and change the combination
(written for eps; each is applied to the network's output, eps or v, as diffusers' guiders are):

| method          | paper                          | eps (per sample; D = eps_c - eps_u)                           |
|-----------------|--------------------------------|---------------------------------------------------------------|
| `apg`           | Sadat et al. 2025 (ICLR)       | eps_c + (s - 1) (D_orth + eta D_par), D with momentum beta    |
|                 |                                | and rescaled to norm <= r; D_par: the part along eps_c        |
| `cfg-zero-star` | Fan et al. 2025                | a eps_u + s (eps_c - a eps_u), a = <eps_c, eps_u> / |eps_u|^2; |
|                 |                                | eps = 0 at the first K sampling steps ("zero-init")           |
| `tcfg`          | Kwon et al. 2025               | CFG with eps_u projected on the first right-singular vector   |
|                 |                                | of the 2-row matrix [eps_c; eps_u]                            |
| `autoguidance`  | Karras et al. 2024 (NeurIPS)   | eps_w + s (eps_c - eps_w), eps_w from a weaker model, same y  |

CFG++ (Chung et al. 2025, ICLR: the guided eps predicts x_0, the DDIM step re-noises with eps_u) changes
the sampler, not the combination: it is the sampler `ddim-cfg++` (schedulers.DDIMCFGPPScheduler), with
any rule. Guidance-weight schedules (Wang et al. 2024, TMLR) vary s over t and combine with any rule and
with a distilled student: `scheduled_scale`.

Each rule equals plain CFG at its neutral setting (APG: eta = 1, r = 0, beta = 0; CFG-Zero* without the
optimised scale and zero-init; a constant schedule), exactly: tests/test_guiders.py checks that, parity
with diffusers' guiders, and that every rule acts per sample.

State across sampling steps (APG's momentum, CFG-Zero*'s step count) is explicit: the sampler carries
one `GuiderState` through a sampling run; the distillation target starts a fresh one at every step, so
only a rule whose output does not depend on earlier steps is `distillable`.

Not here, and why (diffusers has them). Perturbed-attention guidance (Ahn et al. 2024), skip-layer
guidance and smoothed-energy guidance (Hong 2024) make the guiding pass from a perturbed network: the
self-attention map replaced by the identity, transformer blocks skipped, attention weights blurred.
The default 0.9M-parameter UNet has one self-attention layer, over the 7x7 (MNIST) or 4x4 (digits)
positions of its lowest resolution, and unet-tiny none, so there is little to perturb; they target
unconditional or text models where no cheap null-label pass exists, while a class-conditional model
has one (autoguidance, with a weaker checkpoint, is the perturbed-network idea that does fit).
Frequency-decoupled guidance (Sadat et al. 2025) guides each band of a Laplacian pyramid of eps with
its own scale; on 16x16 or 28x28 single-channel digits the pyramid has two or three bands and each
adds a scale to sweep. Either would be one more class here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from .errors import UserError
from .guidance import Guider, GuiderState, cfg_combine, per_sample
from .models import DiffusionModel

SCHEDULES = ("constant", "linear", "cosine")


def project(v: torch.Tensor, onto: torch.Tensor) -> torch.Tensor:
    """The part of v (B, C, H, W) parallel to `onto`, per sample: <v, u> u with u = onto / ||onto||."""
    u = F.normalize(onto.flatten(1), dim=1)  # (B, C*H*W)
    return ((v.flatten(1) * u).sum(dim=1, keepdim=True) * u).view_as(v)  # (B, C, H, W)


def apg(
    eps_u: torch.Tensor,
    eps_c: torch.Tensor,
    s: float | torch.Tensor,
    eta: float = 1.0,
    norm_threshold: float = 0.0,
    momentum: float = 0.0,
    state: GuiderState | None = None,
) -> torch.Tensor:
    """Adaptive projected guidance (Sadat et al. 2025, "Eliminating Oversaturation and Artifacts of High
    Guidance Scales in Diffusion Models"; the rule of diffusers' AdaptiveProjectedGuidance), per sample:

        D      = eps_c - eps_u                       the CFG update
        D      <- D + beta D_prev                    momentum beta (the paper's "reverse momentum": beta < 0)
        D      <- D min(1, r / ||D||)                norm threshold r (0: off)
        D_par  = <D, eps_c> / ||eps_c||^2 eps_c,   D_orth = D - D_par
        eps    = eps_c + (s - 1) (D_orth + eta D_par)

    eta = 1, r = 0, beta = 0 is plain CFG; the parallel part is what over-saturates, so eta = 0 is the
    paper's choice. Written as CFG plus (s - 1) times APG's change to D, so the neutral setting is CFG to
    the last bit. Applied to the network's output, as diffusers' guider does. Momentum lives in `state`."""
    diff = eps_c - eps_u  # (B, C, H, W)
    update = diff
    if momentum != 0:
        previous = state.values.get("momentum")
        update = diff if previous is None else diff + momentum * previous
        state.values["momentum"] = update
    if norm_threshold > 0:
        norm = update.flatten(1).norm(dim=1).view(-1, *([1] * (diff.ndim - 1)))  # (B, 1, 1, 1)
        update = update * (norm_threshold / norm).clamp(max=1.0)
    if eta != 1:
        update = update - (1 - eta) * project(update, eps_c)  # D_orth + eta D_par
    s = per_sample(s, eps_c)
    return cfg_combine(eps_u, eps_c, s) + (s - 1) * (update - diff)


def zero_star_scale(eps_u: torch.Tensor, eps_c: torch.Tensor) -> torch.Tensor:
    """CFG-Zero*'s optimised scale (Fan et al. 2025): a* = <eps_c, eps_u> / ||eps_u||^2 per sample,
    the a that brings a eps_u closest to eps_c -> (B, 1, 1, 1), summed in float32 (bf16 would round the
    sums of C*H*W products). 1e-8 keeps a skipped (zero) eps_u finite."""
    u, c = eps_u.flatten(1).float(), eps_c.flatten(1).float()  # (B, C*H*W)
    a = (c * u).sum(dim=1) / (u.pow(2).sum(dim=1) + 1e-8)  # (B,)
    return per_sample(a.to(eps_u.dtype), eps_u)


def cfg_zero_star(eps_u: torch.Tensor, eps_c: torch.Tensor, s: float | torch.Tensor) -> torch.Tensor:
    """CFG-Zero* without its zero-init (Fan et al. 2025, "CFG-Zero*: Improved Classifier-Free Guidance for
    Flow Matching Models"; diffusers' ClassifierFreeZeroStarGuidance):
        eps = a* eps_u + s (eps_c - a* eps_u),   a* from `zero_star_scale`."""
    return cfg_combine(zero_star_scale(eps_u, eps_c) * eps_u, eps_c, s)


def tangential_cfg(eps_u: torch.Tensor, eps_c: torch.Tensor, s: float | torch.Tensor) -> torch.Tensor:
    """Tangential CFG (Kwon et al. 2025, "TCFG: Tangential Damping Classifier-free Guidance"), the
    rule of diffusers' TangentialClassifierFreeGuidance: per sample, v1 is the first right-singular vector
    of the 2 x (C*H*W) matrix [eps_c; eps_u] (the direction the two share most), eps_u is replaced by its
    projection <eps_u, v1> v1 (its tangential part is dropped), and then CFG:
        eps = eps_u' + s (eps_c - eps_u'),   eps_u' = <eps_u, v1> v1."""
    pair = torch.stack([eps_c.flatten(1), eps_u.flatten(1)], dim=1).float()  # (B, 2, C*H*W)
    v1 = torch.linalg.svd(pair, full_matrices=False).Vh[:, 0]  # (B, C*H*W), its sign cancels below
    eps_u_proj = ((eps_u.flatten(1).float() * v1).sum(dim=1, keepdim=True) * v1).view_as(eps_u).to(eps_u.dtype)
    return cfg_combine(eps_u_proj, eps_c, per_sample(s, eps_c))


def scheduled_scale(scale: torch.Tensor, t: torch.Tensor, num_train_timesteps: int, schedule: str) -> torch.Tensor:
    """Guidance-weight schedules (Wang et al. 2024, "Analysis of Classifier-Free Guidance Weight
    Schedulers", its heuristic increasing schedules): for s > 1 the guidance weight w = s - 1 ramps with
    the sampling progress u = 1 - t / T (0 at pure noise, 1 at the data), keeping its mean over t:
        constant  s_t = s
        linear    s_t = 1 + (s - 1) 2 u
        cosine    s_t = 1 + (s - 1) (1 - cos(pi u))
    so the first steps are nearly conditional and the last ones guided about twice as hard. A scale in
    [0, 1] (between the unconditional and the conditional model: nothing to ramp) stays constant, so s = 0
    is exactly unconditional and s = 1 exactly conditional under every schedule. scale (B,), t (B,) -> (B,)."""
    if schedule == "constant":
        return scale
    u = 1.0 - t.to(scale.dtype) / num_train_timesteps  # (B,) sampling progress
    if schedule == "linear":
        ramp = 2 * u
    elif schedule == "cosine":
        ramp = 1 - torch.cos(math.pi * u)
    else:
        raise UserError(f"unknown guidance schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    return torch.where(scale > 1, 1 + (scale - 1) * ramp, scale)  # (B,)


def scheduled_range(scale_min: float, scale_max: float, schedule: str) -> tuple[float, float]:
    """The range s_t covers over a run for s in [scale_min, scale_max]: a ramp reaches 1 + 2 (s - 1)."""
    if schedule == "constant":
        return scale_min, scale_max
    return min(scale_min, 1.0), max(scale_max, 1 + 2 * (scale_max - 1))


@dataclass(frozen=True, eq=False)
class APG(Guider):
    """Adaptive projected guidance (`apg`): eta = 1, r = 0, beta = 0 is plain CFG; the paper uses eta = 0."""

    name: ClassVar[str] = "apg"
    eta: float = 1.0  # weight of the parallel part
    norm_threshold: float = 0.0  # r, 0 is off
    momentum: float = 0.0  # beta (the paper: -0.5 ... -0.75); carries state across sampling steps

    def __post_init__(self):
        super().__post_init__()
        if not self.norm_threshold >= 0:
            raise UserError(f"APG's norm_threshold must be >= 0 (0 is off), got {self.norm_threshold}")
        if not -1 < self.momentum < 1:
            raise UserError(f"APG's momentum beta must lie in (-1, 1) (the paper: -0.5 ... -0.75), got "
                            f"{self.momentum}: |beta| >= 1 lets the running average grow without bound")  # fmt: skip

    @property
    def distillable(self) -> bool:
        return self.momentum == 0

    def passes(self, s: torch.Tensor, state: GuiderState) -> tuple[torch.Tensor, torch.Tensor]:
        need_c, need_g = super().passes(s, state)
        return need_c, (need_g if self.momentum == 0 else torch.ones_like(need_g))  # momentum accumulates at s = 1

    def combine(self, pred_g: torch.Tensor, pred_c: torch.Tensor, s: torch.Tensor, state: GuiderState) -> torch.Tensor:
        return apg(pred_g, pred_c, s, self.eta, self.norm_threshold, self.momentum, state)


@dataclass(frozen=True, eq=False)
class CFGZeroStar(Guider):
    """CFG-Zero* (`cfg-zero-star`): the optimised scale a*, and a zero prediction at the first `zero_init_steps`
    sampling steps (the network is not run there)."""

    name: ClassVar[str] = "cfg-zero-star"
    optimized_scale: bool = True  # use a*; False leaves only the zero-init
    zero_init_steps: int = 0  # K

    def __post_init__(self):
        super().__post_init__()
        if self.zero_init_steps < 0:
            raise UserError(f"zero_init_steps must be >= 0, got {self.zero_init_steps}")

    def check_run(self, num_steps: int) -> None:
        if self.zero_init_steps >= num_steps:
            raise UserError(f"CFG-Zero*'s zero_init_steps ({self.zero_init_steps}) must be below the {num_steps} "
                            "sampling steps, or every step predicts zero: one image for every label")  # fmt: skip

    @property
    def distillable(self) -> bool:
        return self.zero_init_steps == 0

    def passes(self, s: torch.Tensor, state: GuiderState) -> tuple[torch.Tensor, torch.Tensor]:
        if state.step < self.zero_init_steps:
            return torch.zeros_like(s, dtype=torch.bool), torch.zeros_like(s, dtype=torch.bool)
        return super().passes(s, state)

    def combine(self, pred_g: torch.Tensor, pred_c: torch.Tensor, s: torch.Tensor, state: GuiderState) -> torch.Tensor:
        if state.step < self.zero_init_steps:
            return torch.zeros_like(pred_c)
        return cfg_zero_star(pred_g, pred_c, s) if self.optimized_scale else cfg_combine(pred_g, pred_c, s)


@dataclass(frozen=True, eq=False)
class TangentialCFG(Guider):
    """Tangential CFG (`tcfg`): CFG with pred_u projected on the first right-singular vector of [pred_c; pred_u]."""

    name: ClassVar[str] = "tcfg"

    def combine(self, pred_g: torch.Tensor, pred_c: torch.Tensor, s: torch.Tensor, state: GuiderState) -> torch.Tensor:
        return tangential_cfg(pred_g, pred_c, s)


@dataclass(frozen=True, eq=False)
class Autoguidance(Guider):
    """Autoguidance (`autoguidance`; Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"):
        eps = eps_w + s (eps_c - eps_w),   eps_w = guide_model(x, t, y),
    a weaker model (fewer train steps or parameters) at the same label in place of the unconditional pass."""

    name: ClassVar[str] = "autoguidance"
    needs_guide_model: ClassVar[bool] = True
    guide_model: DiffusionModel | None = field(default=None, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.guide_model, DiffusionModel):
            raise UserError("autoguidance needs a weaker guiding model (--guide-ckpt)")

    def guide_labels(self, y: torch.Tensor, null_class: int) -> torch.Tensor:
        return y  # the weaker model sees the same class

    def guiding_model(self, model: DiffusionModel) -> DiffusionModel:
        return self.guide_model

    def combine(self, pred_g: torch.Tensor, pred_c: torch.Tensor, s: torch.Tensor, state: GuiderState) -> torch.Tensor:
        return cfg_combine(pred_g, pred_c, s)

"""Guidance rules beyond plain CFG: each turns one sampling step's two predictions into the guided eps.

Plain CFG (guidance.cfg_combine) is eps = eps_u + s (eps_c - eps_u). The rules here keep the same two
passes and the same s (s = 1 is the conditional model, larger s guides more) and change the combination:

| method          | paper                          | eps (per sample; D = eps_c - eps_u)                           |
|-----------------|--------------------------------|---------------------------------------------------------------|
| `apg`           | Sadat et al. 2025 (ICLR)       | eps_c + (s - 1) (D_orth + eta D_par), D with momentum beta    |
|                 |                                | and rescaled to norm <= r; D_par: the part along eps_c        |
| `cfg-zero-star` | Fan et al. 2025                | a eps_u + s (eps_c - a eps_u), a = <eps_c, eps_u> / |eps_u|^2; |
|                 |                                | eps = 0 at the first K sampling steps ("zero-init")           |
| `cfg++`         | Chung et al. 2025 (ICLR)       | CFG's eps predicts x_0; the DDIM step re-noises with eps_u    |
| `tcfg`          | Kwon et al. 2025               | CFG with eps_u projected on the first right-singular vector   |
|                 |                                | of the 2-row matrix [eps_c; eps_u]                            |
| `autoguidance`  | Karras et al. 2024 (NeurIPS)   | eps_w + s (eps_c - eps_w), eps_w from a weaker model, same y  |

Guidance-weight schedules (Wang et al. 2024, TMLR) vary s over t and combine with any rule and with
a distilled student: `scheduled_scale`.

Each rule equals plain CFG at its neutral setting (APG: eta = 1, r = 0, beta = 0; CFG-Zero* without the
optimised scale and zero-init; a constant schedule), exactly: tests/test_guiders.py checks that, parity
with diffusers' guiders, and that every rule acts per sample.

State across sampling steps (APG's momentum, CFG-Zero*'s step count) is explicit: the sampler carries
one `GuiderState` through a sampling run; `state=None` means stateless use (the distillation target).

Not here, and why (diffusers has them). Perturbed-attention guidance (Ahn et al. 2024), skip-layer
guidance and smoothed-energy guidance (Hong 2024) make the guiding pass from a perturbed network: the
self-attention map replaced by the identity, transformer blocks skipped, attention weights blurred.
The default 0.9M-parameter UNet has one self-attention layer, over the 7x7 (MNIST) or 4x4 (digits)
positions of its lowest resolution, and unet-tiny none, so there is little to perturb; they target
unconditional or text models where no cheap null-label pass exists, while a class-conditional model
has one (autoguidance, with a weaker checkpoint, is the perturbed-network idea that does fit).
Frequency-decoupled guidance (Sadat et al. 2025) guides each band of a Laplacian pyramid of eps with
its own scale; on 16x16 or 28x28 single-channel digits the pyramid has two or three bands and each
adds a scale to sweep. Either would be another method of `Guider.combine`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from .errors import UserError
from .guidance import as_scale_tensor, cfg_combine, interval_scale, noise_preds
from .models import DiffusionModel

GUIDERS = ("cfg", "apg", "cfg-zero-star", "cfg++", "tcfg", "autoguidance")
SCHEDULES = ("constant", "linear", "cosine")
# Which Guider settings each method reads; any other is a user's mistake.
METHOD_SETTINGS = {"cfg": (), "apg": ("eta", "norm_threshold", "momentum"),
                   "cfg-zero-star": ("optimized_scale", "zero_init_steps"), "cfg++": (), "tcfg": (),
                   "autoguidance": ()}  # fmt: skip
SETTINGS = {name for names in METHOD_SETTINGS.values() for name in names}
# Rules that are functions of (x, t, y, s) alone, so a student can learn them (distill.py).
DISTILLABLE = ("cfg", "apg", "cfg-zero-star", "tcfg")


def _per_sample(s: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A (B,) scale -> (B, 1, 1, 1), to broadcast against `like` (B, C, H, W); a float stays a float."""
    return s.view(-1, *([1] * (like.ndim - 1))) if isinstance(s, torch.Tensor) and s.ndim == 1 else s


def project(v: torch.Tensor, onto: torch.Tensor) -> torch.Tensor:
    """The part of v (B, C, H, W) parallel to `onto`, per sample: <v, u> u with u = onto / ||onto||."""
    u = F.normalize(onto.flatten(1), dim=1)  # (B, C*H*W)
    return ((v.flatten(1) * u).sum(dim=1, keepdim=True) * u).view_as(v)  # (B, C, H, W)


@dataclass
class GuiderState:
    """What a guider carries from one sampling step to the next, for one sampling run."""

    step: int = 0  # sampling steps done so far
    momentum: torch.Tensor | None = None  # APG's running average of the guidance difference, (B, C, H, W)


@dataclass
class GuidedEps:
    """One sampling step's guided prediction: `eps` predicts x_0; the step re-noises with `renoise_eps`
    (None: with eps itself, as every sampler does; CFG++: with eps_u)."""

    eps: torch.Tensor  # (B, C, H, W)
    renoise_eps: torch.Tensor | None = None  # (B, C, H, W)


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
    the last bit. Applied to eps, the network's output, as diffusers' guider does. Momentum needs `state`."""
    diff = eps_c - eps_u  # (B, C, H, W)
    update = diff
    if momentum != 0:
        if state is None:
            raise UserError("APG's momentum carries state across sampling steps; pass a GuiderState (or momentum=0)")
        update = diff if state.momentum is None else diff + momentum * state.momentum
        state.momentum = update
    if norm_threshold > 0:
        norm = update.flatten(1).norm(dim=1).view(-1, *([1] * (diff.ndim - 1)))  # (B, 1, 1, 1)
        update = update * (norm_threshold / norm).clamp(max=1.0)
    if eta != 1:
        update = update - (1 - eta) * project(update, eps_c)  # D_orth + eta D_par
    s = _per_sample(s, eps_c)
    return cfg_combine(eps_u, eps_c, s) + (s - 1) * (update - diff)


def zero_star_scale(eps_u: torch.Tensor, eps_c: torch.Tensor) -> torch.Tensor:
    """CFG-Zero*'s optimised scale (Fan et al. 2025): a* = <eps_c, eps_u> / ||eps_u||^2 per sample,
    the a that brings a eps_u closest to eps_c -> (B, 1, 1, 1). 1e-8 keeps a skipped (zero) eps_u finite."""
    dot = (eps_c.flatten(1) * eps_u.flatten(1)).sum(dim=1)  # (B,)
    a = dot / (eps_u.flatten(1).pow(2).sum(dim=1) + 1e-8)  # (B,)
    return a.view(-1, *([1] * (eps_u.ndim - 1)))


def cfg_zero_star(eps_u: torch.Tensor, eps_c: torch.Tensor, s: float | torch.Tensor) -> torch.Tensor:
    """CFG-Zero* without its zero-init (Fan et al. 2025, "CFG-Zero*: Improved Classifier-Free Guidance for
    Flow Matching Models"; diffusers' ClassifierFreeZeroStarGuidance):
        eps = a* eps_u + s (eps_c - a* eps_u),   a* from `zero_star_scale`."""
    return cfg_combine(zero_star_scale(eps_u, eps_c) * eps_u, eps_c, _per_sample(s, eps_c))


def tangential_cfg(eps_u: torch.Tensor, eps_c: torch.Tensor, s: float | torch.Tensor) -> torch.Tensor:
    """Tangential CFG (Kwon et al. 2025, "TCFG: Tangential Damping Classifier-free Guidance"), the
    rule of diffusers' TangentialClassifierFreeGuidance: per sample, v1 is the first right-singular vector
    of the 2 x (C*H*W) matrix [eps_c; eps_u] (the direction the two share most), eps_u is replaced by its
    projection <eps_u, v1> v1 (its tangential part is dropped), and then CFG:
        eps = eps_u' + s (eps_c - eps_u'),   eps_u' = <eps_u, v1> v1."""
    pair = torch.stack([eps_c.flatten(1), eps_u.flatten(1)], dim=1).float()  # (B, 2, C*H*W)
    v1 = torch.linalg.svd(pair, full_matrices=False).Vh[:, 0]  # (B, C*H*W), its sign cancels below
    eps_u_proj = ((eps_u.flatten(1).float() * v1).sum(dim=1, keepdim=True) * v1).view_as(eps_u).to(eps_u.dtype)
    return cfg_combine(eps_u_proj, eps_c, _per_sample(s, eps_c))


def scheduled_scale(scale: torch.Tensor, t: torch.Tensor, num_train_timesteps: int, schedule: str) -> torch.Tensor:
    """Guidance-weight schedules (Wang et al. 2024, "Analysis of Classifier-Free Guidance Weight
    Schedulers", its heuristic increasing schedules): the guidance weight w = s - 1 ramps with
    the sampling progress u = 1 - t / T (0 at pure noise, 1 at the data), keeping its mean over t:
        constant  s_t = s
        linear    s_t = 1 + (s - 1) 2 u
        cosine    s_t = 1 + (s - 1) (1 - cos(pi u))
    so the first steps are nearly conditional and the last ones guided about twice as hard. scale (B,),
    t (B,) -> (B,)."""
    if schedule == "constant":
        return scale
    u = 1.0 - t.to(scale.dtype) / num_train_timesteps  # (B,) sampling progress
    if schedule == "linear":
        ramp = 2 * u
    elif schedule == "cosine":
        ramp = 1 - torch.cos(math.pi * u)
    else:
        raise UserError(f"unknown guidance schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    return 1 + (scale - 1) * ramp  # (B,)


@dataclass(frozen=True, eq=False)
class Guider:
    """A guidance rule and its settings (see the table at the top); `guider_from_spec` builds one from text.

    Every setting's default is its neutral value, so Guider("apg") is plain CFG until eta, r or beta move."""

    method: str = "cfg"  # one of GUIDERS
    eta: float = 1.0  # apg: weight of the parallel part (the paper: 0)
    norm_threshold: float = 0.0  # apg: r, 0 is off
    momentum: float = 0.0  # apg: beta (the paper: -0.5 ... -0.75)
    optimized_scale: bool = True  # cfg-zero-star: use a*; False leaves only the zero-init
    zero_init_steps: int = 0  # cfg-zero-star: K, the first K sampling steps predict eps = 0
    guide_model: DiffusionModel | None = field(default=None, repr=False)  # autoguidance: the weaker model

    def __post_init__(self):
        if self.method not in GUIDERS:
            raise UserError(f"unknown guider {self.method!r}; choose one of {', '.join(GUIDERS)}")
        if (self.method == "autoguidance") != (self.guide_model is not None):
            raise UserError("autoguidance needs a weaker guiding model (--guide-ckpt), and only autoguidance takes one")
        if not (math.isfinite(self.eta) and math.isfinite(self.momentum) and self.norm_threshold >= 0):
            raise UserError("APG needs a finite eta and momentum and a norm_threshold >= 0 (0 is off)")
        if self.zero_init_steps < 0:
            raise UserError(f"zero_init_steps must be >= 0, got {self.zero_init_steps}")
        own = METHOD_SETTINGS[self.method]
        wrong = [f.name for f in fields(self) if f.name in SETTINGS and f.name not in own
                 and getattr(self, f.name) != f.default]  # fmt: skip
        if wrong:
            raise UserError(f"{self.method} has no setting {', '.join(wrong)}; its own: {', '.join(own) or 'none'}")

    @property
    def stateless(self) -> bool:
        """True when the rule is a function of the current step alone (no momentum, no zero-init)."""
        return self.momentum == 0 and self.zero_init_steps == 0

    def needs_guide_pass(self, s: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the rows whose result depends on the guiding pass. At s = 1 every rule here gives
        eps_c from a zero eps_g, except CFG++ (it re-noises with eps_u) and APG's momentum (it accumulates)."""
        if self.method == "cfg++" or self.momentum != 0:
            return torch.ones_like(s, dtype=torch.bool)
        return s != 1

    def combine(
        self, eps_g: torch.Tensor, eps_c: torch.Tensor, s: torch.Tensor, state: GuiderState | None = None
    ) -> GuidedEps:
        """The rule on one step's eps_g (eps_u, or the weaker model's eps), eps_c (B, C, H, W) and s (B,)."""
        if self.method == "apg":
            return GuidedEps(apg(eps_g, eps_c, s, self.eta, self.norm_threshold, self.momentum, state))
        if self.method == "cfg-zero-star" and self.optimized_scale:
            return GuidedEps(cfg_zero_star(eps_g, eps_c, s))
        if self.method == "tcfg":
            return GuidedEps(tangential_cfg(eps_g, eps_c, s))
        guided = cfg_combine(eps_g, eps_c, s)  # cfg, cfg++, autoguidance, cfg-zero-star without a*
        return GuidedEps(guided, renoise_eps=eps_g if self.method == "cfg++" else None)


def guide_noise_pred(
    model: DiffusionModel,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    scale: float | torch.Tensor,
    guider: Guider,
    state: GuiderState | None = None,
    batched: bool = True,
    negative_labels: torch.Tensor | None = None,
    interval: tuple[int, int] | None = None,
) -> GuidedEps:
    """`guided_noise_pred` with another rule: x (B, C, H, W), t (B,), y (B,), s a float or (B,) -> GuidedEps.

    One call is one sampling step: with a `state`, it advances state.step (and APG's momentum). The
    guiding pass is eps(x, t, null), eps(x, t, y_neg) with `negative_labels`, or the weaker model's
    eps_w(x, t, y) for autoguidance; `interval` guides only at lo <= t <= hi (s = 1 elsewhere).
    CFG-Zero*'s first `zero_init_steps` steps return eps = 0 without evaluating the network."""
    if model.is_student:
        raise UserError(
            f"the {guider.method} guider combines eps_u and eps_c, which a guidance-distilled student does not "
            "compute; sample its teacher, or distil the guider into a student (--distill-guider)"
        )
    if state is None and not guider.stateless:
        raise UserError(f"{guider.method} with momentum or zero-init carries state across steps; pass a GuiderState")
    step = state.step if state is not None else 0
    if state is not None:
        state.step += 1
    if guider.method == "cfg-zero-star" and step < guider.zero_init_steps:
        return GuidedEps(torch.zeros_like(x))
    s = as_scale_tensor(scale, x.shape[0], x.device)  # (B,)
    if interval is not None:
        s = interval_scale(s, t, interval)
    if guider.method == "autoguidance":
        if negative_labels is not None:
            raise UserError("autoguidance's guiding pass is the weaker model at the same label; it takes no negative")
        guide_labels = y  # the weaker model sees the same class
    else:
        guide_labels = torch.full_like(y, model.null_class) if negative_labels is None else negative_labels.to(y.device)
    need_cond = torch.ones_like(s, dtype=torch.bool)  # every rule here reads eps_c, even at s = 0
    eps_c, eps_g = noise_preds(model, x, t, y, guide_labels, need_cond, guider.needs_guide_pass(s), batched,
                               guider.guide_model)  # fmt: skip
    return guider.combine(eps_g, eps_c, s, state)


def guider_from_spec(spec: str, guide_model: DiffusionModel | None = None) -> Guider:
    """'apg:eta=0,norm_threshold=4,momentum=-0.5' -> Guider('apg', eta=0.0, ...); 'tcfg' -> Guider('tcfg').

    The settings a method reads are in METHOD_SETTINGS; anything else is a UserError naming them."""
    method, _, settings = spec.strip().partition(":")
    if method not in GUIDERS:
        raise UserError(f"unknown guider {method!r}; choose one of {', '.join(GUIDERS)}")
    types = {f.name: f.type for f in fields(Guider)}
    kwargs: dict = {}
    for item in filter(None, (part.strip() for part in settings.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in METHOD_SETTINGS[method]:
            allowed = ", ".join(METHOD_SETTINGS[method]) or "none"
            raise UserError(f"guider {method!r} takes the settings name=value with name one of: {allowed}; "
                            f"got {item!r}")  # fmt: skip
        kwargs[key] = _parse_setting(key, value.strip(), types[key])
    return Guider(method, guide_model=guide_model, **kwargs)


def _parse_setting(key: str, value: str, kind: str) -> float | int | bool:
    """One 'name=value' of a guider spec, as the field's type (given as text: 'float', 'int', 'bool')."""
    try:
        if kind == "bool":
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
        return int(value) if kind == "int" else float(value)
    except ValueError:
        raise UserError(f"guider setting {key} must be a {kind}, got {value!r}") from None

"""Classifier-free guidance (Ho & Salimans 2022) and the one interface every guidance rule follows.

    pred = pred_u + s * (pred_c - pred_u)        pred_u = model(x, t, null),  pred_c = model(x, t, y)

That is `cfg_combine`, and `CFG.combine` below is that (and an optional rescale). A rule is one small class
(`Guider`):
which passes it needs at the scale s (`passes`), the labels of its guiding pass (`guide_labels`), and
how it combines the two predictions at a step (`combine`, with a per-run `GuiderState`). The sampler
and the distillation target both call `guided_noise_pred`, so they cannot disagree. A new rule is a
subclass with a `name`, in any file: `guider_from_spec("name:setting=value")` finds it.

| thing                 | convention                                                                  |
|-----------------------|-----------------------------------------------------------------------------|
| guidance scale        | s, as in diffusers and DiT: s = 0 unconditional, s = 1 conditional, s > 1   |
|                       | guided. Ho & Salimans and Meng et al. write w = s - 1 (`w_to_s`, `s_to_w`)  |
| null label            | id `num_classes` (one extra embedding row)                                  |
| labels                | LongTensor (B,), values in [0, num_classes]                                 |
| timesteps             | integer t in [0, T), LongTensor (B,), the same in training and sampling     |
| images                | float (B, C, H, W) in [-1, 1]                                               |
| prediction            | the network's output, eps or v (`predictions.py`); every rule is applied to |
|                       | it as diffusers' guiders are                                                |
| student's scale input | the same s, embedded (sinusoid + zero-initialised MLP)                      |
"""

from __future__ import annotations

import math
import numbers
from dataclasses import MISSING, dataclass, field, fields
from typing import ClassVar

import torch

from .errors import UserError
from .models import DiffusionModel


def cfg_combine(pred_uncond: torch.Tensor, pred_cond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """pred = pred_u + s * (pred_c - pred_u)   (Ho & Salimans 2022, eq. 6 with w = s - 1); s a float or (B,)."""
    return pred_uncond + per_sample(scale, pred_cond) * (pred_cond - pred_uncond)


def per_sample(value: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A (B,) tensor -> (B, 1, 1, 1), to broadcast against `like` (B, C, H, W); a number stays a number."""
    if isinstance(value, torch.Tensor) and value.ndim == 1:
        return value.view(-1, *([1] * (like.ndim - 1)))  # (B, 1, 1, 1)
    return value


def w_to_s(w: float) -> float:
    """Ho & Salimans' / Meng et al.'s weight w (eps = (1 + w) eps_c - w eps_u) -> s = w + 1."""
    return w + 1.0


def s_to_w(s: float) -> float:
    """s (eps = eps_u + s (eps_c - eps_u)) -> w = s - 1."""
    return s - 1.0


GUIDERS: dict[str, type[Guider]] = {}  # spec name -> class; a subclass with a `name` adds itself
SETTING_KINDS = {bool: "bool", int: "whole number", float: "finite number", str: "text"}  # a setting's types


@dataclass
class GuiderState:
    """What a rule carries from one sampling step to the next, for one sampling run."""

    step: int = 0  # sampling steps done so far
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # a rule's own running values (APG's momentum)
    keep_guide_pass: bool = False  # run the guiding pass at every row, and keep it (a CFG++ sampler re-noises with it)
    guide_pred: torch.Tensor | None = None  # the last step's guiding pass (B, C, H, W), when kept


@dataclass(frozen=True, eq=False)
class Guider:
    """One guidance rule and its settings (fields with a number, bool or text default; a spec sets them). Each
    rule says whether a student can learn it (`distillable`) and whether it runs a second network
    (`needs_guide_model`)."""

    name: ClassVar[str] = ""
    needs_guide_model: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):  # its own name: a subclass of CFG without one does not replace "cfg"
            GUIDERS[cls.name] = cls

    def __post_init__(self):
        """Each setting of the type of its default (a float finite), or a UserError naming it; a subclass
        that checks more calls this first."""
        for f in settings(type(self)):
            value, kind = getattr(self, f.name), type(f.default)
            if not _fits(value, kind):
                raise UserError(f"{type(self).__name__}'s {f.name} must be a {SETTING_KINDS[kind]}, got {value!r}")

    def check_run(self, num_steps: int) -> None:
        """A UserError if the settings cannot work in a sampling run of num_steps steps (none by default)."""

    @property
    def distillable(self) -> bool:
        """A function of (x_t, t, y, s) alone, so a student trained on single steps can learn it."""
        return not self.needs_guide_model

    @property
    def scale_only(self) -> bool:
        """The rule only sets s per step: a student, which takes s as its input, can follow it."""
        return False

    def scale_at(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The scale used at timesteps t (B,): s (B,) itself unless a rule varies it (then `scale_varies`)."""
        return s

    @property
    def scale_varies(self) -> bool:
        """Whether `scale_at` changes s with t (if not, a scale given as a number is one for every row)."""
        return type(self).scale_at is not Guider.scale_at

    def passes(self, s: torch.Tensor, state: GuiderState) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) bool each: the rows whose result reads pred_c, and those that read the guiding pass. A pass that
        no row reads is skipped, and an unread row of a pass is zero, so s = 1 gives pred_c exactly."""
        return torch.ones_like(s, dtype=torch.bool), s != 1

    def guide_labels(self, y: torch.Tensor, null_class: int) -> torch.Tensor:
        """The labels (B,) of the guiding pass: the null label (pred_u)."""
        return torch.full_like(y, null_class)

    def guiding_model(self, model: DiffusionModel) -> DiffusionModel:
        """The network of the guiding pass: the model itself, unless the rule brings another."""
        return model

    def combine(self, pred_g: torch.Tensor, pred_c: torch.Tensor, s: torch.Tensor, state: GuiderState) -> torch.Tensor:
        """The guided prediction (B, C, H, W) from the guiding pass, the conditional pass and s (B,)."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class CFG(Guider):
    """Plain classifier-free guidance, pred_u + s (pred_c - pred_u), with diffusers' options (all off by default):

    rescale = phi          `rescale_guidance` of the result towards std(pred_c) (Lin et al. 2024, Sec. 3.4).
    interval = (lo, hi)    guide only where lo <= t <= hi, plain conditional elsewhere (Kynkaanniemi et al. 2024).
    negative_labels        one id or (B,) ids whose prediction takes the place of pred_u: "a 7, not a 1"."""

    name: ClassVar[str] = "cfg"
    rescale: float = 0.0
    interval: tuple[int, int] | None = None
    negative_labels: int | torch.Tensor | None = None

    def combine(self, pred_g: torch.Tensor, pred_c: torch.Tensor, s: torch.Tensor, state: GuiderState) -> torch.Tensor:
        guided = cfg_combine(pred_g, pred_c, s)
        return rescale_guidance(guided, pred_c, self.rescale) if self.rescale != 0 else guided

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.rescale <= 1:
            raise UserError(f"CFG's rescale must be a number in [0, 1] (0 is off), got {self.rescale!r}")

    def passes(self, s: torch.Tensor, state: GuiderState) -> tuple[torch.Tensor, torch.Tensor]:
        need_c = s != 0 if self.rescale == 0 else torch.ones_like(s, dtype=torch.bool)  # rescale reads pred_c
        return need_c, s != 1  # s = 0: pred_u alone, s = 1: pred_c alone (exact, without rescale)

    @property
    def scale_varies(self) -> bool:
        return self.interval is not None

    def scale_at(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return s if self.interval is None else interval_scale(s, t, self.interval)

    def guide_labels(self, y: torch.Tensor, null_class: int) -> torch.Tensor:
        if self.negative_labels is None:
            return torch.full_like(y, null_class)
        return torch.as_tensor(self.negative_labels, device=y.device).expand_as(y)

    @property
    def distillable(self) -> bool:
        return self.negative_labels is None  # a student has no input for a negative label

    @property
    def scale_only(self) -> bool:
        return self.rescale == 0 and self.negative_labels is None


def rescale_guidance(guided: torch.Tensor, pred_cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Sec. 3.4):

        pred_rescaled = pred_cfg * std(pred_c) / std(pred_cfg)
        pred          = phi * pred_rescaled + (1 - phi) * pred_cfg,

    std per sample over (C, H, W). A large s inflates the guided prediction's spread, which over-exposes
    images; phi in [0, 1] pulls it back to the conditional prediction's spread (diffusers' `guidance_rescale`)."""
    dims = tuple(range(1, guided.ndim))
    ratio = pred_cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp(min=1e-12)  # (B,1,1,1)
    return phi * (guided * ratio) + (1 - phi) * guided


def interval_scale(scale: torch.Tensor, t: torch.Tensor, interval: tuple[int, int]) -> torch.Tensor:
    """Guidance in a limited interval (Kynkaanniemi et al. 2024): s where t_lo <= t <= t_hi, else 1.

    Outside the interval the step is plain conditional, which costs one pass instead of two. Guiding
    at the noisiest steps mostly spends diversity (every sample is pushed to the class mean early)."""
    t_lo, t_hi = interval
    inside = (t >= t_lo) & (t <= t_hi)  # (B,) bool
    return torch.where(inside, scale, torch.ones_like(scale))


def guided_noise_pred(
    model: DiffusionModel,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    scale: float | torch.Tensor,
    *,
    guider: Guider | None = None,
    state: GuiderState | None = None,
    batched: bool = True,
) -> torch.Tensor:
    """The guided prediction (B, C, H, W) for x (B, C, H, W), t (B,), y (B,) at scale s (a float or (B,)).

    Teacher: guider.combine(pred_g, pred_c, s) (plain CFG by default) of its two passes, from one forward
    over the 2B batch (`batched`) or two forwards. Student (a model with a guidance input): one pass,
    model(x, t, y, guidance=s) with s as the guider sets it per step. One call is one sampling step:
    with a `state`, it advances state.step. Inputs are checked where they enter (the Pipeline, the CLIs,
    the distillation config)."""
    guider = CFG() if guider is None else guider
    state = GuiderState() if state is None else state
    s = guider.scale_at(scale_tensor(scale, x.shape[0], x.device), t)  # (B,)
    if model.is_student:
        pred = model(x, t, y, guidance=s)
    else:
        need_c, need_g = _needed_passes(guider, scale, s, state)
        pred_c, pred_g = two_passes(model, guider, x, t, y, need_c, need_g, batched)
        pred = guider.combine(pred_g, pred_c, s, state)
        state.guide_pred = pred_g if state.keep_guide_pass else None
    state.step += 1
    return pred


def scale_tensor(scale: float | torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """A number or a (B,) tensor -> float32 (B,) on `device`. A number is filled in on the device (a copy
    from the host would make a GPU wait at every sampling step)."""
    if isinstance(scale, torch.Tensor):
        return scale.to(device=device, dtype=torch.float32).expand(batch_size)
    return torch.full((batch_size,), float(scale), device=device)


def _needed_passes(
    guider: Guider, scale: float | torch.Tensor, s: torch.Tensor, state: GuiderState
) -> tuple[bool | torch.Tensor, bool | torch.Tensor]:
    """The guider's passes: one bool per pass where the host knows the rows share a scale given as a number
    (a pass that no row reads is then skipped), else (B,) masks: both passes run for every row, which
    keeps the batch's shape fixed, so a GPU never waits for the host to count rows. A rule whose scale
    varies with t (CFG's interval) with a number: read back from the device (a sync; intervals are opt-in)."""
    if isinstance(scale, torch.Tensor):
        need_c, need_g = guider.passes(s, state)
    else:
        shared = torch.tensor([float(scale)])  # (1,) on the host
        if guider.scale_varies:
            shared = s[:1].cpu() if bool((s == s[0]).all()) else s.cpu()
        masks = guider.passes(shared, state)
        need_c, need_g = (bool(m.all()) if len(shared) == 1 else m.to(s.device) for m in masks)
    return need_c, (True if state.keep_guide_pass else need_g)


def two_passes(
    model: DiffusionModel,
    guider: Guider,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    need_c: bool | torch.Tensor,
    need_g: bool | torch.Tensor,
    batched: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pred_c, pred_g), each (B, C, H, W): model(x, t, y) and the guiding pass (guider's labels and network).

    A pass needed by no row (need_* False) is not run; rows a pass is not needed for (a (B,) mask) are
    zero, so a rule's unread term is exactly 0. One forward over both passes when `batched` and the
    guiding network is the model itself, else two."""
    guide_net, y_g = guider.guiding_model(model), guider.guide_labels(y, model.null_class)
    nets = [(model, y, need_c), (guide_net, y_g, need_g)]
    ran = [(net, labels) for net, labels, need in nets if need is not False]
    if batched and len(ran) == 2 and guide_net is model:
        preds = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_g])).chunk(2)  # (B, C, H, W) each
    else:
        preds = [net(x, t, labels) for net, labels in ran]
    out = iter(preds)
    pred_c, pred_g = (next(out) if need is not False else None for _, _, need in nets)
    zero = torch.zeros_like(preds[0] if preds else x)  # (B, C, H, W)
    return _rows_or_zero(pred_c, need_c, zero), _rows_or_zero(pred_g, need_g, zero)


def _rows_or_zero(pred: torch.Tensor | None, need: bool | torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    if pred is None:
        return zero
    if isinstance(need, torch.Tensor):
        return torch.where(per_sample(need, pred), pred, zero)  # (B, C, H, W)
    return pred


def _fits(value: object, kind: type) -> bool:
    """Whether a setting's value has its default's type: bool and text exactly, a whole number for int,
    a finite real number for float (a bool is neither)."""
    if kind in (bool, str):
        return isinstance(value, kind)
    if isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, numbers.Integral)
    return isinstance(value, numbers.Real) and math.isfinite(value)


def settings(cls: type[Guider]) -> list:
    """The settings of a guider class a spec may set: its fields with a number, bool or text default."""
    return [f for f in fields(cls) if f.default is not MISSING and isinstance(f.default, (bool, int, float, str))]


def guider_from_spec(spec: str, guide_model: DiffusionModel | None = None) -> Guider:
    """'apg:eta=0,norm_threshold=4,momentum=-0.5' -> APG(eta=0.0, ...); 'tcfg' -> TangentialCFG().

    The names are GUIDERS' (any subclass of Guider with a `name`), the settings the class's own fields;
    anything else is a UserError naming them. A rule that needs a guide model gets `guide_model`."""
    from . import guiders  # noqa: F401  (the rules beyond CFG register themselves on import)

    name, _, text = spec.partition(":")
    name = name.strip()
    if name not in GUIDERS:
        hint = "; CFG++ is a sampler: --sampler ddim-cfg++" if name == "cfg++" else ""
        raise UserError(f"unknown guider {name!r}; choose one of {', '.join(GUIDERS)}{hint}")
    cls = GUIDERS[name]
    own = {f.name: f for f in settings(cls)}
    kwargs: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in own:
            raise UserError(f"guider {name!r} takes the settings name=value with name one of: "
                            f"{', '.join(own) or 'none'}; got {item!r}")  # fmt: skip
        if key in kwargs:
            raise UserError(f"guider spec {spec!r} sets {key} twice; give each setting once")
        kwargs[key] = _parse_setting(key, value.strip(), type(own[key].default))
    if cls.needs_guide_model:
        if guide_model is None:
            raise UserError(f"the {name} guider needs a guiding model (--guide-ckpt)")
        kwargs["guide_model"] = guide_model
    return cls(**kwargs)


def _parse_setting(key: str, value: str, kind: type) -> float | int | bool | str:
    """One 'name=value' of a guider spec, as the type of the setting's default."""
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
        number = kind(value)
        if isinstance(number, float) and not math.isfinite(number):
            raise ValueError
        return number
    except ValueError:
        raise UserError(f"guider setting {key} must be a finite {kind.__name__}, got {value!r}") from None

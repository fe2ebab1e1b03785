"""Checks at the edge: what a user hands the Pipeline is checked here, once, so the code below it
(`sample_loop`, the guidance rules, the schedulers) reads as the mathematics and assumes valid input.
Every problem is a UserError that names it and the fix."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import fields, replace

import numpy as np
import torch

from .errors import UserError
from .guidance import CFG, Guider, guider_from_spec
from .guiders import SCHEDULES, scheduled_range
from .models import DiffusionModel


def check_labels(labels: Sequence[int] | torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels -> LongTensor (B,) with values in [0, num_classes] (num_classes is the null label)."""
    if isinstance(labels, torch.Tensor) and labels.device.type == "meta":
        raise UserError("labels are on the meta device, which holds no values; pass real class ids")
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise UserError(f"labels must be integer class ids, got {str(labels)[:80]}") from None
    if labels.ndim != 1 or len(labels) == 0:
        raise UserError(f"labels must be a non-empty 1-D list of class ids, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
        raise UserError(f"labels must be integers, got dtype {labels.dtype}")
    bad = labels[(labels < 0) | (labels > num_classes)]
    if len(bad):
        raise UserError(
            f"label {int(bad[0])} is out of range: the classes are 0..{num_classes - 1} "
            f"and {num_classes} is the null label"
        )
    return labels.long()


def _is_sequence(value: object) -> bool:
    """A tensor, an array or a list / tuple: one value per sample (rather than one for all)."""
    return isinstance(value, (torch.Tensor, np.ndarray, list, tuple)) and np.ndim(value) > 0


def check_scale(scale: float | torch.Tensor, batch_size: int) -> float | torch.Tensor:
    """A finite number, or finite values of shape () or (B,) (a tensor, an array, a list) -> a float, or a
    float32 (B,) tensor on the CPU."""
    if isinstance(scale, (np.ndarray, list, tuple)):
        try:
            scale = torch.as_tensor(np.asarray(scale, dtype=np.float64))
        except (TypeError, ValueError):
            raise UserError(f"guidance_scale must be a number or numbers, got {str(scale)[:80]}") from None
    if isinstance(scale, torch.Tensor):
        if scale.is_complex() or scale.dtype == torch.bool or scale.device.type == "meta":
            raise UserError(f"guidance_scale must hold real numbers, got a {scale.dtype} tensor on {scale.device}")
        scale = scale.detach().cpu().float()
        scale = scale.expand(batch_size) if scale.ndim == 0 else scale
        if scale.shape != (batch_size,):
            raise UserError(
                f"guidance_scale must be a float or a tensor of shape ({batch_size},), got {tuple(scale.shape)}"
            )
        if not torch.isfinite(scale).all():
            raise UserError(f"guidance_scale must be finite, got {scale[~torch.isfinite(scale)][0].item()}")
        return scale.clone()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):  # NumPy scalars are Real too
        raise UserError(f"guidance_scale must be a number or a tensor, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise UserError(f"guidance_scale must be finite, got {scale}")
    return float(scale)


def check_generator(
    generator: int | torch.Generator | list[torch.Generator] | None, batch_size: int
) -> int | torch.Generator | list[torch.Generator] | None:
    """A seed (an integer, NumPy's too), a torch.Generator, a list of one per sample, or None; else a UserError."""
    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        return int(generator)
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator):
        if len(generator) != batch_size:
            raise UserError(f"generator: give one torch.Generator per label ({batch_size}), got {len(generator)}")
        return list(generator)
    raise UserError(f"generator must be a seed (an integer), a torch.Generator or a list of them, one per label; "
                    f"got {type(generator).__name__}")  # fmt: skip


def check_x_T(x_T: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A user's starting noise (a tensor or an array) as finite float32 of `shape`, or a UserError."""
    try:
        x_T = torch.as_tensor(x_T, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise UserError(f"x_T must be a tensor or an array of numbers, got {type(x_T).__name__}") from None
    if tuple(x_T.shape) != shape:
        raise UserError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
    if not torch.isfinite(x_T).all():
        raise UserError("x_T holds NaN or inf; the starting noise must be finite")
    return x_T


def check_num_steps(num_steps: int, scheduler: object, trained_for: int, guider: Guider | None = None) -> int:
    """A positive integer (NumPy's too) no larger than T; for a step-distilled model, a divisor of its grid;
    one the guider can run (Guider.check_run)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise UserError(f"num_steps must be a positive integer, got {num_steps!r}")
    num_steps = int(num_steps)
    T = train_timesteps(scheduler)
    if num_steps > T:
        raise UserError(f"num_steps must be at most {T} (the training timesteps)")
    base = getattr(scheduler, "aligned_base", None)  # a step-distilled model's grid (this project's DDIM)
    if getattr(scheduler, "timestep_spacing", None) == "aligned" and base % num_steps:
        raise UserError(
            f"this model was step-distilled on a grid of {base} sampling steps halved: num_steps must "
            f"divide {base} (it was trained for {trained_for}), got {num_steps}"
        )
    if guider is not None:
        guider.check_run(num_steps)
    return num_steps


def train_timesteps(scheduler: object) -> int:
    """T of a scheduler of this project's or of diffusers' (which keeps it in `config`)."""
    config = getattr(scheduler, "config", None)
    return int(config["num_train_timesteps"] if config is not None else scheduler.num_train_timesteps)


def warn_outside_range(
    scale: float | torch.Tensor, guidance_range: tuple[float, float] | None, schedule: str = "constant"
) -> None:
    """A student was taught s in its guidance_range only; beyond it, it extrapolates. A schedule's s_t counts."""
    if guidance_range is None:
        return
    lo, hi = guidance_range
    s = torch.as_tensor(scale, dtype=torch.float32)
    low, high = scheduled_range(float(s.min()), float(s.max()), schedule)
    if low < lo or high > hi:
        reach = "" if schedule == "constant" else f" (the {schedule} schedule takes s_t over [{low:g}, {high:g}])"
        warnings.warn(
            f"guidance scale outside the student's trained range [{lo:g}, {hi:g}]{reach}: it was never taught "
            "these scales, so expect it to drift from its teacher",
            stacklevel=4,
        )


def check_schedule(schedule: str) -> str:
    if schedule not in SCHEDULES:
        raise UserError(f"unknown guidance schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    return schedule


def check_guider(guider: Guider | None, model: DiffusionModel, scheduler: object, batch_size: int) -> Guider | None:
    """The guider, its settings checked and its tensors on the model's device, or a UserError: a student
    follows only a rule that sets s per step (CFG, its interval); a guide model must fit the model."""
    if model.is_student and getattr(scheduler, "needs_unconditional_output", False):
        raise UserError("a CFG++ sampler re-noises with the unconditional prediction, which a guidance-distilled "
                        "student does not compute; sample its teacher with it")  # fmt: skip
    if guider is None:
        return None
    if isinstance(guider, str):
        guider = guider_from_spec(guider)
    if not isinstance(guider, Guider):
        raise UserError(f"guider must be a cfg_minimal Guider (CFG, APG, ...) or a spec such as 'apg:eta=0', "
                        f"got {type(guider).__name__}")  # fmt: skip
    if model.is_student and not guider.scale_only:
        raise UserError(f"a guidance-distilled student cannot sample with {guider!r}: its one pass has no pred_u "
                        "and pred_c to combine (it follows CFG's s and interval only); sample its teacher, or distil "
                        "the rule into a student (--distill-guider)")  # fmt: skip
    if isinstance(guider, CFG):
        guider = _check_cfg(guider, model.num_classes, train_timesteps(scheduler), batch_size)
    if guider.needs_guide_model:
        guide = guider.guiding_model(model)
        same = (guide.num_classes, guide.image_size, guide.in_channels) == (
            model.num_classes, model.image_size, model.in_channels)  # fmt: skip
        if guide.is_student or not same:
            raise UserError("the guiding model must be a teacher of the same dataset (classes, image size, channels)")
        guide.to(next(model.parameters()).device).eval()
    return guider


def check_same_schedule(scheduler: object, reference: object, what: str) -> None:
    """A UserError unless both schedulers have the same noise schedule (abar_t) and prediction type: a
    guiding model's predictions are only comparable with the model's under both."""
    none = torch.zeros(0)  # a flow scheduler has no abar; then the prediction types (flow_prediction) decide
    same_abar = torch.equal(getattr(scheduler, "alphas_cumprod", none), getattr(reference, "alphas_cumprod", none))
    if not same_abar or scheduler.prediction_type != reference.prediction_type:
        raise UserError(f"{what} was trained with another noise schedule or prediction type than the model it "
                        "guides; use one trained with the same --beta-schedule and --prediction-type")  # fmt: skip


def _check_cfg(guider: CFG, num_classes: int, T: int, batch_size: int) -> CFG:
    """CFG's options that depend on the run: an interval of timesteps below T, negative labels as one id or
    one per label (CFG checks its rescale itself)."""
    interval, negative = guider.interval, guider.negative_labels
    if interval is not None:
        pair = isinstance(interval, (tuple, list)) and len(interval) == 2
        ints = pair and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in interval)
        if not (ints and 0 <= interval[0] <= interval[1] < T):
            raise UserError(f"CFG's interval must be timesteps (t_lo, t_hi) with 0 <= t_lo <= t_hi < {T}, "
                            f"got {interval!r}")  # fmt: skip
        interval = (int(interval[0]), int(interval[1]))
    if negative is not None:
        negative = check_labels(negative if _is_sequence(negative) else [negative] * batch_size, num_classes)
        if len(negative) != batch_size:
            raise UserError(f"negative_labels must be one id or one per label ({batch_size}), got {len(negative)}")
    return replace(guider, interval=interval, negative_labels=negative)


def guider_rows(guider: Guider | None, rows: slice, device: torch.device) -> Guider | None:
    """The guider for a chunk of rows: its per-sample (B,) tensors cut to `rows` and moved to `device`."""
    per_sample = {f.name: getattr(guider, f.name) for f in fields(guider)} if guider is not None else {}
    per_sample = {k: v[rows].to(device) for k, v in per_sample.items() if isinstance(v, torch.Tensor) and v.ndim == 1}
    return replace(guider, **per_sample) if per_sample else guider

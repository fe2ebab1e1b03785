"""Classifier-free guidance (Ho & Salimans 2022): the one place the CFG rule lives.

| thing                 | convention                                                                  |
|-----------------------|-----------------------------------------------------------------------------|
| guidance scale        | s, as in diffusers and DiT: s = 0 unconditional, s = 1 conditional, s > 1   |
|                       | guided. Ho & Salimans and Meng et al. write w = s - 1 (`w_to_s`, `s_to_w`)  |
| null label            | id `num_classes` (one extra embedding row)                                  |
| labels                | LongTensor (B,), values in [0, num_classes]                                 |
| timesteps             | integer t in [0, T), LongTensor (B,), the same in training and sampling     |
| images                | float (B, C, H, W) in [-1, 1]                                               |
| prediction            | epsilon                                                                     |
| student's scale input | the same s, embedded (sinusoid + zero-initialised MLP)                      |

The sampler and the distillation target both call `guided_noise_pred`, so they cannot disagree.
"""

from __future__ import annotations

import math
import numbers

import torch

from .errors import UserError
from .models import DiffusionModel


def w_to_s(w: float) -> float:
    """Ho & Salimans' / Meng et al.'s weight w (eps = (1 + w) eps_c - w eps_u) -> s = w + 1."""
    return w + 1.0


def s_to_w(s: float) -> float:
    """s (eps = eps_u + s (eps_c - eps_u)) -> w = s - 1."""
    return s - 1.0


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """eps = eps_u + s * (eps_c - eps_u)   (Ho & Salimans 2022, eq. 6 with w = s - 1).

    `scale` is a float or a (B,) tensor, one scale per sample."""
    if isinstance(scale, torch.Tensor) and scale.ndim == 1:
        scale = scale.view(-1, *([1] * (eps_cond.ndim - 1)))  # (B, 1, 1, 1)
    return eps_uncond + scale * (eps_cond - eps_uncond)


def as_scale_tensor(scale: float | torch.Tensor, batch_size: int, device: torch.device | str) -> torch.Tensor:
    """A float or a (B,) tensor -> a finite float32 (B,) tensor; anything else is a UserError.

    The one place a scale is checked: guided_noise_pred calls it, so every sampler and loss does."""
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().to(device=device, dtype=torch.float32)
        if scale.ndim == 0:
            scale = scale.expand(batch_size)
        if scale.shape != (batch_size,):
            raise UserError(
                f"guidance_scale must be a float or a tensor of shape ({batch_size},), got {tuple(scale.shape)}"
            )
    else:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):  # NumPy scalars are Real too
            raise UserError(f"guidance_scale must be a number or a tensor, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise UserError(f"guidance_scale must be finite, got {scale}")
        return torch.full((batch_size,), float(scale), device=device)
    # A tensor on a GPU is not checked here: that would stall every sampling step. The Pipeline checks
    # a user's scales on the CPU before moving them; the distillation losses draw theirs in range.
    if scale.device.type == "cpu" and not torch.isfinite(scale).all():
        raise UserError(f"guidance_scale must be finite, got {scale[~torch.isfinite(scale)][0].item()}")
    return scale


def rescale_guidance(eps_guided: torch.Tensor, eps_cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Sec. 3.4):

        eps_rescaled = eps_cfg * std(eps_c) / std(eps_cfg)
        eps          = phi * eps_rescaled + (1 - phi) * eps_cfg,

    std per sample over (C, H, W). A large s inflates the guided prediction's spread, which over-exposes
    images; phi in [0, 1] pulls it back to the conditional prediction's spread. Applied to eps, as
    diffusers' `guidance_rescale` does."""
    dims = tuple(range(1, eps_guided.ndim))
    ratio = eps_cond.std(dim=dims, keepdim=True) / eps_guided.std(dim=dims, keepdim=True).clamp(min=1e-12)  # (B,1,1,1)
    return phi * (eps_guided * ratio) + (1 - phi) * eps_guided


def interval_scale(scale: torch.Tensor, t: torch.Tensor, interval: tuple[int, int]) -> torch.Tensor:
    """Guidance in a limited interval (Kynkäänniemi et al. 2024): s where t_lo <= t <= t_hi, else 1.

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
    batched: bool = True,
    negative_labels: torch.Tensor | None = None,
    rescale: float = 0.0,
    interval: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Guided epsilon for x (B, C, H, W), t (B,), y (B,) at scale s (float or (B,)).

    Teacher: cfg_combine(eps(x, t, null), eps(x, t, y), s), from one forward over the 2B batch
    (`batched`) or two forwards. A scale of exactly 0 (or 1) given as a number needs only the
    unconditional (conditional) pass, so the other is skipped; a per-sample scale tensor runs both
    passes for every row and takes eps_u (eps_c) exactly where s = 0 (1).
    Student (a model with a guidance input): one pass, eps(x, t, y, s).

    Variants (all off by default, all per sample):
      negative_labels (B,)  eps(x, t, y_neg) takes the place of eps_u: eps = eps_neg + s (eps_c - eps_neg),
                            "a 7, not a 1". The null label there is plain CFG.
      rescale = phi         `rescale_guidance` of the result towards std(eps_c).
      interval = (lo, hi)   `interval_scale`: guide only where lo <= t <= hi, plain conditional elsewhere.
    A student can take the interval (it only changes s) but not the other two: its one pass yields
    neither eps_c nor a slot for a negative label, so asking for them is a UserError (the one place
    this is checked).
    """
    s = as_scale_tensor(scale, x.shape[0], x.device)  # (B,)
    single_pass = None if isinstance(scale, torch.Tensor) or rescale != 0 else float(scale)  # one s for all rows
    if interval is not None:
        s = interval_scale(s, t, interval)
        if single_pass is not None:  # the rows' s may now differ (a host sync on a GPU; the interval is opt-in)
            single_pass = float(s[0]) if bool((s == s[0]).all()) else None
    null = torch.full_like(y, model.null_class)
    uncond_labels = null if negative_labels is None else negative_labels.to(y.device)  # (B,)
    if model.is_student:
        if negative_labels is not None and not torch.equal(uncond_labels, null):
            raise UserError(
                "a guidance-distilled student cannot do negative-class guidance: its one pass has no "
                "unconditional prediction to replace. Sample with its teacher instead"
            )
        if rescale != 0:
            raise UserError(
                "guidance rescale needs the conditional prediction eps_c, which a guidance-distilled "
                "student does not compute; sample with its teacher instead"
            )
        return model(x, t, y, guidance=s)
    if single_pass == 0.0:  # s = 0 for every sample: eps_u alone
        return model(x, t, uncond_labels)
    if single_pass == 1.0:  # s = 1: eps_c alone
        return model(x, t, y)
    if batched:  # one forward over the 2B batch
        eps_c, eps_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, uncond_labels])).chunk(2)
    else:
        eps_c, eps_u = model(x, t, y), model(x, t, uncond_labels)  # (B, C, H, W) each
    # Rows at s = 0 or 1 take eps_u or eps_c exactly (cfg_combine would round). Selecting rows with where
    # keeps the batch's shape fixed, so a GPU never waits for the host to count them.
    s_4d = s.view(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
    guided = torch.where(s_4d == 1, eps_c, torch.where(s_4d == 0, eps_u, cfg_combine(eps_u, eps_c, s)))
    return rescale_guidance(guided, eps_c, rescale) if rescale != 0 else guided


def noise_preds(
    model: DiffusionModel,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    guide_labels: torch.Tensor,
    need_cond: torch.Tensor,
    need_guide: torch.Tensor,
    batched: bool = True,
    guide_model: DiffusionModel | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two passes of a guided step -> (eps_c, eps_g), each (B, C, H, W), zeros where a pass is skipped.

    eps_c = model(x, t, y) for the rows in need_cond (B,) bool; the guiding pass eps_g = model(x, t,
    guide_labels) (the null label: eps_u) for the rows in need_guide, or guide_model(x, t, guide_labels)
    when a separate guiding network is given (autoguidance). One forward over both passes (`batched`,
    one network only) or two."""
    x_in, t_in = torch.cat([x[need_cond], x[need_guide]]), torch.cat([t[need_cond], t[need_guide]])
    y_in = torch.cat([y[need_cond], guide_labels[need_guide]])  # (n_cond + n_guide,)
    n_cond = int(need_cond.sum())
    if batched and guide_model is None:
        parts = [(model, slice(None))]  # one forward
    else:
        parts = [(model, slice(0, n_cond)), (guide_model or model, slice(n_cond, None))]
    eps = torch.cat(
        [net(x_in[p], t_in[p], y_in[p]) for net, p in parts if len(x_in[p]) > 0]
    )  # (n_cond + n_guide, C, H, W)
    eps_c_rows, eps_g_rows = eps.split([n_cond, len(eps) - n_cond])
    # A skipped pass has coefficient 0 in cfg_combine; zeros keep the result exact (eps_u + 0 * ...).
    eps_c = eps.new_zeros(x.shape).index_put_((need_cond,), eps_c_rows)  # (B, C, H, W)
    eps_g = eps.new_zeros(x.shape).index_put_((need_guide,), eps_g_rows)  # (B, C, H, W)
    return eps_c, eps_g

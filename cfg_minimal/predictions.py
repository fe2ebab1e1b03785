"""What the network predicts, and every conversion between its output and eps, x_0 and v: here alone.

The forward process (Ho et al. 2020, eq. 4) writes the noisy sample as

    x_t = alpha_t x_0 + sigma_t eps,      alpha_t = sqrt(abar_t),  sigma_t = sqrt(1 - abar_t),

so alpha_t^2 + sigma_t^2 = 1. `prediction_type` (diffusers' name and values) says which quantity the
network's output stands for:

    prediction_type   the network predicts            x_0 from its output o         eps from o
    "epsilon"         eps (the default)               (x_t - sigma_t o) / alpha_t   o
    "v_prediction"    v = alpha_t eps - sigma_t x_0   alpha_t x_t - sigma_t o       alpha_t o + sigma_t x_t

eps is Ho et al. 2020 (eq. 11 and 15); v is Salimans & Ho 2022 ("Progressive Distillation for Fast
Sampling of Diffusion Models", Sec. 4 and Appendix D), whose x_0 and eps follow from alpha^2 + sigma^2 = 1.
A v-prediction network's training target is v itself (`training_target`), an eps-prediction's the noise.

Both are affine in the output with coefficients that depend on t alone, so CFG's combination
o_u + s (o_c - o_u) (weights summing to one) implies the same x_0 and eps whichever kind o is.
Samplers, losses and the step-distillation target call the functions below with the prediction type
their scheduler config names, and never branch on it themselves: a third type (a flow-matching
velocity u = eps - x_0, say) is one more branch in each function here.

Tensors: `output`, `sample`, `x0`, `noise` are (B, C, H, W); `abar`, `alpha`, `sigma` are 0-d tensors
or broadcastable (B, 1, 1, 1). The functions assume a valid type; `check_prediction_type` checks a
user's at the edges (configs, checkpoints, CLI).
"""

from __future__ import annotations

import torch

from .errors import UserError

PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_prediction_type(prediction_type: object) -> str:
    """`prediction_type` if this code knows it, else a UserError naming the choices."""
    if prediction_type not in PREDICTION_TYPES:
        raise _unknown(prediction_type)
    return prediction_type


def _unknown(prediction_type: object) -> UserError:
    return UserError(f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")


def alpha_sigma(abar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """abar_t -> (alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t)), the coefficients of x_0 and eps in x_t."""
    return abar.sqrt(), (1 - abar).sqrt()


def x0_from_output(
    output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The x_0 (B, C, H, W) the network's output implies at x_t = `sample` (see the table above), for samplers
    that keep alpha_t and sigma_t themselves (DPM-Solver++)."""
    if prediction_type == "epsilon":
        return (sample - sigma * output) / alpha  # Ho et al. 2020, eq. 15
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * output  # Salimans & Ho 2022, Sec. 4
    raise _unknown(prediction_type)


def eps_from_output(
    output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The eps (B, C, H, W) the network's output implies at x_t = `sample` (see the table above)."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return alpha * output + sigma * sample  # Salimans & Ho 2022, Sec. 4
    raise _unknown(prediction_type)


def to_x0(output: torch.Tensor, sample: torch.Tensor, abar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x_0 (B, C, H, W) from the network's output at x_t = `sample`: for eps (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    return x0_from_output(output, sample, *alpha_sigma(abar), prediction_type)


def to_eps(output: torch.Tensor, sample: torch.Tensor, abar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """eps (B, C, H, W) from the network's output at x_t = `sample`; the output itself for eps."""
    return eps_from_output(output, sample, *alpha_sigma(abar), prediction_type)


def eps_from_x0(x0: torch.Tensor, sample: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar): eq. 4 solved for eps, e.g. from a clipped x_0 (B, C, H, W)."""
    return (sample - abar.sqrt() * x0) / (1 - abar).sqrt()


def training_target(x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the network learns to output for x_t = sqrt(abar) x0 + sqrt(1 - abar) noise (B, C, H, W):
    `noise` itself for eps (Ho et al. 2020, eq. 14), v = sqrt(abar) noise - sqrt(1 - abar) x_0 for v."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        alpha, sigma = alpha_sigma(abar)
        return alpha * noise - sigma * x0
    raise _unknown(prediction_type)

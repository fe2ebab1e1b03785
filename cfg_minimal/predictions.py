"""What the network predicts, and every conversion between its output and eps, x_0 and v: here alone.

Two forward processes write the noisy sample as x_t = alpha_t x_0 + sigma_t eps:

    VP diffusion (Ho et al. 2020, eq. 4)   alpha_t = sqrt(abar_t),  sigma_t = sqrt(1 - abar_t)   alpha^2 + sigma^2 = 1
    rectified flow (Esser et al. 2024,     alpha = 1 - sigma,  sigma in [0, 1]                    alpha + sigma = 1
      eq. 13; Liu et al. 2023)

`prediction_type` (diffusers' name and values) says which quantity the network's output stands for, and with
it which process the model was trained on (the flow type alone implies the flow process):

    prediction_type   the network predicts            x_0 from its output o         eps from o
    "epsilon"         eps (the default)               (x_t - sigma_t o) / alpha_t   o
    "v_prediction"    v = alpha_t eps - sigma_t x_0   alpha_t x_t - sigma_t o       alpha_t o + sigma_t x_t
    "flow_prediction" u = eps - x_0 = dx_t / dsigma   x_t - sigma o                 x_t + (1 - sigma) o

eps is Ho et al. 2020 (eq. 11 and 15); v is Salimans & Ho 2022 ("Progressive Distillation for Fast
Sampling of Diffusion Models", Sec. 4 and Appendix D), whose x_0 and eps follow from alpha^2 + sigma^2 = 1.
The flow velocity u is the regression target of rectified flow (Liu et al. 2023, "Flow Straight and Fast",
eq. 1) and of flow matching's optimal-transport path with sigma_min = 0 (Lipman et al. 2023, "Flow Matching
for Generative Modeling", eq. 23), written with SD3's direction of time (sigma = 0 data, sigma = 1 noise);
its x_0 and eps follow from x_t = (1 - sigma) x_0 + sigma eps. A network's training target is its output
type itself (`training_target`): the noise, v, or u.

All three are affine in the output with coefficients that depend on t alone, so CFG's combination
o_u + s (o_c - o_u) (weights summing to one) implies the same x_0 and eps whichever kind o is.
Samplers, losses and the step-distillation target call the functions below with the prediction type
their scheduler config names, and never branch on it themselves.

Tensors: `output`, `sample`, `x0`, `noise` are (B, C, H, W); `abar`, `alpha`, `sigma` are 0-d tensors
or broadcastable (B, 1, 1, 1). `to_x0`, `to_eps` and `eps_from_x0` take abar and so are for the VP types;
a flow sampler calls `x0_from_output` / `eps_from_output` with `flow_alpha_sigma(sigma)`. The functions
assume a valid type; `check_prediction_type` checks a user's at the edges (configs, checkpoints, CLI).
"""

from __future__ import annotations

import torch

from .errors import UserError

FLOW = "flow_prediction"  # rectified flow's velocity, diffusers' name for it (DPMSolverMultistepScheduler's)
PREDICTION_TYPES = ("epsilon", "v_prediction", FLOW)


def check_prediction_type(prediction_type: object) -> str:
    """`prediction_type` if this code knows it, else a UserError naming the choices."""
    if prediction_type not in PREDICTION_TYPES:
        raise _unknown(prediction_type)
    return prediction_type


def _unknown(prediction_type: object) -> UserError:
    return UserError(f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")


def is_flow(prediction_type: str | None) -> bool:
    """Whether a model of this prediction type was trained on the rectified-flow process (else VP diffusion;
    None, the value of a checkpoint older than the setting, is epsilon)."""
    return prediction_type == FLOW


def flow_alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sigma -> (alpha, sigma) = (1 - sigma, sigma), the coefficients of x_0 and eps in rectified flow's x_t."""
    return 1 - sigma, sigma


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
    if prediction_type == FLOW:
        return sample - sigma * output  # x_t - sigma (eps - x_0) = x_0, as alpha = 1 - sigma
    raise _unknown(prediction_type)


def eps_from_output(
    output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The eps (B, C, H, W) the network's output implies at x_t = `sample` (see the table above)."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return alpha * output + sigma * sample  # Salimans & Ho 2022, Sec. 4
    if prediction_type == FLOW:
        return sample + alpha * output  # x_t + (1 - sigma) (eps - x_0) = eps
    raise _unknown(prediction_type)


def to_x0(output: torch.Tensor, sample: torch.Tensor, abar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x_0 (B, C, H, W) from the network's output at x_t = `sample`: for eps (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    _vp_only(prediction_type)
    return x0_from_output(output, sample, *alpha_sigma(abar), prediction_type)


def to_eps(output: torch.Tensor, sample: torch.Tensor, abar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """eps (B, C, H, W) from the network's output at x_t = `sample`; the output itself for eps."""
    _vp_only(prediction_type)
    return eps_from_output(output, sample, *alpha_sigma(abar), prediction_type)


def eps_from_x0(x0: torch.Tensor, sample: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar): eq. 4 solved for eps, e.g. from a clipped x_0 (B, C, H, W)."""
    return (sample - abar.sqrt() * x0) / (1 - abar).sqrt()


def training_target(
    x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor | None, prediction_type: str
) -> torch.Tensor:
    """What the network learns to output for x_t = alpha x0 + sigma noise (B, C, H, W): `noise` itself for eps
    (Ho et al. 2020, eq. 14), v = sqrt(abar) noise - sqrt(1 - abar) x_0 for v, and for flow the velocity
    noise - x_0 (Liu et al. 2023, eq. 1), the same at every sigma (`abar` is not read: pass None)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        alpha, sigma = alpha_sigma(abar)
        return alpha * noise - sigma * x0
    if prediction_type == FLOW:
        return noise - x0
    raise _unknown(prediction_type)


def _vp_only(prediction_type: str) -> None:
    """abar describes the VP process only: a flow output is converted at its sigma (flow_alpha_sigma)."""
    if prediction_type == FLOW:
        raise ValueError("a flow_prediction output converts at sigma, not abar: call x0_from_output / "
                         "eps_from_output with flow_alpha_sigma(sigma)")  # fmt: skip

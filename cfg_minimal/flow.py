"""Rectified flow: its forward process, SD3's training timesteps, and the Euler and Heun samplers, with the
names and semantics of diffusers' FlowMatchEulerDiscreteScheduler and FlowMatchHeunDiscreteScheduler.

    x_sigma = (1 - sigma) x_0 + sigma eps,   sigma in [0, 1]        (Esser et al. 2024, "Scaling Rectified Flow
    v(x_sigma, sigma) = dx_sigma / dsigma = eps - x_0                Transformers", eq. 13; Liu et al. 2023, eq. 1)

A flow model (`prediction_type` 'flow_prediction', predictions.py) outputs the velocity v and sees the
timestep t = sigma T as a float in [0, T] (T = num_train_timesteps), as SD3 and diffusers feed it. Training
draws sigma from SD3's logit-normal density or uniformly (`sample_sigmas`); sampling integrates the ODE
dx/dsigma = v from x_1 = eps (pure noise, `init_noise_sigma` 1) down to sigma = 0 on a grid of sigmas:

    shift(sigma) = s sigma / (1 + (s - 1) sigma)                     SD3's shift (eq. 23, s = sqrt(m / n)); s = 1: none
    sigma_k      = shift(1 + k (sigma_min - 1) / (n - 1)),  k = 0 ... n - 1,   then sigma_n = 0
    t_k          = sigma_k T                                         the `timesteps` the network sees

with sigma_min = shift(1 / T), the smallest sigma of the shifted training grid; as diffusers does, the n points
are spaced evenly in t before the shift and the shift is then applied to all of them (sigma_min included).
`timestep_spacing` 'aligned' (this project's, for step distillation, as DDIM's 'aligned') takes instead every
(B / n)-th point of that grid of B = `aligned_base` points, from sigma_0 = 1 down, then sigma_n = 0: the grid of
n / 2 steps is every other point of the grid of n, so each step of a halved sampler spans exactly two.
A larger s keeps more steps at high noise: SD3 samples 1024-pixel images with s = 3, FLUX with e^1.15 = 3.2 (its
resolution-dependent shift); 16- and 28-pixel digits start from s = 1. Parity with diffusers step by step is
tested in tests/test_flow.py.

    Euler:  x_{k+1} = x_k + (sigma_{k+1} - sigma_k) v(x_k, sigma_k)
    Heun:   the Euler step is a predictor x~, then x_{k+1} = x_k + (sigma_{k+1} - sigma_k) (v_k + v(x~, sigma_k+1)) / 2
            (Karras et al. 2022, "Elucidating the Design Space", Algorithm 1); the last step, to sigma = 0, is Euler.
            Its `timesteps` list each inner grid point twice (predictor, then corrector), as diffusers does: n steps
            take 2n - 1 network evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .predictions import FLOW, flow_alpha_sigma, training_target, x0_from_output

TIMESTEP_SAMPLINGS = ("logit_normal", "uniform")


def sample_sigmas(
    n: int, timestep_sampling: str = "logit_normal", device: torch.device | str = "cpu", mean: float = 0.0,
    std: float = 1.0
) -> torch.Tensor:  # fmt: skip
    """n training sigmas (n,) in [0, 1): 'logit_normal' sigma = sigmoid(mean + std z), z ~ N(0, 1), the density
    pi_ln(sigma; m, s) of Esser et al. 2024 (eq. 19, m = 0, s = 1 as SD3 trains), which favours the middle of
    the path, where the velocity is hardest to predict; 'uniform' sigma ~ U(0, 1) (Liu et al. 2023)."""
    if timestep_sampling == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, device=device))  # (n,)
    if timestep_sampling == "uniform":
        return torch.rand(n, device=device)  # (n,)
    raise ValueError(f"unknown timestep_sampling {timestep_sampling!r}; choose one of {', '.join(TIMESTEP_SAMPLINGS)}")


def shift_sigmas(sigma: torch.Tensor | np.ndarray, shift: float) -> torch.Tensor | np.ndarray:
    """SD3's timestep shift (Esser et al. 2024, eq. 23; FLUX's too): sigma -> s sigma / (1 + (s - 1) sigma).
    It keeps 0 and 1 and moves every sigma in between up for s > 1 (more noise)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


@dataclass
class FlowSchedulerOutput:
    prev_sample: torch.Tensor  # x at the next sigma, (B, C, H, W)
    pred_original_sample: torch.Tensor  # x_0 = x - sigma v at this step's input, (B, C, H, W)


class _FlowScheduler:
    """What the flow samplers share: the grid of sigmas, `add_noise` and the training draws."""

    init_noise_sigma = 1.0  # x_1 = eps: the sampler starts from the standard normal noise itself

    def __init__(
        self, num_train_timesteps: int = 1000, shift: float = 1.0, prediction_type: str = FLOW,
        timestep_spacing: str = "linspace", aligned_base: int = 64
    ):  # fmt: skip
        if timestep_spacing not in ("linspace", "aligned"):
            raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}; choose linspace or aligned")
        self.timestep_spacing, self.aligned_base = timestep_spacing, aligned_base
        if prediction_type != FLOW:
            raise ValueError(f"the flow samplers drive a flow_prediction model, got prediction_type "
                             f"{prediction_type!r}: sample eps or v models with ddim, ddpm or dpmsolver++")  # fmt: skip
        if not shift > 0:
            raise ValueError(f"shift must be a positive number (1 is no shift), got {shift!r}")
        self.num_train_timesteps, self.shift, self.prediction_type = num_train_timesteps, shift, prediction_type
        steps = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float32)  # (T,) T, ..., 1
        train_sigmas = shift_sigmas(steps / num_train_timesteps, shift)  # (T,) the shifted training grid
        self.sigma_min, self.sigma_max = float(train_sigmas[-1]), float(train_sigmas[0])
        self.timesteps = train_sigmas * num_train_timesteps  # (T,) until set_timesteps is called
        self.sigmas = torch.cat([train_sigmas, torch.zeros(1)])  # (T + 1,)
        self.num_inference_steps: int | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """The grid sigma_0 = 1 > ... > sigma_{n-1} > sigma_n = 0 of the module docstring; timesteps t_k = sigma_k T."""
        n, T = num_inference_steps, self.num_train_timesteps
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {n!r}")
        points, every = n, 1
        if self.timestep_spacing == "aligned":
            if self.aligned_base % n:
                raise ValueError(f"'aligned' spacing needs num_inference_steps dividing {self.aligned_base}, got {n}")
            points, every = self.aligned_base, self.aligned_base // n
        t = np.linspace(self.sigma_max * T, self.sigma_min * T, points)  # (points,) evenly spaced before the shift
        sigmas = torch.from_numpy(shift_sigmas(t / T, self.shift)).float()[::every]  # (n,)
        self.num_inference_steps = n
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])  # (n + 1,)
        self.timesteps = sigmas * T  # (n,)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - sigma) x_0 + sigma eps at sigma = t / T (eq. 13); timesteps (B,) (diffusers' `scale_noise`)."""
        sigma = (timesteps.to(original_samples.dtype) / self.num_train_timesteps).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        alpha, sigma = flow_alpha_sigma(sigma)
        return alpha * original_samples + sigma * noise

    def training_timesteps(self, n: int, device: torch.device | str, timestep_sampling: str) -> torch.Tensor:
        """n training timesteps t = sigma T (n,), float, sigma from `sample_sigmas`."""
        return sample_sigmas(n, timestep_sampling, device) * self.num_train_timesteps  # (n,)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The velocity eps - x_0 (B, C, H, W) the network learns at every t (predictions.training_target)."""
        return training_target(x0, noise, None, FLOW)

    def _index(self, timestep: float | torch.Tensor, grid: torch.Tensor) -> int:
        """The position of `timestep` in `grid`, or an error naming what to pass."""
        found = (grid == float(timestep)).nonzero()
        if len(found) == 0:
            raise ValueError(f"timestep {float(timestep)} is not on this sampler's grid: call set_timesteps(n) "
                             "and pass one of its .timesteps")  # fmt: skip
        return int(found[0, 0])

    def _x0(self, velocity: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x0_from_output(velocity, sample, *flow_alpha_sigma(sigma), FLOW)  # x - sigma v, (B, C, H, W)


class FlowMatchEulerScheduler(_FlowScheduler):
    """Euler on dx/dsigma = v (the module docstring): diffusers' FlowMatchEulerDiscreteScheduler with
    `shift`, deterministic and without dynamic shifting. Each step is found by its timestep, so none
    carries state."""

    order = 1

    def step(
        self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor, **ignored: object
    ) -> FlowSchedulerOutput:
        """x_{k+1} = x_k + (sigma_{k+1} - sigma_k) v from t_k = `timestep`. diffusers' other arguments (a
        generator, s_churn) are accepted and ignored: this ODE step draws no noise."""
        k = self._index(timestep, self.timesteps)
        sigma, sigma_next = self.sigmas[k], self.sigmas[k + 1]
        prev_sample = sample + (sigma_next - sigma) * model_output  # (B, C, H, W)
        return FlowSchedulerOutput(prev_sample=prev_sample, pred_original_sample=self._x0(model_output, sample, sigma))


class FlowMatchHeunScheduler(_FlowScheduler):
    """Heun's second-order method on dx/dsigma = v (the module docstring): diffusers'
    FlowMatchHeunDiscreteScheduler. `timesteps` are t_0, t_1, t_1, ..., t_{n-1}, t_{n-1}: the first visit of
    t_{k+1} is the corrector of the step from sigma_k, the second the predictor of the next step; `sigmas`
    is the grid itself, (n + 1,). Between the two calls the step keeps (k, x_k, v_k); set_timesteps forgets it."""

    order = 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grid_timesteps = self.timesteps  # (T,) until set_timesteps is called
        self._pending: tuple[int, torch.Tensor, torch.Tensor] | None = None  # the predictor's (k, x_k, v_k)

    def set_timesteps(self, num_inference_steps: int) -> None:
        super().set_timesteps(num_inference_steps)
        self.grid_timesteps = self.timesteps  # (n,) each t_k once
        self.timesteps = torch.cat([self.timesteps[:1], self.timesteps[1:].repeat_interleave(2)])  # (2n - 1,)
        self._pending = None

    @property
    def state_in_first_order(self) -> bool:
        """True before a predictor step (the next call starts a step), False before a corrector (diffusers' name)."""
        return self._pending is None

    def step(
        self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor, **ignored: object
    ) -> FlowSchedulerOutput:
        """The predictor (Euler) from t_k, or the corrector at t_{k+1}: the mean of the two velocities, applied
        from x_k. diffusers' other arguments are accepted and ignored (no s_churn: an ODE step draws no noise)."""
        k = self._index(timestep, self.grid_timesteps)
        x0 = self._x0(model_output, sample, self.sigmas[k])  # (B, C, H, W)
        if self.state_in_first_order:
            sigma, sigma_next = self.sigmas[k], self.sigmas[k + 1]
            if sigma_next > 0:  # the last step, to sigma = 0, stays Euler
                self._pending = (k, sample, model_output)
            prev_sample = sample + (sigma_next - sigma) * model_output  # (B, C, H, W) the predictor x~
            return FlowSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
        j, x_j, v_j = self._pending
        if k != j + 1:
            expected = float(self.grid_timesteps[j + 1])
            raise ValueError(f"Heun: the corrector of the step from t_{j} runs at t = {expected}, got "
                             f"{float(timestep)}; pass .timesteps in order")  # fmt: skip
        self._pending = None
        prev_sample = x_j + (self.sigmas[k] - self.sigmas[j]) * (0.5 * (v_j + model_output))  # (B, C, H, W)
        return FlowSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

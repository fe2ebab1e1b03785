"""Noise schedules and the DDPM, DDIM and DPM-Solver++ samplers, with diffusers' names and semantics.

Forward process (Ho et al. 2020, eq. 4):  x_t = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * eps,
with abar_t = prod_{i<=t} (1 - beta_i) and integer t in [0, T).

`set_timesteps(n)` picks the n timesteps to visit; `step(model_output, t, x_t)` returns x_{t_prev} and
the predicted x_0. `prediction_type` says what model_output is, as in diffusers: 'epsilon' (eps, the
default) or 'v_prediction' (v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, Salimans & Ho 2022); the
samplers turn it into x_0 and eps with predictions.py and are otherwise the same. Parity with
`diffusers.DDPMScheduler` / `DDIMScheduler` / `DPMSolverMultistepScheduler` is tested in
tests/test_schedulers.py. Timesteps are python ints or 0-d tensors shared by the whole batch.

A 'flow_prediction' model was trained on rectified flow's process, not this one: these samplers refuse it,
and flow.py's Euler and Heun samplers (in SCHEDULERS as 'euler' and 'heun') drive it. `training_scheduler`
gives the losses the forward process a checkpoint's scheduler_config names; `check_sampler` keeps each
model with the samplers of its process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import predictions
from .errors import UserError
from .flow import FlowMatchEulerScheduler, FlowMatchHeunScheduler, sample_sigmas

BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "aligned")


def make_betas(
    num_train_timesteps: int,
    beta_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> torch.Tensor:
    """Beta schedule (T,): 'linear' (Ho et al. 2020) or 'squaredcos_cap_v2' (Nichol & Dhariwal 2021).

    The cosine schedule sets abar(t) = cos^2(((t/T + 0.008) / 1.008) * pi/2) and
    beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999).
    """
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "squaredcos_cap_v2":

        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        T = num_train_timesteps
        betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; choose one of {BETA_SCHEDULES}")


@dataclass
class SchedulerOutput:
    prev_sample: torch.Tensor  # x_{t_prev}, (B, C, H, W)
    pred_original_sample: torch.Tensor  # predicted x_0, (B, C, H, W)


class _Scheduler:
    """What the samplers share: the schedule, `add_noise` and `set_timesteps`."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        aligned_base: int = 64,
        prediction_type: str = "epsilon",
    ):
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}; choose one of {TIMESTEP_SPACINGS}")
        if predictions.is_flow(prediction_type):
            raise ValueError(f"{type(self).__name__} samples the VP process x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps; "
                             f"a flow_prediction model needs {' or '.join(FLOW_SAMPLERS)} (flow.py)")  # fmt: skip
        self.num_train_timesteps = num_train_timesteps
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset
        self.aligned_base = aligned_base
        self.prediction_type = predictions.check_prediction_type(prediction_type)  # what model_output is
        self.betas = make_betas(num_train_timesteps, beta_schedule, beta_start, beta_end)  # (T,)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # abar_t, (T,)
        self._on_device: dict[torch.device, torch.Tensor] = {}  # alphas_cumprod_on's copies
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)  # until set_timesteps is called

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the timesteps to visit, from noisiest to cleanest.

        'leading':  t_k = k * (T // n) + steps_offset, k = n-1 ... 0   (DDIM paper; ends at t = 0)
        'trailing': t_k = round(T - k * T / n) - 1,    k = 0 ... n-1   (Lin et al. 2024; starts at T-1)
        'aligned':  t_k = ((k + 1) B / n - 1) T // B,   k = n-1 ... 0   (this project's, for step distillation)
                    with B = `aligned_base` and n dividing B. The grid of B steps is 'leading'-like
                    (i T // B); the grid of n/2 steps is every other point of the grid of n, from the
                    same top point down, so each step of a halved sampler spans exactly two.
        """
        n, T = num_inference_steps, self.num_train_timesteps
        if not isinstance(n, int) or not 1 <= n <= T:
            raise ValueError(f"num_inference_steps must be an integer in [1, {T}], got {n!r}")
        if self.timestep_spacing == "leading":
            timesteps = torch.arange(n - 1, -1, -1) * (T // n) + self.steps_offset
        elif self.timestep_spacing == "aligned":
            B = self.aligned_base
            if B % n:
                raise ValueError(f"'aligned' spacing needs num_inference_steps dividing {B}, got {n}")
            timesteps = ((torch.arange(n - 1, -1, -1) + 1) * (B // n) - 1) * T // B
        else:
            timesteps = torch.round(torch.arange(T, 0, -T / n, dtype=torch.float64)).long() - 1
        self.num_inference_steps = n
        self.timesteps = timesteps.long()

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4); timesteps (B,)."""
        abar = self.abar_like(timesteps, original_samples)  # (B, 1, 1, 1)
        return abar.sqrt() * original_samples + (1 - abar).sqrt() * noise

    def training_timesteps(
        self, n: int, device: torch.device | str, timestep_sampling: str = "uniform"
    ) -> torch.Tensor:  # fmt: skip
        """n training timesteps (n,): integers uniform in [0, T) (Ho et al. 2020, Algorithm 1), or with
        'logit_normal' floor(u T) for u from SD3's logit-normal density (flow.sample_sigmas), which puts the
        train steps on the middle timesteps."""
        if timestep_sampling == "logit_normal":
            u = sample_sigmas(n, timestep_sampling, device)  # (n,) in (0, 1)
            return (u * self.num_train_timesteps).long().clamp_(max=self.num_train_timesteps - 1)  # (n,)
        if timestep_sampling != "uniform":
            raise ValueError(f"unknown timestep_sampling {timestep_sampling!r}; choose logit_normal or uniform")
        return torch.randint(0, self.num_train_timesteps, (n,), device=device)  # (n,)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the network learns to output at x_t = add_noise(x0, noise, timesteps) (B, C, H, W): eps or v."""
        return predictions.training_target(x0, noise, self.abar_like(timesteps, x0), self.prediction_type)

    def abar_like(self, timesteps: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """abar at timesteps (B,), shaped (B, 1, 1, 1) to broadcast against `sample`, on its device and in its dtype."""
        abar = self.alphas_cumprod_on(sample.device)[timesteps].to(sample.dtype)  # (B,)
        return abar.view(-1, *([1] * (sample.ndim - 1)))  # (B, 1, 1, 1)

    def alphas_cumprod_on(self, device: torch.device) -> torch.Tensor:
        """abar (T,) on `device`, copied there once: a copy from the host at every train step would make
        a GPU wait for it."""
        if device not in self._on_device:
            self._on_device[device] = self.alphas_cumprod.to(device)
        return self._on_device[device]

    def _abar(self, t: int) -> torch.Tensor:
        return self.alphas_cumprod[t]

    def _next_in_grid(self, timestep: int) -> int:
        """The timestep after `timestep` in `timesteps`; -1 (abar = 1, or abar_0 for DDIM without
        `set_alpha_to_one`) after the last."""
        index = int((self.timesteps == int(timestep)).nonzero()[0, 0])
        return int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1

    def _predict_x0(self, model_output: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        """x_0 from model_output (predictions.to_x0: for eps, (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), eq. 15
        of Ho et al.; for v, sqrt(abar_t) x_t - sqrt(1 - abar_t) v), clipped if `clip_sample`."""
        x0 = predictions.to_x0(model_output, sample, self._abar(t), self.prediction_type)
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0


def _noise_like(x: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise like x (B, C, H, W), drawn on the generator's device, so a CPU generator gives
    the same numbers whichever device the sample lives on. A list of B generators (as diffusers takes)
    draws each sample's noise from its own: the images then do not depend on how samples are batched."""
    if isinstance(generator, list):
        rows = [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype) for g in generator]
        return torch.stack(rows).to(x.device)  # (B, C, H, W)
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


class DDPMScheduler(_Scheduler):
    """Ancestral sampling from the posterior q(x_{t'} | x_t, x_0) (Ho et al. 2020, eq. 6-7).

    With t' the next timestep in `timesteps` (-1 after the last, where abar = 1), a_t = abar_t / abar_t'
    and b_t = 1 - a_t:
        mean     = sqrt(abar_t') b_t / (1 - abar_t) * x_0 + sqrt(a_t) (1 - abar_t') / (1 - abar_t) * x_t
        variance = (1 - abar_t') / (1 - abar_t) * b_t          ("fixed_small"; no noise at t = 0)
    x_0 comes from model_output as `prediction_type` says (predictions.to_x0), clipped if `clip_sample`.
    """

    def previous_timestep(self, timestep: int) -> int:
        return int(timestep) - 1 if self.num_inference_steps is None else self._next_in_grid(timestep)

    def _posterior(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(coefficient of x_0, coefficient of x_t, variance) of q(x_{t'} | x_t, x_0)."""
        prev_t = self.previous_timestep(t)
        abar_t = self._abar(t)
        abar_prev = self._abar(prev_t) if prev_t >= 0 else torch.tensor(1.0)
        alpha_t = abar_t / abar_prev
        beta_t = 1 - alpha_t
        coef_x0 = abar_prev.sqrt() * beta_t / (1 - abar_t)
        coef_xt = alpha_t.sqrt() * (1 - abar_prev) / (1 - abar_t)
        variance = ((1 - abar_prev) / (1 - abar_t) * beta_t).clamp(min=1e-20)
        return coef_x0, coef_xt, variance

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> SchedulerOutput:
        t = int(timestep)
        x0 = self._predict_x0(model_output, t, sample)  # (B, C, H, W)
        coef_x0, coef_xt, variance = self._posterior(t)
        prev_sample = coef_x0 * x0 + coef_xt * sample
        if t > 0:
            prev_sample = prev_sample + variance.sqrt() * _noise_like(sample, generator)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


class DDIMScheduler(_Scheduler):
    """DDIM (Song et al. 2021, eq. 12), with t' = t - T // n as in diffusers (the next grid point for 'aligned'):

        x_t' = sqrt(abar_t') x_0 + sqrt(1 - abar_t' - sigma_t^2) eps + sigma_t z,
        sigma_t = eta * sqrt((1 - abar_t') / (1 - abar_t)) * sqrt(1 - abar_t / abar_t')   (eq. 16)

    eta = 0 is the deterministic sampler; eta = 1 is DDPM's variance. After the last step abar_t' is
    1 (`set_alpha_to_one`) or abar_0. x_0 and eps come from model_output as `prediction_type` says
    (predictions.py; for v, x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v, eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t).
    With `use_clipped_model_output` eps is instead re-derived from the clipped x_0, as diffusers does.
    """

    def __init__(self, *args, set_alpha_to_one: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

    def previous_timestep(self, timestep: int) -> int:
        """diffusers' t - T // n; the next grid point for 'aligned'."""
        if self.timestep_spacing == "aligned" and self.num_inference_steps is not None:
            return self._next_in_grid(timestep)
        n = self.num_inference_steps or self.num_train_timesteps
        return int(timestep) - self.num_train_timesteps // n

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
    ) -> SchedulerOutput:
        """One step of the equation above, with x_0 and eps from model_output."""
        t = int(timestep)
        x0 = self._predict_x0(model_output, t, sample)  # (B, C, H, W)
        if use_clipped_model_output:
            eps = predictions.eps_from_x0(x0, sample, self._abar(t))  # (B, C, H, W)
        else:
            eps = predictions.to_eps(model_output, sample, self._abar(t), self.prediction_type)
        return self._update(x0, eps, t, sample, eta, generator)

    def _update(
        self,
        x0: torch.Tensor,
        eps: torch.Tensor,
        t: int,
        sample: torch.Tensor,
        eta: float,
        generator: torch.Generator | None,
    ) -> SchedulerOutput:
        """The update of the equation above from x_0 and eps (B, C, H, W): what every variant of the step shares."""
        prev_t = self.previous_timestep(t)
        abar_t = self._abar(t)
        abar_prev = self._abar(prev_t) if prev_t >= 0 else self.final_alpha_cumprod
        sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
        prev_sample = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).sqrt() * eps
        if eta > 0:
            prev_sample = prev_sample + sigma * _noise_like(sample, generator)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


class DPMSolverMultistepScheduler(_Scheduler):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models", Algorithm 2): a second-order multistep solver of the diffusion ODE in data
    prediction, the options and numbers of diffusers' `DPMSolverMultistepScheduler` (algorithm_type
    'dpmsolver++', solver_order 2, solver_type 'midpoint', final_sigmas_type 'zero').

    With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t), and the
    step i going from t_i to t_{i+1} with h_i = lambda_{t_{i+1}} - lambda_{t_i}:
        1. x0_i    = (x_i - sigma_i eps_i) / alpha_i       the data prediction (clipped if clip_sample)
        2. D_i     = x0_i + (x0_i - x0_{i-1}) / (2 r_i),   r_i = h_{i-1} / h_i   (D_i = x0_i: first order)
        3. x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (exp(-h_i) - 1) D_i
    Step 1 is for eps; any other output o becomes x0_i as `prediction_type` says (predictions.py; for v,
    x0_i = alpha_i x_i - sigma_i o). The first step has no x0_{i-1} and is first order (that is DDIM); so
    is the last, which ends at sigma = 0 and returns x0 (diffusers' final_sigmas_type 'zero').
    `set_timesteps` forgets the previous x0.

    With CFG at s > 1 a guided eps can imply an x0 far outside [-1, 1], most of all at the noisiest
    timesteps of the cosine schedule (alpha_999 = 0.00005 there): unclipped, that x0 is carried into
    every later step and the samples diverge. `clip_sample` (on by default, as for DDIM) keeps x0 in
    [-1, 1]; `lambda_min_clipped` (diffusers' other remedy) skips the timesteps with lambda below it.
    """

    def __init__(
        self,
        *args,
        timestep_spacing: str = "linspace",
        lambda_min_clipped: float = -math.inf,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if timestep_spacing not in ("linspace", "leading", "trailing"):
            raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}; choose linspace, leading or trailing")
        self.timestep_spacing, self.aligned_base = timestep_spacing, None
        self.lambda_min_clipped = lambda_min_clipped
        abar = self.alphas_cumprod
        self.lambdas = torch.log(abar.sqrt()) - torch.log((1 - abar).sqrt())  # (T,) lambda_t, decreasing in t
        self._previous: tuple[int, torch.Tensor] | None = None  # (step index, x0) of the last step

    def set_timesteps(self, num_inference_steps: int) -> None:
        """diffusers' spacings, below the last timestep whose lambda is at least `lambda_min_clipped`:
        'linspace': round(linspace(0, last, n + 1))[::-1][:-1]; 'leading': k (last // (n + 1)), k = n ... 1;
        'trailing': round(arange(last, 0, -T / n)) - 1."""
        n, T = num_inference_steps, self.num_train_timesteps
        if not isinstance(n, int) or not 1 <= n <= T:
            raise ValueError(f"num_inference_steps must be an integer in [1, {T}], got {n!r}")
        last = T - int(torch.searchsorted(torch.flip(self.lambdas, [0]), self.lambda_min_clipped))
        if self.timestep_spacing == "linspace":
            timesteps = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        elif self.timestep_spacing == "leading":
            timesteps = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1] + self.steps_offset
        else:
            timesteps = np.arange(last, 0, -T / n).round() - 1
        self.timesteps = torch.from_numpy(timesteps.astype(np.int64))
        self.num_inference_steps = len(self.timesteps)
        sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5  # (T,) the noise-to-signal ratio
        sigmas = np.interp(timesteps, np.arange(T), sigmas.numpy())  # at the timesteps, as diffusers does
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))  # (n + 1,)
        self._previous = None

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        **ignored: object,
    ) -> SchedulerOutput:
        """One step of the equations above from `timestep`. diffusers' other arguments (a generator, say)
        are accepted and ignored: an ODE solver draws no noise."""
        i = int((self.timesteps == int(timestep)).nonzero()[0, 0])
        alpha_s, sigma_s, lambda_s = self._coefficients(self.sigmas[i])
        alpha_t, sigma_t, lambda_t = self._coefficients(self.sigmas[i + 1])
        x0 = predictions.x0_from_output(model_output, sample, alpha_s, sigma_s, self.prediction_type)  # 1. (B, C, H, W)
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        h = lambda_t - lambda_s
        D = x0
        last = i == len(self.timesteps) - 1  # ends at sigma = 0: first order
        if self._previous is not None and self._previous[0] == i - 1 and not last:
            r = (lambda_s - self._coefficients(self.sigmas[i - 1])[2]) / h
            D = x0 + 0.5 * (1.0 / r) * (x0 - self._previous[1])  # 2.
        prev_sample = (sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * D  # 3.
        self._previous = (i, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    @staticmethod
    def _coefficients(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The noise-to-signal ratio sigma = sigma_t / alpha_t -> (alpha_t, sigma_t, lambda_t), with
        alpha_t^2 + sigma_t^2 = 1 and lambda_t = log alpha_t - log sigma_t."""
        alpha = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha, sigma * alpha, torch.log(alpha) - torch.log(sigma * alpha)


class DDIMCFGPPScheduler(DDIMScheduler):
    """DDIM for CFG++ (Chung et al. 2025, "CFG++: Manifold-constrained Classifier Free Guidance for Diffusion
    Models", ICLR): x_0 comes from the guided output, as in DDIM, but the step re-noises it with the
    unconditional eps_u instead of the guided eps:

        x_0  = x_0 of the guided model_output (clipped if clip_sample)
        x_t' = sqrt(abar_t') x_0 + sqrt(1 - abar_t' - sigma_t^2) eps_u + sigma_t z

    so that x_t' stays on the unconditional noisy-data manifold; its guidance scale lambda is meant for
    [0, 1]. The sampling loop passes the unconditional output where `needs_unconditional_output` is set;
    both outputs are of the scheduler's `prediction_type`.
    """

    needs_unconditional_output = True

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        unconditional_output: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
    ) -> SchedulerOutput:
        """One CFG++ step. `use_clipped_model_output` is accepted for the sampling loop's sake; it changes
        nothing, as the direction term's eps is eps_u whatever x_0 is."""
        t = int(timestep)
        x0 = self._predict_x0(model_output, t, sample)  # (B, C, H, W)
        eps_u = predictions.to_eps(unconditional_output, sample, self._abar(t), self.prediction_type)
        return self._update(x0, eps_u, t, sample, eta, generator)


SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddim-cfg++": DDIMCFGPPScheduler,
    "ddpm": DDPMScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
    "euler": FlowMatchEulerScheduler,
    "heun": FlowMatchHeunScheduler,
}
FLOW_SAMPLERS = ("euler", "heun")  # the samplers of rectified flow (flow.py); the others are VP samplers


def default_sampler(scheduler_config: dict) -> str:
    """The sampler a model gets unless told otherwise: 'euler' for a flow model, 'ddim' for eps and v."""
    return FLOW_SAMPLERS[0] if predictions.is_flow(scheduler_config.get("prediction_type")) else "ddim"


def check_sampler(name: str, scheduler_config: dict, what: str) -> None:
    """A UserError unless the sampler `name` integrates the process the model (`what`) was trained on."""
    flow_model = predictions.is_flow(scheduler_config.get("prediction_type"))
    if flow_model and name not in FLOW_SAMPLERS:
        raise UserError(f"{what} is a rectified-flow model (prediction_type flow_prediction): sample it with "
                        f"{' or '.join(FLOW_SAMPLERS)}; {name} integrates the VP process x_t = sqrt(abar) x_0 + "
                        "sqrt(1 - abar) eps, which it was not trained on")  # fmt: skip
    if not flow_model and name in FLOW_SAMPLERS:
        vp = ", ".join(k for k in SCHEDULERS if k not in FLOW_SAMPLERS)
        raise UserError(f"{what} predicts {scheduler_config.get('prediction_type', 'epsilon')} on the VP process; "
                        f"{name} is a rectified-flow sampler: choose one of {vp}")  # fmt: skip


def with_shift(scheduler_config: dict, shift: float | None, what: str, step_distilled: bool) -> dict:
    """The scheduler_config with SD3/FLUX's sigma shift (flow.py) set to `shift` for sampling (None: unchanged).
    A UserError for a VP model (no sigma grid to shift), a shift <= 0, or a step-distilled flow model at another
    shift than it was trained on (its few steps fit that grid only)."""
    if shift is None:
        return scheduler_config
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if not predictions.is_flow(prediction):
        raise UserError(f"--shift is the SD3/FLUX sigma shift of a rectified-flow sampler; {what} predicts "
                        f"{prediction} on the VP process: leave it out")  # fmt: skip
    if not shift > 0:
        raise UserError(f"--shift must be a positive number (1 is no shift, SD3 samples with 3), got {shift}")
    trained = scheduler_config.get("shift", 1.0)
    if step_distilled and shift != trained:
        raise UserError(f"{what} was step-distilled on the Euler grid of shift {trained:g}; sample it at that shift")
    return {**scheduler_config, "shift": float(shift)}


def training_scheduler(scheduler_config: dict) -> DDPMScheduler | FlowMatchEulerScheduler:
    """The forward process (add_noise, training_timesteps, training_target) that a checkpoint's scheduler_config
    describes, for the losses: rectified flow's for a flow model, else DDPM's beta schedule."""
    if predictions.is_flow(scheduler_config.get("prediction_type")):
        return FlowMatchEulerScheduler(**scheduler_config)
    return DDPMScheduler(**scheduler_config)

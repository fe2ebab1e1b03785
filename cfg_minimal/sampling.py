"""The sampling loop and the Pipeline: a model, a scheduler and what they were trained on.

    images = load_pipeline("runs/digits/teacher.pt")(labels=[3, 3, 7], guidance_scale=3.0)

Sampling is deterministic given a seed, a CPU `torch.Generator` or `x_T`: the starting noise
(`Pipeline.initial_noise`, the one place it is drawn) and any DDPM noise come from the CPU. A seed gives
each sample its own generator, tied to its index (`Pipeline.noise_generators`), for its x_T and its DDPM
noise, so every sampler gives the same images however the samples are batched, on whichever device (up
to floating-point differences between devices and batch sizes).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .checkpoint import DATASET_KEYS, load_checkpoint, model_from_checkpoint, require
from .checks import (
    check_generator,
    check_guider,
    check_labels,
    check_num_steps,
    check_scale,
    check_schedule,
    check_x_T,
    guider_rows,
    train_timesteps,
    warn_outside_range,
)
from .distributed import pick_device
from .errors import UserError
from .guidance import Guider, GuiderState, guided_noise_pred, scale_tensor
from .guiders import scheduled_scale
from .models import DiffusionModel
from .schedulers import SCHEDULERS, check_sampler, default_sampler, with_shift

DEFAULT_SAMPLING_STEPS = 50  # what num_steps defaults to, unless a checkpoint was step-distilled
# callback(i, t, x, x0_pred) after sampling step i at timestep t: the new sample and the predicted x_0
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def sample_loop(
    model: DiffusionModel,
    scheduler: Any,  # this project's DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, or diffusers'
    x_T: torch.Tensor,
    labels: torch.Tensor,
    guidance_scale: float | torch.Tensor,
    num_steps: int,
    guider: Guider | None = None,
    guidance_schedule: str = "constant",
    *,
    generator: torch.Generator | list[torch.Generator] | None = None,
    callback: StepCallback | None = None,
    batched: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """x_T (B, C, H, W) -> x_0 (B, C, H, W): at each of `num_steps` timesteps, the guided prediction, then a step.

    `guider` is the rule (guidance.CFG by default), with one GuiderState carried through the run;
    `guidance_schedule` varies s over t (guiders.scheduled_scale). `scheduler` is one of this project's or
    any diffusers scheduler (diffusers' protocol: x_T times `init_noise_sigma`, the network sees
    `scale_model_input(x, t)`); a CFG++ sampler (`needs_unconditional_output`) also gets the step's
    guiding pass. `callback(i, t, x, x0_pred)`, if given, runs after sampling step i (at timestep t) with
    the new sample x (B, C, H, W) and the step's predicted x_0 (None where the scheduler gives none):
    watch an image form. After the last step x is the returned image. Inputs are the Pipeline's, checked."""
    scheduler.set_timesteps(num_steps)
    step_kwargs = _step_kwargs(scheduler, generator)
    cfg_pp = getattr(scheduler, "needs_unconditional_output", False)
    state, T = GuiderState(keep_guide_pass=cfg_pp), train_timesteps(scheduler)
    x = x_T * getattr(scheduler, "init_noise_sigma", 1.0)
    for i, t in enumerate(tqdm(scheduler.timesteps.tolist(), desc="sampling", disable=not progress, leave=False)):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long if t == int(t) else torch.float32)
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        s = guidance_scale
        if guidance_schedule != "constant":
            s = scheduled_scale(scale_tensor(s, x.shape[0], x.device), t_batch, T, guidance_schedule)  # (B,)
        pred = guided_noise_pred(
            model, x_in, t_batch, labels, s, guider=guider, state=state, batched=batched
        )  # (B, C, H, W)
        extra = {"unconditional_output": state.guide_pred} if cfg_pp else {}
        out = scheduler.step(pred, t, x, **step_kwargs, **extra)
        x = out.prev_sample  # (B, C, H, W)
        if callback is not None:
            callback(i, t, x, getattr(out, "pred_original_sample", None))
    return x


def _step_kwargs(scheduler: object, generator: torch.Generator | list[torch.Generator] | None) -> dict:
    """The keyword arguments of `scheduler.step` besides (pred, t, x): the generator, where it takes one,
    and for DDIM `use_clipped_model_output`: eps re-derived from the clipped x_0 (as GLIDE and Imagen
    do). A guided eps at s > 1 often implies an x_0 far outside [-1, 1]; clipping x_0 but keeping that
    eps in the direction term makes the step inconsistent, and samples at s >= 3 turn to noise. The
    signature is read because diffusers' schedulers differ in what their step takes."""
    accepted = inspect.signature(scheduler.step).parameters
    wanted = {"generator": generator, "use_clipped_model_output": True}
    return {key: value for key, value in wanted.items() if key in accepted}


@dataclass
class Pipeline:
    """A trained model with its scheduler; call it to sample images in [-1, 1]."""

    model: DiffusionModel
    scheduler: Any  # any of this project's schedulers, or a diffusers scheduler
    dataset: str
    image_size: int
    channels: int
    class_names: tuple[str, ...]
    sampling_steps: int = DEFAULT_SAMPLING_STEPS  # what num_steps defaults to: a step-distilled student's own
    guidance_range: tuple[float, float] | None = None  # a student's trained range of s
    max_batch_size: int = 1024  # more labels than this are sampled in chunks, so memory stays that of one chunk

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def null_class(self) -> int:
        return self.model.null_class

    @property
    def is_student(self) -> bool:
        return self.model.is_student

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def noise_generators(self, n: int, seed: int, start: int = 0) -> list[torch.Generator]:
        """One CPU generator per sample start, ..., start + n - 1, seeded by (seed, i): it draws the sample's
        x_T and then any noise its sampler adds (DDPM), so a sample depends on its index alone, not on the
        device, the batch size or how samples are split over calls or processes."""
        # A CPU generator keeps 32 bits of its seed. For one seed the n values differ (the map is one to
        # one in i); the golden-ratio multiplier keeps the ranges of different seeds apart.
        return [torch.Generator().manual_seed((seed * 0x9E3779B9 + i) % 2**32) for i in range(start, start + n)]

    def initial_noise(
        self, n: int, rng: int | torch.Generator | list[torch.Generator] | None = None, start: int = 0
    ) -> torch.Tensor:
        """x_T (n, C, H, W) ~ N(0, I) of samples start, ..., start + n - 1, drawn on the CPU.

        With a seed (or a list of per-sample generators: `noise_generators`), sample i's noise comes from
        its own generator. A CPU generator (or None: the global one) instead draws all n in turn."""
        shape = (self.channels, self.image_size, self.image_size)
        if isinstance(rng, int):
            rng = self.noise_generators(n, rng, start)
        if isinstance(rng, list):
            return torch.stack([torch.randn(shape, generator=g) for g in rng])
        return torch.randn(n, *shape, generator=rng)

    def __call__(
        self,
        labels: Sequence[int] | torch.Tensor,
        guidance_scale: float | torch.Tensor,
        num_steps: int | None = None,
        generator: int | torch.Generator | list[torch.Generator] | None = None,
        x_T: torch.Tensor | None = None,
        progress: bool = False,
        batched: bool = True,
        callback: StepCallback | None = None,
        guider: Guider | None = None,
        guidance_schedule: str = "constant",
    ) -> torch.Tensor:
        """Sample one image per label at scale s (a float or a (B,) tensor) -> (B, C, H, W) in [-1, 1].

        `guider` is the guidance rule: guidance.CFG (the default; its options rescale, interval and
        negative_labels), or guiders' APG, CFG-Zero*, TCFG, autoguidance (teacher only), or your own
        guidance.Guider. `guidance_schedule` ('constant', 'linear', 'cosine') varies s over t.
        `generator`: a seed (each sample's x_T and sampler noise from its own generator, `noise_generators`:
        the images do not depend on batching), a list of per-sample generators, or one CPU generator.
        `callback`: see sample_loop (called per chunk of max_batch_size labels). Every input is checked
        here (checks.py); a result with NaN or inf is a UserError, never returned."""
        labels = check_labels(labels, self.num_classes).to(self.device)  # (B,)
        guider = check_guider(guider, self.model, self.scheduler, len(labels))
        schedule = check_schedule(guidance_schedule)
        num_steps = check_num_steps(self.sampling_steps if num_steps is None else num_steps, self.scheduler,
                                    self.sampling_steps, guider)  # fmt: skip
        scale = check_scale(guidance_scale, len(labels))
        warn_outside_range(scale, self.guidance_range, schedule)
        shape = (len(labels), self.channels, self.image_size, self.image_size)
        generator = check_generator(generator, len(labels))
        if isinstance(generator, int):
            generator = self.noise_generators(len(labels), generator)
        x_T = self.initial_noise(len(labels), generator) if x_T is None else check_x_T(x_T, shape)
        chunks = []
        for start in range(0, len(labels), self.max_batch_size):  # each chunk's rows of every per-sample input
            rows = slice(start, start + self.max_batch_size)
            s = scale[rows].to(self.device) if isinstance(scale, torch.Tensor) else scale
            gen = generator[rows] if isinstance(generator, list) else generator
            chunks.append(sample_loop(self.model, self.scheduler, x_T[rows].to(self.device), labels[rows], s, num_steps,
                                      guider_rows(guider, rows, self.device), schedule, generator=gen,
                                      callback=callback, batched=batched, progress=progress))  # fmt: skip
        images = torch.cat(chunks)  # (B, C, H, W)
        if not torch.isfinite(images).all():
            raise UserError(f"sampling produced NaN or inf values; check the guidance scale (far too large?), x_T "
                            f"(|x_T| up to {float(x_T.abs().max()):.3g}: it should be standard normal noise) and the "
                            "model's weights")  # fmt: skip
        return images


def sample_scale_grid(
    pipe: Pipeline,
    scales: Sequence[float],
    n_per_class: int = 1,
    num_steps: int | None = None,
    seed: int = 0,
    progress: bool = False,
    **guidance,
) -> torch.Tensor:
    """Sample every (class, scale, column) in one batch -> (R, S, K, C, H, W), the same x_T along a row.

    `guidance` are the Pipeline's keyword arguments `guider` and `guidance_schedule`."""
    R, S, K = pipe.num_classes, len(scales), n_per_class
    noise_id = (torch.arange(R)[:, None, None] * K + torch.arange(K)).expand(R, S, K).reshape(-1)  # (R*S*K,)
    # the same seed along a row: the same x_T, and the same sampler noise (DDPM), at every scale
    generators = [pipe.noise_generators(1, seed, int(i))[0] for i in noise_id]
    labels = torch.arange(R).repeat_interleave(S * K)  # (R*S*K,)
    scale = torch.tensor(scales, dtype=torch.float32).repeat_interleave(K).repeat(R)  # (R*S*K,)
    images = pipe(labels, scale, num_steps=num_steps, generator=generators, progress=progress, **guidance)
    return images.reshape(R, S, K, *images.shape[1:]).cpu()


def load_pipeline(
    path: str | Path, device: str | torch.device = "cpu", scheduler: str | None = None, weights: str = "ema",
    shift: float | None = None
) -> Pipeline:  # fmt: skip
    """Rebuild a Pipeline from one checkpoint (teacher or student), its EMA weights by default. `scheduler` is a
    name in SCHEDULERS; None is the model's own: ddim, or euler for a rectified-flow model. `shift`: a flow
    model's SD3/FLUX sigma shift for sampling (None: the checkpoint's, 1 unless set)."""
    device = pick_device(str(device))
    ckpt = require(load_checkpoint(path), DATASET_KEYS, path)
    config = with_shift(ckpt["scheduler_config"], shift, repr(str(path)), "sampling_steps" in ckpt)
    own = default_sampler(config)  # ddim, or euler for a flow model: the one a step-distilled model was trained on
    scheduler = own if scheduler is None else scheduler
    if scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler {scheduler!r}; choose one of {sorted(SCHEDULERS)}")
    check_sampler(scheduler, config, repr(str(path)))  # a flow model's samplers are euler and heun, and only it
    if scheduler != own and "sampling_steps" in ckpt:
        raise UserError(f"{str(path)!r} was step-distilled for {ckpt['sampling_steps']} {own.upper()} sampling steps "
                        f"on its own grid; sample it with the {own} sampler")  # fmt: skip
    if scheduler == "dpmsolver++":  # its own timestep spacings; the noise schedule and prediction are the model's
        config = {k: config[k] for k in ("num_train_timesteps", "beta_schedule", "prediction_type") if k in config}
    if ckpt["kind"] == "student" and getattr(SCHEDULERS[scheduler], "needs_unconditional_output", False):
        raise UserError(f"{scheduler} re-noises with the unconditional prediction, which a guidance-distilled "
                        "student does not compute; sample its teacher with it")  # fmt: skip
    try:
        noise_schedule = SCHEDULERS[scheduler](**config)
    except (TypeError, ValueError) as err:
        raise UserError(f"{str(path)!r} has a scheduler_config this code cannot read ({err})") from None
    guidance_range = ckpt.get("guidance_range")
    return Pipeline(
        model=model_from_checkpoint(ckpt, weights).to(device),
        scheduler=noise_schedule,
        dataset=ckpt["dataset"],
        image_size=ckpt["image_size"],
        channels=ckpt["channels"],
        class_names=tuple(ckpt["class_names"]),
        sampling_steps=ckpt.get("sampling_steps", DEFAULT_SAMPLING_STEPS),
        guidance_range=tuple(guidance_range) if guidance_range is not None else None,
    )

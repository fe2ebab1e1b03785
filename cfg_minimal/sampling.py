"""The sampling loop and the Pipeline: a model, a scheduler and what they were trained on.

    images = load_pipeline("runs/digits/teacher.pt")(labels=[3, 3, 7], guidance_scale=3.0)

Sampling is deterministic given a seed, a CPU `torch.Generator` or `x_T`: the starting noise
(`Pipeline.initial_noise`, the one place it is drawn) and any DDPM noise come from the CPU. A seed ties
each sample's x_T to its index, so DDIM and DPM-Solver++ give the same images however the samples are
batched, on whichever device (up to floating-point differences between devices).
"""

from __future__ import annotations

import inspect
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .checkpoint import DATASET_KEYS, load_checkpoint, model_from_checkpoint, require
from .distributed import pick_device
from .errors import UserError
from .guidance import as_scale_tensor, guided_noise_pred
from .guiders import SCHEDULES, Guider, GuiderState, guide_noise_pred, scheduled_scale
from .models import DiffusionModel
from .schedulers import SCHEDULERS

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
    generator: torch.Generator | None = None,
    batched: bool = True,
    progress: bool = False,
    callback: StepCallback | None = None,
    guider: Guider | None = None,
    guidance_schedule: str = "constant",
    **variants,
) -> torch.Tensor:
    """x_T (B, C, H, W) -> x_0 (B, C, H, W): at each of `num_steps` timesteps, eps = guided_noise_pred, then step.

    `scheduler` is one of this project's or any diffusers scheduler (diffusers' protocol: x_T times
    `init_noise_sigma`, the network sees `scale_model_input(x, t)`). `callback(i, t, x, x0_pred)`, if
    given, runs after sampling step i (at timestep t) with the new sample x (B, C, H, W) and the step's
    predicted x_0 (None where the scheduler gives none): watch an image form. After the last step x is
    the returned image. `variants` (negative_labels, rescale, interval) go to guided_noise_pred.
    `guider` (guiders.Guider) replaces the CFG rule, with one GuiderState carried through the run;
    `guidance_schedule` varies s over t (guiders.scheduled_scale). None and 'constant' are plain CFG."""
    scheduler.set_timesteps(num_steps)
    step_kwargs = _step_kwargs(scheduler, generator)
    check_guider_sampler(guider, scheduler)
    state, T = GuiderState(), train_timesteps(scheduler)
    x = x_T * getattr(scheduler, "init_noise_sigma", 1.0)
    for i, t in enumerate(tqdm(scheduler.timesteps.tolist(), desc="sampling", disable=not progress, leave=False)):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long if t == int(t) else torch.float32)
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        scale = guidance_scale
        if guidance_schedule != "constant":
            scale = scheduled_scale(as_scale_tensor(scale, len(x), x.device), t_batch, T, guidance_schedule)  # (B,)
        if guider is None:
            eps = guided_noise_pred(model, x_in, t_batch, labels, scale, batched, **variants)  # (B, C, H, W)
            out = scheduler.step(eps, t, x, **step_kwargs)
        else:
            guided = guide_noise_pred(model, x_in, t_batch, labels, scale, guider, state, batched, **variants)
            renoise = {} if guided.renoise_eps is None else {"renoise_eps": guided.renoise_eps}  # CFG++
            out = scheduler.step(guided.eps, t, x, **step_kwargs, **renoise)
        x = out.prev_sample  # (B, C, H, W)
        if callback is not None:
            callback(i, t, x, getattr(out, "pred_original_sample", None))
    return x


def check_guider_sampler(guider: Guider | None, scheduler: object) -> None:
    """CFG++ re-noises inside the step, which only this project's DDIM step takes (`renoise_eps`)."""
    if guider is not None and guider.method == "cfg++":
        if "renoise_eps" not in inspect.signature(scheduler.step).parameters:
            raise UserError("CFG++ re-noises each DDIM step with eps_u, which only this project's DDIM sampler "
                            "does; sample with the ddim sampler")  # fmt: skip


def _step_kwargs(scheduler: object, generator: torch.Generator | None) -> dict:
    """The keyword arguments of `scheduler.step` besides (eps, t, x): the generator, where it takes one,
    and for DDIM `use_clipped_model_output`: eps re-derived from the clipped x_0 (as GLIDE and Imagen
    do). A guided eps at s > 1 often implies an x_0 far outside [-1, 1]; clipping x_0 but keeping that
    eps in the direction term makes the step inconsistent, and samples at s >= 3 turn to noise."""
    accepted = inspect.signature(scheduler.step).parameters
    wanted = {"generator": generator, "use_clipped_model_output": True}
    return {key: value for key, value in wanted.items() if key in accepted}


def train_timesteps(scheduler: object) -> int:
    """T of a scheduler of this project's or of diffusers' (which keeps it in `config`)."""
    config = getattr(scheduler, "config", None)
    return int(config["num_train_timesteps"] if config is not None else scheduler.num_train_timesteps)


def check_labels(labels: Sequence[int] | torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels -> LongTensor (B,) with values in [0, num_classes] (num_classes is the null label)."""
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

    def initial_noise(self, n: int, rng: int | torch.Generator | None = None, start: int = 0) -> torch.Tensor:
        """x_T (n, C, H, W) ~ N(0, I) of samples start, ..., start + n - 1, drawn on the CPU.

        With a seed, sample i's noise comes from its own generator, seeded by (seed, i): it depends on the
        sample's index alone, not on the device, the batch size or how samples are split over calls or
        processes. A CPU generator (or None: the global one) instead draws all n in turn."""
        shape = (self.channels, self.image_size, self.image_size)
        if isinstance(rng, int):
            # A CPU generator keeps 32 bits of its seed. For one seed the n values differ (the map is one to
            # one in i); the golden-ratio multiplier keeps the ranges of different seeds apart.
            seeds = [(rng * 0x9E3779B9 + i) % 2**32 for i in range(start, start + n)]
            return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        return torch.randn(n, *shape, generator=rng)

    def __call__(
        self,
        labels: Sequence[int] | torch.Tensor,
        guidance_scale: float | torch.Tensor,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        x_T: torch.Tensor | None = None,
        progress: bool = False,
        batched: bool = True,
        negative_labels: Sequence[int] | int | torch.Tensor | None = None,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[int, int] | None = None,
        callback: StepCallback | None = None,
        guider: Guider | None = None,
        guidance_schedule: str = "constant",
    ) -> torch.Tensor:
        """Sample one image per label at scale s (a float or a (B,) tensor) -> (B, C, H, W) in [-1, 1].

        Guidance variants (see guidance.guided_noise_pred): `negative_labels` (one id for all, or one per
        label) replace the null label in the unconditional pass; `guidance_rescale` is phi in [0, 1];
        `guidance_interval` = (t_lo, t_hi) guides only at timesteps t_lo <= t <= t_hi. `guider`
        (guiders.Guider: APG, CFG-Zero*, CFG++, TCFG, autoguidance; teacher only) replaces the CFG rule;
        `guidance_schedule` ('constant', 'linear', 'cosine') varies s over t. `callback`: see
        sample_loop (called per chunk of max_batch_size labels). The scale is checked by as_scale_tensor
        (a tensor once, on the CPU). A result with NaN or inf is a UserError, never returned."""
        labels = check_labels(labels, self.num_classes).to(self.device)  # (B,)
        variants = self._check_variants(len(labels), negative_labels, guidance_rescale, guidance_interval)
        variants.update(self._check_guider(guider, guidance_schedule, guidance_rescale))
        num_steps = self.sampling_steps if num_steps is None else num_steps
        self._check_num_steps(num_steps)
        self._warn_outside_range(guidance_scale)
        x_T = self.initial_noise(len(labels), generator) if x_T is None else self._check_x_T(x_T, len(labels))
        if isinstance(guidance_scale, torch.Tensor):  # checked on the CPU, moved once, not at every step
            guidance_scale = as_scale_tensor(guidance_scale.cpu(), len(labels), "cpu").to(self.device)
        chunks = []
        for start in range(0, len(labels), self.max_batch_size):
            rows = slice(start, start + self.max_batch_size)
            part = {k: _rows(v, rows) for k, v in variants.items()}
            chunks.append(sample_loop(self.model, self.scheduler, x_T[rows].to(self.device), labels[rows],
                                      _rows(guidance_scale, rows), num_steps, generator, batched, progress,
                                      callback, **part))  # fmt: skip
        images = torch.cat(chunks)  # (B, C, H, W)
        if not torch.isfinite(images).all():
            raise UserError("sampling produced NaN or inf values; is the guidance scale far too large?")
        return images

    def _check_guider(self, guider: Guider | None, schedule: str, rescale: float) -> dict:
        """The guider and schedule as sample_loop's keyword arguments (none for plain CFG), or a UserError."""
        if schedule not in SCHEDULES:
            raise UserError(f"unknown guidance_schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        kwargs: dict = {} if schedule == "constant" else {"guidance_schedule": schedule}
        if guider is None or (guider.method == "cfg" and guider.stateless):
            return kwargs  # plain CFG: guided_noise_pred, as without a guider
        if not isinstance(guider, Guider):
            raise UserError(f"guider must be a cfg_minimal.guiders.Guider, got {type(guider).__name__}")
        if self.is_student:
            raise UserError(f"a guidance-distilled student cannot sample with the {guider.method} guider: it "
                            "has no eps_u and eps_c; sample its teacher, or distil with --distill-guider")  # fmt: skip
        if rescale:
            raise UserError("guidance_rescale is a variant of plain CFG; it does not combine with a guider")
        if guider.guide_model is not None:
            if guider.guide_model.num_classes != self.num_classes or guider.guide_model.is_student:
                raise UserError("autoguidance's guiding model must be a teacher of the same dataset")
            guider = replace(guider, guide_model=guider.guide_model.to(self.device).eval())
        return {**kwargs, "guider": guider}

    def _check_x_T(self, x_T: torch.Tensor, batch_size: int) -> torch.Tensor:
        """A user's starting noise (a tensor or an array) as finite float32 of the right shape, or a UserError."""
        shape = (batch_size, self.channels, self.image_size, self.image_size)
        try:
            x_T = torch.as_tensor(x_T, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise UserError(f"x_T must be a tensor or an array of numbers, got {type(x_T).__name__}") from None
        if tuple(x_T.shape) != shape:
            raise UserError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
        if not torch.isfinite(x_T).all():
            raise UserError("x_T holds NaN or inf; the starting noise must be finite")
        return x_T

    def _check_num_steps(self, num_steps: int) -> None:
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise UserError(f"num_steps must be a positive integer, got {num_steps!r}")
        if num_steps > train_timesteps(self.scheduler):
            raise UserError(f"num_steps must be at most {train_timesteps(self.scheduler)} (the training timesteps)")
        base = getattr(self.scheduler, "aligned_base", None)  # a step-distilled model's grid (this project's DDIM)
        if getattr(self.scheduler, "timestep_spacing", None) == "aligned" and base % num_steps:
            raise UserError(
                f"this model was step-distilled on a grid of {base} sampling steps halved: num_steps must "
                f"divide {base} (it was trained for {self.sampling_steps}), got {num_steps}"
            )

    def _warn_outside_range(self, scale: float | torch.Tensor) -> None:
        """A student was taught s in its guidance_range only; beyond it, it extrapolates."""
        if self.guidance_range is None or not isinstance(scale, (numbers.Real, torch.Tensor)):
            return  # a teacher, or a scale that guided_noise_pred will refuse
        lo, hi = self.guidance_range
        s = torch.as_tensor(scale)
        if bool(((s < lo) | (s > hi)).any()):
            warnings.warn(
                f"guidance scale outside the student's trained range [{lo:g}, {hi:g}]: it was never taught "
                "these scales, so expect it to drift from its teacher",
                stacklevel=3,
            )

    def _check_variants(
        self,
        batch_size: int,
        negative_labels: Sequence[int] | int | torch.Tensor | None,
        rescale: float,
        interval: tuple[int, int] | None,
    ) -> dict:
        """The guidance variants as guided_noise_pred's keyword arguments, or a UserError that says what to fix."""
        variants: dict = {}
        if negative_labels is not None:
            negative = torch.as_tensor(negative_labels)
            negative = check_labels(negative.expand(batch_size) if negative.ndim == 0 else negative, self.num_classes)
            if len(negative) != batch_size:
                raise UserError(f"negative_labels must be one id or one per label ({batch_size}), got {len(negative)}")
            variants["negative_labels"] = negative.to(self.device)
        if isinstance(rescale, bool) or not (isinstance(rescale, numbers.Real) and 0.0 <= rescale <= 1.0):
            raise UserError(f"guidance_rescale must be a number in [0, 1] (0 is plain CFG), got {rescale!r}")
        if rescale:
            variants["rescale"] = float(rescale)
        if interval is not None:
            T = train_timesteps(self.scheduler)
            pair = isinstance(interval, (tuple, list)) and len(interval) == 2
            ints = pair and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in interval)
            if not (ints and 0 <= interval[0] <= interval[1] < T):
                raise UserError(f"guidance_interval must be timesteps (t_lo, t_hi) with 0 <= t_lo <= t_hi < {T}, "
                                f"got {interval!r}")  # fmt: skip
            variants["interval"] = (int(interval[0]), int(interval[1]))
        return variants


def _rows(value: object, rows: slice) -> object:
    """A per-sample (B,) tensor cut to `rows`; anything else (a float, an interval) is shared by every chunk."""
    return value[rows] if isinstance(value, torch.Tensor) and value.ndim == 1 else value


def sample_scale_grid(
    pipe: Pipeline,
    scales: Sequence[float],
    n_per_class: int = 1,
    num_steps: int | None = None,
    seed: int = 0,
    progress: bool = False,
    **variants,
) -> torch.Tensor:
    """Sample every (class, scale, column) in one batch -> (R, S, K, C, H, W), the same x_T along a row.

    `variants` are the Pipeline's guidance keyword arguments (negative_labels as one id)."""
    R, S, K = pipe.num_classes, len(scales), n_per_class
    x_T = pipe.initial_noise(R * K, seed).view(R, K, pipe.channels, pipe.image_size, pipe.image_size)
    x_T = x_T[:, None].expand(R, S, *x_T.shape[1:]).reshape(R * S * K, *x_T.shape[2:])  # (R*S*K, C, H, W)
    labels = torch.arange(R).repeat_interleave(S * K)  # (R*S*K,)
    scale = torch.tensor(scales, dtype=torch.float32).repeat_interleave(K).repeat(R)  # (R*S*K,)
    images = pipe(labels, scale, num_steps=num_steps, x_T=x_T, progress=progress, **variants)
    return images.reshape(R, S, K, *images.shape[1:]).cpu()


def load_pipeline(
    path: str | Path, device: str | torch.device = "cpu", scheduler: str = "ddim", weights: str = "ema"
) -> Pipeline:
    """Rebuild a Pipeline from one checkpoint (teacher or student), its EMA weights by default."""
    device = pick_device(str(device))
    ckpt = require(load_checkpoint(path), DATASET_KEYS, path)
    if scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler {scheduler!r}; choose one of {sorted(SCHEDULERS)}")
    config = ckpt["scheduler_config"]
    if scheduler != "ddim" and "sampling_steps" in ckpt:
        raise UserError(f"{str(path)!r} was step-distilled for {ckpt['sampling_steps']} DDIM sampling steps on "
                        "its own grid; sample it with the ddim sampler")  # fmt: skip
    if scheduler == "dpmsolver++":  # its own timestep spacings; the noise schedule is the model's
        config = {key: config[key] for key in ("num_train_timesteps", "beta_schedule") if key in config}
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

"""Teacher training: eps-prediction MSE with label dropout, AdamW, EMA, checkpoints, progress.

Loss (Ho et al. 2020, eq. 14; Ho & Salimans 2022, Algorithm 1):
    L = E_{x_0, y, t, eps} || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t, y_dropped) ||^2
where y_dropped is the null label with probability p_uncond (done inside the LabelEmbedder).

`fit` is the loop that teacher training and distillation share: it checkpoints atomically every
`checkpoint_every` steps and on Ctrl-C / SIGTERM, and resumes with the optimizer, EMA and RNG state,
so an interrupted run continues exactly where it stopped. Under torchrun it runs in every process
with DistributedDataParallel (see `fit` and distributed.py); a single process runs as it always did.
"""

from __future__ import annotations

import copy
import math
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import load_checkpoint, save_checkpoint
from .data import ImageData, dataset_info, load_dataset
from .errors import UserError
from .models import DiffusionModel, build_model
from .schedulers import DDPMScheduler

# Defaults per dataset: digits trains in ~2 CPU minutes, MNIST in minutes on one GPU; CIFAR-10 (3x32x32)
# gets a wider UNet (unet-cifar, 5.1M parameters) and ~100 epochs of teacher training at batch 128.
RECIPES: dict[str, dict[str, str | int]] = {
    "digits": dict(arch="unet", teacher_steps=700, distill_steps=1300),
    "mnist": dict(arch="unet", teacher_steps=10000, distill_steps=5000),
    "fashion-mnist": dict(arch="unet", teacher_steps=10000, distill_steps=5000),
    "cifar10": dict(arch="unet-cifar", teacher_steps=40000, distill_steps=20000),
}


# Where an architecture needs other defaults on a dataset. On digits the DiT trains at ~0.7x the UNet's
# CPU speed but its student converges in fewer steps (measured), so 700 keeps it in the same 6 minutes.
ARCH_RECIPES: dict[tuple[str, str], dict[str, int]] = {("digits", "dit"): dict(distill_steps=700)}


def recipe(dataset: str, arch: str) -> dict[str, str | int]:
    """The defaults for `dataset` trained with `arch`."""
    return {**RECIPES[dataset], **ARCH_RECIPES.get((dataset, arch), {})}


@dataclass
class TrainConfig:
    dataset: str = "digits"
    data_dir: str = "./data"
    arch: str | None = None  # None: RECIPES[dataset]["arch"]
    steps: int | None = None  # None: RECIPES[dataset]["teacher_steps"]
    batch_size: int = 128  # per process: under torchrun the effective batch is batch_size x processes
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    p_uncond: float = 0.1
    ema_decay: float = 0.999
    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 500


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA, then MPS, then CPU; anything else is passed to torch.device.

    Under torchrun, 'auto' and 'cuda' mean this process's own GPU, cuda:LOCAL_RANK, and 'auto' skips MPS."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", distributed.local_rank() if distributed.is_distributed() else None)
        mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        if mps and not distributed.is_distributed():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is visible; use --device cpu")
    if device.type == "cuda" and distributed.is_distributed():
        if device.index is not None:
            raise UserError("under torchrun each process uses its own GPU (LOCAL_RANK): pass --device cuda, not cuda:N")
        device = torch.device("cuda", distributed.local_rank())
    return device


def lr_at(step: int, lr: float, warmup: int, total: int) -> float:
    """Linear warmup for `warmup` steps, then cosine decay to lr / 10 at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


@contextmanager
def stop_requests() -> Iterator[Callable[[], bool]]:
    """While training, Ctrl-C and SIGTERM only raise a flag; the loop checks it between steps, so a
    checkpoint never holds half a step (a half-applied optimizer update, a consumed RNG draw)."""
    requested: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = [signal.signal(sig, lambda signum, frame: requested.append(signum)) for sig in signals]
    except ValueError:  # not the main thread: leave signals alone
        yield lambda: False
        return
    try:
        yield lambda: bool(requested)
    finally:
        for sig, handler in zip(signals, previous):
            signal.signal(sig, handler)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class FitResult:
    ema: DiffusionModel  # the EMA weights, in eval mode: what sampling uses
    losses: list[float]  # mean loss per `log_every` steps (over all processes under torchrun)
    model: DiffusionModel  # the last trained weights (not averaged), unwrapped from DDP


def fit(
    model: DiffusionModel,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    data: ImageData,
    path: Path,
    metadata: dict[str, Any],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    weight_decay: float,
    grad_clip: float,
    ema_decay: float,
    device: torch.device,
    checkpoint_every: int,
    resume_from: dict[str, Any] | None = None,
    progress: bool = True,
    log_every: int = 10,
    seed: int = 0,
) -> FitResult:
    """Minimise loss_fn(model, x_0 (B,C,H,W), y (B,)) over random batches of `data` for `steps` steps.

    Writes `path` (metadata + model, EMA, optimizer, RNG and loss history) every `checkpoint_every`
    steps, at the end, and when interrupted; `resume_from` is such a checkpoint, loaded.

    Under torchrun (distributed.world_size() = W > 1) every process runs this loop on its own
    shard of each global batch: all ranks draw the same W * batch_size indices (with replacement,
    like the single-process loop) from a generator seeded with `seed`, and rank r keeps positions
    [r * batch_size, (r + 1) * batch_size). Noise, timesteps and label dropout come from the global
    RNG, seeded `seed + 1 + r` so that they differ between ranks. DDP averages the gradients, so
    the weights and the EMA stay identical everywhere; the logged loss is the mean over ranks; rank 0
    writes the checkpoint, which keeps every rank's RNG state for an exact resume on W processes.
    With one process none of this happens: the loop draws from the global RNG, as it always did.
    """
    world, rank = distributed.world_size(), distributed.rank()
    model.to(device).train()
    net = distributed.wrap(model, device)  # what the loss calls: DDP (gradients averaged over ranks) or the model
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sampler = torch.Generator().manual_seed(seed)  # the global batch, the same on every rank (world > 1 only)
    if world > 1:
        torch.manual_seed(seed + 1 + rank)
        if rank == 0:
            print(f"{world} processes x batch {batch_size} = effective batch {world * batch_size}")
    start, losses, window = 0, [], []  # window: losses since the last logged mean
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        ema.load_state_dict(resume_from["ema"])
        optimizer.load_state_dict(resume_from["optimizer"])
        start, losses = resume_from["step"], list(resume_from["losses"])
        window = list(resume_from["loss_window"])
        written_by = resume_from.get("world_size", 1)
        if written_by == world:  # exact: every rank continues its own random streams
            set_rng_state(resume_from["rng"] if world == 1 else resume_from["rng_per_rank"][rank])
            if world > 1:
                sampler.set_state(resume_from["sampler_rng"])
        else:  # fresh streams, different from the run's start; the run continues, not bit for bit
            torch.manual_seed(seed + 1 + rank + start)
            sampler.manual_seed(seed + start)
            if rank == 0:
                print(f"{path} was written by {written_by} process(es), resuming on {world}: "
                      "the run continues, but not bit for bit as an uninterrupted one would")  # fmt: skip
    images, labels = data.images.to(device), data.labels.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def save(step: int) -> None:
        """Every rank calls this (gathering RNG states is collective); rank 0 writes, the others wait."""
        extra = {"world_size": world, "effective_batch_size": world * batch_size}
        if world > 1:
            extra.update(rng_per_rank=distributed.all_gather(rng_state()), sampler_rng=sampler.get_state())
        if rank == 0:
            save_checkpoint(path, {**metadata, "step": step, "total_steps": steps, "model": model.state_dict(),
                                   "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(),
                                   "losses": losses, "loss_window": window, **extra})  # fmt: skip
        distributed.barrier()  # when save returns on any rank, the file is on disk

    step = start
    bar = tqdm(total=steps, initial=start, desc=f"training {path.stem}", disable=not (progress and rank == 0),
               dynamic_ncols=True)  # fmt: skip
    with stop_requests() as stop_requested:
        while step < steps:
            if world == 1:
                idx = torch.randint(0, len(labels), (batch_size,), device=device)  # (B,)
            else:
                idx = torch.randint(0, len(labels), (world * batch_size,), generator=sampler)  # (W*B,) global batch
                idx = idx[rank * batch_size : (rank + 1) * batch_size].to(device)  # (B,) this rank's shard
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, lr, warmup_steps, steps)
            with autocast:
                loss = loss_fn(net, images[idx], labels[idx])
            value, stopping = distributed.mean_and_any(loss.detach(), stop_requested())  # the same on every rank
            if not math.isfinite(value):
                raise UserError(
                    f"the loss became {value} at step {step}; stopped, keeping the last good checkpoint "
                    f"{str(path)!r}. Lower --lr, or resume from that checkpoint with --resume"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            ema_update(ema, model, min(ema_decay, (1 + step) / (10 + step)))  # EMA warm-up
            step += 1
            window.append(value)
            if len(window) == log_every:
                losses.append(sum(window) / len(window))
                window = []
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update(1)
            if step % checkpoint_every == 0 or step == steps or stopping:
                save(step)
            if stopping and step < steps:
                bar.close()
                if rank == 0:
                    print(f"\ninterrupted at step {step}/{steps}; saved {path}. Run the same command with --resume.")
                raise KeyboardInterrupt
    bar.close()
    return FitResult(ema=ema, losses=losses, model=model)


def diffusion_loss(scheduler: DDPMScheduler) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The eps-prediction loss at uniformly drawn t in [0, T); `model` may be wrapped in DDP."""

    def loss_fn(model: nn.Module, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = torch.randint(0, scheduler.num_train_timesteps, (x0.shape[0],), device=x0.device)  # (B,)
        noise = torch.randn_like(x0)  # (B, C, H, W)
        x_t = scheduler.add_noise(x0, noise, t)
        return F.mse_loss(model(x_t, t, y).float(), noise)

    return loss_fn


def schedule_config(cfg: TrainConfig) -> dict[str, Any]:
    return dict(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule)


def train_teacher(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, progress: bool = True) -> FitResult:
    """Train a CFG teacher on cfg.dataset; writes OUT_DIR/teacher.pt and returns its EMA model.

    Under torchrun, call distributed.init() first; every process then runs this (see `fit`)."""
    dataset_info(cfg.dataset)  # an unknown name fails here, before RECIPES is looked up
    cfg = replace(cfg, arch=cfg.arch or RECIPES[cfg.dataset]["arch"])
    path = Path(out_dir) / "teacher.pt"
    resume_from = None
    if resume and path.exists():
        resume_from = load_checkpoint(path, kind="teacher")
        stored = resume_from["train_config"]
        for key in ("dataset", "arch"):
            if stored[key] != getattr(cfg, key):
                raise UserError(f"--resume: {str(path)!r} was trained with --{key} {stored[key]}, not "
                                f"{getattr(cfg, key)}; pass the same flags, or choose another --out")  # fmt: skip
        cfg = TrainConfig(**{**stored, "device": cfg.device})
    steps = cfg.steps if cfg.steps is not None else recipe(cfg.dataset, cfg.arch)["teacher_steps"]
    if steps < 1:
        raise UserError(f"--teacher-steps must be at least 1, got {steps}")
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    with distributed.main_first():  # rank 0 downloads, the others then read its copy
        data = load_dataset(cfg.dataset, cfg.data_dir, train=True)
    info = data.info
    model = build_model(cfg.arch, in_channels=info.channels, image_size=info.image_size,
                        num_classes=info.num_classes, p_uncond=cfg.p_uncond)  # fmt: skip
    metadata = dict(
        kind="teacher", model_config={"arch": cfg.arch, **model.config}, scheduler_config=schedule_config(cfg),
        dataset=cfg.dataset, image_size=info.image_size, channels=info.channels, num_classes=info.num_classes,
        class_names=list(info.class_names), train_config=asdict(cfg),
    )  # fmt: skip
    scheduler = DDPMScheduler(**schedule_config(cfg))
    return fit(
        model, diffusion_loss(scheduler), data, path, metadata, steps=steps, batch_size=cfg.batch_size, lr=cfg.lr,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
        ema_decay=cfg.ema_decay, device=pick_device(cfg.device), checkpoint_every=cfg.checkpoint_every,
        resume_from=resume_from, progress=progress, seed=cfg.seed,
    )  # fmt: skip

"""The one training loop that the three stages share: teacher, guidance distillation, step distillation.

A stage hands `fit` a model, a loss `loss_fn(model, x_0 (B, C, H, W), y (B,)) -> scalar` and an
`OptimConfig`. A loss that needs the run itself (guidance_free.ModelGuidanceLoss: the EMA weights, the train
step) has a method `bind_run(run)`, which `fit` calls once with its `Run`, set up (and restored), before the first
train step. `fit` runs AdamW (linear warm-up, cosine decay to a tenth), keeps an EMA of the
weights for sampling, and writes a checkpoint atomically every `checkpoint_every` train steps, at the
end and on Ctrl-C / SIGTERM, with the optimizer, EMA and RNG state, so a resumed run continues
exactly where the interrupted one stopped.

One train step reads top to bottom in `fit`: batch, loss, backward, clip, optimizer step, EMA.
The plumbing sits below it: `Run` (state, logging, checkpoints, restoring one) and `Batches` (random
batches, and each process's shard of them under torchrun); resume.py holds what stopping and
continuing a run needs (signals, RNG state, which settings a resumed run takes). Under torchrun every
process runs `fit` (see distributed.py); a single process never touches a collective.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import save_checkpoint
from .data import ImageData
from .errors import UserError
from .resume import rng_state, set_rng_state, stop_requests

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, x_0, y) -> scalar
StageConfig = TypeVar("StageConfig")  # TeacherConfig, DistillConfig or StepDistillConfig


@dataclass
class OptimConfig:
    """How a stage optimises. Every stage config embeds one as `.optim`, with its own defaults."""

    max_train_steps: int | None = None  # teacher and guided student: None is the per-dataset default (recipes.py)
    batch_size: int = 128  # per process: under torchrun the effective batch is batch_size x processes
    lr: float = 2e-3  # AdamW; linear warm-up over warmup_steps, then cosine decay to lr / 10
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # largest gradient norm
    ema_decay: float = 0.999  # sampling uses the EMA weights
    ema_warmup: float = 9.0  # the decay at train step t is min(ema_decay, (1 + t) / (1 + ema_warmup + t)): the EMA
    # averages about the last 1 / ema_warmup of the train steps until the decay reaches ema_decay (train step
    # ~ema_warmup / (1 - ema_decay); a power-function EMA, Karras et al. 2024); 9 is the common (1 + t) / (10 + t)
    checkpoint_every: int = 500  # train steps between checkpoints (one is also written at the end and on Ctrl-C)
    seed: int = 0
    device: str = "auto"  # auto: CUDA, then MPS, then CPU
    channels_last: bool = False  # NHWC convolutions: speed only, the same model
    compile: bool = False  # torch.compile the network: speed only, after a compile of tens of seconds
    # torch.compile's mode (COMPILE_MODES; with compile only): "reduce-overhead" replays the network's forward and
    # backward as CUDA graphs (one launch instead of hundreds: what pays on a launch-bound model). The CUDA-graph
    # modes need CUDA: on another device the network is compiled in "default" mode, and one line says so.
    compile_mode: str = "default"
    fused: bool = False  # fused AdamW (the same update in a few kernels) on CUDA; elsewhere plain AdamW, one line says


@dataclass
class FitResult:
    ema: nn.Module  # the EMA weights, in eval mode: what sampling uses
    losses: list[float]  # mean loss per `log_every` train steps (over all processes under torchrun)
    model: nn.Module  # the last trained weights (not averaged), unwrapped from DDP


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    data: ImageData,
    path: Path,
    metadata: dict[str, Any],
    optim: OptimConfig,
    resume_from: dict[str, Any] | None = None,
    progress: bool = True,
    log_every: int = 10,
) -> FitResult:
    """Minimise loss_fn(model, x_0, y) over random batches of `data` for `optim.max_train_steps` train steps.

    Writes `path` (metadata + model, EMA, optimizer, RNG state and loss history); `resume_from` is such
    a checkpoint, loaded. A non-finite loss raises a UserError and keeps the last good checkpoint."""
    device = distributed.pick_device(optim.device)
    net = prepare(model, device, optim)  # what the loss calls: model, or a compiled / DDP wrapper of it
    batches = Batches(data, optim.batch_size, optim.seed, device, optim.channels_last)
    run = Run(model, optim, path, metadata, batches, resume_from, progress, log_every)
    if hasattr(loss_fn, "bind_run"):  # a loss that reads the run: its EMA weights, its train step (model guidance)
        loss_fn.bind_run(run)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with stop_requests() as stop_requested:
        for step in range(run.train_step, run.max_train_steps):
            x0, y = batches.draw()  # (B, C, H, W), (B,)
            for group in run.optimizer.param_groups:
                group["lr"] = lr_at(step, optim.lr, optim.warmup_steps, run.max_train_steps)
            with autocast:
                loss = loss_fn(net, x0, y)  # scalar
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
            run.optimizer.step()
            ema_update(run.ema, model, ema_decay_at(step, optim))  # EMA, warmed up
            run.end_step(loss, stop_requested())  # log; check the loss; checkpoint when due; stop when asked
    return run.finish()


def prepare(model: nn.Module, device: torch.device, optim: OptimConfig) -> nn.Module:
    """Move `model` to `device` in training mode; return what the loss should call (DDP and torch.compile
    wrap it, the weights stay `model`'s). On CUDA, float32 matrix products may use TF32."""
    model.to(device, memory_format=torch.channels_last if optim.channels_last else torch.preserve_format).train()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    net = distributed.wrap(model, device)  # DDP (gradients averaged over processes) or model itself
    mode = compile_mode_on(device, optim)
    # Dynamo keys its compiled graph on the code and the tensors' shapes, not on the module object: a later stage
    # (or round) with the same architecture reuses the graph, so a run compiles once per architecture, not per stage
    return net if mode is None else torch.compile(net, mode=mode)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # capture CUDA graphs: CUDA only


def compile_mode_on(device: torch.device, optim: OptimConfig) -> str | None:
    """The torch.compile mode `fit` uses on `device`: None without optim.compile; a CUDA-graph mode on another
    device falls back to "default" (the same network and maths; graphs only remove launches), with one line."""
    if not optim.compile:
        return None
    check_optim(replace(optim, max_train_steps=1))  # an unknown mode: the one-line message, not torch's
    if optim.compile_mode in CUDA_GRAPH_MODES and device.type != "cuda":
        speed_note(f"compile_mode={optim.compile_mode!r} captures CUDA graphs, which need CUDA: on {device.type} "
                   "the network is compiled in the 'default' mode")  # fmt: skip
        return "default"
    return optim.compile_mode


def make_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `model`'s parameters: fused (one multi-tensor kernel, the same update up to rounding) when
    optim.fused and the parameters are on CUDA; elsewhere AdamW's own default, with one line if fused was asked."""
    fused = fused_on(next(model.parameters()).device, optim)
    return torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay, fused=fused or None)


def fused_on(device: torch.device, optim: OptimConfig) -> bool:
    """Whether AdamW runs fused on `device`: where asked and on CUDA (one line when asked elsewhere)."""
    if optim.fused and device.type != "cuda":
        speed_note(f"fused=True: fused AdamW is used on CUDA only; on {device.type} AdamW runs unfused")
    return optim.fused and device.type == "cuda"


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a saved optimizer state, keeping this run's kernel choice (fused or not): a run saved with fused
    AdamW on CUDA resumes unfused on the CPU and back (torch places each step counter by the group's choice)."""
    kernels = {k: optimizer.param_groups[0].get(k) for k in ("fused", "foreach")}
    optimizer.load_state_dict({**state, "param_groups": [{**g, **kernels} for g in state["param_groups"]]})


def speed_note(message: str) -> None:
    """One line about a speed setting that does not apply here (printed by the main process only)."""
    if distributed.is_main():
        print(f"note: {message}")


def lr_at(step: int, lr: float, warmup: int, total: int) -> float:
    """Linear warm-up for `warmup` train steps, then cosine decay to lr / 10 at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def ema_decay_at(step: int, optim: OptimConfig) -> float:
    """The EMA decay at train step `step` (0-based): min(ema_decay, (1 + step) / (1 + ema_warmup + step))."""
    return min(optim.ema_decay, (1 + step) / (1 + optim.ema_warmup + step))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for all parameters in one fused call."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


class Batches:
    """Random batches (with replacement) of an in-memory data set, already on the training device.

    One process draws indices from the global RNG. Under torchrun (W processes) every process draws
    the same W * batch_size indices from a generator seeded with `seed` and keeps its own slice, so
    the processes together see one global batch; the generator's state goes into the checkpoint."""

    def __init__(self, data: ImageData, batch_size: int, seed: int, device: torch.device, channels_last: bool = False):
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        self.images, self.labels = data.images.to(device), data.labels.to(device)
        self.batch_size, self.device = batch_size, device
        self.generator = torch.Generator().manual_seed(seed)  # used with several processes only

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        n, b, world, rank = len(self.labels), self.batch_size, distributed.world_size(), distributed.rank()
        if world == 1:
            idx = torch.randint(0, n, (b,), device=self.device)  # (B,)
        else:
            idx = torch.randint(0, n, (world * b,), generator=self.generator)  # (W*B,) the global batch
            idx = idx[rank * b : (rank + 1) * b].to(self.device)  # (B,) this process's shard
        return self.images[idx].contiguous(memory_format=self.layout), self.labels[idx]


class Run:
    """A run in progress: EMA, optimizer, train step, loss history, progress bar, and its checkpoint file."""

    def __init__(
        self,
        model: nn.Module,
        optim: OptimConfig,
        path: Path,
        metadata: dict[str, Any],
        batches: Batches,
        resume_from: dict[str, Any] | None,
        progress: bool,
        log_every: int,
    ):
        check_optim(optim)
        self.model, self.optim, self.path, self.metadata, self.batches = model, optim, Path(path), metadata, batches
        self.max_train_steps, self.log_every = optim.max_train_steps, log_every
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        self.optimizer = make_optimizer(model, optim)  # AdamW, fused on CUDA when optim.fused
        self.train_step, self.losses = 0, []
        self.lr_history = [[0, optim.lr]]  # [train_step, lr] at each change of the learning rate (resume.py)
        self.window_sum, self.window_len = torch.zeros(()), 0  # the losses since the last logged mean
        self.saved_step: int | None = None  # the train step of this run's last checkpoint
        self.world, self.rank = distributed.world_size(), distributed.rank()
        if self.world > 1:
            torch.manual_seed(optim.seed + 1 + self.rank)  # noise, t and label dropout differ between processes
            if self.rank == 0:
                print(f"{self.world} processes x batch {optim.batch_size} = effective batch "
                      f"{self.world * optim.batch_size}")  # fmt: skip
        if resume_from is not None:
            self.restore(resume_from)
        self.bar = tqdm(total=self.max_train_steps, initial=self.train_step, desc=f"training {self.path.stem}",
                        disable=not (progress and self.rank == 0), dynamic_ncols=True)  # fmt: skip

    def end_step(self, loss: torch.Tensor, stop_requested: bool) -> None:
        """Count the train step and add its loss to the window. Every `log_every` train steps, before a
        checkpoint and when asked to stop: check the window's mean (a NaN or inf raises, so no checkpoint
        ever holds the weights it produced), log it, write the checkpoint when due, stop when asked to.

        Only those train steps wait for the device (a GPU runs ahead of the host in between). Under
        torchrun every process checks at the same train steps, so a stop asked of one process is
        acted on at the next log point of all."""
        self.train_step += 1
        loss = loss.detach().float()  # stays on the device: no copy to the host
        self.window_sum = loss if self.window_len == 0 else self.window_sum + loss
        self.window_len += 1
        self.bar.update(1)
        logs = self.window_len == self.log_every
        due = self.train_step % self.optim.checkpoint_every == 0 or self.train_step == self.max_train_steps
        if not (logs or due or (stop_requested and self.world == 1)):
            return
        value, stopping = distributed.mean_and_any(self.window_sum / self.window_len, stop_requested)
        self.check(value)
        if logs:
            self.losses.append(value)
            self.window_sum, self.window_len = torch.zeros(()), 0
            self.bar.set_postfix(loss=f"{value:.4f}")
        if due or stopping:
            self.save()
        if stopping:  # even on the last train step: the next stage must not start
            self.bar.close()
            if self.rank == 0:
                print(f"\ninterrupted at train step {self.train_step}/{self.max_train_steps}; saved {self.path}. "
                      "Run the same command with --resume.")  # fmt: skip
            raise KeyboardInterrupt

    def check(self, value: float) -> None:
        """A non-finite mean loss stops the run; the last checkpoint was written before any bad step."""
        if math.isfinite(value):
            return
        self.bar.close()
        kept = "no checkpoint of this run was written"
        if self.saved_step is not None:
            kept = f"keeping the last good checkpoint {str(self.path)!r} (train step {self.saved_step})"
        first = self.train_step - self.window_len + 1
        raise UserError(f"the loss became {value} in train steps {first}-{self.train_step}; stopped, {kept}. "
                        "A lower learning rate usually helps")  # fmt: skip

    def finish(self) -> FitResult:
        self.bar.close()
        return FitResult(ema=self.ema, losses=self.losses, model=self.model)

    def save(self) -> None:
        """Every process calls this (gathering RNG states is collective); rank 0 writes, the others wait."""
        extra: dict[str, Any] = {"world_size": self.world, "effective_batch_size": self.world * self.optim.batch_size}
        if self.world > 1:
            extra.update(
                rng_per_rank=distributed.all_gather(rng_state()), sampler_rng=self.batches.generator.get_state()
            )
        if self.rank == 0:
            save_checkpoint(self.path, {
                **self.metadata, "train_step": self.train_step, "max_train_steps": self.max_train_steps,
                "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "rng": rng_state(),
                "losses": self.losses, "loss_window_sum": float(self.window_sum), "loss_window_len": self.window_len,
                "lr_history": self.lr_history,
                **extra,
            })  # fmt: skip
        self.saved_step = self.train_step
        distributed.barrier()  # when save returns on any process, the file is on disk

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Continue from a checkpoint: exactly when it was written by as many processes as run now."""
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        load_optimizer_state(self.optimizer, ckpt["optimizer"])
        self.train_step, self.losses = ckpt["train_step"], list(ckpt["losses"])
        self.lr_history = [list(change) for change in ckpt.get("lr_history") or self.lr_history]
        self.window_sum = torch.tensor(float(ckpt["loss_window_sum"]))
        self.window_len = int(ckpt["loss_window_len"])
        self.saved_step = self.train_step
        written_by = ckpt["world_size"]
        if written_by == self.world:  # exact: every process continues its own random streams
            set_rng_state(ckpt["rng"] if self.world == 1 else ckpt["rng_per_rank"][self.rank])
            if self.world > 1:
                self.batches.generator.set_state(ckpt["sampler_rng"])
        else:  # fresh streams, different from the run's start: the run continues, but not bit for bit
            torch.manual_seed(self.optim.seed + 1 + self.rank + self.train_step)
            self.batches.generator.manual_seed(self.optim.seed + self.train_step)
            if self.rank == 0:
                print(f"{self.path} was written by {written_by} process(es), resuming on {self.world}: "
                      "the run continues, but not bit for bit as an uninterrupted one would")  # fmt: skip


def with_optim(cfg: StageConfig, **changes: Any) -> StageConfig:
    """A stage config with `changes` to its optim block, the rest of the stage's defaults kept:
    with_optim(DistillConfig(), max_train_steps=500, lr=1e-3)."""
    return replace(cfg, optim=replace(cfg.optim, **changes))


def check_optim(optim: OptimConfig) -> None:
    """Every OptimConfig field in its range, or a UserError naming the ones that are not."""
    ok = {
        "max_train_steps": optim.max_train_steps is not None and optim.max_train_steps >= 1,
        "batch_size": optim.batch_size >= 1,
        "lr": math.isfinite(optim.lr) and optim.lr > 0,
        "warmup_steps": optim.warmup_steps >= 0,
        "weight_decay": math.isfinite(optim.weight_decay) and optim.weight_decay >= 0,
        "grad_clip": optim.grad_clip > 0,
        "ema_decay": 0 <= optim.ema_decay < 1,
        "ema_warmup": math.isfinite(optim.ema_warmup) and optim.ema_warmup >= 0,
        "checkpoint_every": optim.checkpoint_every >= 1,
        "compile_mode": optim.compile_mode in COMPILE_MODES and (optim.compile or optim.compile_mode == "default"),
    }
    bad = [f"{name}={getattr(optim, name)}" for name, fine in ok.items() if not fine]
    if bad:
        raise UserError(f"invalid training settings: {', '.join(bad)} (train steps, batch sizes and intervals are "
                        "positive integers, the learning rate a positive number, 0 <= ema_decay < 1, ema_warmup >= 0, "
                        f"compile_mode one of {', '.join(COMPILE_MODES)}; not 'default' without compile)")  # fmt: skip

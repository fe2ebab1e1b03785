"""Several processes, one model: torchrun, DistributedDataParallel, and which process does what.

`torchrun --nproc_per_node=N train_mnist.py ...` starts N copies of the script and tells each its
place through environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
`init()` joins them into one process group: NCCL when the processes train on CUDA GPUs (process
LOCAL_RANK on GPU LOCAL_RANK), gloo on the CPU. Without torchrun (WORLD_SIZE unset or 1) nothing
here does anything: world_size() is 1, rank() is 0, `wrap` returns the model itself.

Who does what: every process trains on its own shard of each batch and DistributedDataParallel
averages the gradients, so all processes hold the same weights after every train step; only rank 0
(`is_main()`) writes checkpoints, figures and logs. `pick_device` chooses each process's device.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError


def launched_by_torchrun() -> bool:
    """True when the environment asks for more than one process (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str = "auto") -> None:
    """Join torchrun's process group (a no-op for a single process, or when already joined).

    `device` is the --device flag: 'auto' or 'cuda...' with a GPU visible means NCCL and GPU
    LOCAL_RANK; 'cpu' (or no GPU) means gloo. MPS has no collective backend, so it is refused."""
    if not launched_by_torchrun() or dist.is_initialized():
        return
    if device.startswith("mps"):
        raise UserError("torchrun runs on CUDA GPUs (NCCL) or on the CPU (gloo); use --device auto, cuda or cpu")
    cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if cuda else "gloo")


def pick_device(name: str = "auto") -> torch.device:
    """The device this process computes on: 'auto' -> CUDA, then MPS, then CPU; else torch.device(name).

    Under torchrun, 'auto' and 'cuda' mean this process's own GPU, cuda:LOCAL_RANK, and 'auto' skips MPS."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank() if is_distributed() else None)
        mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        return torch.device("mps") if mps and not is_distributed() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = torch.device("meta")  # refused just below
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown or unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is visible; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA GPUs (cuda:0 ...)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for, but this machine has no usable Apple GPU; use --device cpu")
    if device.type == "cuda" and is_distributed():
        if device.index is not None:
            raise UserError("under torchrun each process uses its own GPU (LOCAL_RANK): pass --device cuda, not cuda:N")
        device = torch.device("cuda", local_rank())
    return device


def device_name(device: torch.device) -> str:
    """What a benchmark reports as its machine: the GPU's name, or the CPU and its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    """This process's index on its machine: the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process has arrived here (nothing to wait for in a single process)."""
    if is_distributed():
        dist.barrier(device_ids=[local_rank()] if dist.get_backend() == "nccl" else None)


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (say, a download into a shared folder), then the others do."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `model` when there are several processes, else `model` itself.

    DDP copies rank 0's weights to every process at construction and averages gradients during
    backward, so the optimizer steps, and hence the weights, stay identical on every rank."""
    if not is_distributed():
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_gather(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object, e.g. RNG states)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_and_any(value: torch.Tensor, flag: bool) -> tuple[float, bool]:
    """(mean of a scalar over ranks, whether any rank raised `flag`), in one all-reduce.

    The training loop uses it so that every rank logs the same loss, sees a NaN on any rank, and
    stops at the same train step when any rank is interrupted."""
    if not is_distributed():
        return value.item(), flag
    both = torch.stack([value.detach().float().reshape(()), torch.tensor(float(flag), device=value.device)])
    dist.all_reduce(both)  # sum over ranks
    return both[0].item() / world_size(), both[1].item() > 0

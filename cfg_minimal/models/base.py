"""What every denoiser shares: `model(x, t, y, guidance=None) -> eps`, its config and its conditioning."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..embeddings import Conditioning


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(8 if channels % 8 == 0 else 1, channels)


class DiffusionModel(nn.Module):
    """Base class of the denoisers: eps = model(x (B,C,H,W), t (B,), y (B,), guidance (B,) | None).

    `config` holds the constructor arguments, so `build_model(arch, **config)` rebuilds the model.
    Subclasses create `self.cond = Conditioning(...)` and implement `denoise(x, c)`.
    """

    arch: str = ""
    cond: Conditioning

    def __init__(self, **config: Any):
        super().__init__()
        self.config = config

    @property
    def num_classes(self) -> int:
        return self.cond.label.num_classes

    @property
    def null_class(self) -> int:
        return self.cond.label.num_classes

    @property
    def is_student(self) -> bool:
        return self.cond.guidance is not None

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, guidance: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.denoise(x, self.cond(t, y, guidance))  # (B, C, H, W)

    def denoise(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

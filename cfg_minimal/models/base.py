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

    It owns what every architecture shares: the image and label sizes, and the conditioning vector
    c = emb(t) + emb(y) [+ emb(s)] of width `cond_dim` (embeddings.Conditioning). Subclasses pass
    their own sizes on as `sizes` and implement `denoise(x, c)`. `config` holds every constructor
    argument, so `build_model(arch, **config)` rebuilds the model.
    """

    arch: str = ""

    def __init__(
        self,
        cond_dim: int,
        in_channels: int = 1,
        image_size: int = 16,
        num_classes: int = 10,
        p_uncond: float = 0.1,
        guidance_embed: bool = False,
        **sizes: Any,
    ):
        super().__init__()
        self.config = dict(in_channels=in_channels, image_size=image_size, num_classes=num_classes,
                           p_uncond=p_uncond, guidance_embed=guidance_embed, **sizes)  # fmt: skip
        self.in_channels, self.image_size = in_channels, image_size
        self.cond = Conditioning(cond_dim, num_classes, p_uncond, guidance_embed)

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

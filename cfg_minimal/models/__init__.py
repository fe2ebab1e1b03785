"""Model registry: `build_model(arch, **overrides)` builds any architecture by name.

An entry is a class and the sizes that differ from the class's defaults. The `-tiny` entries are
for tests; `unet-cifar` is CIFAR-10's default (its entry in data.py). A second architecture slots in by
adding its class and a few named sizes here.
"""

from __future__ import annotations

from typing import Any

from .base import DiffusionModel
from .dit import DiT
from .unet import UNet

ARCHITECTURES: dict[str, tuple[type[DiffusionModel], dict[str, Any]]] = {
    "unet": (UNet, {}),
    "unet-tiny": (UNet, dict(base_channels=8, channel_mults=(1, 2), emb_dim=32, attention=False)),
    # CIFAR-10's default: twice the width, two blocks per level, dropout as in DDPM's CIFAR model; 5.1M parameters
    "unet-cifar": (UNet, dict(base_channels=64, num_res_blocks=2, emb_dim=256, dropout=0.1)),
    "dit": (DiT, {"hidden_size": 96, "depth": 4}),
    # the GPU's DiT (recipes.PROPOSED_GPU_RECIPES, not yet measured): patch 2, 4.1M parameters for 28x28 images
    "dit-wide": (DiT, {"patch_size": 2, "hidden_size": 192, "depth": 6, "num_heads": 6}),
    "dit-tiny": (DiT, {"patch_size": 4, "hidden_size": 32, "depth": 2, "num_heads": 2}),
}


def build_model(arch: str, **overrides: Any) -> DiffusionModel:
    """Build `arch` (a key of ARCHITECTURES) with its named sizes, then `overrides` on top."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    cls, sizes = ARCHITECTURES[arch]
    model = cls(**{**sizes, **overrides})
    model.arch = arch
    return model


__all__ = ["ARCHITECTURES", "DiT", "DiffusionModel", "UNet", "build_model"]

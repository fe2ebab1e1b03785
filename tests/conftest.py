"""Shared fixtures: tiny models with random (non-zero) weights, and where the real MNIST lies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cfg_minimal.models import build_model

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TINY_ARCHS = ["unet-tiny", "dit-tiny"]


def randomize(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Overwrite every weight with noise: zero-initialised layers would make many identities trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_model(arch: str = "unet-tiny", seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize(build_model(arch, image_size=16, **kwargs), seed=seed).eval()


@pytest.fixture(params=TINY_ARCHS)
def arch(request) -> str:
    return request.param


def needs_mnist():
    return pytest.mark.skipif(not (SHARED_DATA / "MNIST").is_dir(), reason=f"real MNIST not found at {SHARED_DATA}")

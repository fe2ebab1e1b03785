"""DiT-specific behaviour: adaLN-Zero start, patch sizes, conditioning reaches every channel, config round trip."""

from __future__ import annotations

import pytest
import torch

from cfg_minimal.models import build_model


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Overwrite every parameter (zero-initialised ones included) so the network is not the identity."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def inputs(batch: int, channels: int, size: int, num_classes: int = 10):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, size, size, generator=gen)  # (B, C, H, W)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    return x, t, y


@pytest.mark.parametrize("channels, size, patch", [(1, 16, 2), (1, 16, 4), (1, 28, 7), (1, 28, 4), (3, 32, 4)])
def test_untrained_dit_predicts_exactly_zero(channels: int, size: int, patch: int) -> None:
    model = build_model("dit-tiny", in_channels=channels, image_size=size, patch_size=patch).eval()
    x, t, y = inputs(2, channels, size)
    eps = model(x, t, y)
    assert eps.shape == (2, channels, size, size)
    assert torch.equal(eps, torch.zeros_like(eps))


def test_output_depends_on_label_and_timestep() -> None:
    model = randomise(build_model("dit-tiny"))
    x, t, y = inputs(4, 1, 16)
    eps = model(x, t, y)
    assert not torch.allclose(eps, model(x, t, (y + 1) % 10))
    assert not torch.allclose(eps, model(x, (t + 100) % 1000, y))


def test_guidance_changes_every_channel() -> None:
    """CFG eps_u + s (eps_c - eps_u) moves all output channels (no channel is left unguided)."""
    model = randomise(build_model("dit-tiny", in_channels=3, image_size=32))
    x, t, y = inputs(2, 3, 32)
    eps_c = model(x, t, y)
    eps_u = model(x, t, torch.full_like(y, model.null_class))
    guided = eps_u + 3.0 * (eps_c - eps_u)  # (B, 3, H, W)
    per_channel = (guided - eps_u).abs().amax(dim=(2, 3))  # (B, 3)
    assert (per_channel > 1e-6).all()


def test_image_size_not_divisible_by_patch_size_raises() -> None:
    with pytest.raises(ValueError, match=r"28.*5"):
        build_model("dit-tiny", image_size=28, patch_size=5)


def test_config_round_trip_and_pos_embed_not_saved() -> None:
    model = randomise(build_model("dit-tiny", in_channels=3, image_size=32, num_classes=7))
    state = model.state_dict()
    assert not any("pos_embed" in key for key in state)
    rebuilt = build_model("dit-tiny", **model.config)
    rebuilt.load_state_dict(state)  # strict: same keys and shapes
    rebuilt.eval()
    x, t, y = inputs(2, 3, 32, num_classes=7)
    assert torch.equal(model(x, t, y), rebuilt(x, t, y))
    assert rebuilt.config == model.config

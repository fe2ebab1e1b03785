"""Conditioning: timestep, class label (with the null label and label dropout) and guidance scale.

Every architecture turns (t, y[, s]) into one vector c = emb(t) + emb(y) [+ emb(s)] of size
`dim` with the same `Conditioning` module, and modulates its blocks with c.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# The student embeds s * GUIDANCE_EMBED_SCALE: s in [0, 10] then spans [0, 1000], the range the
# sinusoid below is built for (integer timesteps), so a step of 0.01 in s still turns the fastest
# frequency by 1 radian. FLUX.1-dev scales its guidance by 1000 for the same reason.
GUIDANCE_EMBED_SCALE = 100.0


def sinusoidal_embedding(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) -> (B, dim): [cos(x f_k), sin(x f_k)], f_k = max_period^(-k / (dim/2)) (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = x.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class ScalarEmbedder(nn.Module):
    """A scalar per sample (timestep or guidance scale) -> sinusoid -> MLP -> (B, out_dim)."""

    def __init__(
        self, out_dim: int, freq_dim: int = 64, input_scale: float = 1.0, zero_init: bool = False, hidden: int = 0
    ):
        super().__init__()
        self.freq_dim = freq_dim
        self.input_scale = input_scale
        hidden = hidden or out_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))
        if zero_init:  # the embedding starts at exactly 0, so adding it changes nothing
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(value * self.input_scale, self.freq_dim))  # (B, out_dim)


class LabelEmbedder(nn.Module):
    """Class label -> (B, dim), with one extra row for the null label `num_classes`.

    In training mode each label is replaced by the null label with probability `p_uncond`
    (Ho & Salimans 2022, Algorithm 1), so one network learns eps(x, t, y) and eps(x, t, null).
    """

    def __init__(self, num_classes: int, dim: int, p_uncond: float = 0.1):
        super().__init__()
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {p_uncond}")
        self.num_classes = num_classes
        self.p_uncond = p_uncond
        self.table = nn.Embedding(num_classes + 1, dim)

    def drop_labels(self, y: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B,): each label replaced by the null id with probability p_uncond."""
        drop = torch.rand(y.shape, device=y.device) < self.p_uncond
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.p_uncond > 0:
            y = self.drop_labels(y)
        return self.table(y)  # (B, dim)


class Conditioning(nn.Module):
    """c = emb(t) + emb(y) [+ emb(s)] -> (B, dim); the guidance terms exist only in a student.

    A student also fades its label in over s in [0, 1]:
        emb(y, s) = emb(null) + min(s, 1) * (emb(y) - emb(null)),
    because at s = 0 it must ignore the label (eps = eps_u), and an additive emb(s), the same for
    every y, cannot cancel emb(y). emb(s) ends in a zero-initialised layer, so a student made from
    a teacher starts out as exactly the teacher's CFG prediction at s = 0 (eps_u) and s = 1 (eps_c),
    and as eps_c for every s > 1: what distillation has to learn is the extrapolation.
    """

    def __init__(self, dim: int, num_classes: int, p_uncond: float = 0.1, guidance_embed: bool = False):
        super().__init__()
        self.time = ScalarEmbedder(dim)
        self.label = LabelEmbedder(num_classes, dim, p_uncond)
        self.guidance = None
        if guidance_embed:
            self.guidance = ScalarEmbedder(dim, input_scale=GUIDANCE_EMBED_SCALE, zero_init=True)

    def forward(self, t: torch.Tensor, y: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        if (guidance is None) != (self.guidance is None):
            raise ValueError(
                "a guidance-distilled student needs `guidance` (the scale s, one per sample)"
                if self.guidance is not None
                else "this model is a CFG teacher: it takes no `guidance` input; use guided_noise_pred to guide it"
            )
        label = self.label(y)  # (B, dim)
        if self.guidance is None:
            return self.time(t) + label
        fade = guidance.clamp(0, 1)[:, None].to(label.dtype)  # (B, 1)
        null = self.label.table.weight[self.label.num_classes]  # (dim,)
        label = torch.where(fade == 1, label, null + fade * (label - null))  # exact emb(y) for s >= 1
        return self.time(t) + label + self.guidance(guidance)

"""A small class-conditional UNet (after Ho et al. 2020 and Dhariwal & Nichol 2021, much reduced).

Every residual block is modulated by the conditioning vector c (timestep + label [+ guidance]):
h = norm(h) * (1 + scale(c)) + shift(c). The last conv of each block and the output layer are
zero-initialised, so an untrained network predicts eps = 0 and each block starts as the identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import DiffusionModel, group_norm, zero_init


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.modulation = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        scale, shift = self.modulation(F.silu(c))[:, :, None, None].chunk(2, dim=1)  # 2 x (B, out, 1, 1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, zero-initialised output."""

    def __init__(self, ch: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.out = zero_init(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # 3 x (B, heads, HW, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.out(h)


class UNet(DiffusionModel):
    """eps(x, t, y[, s]): levels of `num_res_blocks` ResBlocks, halving the resolution between
    levels, a middle with self-attention, and a mirrored up path with skip connections."""

    arch = "unet"

    def __init__(
        self,
        *,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        emb_dim: int = 128,
        dropout: float = 0.0,
        attention: bool = True,
        **common: Any,
    ):
        """`common`: in_channels, image_size, num_classes, p_uncond, guidance_embed (see DiffusionModel)."""
        channel_mults = tuple(channel_mults)
        super().__init__(emb_dim, base_channels=base_channels, channel_mults=channel_mults,
                         num_res_blocks=num_res_blocks, emb_dim=emb_dim, dropout=dropout, attention=attention,
                         **common)  # fmt: skip
        in_channels = self.in_channels
        chs = [base_channels * m for m in channel_mults]
        self.in_conv = nn.Conv2d(in_channels, chs[0], 3, padding=1)

        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        prev = chs[0]
        for i, ch in enumerate(chs):
            self.down.append(
                nn.ModuleList([ResBlock(prev if j == 0 else ch, ch, emb_dim, dropout) for j in range(num_res_blocks)])
            )
            self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1) if i < len(chs) - 1 else nn.Identity())
            prev = ch

        self.mid = nn.ModuleList([ResBlock(prev, prev, emb_dim, dropout), ResBlock(prev, prev, emb_dim, dropout)])
        self.mid_attention = SelfAttention(prev) if attention else None

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(chs))):
            ch = chs[i]
            self.upsample.append(nn.Conv2d(prev, prev, 3, padding=1) if i < len(chs) - 1 else nn.Identity())
            self.up.append(
                nn.ModuleList(
                    [ResBlock(prev + ch if j == 0 else ch, ch, emb_dim, dropout) for j in range(num_res_blocks)]
                )
            )
            prev = ch

        self.out = nn.Sequential(group_norm(prev), nn.SiLU(), zero_init(nn.Conv2d(prev, in_channels, 3, padding=1)))

    def denoise(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.in_conv(x)  # (B, C0, H, W)
        skips = []
        for blocks, down in zip(self.down, self.downsample):
            for block in blocks:
                h = block(h, c)
            skips.append(h)
            h = down(h)  # (B, Ci, H / 2^i, W / 2^i)
        h = self.mid[0](h, c)
        if self.mid_attention is not None:
            h = self.mid_attention(h)
        h = self.mid[1](h, c)
        for blocks, up in zip(self.up, self.upsample):
            skip = skips.pop()
            if (
                h.shape[-2:] != skip.shape[-2:]
            ):  # nearest-neighbour upsampling to the skip's size (7 -> 14 -> 28 works too)
                h = up(F.interpolate(h, size=skip.shape[-2:], mode="nearest"))
            h = torch.cat([h, skip], dim=1)  # (B, C + Ci, H_i, W_i)
            for block in blocks:
                h = block(h, c)
        return self.out(h)  # (B, in_channels, H, W)

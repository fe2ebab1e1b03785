"""A small class-conditional Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models
with Transformers"): the image is cut into patches, the patches go through transformer blocks, and
the tokens are put back together into an image (eps prediction only, no learned variance).

adaLN-Zero: each block regresses from the conditioning c (timestep + label [+ guidance]) a shift
and scale for its (affine-free) LayerNorms and a gate for each residual branch. The regression is
zero-initialised, so every gate starts at 0 and every block starts as the identity; the output
layer is zero-initialised too, so an untrained DiT predicts eps = 0 exactly, like the UNet.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..embeddings import sinusoidal_embedding
from ..errors import UserError
from .base import DiffusionModel, zero_init


def xavier_init(linear: nn.Linear) -> nn.Linear:
    nn.init.xavier_uniform_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift  # (B, N, D) with (B, 1, D) shift and scale


def pos_embed_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding -> (grid*grid, dim): half the channels code the row, half the column."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")  # (grid, grid) each
    row_emb = sinusoidal_embedding(rows.flatten(), dim // 2)  # (grid*grid, dim/2)
    return torch.cat([row_emb, sinusoidal_embedding(cols.flatten(), dim // 2)], dim=-1)  # (grid*grid, dim)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.heads = num_heads
        self.qkv = xavier_init(nn.Linear(dim, 3 * dim))
        self.proj = xavier_init(nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, heads, N, D/heads)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D/heads)
        return self.proj(h.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class DiTBlock(nn.Module):
    """x + gate * attn(modulate(norm(x))), then the same with an MLP; shift/scale/gate come from c."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            xavier_init(nn.Linear(dim, hidden)), nn.GELU(approximate="tanh"), xavier_init(nn.Linear(hidden, dim))
        )
        self.modulation = zero_init(nn.Linear(dim, 6 * dim))  # adaLN-Zero: all gates start at 0

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mod = self.modulation(F.silu(c))[:, None]  # (B, 1, 6D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)  # 6 x (B, 1, D)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))  # (B, N, D)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))  # (B, N, D)


class DiT(DiffusionModel):
    """eps(x, t, y[, s]): patchify -> + position embedding -> `depth` DiT blocks -> adaLN + linear -> unpatchify."""

    arch = "dit"

    def __init__(
        self,
        *,
        patch_size: int = 2,
        hidden_size: int = 128,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        **common: Any,
    ):
        """`common`: in_channels, image_size, num_classes, p_uncond, guidance_embed (see DiffusionModel)."""
        super().__init__(hidden_size, patch_size=patch_size, hidden_size=hidden_size, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, **common)  # fmt: skip
        in_channels, image_size = self.in_channels, self.image_size
        if image_size % patch_size != 0:
            raise UserError(
                f"DiT: image_size {image_size} is not divisible by patch_size {patch_size}; "
                f"pick a patch_size that divides it (for 28x28 MNIST: 2, 4 or 7)"
            )
        if hidden_size % num_heads != 0 or hidden_size % 4 != 0:
            raise UserError(f"DiT: hidden_size {hidden_size} must be divisible by 4 and by num_heads {num_heads}")
        self.patch_size, self.grid = patch_size, image_size // patch_size
        self.patchify = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos_embed", pos_embed_2d(self.grid, hidden_size)[None], persistent=False)  # (1, N, D)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_modulation = zero_init(nn.Linear(hidden_size, 2 * hidden_size))
        self.final_linear = zero_init(nn.Linear(hidden_size, patch_size * patch_size * in_channels))

    def denoise(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if H != W or H != self.grid * self.patch_size:
            raise ValueError(f"this DiT was built for {self.grid * self.patch_size}-pixel square images, got {H}x{W}")
        h = self.patchify(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D), N = grid^2
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_modulation(F.silu(c))[:, None].chunk(2, dim=-1)  # 2 x (B, 1, D)
        h = self.final_linear(modulate(self.final_norm(h), shift, scale))  # (B, N, p*p*C)
        g, p = self.grid, self.patch_size
        h = h.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
        return h.reshape(B, C, H, W)  # (B, C, H, W)

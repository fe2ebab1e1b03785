"""Figures: sample grids (rows = classes, column blocks = guidance scales), loss and sweep curves.

Figures draw what they are given; sampling.sample_scale_grid makes the images of a grid."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt  # headless machines get the Agg backend automatically; notebooks keep inline
import torch
from matplotlib.backend_bases import FigureCanvasBase

from .data import to_unit_range
from .errors import UserError


def figure_path(path: str | Path) -> Path:
    """Where a figure asked for as `path` goes: `path`, with .png added when it has no suffix. A folder,
    or a suffix matplotlib cannot write, is a UserError."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{str(path)!r} is a folder; give a file name such as {str(path / 'grid.png')!r}")
    path = path if path.suffix else path.with_suffix(".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise UserError(f"cannot write a figure as {path.suffix!r}; use .png, .pdf, .svg or .jpg")
    return path


def save_figure(fig: plt.Figure, path: str | Path) -> None:
    """Write `fig` to `path` whole or not at all (a temporary file, then a rename), and close it; a full disk
    or a folder that cannot be written is a UserError naming the file, and leaves no truncated image."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write the figure {str(path)!r} ({err.strerror or err}); free some space or "
                        "choose another --out") from None  # fmt: skip
    finally:
        plt.close(fig)


def tile(images: torch.Tensor, pad: int = 1) -> torch.Tensor:
    """(R, K, C, H, W) in [-1, 1] -> one (H', W', C) image in [0, 1], R rows of K images."""
    R, K, C, H, W = images.shape
    x = torch.nn.functional.pad(to_unit_range(images.float().cpu()), (pad, pad, pad, pad), value=1.0)
    x = x.permute(0, 3, 1, 4, 2).reshape(R * (H + 2 * pad), K * (W + 2 * pad), C)  # (R*H', K*W', C)
    return x


def save_scale_grid(
    images: torch.Tensor,
    scales: Sequence[float],
    row_names: Sequence[str],
    path: str | Path,
    title: str = "",
    block_names: Sequence[str] | None = None,
) -> None:
    """images (R, S, K, C, H, W): R rows (classes), S column blocks (scales) of K images each."""
    R, S, K = images.shape[:3]
    grid = tile(images.reshape(R, S * K, *images.shape[3:]))  # (R*H', S*K*W', C)
    cell_h, cell_w = grid.shape[0] / R, grid.shape[1] / (S * K)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * S * K + 1.2), max(3.0, 0.45 * R + 1.0)), dpi=120)
    # cmap and vmin/vmax apply to one channel; RGB grids are shown as they are
    ax.imshow((grid.squeeze(-1) if grid.shape[-1] == 1 else grid).numpy(), cmap="gray", vmin=0, vmax=1)
    names = block_names or [f"s = {s:g}" for s in scales]
    ax.set_xticks([(b + 0.5) * K * cell_w for b in range(S)], names)
    ax.set_yticks([(r + 0.5) * cell_h for r in range(R)], row_names)
    for b in range(1, S):
        ax.axvline(b * K * cell_w - 0.5, color="tab:red", linewidth=1.5)
    ax.tick_params(length=0)
    ax.xaxis.tick_top()
    if title:
        ax.set_title(textwrap.fill(title, 48), fontsize=9, pad=18)
    fig.tight_layout()
    save_figure(fig, path)


def save_loss_curve(curves: dict[str, Sequence[float]], path: str | Path, every: int = 10) -> None:
    """Loss per `every` train steps, one line per named curve, log scale."""
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    for name, losses in curves.items():
        ax.plot([every * (i + 1) for i in range(len(losses))], losses, label=name)
    ax.set(xlabel="train step", ylabel="loss", yscale="log")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def plot_guidance_sweep(metrics: dict, path: str | Path) -> None:
    """Accuracy, FD and diversity against s, and FD against accuracy (the frontier), per model."""
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4), dpi=120)
    for name, model in metrics["models"].items():
        rows = model["per_scale"]
        s = [r["scale"] for r in rows]
        style = dict(marker="o", label=name, linestyle="--" if model["kind"] == "student" else "-")
        axes[0].plot(s, [r["accuracy"] for r in rows], **style)
        axes[1].plot(s, [r["fd"] for r in rows], **style)
        axes[2].plot(s, [r["diversity"] for r in rows], **style)
        axes[3].plot([r["accuracy"] for r in rows], [r["fd"] for r in rows], **style)
        for r in rows:
            axes[3].annotate(f"{r['scale']:g}", (r["accuracy"], r["fd"]), fontsize=7, xytext=(3, 3),
                             textcoords="offset points")  # fmt: skip
    axes[0].axhline(metrics["classifier_test_accuracy"], color="gray", linewidth=0.8, label="real test images")
    axes[2].axhline(1.0, color="gray", linewidth=0.8, label="real test images")
    axes[0].set(xlabel="guidance scale s", ylabel="classifier accuracy", title="class fidelity")
    axes[1].set(xlabel="guidance scale s", ylabel="FD to real test features", title="sample quality (lower is better)")
    axes[2].set(xlabel="guidance scale s", ylabel="within-class spread / real", title="diversity")
    axes[3].set(xlabel="classifier accuracy", ylabel="FD", title="frontier (labels: s)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    steps = metrics["sampling_steps"]
    steps = f"{steps} DDIM sampling steps" if steps else "each model's own DDIM sampling steps"
    fig.suptitle(f"{metrics['dataset']}: {metrics['n']} samples per point, {steps}")
    fig.tight_layout()
    save_figure(fig, path)

"""Per-dataset defaults: the architecture and how many train steps each stage takes.

Everything else a user changes lives in the stage configs (`TeacherConfig`, `DistillConfig`,
`StepDistillConfig`) and their shared `OptimConfig`; these are the values that differ per dataset.
The digits teacher trains in about 2 CPU minutes (the whole run in about 5); MNIST is sized for one
GPU; CIFAR-10 (3x32x32) gets a wider UNet (`unet-cifar`, 5.1M parameters) and ~100 epochs of
teacher training at batch 128.
"""

from __future__ import annotations

RECIPES: dict[str, dict[str, str | int]] = {
    "digits": dict(arch="unet", teacher_train_steps=700, distill_train_steps=1300),
    "mnist": dict(arch="unet", teacher_train_steps=10000, distill_train_steps=5000),
    "fashion-mnist": dict(arch="unet", teacher_train_steps=10000, distill_train_steps=5000),
    "cifar10": dict(arch="unet-cifar", teacher_train_steps=40000, distill_train_steps=20000),
}

# Where an architecture needs other defaults on a dataset. On digits the DiT trains at ~0.7x the UNet's
# CPU speed but its student converges in fewer train steps (measured), so 700 keeps it in the same 6 minutes.
ARCH_RECIPES: dict[tuple[str, str], dict[str, int]] = {("digits", "dit"): dict(distill_train_steps=700)}


# One GPU (`python -m benchmarks.end_to_end` on CUDA): a small network is bound by kernel launches, not
# FLOPs, so big batches pay. Measured on an H100 (docs/results.md): 25k training images/s at batch 1024
# against 7-8k at 256; the whole MNIST pipeline trains in about 2 minutes.
GPU_RECIPES: dict[str, dict[str, int]] = {
    "mnist": dict(teacher_train_steps=1500, distill_train_steps=600, round_train_steps=100, batch_size=1024),
}


def recipe(dataset: str, arch: str | None = None) -> dict[str, str | int]:
    """The defaults for `dataset` trained with `arch` (None: the dataset's default architecture)."""
    defaults = RECIPES[dataset]
    return {**defaults, **ARCH_RECIPES.get((dataset, arch or str(defaults["arch"])), {})}

"""Per-dataset defaults, read from the dataset registry: the architecture and how many train steps each stage takes.

Everything else a user changes lives in the stage configs (`TeacherConfig`, `DistillConfig`,
`StepDistillConfig`) and their shared `OptimConfig`; these are the values that differ per dataset. They
live in each data set's one entry in data.py (with why they are what they are); this module only looks
them up, so a data set registered with `data.register_dataset` gets its defaults with no other table.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

from .data import DATASETS, dataset_info
from .errors import UserError

if TYPE_CHECKING:
    from .train import TeacherConfig

LR_SCALINGS = ("none", "sqrt", "linear")


def recipe(dataset: str, arch: str | None = None) -> dict[str, str | int]:
    """The defaults for `dataset` trained with `arch` (None: the dataset's default architecture):
    {"arch": the dataset's default architecture, "teacher_train_steps": n, "distill_train_steps": n}."""
    entry = dataset_info(dataset)
    defaults = dict(arch=entry.arch, teacher_train_steps=entry.teacher_train_steps,
                    distill_train_steps=entry.distill_train_steps)  # fmt: skip
    return {**defaults, **entry.arch_overrides.get(arch or entry.arch, {})}


def teacher_config(dataset: str, **changes: Any) -> TeacherConfig:
    """The TeacherConfig `train_mnist.py --dataset DATASET` trains with: the data set's measured recipe (its
    entry's `teacher_settings` in data.py) over the dataclass defaults, then `changes` (TeacherConfig fields;
    `optim=` replaces the whole OptimConfig). A recipe naming a field that does not exist is a UserError."""
    from .train import TeacherConfig  # imported here: train.py imports this module

    cfg = TeacherConfig(dataset=dataset)
    optim = {}
    for name, value in dataset_info(dataset).teacher_settings.items():
        parent, _, leaf = name.rpartition(".")
        target = cfg.optim if parent == "optim" else cfg if not parent else None
        if target is None or leaf not in {f.name for f in fields(target)}:
            raise UserError(f"dataset {dataset!r}: teacher_settings names {name!r}, which is not a TeacherConfig field")
        if parent:
            optim[leaf] = value
        else:
            cfg = replace(cfg, **{leaf: value})
    return replace(cfg, optim=replace(cfg.optim, **optim), **changes)


class _GpuRecipes(Mapping[str, dict[str, int]]):
    """Dataset name -> its GPU recipe (`Dataset.gpu_recipe`), for the registered data sets that have one."""

    def __getitem__(self, name: str) -> dict[str, int]:
        entry = DATASETS.get(name)
        if entry is None or entry.gpu_recipe is None:
            raise KeyError(name)
        return dict(entry.gpu_recipe)

    def __iter__(self) -> Iterator[str]:
        return (name for name, entry in DATASETS.items() if entry.gpu_recipe is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


# One GPU (`python -m benchmarks.end_to_end` on CUDA): train steps and batch sizes, read-only and always current.
GPU_RECIPES: Mapping[str, dict[str, int]] = _GpuRecipes()


def scaled_lr(lr: float, batch_size: int, base_batch_size: int, rule: str = "none") -> float:
    """The learning rate for `batch_size` of one tuned at `base_batch_size`: "sqrt" multiplies it by
    sqrt(batch / base) (the usual rule for Adam: the gradient noise shrinks with the square root of the batch),
    "linear" by batch / base (the rule for SGD; with Adam often too much), "none" keeps it."""
    if rule not in LR_SCALINGS:
        raise UserError(f"lr scaling must be one of {', '.join(LR_SCALINGS)}, got {rule!r}")
    ratio = batch_size / base_batch_size
    return lr * {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[rule]


# PROPOSED, NOT YET MEASURED: the recipes `python -m benchmarks.gpu_run` trains on one GPU. They are best
# estimates, not results; GPU_RECIPES above (data.py) stays the recipe the shipped pretrained/ weights were
# trained with until a GPU run has measured these. Each maps to benchmarks.end_to_end flags (flag name without
# the dashes, underscores for dashes). Why these values:
#   unet  The shipped teacher (1,500 train steps at batch 1,024, lr 2e-3) reached 0.934 at s = 1 (bar 0.97) on
#         an H100 with its loss still falling; issue 17's note asks for about 3x the teacher train steps at the
#         same batch and lr (lr 2e-3 is known stable there). Student 800 and 4 x 100 rounds: the shipped 600 and
#         4 x 100 met their bars; the student gets a third more for its longer teacher.
#   dit   The `dit-wide` architecture (models/__init__.py): patch 2 (196 tokens of 28x28), width 192, depth 6,
#         6 heads, 4.1M parameters, 1.04 GFLOP per image forward (3.8x the UNet's 0.28), so still small enough to
#         sample an 8-step grid on a 2-core CPU; launch-bound at the CPU's "dit" width (96), so width is nearly
#         free on a GPU. lr 1e-3 (half the UNet's: a transformer at batch 1,024 with adaLN-Zero, warm-up 100,
#         clip 1), 3,000 teacher train steps (~51 epochs), 800 student train steps; no step-distillation rounds
#         (the issue ships its teacher and guided student).
# Speed switches (compile mode, fused AdamW) are not part of a recipe: gpu_run measures them and passes the ones
# that pay. A recipe that has been measured moves into the data set's `gpu_recipe` (data.py) with its numbers.
PROPOSED_GPU_RECIPES: Mapping[str, Mapping[str, Mapping[str, Any]]] = {
    "mnist": {
        "unet": dict(teacher_train_steps=4500, distill_train_steps=800, round_train_steps=100, teacher_batch_size=1024,
                     distill_batch_size=1024, round_batch_size=1024, teacher_lr=2e-3, distill_lr=2e-3),
        "dit": dict(arch="dit-wide", teacher_train_steps=3000, distill_train_steps=800, teacher_batch_size=1024,
                    distill_batch_size=1024, teacher_lr=1e-3, distill_lr=1e-3, no_step_rounds=True),
    }
}  # fmt: skip


def recipe_flags(settings: Mapping[str, Any]) -> list[str]:
    """A PROPOSED_GPU_RECIPES entry as benchmarks.end_to_end flags: {"teacher_lr": 0.001} -> ["--teacher-lr",
    "0.001"]; True is a bare switch, False and None are left out."""
    flags: list[str] = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value not in (False, None):
            flags += [flag, str(value)]
    return flags

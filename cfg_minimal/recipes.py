"""Per-dataset defaults, read from the dataset registry: the architecture and how many train steps each stage takes.

Everything else a user changes lives in the stage configs (`TeacherConfig`, `DistillConfig`,
`StepDistillConfig`) and their shared `OptimConfig`; these are the values that differ per dataset. They
live in each data set's one entry in data.py (with why they are what they are); this module only looks
them up, so a data set registered with `data.register_dataset` gets its defaults with no other table.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from .data import DATASETS, dataset_info


def recipe(dataset: str, arch: str | None = None) -> dict[str, str | int]:
    """The defaults for `dataset` trained with `arch` (None: the dataset's default architecture):
    {"arch": the dataset's default architecture, "teacher_train_steps": n, "distill_train_steps": n}."""
    entry = dataset_info(dataset)
    defaults = dict(arch=entry.arch, teacher_train_steps=entry.teacher_train_steps,
                    distill_train_steps=entry.distill_train_steps)  # fmt: skip
    return {**defaults, **entry.arch_overrides.get(arch or entry.arch, {})}


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

"""Datasets as in-memory tensors in [-1, 1], and the registry that holds everything known about each.

A data set is one `Dataset` entry: its shape and class names, a loader, the training recipe (the
architecture and how many train steps each stage takes by default), the train steps of the evaluation
classifier and, optionally, a GPU recipe. `register_dataset` checks every field and adds it to
`DATASETS`; from then on --dataset, training, distillation and evaluation know it. The built-in ones
(digits offline, MNIST, Fashion-MNIST, CIFAR-10) are registered, and so checked, on import.

The data sets here are small enough to hold in memory, so training draws random batches from one
tensor instead of running a DataLoader: simpler, and faster for 16-32 pixel images.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError
from .models import ARCHITECTURES

# (data_dir, train, download) -> (images (N, C, H, W) float in [0, 1], labels (N,) int64 in [0, num_classes))
Loader = Callable[[str, bool, bool], tuple[torch.Tensor, torch.Tensor]]
RECIPE_KEYS = ("teacher_train_steps", "distill_train_steps")  # what an architecture may change (arch_overrides)
GPU_RECIPE_KEYS = ("teacher_train_steps", "distill_train_steps", "round_train_steps", "batch_size")


@dataclass(frozen=True)
class Dataset:
    """One data set: everything the stages, the CLIs and the evaluation need to know about it."""

    name: str  # what --dataset takes
    channels: int
    image_size: int  # square images: image_size x image_size
    num_classes: int
    class_names: tuple[str, ...]  # num_classes names, in label order
    loader: Loader
    # The recipe: what TeacherConfig(arch=None) and max_train_steps=None mean for this data set (recipes.py).
    arch: str  # a key of models.ARCHITECTURES
    teacher_train_steps: int
    distill_train_steps: int
    classifier_train_steps: int  # the evaluation classifier's (classifier.py), batch 128
    arch_overrides: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # arch -> some of RECIPE_KEYS
    gpu_recipe: Mapping[str, int] | None = None  # benchmarks.end_to_end on CUDA: some of GPU_RECIPE_KEYS
    # The teacher's measured recipe: TeacherConfig fields by their flat name ("min_snr_gamma", "optim.lr") that
    # train_mnist.py and recipes.teacher_config use for this data set in place of the dataclass defaults
    teacher_settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class ImageData:
    images: torch.Tensor  # (N, C, H, W) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) int64 in [0, num_classes)
    info: Dataset
    name: str

    def __len__(self) -> int:
        return len(self.labels)


_REGISTRY: dict[str, Dataset] = {}
DATASETS: Mapping[str, Dataset] = MappingProxyType(_REGISTRY)  # name -> entry; read-only, add with register_dataset


def register_dataset(entry: Dataset, replace: bool = False) -> Dataset:
    """Check every field of `entry` and add it to DATASETS. A field missing (None) or out of its range raises
    a UserError naming it, as does a name already registered unless `replace`. Returns `entry`."""
    if not isinstance(entry, Dataset):
        raise UserError(f"register_dataset takes a cfg_minimal.data.Dataset, got {type(entry).__name__}")
    problems = _field_problems(entry)
    if problems:
        raise UserError(f"dataset {entry.name!r} cannot be registered: {'; '.join(problems)}")
    if entry.name in _REGISTRY and not replace:
        raise UserError(f"dataset name {entry.name!r} is already registered; choose another name or pass replace=True")
    _REGISTRY[entry.name] = entry
    return entry


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _counts_problem(name: str, counts: Any, keys: tuple[str, ...]) -> list[str]:
    """[] when `counts` maps some of `keys` to positive integers, else the complaint about field `name`."""
    if isinstance(counts, Mapping) and all(k in keys and _positive_int(v) for k, v in counts.items()):
        return []
    return [f"{name} must map some of {', '.join(keys)} to positive integers, got {counts!r}"]


def _field_problems(d: Dataset) -> list[str]:
    """What is wrong with the fields of `d`, one message per field that names it; [] when nothing is."""
    bad = []
    if not (isinstance(d.name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", d.name)):
        bad.append(f"name must be a non-empty string of letters, digits, '-', '_' and '.', got {d.name!r}")
    for name in ("channels", "image_size", "num_classes", "teacher_train_steps", "distill_train_steps",
                 "classifier_train_steps"):  # fmt: skip
        if not _positive_int(getattr(d, name)):
            bad.append(f"{name} must be a positive integer, got {getattr(d, name)!r}")
    names = d.class_names
    if not (isinstance(names, tuple) and all(isinstance(n, str) for n in names) and len(names) == d.num_classes):
        bad.append(f"class_names must be a tuple of num_classes ({d.num_classes!r}) strings, got {names!r}")
    if not callable(d.loader):
        bad.append(f"loader must be a callable (data_dir, train, download) -> (images, labels), got {d.loader!r}")
    if not (isinstance(d.arch, str) and d.arch in ARCHITECTURES):
        bad.append(f"arch must be one of {', '.join(ARCHITECTURES)}, got {d.arch!r}")
    if not isinstance(d.arch_overrides, Mapping):
        bad.append(f"arch_overrides must map architectures to train steps, got {d.arch_overrides!r}")
    else:
        for arch, changes in d.arch_overrides.items():
            if not (isinstance(arch, str) and arch in ARCHITECTURES):
                bad.append(f"arch_overrides: {arch!r} is not one of {', '.join(ARCHITECTURES)}")
            bad += _counts_problem(f"arch_overrides[{arch!r}]", changes, RECIPE_KEYS)
    if d.gpu_recipe is not None:
        bad += _counts_problem("gpu_recipe", d.gpu_recipe, GPU_RECIPE_KEYS)
    if not (isinstance(d.teacher_settings, Mapping) and all(isinstance(k, str) for k in d.teacher_settings)):
        bad.append(f"teacher_settings must map TeacherConfig field names to values, got {d.teacher_settings!r}")
    return bad


def dataset_info(name: str) -> Dataset:
    """The registered entry called `name`, or a UserError listing the names there are."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def load_dataset(name: str, data_dir: str | Path = "./data", train: bool = True, download: bool = True) -> ImageData:
    """Load a dataset as (N, C, H, W) float images in [-1, 1] and int64 labels."""
    info = dataset_info(name)
    x01, y = info.loader(str(data_dir), train, download)
    if not (isinstance(x01, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise UserError(f"the loader of dataset {name!r} must return (images, labels) as torch tensors, got "
                        f"{type(x01).__name__} and {type(y).__name__}")  # fmt: skip
    if len(y) == 0 or y.min() < 0 or y.max() >= info.num_classes:
        raise UserError(
            f"the {name} files in --data-dir {str(data_dir)!r} hold labels outside 0..{info.num_classes - 1} "
            f"(or none at all): they are damaged or another data set; download them again"
        )
    shape = (len(y), info.channels, info.image_size, info.image_size)
    if not (x01.is_floating_point() and tuple(x01.shape) == shape and y.dtype == torch.int64):
        raise UserError(f"the loader of dataset {name!r} returned images {x01.dtype} {tuple(x01.shape)} and labels "
                        f"{y.dtype} {tuple(y.shape)}; expected float {shape} and int64 ({len(y)},)")  # fmt: skip
    if x01.min() < 0 or x01.max() > 1:
        raise UserError(f"the loader of dataset {name!r} returned images outside [0, 1]; scale them to [0, 1]")
    return ImageData(images=x01 * 2 - 1, labels=y, info=info, name=name)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped: for plotting and saving."""
    return ((images + 1) / 2).clamp(0, 1)


def _digits(data_dir: str, train: bool, download: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 real 8x8 digits (values 0..16), upsampled to 16x16 (bilinear); no files, no network.

    The split is fixed: 80% train, 20% test, stratified by a seeded permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32))[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)  # (N, 1, 16, 16)
    y = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 5
    keep = order[n_test:] if train else order[:n_test]
    return x[keep], y[keep]


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else ""


def torchvision_loader(name: str, class_name: str) -> Loader:
    """The loader of torchvision.datasets.<class_name> (MNIST, CIFAR10, ...), read from or downloaded into
    data_dir in torchvision's layout; `name` is the data set's name in the messages."""

    def load(data_dir: str, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
        import torchvision

        try:
            ds = getattr(torchvision.datasets, class_name)(root=data_dir, train=train, download=download)
        except Exception as err:  # no network, a proxy, a half-downloaded file, or download=False
            raise UserError(
                f"could not load {name} from --data-dir {data_dir!r} ({type(err).__name__}: {_first_line(err)}). "
                f"Either download it on a machine with a network and point --data-dir at the folder "
                f"that holds {class_name}/ (torchvision's layout), or train offline with --dataset digits, "
                f"which ships inside scikit-learn."
            ) from None
        data = torch.as_tensor(np.asarray(ds.data))  # (N, H, W) or (N, H, W, 3), uint8
        x = data[:, None] if data.ndim == 3 else data.permute(0, 3, 1, 2)  # (N, C, H, W)
        return x.float() / 255.0, torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)

    return load


# The built-in data sets. Train steps: the digits teacher trains in about 2 CPU minutes (the whole run in
# about 5), the MNIST teacher in 30 (the laptop recipe below); CIFAR-10 (3x32x32) gets a wider UNet
# (`unet-cifar`, 5.1M parameters) and ~100 epochs of teacher training at batch 128. On digits the DiT trains
# at ~0.7x the UNet's CPU speed but its student converges in fewer train steps (measured), so 700 keeps it
# in the same 6 minutes. Classifier, batch 128, one CPU thread: digits 98.6-99.4% test accuracy in ~9 s
# (seeds 0-3); MNIST 99.3% in ~1.5 min. Fashion-MNIST and CIFAR-10 are set by analogy, not tuned (expect ~90% and ~75%).
# GPU recipe (`python -m benchmarks.end_to_end` on CUDA): a small network is bound by kernel launches, not
# FLOPs, so big batches pay. Measured on an H100 (docs/results.md): 25k training images/s at batch 1024
# against 7-8k at 256; the whole MNIST pipeline trains in about 2 minutes.
DIGIT_NAMES = tuple(str(i) for i in range(10))
register_dataset(
    Dataset("digits", 1, 16, 10, DIGIT_NAMES, _digits, arch="unet", teacher_train_steps=700, distill_train_steps=1300,
            classifier_train_steps=300, arch_overrides={"dit": {"distill_train_steps": 700}})
)  # fmt: skip
# The laptop recipe (MNIST; Fashion-MNIST by analogy, not measured): a rectified-flow teacher at batch 64 for
# 5,500 train steps, what fits in 30 minutes on this project's 2-core CPU at the 0.32 s per train step measured
# over a 30-minute run (`--teacher-minutes 30` fits the count to another machine). Chosen by the ablation in
# docs/results.md: at equal train images the flow velocity target gave 0.908 accuracy at s = 1 where the eps
# default gave 0.292 (v: 0.852); batch 64 beat 128 for eps.
LAPTOP_RECIPE = {"prediction_type": "flow_prediction", "optim.batch_size": 64}
register_dataset(
    Dataset("mnist", 1, 28, 10, DIGIT_NAMES, torchvision_loader("mnist", "MNIST"), arch="unet",
            teacher_train_steps=5500, distill_train_steps=5000, classifier_train_steps=1000,
            gpu_recipe=dict(teacher_train_steps=1500, distill_train_steps=600, round_train_steps=100, batch_size=1024),
            teacher_settings=LAPTOP_RECIPE)
)  # fmt: skip
register_dataset(
    Dataset("fashion-mnist", 1, 28, 10,
            ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"),
            torchvision_loader("fashion-mnist", "FashionMNIST"), arch="unet", teacher_train_steps=5500,
            distill_train_steps=5000, classifier_train_steps=1500, teacher_settings=LAPTOP_RECIPE)
)  # fmt: skip
register_dataset(
    Dataset("cifar10", 3, 32, 10, ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
            torchvision_loader("cifar10", "CIFAR10"), arch="unet-cifar", teacher_train_steps=40000,
            distill_train_steps=20000, classifier_train_steps=4000)
)  # fmt: skip

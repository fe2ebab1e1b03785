"""Datasets as in-memory tensors in [-1, 1]: digits (offline), MNIST, Fashion-MNIST, CIFAR-10.

The data sets here are small enough to hold in memory, so training draws random batches from one
tensor instead of running a DataLoader: simpler, and faster for 16-32 pixel images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError


@dataclass(frozen=True)
class DatasetInfo:
    channels: int
    image_size: int
    num_classes: int
    class_names: tuple[str, ...]


DIGIT_NAMES = tuple(str(i) for i in range(10))
DATASETS = {
    "digits": DatasetInfo(1, 16, 10, DIGIT_NAMES),
    "mnist": DatasetInfo(1, 28, 10, DIGIT_NAMES),
    "fashion-mnist": DatasetInfo(
        1, 28, 10, ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")
    ),
    "cifar10": DatasetInfo(3, 32, 10, ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")),
}


@dataclass
class ImageData:
    images: torch.Tensor  # (N, C, H, W) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) int64 in [0, num_classes)
    info: DatasetInfo
    name: str

    def __len__(self) -> int:
        return len(self.labels)


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def _digits(train: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 real 8x8 digits (values 0..16), upsampled to 16x16 (bilinear).

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


def _torchvision(name: str, data_dir: str, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10}[name]  # fmt: skip
    try:
        ds = cls(root=data_dir, train=train, download=download)
    except Exception as err:  # no network, a proxy, a half-downloaded file, or download=False
        raise UserError(
            f"could not load {name} from --data-dir {data_dir!r} ({type(err).__name__}: {_first_line(err)}). "
            f"Either download it on a machine with a network and point --data-dir at the folder "
            f"that holds {cls.__name__}/ (torchvision's layout), or train offline with --dataset digits, "
            f"which ships inside scikit-learn."
        ) from None
    data = torch.as_tensor(np.asarray(ds.data))  # (N, H, W) or (N, H, W, 3), uint8
    x = data[:, None] if data.ndim == 3 else data.permute(0, 3, 1, 2)  # (N, C, H, W)
    return x.float() / 255.0, torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)


def load_dataset(name: str, data_dir: str | Path = "./data", train: bool = True, download: bool = True) -> ImageData:
    """Load a dataset as (N, C, H, W) float images in [-1, 1] and int64 labels."""
    info = dataset_info(name)
    if name == "digits":
        x01, y = _digits(train)
    else:
        x01, y = _torchvision(name, str(data_dir), train, download)
    if len(y) == 0 or y.min() < 0 or y.max() >= info.num_classes:
        raise UserError(
            f"the {name} files in --data-dir {str(data_dir)!r} hold labels outside 0..{info.num_classes - 1} "
            f"(or none at all): they are damaged or another data set; download them again"
        )
    return ImageData(images=x01 * 2 - 1, labels=y, info=info, name=name)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped: for plotting and saving."""
    return ((images + 1) / 2).clamp(0, 1)

"""A small CNN classifier for judging samples: class accuracy and feature statistics (FD, diversity).

It plays the role Inception-v3 plays for FID on ImageNet, scaled down to 16-32 pixel images: its
logits say whether a guided sample shows the class it was asked for, and its penultimate features
(B, 128) are the space in which `metrics.frechet_distance` compares generated and real images.

Trained weights are cached in `cache_dir/classifier_{dataset}.pt` with their config and test
accuracy, so a sweep trains the classifier once per dataset and every later run reuses it.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .checkpoint import atomic_save
from .data import ImageData, dataset_info, load_dataset
from .metrics import accuracy, classifier_stats

FEATURE_DIM = 128
CACHE_FORMAT = "cfg_minimal.classifier/1"


def conv_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU())


class Classifier(nn.Module):
    """Images (B, C, H, W) in [-1, 1] -> logits (B, num_classes); `features` gives (B, 128).

    Four 3x3 conv + batch-norm + ReLU layers (32, 64, 128, 128 channels; 2x2 max-pools after the
    first two) and a global average pool, so any image size from 16 up works; the pooled 128-d
    vector is the penultimate feature, and one linear layer maps it to logits.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int):
        super().__init__()
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.body = nn.Sequential(
            conv_bn_relu(in_channels, 32),
            nn.MaxPool2d(2),  # (B, 32, H/2, W/2)
            conv_bn_relu(32, 64),
            nn.MaxPool2d(2),  # (B, 64, H/4, W/4)
            conv_bn_relu(64, 128),
            conv_bn_relu(128, FEATURE_DIM),
            nn.AdaptiveAvgPool2d(1),  # (B, 128, 1, 1)
            nn.Flatten(),  # (B, 128)
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 128) penultimate features."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, num_classes)


def random_translate(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by its own random (dy, dx) in [-max_shift, max_shift], replicating the edge.

    Pads by `max_shift` on every side, then crops an (H, W) window at a random offset per image."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")  # (B, C, H + 2m, W + 2m)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b, 1), generator=generator).to(x.device)  # 2 x (B, 1)
    rows = torch.arange(h, device=x.device) + dy  # (B, H)
    cols = torch.arange(w, device=x.device) + dx  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]  # (B, 1, 1)
    crops = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return crops.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


@dataclass
class ClassifierConfig:
    """Everything that determines the trained weights; stored in the cache and compared on load."""

    dataset: str
    in_channels: int
    image_size: int
    num_classes: int
    train_steps: int
    batch_size: int = 128
    lr: float = 2e-3
    max_shift: int = 2
    seed: int = 0


def train_classifier(
    data: ImageData,
    train_steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    max_shift: int = 2,
    progress: bool = True,
) -> Classifier:
    """Cross-entropy training with AdamW, a cosine learning-rate decay and random shifts of up to
    `max_shift` pixels (so the classifier tolerates the small misalignments of generated digits).

    lr_k = lr * (1 + cos(pi * k / train_steps)) / 2 (Loshchilov & Hutter 2017, without restarts).
    Returns the classifier in eval mode."""
    info = data.info
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = Classifier(info.channels, info.image_size, info.num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / train_steps)))
    gen = torch.Generator().manual_seed(seed)
    images, labels = data.images.to(device), data.labels.to(device)  # (N, C, H, W), (N,)

    model.train()
    bar = tqdm(range(train_steps), desc=f"classifier ({data.name})", disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randint(0, len(labels), (batch_size,), generator=gen).to(device)  # (B,)
        x = random_translate(images[idx], max_shift, gen)  # (B, C, H, W)
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


def cache_path(cache_dir: str | Path, dataset: str) -> Path:
    return Path(cache_dir) / f"classifier_{dataset}.pt"


def _load_cached(path: Path, config: ClassifierConfig, device: str | torch.device) -> tuple[Classifier, float]:
    """Rebuild the classifier from a cache file; raises if the file is unreadable or was trained
    with a different config."""
    blob = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != CACHE_FORMAT:
        raise ValueError(f"not a {CACHE_FORMAT} file")
    if blob["config"] != asdict(config):
        raise ValueError(f"trained with config {blob['config']}, wanted {asdict(config)}")
    model = Classifier(config.in_channels, config.image_size, config.num_classes).to(device)
    model.load_state_dict(blob["state_dict"])
    return model.eval(), float(blob["test_accuracy"])


def load_or_train_classifier(
    dataset: str,
    data_dir: str | Path,
    cache_dir: str | Path,
    device: str | torch.device = "cpu",
    progress: bool = True,
    train_steps: int | None = None,
) -> tuple[Classifier, float]:
    """The classifier for `dataset` (eval mode) and its accuracy on the dataset's test split.

    Reuses `cache_dir/classifier_{dataset}.pt` when it loads and matches the training config (`train_steps`
    defaults to the dataset's `classifier_train_steps`, data.py); otherwise trains on the train split, measures
    test accuracy and writes the cache. A corrupt or mismatched cache is retrained with a warning."""
    info = dataset_info(dataset)
    train_steps = train_steps if train_steps is not None else info.classifier_train_steps
    config = ClassifierConfig(dataset, info.channels, info.image_size, info.num_classes, train_steps)
    path = cache_path(cache_dir, dataset)
    if path.exists():
        try:
            return _load_cached(path, config, device)
        except Exception as err:  # corrupt, truncated, from an older version, or another config
            warnings.warn(f"ignoring classifier cache {path} ({type(err).__name__}: {err}); retraining", stacklevel=2)

    train = load_dataset(dataset, data_dir, train=True)
    start = time.perf_counter()
    model = train_classifier(
        train, config.train_steps, config.batch_size, config.lr, config.seed, device, config.max_shift, progress
    )
    seconds = time.perf_counter() - start
    test = load_dataset(dataset, data_dir, train=False)
    test_acc = accuracy(classifier_stats(model, test.images).preds, test.labels)
    if progress:
        steps = config.train_steps
        tqdm.write(f"classifier ({dataset}): test accuracy {test_acc:.4f} after {steps} train steps ({seconds:.0f} s)")
    blob = {
        "format": CACHE_FORMAT,
        "config": asdict(config),
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
        "test_accuracy": test_acc,
        "train_seconds": seconds,
    }
    atomic_save(blob, path)
    return model, test_acc

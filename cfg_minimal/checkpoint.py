"""Self-describing checkpoints: one file rebuilds the model, its noise schedule and its metadata.

A checkpoint is a plain dict of tensors, numbers and strings, loaded with
`torch.load(weights_only=True)`, so a file carrying a pickled object is refused, never executed.
It is written to a temporary file and renamed, so an interrupted save never leaves half a file.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .models import DiffusionModel, build_model

FORMAT = "cfg_minimal"
VERSION = 2  # 2: training progress is `train_step` / `max_train_steps`; configs nest an `optim` block
# What a checkpoint says about the data and the noise schedule; every model distilled from it inherits these.
DATASET_KEYS = ("scheduler_config", "dataset", "image_size", "channels", "num_classes", "class_names")


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then os.replace: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write `payload` (plus the format tag) atomically."""
    atomic_save({"format": FORMAT, "version": VERSION, **payload}, path)


def load_checkpoint(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Load and check a checkpoint; every problem is a UserError that says what to do."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist; train one with `python train_mnist.py --out DIR`")
    if not zipfile.is_zipfile(path):
        raise UserError(
            f"{str(path)!r} is not a readable checkpoint (truncated or corrupt, or not written by torch.save); "
            "retrain it, or use the last good copy"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(
            f"refusing to load {str(path)!r}: it holds pickled Python objects, which could run code "
            f"({first}). cfg_minimal checkpoints hold only tensors, numbers and strings."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise UserError(
            f"{str(path)!r} is not a readable checkpoint (truncated or corrupt: {type(err).__name__}); "
            "retrain it, or use the last good copy"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{str(path)!r} is not a cfg_minimal checkpoint (no 'format': {FORMAT!r} entry)")
    if ckpt.get("version") != VERSION:
        raise UserError(f"{str(path)!r} has checkpoint version {ckpt.get('version')}, this code reads {VERSION}: "
                        "retrain it, or load it with the version of cfg_minimal that wrote it")  # fmt: skip
    if kind is not None and ckpt.get("kind") != kind:
        hint = " (distil from the teacher.pt of the same run)" if kind == "teacher" else ""
        raise UserError(f"{str(path)!r} is a {ckpt.get('kind')} checkpoint, but a {kind} is needed here{hint}")
    return ckpt


def dataset_metadata(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The entries of `ckpt` that describe its data and noise schedule (DATASET_KEYS)."""
    return {key: ckpt[key] for key in DATASET_KEYS}


def model_from_checkpoint(ckpt: dict[str, Any], weights: str = "ema") -> DiffusionModel:
    """Rebuild the model from its stored config and load `weights` ('ema' for sampling, or 'model')."""
    config = dict(ckpt["model_config"])
    model = build_model(config.pop("arch"), **config)
    try:
        model.load_state_dict(ckpt[weights])
    except RuntimeError as err:  # weights from another version of this code
        first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise UserError(
            f"the checkpoint's weights do not fit the model its config describes ({first}); "
            "it was written by another version of cfg_minimal: retrain, or use that version"
        ) from None
    return model.eval()

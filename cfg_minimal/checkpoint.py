"""Self-describing checkpoints: one file rebuilds the model, its noise schedule and its metadata.

A checkpoint is a plain dict of tensors, numbers and strings, loaded with
`torch.load(weights_only=True)`, so a file carrying a pickled object is refused, never executed.
It is written to a temporary file and renamed, so an interrupted save never leaves half a file,
and a run holds `output_lock` on its folder, so two runs never write into one folder at once.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .models import DiffusionModel, build_model
from .pretrained import load_pretrained

FORMAT = "cfg_minimal"
VERSION = 2  # 2: training progress is `train_step` / `max_train_steps`; configs nest an `optim` block
# What a checkpoint says about the data and the noise schedule; every model distilled from it inherits these.
DATASET_KEYS = ("scheduler_config", "dataset", "image_size", "channels", "num_classes", "class_names")


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then os.replace: readers never see half a file.

    Temporary files that a killed save left behind for this path are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{path.name}*.tmp"):
        stale.unlink(missing_ok=True)
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
    """Write `payload` (plus the format tag) atomically; a failed write is a UserError and leaves any
    earlier checkpoint at `path` as it was."""
    try:
        atomic_save({"format": FORMAT, "version": VERSION, **payload}, path)
    except OSError as err:
        kept = " The last good checkpoint there is kept." if Path(path).is_file() else ""
        raise UserError(
            f"could not write the checkpoint {str(path)!r} ({err.strerror or err}).{kept} "
            "Free some space or fix the folder, then run the same command with --resume"
        ) from None


def writable_folder(folder: str | Path) -> Path:
    """`folder`, created if need be; a file in its place, or no permission to write, is a UserError."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".write_test").touch()
        (folder / ".write_test").unlink()
    except OSError as err:
        reason = err.strerror or str(err)
        raise UserError(f"cannot write to --out {str(folder)!r} ({reason}); choose another folder") from None
    return folder


@contextmanager
def output_lock(folder: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (the file FOLDER/.lock) while a run writes into it; a second
    run into the same folder fails at once with a UserError. The lock ends with the process, even
    on SIGKILL. Where the OS has no flock (Windows), nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    with open(Path(folder) / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another run is writing into {str(folder)!r}; wait for it to finish, "
                            "or choose another --out") from None  # fmt: skip
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A short hash of the weights' values: tells two models apart by content, whatever their paths."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def load_checkpoint(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Load and check a checkpoint: a .pt file or a pretrained folder (pretrained.py); every problem is a
    UserError that says what to do."""
    path = Path(path)
    ckpt = load_pretrained(path) if path.is_dir() else _load_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{str(path)!r} is not a cfg_minimal checkpoint (no 'format': {FORMAT!r} entry)")
    if ckpt.get("version") != VERSION:
        raise UserError(f"{str(path)!r} has checkpoint version {ckpt.get('version')}, this code reads {VERSION}: "
                        "retrain it, or load it with the version of cfg_minimal that wrote it")  # fmt: skip
    require(ckpt, ("kind", "model_config", "ema"), path)
    if kind is not None and ckpt.get("kind") != kind:
        hint = " (distil from the teacher.pt of the same run)" if kind == "teacher" else ""
        raise UserError(f"{str(path)!r} is a {ckpt.get('kind')} checkpoint, but a {kind} is needed here{hint}")
    return ckpt


def _load_file(path: Path) -> Any:
    """torch.load of a .pt file, every failure a UserError."""
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist; train one with `python train_mnist.py --out DIR`")
    if not zipfile.is_zipfile(path):
        raise UserError(
            f"{str(path)!r} is not a readable checkpoint (truncated or corrupt, or not written by torch.save); "
            "retrain it, or use the last good copy"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"refusing to load {str(path)!r}: it holds pickled Python objects (a whole model or optimizer "
            "saved with torch.save, say), and unpickling can run code. cfg_minimal checkpoints hold only "
            "tensors, numbers and strings."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise UserError(
            f"{str(path)!r} is not a readable checkpoint (truncated or corrupt: {type(err).__name__}); "
            "retrain it, or use the last good copy"
        ) from None
    return ckpt


def require(ckpt: dict[str, Any], keys: tuple[str, ...], path: str | Path) -> dict[str, Any]:
    """`ckpt`, or a UserError naming the `keys` it lacks."""
    missing = [key for key in keys if key not in ckpt]
    if missing:
        raise UserError(f"{str(path)!r} lacks {', '.join(missing)}: it is incomplete or was not written by "
                        "train_mnist.py; retrain it")  # fmt: skip
    return ckpt


def dataset_metadata(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The entries of `ckpt` that describe its data and noise schedule (DATASET_KEYS)."""
    return {key: ckpt[key] for key in DATASET_KEYS}


def model_from_checkpoint(ckpt: dict[str, Any], weights: str = "ema") -> DiffusionModel:
    """Rebuild the model from its stored config and load `weights` ('ema' for sampling, or 'model').

    Weights that do not fit the config, or that hold a NaN or inf, are a UserError."""
    if weights not in ("ema", "model") or weights not in ckpt:
        raise UserError(f"weights must be 'ema' (for sampling) or 'model' (the raw weights), got {weights!r}")
    config = dict(ckpt["model_config"])
    try:
        model = build_model(config.pop("arch", None), **config)
    except (ValueError, TypeError) as err:
        raise UserError(f"the checkpoint's model_config does not describe a model this code builds ({err})") from None
    try:
        result = model.load_state_dict(ckpt[weights], strict=False)
        problems = [*result.missing_keys, *result.unexpected_keys]
    except RuntimeError as err:  # a tensor of another shape
        problems = [line.strip() for line in str(err).splitlines()[1:]] or [str(err)]
    if problems:  # weights from another architecture or another version of this code
        raise UserError(
            f"the checkpoint's weights do not fit the model its config describes ({len(problems)} mismatches, "
            f"e.g. {problems[0][:100]!r}); it was written by another version of cfg_minimal or edited: "
            "retrain, or use that version"
        )
    bad = [name for name, tensor in ckpt[weights].items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    if bad:
        raise UserError(f"the checkpoint's {weights} weights hold NaN or inf ({len(bad)} tensors, e.g. {bad[0]!r}): "
                        "that run diverged or the file was damaged; use an earlier checkpoint or retrain")  # fmt: skip
    return model.eval()

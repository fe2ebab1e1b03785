"""Self-describing checkpoints: one file rebuilds the model, its noise schedule and its metadata.

A checkpoint is a plain dict of tensors, numbers and strings, loaded with
`torch.load(weights_only=True)`, so a file carrying a pickled object is refused, never executed.
It is written to a temporary file and renamed, so an interrupted save never leaves half a file,
and a run holds `output_lock` on its folder, so two runs never write into one folder at once.

Every checkpoint proves what it is: it stores a sha256 of its weights (`checksums`), and `load_checkpoint`
checks a file once, where it is read: the checksum (a damaged file is refused, not sampled), the weights'
types, and that the config describes those weights (the model's sizes, the data set's, the noise schedule
the teacher was trained with, the step-distillation record). Files written before checksums still load.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import inspect
import math
import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .data import DATASETS
from .errors import UserError
from .models import ARCHITECTURES, DiffusionModel, build_model
from .schedulers import DDIMScheduler, FlowMatchEulerScheduler

FORMAT = "cfg_minimal"
VERSION = 2  # 2: training progress is `train_step` / `max_train_steps`; configs nest an `optim` block
# What a checkpoint says about the data and the noise schedule; every model distilled from it inherits these.
DATASET_KEYS = ("scheduler_config", "dataset", "image_size", "channels", "num_classes", "class_names")
CONFIG, WEIGHTS = "config.json", "model.safetensors"  # a pretrained folder's two files (pretrained.py)
WEIGHT_KEYS = ("ema", "model")  # the weights a checkpoint may hold; `checksums` has a sha256 of each


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then os.replace: readers never see half a file.

    Temporary files that a killed save left behind for this path are removed first. A failed write is an
    OSError naming `path` (torch.save reports a full disk as a RuntimeError; it is turned into one)."""
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
    except RuntimeError as err:  # e.g. "[enforce fail at inline_container.cc] unexpected pos": the write failed
        first = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise OSError(errno.EIO, f"torch.save failed: {first}; is the disk full?", str(path)) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write `payload` (plus the format tag and a sha256 of each of its weights) atomically; a failed write
    is a UserError naming the file and leaves any earlier checkpoint at `path` as it was."""
    checksums = {key: weights_checksum(payload[key]) for key in WEIGHT_KEYS if key in payload}
    try:
        atomic_save({"format": FORMAT, "version": VERSION, **payload, "checksums": checksums}, path)
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


def weights_checksum(state_dict: dict[str, torch.Tensor]) -> str:
    """The sha256 (64 hex digits) of every tensor's name, dtype, shape and bytes, in name order: what a
    checkpoint stores in `checksums` and `load_checkpoint` verifies. One flipped bit changes it."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_checkpoint(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Load and check a checkpoint: a .pt file or a pretrained folder (pretrained.py); every problem is a
    UserError that says what to do. The file's config and weights are checked here, once (check_loaded)."""
    from .pretrained import load_pretrained  # here: `python -m cfg_minimal.pretrained` must find it not yet imported

    path = as_path(path, "checkpoint")
    ckpt = load_pretrained(path) if path.is_dir() else _load_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{str(path)!r} is not a cfg_minimal checkpoint (no 'format': {FORMAT!r} entry)")
    if ckpt.get("version") != VERSION:
        raise UserError(f"{str(path)!r} has checkpoint version {ckpt.get('version')}, this code reads {VERSION}: "
                        "retrain it, or load it with the version of cfg_minimal that wrote it")  # fmt: skip
    require(ckpt, ("kind", "model_config", "ema"), path)
    check_loaded(ckpt, path)
    if kind is not None and ckpt.get("kind") != kind:
        hint = " (distil from the teacher.pt of the same run)" if kind == "teacher" else ""
        raise UserError(f"{str(path)!r} is a {ckpt.get('kind')} checkpoint, but a {kind} is needed here{hint}")
    return ckpt


def as_path(path: object, what: str) -> Path:
    """`path` as a Path, or a UserError for what is not a path (a number, None, an empty string)."""
    if not isinstance(path, (str, os.PathLike)) or isinstance(os.fspath(path), bytes):
        raise UserError(f"the {what} must be a path (a str or a pathlib.Path), got {type(path).__name__} {path!r}")
    if not os.fspath(path).strip():
        raise UserError(f"the {what} path is empty; give one")
    return Path(path)


def _load_file(path: Path) -> Any:
    """torch.load of a .pt file, every failure a UserError."""
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist; train one with `python train_mnist.py --out DIR`")
    if path.name in (CONFIG, WEIGHTS):
        raise UserError(
            f"{str(path)!r} is one file of a pretrained model folder; pass the folder, {str(path.parent)!r}"
        )
    if not zipfile.is_zipfile(path):
        raise UserError(
            f"{str(path)!r} is not a readable checkpoint (truncated or corrupt, or not written by torch.save); "
            "retrain it, or use the last good copy"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # the first record whose bytes fail their CRC-32, or None
    except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError, EOFError) as err:
        raise _damaged(path, f"truncated or corrupt: {type(err).__name__}") from None
    if damaged is not None:
        raise _damaged(path, f"damaged: the bytes of {damaged!r} fail their CRC check")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "unsupported global" not in str(err).lower():  # no refused class or function: a bad opcode
            raise _damaged(path, "damaged: its pickled index does not parse") from None
        raise UserError(
            f"refusing to load {str(path)!r}: it holds pickled Python objects (a whole model or optimizer "
            "saved with torch.save, say), and unpickling can run code. cfg_minimal checkpoints hold only "
            "tensors, numbers and strings."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as err:
        raise _damaged(path, f"truncated or corrupt: {type(err).__name__}") from None
    return ckpt


def _damaged(path: Path, why: str) -> UserError:
    return UserError(f"{str(path)!r} is not a readable checkpoint ({why}); retrain it, or use the last good copy")


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
    if weights not in WEIGHT_KEYS:
        raise UserError(f"weights must be 'ema' (for sampling) or 'model' (the raw weights), got {weights!r}")
    if weights not in ckpt:
        raise UserError(f"weights={weights!r}: this checkpoint holds only its EMA weights (a pretrained folder keeps "
                        "no raw weights; the training checkpoint .pt has them); use weights='ema'")  # fmt: skip
    model = _build(ckpt["model_config"])
    problems = _fit_problems(model, ckpt[weights])
    if problems:  # weights from another architecture or another version of this code
        raise UserError(f"the checkpoint's {_misfit(problems)}")
    model.load_state_dict(ckpt[weights])
    bad = [name for name, tensor in ckpt[weights].items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    if bad:
        raise UserError(f"the checkpoint's {weights} weights hold NaN or inf ({len(bad)} tensors, e.g. {bad[0]!r}): "
                        "that run diverged or the file was damaged; use an earlier checkpoint or retrain")  # fmt: skip
    return model.eval()


def _build(model_config: object) -> DiffusionModel:
    """The model `model_config` describes (with fresh weights); a config this code cannot build is a UserError."""
    if not isinstance(model_config, dict):
        raise UserError(f"the checkpoint's model_config must be a mapping of the model's settings, "
                        f"got {type(model_config).__name__} {str(model_config)[:40]!r}")  # fmt: skip
    config = dict(model_config)
    try:
        return build_model(config.pop("arch", None), **config)
    except (ValueError, TypeError) as err:
        raise UserError(f"the checkpoint's model_config does not describe a model this code builds ({err})") from None


def _fit_problems(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """What keeps `weights` from loading into `model`: missing and unexpected names, other shapes."""
    expected = model.state_dict()
    problems = [f"missing {name}" for name in expected if name not in weights]
    problems += [f"unexpected {name}" for name in weights if name not in expected]
    problems += [f"{name}: {list(weights[name].shape)} in the file, {list(tensor.shape)} in the model"
                 for name, tensor in expected.items()
                 if name in weights and weights[name].shape != tensor.shape]  # fmt: skip
    return problems


def _misfit(problems: list[str]) -> str:
    return (
        f"weights do not fit the model its config describes ({len(problems)} mismatches, e.g. "
        f"{problems[0][:100]!r}); it was written by another version of cfg_minimal or edited: retrain, or use "
        "that version"
    )


# Checks of a checkpoint read from a file: load_checkpoint runs check_loaded once, so code that takes a loaded
# checkpoint can trust it. Each problem is one line naming the file (in a folder: config.json or model.safetensors).


def check_loaded(ckpt: dict[str, Any], path: Path) -> None:
    """Refuse damaged or non-float weights and a config that does not describe them."""
    config_file, weights_file = (path / CONFIG, path / WEIGHTS) if path.is_dir() else (path, path)
    _check_weights(ckpt, str(weights_file), str(config_file))
    model = _check_model_config(ckpt["model_config"], str(config_file))
    for check in (_check_metadata, _check_dataset, _check_schedule, _check_stage_configs, _check_step_distilled):
        check(ckpt, model, str(config_file))
    with torch.device("meta"):  # shapes only: no memory for the weights, no random numbers drawn
        built = _build(ckpt["model_config"])
    for key in WEIGHT_KEYS:
        problems = _fit_problems(built, ckpt[key]) if key in ckpt else []
        if problems:
            raise UserError(f"{str(weights_file)!r}: {_misfit(problems)}")


def _check_weights(ckpt: dict[str, Any], file: str, config_file: str) -> None:
    """Each of WEIGHT_KEYS present: names -> float tensors, matching its stored sha256, not all zero."""
    sums = ckpt.get("checksums", {})
    if not isinstance(sums, dict) or not all(isinstance(value, str) for value in sums.values()):
        raise UserError(f"{config_file!r} is damaged: its checksums entry is not a mapping of weights to sha256 "
                        "digests")  # fmt: skip
    for key in WEIGHT_KEYS:
        state = ckpt.get(key)
        if state is None:
            continue
        if not isinstance(state, dict) or not all(isinstance(n, str) and torch.is_tensor(t) for n, t in state.items()):
            raise UserError(f"{file!r} is damaged: its {key} weights are not a mapping of names to tensors")
        if key in sums and weights_checksum(state) != sums[key]:
            raise UserError(f"{file!r} is damaged: the weights do not match their checksum; restore it (git checkout, "
                            "the last good copy) or export or train it again")  # fmt: skip
        odd = next(((n, t.dtype) for n, t in state.items() if not t.is_floating_point()), None)
        if odd is not None:
            raise UserError(f"{file!r}: its {key} weights hold a non-float tensor ({odd[0]!r} is {odd[1]}); this "
                            "code writes float weights only: the file was edited or written by other code")  # fmt: skip
        if state and not any(tensor.any() for tensor in state.values()):
            raise UserError(f"{file!r}: its {key} weights are all zero, which no trained model is: the file was "
                            "damaged or written by other code; restore it or train again")  # fmt: skip


def _model_settings(arch: str) -> dict[str, Any]:
    """Every setting an `arch` model takes (its constructor's and DiffusionModel's), with its default."""
    cls, sizes = ARCHITECTURES[arch]
    settings = {}
    for init in (DiffusionModel.__init__, cls.__init__):
        for param in inspect.signature(init).parameters.values():
            if param.default is not inspect.Parameter.empty:
                settings[param.name] = param.default
    return {**settings, **sizes}


def _setting_problem(name: str, value: Any, default: Any) -> str | None:
    """What is wrong with `value` for a model setting whose default is `default`, or None."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "it must be true or false"
    if isinstance(default, int):
        return None if _is_int(value) and 1 <= value <= 2**16 else "it must be a whole number from 1 to 65536"
    if isinstance(default, float):
        low, high = (0.0, 1.0) if name in ("p_uncond", "dropout") else (1e-6, 1e6)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
        return None if ok else f"it must be a number from {low:g} to {high:g}"
    if isinstance(default, (tuple, list)):
        ok = isinstance(value, (tuple, list)) and 1 <= len(value) <= 8
        ok = ok and all(_is_int(v) and 1 <= v <= 64 for v in value)
        return None if ok else "it must be a list of 1 to 8 whole numbers from 1 to 64"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_model_config(config: Any, file: str) -> dict[str, Any]:
    """The model's settings (model_config over the architecture's defaults), each of a known name and type."""
    if not isinstance(config, dict):
        raise UserError(f"{file!r}: model_config must be a mapping of the model's settings, "
                        f"got {type(config).__name__} {_short(config)}")  # fmt: skip
    arch = config.get("arch")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise UserError(f"{file!r}: its model_config does not describe a model this code builds (unknown arch "
                        f"{_short(arch)}; choose one of {', '.join(ARCHITECTURES)})")  # fmt: skip
    defaults = _model_settings(arch)
    unknown = [key for key in config if key != "arch" and key not in defaults]
    if unknown:
        raise UserError(f"{file!r}: its model_config has an unknown setting {unknown[0]!r}; an {arch} model takes "
                        f"{', '.join(defaults)}")  # fmt: skip
    for name, value in config.items():
        problem = None if name == "arch" else _setting_problem(name, value, defaults[name])
        if problem:
            raise UserError(f"{file!r}: model_config's {name} is {_short(value)}, but {problem}")
    return {**defaults, **config}


def takes_guidance(ckpt: dict[str, Any]) -> bool:
    """Whether the model takes the scale s as an input: a guided student, or a teacher trained with guidance-free
    training (teacher_config's objective 'gft', guidance_free.py), which has no teacher of its own."""
    teacher = ckpt.get("teacher_config")
    gft = ckpt["kind"] == "teacher" and isinstance(teacher, dict) and teacher.get("objective") == "gft"
    return ckpt["kind"] == "student" or gft


def _check_metadata(ckpt: dict[str, Any], model: dict[str, Any], file: str) -> None:
    """kind, and the sizes and class names the file states, against the model's settings."""
    kind = ckpt["kind"]
    if kind not in ("teacher", "student"):
        raise UserError(f"{file!r}: kind must be 'teacher' or 'student', got {_short(kind)}")
    if model["guidance_embed"] is not takes_guidance(ckpt):
        raise UserError(f"{file!r} says it is a {kind}, but its model_config has guidance_embed "
                        f"{model['guidance_embed']} (a student and a GFT-trained teacher have a guidance embedder, "
                        "a CFG teacher none)")  # fmt: skip
    for key, setting in (("image_size", "image_size"), ("channels", "in_channels"), ("num_classes", "num_classes")):
        if key in ckpt and (not _is_int(ckpt[key]) or ckpt[key] != model[setting]):
            raise UserError(f"{file!r} says {key} {_short(ckpt[key])}, but its model (model_config's {setting}) has "
                            f"{model[setting]}: the config was edited; restore it")  # fmt: skip
    names, n = ckpt.get("class_names"), model["num_classes"]
    if names is not None and not (isinstance(names, (list, tuple)) and len(names) == n
                                  and all(isinstance(name, str) for name in names)):  # fmt: skip
        raise UserError(f"{file!r}: class_names must be a list of {n} names, one per class of this model, "
                        f"got {_short(names)}")  # fmt: skip
    for key in ("train_step", "max_train_steps"):
        if key in ckpt and not (_is_int(ckpt[key]) and ckpt[key] >= 0):
            raise UserError(f"{file!r}: {key} must be a whole number >= 0, got {_short(ckpt[key])}")
    if not isinstance(ckpt.get("command", ""), (str, type(None))):
        raise UserError(f"{file!r}: command must be the text of a command, got {_short(ckpt['command'])}")


def _check_dataset(ckpt: dict[str, Any], model: dict[str, Any], file: str) -> None:
    """The data set a file names must be the one its teacher was trained on, and (if registered) fit the model."""
    if "dataset" not in ckpt:
        return
    name, teacher = ckpt["dataset"], ckpt.get("teacher_config")
    if not isinstance(name, str) or not name:
        raise UserError(f"{file!r}: dataset must be the name of a data set, got {_short(name)}")
    trained_on = teacher.get("dataset", name) if isinstance(teacher, dict) else name
    if trained_on != name:
        raise UserError(f"{file!r} says dataset {name!r}, but its teacher was trained on {_short(trained_on)} "
                        "(teacher_config): the config was edited; restore it")  # fmt: skip
    entry = DATASETS.get(name)  # None: a data set the user's own code registers; nothing to compare with
    sizes = (model["image_size"], model["in_channels"], model["num_classes"])
    if entry is not None and (entry.image_size, entry.channels, entry.num_classes) != sizes:
        raise UserError(f"{file!r} says dataset {name!r} ({entry.image_size} pixels, {entry.channels} channels, "
                        f"{entry.num_classes} classes), but its model is for {sizes[0]} pixels, {sizes[1]} "
                        f"channels, {sizes[2]} classes: the config was edited; restore it")  # fmt: skip


def _check_schedule(ckpt: dict[str, Any], model: dict[str, Any], file: str) -> None:
    """scheduler_config: readable, and the noise schedule the teacher was trained with (teacher_config)."""
    config, teacher = ckpt.get("scheduler_config"), ckpt.get("teacher_config")
    if config is None:
        return
    if not isinstance(config, dict):
        raise UserError(f"{file!r}: scheduler_config must be a mapping, got {_short(config)}")
    steps = config.get("num_train_timesteps", 1000)
    if not _is_int(steps) or not 2 <= steps <= 100_000:
        raise UserError(f"{file!r}: scheduler_config's num_train_timesteps must be a whole number from 2 to "
                        f"100000, got {_short(steps)}")  # fmt: skip
    defaults = {"num_train_timesteps": 1000, "beta_schedule": "linear"}  # the scheduler's, where a key is left out
    flow = config.get("prediction_type") == "flow_prediction"  # rectified flow (flow.py): no beta schedule
    for key in ("num_train_timesteps", "prediction_type", *(() if flow else ("beta_schedule",))):  # older: no type
        ours = config.get(key, defaults.get(key))
        trained = teacher.get(key) if isinstance(teacher, dict) else None
        if ours is not None and trained is not None and ours != trained:
            raise UserError(f"{file!r}: scheduler_config has {key} {_short(ours)}, but the model was trained with "
                            f"{_short(trained)} (teacher_config): the config was edited; restore it")  # fmt: skip
    try:
        if flow:
            FlowMatchEulerScheduler(**config)
            return
        betas = DDIMScheduler(**config).betas
    except (TypeError, ValueError) as err:
        raise UserError(f"{file!r} has a scheduler_config this code cannot read ({err})") from None
    if not (betas > 0).all() or not (betas < 1).all():
        raise UserError(f"{file!r}: scheduler_config's betas must lie in (0, 1); check beta_start and beta_end")


def _check_stage_configs(ckpt: dict[str, Any], model: dict[str, Any], file: str) -> None:
    """The stored stage configs: mappings of known settings with an `optim` block (resume rebuilds them)."""
    from .distill import DistillConfig  # here: those modules import this one
    from .loop import OptimConfig
    from .step_distill import StepDistillConfig
    from .train import TeacherConfig

    optim_fields = {field.name for field in dataclasses.fields(OptimConfig)}
    for key, cls in (("teacher_config", TeacherConfig), ("distill_config", DistillConfig),
                     ("step_distill_config", StepDistillConfig)):  # fmt: skip
        stage = ckpt.get(key)
        if stage is None:
            continue
        if not isinstance(stage, dict) or not isinstance(stage.get("optim"), dict):
            raise UserError(f"{file!r}: {key} must be a mapping of settings with an 'optim' mapping")
        fields = {field.name for field in dataclasses.fields(cls)}
        unknown = [k for k in stage if k not in fields]
        unknown += [f"optim.{k}" for k in stage["optim"] if k not in optim_fields]
        if unknown:
            raise UserError(f"{file!r}: {key} has an unknown setting {unknown[0]!r}: the config was edited or "
                            "written by another version of cfg_minimal")  # fmt: skip
    _check_guidance_range(ckpt, file)


def _check_guidance_range(ckpt: dict[str, Any], file: str) -> None:
    """A student's [s_min, s_max]: 0 <= s_min <= 1 <= s_max < inf, as distill_config records it."""
    if "guidance_range" not in ckpt:
        return
    low_high, stored = ckpt["guidance_range"], ckpt.get("distill_config") or {}
    ok = isinstance(low_high, (list, tuple)) and len(low_high) == 2
    ok = ok and all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in low_high)
    if not takes_guidance(ckpt) or not ok or not 0 <= low_high[0] <= 1 <= low_high[1]:
        raise UserError(f"{file!r}: guidance_range must be a student's [s_min, s_max] with 0 <= s_min <= 1 <= s_max, "
                        f"got {_short(low_high)} on a {ckpt['kind']}")  # fmt: skip
    if [stored.get("s_min", low_high[0]), stored.get("s_max", low_high[1])] != list(low_high):
        raise UserError(f"{file!r}: guidance_range {_short(low_high)} is not the range distill_config trained, "
                        f"{stored.get('s_min')!r} to {stored.get('s_max')!r}; restore the config")  # fmt: skip


def _check_step_distilled(ckpt: dict[str, Any], model: dict[str, Any], file: str) -> None:
    """sampling_steps (a step-distilled student's): on its aligned grid, as its last round ended, new weights."""
    steps, rounds = ckpt.get("sampling_steps"), ckpt.get("step_rounds")
    if steps is None and rounds is None:
        return
    if not _is_int(steps) or steps < 1 or ckpt["kind"] != "student":
        raise UserError(f"{file!r}: sampling_steps {_short(steps)} must be a whole number >= 1, on a step-distilled "
                        f"student (this is a {ckpt['kind']})")  # fmt: skip
    config = ckpt.get("scheduler_config") or {}
    base = config.get("aligned_base")
    if config.get("timestep_spacing") != "aligned" or not _is_int(base) or base < steps or base % steps:
        raise UserError(f"{file!r} says it was step-distilled to {steps} sampling steps, but its scheduler_config has "
                        f"no grid they lie on (timestep_spacing 'aligned', aligned_base a multiple of it)")  # fmt: skip
    last = rounds[-1] if isinstance(rounds, list) and rounds and isinstance(rounds[-1], dict) else {}
    if rounds is not None and last.get("to_sampling_steps") != steps:
        raise UserError(f"{file!r} says sampling_steps {steps}, but its last step-distillation round (step_rounds) "
                        f"ended at {last.get('to_sampling_steps')!r}: the config was edited; restore it")  # fmt: skip
    if ckpt.get("train_step", 1) > 0 and ckpt.get("previous_fingerprint") == weights_fingerprint(ckpt["ema"]):
        raise UserError(f"{file!r} says it was step-distilled to {steps} sampling steps, but its weights are those "
                        "of the model it was distilled from: the config belongs to other weights")  # fmt: skip

"""Shipped weights: one folder per model, `config.json` + `model.safetensors`, as diffusers' save_pretrained writes.

    python -m cfg_minimal.pretrained runs/mnist/student.pt pretrained/mnist-student --command "python ..."

The config holds everything a training checkpoint says about the model (architecture, noise schedule,
dataset, guidance range, sampling steps, the stage configs, fingerprints), a sha256 of the weights
(`checksums`, verified on every load) and the command that trained it; the weights are the EMA weights
that sampling uses, and nothing of the training state (optimizer, RNG, raw weights), so a folder is a
third of a `.pt` checkpoint. `load_pipeline(folder)` and every CLI that takes a checkpoint take such a
folder. safetensors holds only tensors, so loading runs no code.

An existing export folder is never replaced without --overwrite (the shipped pretrained/ folders
included), a folder holding anything else never; an unfinished checkpoint (train_step < max_train_steps)
is refused without --allow-unfinished; exporting a folder keeps its `command` unless --command is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoint import CONFIG, WEIGHTS, as_path, load_checkpoint, weights_checksum
from .errors import UserError, report

TRAINING_STATE = ("model", "ema", "optimizer", "rng", "rng_per_rank", "sampler_rng", "losses", "loss_window_sum",
                  "loss_window_len")  # fmt: skip
__all__ = ["CONFIG", "WEIGHTS", "load_pretrained", "main", "save_pretrained"]


def save_pretrained(
    ckpt: dict[str, Any],
    folder: str | Path,
    command: str | None = None,
    overwrite: bool = False,
    allow_unfinished: bool = False,
) -> Path:
    """Write a loaded checkpoint's metadata and EMA weights to `folder` (created); `command` is how it was
    trained (None: the one `ckpt` records, if any). An existing export in `folder` is replaced only with
    `overwrite`; an unfinished checkpoint is exported only with `allow_unfinished`. A failed write (a full
    disk) is a UserError that leaves `folder` as it was: no half-written files, no new empty folder."""
    folder = as_path(folder, "export folder")
    check_export(ckpt, folder, overwrite, allow_unfinished)
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in ckpt["ema"].items()}
    config = {key: value for key, value in ckpt.items() if key not in TRAINING_STATE}
    config.update(weights="ema", command=ckpt.get("command") if command is None else command)
    config["checksums"] = {"ema": weights_checksum(weights)}
    text = json.dumps(config, indent=2, allow_nan=False) + "\n"
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # removed again if the write fails
    temporary = [folder / f"{WEIGHTS}.tmp", folder / f"{CONFIG}.tmp"]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(weights, temporary[0], metadata={"format": "pt"})
        temporary[1].write_text(text)
        for name in (WEIGHTS, CONFIG):  # each file appears whole or not at all
            os.replace(folder / f"{name}.tmp", folder / name)
    except (OSError, SafetensorError) as err:
        for path in temporary:
            if path.is_file():
                path.unlink()
        for path in created:  # deepest first; only what this call made, and only if empty
            try:
                path.rmdir()
            except OSError:
                break
        reason = getattr(err, "strerror", None) or str(err)
        raise UserError(f"could not export to {str(folder)!r} ({reason}); nothing was written there. Free some "
                        "space or choose another folder") from None  # fmt: skip
    return folder


def check_export(ckpt: dict[str, Any], folder: Path, overwrite: bool, allow_unfinished: bool) -> None:
    """Refuse what would lose work: replacing an export without `overwrite`, writing into a folder that holds
    other files, exporting an unfinished run without `allow_unfinished`."""
    inside = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if inside is not None:
        raise UserError(f"{str(inside)!r} is a file, not a folder; export into a new folder")
    present = {path.name for path in folder.iterdir()} if folder.is_dir() else set()
    others = sorted(present - {CONFIG, WEIGHTS, f"{CONFIG}.tmp", f"{WEIGHTS}.tmp"})
    if others:
        raise UserError(f"{str(folder)!r} holds other files ({', '.join(others[:3])}); export into a new or "
                        "empty folder")  # fmt: skip
    if present & {CONFIG, WEIGHTS} and not overwrite:
        raise UserError(f"{str(folder)!r} already holds an exported model; pass --overwrite (overwrite=True) to "
                        "replace it, or choose another folder")  # fmt: skip
    done, total = ckpt.get("train_step"), ckpt.get("max_train_steps")
    if isinstance(done, int) and isinstance(total, int) and done < total and not allow_unfinished:
        raise UserError(f"this checkpoint is unfinished (train step {done} of {total}): finish the run with "
                        "--resume, or pass --allow-unfinished (allow_unfinished=True) to export it so")  # fmt: skip


def load_pretrained(folder: str | Path) -> dict[str, Any]:
    """A folder written by save_pretrained -> a checkpoint dict (its config with the weights as 'ema').

    Only the files are read here; load_checkpoint checks what they say (checkpoint.check_loaded)."""
    folder = Path(folder)
    missing = [name for name in (CONFIG, WEIGHTS) if not (folder / name).is_file()]
    if len(missing) == 2:
        raise UserError(f"{str(folder)!r} is a folder, not a checkpoint: give a .pt file, or a pretrained model "
                        f"folder holding {CONFIG} and {WEIGHTS}")  # fmt: skip
    if missing:
        raise UserError(f"{str(folder)!r} lacks {missing[0]}: the pretrained model folder is incomplete; restore "
                        "it with `git checkout` or export it again")  # fmt: skip
    try:
        config = json.loads((folder / CONFIG).read_bytes().decode("utf-8-sig"), object_pairs_hook=_no_duplicates)
        weights = load_file(folder / WEIGHTS)
    except _Repeated as err:
        raise UserError(f"{str(folder / CONFIG)!r} gives {err} twice (the last would win): an edit went wrong; "
                        "keep one") from None  # fmt: skip
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError, RecursionError) as err:
        raise UserError(f"{str(folder)!r} holds a damaged {CONFIG} or {WEIGHTS} ({type(err).__name__}); "
                        "restore it with `git checkout` or export it again") from None  # fmt: skip
    if not isinstance(config, dict):
        raise UserError(f"{str(folder / CONFIG)!r} is not a cfg_minimal model config (not a JSON object)")
    stray = [key for key in TRAINING_STATE if key in config]
    if stray or config.get("weights", "ema") != "ema":
        what = f"holds {stray[0]!r}, which a config never does" if stray else f"says weights {config['weights']!r}"
        raise UserError(f"{str(folder / CONFIG)!r} {what}: {WEIGHTS} holds the EMA weights; restore the config")
    return {**config, "ema": weights}


class _Repeated(Exception):
    """A key given twice in one JSON object."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: a key given twice, whose last value would silently win, is refused."""
    result = dict(pairs)
    if len(result) < len(pairs):
        keys = [key for key, _ in pairs]
        raise _Repeated(repr(next(key for key in keys if keys.count(key) > 1)))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cfg_minimal.pretrained", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("checkpoint", help="a .pt checkpoint written by train_mnist.py, or a pretrained folder")
    p.add_argument("folder", help="where to write config.json and model.safetensors (a new or empty folder)")
    p.add_argument("--command", default=None, help="the command that trained it, stored in the config "
                   "(default: the one the checkpoint records, if any)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace the model already exported in FOLDER")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="export a checkpoint whose run has not reached its max_train_steps")  # fmt: skip
    args = p.parse_args(argv)
    try:
        ckpt = load_checkpoint(args.checkpoint)
        folder = save_pretrained(ckpt, args.folder, args.command, args.overwrite, args.allow_unfinished)
    except Exception as err:
        return report(err)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
    print(f"wrote {folder / CONFIG} and {folder / WEIGHTS} ({size:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

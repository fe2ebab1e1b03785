"""Shipped weights: one folder per model, `config.json` + `model.safetensors`, as diffusers' save_pretrained writes.

    python -m cfg_minimal.pretrained runs/mnist/student.pt pretrained/mnist-student --command "python ..."

The config holds everything a training checkpoint says about the model (architecture, noise schedule,
dataset, guidance range, sampling steps, the stage configs, fingerprints) and the command that trained
it; the weights are the EMA weights that sampling uses, and nothing of the training state (optimizer,
RNG, raw weights), so a folder is a third of a `.pt` checkpoint. `load_pipeline(folder)` and every CLI
that takes a checkpoint take such a folder. safetensors holds only tensors, so loading runs no code.
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

from .errors import UserError, report

CONFIG, WEIGHTS = "config.json", "model.safetensors"
TRAINING_STATE = ("model", "ema", "optimizer", "rng", "rng_per_rank", "sampler_rng", "losses", "loss_window_sum",
                  "loss_window_len")  # fmt: skip


def save_pretrained(ckpt: dict[str, Any], folder: str | Path, command: str | None = None) -> Path:
    """Write a loaded checkpoint's metadata and EMA weights to `folder` (created); `command` is how it was trained."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {key: value for key, value in ckpt.items() if key not in TRAINING_STATE}
    config.update(weights="ema", command=command)
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in ckpt["ema"].items()}
    save_file(weights, folder / f"{WEIGHTS}.tmp", metadata={"format": "pt"})
    (folder / f"{CONFIG}.tmp").write_text(json.dumps(config, indent=2) + "\n")
    for name in (WEIGHTS, CONFIG):  # each file appears whole or not at all
        os.replace(folder / f"{name}.tmp", folder / name)
    return folder


def load_pretrained(folder: str | Path) -> dict[str, Any]:
    """A folder written by save_pretrained -> a checkpoint dict (its config with the weights as 'ema')."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise UserError(f"{str(folder)!r} is a folder, not a checkpoint: give a .pt file, or a pretrained model "
                        f"folder holding {CONFIG} and {WEIGHTS}")  # fmt: skip
    try:
        config = json.loads((folder / CONFIG).read_text())
        weights = load_file(folder / WEIGHTS)
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as err:
        raise UserError(f"{str(folder)!r} holds a damaged {CONFIG} or {WEIGHTS} ({type(err).__name__}); "
                        "restore it with `git checkout` or export it again") from None  # fmt: skip
    if not isinstance(config, dict):
        raise UserError(f"{str(folder / CONFIG)!r} is not a cfg_minimal model config")
    return {**config, "ema": weights}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cfg_minimal.pretrained", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("checkpoint", help="a .pt checkpoint written by train_mnist.py")
    p.add_argument("folder", help="where to write config.json and model.safetensors")
    p.add_argument("--command", default=None, help="the command that trained it, stored in the config")
    args = p.parse_args(argv)
    try:
        from .checkpoint import load_checkpoint  # here, not at the top: checkpoint.py imports this file

        folder = save_pretrained(load_checkpoint(args.checkpoint), args.folder, args.command)
    except Exception as err:
        return report(err)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
    print(f"wrote {folder / CONFIG} and {folder / WEIGHTS} ({size:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

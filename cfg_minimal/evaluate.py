"""Guidance sweeps: what s buys and costs, for teachers and students, in numbers and plots.

    python -m cfg_minimal.evaluate --ckpt runs/digits/teacher.pt --ckpt runs/digits/student.pt \
        --scales 0 0.5 1 2 3 4 6 --n 1000 --out runs/digits/eval

For each checkpoint and scale s it samples n images with balanced labels from the same x_T, and
measures with a small classifier trained on the real data (classifier.py):
  accuracy   share of samples the classifier labels as the requested class
  FD         Frechet distance between classifier features of samples and of real test images
  diversity  mean pairwise feature distance within a class, relative to the real test set's
  cost       network evaluations per image (2 per step for a guided teacher, 1 for a student
             or at s in {0, 1}) and wall time per image
Writes metrics.json, guidance_sweep.png (accuracy, FD and diversity against s, and the FD-accuracy
frontier) and samples_by_scale.png into --out (default: eval/ next to the first checkpoint); files that
are there already are refused, before any sampling, unless --overwrite.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .checkpoint import writable_folder
from .classifier import Classifier, cache_path, load_or_train_classifier
from .data import load_dataset
from .distributed import pick_device
from .errors import UserError, report, user_message
from .metrics import ClassifierStats, accuracy, class_diversity, classifier_stats, frechet_distance
from .plotting import plot_guidance_sweep, save_scale_grid
from .resume import MAX_SEED
from .sampling import DEFAULT_SAMPLING_STEPS, Pipeline, load_pipeline

CACHE_DIR = Path(os.environ.get("CFG_MINIMAL_CACHE", Path.home() / ".cache" / "cfg_minimal"))
SWEEP_FILES = ("metrics.json", "guidance_sweep.png", "samples_by_scale.png")  # what write_sweep writes


def generate(
    pipe: Pipeline,
    n: int,
    scale: float,
    num_steps: int,
    seed: int = 0,
    batch_size: int = 500,
    progress: bool = False,
    **variants,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """n samples with labels 0, 1, ..., K-1, 0, 1, ... from the noise of `seed` -> (images, labels, seconds),
    sampled `batch_size` at a time. `variants`: the Pipeline's guidance keyword arguments."""
    labels = torch.arange(n) % pipe.num_classes  # (n,)
    start = time.perf_counter()  # x_T and any sampler noise per sample, from `seed` (Pipeline.noise_generators)
    images = replace(pipe, max_batch_size=batch_size)(labels, scale, num_steps, generator=seed, progress=progress,
                                                      **variants)  # fmt: skip
    return images.cpu(), labels, time.perf_counter() - start


def evals_per_image(pipe: Pipeline, scale: float, num_steps: int) -> int:
    """Network evaluations per image of `num_steps` sampling steps at `scale`: one per timestep the scheduler
    visits for that many steps (2n - 1 for flow Heun, which lists inner grid points twice), times the passes
    (two for a teacher at s other than 0 and 1). Read from a copy of the scheduler: the pipe's keeps its state."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(num_steps)
    return len(scheduler.timesteps) * (1 if pipe.is_student or scale in (0.0, 1.0) else 2)


def sweep(
    pipes: dict[str, Pipeline],
    scales: Sequence[float],
    n: int,
    num_steps: int | None = DEFAULT_SAMPLING_STEPS,
    seed: int = 0,
    data_dir: str | Path = "./data",
    classifier: tuple[Classifier, float] | None = None,
    progress: bool = True,
    batch_size: int = 500,
) -> tuple[dict[str, Any], dict[str, dict[float, torch.Tensor]]]:
    """Measure every pipeline at every scale -> (metrics dict for JSON, images[name][scale]).

    num_steps=None samples each pipeline with its own sampling steps (a step-distilled student's);
    `batch_size` images are sampled at a time."""
    first = next(iter(pipes.values()))
    if len({(p.dataset, p.image_size, p.channels) for p in pipes.values()}) > 1:
        raise UserError("the checkpoints of one sweep must come from the same dataset")
    judge = Judge.load(first.dataset, data_dir, first.device, progress, classifier)
    metrics: dict[str, Any] = dict(
        dataset=first.dataset, n=n, sampling_steps=num_steps, seed=seed, scales=list(scales),
        classifier_test_accuracy=judge.test_accuracy, real_diversity=judge.real_diversity, models={},
    )  # fmt: skip
    images: dict[str, dict[float, torch.Tensor]] = {}
    for name, pipe in pipes.items():
        rows, images[name] = [], {}
        steps = num_steps or pipe.sampling_steps
        for s in scales:
            x, labels, seconds = generate(pipe, n, s, steps, seed, batch_size)
            rows.append(dict(
                scale=s, sampling_steps=steps, **judge(x, labels),
                evals_per_image=evals_per_image(pipe, s, steps), seconds_per_image=seconds / n,
            ))  # fmt: skip
            images[name][s] = x
            if progress:
                print(f"  {name:>8} s={s:<4g} accuracy {rows[-1]['accuracy']:.3f}  FD {rows[-1]['fd']:.2f}  "
                      f"diversity {rows[-1]['diversity']:.2f}", flush=True)  # fmt: skip
        sampler = dict(sampler=type(pipe.scheduler).__name__, shift=getattr(pipe.scheduler, "shift", None))
        metrics["models"][name] = dict(kind="student" if pipe.is_student else "teacher", **sampler, per_scale=rows)
    if {"teacher", "student"} <= set(pipes):
        metrics["student_vs_teacher"] = [
            dict(scale=s, rel_l2=relative_l2(images["student"][s], images["teacher"][s]),
                 acc_teacher=t["accuracy"], acc_student=st["accuracy"])
            for s, t, st in zip(scales, metrics["models"]["teacher"]["per_scale"],
                                metrics["models"]["student"]["per_scale"])
        ]  # fmt: skip
    return metrics, images


def score(
    classifier: Classifier,
    real_stats: ClassifierStats,
    real_diversity: float,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> dict[str, float]:
    """Accuracy, FD to the real test features, and within-class diversity relative to the real set's."""
    device = next(classifier.parameters()).device
    stats = classifier_stats(classifier, images.to(device))
    num_classes = stats.logits.shape[1]
    return dict(
        accuracy=accuracy(stats.preds, labels), fd=frechet_distance(stats.features, real_stats.features),
        diversity=class_diversity(stats.features, labels, num_classes) / real_diversity,
    )  # fmt: skip


@dataclass
class Judge:
    """The evaluation classifier and the real test set's statistics: `judge(images, labels)` scores
    samples (accuracy, FD, diversity) as `score` does. The benchmarks share it."""

    classifier: Classifier
    test_accuracy: float
    real_stats: ClassifierStats
    real_diversity: float

    @classmethod
    def load(
        cls,
        dataset: str,
        data_dir: str | Path,
        device: torch.device,
        progress: bool = True,
        classifier: tuple[Classifier, float] | None = None,
    ) -> Judge:
        """The cached classifier of `dataset` (trained on first use), or the given (classifier, test accuracy)."""
        if classifier is None:
            check_classifier_cache(dataset)  # before minutes of training, not after
        classifier, test_accuracy = classifier or load_or_train_classifier(
            dataset, data_dir, CACHE_DIR, device, progress
        )
        real = load_dataset(dataset, data_dir, train=False)
        real_stats = classifier_stats(classifier, real.images.to(device))
        real_diversity = class_diversity(real_stats.features, real.labels.to(device), real.info.num_classes)
        return cls(classifier, test_accuracy, real_stats, real_diversity)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return score(self.classifier, self.real_stats, self.real_diversity, images, labels)


def check_writable(folder: str | Path) -> Path:
    """`folder` as a Path when it takes files, or could be made to, else writable_folder's UserError; unlike
    writable_folder it leaves no folder behind that was not there (a refusal changes nothing)."""
    folder = Path(folder)
    missing = [path for path in (folder, *folder.parents) if not path.exists()]  # deepest first
    try:
        return writable_folder(folder)
    finally:
        for path in missing:
            try:
                path.rmdir()
            except OSError:  # not made, or not empty
                pass


def check_classifier_cache(dataset: str) -> None:
    """A UserError now, before any training or sampling, when the evaluation classifier of `dataset` is not
    cached yet and CACHE_DIR (CFG_MINIMAL_CACHE) cannot be written: it would be trained, then not saved."""
    if cache_path(CACHE_DIR, dataset).is_file():
        return
    try:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        (CACHE_DIR / ".write_test").touch()
        (CACHE_DIR / ".write_test").unlink()
    except OSError as err:
        raise UserError(f"the evaluation classifier of {dataset} is trained once and cached in {str(CACHE_DIR)!r}, "
                        f"which cannot be written ({err.strerror or err}); set CFG_MINIMAL_CACHE to a writable "
                        "folder") from None  # fmt: skip


def relative_l2(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over images of ||a - b|| / ||b||, per image over all pixels."""
    diff = (images - reference).flatten(1).norm(dim=1)  # (N,)
    return float((diff / reference.flatten(1).norm(dim=1).clamp(min=1e-12)).mean())


def save_samples_by_scale(images: dict[str, dict[float, torch.Tensor]], num_classes: int, class_names: Sequence[str],
                          path: str | Path) -> None:  # fmt: skip
    """Rows = classes, one block per scale holding the first sample of each class from each model."""
    names = list(images)
    scales = list(images[names[0]])
    grid = torch.stack([
        torch.stack([images[name][s][c] for name in names]) for c in range(num_classes) for s in scales
    ]).reshape(num_classes, len(scales), len(names), *images[names[0]][scales[0]].shape[1:])  # fmt: skip
    save_scale_grid(grid, scales, class_names, path, title="columns in each block: " + ", ".join(names))


def model_names(paths: Sequence[str], pipes: Sequence[Pipeline]) -> list[str]:
    """'teacher' / 'student' when each kind occurs once, else the file names."""
    kinds = ["student" if p.is_student else "teacher" for p in pipes]
    if len(set(kinds)) == len(kinds):
        return kinds
    names = [Path(p).stem for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cfg_minimal.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--ckpt", action="append", required=True, help="checkpoint (repeat for several)")
    p.add_argument("--scales", type=float, nargs="+", default=[0, 0.5, 1, 2, 3, 4, 6])
    p.add_argument("--n", type=int, default=1000, help="samples per scale and checkpoint")
    p.add_argument("--sampling-steps", type=int, default=None,
                   help="DDIM steps (default: each checkpoint's own, 50 unless step-distilled)")  # fmt: skip
    p.add_argument("--shift", type=float, help="rectified-flow models' SD3/FLUX sigma shift (default: their own, 1)")
    p.add_argument("--batch-size", type=int, default=500, help="images sampled at once (default: 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="output folder (default: eval/ next to the first checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier sweep in --out")
    args = p.parse_args(argv)
    if args.n < 2 or (args.sampling_steps is not None and args.sampling_steps < 1):
        p.error("--n must be at least 2 and --sampling-steps at least 1")
    if args.batch_size < 1:
        p.error(f"--batch-size must be a positive integer, got {args.batch_size}")
    if not all(math.isfinite(s) for s in args.scales):
        p.error(f"--scales must be finite numbers, got {args.scales}")
    if not 0 <= args.seed <= MAX_SEED:
        p.error(f"--seed must be an integer in [0, 2**63 - 1], got {args.seed}")
    if len(set(args.ckpt)) < len(args.ckpt) or len(set(args.scales)) < len(args.scales):
        p.error("each --ckpt and each of --scales once: a repeated one would be measured twice under one name")
    return args


def sweep_folder(out: Path, overwrite: bool) -> Path:
    """`out`, writable, holding none of SWEEP_FILES (unless overwrite): checked before anything is sampled."""
    taken = [out / name for name in SWEEP_FILES if (out / name).exists()]
    if taken and not overwrite:
        raise UserError(f"{taken[0]} already exists; pass --overwrite to replace it, or choose another --out")
    return check_writable(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        pipes = [load_pipeline(path, device=device, shift=args.shift) for path in args.ckpt]
        if args.n < 2 * pipes[0].num_classes:
            raise UserError(f"--n must be at least two samples per class ({2 * pipes[0].num_classes}), got {args.n}")
        named = dict(zip(model_names(args.ckpt, pipes), pipes))
        out = sweep_folder(Path(args.out) if args.out else Path(args.ckpt[0]).parent / "eval", args.overwrite)
        check_classifier_cache(pipes[0].dataset)
        metrics, images = sweep(named, args.scales, args.n, args.sampling_steps, args.seed, args.data_dir,
                                batch_size=args.batch_size)  # fmt: skip
        write_sweep(metrics, images, pipes[0], out)
    except Exception as err:  # a user's mistake: one line, exit code 2
        if (user_message(err) or "").startswith("ran out of memory"):  # the advice this command can give
            err = UserError(f"ran out of memory sampling {args.batch_size} images at once; lower --batch-size")
        return report(err)
    return 0


def write_sweep(metrics: dict[str, Any], images: dict, pipe: Pipeline, out: Path) -> None:
    """metrics.json, guidance_sweep.png and samples_by_scale.png in `out` (made if need be)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_guidance_sweep(metrics, out / "guidance_sweep.png")
    save_samples_by_scale(images, pipe.num_classes, pipe.class_names, out / "samples_by_scale.png")
    print(f"wrote {out / 'metrics.json'}, {out / 'guidance_sweep.png'} and {out / 'samples_by_scale.png'}")


if __name__ == "__main__":
    sys.exit(main())

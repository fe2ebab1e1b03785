"""Guidance variants side by side on one teacher, from the same x_T: what each buys and costs.

    python -m benchmarks.guidance_variants --teacher runs/digits/teacher.pt --student runs/digits/student.pt

Rows: plain CFG, guidance rescale (phi = 0.7, Lin et al. 2024), a guidance interval (Kynkäänniemi
et al. 2024; by default EDM2's sigma in (0.28, 5.42], converted to this schedule's timesteps) and
negative-class guidance, where each class's negative is the class the evaluation classifier most
often confuses it with (its runner-up on plain samples at s = 1). Columns:
  accuracy, FD, diversity   as in `python -m cfg_minimal.evaluate`
  ink                       mean pixel brightness relative to the real test images (> 1: over-exposed)
  p(neg)                    the classifier's mean probability of that negative class
  evals                     network evaluations per image, counted
Writes a table (stdout, and --out/guidance_variants.json) and a figure of the first samples per class.
The student rows show what one pass per step keeps (the interval) and loses (negative classes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cfg_minimal import UserError, load_pipeline, pick_device
from cfg_minimal.data import load_dataset, to_unit_range
from cfg_minimal.evaluate import Judge, generate
from cfg_minimal.metrics import classifier_stats
from cfg_minimal.plotting import save_scale_grid
from cfg_minimal.sampling import Pipeline

FIGURE_BLOCKS = {("plain", 3.0), ("plain", 10.0), ("rescale", 10.0), ("interval", 10.0), ("negative", 3.0)}


def sigma_interval_to_timesteps(pipe: Pipeline, sigma_lo: float, sigma_hi: float) -> tuple[int, int]:
    """The timesteps whose noise level sigma_t = sqrt((1 - abar_t) / abar_t) lies in (sigma_lo, sigma_hi]."""
    abar = pipe.scheduler.alphas_cumprod
    sigma = ((1 - abar) / abar).sqrt()  # (T,) increasing in t
    inside = ((sigma > sigma_lo) & (sigma <= sigma_hi)).nonzero().flatten()
    return int(inside.min()), int(inside.max())


class EvalCounter:
    """Counts the images a model is evaluated on, with a forward hook."""

    def __init__(self, model: torch.nn.Module):
        self.images = 0
        model.register_forward_hook(lambda module, args, output: self.count(len(args[0])))

    def count(self, n: int) -> None:
        self.images += n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="runs/digits/teacher.pt")
    p.add_argument("--student", default=None, help="its distilled student (optional)")
    p.add_argument("--n", type=int, default=500, help="samples per row")
    p.add_argument("--sampling-steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--phi", type=float, default=0.7, help="guidance rescale phi")
    p.add_argument("--sigma-interval", type=float, nargs=2, default=[0.28, 5.42], metavar=("LO", "HI"))
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="docs")
    args = p.parse_args()
    device = pick_device(args.device)
    teacher = load_pipeline(args.teacher, device=device)
    judge = Judge.load(teacher.dataset, args.data_dir, device)
    classifier, real = judge.classifier, load_dataset(teacher.dataset, args.data_dir, train=False)
    real_ink = float(to_unit_range(real.images).mean())

    K = teacher.num_classes
    plain_s1, labels, _ = generate(teacher, args.n, 1.0, args.sampling_steps)
    probs = classifier_stats(classifier, plain_s1.to(device)).logits.softmax(dim=1)  # (n, K)
    confusion = torch.stack([probs[labels == c].mean(dim=0) for c in range(K)])  # (K, K)
    confusion.fill_diagonal_(-1.0)
    runner_up = confusion.argmax(dim=1)  # (K,) each class's most confusable other class
    negative = runner_up[labels]  # (n,)
    interval = sigma_interval_to_timesteps(teacher, *args.sigma_interval)
    print(f"negative class per class: {runner_up.tolist()}; interval t in {list(interval)}")

    rows = [("teacher", "plain", s, {}) for s in (1.0, 1.5, 2.0, 3.0, 6.0, 10.0)]
    rows += [("teacher", f"rescale {args.phi:g}", s, dict(guidance_rescale=args.phi)) for s in (3.0, 6.0, 10.0)]
    rows += [("teacher", "interval", s, dict(guidance_interval=interval)) for s in (3.0, 6.0, 10.0)]
    rows += [("teacher", "negative class", s, dict(negative_labels=negative)) for s in (1.5, 2.0, 3.0)]
    pipes = {"teacher": teacher}
    if args.student:
        pipes["student"] = load_pipeline(args.student, device=device)
        rows += [("student", "plain", s, {}) for s in (3.0, 6.0)]
        rows += [("student", "interval", 6.0, dict(guidance_interval=interval))]
        rows += [("student", "negative class", 3.0, dict(negative_labels=negative))]
    counters = {name: EvalCounter(pipe.model) for name, pipe in pipes.items()}

    results, figure_blocks = [], []
    header = f"{'model':<8} {'variant':<15} {'s':>4} {'accuracy':>8} {'FD':>7} {'diversity':>9} {'ink':>5} "
    print(header + f"{'p(neg)':>6} {'evals':>6}")
    for model_name, variant, scale, kwargs in rows:
        counter, before = counters[model_name], counters[model_name].images
        try:
            images, labels, seconds = generate(pipes[model_name], args.n, scale, args.sampling_steps, **kwargs)
        except UserError as err:
            print(f"{model_name:<8} {variant:<15} {scale:>4g}  refused: {err}")
            results.append(dict(model=model_name, variant=variant, scale=scale, refused=str(err)))
            continue
        probs = classifier_stats(classifier, images.to(device)).logits.softmax(dim=1)  # (n, K)
        row = dict(
            model=model_name, variant=variant, scale=scale, **judge(images, labels),
            ink=float(to_unit_range(images).mean()) / real_ink, p_neg=float(probs.gather(1, negative[:, None]).mean()),
            evals=(counter.images - before) / args.n, seconds=seconds,
        )  # fmt: skip
        results.append(row)
        print(f"{model_name:<8} {variant:<15} {scale:>4g} {row['accuracy']:>8.3f} {row['fd']:>7.2f} "
              f"{row['diversity']:>9.2f} {row['ink']:>5.2f} {row['p_neg']:>6.3f} {row['evals']:>6.0f}")  # fmt: skip
        if model_name == "teacher" and (variant.split()[0], scale) in FIGURE_BLOCKS:
            figure_blocks.append((f"{variant}\ns = {scale:g}", images))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "guidance_variants.json").write_text(json.dumps(dict(
        checkpoint=args.teacher, n=args.n, sampling_steps=args.sampling_steps, interval=interval,
        negative_of_class=runner_up.tolist(), rows=results), indent=2))  # fmt: skip
    per_class = 2
    grid = torch.stack([
        torch.stack([torch.stack([images[c + k * K] for k in range(per_class)]) for _, images in figure_blocks])
        for c in range(K)
    ])  # (K, blocks, per_class, C, H, W): sample c + k K has label c  # fmt: skip
    names = [name for name, _ in figure_blocks]
    title = f"guidance variants on {teacher.dataset}, same x_T in every block (negative: the runner-up class)"
    save_scale_grid(grid, [0.0] * len(names), teacher.class_names, out / "guidance_variants.png", title, names)
    print(f"wrote {out / 'guidance_variants.json'} and {out / 'guidance_variants.png'}")


if __name__ == "__main__":
    main()

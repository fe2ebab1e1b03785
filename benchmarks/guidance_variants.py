"""Guidance variants side by side on one teacher, from the same x_T: what each buys and costs.

    python -m benchmarks.guidance_variants --teacher runs/digits/teacher.pt --student runs/digits/student.pt

Rows: plain CFG and its options (guidance.CFG): guidance rescale (phi = 0.7, Lin et al. 2024), a
guidance interval (Kynkäänniemi et al. 2024; by default EDM2's sigma in (0.28, 5.42], converted to this
schedule's timesteps; on a rectified-flow teacher sigma = s / (1 - s) at s = t / T, the same noise-to-signal
ratio) and negative-class guidance, where each class's negative is the class the
evaluation classifier most often confuses it with (its runner-up on plain samples at s = 1). Columns:
  accuracy, FD, diversity   as in `python -m cfg_minimal.evaluate`
  ink                       mean pixel brightness relative to the real test images (> 1: over-exposed)
  p(neg)                    the classifier's mean probability of that negative class
  evals                     network evaluations per image, counted
Every row samples the same x_T and labels (n per row and seed, the mean over --seed). Writes a table
(stdout, and OUT/guidance_variants.json) and a figure of the first samples per class (OUT/guidance_variants.png).
The student rows show what one pass per step keeps (the interval) and loses (negative classes).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import harness
from cfg_minimal import UserError, load_checkpoint, load_pipeline, pick_device
from cfg_minimal.data import load_dataset, to_unit_range
from cfg_minimal.evaluate import generate
from cfg_minimal.guidance import CFG
from cfg_minimal.metrics import classifier_stats
from cfg_minimal.plotting import save_scale_grid
from cfg_minimal.predictions import is_flow
from cfg_minimal.sampling import Pipeline

FIGURE_BLOCKS = {("plain", 3.0), ("plain", 10.0), ("rescale", 10.0), ("interval", 10.0), ("negative", 3.0)}
TABLE = harness.Table(["model", ("variant", "variant", "{}"), "scale", "accuracy", "fd", "diversity",
                       ("ink", "ink", "{:.2f}"), ("p_neg", "p(neg)", "{:.3f}"), "evals_per_image"])  # fmt: skip


def noise_levels(pipe: Pipeline) -> torch.Tensor:
    """EDM's sigma (noise-to-signal ratio) of each integer timestep t in [0, T) (T,), increasing in t: VP
    sqrt((1 - abar_t) / abar_t); rectified flow (x_t = (1 - s) x_0 + s eps, s = t / T, flow.py) s / (1 - s)."""
    scheduler = pipe.scheduler
    if is_flow(getattr(scheduler, "prediction_type", None)):
        s = torch.arange(scheduler.num_train_timesteps, dtype=torch.float64) / scheduler.num_train_timesteps  # (T,)
        return s / (1 - s)
    abar = scheduler.alphas_cumprod
    return ((1 - abar) / abar).sqrt()  # (T,)


def sigma_interval_to_timesteps(pipe: Pipeline, sigma_lo: float, sigma_hi: float) -> tuple[int, int]:
    """The timesteps whose noise level sigma_t (`noise_levels`) lies in (sigma_lo, sigma_hi]."""
    sigma = noise_levels(pipe)  # (T,) increasing in t
    inside = ((sigma > sigma_lo) & (sigma <= sigma_hi)).nonzero().flatten()
    if len(inside) == 0:
        raise UserError(f"--sigma-interval {sigma_lo:g} {sigma_hi:g} holds no timestep of this schedule (its sigma_t "
                        f"runs from {float(sigma[0]):.3g} to {float(sigma[-1]):.3g}); widen it")  # fmt: skip
    return int(inside.min()), int(inside.max())


def load_models(args: argparse.Namespace, device: torch.device) -> dict[str, Pipeline]:
    """--teacher (a teacher) and, if given, --student (a guided student of the same data set)."""
    pipes = {"teacher": load_pipeline(args.teacher, device=device)}
    load_checkpoint(args.teacher, kind="teacher")
    if args.student:
        pipes["student"] = load_pipeline(args.student, device=device)
        load_checkpoint(args.student, kind="student")
        if pipes["student"].dataset != pipes["teacher"].dataset:
            raise UserError(f"--student is a {pipes['student'].dataset} student, --teacher a "
                            f"{pipes['teacher'].dataset} teacher; give two of the same data set")  # fmt: skip
    return pipes


def run(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    pipes = load_models(args, device)
    teacher, K = pipes["teacher"], pipes["teacher"].num_classes
    if args.n < 2 * K:
        raise UserError(f"--n must be at least two samples per class ({2 * K}), got {args.n}")
    CFG(rescale=args.phi)  # a phi out of range fails now, not after the first rows
    interval = sigma_interval_to_timesteps(teacher, *args.sigma_interval)
    out = harness.Outputs.of(args, "guidance_variants.json", "guidance_variants.png")
    judge = harness.load_judge(teacher.dataset, args.data_dir, device)
    real_ink = float(to_unit_range(load_dataset(teacher.dataset, args.data_dir, train=False).images).mean())

    plain_s1, labels, _ = generate(teacher, args.n, 1.0, args.sampling_steps, args.seed[0])
    probs = classifier_stats(judge.classifier, plain_s1.to(device)).logits.softmax(dim=1)  # (n, K)
    confusion = torch.stack([probs[labels == c].mean(dim=0) for c in range(K)])  # (K, K)
    confusion.fill_diagonal_(-1.0)
    runner_up = confusion.argmax(dim=1)  # (K,) each class's most confusable other class
    negative = runner_up[labels]  # (n,): generate's labels are the same for every seed
    print(f"negative class per class: {runner_up.tolist()}; interval t in {list(interval)}")

    variants = {"plain": None, f"rescale {args.phi:g}": CFG(rescale=args.phi), "interval": CFG(interval=interval),
                "negative class": CFG(negative_labels=negative)}  # fmt: skip
    rows = [("teacher", "plain", s) for s in (1.0, 1.5, 2.0, 3.0, 6.0, 10.0)]
    rows += [("teacher", f"rescale {args.phi:g}", s) for s in (3.0, 6.0, 10.0)]
    rows += [("teacher", "interval", s) for s in (3.0, 6.0, 10.0)]
    rows += [("teacher", "negative class", s) for s in (1.5, 2.0, 3.0)]
    if args.student:
        rows += [("student", "plain", 3.0), ("student", "plain", 6.0), ("student", "interval", 6.0),
                 ("student", "negative class", 3.0)]  # fmt: skip
    cases = [harness.Case(model, pipes[model], s, args.sampling_steps, columns=dict(variant=variant),
                          options={} if variants[variant] is None else dict(guider=variants[variant]))
             for model, variant, s in rows]  # fmt: skip

    figure_blocks: dict[str, torch.Tensor] = {}

    def ink_and_negative(case: harness.Case, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Brightness relative to the real images, the classifier's mean p(negative class); keeps the figure's."""
        probs = classifier_stats(judge.classifier, images.to(device)).logits.softmax(dim=1)  # (n, K)
        variant = case.columns["variant"]
        if case.model == "teacher" and (variant.split()[0], case.scale) in FIGURE_BLOCKS:
            figure_blocks.setdefault(f"{variant}\ns = {case.scale:g}", images)  # the first seed's
        return dict(ink=float(to_unit_range(images).mean()) / real_ink,
                    p_neg=float(probs.gather(1, negative[:, None].to(device)).mean()))  # fmt: skip

    results = harness.measure(cases, judge, args.n, args.seed, table=TABLE, extra_metrics=ink_and_negative)
    out.json("guidance_variants.json", harness.record(
        args, device, checkpoint=args.teacher, n=args.n, sampling_steps=args.sampling_steps, interval=interval,
        negative_of_class=runner_up.tolist(), rows=results))  # fmt: skip
    per_class = 2
    grid = torch.stack([
        torch.stack([torch.stack([images[c + k * K] for k in range(per_class)]) for images in figure_blocks.values()])
        for c in range(K)
    ])  # (K, blocks, per_class, C, H, W): sample c + k K has label c  # fmt: skip
    names = list(figure_blocks)
    title = f"guidance variants on {teacher.dataset}, same x_T in every block (negative: the runner-up class)"
    save_scale_grid(grid, [0.0] * len(names), teacher.class_names, out.path("guidance_variants.png"), title, names)
    print(f"wrote {out.folder / 'guidance_variants.png'}")


def build_parser() -> argparse.ArgumentParser:
    p = harness.parser("guidance_variants", __doc__, n=500)
    p.add_argument("--teacher", default="runs/digits/teacher.pt", help="default: runs/digits/teacher.pt")
    p.add_argument("--student", default=None, help="its distilled student (optional)")
    p.add_argument(
        "--sampling-steps", type=int, default=50, help="DDIM steps (flow Euler for a flow teacher; default: 50)"
    )
    p.add_argument("--phi", type=float, default=0.7, help="guidance rescale phi (default: 0.7)")
    p.add_argument("--sigma-interval", type=float, nargs=2, default=[0.28, 5.42], metavar=("LO", "HI"),
                   help="guide where sigma_t is in (LO, HI] (default: EDM2's 0.28 5.42)")  # fmt: skip
    return p


main = harness.entry(build_parser, run, __name__)

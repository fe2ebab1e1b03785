"""Is step distillation worth it? Quality against network evaluations for every route to few-step sampling.

    python -m benchmarks.frontier --run-dir runs/digits --data-dir ../shared/data    # digits, offline
    python -m benchmarks.frontier --run-dir runs/mnist --data-dir ../shared/data     # MNIST

RUN_DIR holds a training run: teacher.pt, student.pt (the guided student) and the step-distilled
student_{n}steps.pt (`train_mnist.py --stage step-distill --target-sampling-steps 4`). Routes:
  CFG teacher + DDIM, CFG teacher + DPM-Solver++(2M)      two passes per step at s != 1, one at s = 1
  guided student + DDIM, guided student + DPM-Solver++     one pass per step
  step-distilled student                                   one pass per step, its own 'aligned' grid
At each budget of network evaluations per image (--budgets) each route takes as many sampling steps
as the budget buys. Every row samples the same x_T and labels (n per row); accuracy, FD and
diversity as in `python -m cfg_minimal.evaluate`; evaluations are counted, not assumed. At --seed-budget
the rows are repeated with --extra-seeds. First a check of why an unclipped DPM-Solver++ diverges
with CFG on the cosine schedule. Writes frontier.json and frontier.png into --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import ScalarFormatter

from cfg_minimal import UserError, load_checkpoint, load_pipeline, pick_device
from cfg_minimal.evaluate import Judge, generate
from cfg_minimal.sampling import Pipeline
from cfg_minimal.schedulers import DPMSolverMultistepScheduler

ROUTES = ("CFG teacher + DDIM", "CFG teacher + DPM-Solver++", "guided student + DDIM",
          "guided student + DPM-Solver++", "step-distilled student")  # fmt: skip


def count_evaluations(pipe: Pipeline) -> list[int]:
    """A list that grows by the batch size at every network evaluation of `pipe.model`."""
    counter: list[int] = [0]
    pipe.model.register_forward_hook(lambda module, args, output: counter.__setitem__(0, counter[0] + len(args[0])))
    return counter


def sample_row(
    pipe: Pipeline, counter: list[int], scale: float, steps: int, n: int, seed: int
) -> tuple[torch.Tensor, float, float]:
    """n images, labels 0..K-1 repeated, from the noise of `seed` -> (images, evaluations per image, s / image)."""
    before = counter[0]
    images, _, seconds = generate(pipe, n, scale, steps, seed)
    return images, (counter[0] - before) / n, seconds / n


def divergence_check(run_dir: Path, device: torch.device, judge: Judge, n: int) -> list[dict]:
    """The CFG teacher at s = 3, 20 steps: diffusers' DPM-Solver++ as a user drops it in, this project's
    without and with clipping x0, and with lambda_min_clipped = -5.1 (diffusers' advice for cosine)."""
    try:
        import diffusers  # in requirements-dev.txt
    except ImportError:
        diffusers = None
    pipe = load_pipeline(run_dir / "teacher.pt", device=device)
    schedule = load_checkpoint(run_dir / "teacher.pt")["scheduler_config"]
    cfg = {key: schedule[key] for key in ("num_train_timesteps", "beta_schedule")}
    variants = {
        "diffusers DPMSolverMultistepScheduler, defaults": diffusers and diffusers.DPMSolverMultistepScheduler(**cfg),
        "ours, clip_sample=False": DPMSolverMultistepScheduler(**cfg, clip_sample=False),
        "ours, clip_sample=False, lambda_min_clipped=-5.1": DPMSolverMultistepScheduler(
            **cfg, clip_sample=False, lambda_min_clipped=-5.1),
        "ours, clip_sample=True (the default)": DPMSolverMultistepScheduler(**cfg),
    }  # fmt: skip
    rows = []
    for name, scheduler in variants.items():
        if scheduler is None:  # diffusers is not installed
            continue
        pipe.scheduler = scheduler
        try:
            images, labels, _ = generate(pipe, n, 3.0, 20)
            row = dict(variant=name, max_abs_pixel=float(images.abs().max()), **judge(images.clamp(-1, 1), labels))
        except UserError as err:  # a NaN result is refused by the pipeline
            row = dict(variant=name, failed=str(err))
        rows.append(row)
        print(json.dumps(row))
    return rows


def routes(run_dir: Path, device: torch.device) -> dict[str, Pipeline | dict[int, Pipeline]]:
    """Each route's pipeline; the step-distilled route has one per sampling-step count."""
    students = {}
    for path in run_dir.glob("student_*steps.pt"):
        pipe = load_pipeline(path, device=device)
        students[pipe.sampling_steps] = pipe
    return {
        ROUTES[0]: load_pipeline(run_dir / "teacher.pt", device=device),
        ROUTES[1]: load_pipeline(run_dir / "teacher.pt", device=device, scheduler="dpmsolver++"),
        ROUTES[2]: load_pipeline(run_dir / "student.pt", device=device),
        ROUTES[3]: load_pipeline(run_dir / "student.pt", device=device, scheduler="dpmsolver++"),
        ROUTES[4]: students,
    }


def measure(args: argparse.Namespace, pipes: dict, judge: Judge) -> list[dict]:
    """Every route at every budget and scale (and extra seeds at --seed-budget): the table's rows."""
    results, counters = [], {}
    print("| route | s | evaluations / image | sampling steps | seed | accuracy | FD | diversity | ms / image |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for budget in args.budgets:
        seeds = [0, *args.extra_seeds] if budget == args.seed_budget else [0]
        for route in ROUTES:
            pipe = pipes[route].get(budget) if route == ROUTES[4] else pipes[route]
            if pipe is None:  # no step-distilled student for this budget
                continue
            if id(pipe) not in counters:
                counters[id(pipe)] = count_evaluations(pipe)
            for s, seed in [(s, seed) for s in args.scales for seed in seeds]:
                steps = budget // (2 if route.startswith("CFG") and s not in (0.0, 1.0) else 1)  # CFG: two passes
                if steps == 0:  # the budget does not buy one step
                    continue
                images, evals, seconds = sample_row(pipe, counters[id(pipe)], s, steps, args.n, seed)
                labels = torch.arange(args.n) % pipe.num_classes
                row = dict(route=route, scale=s, budget=budget, evals=evals, sampling_steps=steps, seed=seed,
                           ms_per_image=1000 * seconds, **judge(images, labels))  # fmt: skip
                results.append(row)
                print(
                    f"| {route} | {s:g} | {evals:.0f} | {steps} | {seed} | {row['accuracy']:.3f} | "
                    f"{row['fd']:.2f} | {row['diversity']:.2f} | {row['ms_per_image']:.2f} |",
                    flush=True,
                )
    return results


def plot(results: list[dict], scales: list[float], path: Path, title: str) -> None:
    """FD against evaluations per image, a curve per route, a panel per s (seed 0)."""
    fig, axes = plt.subplots(1, len(scales), figsize=(5.5 * len(scales), 4), dpi=120, squeeze=False)
    for ax, s in zip(axes[0], scales):
        for route in ROUTES:
            rows = sorted((r for r in results if r["route"] == route and r["scale"] == s and r["seed"] == 0),
                          key=lambda r: r["evals"])  # fmt: skip
            style = dict(marker="o", linestyle="--" if "DDIM" in route else "-")
            ax.plot([r["evals"] for r in rows], [r["fd"] for r in rows], label=route, **style)
        ax.set(xscale="log", yscale="log", xlabel="network evaluations per image", ylabel="FD (lower is better)",
               title=f"s = {s:g}")  # fmt: skip
        budgets = sorted({r["budget"] for r in results})
        ax.minorticks_off()
        ax.set_xticks(budgets, [str(b) for b in budgets])
        fds = [r["fd"] for r in results if r["scale"] == s]
        ax.set_yticks([v for v in (1.5, 2, 3, 4, 5, 7, 10, 15, 20, 30, 50) if min(fds) <= v <= max(fds)])
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/mnist", help="teacher.pt, student.pt and student_{n}steps.pt")
    p.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 16, 32], help="network evaluations per image")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--n", type=int, default=500, help="samples per row")
    p.add_argument("--seed-budget", type=int, default=8, help="the budget measured on --extra-seeds too")
    p.add_argument("--extra-seeds", type=int, nargs="*", default=[1, 2])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="docs")
    args = p.parse_args()
    device, run_dir, out = pick_device(args.device), Path(args.run_dir), Path(args.out)
    pipes = routes(run_dir, device)
    judge = Judge.load(pipes[ROUTES[0]].dataset, args.data_dir, device)
    check = divergence_check(run_dir, device, judge, args.n)
    results = measure(args, pipes, judge)
    out.mkdir(parents=True, exist_ok=True)
    name = pipes[ROUTES[0]].dataset
    record = dict(run_dir=str(run_dir), n=args.n, device=str(device), divergence_check=check, rows=results)
    (out / f"frontier_{name}.json").write_text(json.dumps(record, indent=2))
    plot(results, args.scales, out / f"frontier_{name}.png", f"{name}: FD against network evaluations, n = {args.n}")
    print(f"wrote {out / f'frontier_{name}.json'} and {out / f'frontier_{name}.png'}")


if __name__ == "__main__":
    main()

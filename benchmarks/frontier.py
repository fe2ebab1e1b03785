"""Is step distillation worth it? Quality against network evaluations for every route to few-step sampling.

    python -m benchmarks.frontier --run-dir runs/digits --data-dir ../shared/data    # digits, offline
    python -m benchmarks.frontier --run-dir runs/mnist --data-dir ../shared/data     # MNIST

RUN_DIR holds a training run: teacher.pt, student.pt (the guided student) and the step-distilled
student_{n}steps.pt (`train_mnist.py --stage step-distill --target-sampling-steps 4`). Routes:
  CFG teacher + DDIM, CFG teacher + DPM-Solver++(2M)      two passes per step at s != 1, one at s = 1
  guided student + DDIM, guided student + DPM-Solver++     one pass per step
  step-distilled student                                   one pass per step, its own 'aligned' grid
A rectified-flow run (prediction_type flow_prediction) takes its own samplers instead, first and second
order as above: flow Euler for DDIM and flow Heun (2n - 1 evaluations for n steps) for DPM-Solver++; its
step-distilled students sample on their own Euler grid. At each budget of network evaluations per image
(--budgets) each route takes as many sampling steps as the budget buys (Heun may leave one unspent).
Every row samples the same x_T and labels (n per row and seed); accuracy, FD and
diversity as in `python -m cfg_minimal.evaluate`; evaluations are counted, not assumed. At --seed-budget
the rows are the mean over --seed and --extra-seeds. First (VP runs only) a check of why an unclipped
DPM-Solver++ diverges with CFG on the cosine schedule. Writes frontier_DATASET.json and frontier_DATASET.png into --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import ScalarFormatter

from benchmarks import harness
from cfg_minimal import UserError, load_checkpoint, load_pipeline, pick_device
from cfg_minimal.evaluate import Judge, evals_per_image
from cfg_minimal.predictions import is_flow
from cfg_minimal.sampling import Pipeline
from cfg_minimal.schedulers import DPMSolverMultistepScheduler

ROUTES = ("CFG teacher + DDIM", "CFG teacher + DPM-Solver++", "guided student + DDIM",
          "guided student + DPM-Solver++", "step-distilled student")  # fmt: skip
FLOW_ROUTES = ("CFG teacher + Euler", "CFG teacher + Heun", "guided student + Euler", "guided student + Heun",
               "step-distilled student")  # a flow run's: its own first- and second-order samplers  # fmt: skip
SAMPLERS = {"DDIM": "ddim", "DPM-Solver++": "dpmsolver++", "Euler": "euler", "Heun": "heun"}  # route -> scheduler
TABLE = harness.Table([("model", "route", "{}"), "scale", ("budget", "budget", "{:d}"), "evals_per_image",
                       "sampling_steps", ("seeds", "seeds", "{}"), "accuracy", "fd", "diversity",
                       "ms_per_image"])  # fmt: skip
DIVERGENCE = harness.Table([("model", "variant", "{}"), ("max_abs_pixel", "largest pixel value", "{:.3g}"), "accuracy",
                            "fd"], "why DPM-Solver++ clips x_0: the CFG teacher at s = 3, 20 steps")  # fmt: skip


def divergence_check(run_dir: Path, device: torch.device, judge: Judge, n: int, seed: int) -> list[dict]:
    """The CFG teacher at s = 3, 20 steps: diffusers' DPM-Solver++ as a user drops it in, this project's
    without and with clipping x0, and with lambda_min_clipped = -5.1 (diffusers' advice for cosine)."""
    try:
        import diffusers  # in requirements-dev.txt
    except ImportError:
        diffusers = None
    pipe = load_pipeline(run_dir / "teacher.pt", device=device)
    schedule = load_checkpoint(run_dir / "teacher.pt")["scheduler_config"]
    cfg = {key: schedule[key] for key in ("num_train_timesteps", "beta_schedule", "prediction_type") if key in schedule}
    variants = {
        "diffusers DPMSolverMultistepScheduler, defaults": diffusers and diffusers.DPMSolverMultistepScheduler(**cfg),
        "ours, clip_sample=False": DPMSolverMultistepScheduler(**cfg, clip_sample=False),
        "ours, clip_sample=False, lambda_min_clipped=-5.1": DPMSolverMultistepScheduler(
            **cfg, clip_sample=False, lambda_min_clipped=-5.1),
        "ours, clip_sample=True (the default)": DPMSolverMultistepScheduler(**cfg),
    }  # fmt: skip
    cases = [harness.Case(name, harness.with_scheduler(pipe, scheduler), 3.0, 20, seeds=[seed])
             for name, scheduler in variants.items() if scheduler is not None]  # fmt: skip
    largest = lambda case, images, labels: dict(max_abs_pixel=float(images.abs().max()))  # noqa: E731
    return harness.measure(cases, judge, n, table=DIVERGENCE, extra_metrics=largest)


def is_flow_run(run_dir: Path) -> bool:
    """Whether the run's teacher is a rectified-flow model (its routes are FLOW_ROUTES)."""
    return is_flow(load_checkpoint(run_dir / "teacher.pt")["scheduler_config"].get("prediction_type"))


def routes(run_dir: Path, device: torch.device) -> dict[str, Pipeline | dict[int, Pipeline]]:
    """Each route's pipeline (FLOW_ROUTES for a flow run, else ROUTES); the step-distilled route has one per
    sampling-step count."""
    students = {}
    for path in run_dir.glob("student_*steps.pt"):
        pipe = load_pipeline(path, device=device)
        students[pipe.sampling_steps] = pipe
    names = FLOW_ROUTES if is_flow_run(run_dir) else ROUTES
    pipes: dict[str, Pipeline | dict[int, Pipeline]] = {}
    for name in names[:4]:
        model, sampler = name.split(" + ")
        path = run_dir / ("teacher.pt" if model.startswith("CFG") else "student.pt")
        pipes[name] = load_pipeline(path, device=device, scheduler=SAMPLERS[sampler])
    return {**pipes, names[4]: students}


def cases(args: argparse.Namespace, pipes: dict) -> list[harness.Case]:
    """Every route at every budget and scale, the step count the budget buys (more seeds at --seed-budget)."""
    out = []
    for budget in args.budgets:
        seeds = [*args.seed, *args.extra_seeds] if budget == args.seed_budget else args.seed
        for route, pipe in pipes.items():
            pipe = pipe.get(budget) if isinstance(pipe, dict) else pipe
            if pipe is None:  # no step-distilled student for this budget
                continue
            for s in args.scales:
                steps = budget if route.startswith("step") else steps_bought(pipe, s, budget)
                if steps > 0:  # else the budget does not buy one step
                    out.append(harness.Case(route, pipe, s, steps, columns=dict(budget=budget), seeds=seeds))
    return out


def steps_bought(pipe: Pipeline, scale: float, budget: int) -> int:
    """The most sampling steps whose evaluations per image (evaluate.evals_per_image: two passes for CFG at
    s != 0, 1; 2n - 1 calls for Heun) fit in `budget`; 0 if not even one step does."""
    steps = budget
    while steps > 0 and evals_per_image(pipe, scale, steps) > budget:
        steps -= 1
    return steps


def plot(results: list[dict], scales: list[float], title: str) -> plt.Figure:
    """FD against evaluations per image, a curve per route, a panel per s (each point the mean over its seeds)."""
    fig, axes = plt.subplots(1, len(scales), figsize=(5.5 * len(scales), 4), dpi=120, squeeze=False)
    measured = [r for r in results if "fd" in r]
    for ax, s in zip(axes[0], scales):
        for route in dict.fromkeys(r["model"] for r in results):
            rows = sorted((r for r in measured if r["model"] == route and r["scale"] == s),
                          key=lambda r: r["evals_per_image"])  # fmt: skip
            style = dict(marker="o", linestyle="--" if route.endswith(("DDIM", "Euler")) else "-")
            ax.plot([r["evals_per_image"] for r in rows], [r["fd"] for r in rows], label=route, **style)
        ax.set(xscale="log", yscale="log", xlabel="network evaluations per image", ylabel="FD (lower is better)",
               title=f"s = {s:g}")  # fmt: skip
        budgets = sorted({r["budget"] for r in results})
        ax.minorticks_off()
        ax.set_xticks(budgets, [str(b) for b in budgets])
        fds = [r["fd"] for r in measured if r["scale"] == s] or [1.0]
        ax.set_yticks([v for v in (1.5, 2, 3, 4, 5, 7, 10, 15, 20, 30, 50) if min(fds) <= v <= max(fds)])
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def check_budgets(args: argparse.Namespace) -> None:
    """Each budget buys every route a whole number of steps: a CFG teacher spends two evaluations per step
    at s other than 0 and 1, so there the budgets must be even (an odd one would be measured as one less)."""
    harness.require_positive(args, "budgets")
    guided = [s for s in args.scales if s not in (0.0, 1.0)]
    odd = [b for b in args.budgets if b % 2]
    if guided and odd:
        raise UserError(f"--budgets {odd[0]} is odd: at s = {guided[0]:g} a CFG teacher spends two evaluations per "
                        "step, so it could not spend it; use even budgets")  # fmt: skip
    if args.extra_seeds and args.seed_budget not in args.budgets:
        print(f"note: --seed-budget {args.seed_budget} is not one of --budgets, so --extra-seeds are not used")


def run(args: argparse.Namespace) -> None:
    device, run_dir = pick_device(args.device), Path(args.run_dir)
    check_budgets(args)
    for name in ("teacher.pt", "student.pt"):
        if not (run_dir / name).is_file():
            raise UserError(f"--run-dir {str(run_dir)!r} has no {name}; train it with train_mnist.py "
                            "(--stage step-distill adds the step-distilled students)")  # fmt: skip
    pipes = routes(run_dir, device)
    teacher, student, step_distilled = (pipes[name] for name in list(pipes)[::2])  # routes 0, 2, 4
    dataset, flow = teacher.dataset, is_flow_run(run_dir)
    if student.dataset != dataset or not student.is_student or teacher.is_student:
        raise UserError(f"--run-dir {str(run_dir)!r}: teacher.pt must be a {dataset} teacher and student.pt its "
                        "guided student")  # fmt: skip
    if not step_distilled:
        print(f"note: no student_{{n}}steps.pt in {run_dir}: the step-distilled route is left out")
    out = harness.Outputs.of(args, f"frontier_{dataset}.json", f"frontier_{dataset}.png")
    judge = harness.load_judge(dataset, args.data_dir, device)
    if flow:
        print("note: a rectified-flow run: Euler and Heun routes; no DPM-Solver++ divergence check (VP only)")
    check = [] if flow else divergence_check(run_dir, device, judge, args.n, args.seed[0])
    results = harness.measure(cases(args, pipes), judge, args.n, table=TABLE)
    out.json(
        f"frontier_{dataset}.json",
        harness.record(args, device, run_dir=str(run_dir), n=args.n, divergence_check=check, rows=results),
    )
    out.figure(
        f"frontier_{dataset}.png",
        plot(results, args.scales, f"{dataset}: FD against network evaluations, n = {args.n}"),
    )


def build_parser() -> argparse.ArgumentParser:
    p = harness.parser("frontier", __doc__, n=500)
    p.add_argument("--run-dir", default="runs/mnist",
                   help="teacher.pt, student.pt and student_{n}steps.pt (default: runs/mnist)")  # fmt: skip
    p.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 16, 32],
                   help="network evaluations per image (default: 4 8 16 32)")  # fmt: skip
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0], help="default: 1 3")
    p.add_argument("--seed-budget", type=int, default=8, help="the budget measured on --extra-seeds too (default: 8)")
    p.add_argument("--extra-seeds", type=int, nargs="*", default=[1, 2], help="default: 1 2")
    return p


main = harness.entry(build_parser, run, __name__)

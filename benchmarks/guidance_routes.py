"""Is guidance distillation still worth it? Every route to a one-pass guided sampler, trained from scratch, scored.

    python -m benchmarks.guidance_routes --dataset digits --data-dir ../shared/data       # all 8 routes, seeds 0 1 2
    python -m benchmarks.guidance_routes --dataset digits --data-dir ../shared/data --routes cfg student gft mg \\
        --out docs                                                          # the epsilon routes, for docs/
    python -m benchmarks.guidance_routes --dataset mnist --data-dir ../shared/data --routes flow-cfg flow-student \\
        flow-gft flow-mg --teacher-train-steps 2750 --teacher-batch-size 64 --distill-train-steps 1500 \\
        --sampling-steps 25                                     # MNIST's flow routes (100 min on a 2-core CPU)
    python -m benchmarks.guidance_routes --dataset digits --from-json A/guidance_routes_digits.json \\
        B/guidance_routes_digits.json                                       # one table of runs made apart

Routes (--routes, default all), each trained into OUT/ROUTE with the dataset's recipe (the flags below):
  cfg       CFG teacher (objective diffusion, epsilon)   two passes per sampling step at s != 0, 1
  student   the cfg teacher + a guided student           one pass per step; its training compute includes
            (cfg_minimal.distill, its default train steps)  the teacher's (trained once, shared with cfg)
  gft       guidance-free training (objective gft)       one pass per step; sampled at s = its input
  mg        model guidance (objective mg)                one pass per step at its own setting s = 1
  flow-cfg, flow-student, flow-gft, flow-mg: the same on rectified flow (prediction_type flow_prediction),
            sampled with the model's own flow Euler sampler.
Training compute, counted the same way for every route and summed over its stages: train images (train
steps x batch), network evaluations (forward passes over images, counted by a forward hook on every
network: the trained one, GFT's stop-gradient pass, MG's EMA guide, the distillation teacher) and the wall
time of training in this run. Sampling: n images per (route, s) and noise seed (the row is the mean over
--seed and --extra-seeds), accuracy / FD / diversity as in `python -m cfg_minimal.evaluate`, network
evaluations per image counted. A route's best s is its lowest FD among the rows at accuracy >=
--accuracy-bar (else its lowest FD, marked). Prints one table; writes guidance_routes_DATASET.json and
guidance_routes_DATASET.png (FD at the best s against training evaluations; the accuracy-FD frontier per
route over s). Wall times compare within one run on one machine only.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
from torch import nn

from benchmarks import harness
from cfg_minimal import (
    DistillConfig,
    TeacherConfig,
    UserError,
    distill_student,
    load_checkpoint,
    load_pipeline,
    pick_device,
    train_teacher,
    with_optim,
)
from cfg_minimal.checkpoint import output_lock
from cfg_minimal.data import DATASETS
from cfg_minimal.evaluate import check_classifier_cache
from cfg_minimal.models import ARCHITECTURES, DiffusionModel
from cfg_minimal.predictions import FLOW


@dataclass(frozen=True)
class Route:
    """One way to a guided sampler: its --routes key (and folder), its name, formulation and objective."""

    key: str
    label: str
    flow: bool
    objective: str  # TeacherConfig.objective of its first stage
    distilled: bool = False  # a guided student distilled from the formulation's CFG teacher

    @property
    def teacher_key(self) -> str:
        """The folder of the teacher stage: the formulation's CFG teacher for a student, else its own."""
        return ("flow-cfg" if self.flow else "cfg") if self.distilled else self.key

    @property
    def stages(self) -> list[str]:
        """Checkpoints its training compute sums over, in order: 'KEY/teacher.pt' [, 'KEY/student.pt']."""
        return [f"{self.teacher_key}/teacher.pt", *([f"{self.key}/student.pt"] if self.distilled else [])]


ROUTES = tuple(
    Route(f"{prefix}{key}", f"{name}{label}", flow, objective, key == "student")
    for flow, prefix, name in ((False, "", ""), (True, "flow-", "flow "))
    for key, label, objective in (("cfg", "CFG teacher", "diffusion"), ("student", "teacher + guided student",
                                  "diffusion"), ("gft", "GFT", "gft"), ("mg", "MG", "mg"))
)  # fmt: skip
BY_KEY = {route.key: route for route in ROUTES}
TRAINING = [("train_images", "train images", "{:,.0f}"), ("train_evals", "train evals", "{:,.0f}"),
            ("train_seconds", "train wall s", "{:.0f}")]  # fmt: skip
TABLE = harness.Table([("model", "route", "{}"), "scale", "evals_per_image", "accuracy", "fd", "diversity",
                       ("best", "best s", "{}"), *TRAINING, "ms_per_image"])  # fmt: skip


# --- training, counted ---------------------------------------------------------------------------------------


class TrainingCounter:
    """Counts the images every DiffusionModel is evaluated on while it is open (a global forward hook), whichever
    object the stage builds inside (the trained network, its EMA copy, a teacher): a batch of B counts B."""

    def __init__(self) -> None:
        self.images = 0
        self._handle = nn.modules.module.register_module_forward_hook(self._add)

    def _add(self, module: nn.Module, args: tuple, output: Any) -> None:
        if isinstance(module, DiffusionModel):  # not its submodules: one count per network evaluation
            self.images += output.shape[0]

    def __enter__(self) -> TrainingCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def teacher_config(route: Route, args: argparse.Namespace) -> TeacherConfig:
    """The first stage's config: the dataset's recipe, the route's objective and formulation, the flags."""
    cfg = TeacherConfig(dataset=args.dataset, data_dir=args.data_dir, arch=args.arch, objective=route.objective,
                        prediction_type=FLOW if route.flow else "epsilon")  # fmt: skip
    return with_optim(cfg, max_train_steps=args.teacher_train_steps, batch_size=args.teacher_batch_size,
                      device=args.device)  # fmt: skip


def distill_config(args: argparse.Namespace) -> DistillConfig:
    """The guided student's config: DistillConfig's defaults (its recipe's train steps), the flags."""
    cfg = DistillConfig(data_dir=args.data_dir)
    return with_optim(cfg, max_train_steps=args.distill_train_steps, batch_size=args.distill_batch_size,
                      device=args.device)  # fmt: skip


def train_stage(stage: str, route: Route, args: argparse.Namespace, out: harness.Outputs) -> dict[str, Any]:
    """Train one checkpoint (OUT/KEY/teacher.pt or OUT/KEY/student.pt), counted and timed -> its record."""
    folder, name = out.folder / Path(stage).parent, Path(stage).name
    if_exists = "overwrite" if args.overwrite else "error"  # claimed up front; the stage refuses again
    progress = not args.no_progress
    with TrainingCounter() as counter, harness.Timer(pick_device(args.device)) as timer:
        if name == "teacher.pt":
            train_teacher(teacher_config(route, args), folder, if_exists, progress)
        else:
            distill_student(out.folder / route.stages[0], distill_config(args), folder, if_exists, progress)
    out.written.add(folder / name)
    steps, batch = checkpoint_schedule(folder / name)
    print(f"trained {stage}: {steps} train steps x {batch}, {counter.images:,} network evaluations, "
          f"{timer.seconds:.0f} s", flush=True)  # fmt: skip
    return dict(stage=stage, train_steps=steps, batch_size=batch, train_images=steps * batch,
                train_evals=counter.images, train_seconds=timer.seconds)  # fmt: skip


def checkpoint_schedule(path: Path) -> tuple[int, int]:
    """(train steps, effective batch) a checkpoint was trained with, read back from it."""
    ckpt = load_checkpoint(path)
    return int(ckpt["train_step"]), int(ckpt["effective_batch_size"])


def train_routes(routes: list[Route], args: argparse.Namespace, out: harness.Outputs) -> dict[str, dict]:
    """Every stage the routes need, each once (a student's teacher is its formulation's CFG teacher) -> per
    route its training compute: the sums over its stages, and the stages themselves."""
    stages: dict[str, dict] = {}
    for route in routes:
        for stage in route.stages:
            if stage not in stages:
                stages[stage] = train_stage(stage, BY_KEY[stage.split("/")[0]] if stage.endswith("teacher.pt")
                                            else route, args, out)  # fmt: skip
    return {route.key: dict(**{key: sum(stages[s][key] for s in route.stages) for key, _, _ in TRAINING},
                            stages=[stages[s] for s in route.stages]) for route in routes}  # fmt: skip


# --- sampling and scores ---------------------------------------------------------------------------------------


def route_scales(route: Route, args: argparse.Namespace) -> list[float]:
    """The s a user samples the route at: GFT its input s (--gft-scales), MG its own setting (--mg-scales, 1),
    the CFG teacher and the student --scales."""
    key = route.key.removeprefix("flow-")
    return args.gft_scales if key == "gft" else args.mg_scales if key == "mg" else args.scales


def score_routes(routes: list[Route], training: dict, args: argparse.Namespace, out: harness.Outputs) -> list[dict]:
    """Each route's final checkpoint (its model's own sampler) at each of its s -> harness.measure's rows."""
    device = pick_device(args.device)
    judge = harness.load_judge(args.dataset, args.data_dir, device)
    cases = []
    for route in routes:
        pipe = load_pipeline(out.folder / route.stages[-1], device=device)
        columns = dict(route=route.key, **{key: training[route.key][key] for key, _, _ in TRAINING})
        cases += [harness.Case(route.label, pipe, s, args.sampling_steps, columns=columns)
                  for s in route_scales(route, args)]  # fmt: skip
    seeds = [*args.seed, *args.extra_seeds]
    progress = lambda row: print(f"  {row['model']} s = {row['scale']:g}: accuracy {row.get('accuracy', math.nan):.3f}"
                                 f", FD {row.get('fd', math.nan):.2f}", flush=True)  # noqa: E731  # fmt: skip
    return harness.measure(cases, judge, args.n, seeds, on_row=progress)


def mark_best(rows: list[dict], bar: float) -> list[dict]:
    """Each route's best row: the lowest FD at accuracy >= bar, else the lowest FD ('*' and '(below bar)' in
    `best`). Returns those rows, one per route in order."""
    best = []
    for route in dict.fromkeys(r["route"] for r in rows):
        measured = [r for r in rows if r["route"] == route and "fd" in r]
        if not measured:
            continue
        passing = [r for r in measured if r["accuracy"] >= bar]
        pick = min(passing or measured, key=lambda r: r["fd"])
        pick["best"] = "*" if passing else "* (below bar)"
        best.append(pick)
    return best


# --- the figure ------------------------------------------------------------------------------------------------


def plot(rows: list[dict], best: list[dict], title: str, bar: float) -> plt.Figure:
    """Left: FD at each route's best s against its training evaluations. Right: accuracy against FD over s."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), dpi=120)
    colours = {key: f"C{i}" for i, key in enumerate(k.removeprefix("flow-") for k in BY_KEY if "flow" not in k)}
    for r in best:
        key, flow = r["route"].removeprefix("flow-"), r["route"].startswith("flow-")
        left.scatter(
            r["train_evals"],
            r["fd"],
            s=60,
            marker="s" if flow else "o",
            edgecolors=colours[key],
            facecolors="none" if flow else colours[key],
            label=f"{r['model']} (s = {r['scale']:g})",
        )
        left.annotate(f"acc {r['accuracy']:.3f}", (r["train_evals"], r["fd"]), textcoords="offset points",
                      xytext=(6, 4), fontsize=7)  # fmt: skip
    left.set(
        xscale="log",
        xlabel="training compute: network evaluations (forward passes over images)",
        ylabel="FD at the best s (lower is better)",
        title=f"best s: lowest FD at accuracy >= {bar:g}",
    )
    for route in dict.fromkeys(r["route"] for r in rows):
        measured = sorted((r for r in rows if r["route"] == route and "fd" in r), key=lambda r: r["scale"])
        if not measured:
            continue
        key, flow = route.removeprefix("flow-"), route.startswith("flow-")
        right.plot([r["fd"] for r in measured], [r["accuracy"] for r in measured], marker="s" if flow else "o",
                   linestyle="--" if flow else "-", color=colours[key], label=measured[0]["model"])  # fmt: skip
        for r in measured:
            right.annotate(f"{r['scale']:g}", (r["fd"], r["accuracy"]), textcoords="offset points", xytext=(4, -9),
                           fontsize=7)  # fmt: skip
    right.set(xlabel="FD (lower is better)", ylabel="accuracy", title="accuracy-FD frontier per route (labels: s)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --- the run ---------------------------------------------------------------------------------------------------


def check_args(args: argparse.Namespace) -> list[Route]:
    """Every flag in range before anything trains -> the chosen routes, in ROUTES' order."""
    flags = ("teacher_train_steps", "distill_train_steps", "teacher_batch_size", "distill_batch_size")
    harness.require_positive(args, *(name for name in flags if getattr(args, name) is not None))
    scales = [*args.gft_scales, *args.mg_scales]
    if not all(math.isfinite(s) and s >= 0 for s in [*scales, *args.scales]):
        raise UserError(f"--scales, --gft-scales and --mg-scales must be finite numbers >= 0, got "
                        f"{[*args.scales, *scales]}")  # fmt: skip
    if not 0 <= args.accuracy_bar <= 1:
        raise UserError(f"--accuracy-bar must be in [0, 1], got {args.accuracy_bar}")
    seeds = [*args.seed, *args.extra_seeds]
    if len(set(seeds)) < len(seeds):
        raise UserError(f"each noise seed once (--seed and --extra-seeds together), got {seeds}")
    classes = DATASETS[args.dataset].num_classes
    if args.n < 2 * classes:  # diversity needs two samples of every class
        raise UserError(f"--n must be at least two samples per class ({2 * classes}), got {args.n}")
    return [route for route in ROUTES if route.key in (args.routes or BY_KEY)]


def run(args: argparse.Namespace) -> None:
    routes = check_args(args)
    device = pick_device(args.device)
    names = [f"guidance_routes_{args.dataset}.json", f"guidance_routes_{args.dataset}.png"]
    if args.from_json:  # one table and figure from earlier runs: nothing trained or sampled
        out = harness.Outputs.of(args, *names)
        training, rows = earlier_results(args.from_json, args.dataset)
        return report(rows, training, args, out, names)
    stages = list(dict.fromkeys(stage for route in routes for stage in route.stages))
    out = harness.Outputs.of(args, *names, *stages)  # refused before any training
    check_classifier_cache(args.dataset)
    with output_lock(out.folder):  # a second run into the same folder is refused, not interleaved
        training = train_routes(routes, args, out)
        rows = score_routes(routes, training, args, out)
        print(f"\n{args.dataset} on {harness.device_name(device)}, n = {args.n} per row and seed, seeds "
              f"{[*args.seed, *args.extra_seeds]}, {args.sampling_steps} sampling steps (DDIM for epsilon, flow Euler "
              "for flow)")  # fmt: skip
        report(rows, training, args, out, names)


def report(rows: list[dict], training: dict, args: argparse.Namespace, out: harness.Outputs, names: list[str]) -> None:
    """Mark each route's best s, print the one table, write the JSON and the figure."""
    best = mark_best(rows, args.accuracy_bar)
    TABLE.print(rows)
    flags = {key: value for key, value in vars(args).items() if key != "command"}
    out.json(names[0], harness.record(args, pick_device(args.device), args=flags, threads=torch.get_num_threads(),
                                      training=training, best=best, rows=rows))  # fmt: skip
    seeds = sorted({seed for r in rows for seed in r["seeds"]})
    title = f"{args.dataset}: guidance routes, n = {rows[0]['n']} per point x {len(seeds)} noise seeds"
    out.figure(names[1], plot(rows, best, title, args.accuracy_bar))


def earlier_results(paths: list[str], dataset: str) -> tuple[dict, list[dict]]:
    """The training records and rows of earlier runs of this benchmark (their JSON files, in order; a route
    in two files is a UserError), for `report`."""
    training: dict = {}
    rows: list[dict] = []
    for path in paths:
        try:
            record = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"--from-json {path!r} cannot be read as this benchmark's JSON ({err})") from None
        if f"guidance_routes_{dataset}" not in Path(path).name or "training" not in record:
            raise UserError(f"--from-json {path!r} is not a guidance_routes_{dataset}.json of this benchmark")
        if set(training) & set(record["training"]):
            raise UserError(f"--from-json: route(s) {sorted(set(training) & set(record['training']))} in two files")
        training.update(record["training"])
        rows += [{key: value for key, value in r.items() if key != "best"} for r in record["rows"]]
    return training, rows


def build_parser() -> argparse.ArgumentParser:
    p = harness.parser("guidance_routes", __doc__, n=500)
    p.add_argument("--dataset", default="digits", choices=list(DATASETS), help="default: digits")
    p.add_argument("--routes", nargs="+", choices=list(BY_KEY), default=None, help="default: all")
    p.add_argument("--arch", default=None, choices=list(ARCHITECTURES), help="default: the dataset's")
    p.add_argument("--teacher-train-steps", type=int, default=None,
                   help="train steps of the teacher, GFT and MG (default: the dataset's recipe)")  # fmt: skip
    p.add_argument("--teacher-batch-size", type=int, default=TeacherConfig().optim.batch_size,
                   help=f"default: {TeacherConfig().optim.batch_size}")  # fmt: skip
    p.add_argument("--distill-train-steps", type=int, default=None,
                   help="train steps of the guided student (default: the dataset's recipe)")  # fmt: skip
    p.add_argument("--distill-batch-size", type=int, default=DistillConfig().optim.batch_size,
                   help=f"default: {DistillConfig().optim.batch_size}")  # fmt: skip
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0],
                   help="s of the CFG teacher and the student (default: 0 1 2 3)")  # fmt: skip
    p.add_argument("--gft-scales", type=float, nargs="+", default=[1.0, 2.0, 3.0], help="GFT's s (default: 1 2 3)")
    p.add_argument("--mg-scales", type=float, nargs="+", default=[1.0],
                   help="MG's s (default: 1, its own setting; above 1 CFG stacks on it, two passes)")  # fmt: skip
    p.add_argument("--sampling-steps", type=int, default=50, help="DDIM / flow Euler steps (default: 50)")
    p.add_argument("--extra-seeds", type=int, nargs="*", default=[1, 2],
                   help="more noise seeds for every row (default: 1 2)")  # fmt: skip
    p.add_argument("--accuracy-bar", type=float, default=0.99,
                   help="a route's best s: the lowest FD at accuracy >= this (default: 0.99)")  # fmt: skip
    p.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                   help="no training: one table and figure from earlier runs' guidance_routes_DATASET.json "
                   "(routes run apart, e.g. in parallel)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    return p


main = harness.entry(build_parser, run, __name__)

"""Guidance rules against each other: accuracy against FD for a sweep of each rule's strength.

    python -m benchmarks.guiders --dataset digits --ckpt runs/digits/teacher.pt
    python -m benchmarks.guiders --ckpt runs/mnist/teacher.pt --data-dir ../shared/data \\
        --guide-ckpt runs/mnist_early/teacher.pt --student runs/mnist_apg/student.pt

Methods (cfg_minimal/guidance.py and guiders.py; --methods picks some, --spec NAME=SPEC changes a
rule's settings (a guider_from_spec text), --grid NAME=v1,v2,... its strengths):
  cfg, cfg-linear, cfg-cosine   plain CFG, with a constant or an increasing guidance-weight schedule
  apg, cfg-zero-star, tcfg      other combinations of the same two passes
  cfg++                         the ddim-cfg++ sampler (DDIM re-noised with eps_u); its strength is
                                lambda, on its own scale
  autoguidance                  the guiding pass from --guide-ckpt (a weaker teacher), skipped without it
  student                       each --student checkpoint (a distilled student, its own guider), one pass
Every row samples the same x_T and labels (n per row and seed, the mean over --seed); accuracy, FD and
diversity as in `python -m cfg_minimal.evaluate`; network evaluations per image are counted (both
networks for autoguidance). Writes guiders_DATASET.json and guiders_DATASET.png (accuracy against FD,
a curve per method) into --out, and prints each method's best FD at accuracy >= --min-accuracy.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import ScalarFormatter

from benchmarks import harness
from cfg_minimal import UserError, load_checkpoint, load_pipeline, pick_device
from cfg_minimal.data import DATASETS
from cfg_minimal.guidance import guider_from_spec


@dataclass(frozen=True)
class Method:
    spec: str  # a guider_from_spec text
    strengths: tuple[float, ...]
    schedule: str = "constant"  # the guidance-weight schedule over t
    sampler: str = "ddim"  # load_pipeline's scheduler


METHODS: dict[str, Method] = {
    "cfg": Method("cfg", (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)),
    "cfg-linear": Method("cfg", (1.5, 2.0, 3.0, 4.0, 6.0), schedule="linear"),
    "cfg-cosine": Method("cfg", (1.5, 2.0, 3.0, 4.0, 6.0), schedule="cosine"),
    "apg": Method("apg:eta=0,momentum=-0.5", (1.5, 2.0, 3.0, 4.0, 6.0, 10.0)),
    "cfg-zero-star": Method("cfg-zero-star:zero_init_steps=1", (1.5, 2.0, 3.0, 4.0, 6.0)),
    "tcfg": Method("tcfg", (1.5, 2.0, 3.0, 4.0, 6.0)),
    "cfg++": Method("cfg", (0.2, 0.4, 0.6, 0.8, 1.0, 1.5), sampler="ddim-cfg++"),
    "autoguidance": Method("autoguidance", (1.5, 2.0, 3.0, 4.0, 6.0)),
    "student": Method("cfg", (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)),
}
TABLE = harness.Table([("model", "method", "{}"), ("settings", "settings", "{}"), ("scale", "strength", "{:g}"),
                       "accuracy", "fd", "diversity", "evals_per_image", "ms_per_image"])  # fmt: skip


def assignments(items: list[str], flag: str, methods: list[str]) -> dict[str, str]:
    """['apg=apg:eta=0', ...] -> {'apg': 'apg:eta=0'}, for methods of METHODS that this run measures, once each."""
    pairs = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or name not in METHODS:
            raise UserError(f"{flag} takes NAME=VALUE with NAME one of {', '.join(METHODS)}; got {item!r}")
        if name not in methods:
            raise UserError(f"{flag} {item!r}: {name} is not measured in this run; add it to --methods")
        if name in pairs:
            raise UserError(f"{flag} sets {name} twice ({pairs[name]!r} and {value!r}); give it once")
        pairs[name] = value
    return pairs


def strengths(args: argparse.Namespace) -> dict[str, tuple[float, ...]]:
    grids = {name: method.strengths for name, method in METHODS.items()}
    for name, values in assignments(args.grid, "--grid", args.methods).items():
        try:
            grids[name] = tuple(float(v) for v in values.split(","))
        except ValueError:
            raise UserError(f"--grid {name}= takes numbers separated by commas, got {values!r}") from None
        if not all(math.isfinite(v) for v in grids[name]):
            raise UserError(f"--grid {name}= takes finite numbers, got {values!r}")
    return grids


def cases(args: argparse.Namespace, device: torch.device) -> list[harness.Case]:
    """A case per method asked for and strength, all on the teacher of --ckpt (students: their own)."""
    specs = {name: method.spec for name, method in METHODS.items()} | assignments(args.spec, "--spec", args.methods)
    grids = strengths(args)
    teachers = {}  # one pipeline per sampler
    out = []
    for name in args.methods:
        if name == "student":
            for path in args.student:
                student = load_pipeline(path, device=device)
                distilled = load_checkpoint(path, kind="student").get("distill_config", {})
                if student.dataset != args.dataset:
                    raise UserError(
                        f"--student {path!r} is a {student.dataset} student, but --dataset is {args.dataset}"
                    )
                target = f"distilled {distilled.get('guider', 'cfg')}, {distilled.get('schedule', 'constant')} schedule"
                method = f"student {Path(path).parent.name}/{Path(path).stem}"  # a curve per student
                out += harness.grid({method: student}, grids[name], steps=args.sampling_steps,
                                    columns=dict(settings=target))  # fmt: skip
            continue
        method = METHODS[name]
        guide = None
        if name == "autoguidance":
            if args.guide_ckpt is None:
                print("autoguidance skipped: pass --guide-ckpt, a weaker teacher of the same dataset")
                continue
            guide_pipe = load_pipeline(args.guide_ckpt, device=device)
            if guide_pipe.dataset != args.dataset or guide_pipe.is_student:
                raise UserError(f"--guide-ckpt must be a {args.dataset} teacher, like --ckpt")
            guide = guide_pipe.model
        if method.sampler not in teachers:
            teachers[method.sampler] = load_pipeline(args.ckpt, device=device, scheduler=method.sampler)
        options = dict(guider=guider_from_spec(specs[name], guide_model=guide), guidance_schedule=method.schedule)
        label = specs[name] + ("" if method.schedule == "constant" else f", {method.schedule} schedule")
        label += "" if method.sampler == "ddim" else f", {method.sampler} sampler"
        out += [harness.Case(name, teachers[method.sampler], s, args.sampling_steps, options,
                             dict(settings=label), networks=[guide] if guide is not None else [])
                for s in grids[name]]  # fmt: skip
    return out


def best_fd(results: list[dict], min_accuracy: float) -> list[dict]:
    """Per method, the row with the lowest FD among those with accuracy >= min_accuracy (None if no row has)."""
    table = []
    for method in dict.fromkeys(r["model"] for r in results):
        ok = [r for r in results if r["model"] == method and r.get("accuracy", 0) >= min_accuracy]
        table.append(dict(method=method, best=min(ok, key=lambda r: r["fd"]) if ok else None))
    best = [dict(method=e["method"], **(e["best"] or {})) for e in table]
    harness.Table([("method", "method", "{}"), ("scale", "strength", "{:g}"), "fd", "accuracy", "diversity"],
                  f"best FD at accuracy >= {min_accuracy:g}:").print(best)  # fmt: skip
    return table


def plot(results: list[dict], min_accuracy: float, title: str) -> plt.Figure:
    """Accuracy against FD, a curve per method along its strengths (labelled at the ends); the dotted
    line is the accuracy the best-FD table asks for."""
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    for method in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == method and "fd" in r]
        if not rows:
            continue
        (line,) = ax.plot([r["accuracy"] for r in rows], [r["fd"] for r in rows], marker="o", label=method)
        for r in (rows[0], rows[-1]):
            ax.annotate(f"{r['scale']:g}", (r["accuracy"], r["fd"]), fontsize=7, color=line.get_color(),
                        xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.axvline(min_accuracy, color="gray", linestyle=":", linewidth=1)
    ax.set(xlabel="classifier accuracy", ylabel="FD (lower is better)", yscale="log", title=title)
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def run(args: argparse.Namespace) -> None:
    if args.student and "student" not in args.methods:
        args.methods.append("student")
    if args.guide_ckpt and "autoguidance" not in args.methods:
        raise UserError("--guide-ckpt is autoguidance's weaker model; add autoguidance to --methods")
    if "student" in args.methods and not args.student:
        raise UserError("--methods student measures the --student checkpoints; pass at least one --student")
    args.ckpt = args.ckpt or f"runs/{args.dataset}/teacher.pt"
    if not 0 <= args.min_accuracy <= 1:
        raise UserError(f"--min-accuracy is a share in [0, 1], got {args.min_accuracy}")
    device = pick_device(args.device)
    teacher = load_pipeline(args.ckpt, device=device)
    load_checkpoint(args.ckpt, kind="teacher")
    if teacher.dataset != args.dataset:
        raise UserError(f"--ckpt is a {teacher.dataset} teacher, but --dataset is {args.dataset}")
    out = harness.Outputs.of(args, f"guiders_{args.dataset}.json", f"guiders_{args.dataset}.png")
    todo = cases(args, device)
    if not todo:
        raise UserError("nothing to measure: autoguidance needs --guide-ckpt; add other --methods")
    judge = harness.load_judge(args.dataset, args.data_dir, device)
    results = harness.measure(todo, judge, args.n, args.seed, table=TABLE)
    table = best_fd(results, args.min_accuracy)
    out.json(f"guiders_{args.dataset}.json", harness.record(
        args, device, ckpt=args.ckpt, guide_ckpt=args.guide_ckpt, students=args.student, n=args.n,
        sampling_steps=args.sampling_steps, min_accuracy=args.min_accuracy, best_fd=table, rows=results))  # fmt: skip
    title = f"{args.dataset}: guidance rules, {args.sampling_steps} DDIM steps, n = {args.n}"
    out.figure(f"guiders_{args.dataset}.png", plot(results, args.min_accuracy, title))


def build_parser() -> argparse.ArgumentParser:
    p = harness.parser("guiders", __doc__, n=1000)
    p.add_argument("--dataset", default="mnist", choices=list(DATASETS), help="default: mnist")
    p.add_argument("--ckpt", help="the CFG teacher (default: runs/DATASET/teacher.pt)")
    p.add_argument("--guide-ckpt", help="autoguidance's weaker teacher (an earlier checkpoint of the same run)")
    p.add_argument("--student", action="append", default=[], help="a distilled student (repeat for several)")
    p.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "student"], choices=list(METHODS),
                   help="default: all but student")  # fmt: skip
    p.add_argument("--spec", action="append", default=[], metavar="NAME=SPEC",
                   help="a method's guider settings, e.g. apg=apg:eta=0,norm_threshold=2")  # fmt: skip
    p.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2,...", help="a method's strengths")
    p.add_argument("--sampling-steps", type=int, default=50, help="DDIM steps (default: 50)")
    p.add_argument("--min-accuracy", type=float, default=0.99, help="default: 0.99")
    return p


main = harness.entry(build_parser, run, __name__)

"""Guidance rules against each other: accuracy against FD for a sweep of each rule's strength.

    python -m benchmarks.guiders --dataset digits --ckpt runs/digits/teacher.pt
    python -m benchmarks.guiders --ckpt runs/mnist/teacher.pt --data-dir ../shared/data \
        --guide-ckpt runs/mnist_early/teacher.pt --student runs/mnist_apg/student.pt

Methods (cfg_minimal/guiders.py; --methods picks some, --spec NAME=SPEC changes a rule's settings,
--grid NAME=v1,v2,... its strengths):
  cfg, cfg-linear, cfg-cosine   plain CFG, with a constant or an increasing guidance-weight schedule
  apg, cfg-zero-star, tcfg      other combinations of the same two passes
  cfg++                         DDIM re-noised with eps_u; its strength is lambda, on its own scale
  autoguidance                  the guiding pass from --guide-ckpt (a weaker teacher), skipped without it
  student                       each --student checkpoint (a distilled student, its own guider), one pass
Every row samples the same x_T and labels (n per row, seed --seed); accuracy, FD and diversity as in
`python -m cfg_minimal.evaluate`; network evaluations per image are counted (both networks for
autoguidance). Writes guiders_{dataset}.json and guiders_{dataset}.png (accuracy against FD, a curve
per method) into --out, and prints each method's best FD at accuracy >= --min-accuracy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import ScalarFormatter

from cfg_minimal import UserError, load_checkpoint, load_pipeline, pick_device
from cfg_minimal.data import DATASETS
from cfg_minimal.evaluate import Judge, generate
from cfg_minimal.guiders import guider_from_spec
from cfg_minimal.sampling import Pipeline

# name: (guider spec, guidance schedule, strengths)
METHODS: dict[str, tuple[str, str, list[float]]] = {
    "cfg": ("cfg", "constant", [1.0, 1.5, 2.0, 3.0, 4.0, 6.0]),
    "cfg-linear": ("cfg", "linear", [1.5, 2.0, 3.0, 4.0, 6.0]),
    "cfg-cosine": ("cfg", "cosine", [1.5, 2.0, 3.0, 4.0, 6.0]),
    "apg": ("apg:eta=0,momentum=-0.5", "constant", [1.5, 2.0, 3.0, 4.0, 6.0, 10.0]),
    "cfg-zero-star": ("cfg-zero-star:zero_init_steps=1", "constant", [1.5, 2.0, 3.0, 4.0, 6.0]),
    "tcfg": ("tcfg", "constant", [1.5, 2.0, 3.0, 4.0, 6.0]),
    "cfg++": ("cfg++", "constant", [0.2, 0.4, 0.6, 0.8, 1.0, 1.5]),
    "autoguidance": ("autoguidance", "constant", [1.5, 2.0, 3.0, 4.0, 6.0]),
    "student": ("cfg", "constant", [1.0, 1.5, 2.0, 3.0, 4.0, 6.0]),
}


class EvalCounter:
    """Counts the images the given networks are evaluated on, with forward hooks."""

    def __init__(self, *models: torch.nn.Module):
        self.images = 0
        for model in models:
            model.register_forward_hook(lambda module, args, output: self.add(len(args[0])))

    def add(self, n: int) -> None:
        self.images += n


def method_rows(args: argparse.Namespace, teacher: Pipeline, device: torch.device) -> list[tuple]:
    """(method, label, pipeline, Pipeline keyword arguments, strengths, counter) for every method asked for."""
    specs = {name: spec for name, (spec, _, _) in METHODS.items()} | dict(kv.split("=", 1) for kv in args.spec)
    grids = {name: grid for name, (_, _, grid) in METHODS.items()}
    grids |= {name: [float(v) for v in values.split(",")] for name, values in (kv.split("=", 1) for kv in args.grid)}
    teacher_counter = EvalCounter(teacher.model)
    rows = []
    for name in args.methods:
        if name == "student":
            for path in args.student:
                student = load_pipeline(path, device=device)
                distilled = load_checkpoint(path)["distill_config"]
                target = distilled.get("guider", "cfg") + ", " + distilled.get("schedule", "constant") + " schedule"
                method = f"student {Path(path).parent.name}/{Path(path).stem}"  # a curve per student
                rows.append((method, f"distilled {target}", student, {}, grids[name], EvalCounter(student.model)))
            continue
        guide_model = None
        if name == "autoguidance":
            if args.guide_ckpt is None:
                print("autoguidance skipped: pass --guide-ckpt, a weaker teacher of the same dataset")
                continue
            guide_model = load_pipeline(args.guide_ckpt, device=device).model
        schedule = METHODS[name][1]
        kwargs = dict(guider=guider_from_spec(specs[name], guide_model), guidance_schedule=schedule)
        counter = EvalCounter(teacher.model, guide_model) if guide_model is not None else teacher_counter
        label = specs[name] + ("" if schedule == "constant" else f", {schedule} schedule")
        rows.append((name, label, teacher, kwargs, grids[name], counter))
    return rows


def measure(args: argparse.Namespace, rows: list[tuple], judge: Judge) -> list[dict]:
    """Every method at every strength, from the same x_T: the table's rows."""
    results = []
    print("| method | settings | strength | accuracy | FD | diversity | evaluations / image |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for method, settings, pipe, kwargs, grid, counter in rows:
        for strength in grid:
            before = counter.images
            try:
                images, labels, seconds = generate(pipe, args.n, strength, args.sampling_steps, args.seed, **kwargs)
            except UserError as err:  # a NaN result is refused by the pipeline
                results.append(dict(method=method, settings=settings, strength=strength, failed=str(err)))
                print(f"| {method} | {settings} | {strength:g} | failed: {err} |||")
                continue
            row = dict(method=method, settings=settings, strength=strength, **judge(images, labels),
                       evals=(counter.images - before) / args.n, ms_per_image=1000 * seconds / args.n)  # fmt: skip
            results.append(row)
            print(f"| {method} | {settings} | {strength:g} | {row['accuracy']:.3f} | {row['fd']:.2f} | "
                  f"{row['diversity']:.2f} | {row['evals']:.0f} |", flush=True)  # fmt: skip
    return results


def best_fd(results: list[dict], min_accuracy: float) -> list[dict]:
    """Per method, the row with the lowest FD among those with accuracy >= min_accuracy (None if no row has)."""
    table = []
    for method in dict.fromkeys(r["method"] for r in results):
        ok = [r for r in results if r["method"] == method and r.get("accuracy", 0) >= min_accuracy]
        best = min(ok, key=lambda r: r["fd"]) if ok else None
        table.append(dict(method=method, best=best))
    print(f"\nbest FD at accuracy >= {min_accuracy:g}:")
    print("| method | strength | FD | accuracy | diversity |\n|---|---:|---:|---:|---:|")
    for entry in table:
        b = entry["best"]
        cells = f"{b['strength']:g} | {b['fd']:.2f} | {b['accuracy']:.3f} | {b['diversity']:.2f}" if b else "none | | |"
        print(f"| {entry['method']} | {cells} |")
    return table


def plot(results: list[dict], min_accuracy: float, path: Path, title: str) -> None:
    """Accuracy against FD, a curve per method along its strengths (labelled at the ends); the dotted
    line is the accuracy the best-FD table asks for."""
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    for method in dict.fromkeys(r["method"] for r in results):
        rows = [r for r in results if r["method"] == method and "fd" in r]
        if not rows:
            continue
        (line,) = ax.plot([r["accuracy"] for r in rows], [r["fd"] for r in rows], marker="o", label=method)
        for r in (rows[0], rows[-1]):
            ax.annotate(f"{r['strength']:g}", (r["accuracy"], r["fd"]), fontsize=7, color=line.get_color(),
                        xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.axvline(min_accuracy, color="gray", linestyle=":", linewidth=1)
    ax.set(xlabel="classifier accuracy", ylabel="FD (lower is better)", yscale="log", title=title)
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=list(DATASETS))
    p.add_argument("--ckpt", help="the CFG teacher (default: runs/DATASET/teacher.pt)")
    p.add_argument("--guide-ckpt", help="autoguidance's weaker teacher (an earlier checkpoint of the same run)")
    p.add_argument("--student", action="append", default=[], help="a distilled student (repeat for several)")
    p.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "student"], choices=list(METHODS))
    p.add_argument("--spec", action="append", default=[], metavar="NAME=SPEC",
                   help="a method's guider settings, e.g. apg=apg:eta=0,norm_threshold=2")  # fmt: skip
    p.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2,...", help="a method's strengths")
    p.add_argument("--n", type=int, default=1000, help="samples per row")
    p.add_argument("--sampling-steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--min-accuracy", type=float, default=0.99)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="docs")
    args = p.parse_args()
    if args.student and "student" not in args.methods:
        args.methods.append("student")
    device = pick_device(args.device)
    teacher = load_pipeline(args.ckpt or f"runs/{args.dataset}/teacher.pt", device=device)
    if teacher.dataset != args.dataset:
        p.error(f"--ckpt is a {teacher.dataset} teacher, but --dataset is {args.dataset}")
    judge = Judge.load(args.dataset, args.data_dir, device)
    results = measure(args, method_rows(args, teacher, device), judge)
    table = best_fd(results, args.min_accuracy)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = dict(ckpt=args.ckpt, guide_ckpt=args.guide_ckpt, students=args.student, n=args.n, seed=args.seed,
                  sampling_steps=args.sampling_steps, device=str(device), min_accuracy=args.min_accuracy,
                  best_fd=table, rows=results)  # fmt: skip
    (out / f"guiders_{args.dataset}.json").write_text(json.dumps(record, indent=2))
    title = f"{args.dataset}: guidance rules, {args.sampling_steps} DDIM steps, n = {args.n}"
    plot(results, args.min_accuracy, out / f"guiders_{args.dataset}.png", title)
    print(f"wrote {out / f'guiders_{args.dataset}.json'} and {out / f'guiders_{args.dataset}.png'}")


if __name__ == "__main__":
    main()

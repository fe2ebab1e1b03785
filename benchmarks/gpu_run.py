"""Issue 28 on one GPU, in one device call of at most ten minutes: throughput of the speed switches, the
proposed MNIST recipes (UNet teacher + guided student + step-distilled students; DiT teacher + guided
student) trained, evaluated and exported, and one table. Every stage runs under a time limit taken from
--budget, and the summary is written after each stage, so a stage that overruns costs only itself.

The recipes are recipes.PROPOSED_GPU_RECIPES: NOT YET MEASURED estimates. The shipped pretrained/ weights and
recipes.GPU_RECIPES are not touched; the GPU session that runs this compares, then promotes what meets the bars.

Before the device call, here (once; runs/ is ignored by git, so the data travels only as `carry`):

    python -m benchmarks.gpu_run --prepare-carry ../shared/data/MNIST/raw   # -> runs/gpu_carry/ (~12 MB)

The device call (the `run` tool; one call, about 9.5 minutes of the 10):

    command:   PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_run --carry runs/gpu_carry --out "$OUT" --budget 540
    carry:     ["runs/gpu_carry"]
    timeout_s: 600

Stages and their expected time on an H100/H200 (launch-bound model; numbers from issue 17's H100 run):
  setup       unpack MNIST's .gz into data/MNIST/raw (loaded once to check), the CPU's evaluation
              classifier as the classifier cache                                            ~10 s
  throughput  train_throughput at batch 1,024, one process per variant: UNet bf16, bf16+fused, DiT
              (dit-wide) bf16+fused (<= 30 s each), then UNet bf16+reduce_overhead+fused (a cold
              compile, ~50-80 s) with what is left of --throughput-seconds                 <= 150 s
  unet        end_to_end, the proposed UNet recipe with the variant that trains the teacher fastest
              (compile counted): ~100-260 s training (4,500 + 800 + 4 x 100 train steps at 1,024),
              ~70 s evaluation (n = 1,000 x 3 noise seeds x s = 0 1 2 3 5, four models), export; its
              train steps are scaled down if they would not fit before --dit-reserve (150 s)
  dit         end_to_end, the proposed DiT recipe (teacher + student, no rounds, fused AdamW, not
              compiled unless --dit-compile), train steps scaled to the time left, skipped below a
              quarter of the recipe; if skipped, a second short call: --stages dit           the rest
  summary     printed at the end, and OUT/summary.md, OUT/summary.json after every stage

Files back in OUT (the tool returns at most 8): summary.md, summary.json, gpu_run.log (every stage's output),
mnist-unet-pretrained.tar.gz (mnist-teacher, -student, -student-8steps, -student-4steps), mnist-dit-teacher.tar.gz,
mnist-dit-student.tar.gz. Unpack a tarball into pretrained/ to ship it (each config.json holds its command).

    python -m benchmarks.gpu_run --tiny --out runs/gpu_run_tiny   # the same stages on a CPU in about a minute
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from benchmarks import harness
from cfg_minimal.recipes import PROPOSED_GPU_RECIPES, recipe_flags

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CLASSIFIER = "classifier_mnist.pt"  # the evaluation classifier, as the CPU trained and cached it (evaluate.py)
EVALUATION = ["--scales", "0", "1", "2", "3", "5", "--seed", "0", "1", "2", "--n", "1000"]
UNET_VARIANTS = ["bf16", "bf16+fused", "bf16+reduce_overhead+fused"]
DIT_VARIANTS = ["bf16+fused"]
EVAL_SECONDS = {"unet": 80.0, "dit": 70.0}  # evaluation, speed and export after training (estimates, H100)
MIN_DIT_SHARE = 0.25  # the DiT is skipped when less than this share of its recipe fits in the time left
# The CPU test setting: the same stages, tiny networks on digits, seconds each.
TINY_RECIPES = {
    "unet": dict(arch="unet-tiny", teacher_train_steps=12, distill_train_steps=6, round_train_steps=2,
                 teacher_batch_size=16, distill_batch_size=8, round_batch_size=8, start_sampling_steps=8,
                 target_sampling_steps=4, sampling_steps=8),
    "dit": dict(arch="dit-tiny", teacher_train_steps=12, distill_train_steps=6, teacher_batch_size=16,
                distill_batch_size=8, no_step_rounds=True, sampling_steps=8),
}  # fmt: skip
TINY_EVALUATION = ["--scales", "0", "3", "--seed", "0", "--n", "20", "--speed-batch", "20"]


class Budget:
    """Seconds left of --budget, counted from the start of the run."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


class Summary:
    """What every stage found, written to OUT/summary.json (and the tables to summary.md) after each stage."""

    def __init__(self, out: Path, args: argparse.Namespace):
        self.out, self.data = out, {"command": " ".join(sys.argv), "tiny": args.tiny, "stages": {}}

    def stage(self, name: str, **fields: Any) -> None:
        self.data["stages"][name] = {**self.data["stages"].get(name, {}), **fields}
        (self.out / "summary.json").write_text(json.dumps(self.data, indent=2) + "\n")
        text = tables(self.data)
        (self.out / "summary.md").write_text(text)


def run_stage(name: str, argv: list[str], seconds: float, log: Path) -> dict[str, Any]:
    """Run `python -m benchmarks.NAME argv` in its own process group, output appended to `log`, killed (with
    every process it started: compile workers too) after `seconds` -> {rc, seconds, timed_out}."""
    start = time.monotonic()
    with log.open("a") as f:
        f.write(f"\n=== {name}: {' '.join(argv)} (limit {seconds:.0f} s)\n")
        f.flush()
        proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        try:
            rc, timed_out = proc.wait(timeout=max(1.0, seconds)), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, timed_out = proc.wait(), True
        f.write(f"=== {name}: exit {rc}{' (time limit)' if timed_out else ''} after {time.monotonic() - start:.1f} s\n")
    print(f"{name}: exit {rc}{', stopped at its time limit' if timed_out else ''} ({time.monotonic() - start:.0f} s)")
    return dict(rc=rc, seconds=time.monotonic() - start, timed_out=timed_out)


def setup_data(carry: Path, data_dir: Path) -> dict[str, Any]:
    """MNIST's four .gz files in `carry` -> data_dir/MNIST/raw/ (torchvision's layout, uncompressed); the CPU's
    evaluation classifier in `carry`, if there, becomes the classifier cache (CFG_MINIMAL_CACHE)."""
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    found = [name for name in MNIST_FILES if (carry / f"{name}.gz").is_file()]
    for name in found:
        with gzip.open(carry / f"{name}.gz", "rb") as src, (raw / name).open("wb") as dst:
            shutil.copyfileobj(src, dst)
    if (carry / CLASSIFIER).is_file():
        os.environ["CFG_MINIMAL_CACHE"] = str(carry.resolve())
    return dict(mnist_files=found, classifier_cache=os.environ.get("CFG_MINIMAL_CACHE"))


def prepare_carry(raw: Path, carry: Path) -> None:
    """Here, before the device call: MNIST's .gz files from `raw` and the cached evaluation classifier -> carry."""
    carry.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        shutil.copy2(raw / f"{name}.gz", carry / f"{name}.gz")
    from cfg_minimal.evaluate import CACHE_DIR

    if (CACHE_DIR / CLASSIFIER).is_file():
        shutil.copy2(CACHE_DIR / CLASSIFIER, carry / CLASSIFIER)
    size = sum(p.stat().st_size for p in carry.iterdir()) / 2**20
    print(f"{carry}: {', '.join(sorted(p.name for p in carry.iterdir()))} ({size:.1f} MiB); carry it: [{str(carry)!r}]")


def throughput(args: argparse.Namespace, work: Path, budget: Budget, log: Path) -> list[dict[str, Any]]:
    """train_throughput's rows: the UNet's speed variants and the DiT's eager step, one process each (a variant
    that fails or overruns loses its own row only); the CUDA-graph compile last, with what is left."""
    if args.tiny:
        runs = [("unet-tiny", "fp32", "8", "16"), ("dit-tiny", "fp32", "8", "16")]
    else:
        dit = PROPOSED_GPU_RECIPES["mnist"]["dit"]["arch"]
        runs = [*(("unet", v, "1024", "28") for v in UNET_VARIANTS), *((dit, v, "1024", "28") for v in DIT_VARIANTS)]
        runs.sort(key=lambda r: "compile" in r[1] or "reduce_overhead" in r[1])  # eager first
    stop, rows = budget.left() - args.throughput_seconds, []
    for i, (arch, variant, batch, size) in enumerate(runs):
        out = work / f"throughput-{i}"
        argv = ["benchmarks.train_throughput", "--device", args.device, "--archs", arch, "--sizes", size,
                "--batch-sizes", batch, "--variants", variant, "--repeats", "2" if args.tiny else "20",
                "--out", str(out), "--overwrite"]  # fmt: skip
        eager = "compile" not in variant and "reduce_overhead" not in variant
        seconds = budget.left() - stop if not eager else min(30.0, budget.left() - stop)
        status = run_stage(f"throughput {arch} {variant}", argv, seconds, log)
        if status["rc"] == 0:
            rows += json.loads((out / "train_throughput.json").read_text())["rows"]
    return rows


def speed_flags(rows: list[dict[str, Any]], train_images: int) -> tuple[list[str], dict[str, Any] | None]:
    """The end_to_end switches of the UNet variant that trains `train_images` fastest, its compile counted
    (first step + images / images per second), and that row. bf16 rows only (end_to_end trains in bf16)."""
    unet = [r for r in rows if r["arch"].startswith("unet") and r["variant"].split("+")[0] in ("bf16", "fp32")]
    if not unet:
        return [], None
    best = min(unet, key=lambda r: r["first_step_seconds"] + train_images / r["images_per_s"])
    switches = best["variant"].split("+")[1:]
    flags = {"reduce_overhead": ["--compile-mode", "reduce-overhead"], "compile": ["--compile"],
             "fused": ["--fused"], "channels_last": ["--channels-last"]}  # fmt: skip
    return [flag for s in switches for flag in flags[s]], best


def recipe_of(args: argparse.Namespace, arch: str) -> dict[str, Any]:
    return dict(TINY_RECIPES[arch] if args.tiny else PROPOSED_GPU_RECIPES["mnist"][arch])


def train_images(recipe: dict[str, Any]) -> dict[str, int]:
    """Train images per stage of a recipe, in teacher-step equivalents (a distillation image costs about 5/3
    of a teacher image: the frozen network's forward passes come on top of forward + backward)."""
    rounds = 0 if recipe.get("no_step_rounds") else 4 * recipe.get("round_train_steps", 0)
    return dict(teacher=recipe["teacher_train_steps"] * recipe["teacher_batch_size"],
                distill=(recipe["distill_train_steps"] * recipe["distill_batch_size"] +
                         rounds * recipe.get("round_batch_size", 0)) * 5 // 3)  # fmt: skip


def fit_recipe(recipe: dict[str, Any], images_per_s: float | None, seconds: float) -> tuple[dict[str, Any], float]:
    """The recipe with its train steps scaled down to train in `seconds` at `images_per_s` (never up) ->
    (recipe, share of the train steps kept). Unknown speed: the recipe as it is."""
    if not images_per_s:
        return recipe, 1.0
    need = sum(train_images(recipe).values()) / images_per_s
    share = min(1.0, max(0.0, seconds) / need)
    if share < 1.0:
        for key in ("teacher_train_steps", "distill_train_steps", "round_train_steps"):
            if key in recipe:
                recipe[key] = max(1, int(recipe[key] * share))
    return recipe, share


def end_to_end(args: argparse.Namespace, arch: str, recipe: dict[str, Any], speed: list[str], work: Path,
               seconds: float, log: Path) -> dict[str, Any]:  # fmt: skip
    """One end_to_end run of `recipe` with the switches `speed` -> its status, flags and report (when it finished);
    its exported folders packed into OUT as .tar.gz (one per model for the DiT: the tool takes files <= 16 MiB)."""
    dataset = "digits" if args.tiny else "mnist"
    prefix = dataset if arch == "unet" else f"{dataset}-dit"
    flags = [*recipe_flags(recipe), *speed, *(TINY_EVALUATION if args.tiny else EVALUATION)]
    flags += ["--no-cpu-check"] if arch == "dit" else []
    argv = ["benchmarks.end_to_end", "--dataset", dataset, "--data-dir", str(args.data_dir), "--device", args.device,
            "--out", str(work / arch), "--export", str(work / "pretrained"), "--export-name", prefix, "--overwrite",
            "--no-progress", *flags]  # fmt: skip
    status = run_stage(arch, argv, seconds, log)
    result: dict[str, Any] = dict(status, flags=flags)
    report = work / arch / "end_to_end.json"
    if status["rc"] == 0 and report.is_file():
        result["report"] = json.loads(report.read_text())
        folders = sorted((work / "pretrained").glob(f"{prefix}-*"))
        folders = [f for f in folders if arch == "dit" or not f.name.startswith(f"{dataset}-dit")]
        groups = [folders] if arch == "unet" else [[f] for f in folders]
        for group in groups:
            name = f"{dataset}-unet-pretrained" if arch == "unet" else group[0].name
            with tarfile.open(args.out / f"{name}.tar.gz", "w:gz") as tar:
                for folder in group:
                    tar.add(folder, arcname=folder.name)
        result["exported"] = [f.name for f in folders]
    return result


def bars(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 28's must-holds that this run measured: one row each (what, measured, bar, met)."""
    rows: list[dict[str, Any]] = []
    for arch, teacher_bars in (("unet", (0.97, 0.995)), ("dit", (0.95, 0.99))):
        report = data["stages"].get(arch, {}).get("report")
        if not report:
            continue
        q = {(r["model"], r["scale"]): r for r in report["quality"] if r.get("accuracy") is not None}
        for scale, bar in zip((1.0, 3.0), teacher_bars):
            if ("teacher", scale) in q:
                acc = q["teacher", scale]["accuracy"]
                rows.append(dict(what=f"{arch} teacher accuracy at s = {scale:g}", measured=f"{acc:.4f}",
                                 bar=f">= {bar}", met=acc >= bar))  # fmt: skip
        checks = [("student", (0, 1, 2, 3, 5), 0.01, 0.10), ("student 8 steps", (1, 3), 0.02, 0.25)]
        for model, scales, points, fd_share in checks[: 1 if arch == "dit" else 2]:
            for scale in (float(s) for s in scales):
                if (model, scale) in q and ("teacher", scale) in q:
                    s, t = q[model, scale], q["teacher", scale]
                    gap, fd = s["accuracy"] - t["accuracy"], s["fd"] / t["fd"] - 1
                    met = abs(gap) <= points and (arch == "dit" or abs(fd) <= fd_share)
                    bar = f"acc within {points}" + ("" if arch == "dit" else f", FD within {fd_share:.0%}")
                    rows.append(dict(what=f"{arch} {model} vs teacher at s = {scale:g}", bar=bar, met=met,
                                     measured=f"{gap:+.4f} acc, {fd:+.1%} FD"))  # fmt: skip
        train = sum(s["seconds"] for s in report["stages"])
        rows.append(dict(what=f"{arch} pipeline training time", measured=f"{train:.0f} s", bar="<= 300 s",
                         met=train <= 300))  # fmt: skip
    best = data["stages"].get("throughput", {}).get("best")
    if best:
        rows.append(dict(what=f"unet train step, batch {best['batch']} ({best['variant']})",
                         measured=f"{best['images_per_s']:.0f} images/s", bar=">= 50,344 (2 x 25,172)",
                         met=best["images_per_s"] >= 50344))  # fmt: skip
    return rows


THROUGHPUT = harness.Table([("arch", "arch", "{}"), ("batch", "batch", "{}"), ("variant", "variant", "{}"),
                            ("images_per_s", "train images/s", "{:.0f}"), ("first_step_seconds", "first step s",
                                                                            "{:.1f}")])  # fmt: skip
STAGES = harness.Table([("stage", "stage", "{}"), ("seconds", "wall s", "{:.1f}"),
                        ("steps", "train steps x batch", "{}"),
                        ("images_per_s", "train images/s", "{:.0f}"), ("tflops", "model TFLOP/s", "{:.1f}"),
                        ("peak_memory_gb", "peak memory GB", "{:.2f}")])  # fmt: skip
QUALITY = harness.Table(["model", "sampling_steps", "scale", ("accuracy", "accuracy", "{:.4f}"), ("fd", "FD", "{:.3f}"),
                         ("spread", "accuracy per seed", "{}")])  # fmt: skip
BARS = harness.Table([("what", "must hold", "{}"), ("measured", "measured", "{}"), ("bar", "bar", "{}"),
                      ("met", "met", "{}")])  # fmt: skip


def tables(data: dict[str, Any]) -> str:
    """The summary as markdown tables (what has been measured so far)."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        stages = data["stages"]
        print(f"# gpu_run{' (tiny)' if data['tiny'] else ''}: {stages.get('setup', {}).get('device', '')}\n")
        if stages.get("throughput", {}).get("rows"):
            THROUGHPUT.print(stages["throughput"]["rows"])
        for arch in ("unet", "dit"):
            stage = stages.get(arch, {})
            if not stage:
                continue
            print(f"\n## {arch}: exit {stage.get('rc')}, {stage.get('seconds', 0):.0f} s, share of the recipe's "
                  f"train steps {stage.get('share', 1):.2f}, flags {' '.join(stage.get('flags', []))}\n")  # fmt: skip
            if "skipped" in stage:
                print(f"skipped: {stage['skipped']}")
            report = stage.get("report")
            if report:
                STAGES.print(dict(s, steps=f"{s['train_steps']} x {s['batch_size']}",
                                  tflops=s["model_flop_per_s"] / 1e12) for s in report["stages"])  # fmt: skip
                print()
                QUALITY.print(dict(r, spread=" ".join(f"{p['accuracy']:.3f}" for p in r.get("per_seed", [])))
                              for r in report["quality"])  # fmt: skip
        checks = bars(data)
        if checks:
            print()
            BARS.print(checks)
    return text.getvalue()


def stage_budget(args: argparse.Namespace, arch: str, recipe: dict[str, Any], rows: list[dict[str, Any]],
                 best: dict[str, Any] | None, seconds: float) -> tuple[dict[str, Any], float]:  # fmt: skip
    """The recipe scaled to train in `seconds` less the stage's evaluation and compile time, at the speed the
    throughput stage measured for `arch` (the chosen UNet variant; the DiT's eager step) -> (recipe, share)."""
    if args.tiny:
        return recipe, 1.0
    name = "unet" if arch == "unet" else recipe.get("arch", "dit")
    measured = [r for r in rows if r["arch"] == name]
    speed = best["images_per_s"] if arch == "unet" and best else max((r["images_per_s"] for r in measured), default=0)
    compiles = best and ("compile" in best["variant"] or "reduce_overhead" in best["variant"])
    compiling = 2 * best["first_step_seconds"] if compiles and (arch == "unet" or args.dit_compile) else 0
    return fit_recipe(recipe, speed, seconds - EVAL_SECONDS[arch] - compiling)


def run(args: argparse.Namespace) -> None:
    budget = Budget(args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    work, log = args.work, args.out / "gpu_run.log"
    summary = Summary(args.out, args)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = args.device or device
    found = setup_data(args.carry, args.data_dir) if args.carry else {}
    if len(found.get("mnist_files", [])) == len(MNIST_FILES):  # the layout torchvision reads, checked now
        from cfg_minimal.data import load_dataset

        found["mnist_test_images"] = len(load_dataset("mnist", args.data_dir, train=False, download=False))
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    summary.stage("setup", device=name, torch=torch.__version__, budget_s=args.budget, **found)
    rows = throughput(args, work, budget, log) if "throughput" in args.stages else []
    speed, best = speed_flags(rows, train_images(recipe_of(args, "unet"))["teacher"])
    summary.stage("throughput", rows=rows, best=best, chosen=speed)
    if "unet" in args.stages:
        reserve = args.dit_reserve if "dit" in args.stages and not args.tiny else 0.0
        recipe, share = stage_budget(args, "unet", recipe_of(args, "unet"), rows, best, budget.left() - reserve)
        summary.stage("unet", share=share, **end_to_end(args, "unet", recipe, speed, work, budget.left() - 20, log))
    if "dit" in args.stages:
        recipe, share = stage_budget(args, "dit", recipe_of(args, "dit"), rows, best, budget.left() - 20)
        dit_speed = speed if args.dit_compile else [f for f in speed if f == "--fused"]  # compiling costs minutes
        if share < MIN_DIT_SHARE:
            summary.stage("dit", share=share, skipped=f"{budget.left():.0f} s left: {share:.0%} of its train steps fit")
        else:
            summary.stage("dit", share=share,
                          **end_to_end(args, "dit", recipe, dit_speed, work, budget.left() - 10, log))  # fmt: skip
    print((args.out / "summary.md").read_text())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "runs/gpu_run"),
                   help="summary, log and exported models (default: $OUT, else runs/gpu_run)")  # fmt: skip
    p.add_argument("--work", type=Path, default=None, help="checkpoints (default: a gpu_run folder in the temp dir)")
    p.add_argument("--carry", type=Path, default=None, help="the folder --prepare-carry wrote (MNIST .gz files)")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="where MNIST is unpacked (default: data)")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for everything (default: 540)")
    p.add_argument("--throughput-seconds", type=float, default=150.0, help="the throughput stage's share")
    p.add_argument("--dit-reserve", type=float, default=150.0, help="seconds kept for the DiT when fitting the UNet")
    p.add_argument("--device", default=None, help="default: cuda if there is one, else cpu")
    p.add_argument("--stages", nargs="+", default=["throughput", "unet", "dit"], choices=["throughput", "unet", "dit"],
                   help="what to run (default: all three; e.g. a second, short call: --stages dit)")  # fmt: skip
    p.add_argument("--dit-compile", action="store_true",
                   help="compile the DiT as the fastest UNet variant is (default: fused AdamW only: a cold compile "
                   "of two graphs costs about as long as its training saves)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace the summary of an earlier run in --out")
    p.add_argument("--tiny", action="store_true", help="the CPU test setting: tiny networks on digits, seconds")
    p.add_argument("--prepare-carry", type=Path, default=None, metavar="MNIST_RAW",
                   help="here, before the device call: copy MNIST's .gz and the classifier to --carry")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.prepare_carry:
        prepare_carry(args.prepare_carry, args.carry or Path("runs/gpu_carry"))
        return 0
    args.work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_run-{os.getpid()}"
    if (args.out / "summary.json").exists() and not args.overwrite:
        print(f"error: {args.out / 'summary.json'} already exists; pass --overwrite or choose another --out",
              file=sys.stderr)  # fmt: skip
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

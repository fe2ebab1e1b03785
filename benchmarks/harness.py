"""What every benchmark measures with: counted network evaluations, synchronised timers, the loop
"for each model and scale: generate, judge, one row", tables, the common flags and the output rule.

    from benchmarks import harness

    def run(args):
        out = harness.Outputs.of(args, "frontier.json")  # refused now, before anything runs, if it exists
        judge = harness.load_judge(dataset, args.data_dir, device)
        rows = harness.measure(harness.grid(pipes, scales), judge, args.n, args.seed, table=harness.Table(...))
        out.json("frontier.json", harness.record(args, device, rows=rows))

    def build_parser():
        p = harness.parser("frontier", __doc__)          # --data-dir --out --overwrite --device --seed --n
        p.add_argument(...)                              # the benchmark's own flags
        return p

    main = harness.entry(build_parser, run, __name__)    # main(argv=None) -> exit code; runs under python -m

The rules every benchmark follows through this file:
  data      --data-dir defaults to `data` (relative to where you run; ignored by git): torchvision
            downloads MNIST, Fashion-MNIST and CIFAR-10 into it; digits needs no files.
  outputs   --out defaults to runs/benchmarks/NAME; docs/ is written only with `--out docs`. A file
            that already exists is refused before anything is measured (one line, exit code 2) unless
            --overwrite is given: a benchmark never replaces a file this run did not create.
  counts    network evaluations are counted by forward hooks on the networks, never assumed.
  time      wall time between CUDA synchronisations: a GPU queues work, and without them a timer
            measures the launches instead of the work.
  mistakes  a user's mistake is one line on stderr and exit code 2 (cfg_minimal.errors.report), found
            before anything is trained or measured where it can be (`check_common`, each run's checks).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cfg_minimal.distributed import device_name
from cfg_minimal.errors import UserError, report, user_message
from cfg_minimal.evaluate import Judge, check_writable, generate
from cfg_minimal.plotting import save_figure
from cfg_minimal.resume import MAX_SEED
from cfg_minimal.sampling import Pipeline
from cfg_minimal.train import TeacherConfig

DATA_DIR = "data"  # the one default of --data-dir
RUNS = Path("runs") / "benchmarks"  # --out defaults to RUNS / NAME


# --- flags, errors and outputs -------------------------------------------------------------------


def parser(
    name: str, doc: str | None, *, n: int | None = 500, seed: list[int] | None = None, data: bool = True
) -> argparse.ArgumentParser:
    """The benchmark's parser with the common flags: --out, --overwrite, --device, and where the benchmark
    samples and reads data, --data-dir, --seed (default `seed`, else [0]) and --n (default `n`; None: no --n)."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    common = p.add_argument_group("flags common to every benchmark (benchmarks/harness.py)")
    if data:
        common.add_argument("--data-dir", default=DATA_DIR, help=f"dataset folder (default: {DATA_DIR}, relative to "
                            "where you run; torchvision downloads MNIST, Fashion-MNIST and CIFAR-10 into it, digits "
                            "needs none)")  # fmt: skip
    common.add_argument("--out", default=str(RUNS / name), help=f"output folder (default: {RUNS / name}); "
                        "--out docs updates the files under docs/")  # fmt: skip
    common.add_argument(
        "--overwrite",
        action="store_true",
        help="replace output files that already exist (default: refuse them, before anything runs)",
    )
    common.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:1, ...")
    if n is not None:
        common.add_argument("--n", type=int, default=n, help=f"samples per row and seed (default: {n})")
    if data or n is not None:
        seeds = seed or [0]
        common.add_argument("--seed", "--seeds", type=int, nargs="+", default=seeds, metavar="SEED",
                            help="noise seed(s) of x_T; with several, a row is the mean over them (default: "
                            f"{' '.join(map(str, seeds))})")  # fmt: skip
    return p


def main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Any], argv: list[str] | None) -> int:
    """Parse argv and run the benchmark -> exit code: 0, 2 with one line for a user's mistake, 130 on Ctrl-C.
    args.command records the command line."""
    args = parser.parse_args(argv)
    args.command = shlex.join([*parser.prog.split(), *(sys.argv[1:] if argv is None else argv)])
    try:
        check_common(args)
        run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a user's mistake: one line, exit code 2; a bug keeps its traceback
        if (user_message(err) or "").startswith("ran out of memory"):  # advice in this benchmark's own flags
            sizes = [flag for flag in parser._option_string_actions if flag == "--n" or "batch" in flag]
            err = UserError(f"ran out of memory: lower {' or '.join(sizes) or 'the sizes asked for'}")
        return report(err)
    return 0


def entry(
    build_parser: Callable[[], argparse.ArgumentParser], run: Callable[[argparse.Namespace], Any], module: str
) -> Callable[[list[str] | None], int]:
    """A benchmark's main(argv=None) -> exit code: parse argv with build_parser() and run (see `main`).
    With module "__main__" (`python -m benchmarks.NAME`) it also runs main now and exits with its code,
    so `main = harness.entry(build_parser, run, __name__)` is a benchmark's last line."""

    def benchmark_main(argv: list[str] | None = None) -> int:
        return main(build_parser(), run, argv)

    if module == "__main__":
        raise SystemExit(benchmark_main())
    return benchmark_main


def check_common(args: argparse.Namespace) -> None:
    """The flags most benchmarks share, before anything runs: --n, the seeds, and where a benchmark has
    them --sampling-steps (at most the noise schedule's timesteps) and --scales / --scale (finite)."""
    require_positive(args, *(name for name in ("n", "sampling_steps") if getattr(args, name, None) is not None))
    seeds = [*getattr(args, "seed", []), *getattr(args, "extra_seeds", [])]
    if not all(0 <= seed <= MAX_SEED for seed in seeds):
        raise UserError(f"--seed must be integers in [0, 2**63 - 1], got {seeds}")
    steps, most = getattr(args, "sampling_steps", None), TeacherConfig.num_train_timesteps
    if steps is not None and steps > most:
        raise UserError(f"--sampling-steps must be at most {most} (the noise schedule's timesteps), got {steps}")
    scales = [*getattr(args, "scales", []), *([args.scale] if hasattr(args, "scale") else [])]
    if not all(math.isfinite(s) for s in scales):
        raise UserError(f"--scales must be finite numbers, got {scales}")


def require_positive(args: argparse.Namespace, *names: str) -> None:
    """A UserError for the first flag args.NAME (an int, or a list of them) holding a value below 1."""
    for name in names:
        value = getattr(args, name)
        if min(value if isinstance(value, list) else [value]) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


class Outputs:
    """The files one run writes into a folder. `claim` refuses, before the work, any that already exist
    (unless overwrite); a file this run has written may be written again."""

    def __init__(self, folder: str | Path, overwrite: bool = False, flag: str = "--out"):
        self.folder, self.overwrite, self.flag = Path(folder), overwrite, flag
        self.written: set[Path] = set()

    @classmethod
    def of(cls, args: argparse.Namespace, *names: str) -> Outputs:
        """The outputs in --out (--overwrite as given), `names` claimed at once: refused before any work."""
        out = cls(args.out, args.overwrite)
        out.claim(*names)
        return out

    def claim(self, *names: str) -> list[Path]:
        """FOLDER/name for each name; a UserError if one exists and was not written by this run."""
        paths = [self.folder / name for name in names]
        taken = [p for p in paths if p.exists() and p not in self.written]
        if taken and not self.overwrite:
            raise UserError(f"{taken[0]} already exists; pass --overwrite to replace it, or choose another {self.flag}")
        check_writable(self.folder)  # made when the first file is written: a refusal leaves no empty folder
        return paths

    def path(self, name: str) -> Path:
        """A claimed path to hand to a writer (its folder made); counted as written by this run."""
        (path,) = self.claim(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.written.add(path)
        return path

    def json(self, name: str, record: Any) -> Path:
        path = self.path(name)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")
        return path

    def figure(self, name: str, fig: Any) -> Path:
        """Save a matplotlib figure whole (plotting.save_figure) and close it."""
        path = self.path(name)
        save_figure(fig, path)
        print(f"wrote {path}")
        return path


def record(args: argparse.Namespace, device: torch.device, /, **fields: Any) -> dict[str, Any]:
    """A benchmark's JSON: the command, the device and the benchmark's own fields."""
    return dict(command=args.command, device=device_name(device), **fields)


def load_judge(dataset: str, data_dir: str | Path, device: torch.device) -> Judge:
    """cfg_minimal's evaluation classifier for `dataset` (trained on first use, then cached) and the real
    test set's statistics: judge(images, labels) -> accuracy, FD, diversity."""
    return Judge.load(dataset, data_dir, device, progress=True)


# --- counting and timing -------------------------------------------------------------------------


class EvalCounter:
    """Counts the images the given networks are evaluated on: a forward hook adds each call's batch, so a
    teacher's batched CFG pass over 2B images counts 2B. A context manager; the hooks go when it ends."""

    def __init__(self, *networks: nn.Module | None):
        self.images = 0
        unique = {id(net): net for net in networks if net is not None}  # a network given twice counts once
        self._handles = [net.register_forward_hook(self._add) for net in unique.values()]

    def _add(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.images += output.shape[0]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> EvalCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def synchronize(device: torch.device) -> None:
    """Wait for the queued GPU work (a no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall time of a `with` block between synchronisations (.seconds); with memory=True also the peak
    memory (.peak_memory_gb: allocated by PyTorch on a GPU, the process's peak RSS on a CPU)."""

    def __init__(self, device: torch.device, memory: bool = False):
        self.device, self.memory = device, memory
        self.seconds = self.peak_memory_gb = math.nan
        self.peak_memory_kind = "GPU allocated" if device.type == "cuda" else "process RSS"

    def __enter__(self) -> Timer:
        synchronize(self.device)
        if self.memory and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start
        if self.memory:
            cuda = self.device.type == "cuda"
            self.peak_memory_gb = (torch.cuda.max_memory_allocated(self.device) if cuda
                                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1e3) / 1e9  # fmt: skip


def time_repeated(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` calls of fn, after `warmup` untimed calls (first calls allocate)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        with Timer(device) as timer:
            fn()
        times.append(timer.seconds)
    return times


# --- the quality loop ----------------------------------------------------------------------------


@dataclass
class Case:
    """One row of a quality table: a pipeline at one scale, sampled n times per seed and judged."""

    model: str  # the row's name
    pipe: Pipeline
    scale: float
    steps: int | None = None  # sampling steps; None: the pipeline's own
    options: dict[str, Any] = field(default_factory=dict)  # the Pipeline's keyword arguments (guider=...)
    columns: dict[str, Any] = field(default_factory=dict)  # more columns of the row (route, budget, ...)
    seeds: Sequence[int] | None = None  # None: measure's seeds
    networks: Sequence[nn.Module] = ()  # more networks whose evaluations count (autoguidance's guide)


def grid(pipes: dict[str, Pipeline], scales: Iterable[float], **case: Any) -> list[Case]:
    """A case per model and scale, in that order; `case`: Case fields shared by all."""
    return [Case(name, pipe, s, **case) for name, pipe in pipes.items() for s in scales]


def measure(
    cases: Sequence[Case],
    judge: Judge,
    n: int,
    seeds: Sequence[int] = (0,),
    table: Table | None = None,
    extra_metrics: Callable[[Case, torch.Tensor, torch.Tensor], dict[str, float]] | None = None,
    warmup: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """For each case and seed: n samples with labels 0..K-1 repeated from the seed's x_T (evaluate.generate),
    judged clamped to [-1, 1] as they would be saved -> one row per case: the mean over seeds of accuracy,
    FD, diversity and extra_metrics(case, images, labels), the counted network evaluations per image and
    ms per image, each seed's numbers in `per_seed`. A sampling the pipeline refuses (a UserError, e.g. NaN
    samples) becomes a row with `failed`. `warmup` samples once, untimed, before a pipeline's first timed
    row; `on_row(row)` may add columns computed from the rows so far; `table` prints each row as it comes."""
    for case in cases:
        if n < 2 * case.pipe.num_classes:  # diversity needs two samples of every class
            raise UserError(f"--n must be at least two samples per class ({2 * case.pipe.num_classes}), got {n}")
    if table is not None:
        table.header()
    rows, warm = [], set()
    for case in cases:
        steps = case.pipe.sampling_steps if case.steps is None else case.steps
        row: dict[str, Any] = dict(model=case.model, scale=case.scale, sampling_steps=steps, n=n,
                                   seeds=list(case.seeds or seeds), **case.columns)  # fmt: skip
        try:
            if warmup and id(case.pipe) not in warm:
                generate(case.pipe, min(n, 2 * case.pipe.num_classes), case.scale, steps, **case.options)
                warm.add(id(case.pipe))
            row["per_seed"] = [sample_and_judge(case, steps, n, seed, judge, extra_metrics) for seed in row["seeds"]]
        except UserError as err:
            row["failed"] = str(err)
        else:
            for key in row["per_seed"][0]:
                if key != "seed":
                    row[key] = statistics.fmean(s[key] for s in row["per_seed"])
            row["ms_per_image"] = 1000 * row.pop("seconds") / n
        rows.append(row)
        if on_row is not None:
            on_row(row)
        if table is not None:
            table.row(row)
    return rows


def sample_and_judge(
    case: Case, steps: int, n: int, seed: int, judge: Judge, extra_metrics: Callable | None
) -> dict[str, Any]:
    """One seed of one case -> its scores, evaluations per image and seconds."""
    device = case.pipe.device
    with EvalCounter(case.pipe.model, *case.networks) as counter, Timer(device) as timer:
        images, labels, _ = generate(case.pipe, n, case.scale, steps, seed, **case.options)
    scores = dict(seed=seed, **judge(images.clamp(-1, 1), labels))
    if extra_metrics is not None:
        scores.update(extra_metrics(case, images, labels))
    return dict(**scores, evals_per_image=counter.images / n, seconds=timer.seconds)


def with_scheduler(pipe: Pipeline, scheduler: Any) -> Pipeline:
    """The same network sampled by another scheduler (a shallow copy: the weights are shared)."""
    other = copy.copy(pipe)
    other.scheduler = scheduler
    return other


# --- tables --------------------------------------------------------------------------------------

# Columns of the quality rows: key -> (header, format).
COLUMNS: dict[str, tuple[str, str]] = {
    "model": ("model", "{}"),
    "scale": ("s", "{:g}"),
    "sampling_steps": ("sampling steps", "{:d}"),
    "evals_per_image": ("evals / image", "{:.0f}"),
    "accuracy": ("accuracy", "{:.3f}"),
    "fd": ("FD", "{:.2f}"),
    "diversity": ("diversity", "{:.2f}"),
    "ms_per_image": ("ms / image", "{:.2f}"),
}
QUALITY = ("model", "scale", "sampling_steps", "evals_per_image", "accuracy", "fd", "diversity", "ms_per_image")


class Table:
    """A markdown table printed a row at a time. A column is a key of COLUMNS or (key, header, format);
    a missing value prints '-', and a failed row says why in its first missing column."""

    def __init__(self, columns: Sequence[str | tuple[str, str, str]], title: str | None = None):
        self.columns = [(c, *COLUMNS[c]) if isinstance(c, str) else c for c in columns]
        self.title = title

    def header(self) -> None:
        if self.title:
            self._print(f"\n{self.title}\n")
        self._print("| " + " | ".join(header for _, header, _ in self.columns) + " |")
        self._print("|" + "|".join("---" if fmt == "{}" else "---:" for _, _, fmt in self.columns) + "|")

    def row(self, row: dict[str, Any]) -> None:
        cells, failed = [], row.get("failed")
        for key, _, fmt in self.columns:
            if row.get(key) is not None:
                cells.append(fmt.format(row[key]))
            else:
                cells.append(f"failed: {failed}" if failed else "-")
                failed = None
        self._print("| " + " | ".join(cells) + " |")

    def print(self, rows: Iterable[dict[str, Any]]) -> None:
        self.header()
        for row in rows:
            self.row(row)

    def _print(self, line: str) -> None:
        print(line, flush=True)

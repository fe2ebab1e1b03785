"""Few-step students against the 64-step teacher: quality, and wall time measured in one run.

    python -m benchmarks.step_distillation --teacher runs/digits/teacher.pt --student runs/digits/student.pt \\
        --run-dir runs/digits --data-dir ../shared/data

Rows: the CFG teacher at --sampling-steps DDIM steps (64; batched, two passes per step), the guided
student at as many, the guided student cut to 8 and 4 steps without step distillation (what
distillation has to beat), and the step-distilled students (`student_{n}steps.pt` in --run-dir). Every
row samples the same x_T and labels (the mean over --seed); accuracy, FD and diversity as in
`python -m cfg_minimal.evaluate`; network evaluations counted; speed-up is the teacher's wall time per
image over the row's, both measured here after an untimed warm-up. Writes OUT/step_distillation.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks import harness
from cfg_minimal import UserError, load_checkpoint, load_pipeline, pick_device
from cfg_minimal.schedulers import DDIMScheduler

TEACHER = "teacher, CFG"
CUT_STEPS = (8, 4)  # the guided student on the aligned grid, without step distillation
TABLE = harness.Table(["model", "sampling_steps", "scale", "evals_per_image", "accuracy", "fd", "diversity",
                       "ms_per_image", ("speedup", "speed-up", "{:.1f}x")])  # fmt: skip


def check_models(args: argparse.Namespace) -> None:
    """--teacher a teacher, --student a guided student (not a step-distilled one) of the same data set, and
    --run-dir a folder: what the rows are labelled."""
    teacher, student = load_checkpoint(args.teacher, kind="teacher"), load_checkpoint(args.student, kind="student")
    if student.get("sampling_steps") is not None:
        raise UserError(f"--student {args.student!r} is step-distilled ({student['sampling_steps']} sampling steps); "
                        "give the guided student it was distilled from (student.pt)")  # fmt: skip
    if student["dataset"] != teacher["dataset"]:
        raise UserError(f"--student is a {student['dataset']} student, --teacher a {teacher['dataset']} teacher; "
                        "give two of the same data set")  # fmt: skip
    if not Path(args.run_dir).is_dir():
        raise UserError(f"--run-dir {args.run_dir!r} is not a folder; give the one holding student_{{n}}steps.pt")


def cases(args: argparse.Namespace, device: torch.device) -> list[harness.Case]:
    """The rows' models, each at every scale; the teacher first (the speed-up's reference)."""
    check_models(args)
    teacher, guided = load_pipeline(args.teacher, device=device), load_pipeline(args.student, device=device)
    rows = [(TEACHER, teacher, args.sampling_steps), ("guided student", guided, args.sampling_steps)]
    aligned = DDIMScheduler(**{**load_checkpoint(args.student)["scheduler_config"], "timestep_spacing": "aligned"})
    rows += [("guided student, no step distillation", harness.with_scheduler(guided, aligned), n) for n in CUT_STEPS]
    for path in sorted(Path(args.run_dir).glob("student_*steps.pt"), key=lambda p: -int(p.stem[8:-5])):
        pipe = load_pipeline(path, device=device)
        if pipe.dataset != teacher.dataset:
            raise UserError(f"{path} is a {pipe.dataset} student, --teacher a {teacher.dataset} teacher")
        rows.append(("step-distilled student", pipe, pipe.sampling_steps))
    if len(rows) == 2 + len(CUT_STEPS):
        print(f"note: no student_{{n}}steps.pt in --run-dir {args.run_dir}: no step-distilled rows")
    return [harness.Case(name, pipe, s, steps) for name, pipe, steps in rows for s in args.scales]


def run(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    out = harness.Outputs.of(args, "step_distillation.json")
    todo = cases(args, device)
    judge = harness.load_judge(todo[0].pipe.dataset, args.data_dir, device)
    reference: dict[float, float] = {}  # the teacher's ms per image at each scale (its rows come first)

    def speedup(row: dict) -> None:
        if row["model"] == TEACHER and "ms_per_image" in row:
            reference[row["scale"]] = row["ms_per_image"]
        if "ms_per_image" in row and row["scale"] in reference:
            row["speedup"] = reference[row["scale"]] / row["ms_per_image"]

    results = harness.measure(todo, judge, args.n, args.seed, table=TABLE, warmup=True, on_row=speedup)
    out.json("step_distillation.json", harness.record(args, device, n=args.n, rows=results))


def build_parser() -> argparse.ArgumentParser:
    p = harness.parser("step_distillation", __doc__, n=500)
    p.add_argument("--teacher", default="runs/digits/teacher.pt", help="default: runs/digits/teacher.pt")
    p.add_argument("--student", default="runs/digits/student.pt",
                   help="the guided (one pass, many steps) student (default: runs/digits/student.pt)")  # fmt: skip
    p.add_argument("--run-dir", default="runs/digits", help="where student_{n}steps.pt are (default: runs/digits)")
    p.add_argument("--sampling-steps", type=int, default=64, help="of the teacher and guided student (default: 64)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0], help="default: 1 3")
    return p


main = harness.entry(build_parser, run, __name__)

"""Few-step students against the 64-step teacher: quality, and wall time measured in one run.

    python -m benchmarks.step_distillation --teacher runs/digits/teacher.pt --student runs/digits/student.pt \
        --run-dir runs/digits --data-dir ../shared/data

Rows: the CFG teacher at 64 DDIM steps (batched, two passes per step), the guided student at 64 steps,
the guided student cut to 8 and 4 steps without step distillation (what distillation has to beat),
and the step-distilled students (`student_{n}steps.pt` in --run-dir). Every row samples the same
x_T and labels; accuracy, FD and diversity as in `python -m cfg_minimal.evaluate`; speed-up is the
teacher's wall time per image over the row's, both measured here.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from cfg_minimal import load_checkpoint, load_pipeline, pick_device
from cfg_minimal.evaluate import Judge, generate
from cfg_minimal.schedulers import DDIMScheduler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="runs/digits/teacher.pt")
    p.add_argument("--student", default="runs/digits/student.pt", help="the guided (one pass, many steps) student")
    p.add_argument("--run-dir", default="runs/digits", help="where student_{n}steps.pt are")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="noise seed of x_T (the README also reports 1 and 2)")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()
    device = pick_device(args.device)

    teacher, guided = load_pipeline(args.teacher, device=device), load_pipeline(args.student, device=device)
    rows = [("teacher, CFG", teacher, 64), ("guided student", guided, 64)]
    aligned = {**load_checkpoint(args.student)["scheduler_config"], "timestep_spacing": "aligned"}
    for n in (8, 4):
        cut = copy.copy(guided)  # the same weights on the aligned grid, no step distillation
        cut.scheduler = DDIMScheduler(**aligned)
        rows.append(("guided student, no step distillation", cut, n))
    for path in sorted(Path(args.run_dir).glob("student_*steps.pt"), key=lambda p: -int(p.stem[8:-5])):
        pipe = load_pipeline(path, device=device)
        rows.append(("step-distilled student", pipe, pipe.sampling_steps))

    judge = Judge.load(teacher.dataset, args.data_dir, device)

    results, reference_seconds = [], {}
    print(f"{'model':<38} {'steps':>5} {'s':>4} {'accuracy':>8} {'FD':>6} {'diversity':>9} {'ms/image':>8} speed-up")
    for name, pipe, steps in rows:
        generate(pipe, min(args.n, 20), args.scales[-1], steps)  # warm-up, untimed: first calls allocate
        for s in args.scales:
            images, labels, seconds = generate(pipe, args.n, s, steps, seed=args.seed)
            reference_seconds.setdefault(s, seconds)  # the first row, the teacher, is the reference
            row = dict(model=name, sampling_steps=steps, scale=s,
                       **judge(images, labels),
                       ms_per_image=1000 * seconds / args.n, speedup=reference_seconds[s] / seconds)  # fmt: skip
            results.append(row)
            print(f"{name:<38} {steps:>5} {s:>4g} {row['accuracy']:>8.3f} {row['fd']:>6.2f} {row['diversity']:>9.2f} "
                  f"{row['ms_per_image']:>8.2f} {row['speedup']:>7.1f}x", flush=True)  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(dict(n=args.n, device=str(device), rows=results), indent=2))


if __name__ == "__main__":
    main()

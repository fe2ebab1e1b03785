"""Sample a grid from a teacher or student checkpoint: rows = classes, one block of columns per scale.

python sample.py runs/digits/teacher.pt --scales 0 1 3 --n-per-class 8 --sampling-steps 50 --seed 0 --out grid.png
python sample.py runs/digits/teacher.pt --scales 1 3 6 --negative-label 1 --out not_a_one.png
python sample.py runs/digits/teacher.pt --scales 3 6 10 --guider apg:eta=0,norm_threshold=4 --out apg.png
python sample.py runs/digits/teacher.pt --scales 2 3 --guider autoguidance --guide-ckpt runs/early/teacher.pt
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from cfg_minimal import Pipeline, load_pipeline, pick_device, sample_scale_grid
from cfg_minimal.checks import check_same_schedule
from cfg_minimal.errors import UserError, report, user_message
from cfg_minimal.evaluate import check_writable
from cfg_minimal.guidance import CFG, GUIDERS, Guider, guider_from_spec
from cfg_minimal.guiders import SCHEDULES
from cfg_minimal.plotting import figure_path, save_scale_grid
from cfg_minimal.resume import MAX_SEED
from cfg_minimal.schedulers import SCHEDULERS

SAMPLER_NAMES = {"ddim": "DDIM", "ddpm": "DDPM", "dpmsolver++": "DPM-Solver++", "ddim-cfg++": "DDIM CFG++",
                 "euler": "flow Euler", "heun": "flow Heun"}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="teacher.pt or student.pt")
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 3.0], help="guidance scales s")
    p.add_argument("--n-per-class", type=int, default=8, help="images per class and scale")
    p.add_argument(
        "--sampling-steps", type=int, default=None, help="default: the checkpoint's own (50 unless step-distilled)"
    )
    p.add_argument("--sampler", choices=sorted(SCHEDULERS),
                   help="default: the model's own, ddim (euler for a rectified-flow model)")  # fmt: skip
    p.add_argument("--shift", type=float, help="a rectified-flow model's SD3/FLUX sigma shift (default: its own, 1)")
    p.add_argument("--negative-label", type=int, help="CFG's negative class: guide away from it (teacher only)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="CFG's rescale phi in [0, 1] (teacher only)")
    p.add_argument("--guidance-interval", type=int, nargs=2, metavar=("T_LO", "T_HI"),
                   help="CFG guides only at timesteps T_LO <= t <= T_HI, plain conditional elsewhere")  # fmt: skip
    p.add_argument("--guider", default="cfg", metavar="METHOD[:NAME=VALUE,...]",
                   help=f"guidance rule: one of {', '.join(GUIDERS)}, with settings, e.g. apg:eta=0,norm_threshold=4,"
                   "momentum=-0.5 or cfg-zero-star:zero_init_steps=1 (a student follows cfg only)")  # fmt: skip
    p.add_argument("--guide-ckpt", help="autoguidance's weaker model: a teacher checkpoint (an earlier or smaller one)")
    p.add_argument("--guidance-schedule", default="constant", choices=SCHEDULES,
                   help="vary s over t, keeping its mean (Wang et al. 2024); a student takes it too")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="grid.png", help="the figure (.png unless another suffix); DIR/ means DIR/grid.png")
    args = p.parse_args(argv)
    if not 1 <= args.n_per_class <= 64:
        p.error(f"--n-per-class must be between 1 and 64 (a wider grid cannot be drawn), got {args.n_per_class}")
    if args.sampling_steps is not None and args.sampling_steps < 1:
        p.error(f"--sampling-steps must be a positive integer, got {args.sampling_steps}")
    if not all(math.isfinite(s) for s in args.scales):
        p.error(f"--scales must be finite numbers, got {args.scales}")
    if not 0 <= args.seed <= MAX_SEED:
        p.error(f"--seed must be an integer in [0, 2**63 - 1], got {args.seed}")
    return args


def output_path(out: str) -> Path:
    """Where --out puts the figure, checked before anything is sampled: a name ending in / is a folder
    (DIR/grid.png), and the folder must take a file."""
    path = figure_path(Path(out) / "grid.png" if out.endswith(("/", os.sep)) else out)
    check_writable(path.parent)
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"cannot write to --out {str(path)!r} (it is read-only); choose another file")
    return path


def build_guider(args: argparse.Namespace, pipe: Pipeline) -> Guider:
    """--guider with its settings; the plain-CFG flags (--negative-label, --guidance-rescale,
    --guidance-interval) are CFG's options; --guide-ckpt is autoguidance's weaker model, which must share
    the model's noise schedule and prediction type."""
    needs_guide = GUIDERS.get(args.guider.partition(":")[0].strip(), CFG).needs_guide_model
    if args.guide_ckpt and not needs_guide:
        raise UserError(f"--guide-ckpt is autoguidance's weaker model; {args.guider!r} takes none")
    guide_model = None
    if args.guide_ckpt:
        guide = load_pipeline(args.guide_ckpt, device=pipe.device)
        check_same_schedule(guide.scheduler, pipe.scheduler, "--guide-ckpt")
        guide_model = guide.model
    guider = guider_from_spec(args.guider, guide_model)
    cfg_options = dict(negative_labels=args.negative_label, rescale=args.guidance_rescale or None,
                       interval=tuple(args.guidance_interval) if args.guidance_interval else None)  # fmt: skip
    cfg_options = {key: value for key, value in cfg_options.items() if value is not None}
    if cfg_options and not isinstance(guider, CFG):
        raise UserError("--negative-label, --guidance-rescale and --guidance-interval are options of plain CFG "
                        f"(--guider cfg), not of {args.guider!r}")  # fmt: skip
    return replace(guider, **cfg_options) if cfg_options else guider


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = output_path(args.out)
        pipe = load_pipeline(args.ckpt, device=pick_device(args.device), scheduler=args.sampler, shift=args.shift)
        steps = args.sampling_steps or pipe.sampling_steps
        start = time.perf_counter()
        guider = build_guider(args, pipe)
        grid = sample_scale_grid(pipe, args.scales, args.n_per_class, steps, args.seed, progress=True, guider=guider,
                                 guidance_schedule=args.guidance_schedule)  # fmt: skip
        seconds = time.perf_counter() - start
        kind = "student (1 pass per step)" if pipe.is_student else "CFG teacher"
        name = args.sampler or next(key for key, cls in SCHEDULERS.items() if type(pipe.scheduler) is cls)
        sampler = SAMPLER_NAMES.get(name, name)
        title = f"{kind} on {pipe.dataset}, {steps} {sampler} steps, seed {args.seed}"
        if args.negative_label is not None:
            title += f", negative class {args.negative_label}"
        if args.guidance_rescale:
            title += f", rescale {args.guidance_rescale:g}"
        if args.guidance_interval:
            title += ", guided for t in [{}, {}]".format(*args.guidance_interval)
        if args.guider != "cfg" or args.guidance_schedule != "constant":
            title += f", {args.guider}, {args.guidance_schedule} schedule"
        save_scale_grid(grid, args.scales, pipe.class_names, out, title=title)
    except Exception as err:  # a user's mistake: one line, exit code 2
        if (user_message(err) or "").startswith("ran out of memory"):  # the advice this command can give
            err = UserError("ran out of memory sampling the grid at once; lower --n-per-class or give fewer --scales")
        return report(err)
    print(f"wrote {out}: {grid.shape[0] * grid.shape[1] * grid.shape[2]} images in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

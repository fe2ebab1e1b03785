"""Guidance distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models", stage one).

A student eps_phi(x_t, t, y, s) takes the guidance scale s as an input and learns the teacher's
guided prediction in one pass:
    L = E_{x_0, y, t, eps, s} || eps_phi(x_t, t, y, s) - [eps_u + s (eps_c - eps_u)] ||^2,
the target from the teacher's EMA weights via `guided_noise_pred` (the function the sampler uses).
`DistillConfig.guider` and `.schedule` make the target another guidance rule (any `distillable`
Guider, including one of your own), so the student learns, say, APG's or TCFG's output in one pass.
The student is the teacher's architecture plus a guidance embedder (embeddings.Conditioning) whose
last layer is zero, and every teacher weight is copied: it starts as the teacher's conditional
prediction eps_c for s >= 1 and as eps_u at s = 0 (the label fades in over s in [0, 1]).
The student predicts what its teacher predicts (eps, v, or a rectified-flow velocity, as FLUX.1-dev's
guidance-distilled student does) and the loss draws (t, x_t) as the teacher's training did (train.training_point:
the teacher's process and, for flow, its timestep_sampling), so a flow teacher needs nothing else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .checkpoint import dataset_metadata, load_checkpoint, model_from_checkpoint, weights_fingerprint
from .checks import check_schedule
from .data import load_dataset
from .errors import UserError
from .guidance import GUIDERS, Guider, guided_noise_pred, guider_from_spec
from .guiders import scheduled_scale
from .loop import FitResult, LossFn, OptimConfig, fit, with_optim
from .models import DiffusionModel, build_model
from .recipes import recipe
from .resume import existing_run, resume_config
from .schedulers import DDPMScheduler, FlowMatchEulerScheduler, training_scheduler
from .train import training_point


@dataclass
class DistillConfig:
    s_min: float = 0.0  # the student learns every s in [s_min, s_max]
    s_max: float = 6.0
    p_s0: float = 0.2  # share of samples at exactly s = 0 (the student must learn to ignore y there)
    p_s1: float = 0.1  # ... and at exactly s = 1 (plain conditional)
    guider: str = "cfg"  # the rule the student learns, a guidance.guider_from_spec text, e.g. "apg:eta=0"
    schedule: str = "constant"  # a guidance-weight schedule over t (guiders.SCHEDULES) baked into the target
    data_dir: str = "./data"
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(batch_size=64, warmup_steps=50))


def make_student(teacher: DiffusionModel) -> DiffusionModel:
    """The teacher's architecture with a guidance embedder; all teacher weights copied; no label dropout.

    At initialisation it predicts eps_u at s = 0 and eps_c for s >= 1 (see embeddings.Conditioning)."""
    if teacher.is_student:
        raise UserError("this model is already a guidance-distilled student; distil from its teacher instead")
    student = build_model(teacher.arch, **{**teacher.config, "guidance_embed": True, "p_uncond": 0.0})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("cond.guidance.") for k in missing), missing
    return student.to(next(teacher.parameters()).device)


def sample_scales(n: int, cfg: DistillConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n,) scales: s = 0 with prob p_s0, s = 1 with prob p_s1, else uniform in [s_min, s_max]."""
    u = torch.rand(n, device=device)
    s = cfg.s_min + (cfg.s_max - cfg.s_min) * torch.rand(n, device=device)
    s = torch.where(u < cfg.p_s0, torch.zeros_like(s), s)
    return torch.where((u >= cfg.p_s0) & (u < cfg.p_s0 + cfg.p_s1), torch.ones_like(s), s)


def distillation_loss(
    teacher: DiffusionModel,
    scheduler: DDPMScheduler | FlowMatchEulerScheduler,
    cfg: DistillConfig,
    timestep_sampling: str = "uniform",
) -> LossFn:
    """MSE between the student's one-pass prediction and the teacher's guided prediction, at random (t, s), with
    (t, x_t) drawn as the teacher's process does (`timestep_sampling`: the teacher's, for a flow teacher).

    `student` may be wrapped in DDP; the teacher is not (it only runs forward, the same on every rank)."""
    guider = target_guider(cfg)

    def loss_fn(student: nn.Module, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t, x_t, _ = training_point(scheduler, x0, timestep_sampling)  # (B,), (B, C, H, W)
        s = sample_scales(x0.shape[0], cfg, x0.device)  # (B,)
        with torch.no_grad():
            target = distillation_target(teacher, x_t, t, y, s, guider, cfg.schedule, scheduler.num_train_timesteps)
        return F.mse_loss(student(x_t, t, y, guidance=s).float(), target.float())

    return loss_fn


def target_guider(cfg: DistillConfig) -> Guider:
    """The rule whose output the student learns, or a UserError for one it cannot learn.

    A student is trained on single steps at random (t, s), so it learns a rule that is a function of
    (x_t, t, y, s): CFG, APG without momentum, CFG-Zero*'s optimised scale, TCFG, and any schedule (a
    function of t). The rule says so itself (`Guider.distillable`): APG's momentum and CFG-Zero*'s
    zero-init depend on the earlier steps of a sampling run, autoguidance needs a second network."""
    if not isinstance(cfg.guider, str):
        raise UserError(f"DistillConfig.guider is a spec such as 'apg:eta=0', got {type(cfg.guider).__name__}")
    name = cfg.guider.partition(":")[0].strip()
    if name in GUIDERS and GUIDERS[name].needs_guide_model:
        raise UserError(f"cannot distil the {name!r} guider into a student: it runs a second network at every step")
    guider = guider_from_spec(cfg.guider)
    if not guider.distillable:
        raise UserError(f"cannot distil {cfg.guider!r}: it carries state across the sampling steps of a run "
                        "(APG's momentum, CFG-Zero*'s zero-init), and a student learns single steps")  # fmt: skip
    check_schedule(cfg.schedule)
    return guider


def distillation_target(
    teacher: DiffusionModel,
    x_t: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    s: torch.Tensor,
    guider: Guider,
    schedule: str,
    num_train_timesteps: int,
) -> torch.Tensor:
    """The prediction (B, C, H, W) the student model(x_t, t, y, s) learns: the teacher's guided prediction at
    the scale s (B,), through the schedule's s_t and the guider's rule (guided_noise_pred, as the sampler)."""
    s_t = scheduled_scale(s, t, num_train_timesteps, schedule)  # (B,), s itself when constant
    return guided_noise_pred(teacher, x_t, t, y, s_t, guider=guider)


def distill_student(
    teacher_path: str | Path, cfg: DistillConfig, out_dir: str | Path, if_exists: str = "error", progress: bool = True
) -> FitResult:
    """Distil OUT_DIR/student.pt from the teacher checkpoint at `teacher_path`.

    if_exists='resume' continues an existing student.pt, of the same teacher only (compared by weights)."""
    teacher_ckpt = load_checkpoint(teacher_path, kind="teacher")
    if teacher_ckpt["model_config"].get("guidance_embed"):  # trained with GFT (guidance_free.py)
        raise UserError(f"{str(teacher_path)!r} was trained with guidance-free training (objective gft): it takes "
                        "s as an input and samples in one pass already, so there is nothing to distil")  # fmt: skip
    check_guidance_range(cfg)
    target_guider(cfg)  # a guider a student cannot learn fails now, not at the first train step
    path = Path(out_dir) / "student.pt"
    resume_from = existing_run(path, "student", if_exists)
    fingerprint = weights_fingerprint(teacher_ckpt["ema"])
    if resume_from is not None:
        if resume_from.get("teacher_fingerprint") != fingerprint:
            raise UserError(
                f"--resume: {str(path)!r} was distilled from another teacher than {str(teacher_path)!r} (their "
                "weights differ); pass the teacher it started from, distil a new student with --stage distill "
                "--overwrite, or choose another --out"
            )
        cfg = resume_config(DistillConfig, resume_from, "distill_config", cfg)
    if cfg.optim.max_train_steps is None:
        arch = teacher_ckpt["model_config"]["arch"]
        cfg = with_optim(cfg, max_train_steps=recipe(teacher_ckpt["dataset"], arch)["distill_train_steps"])
    torch.manual_seed(cfg.optim.seed)
    teacher = model_from_checkpoint(teacher_ckpt, "ema").to(distributed.pick_device(cfg.optim.device))
    student = make_student(teacher.requires_grad_(False))
    with distributed.main_first():  # rank 0 downloads, the others then read its copy
        data = load_dataset(teacher_ckpt["dataset"], cfg.data_dir, train=True)
    metadata = dict(
        **dataset_metadata(teacher_ckpt), kind="student", model_config={"arch": teacher.arch, **student.config},
        guidance_range=[cfg.s_min, cfg.s_max], distill_config=asdict(cfg),
        teacher_config=teacher_ckpt["teacher_config"], teacher_fingerprint=fingerprint,
    )  # fmt: skip
    sampling = teacher_ckpt["teacher_config"].get("timestep_sampling") or "uniform"  # older teachers: uniform
    loss_fn = distillation_loss(teacher, training_scheduler(teacher_ckpt["scheduler_config"]), cfg, sampling)
    return fit(student, loss_fn, data, path, metadata, cfg.optim, resume_from, progress)


def check_guidance_range(cfg: DistillConfig) -> None:
    """The student's range of s must hold 0 <= s_min <= 1 <= s_max < inf (it always learns s = 0 and 1)."""
    if not (0 <= cfg.s_min <= 1.0 <= cfg.s_max < float("inf")):
        raise UserError(f"the guidance range [--s-min, --s-max] must satisfy 0 <= s_min <= 1 <= s_max < inf, "
                        f"got [{cfg.s_min}, {cfg.s_max}]")  # fmt: skip

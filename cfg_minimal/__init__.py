"""cfg_minimal: classifier-free guidance and guidance distillation for small diffusion models."""

from . import distributed
from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from .data import DATASETS, Dataset, load_dataset, register_dataset
from .distill import DistillConfig, distill_student, make_student
from .distributed import pick_device
from .errors import UserError
from .flow import FlowMatchEulerScheduler, FlowMatchHeunScheduler
from .guidance import CFG, Guider, GuiderState, cfg_combine, guided_noise_pred, guider_from_spec, s_to_w, w_to_s
from .guiders import APG, Autoguidance, CFGZeroStar, TangentialCFG
from .loop import OptimConfig, with_optim
from .models import ARCHITECTURES, DiffusionModel, build_model
from .sampling import Pipeline, load_pipeline, sample_loop, sample_scale_grid
from .schedulers import DDIMScheduler, DDPMScheduler
from .step_distill import StepDistillConfig, halve_sampling_steps
from .train import TeacherConfig, train_teacher

__all__ = [
    "APG", "Autoguidance", "CFG", "CFGZeroStar", "Guider", "GuiderState", "TangentialCFG", "guider_from_spec",
    "ARCHITECTURES", "DATASETS", "DDIMScheduler", "DDPMScheduler", "Dataset", "DiffusionModel", "DistillConfig",
    "FlowMatchEulerScheduler", "FlowMatchHeunScheduler",
    "OptimConfig", "Pipeline", "StepDistillConfig", "TeacherConfig", "UserError", "build_model", "cfg_combine",
    "distill_student", "distributed", "guided_noise_pred", "halve_sampling_steps", "load_checkpoint", "load_dataset",
    "load_pipeline", "make_student", "model_from_checkpoint", "pick_device", "register_dataset", "s_to_w",
    "sample_loop", "sample_scale_grid", "save_checkpoint", "train_teacher", "w_to_s", "with_optim",
]  # fmt: skip

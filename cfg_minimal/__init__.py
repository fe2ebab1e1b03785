"""cfg_minimal: classifier-free guidance and guidance distillation for small diffusion models."""

from . import distributed
from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from .data import DATASETS, load_dataset
from .errors import UserError
from .guidance import cfg_combine, guided_noise_pred, s_to_w, w_to_s
from .models import ARCHITECTURES, DiffusionModel, build_model
from .sampling import Pipeline, load_pipeline, sample_loop
from .schedulers import DDIMScheduler, DDPMScheduler
from .train import TrainConfig, train_teacher

__all__ = [
    "ARCHITECTURES", "DATASETS", "DDIMScheduler", "DDPMScheduler", "DiffusionModel", "Pipeline", "TrainConfig",
    "UserError", "build_model", "cfg_combine", "distributed", "guided_noise_pred", "load_checkpoint", "load_dataset",
    "load_pipeline", "model_from_checkpoint", "s_to_w", "sample_loop", "save_checkpoint", "train_teacher", "w_to_s",
]  # fmt: skip

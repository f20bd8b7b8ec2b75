"""distill: distil a multi-step diffusion teacher into a one-step or few-step diffusers pipeline."""

__version__ = "0.1.0"

from .conditioning import Condition
from .export import export_pipeline, load_pipeline
from .models import GaussianMixtureTeacher, MaskedAutoregressiveModel, MLPDenoiser, StudentBank
from .noise import NoiseSchedule
from .pipelines import (
           FewStepPipeline,
           HybridPipeline,
           MaskedAutoregressivePipeline,
           MultiStudentPipeline,
           OneStepPipeline,
           TextToImagePipeline,
)

__all__ = ["Condition", "FewStepPipeline", "HybridPipeline", "GaussianMixtureTeacher",
           "MaskedAutoregressiveModel", "MaskedAutoregressivePipeline", "MLPDenoiser", "MultiStudentPipeline",
           "NoiseSchedule", "OneStepPipeline", "StudentBank", "TextToImagePipeline", "export_pipeline",
           "load_pipeline", "__version__"]

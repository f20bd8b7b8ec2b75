"""distill: distil a multi-step diffusion teacher into a one-step or few-step diffusers pipeline."""

__version__ = "0.1.0"

from .export import export_pipeline, load_pipeline
from .models import GaussianMixtureTeacher, MLPDenoiser
from .noise import NoiseSchedule
from .pipelines import FewStepPipeline, OneStepPipeline

__all__ = ["FewStepPipeline", "GaussianMixtureTeacher", "MLPDenoiser", "NoiseSchedule", "OneStepPipeline",
           "export_pipeline", "load_pipeline", "__version__"]

"""diffusers pipelines for distilled students (standalone files: each travels inside exported folders)."""

from .few_step import FewStepPipeline
from .hybrid import HybridPipeline
from .mar import MaskedAutoregressivePipeline
from .multi_student import MultiStudentPipeline
from .one_step import OneStepPipeline
from .samplers import sample_ddim, sample_ddpm_ancestral, sample_meng_stochastic, trailing_timesteps, vp_grid
from .text_to_image import TextToImagePipeline

__all__ = ["FewStepPipeline", "HybridPipeline", "MaskedAutoregressivePipeline", "MultiStudentPipeline",
           "OneStepPipeline", "TextToImagePipeline", "sample_ddim", "sample_ddpm_ancestral",
           "sample_meng_stochastic", "trailing_timesteps", "vp_grid"]

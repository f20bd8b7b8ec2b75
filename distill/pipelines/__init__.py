"""diffusers pipelines for distilled students (standalone files, see DESIGN.md s5)."""

from .few_step import FewStepPipeline, sample_loop, trailing_timesteps
from .one_step import OneStepPipeline
from .text_to_image import TextToImagePipeline

__all__ = ["FewStepPipeline", "OneStepPipeline", "TextToImagePipeline", "sample_loop", "trailing_timesteps"]

"""diffusers pipelines for distilled students (standalone files, see DESIGN.md s5)."""

from .few_step import FewStepPipeline, sample_loop, trailing_timesteps
from .one_step import OneStepPipeline

__all__ = ["FewStepPipeline", "OneStepPipeline", "sample_loop", "trailing_timesteps"]

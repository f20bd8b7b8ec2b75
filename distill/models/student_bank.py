"""K networks of one architecture held as one model: the students of multi-student distillation (MSD,
Song et al. 2024, "Multi-Student Diffusion Distillation for Better One-Step Generators").

STANDALONE FILE: imports torch, diffusers and the sibling ``mlp.py`` only (both travel in exported folders).
A bank saves as one diffusers model folder (a config naming the students' class and config, one safetensors
file), so a pipeline with any number of students has a fixed set of components.
"""

from __future__ import annotations

import diffusers
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .mlp import MLPDenoiser


class StudentBank(ModelMixin, ConfigMixin):
    """``num_students`` networks of class ``student_class`` (a diffusers model or ``MLPDenoiser``) built from
    ``student_config``; ``bank(sample, timestep, student=k, **kwargs)`` runs student k."""

    @register_to_config
    def __init__(self, student_class: str, student_config: dict, num_students: int):
        super().__init__()
        cls = MLPDenoiser if student_class == "MLPDenoiser" else getattr(diffusers, student_class, None)
        if cls is None:
            raise ValueError(f"StudentBank: unknown student class {student_class!r} (a diffusers model or "
                             "MLPDenoiser).")
        config = {k: v for k, v in student_config.items() if not k.startswith("_")}
        self.students = nn.ModuleList([cls.from_config(config) for _ in range(int(num_students))])

    @classmethod
    def from_students(cls, nets) -> StudentBank:
        """A bank holding copies of ``nets`` (one architecture)."""
        first = nets[0]
        config = {k: v for k, v in first.config.items() if not k.startswith("_")}
        bank = cls(type(first).__name__, config, len(nets))
        for dst, src in zip(bank.students, nets):
            dst.load_state_dict(src.state_dict())
        return bank.to(first.device)

    def __len__(self) -> int:
        return len(self.students)

    def forward(self, sample, timestep, student: int, **kwargs):
        return self.students[student](sample, timestep=timestep, **kwargs)  # by keyword: SD3 / PixArt

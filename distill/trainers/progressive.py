"""ProgressiveDistillationTrainer (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", ICLR 2022, Algorithm 2).

Rounds N -> N/2 -> ... -> ``target_steps``. In each round the student starts as a copy of the
current teacher (round 0: the teacher's network, or for the analytic teacher an MLP fitted to it),
the optimizer is reset and the learning rate decays linearly to 0 within the round; the target is
the closed-form x-tilde of two teacher DDIM steps on the student's own grid (the teacher's second
x-prediction on the last interval; objectives.progressive). Loss: truncated SNR (default) or SNR+1.

Grids live on the discrete 1000-entry diffusers table with trailing spacing (so t = 999 is trained
and every grid is nested: the N/2 grid is every other point of the N grid; ``start_steps`` is
capped by the table). The 2- and 1-step rounds train ``final_rounds_multiplier`` times longer
(the paper trains them 100k instead of 50k updates). Each round's student is exported
to ``output_dir/rounds/steps-N`` as a FewStepPipeline with its step count and grid stored in the
pipeline config, so ``pipe()`` with no arguments samples correctly; the last is ``output_dir/pipeline``.
No EMA, as in the paper: the exported weights of a round are exactly the next round's teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..engine import DistillationTrainer, build_network
from .rounds import HalvingRounds, RoundsConfig, round_plan

if TYPE_CHECKING:
    from ..config import Config


@dataclass
class ProgressiveConfig(RoundsConfig):
    """Progressive distillation (Salimans & Ho 2022): the halving rounds and nothing else."""

    def validate(self, cfg: Config) -> None:
        self.validate_rounds(cfg, "progressive", strict=True)


class ProgressiveDistillationTrainer(HalvingRounds, DistillationTrainer):
    method = "progressive"

    @property
    def section(self):
        return self.config.progressive

    def make_plan(self) -> list[tuple[int, int]]:
        sec = self.section
        return round_plan(sec.start_steps, sec.target_steps, sec.steps_per_round, sec.final_rounds_multiplier)

    def make_student(self):
        """Round 0's student: a copy of the teacher, or a fresh network fitted to it (``self.pred`` set)."""
        cfg, t = self.config, self.teacher
        if cfg.student.arch == "copy":
            self.pred = t.prediction_type
            return build_network(cfg, t, t.sample_shape, t.num_classes)
        net = build_network(cfg, t, t.sample_shape, t.num_classes)
        self.pred = self.student_prediction()
        self.fit_to_teacher(net, self.section.init_denoiser_steps, self.pred)
        return net

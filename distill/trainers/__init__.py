"""Trainers: one method, one file, all on the DistillationTrainer loop."""

from ..engine import DistillationTrainer
from .teacher import TeacherTrainer


def trainer_class(method: str):
    """The trainer for a config's ``method:`` (the only string registry in distill)."""
    if method == "teacher":
        return TeacherTrainer
    if method == "sim":
        from .sim import ScoreImplicitMatchingTrainer

        return ScoreImplicitMatchingTrainer
    if method == "uni_instruct":
        from .uni_instruct import UniInstructTrainer

        return UniInstructTrainer
    if method == "progressive":
        from .progressive import ProgressiveDistillationTrainer

        return ProgressiveDistillationTrainer
    if method == "guided":
        from .guided import GuidedDistillationTrainer

        return GuidedDistillationTrainer
    if method == "msd":
        from .multi_student import MultiStudentTrainer

        return MultiStudentTrainer
    if method == "mar":
        from .mar import MaskedAutoregressiveTrainer

        return MaskedAutoregressiveTrainer
    raise ValueError(f"Unknown method {method!r}; choose teacher, sim, uni_instruct, progressive, guided, "
                     "msd or mar.")


__all__ = ["DistillationTrainer", "TeacherTrainer", "trainer_class"]

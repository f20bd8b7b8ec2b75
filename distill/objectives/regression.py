"""Teacher regression: a network fitted to the teacher's own prediction at noised data.

For a data sample x0, t ~ U[0, 1] and eps ~ N(0, I), x_t = alpha(t) x0 + sigma(t) eps; the loss is the
mean squared error between the network's output F(x_t, t) and the teacher's output at the same point,
converted to the network's prediction type (both read as x0 / eps predictions exactly,
Salimans & Ho 2022, sec. 4):

    L = mean | F_theta(x_t, t) - F_teacher(x_t, t) |^2

It is "start from a copy of the teacher" for a network that cannot be a copy (a smaller student, or a
teacher with no weights to copy) and the teacher score matching stage of multi-student distillation
(Song et al. 2024, sec. 3.3).
"""

from __future__ import annotations

import torch

from ..conditioning import Condition
from ..denoiser import Denoiser


def teacher_regression_loss(student: Denoiser, teacher: Denoiser, x0: torch.Tensor, cond: Condition | None,
                            generator: torch.Generator) -> torch.Tensor:
    """The loss above on the batch ``x0`` (t and eps drawn from the host ``generator``), reduced by a mean
    over values; the teacher's pass keeps no graph."""
    sched, device = teacher.schedule, x0.device
    t = torch.rand(len(x0), generator=generator, dtype=torch.float64).to(device)
    x_t = sched.add_noise(x0, torch.randn(x0.shape, generator=generator).to(device), t)
    with torch.no_grad():
        target = sched.convert(teacher.output(x_t, t, cond), x_t, t, teacher.prediction_type,
                               student.prediction_type)
    return (student.output(x_t, t, cond) - target).pow(2).mean()

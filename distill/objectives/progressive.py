"""Progressive-distillation target and loss (Salimans & Ho 2022, "Progressive Distillation for Fast
Sampling of Diffusion Models", Algorithm 2; parameterisations and loss weights: sec. 4).

Two deterministic teacher DDIM steps t -> t' -> t'' become one student step t -> t'': the target
x-tilde is the clean sample that makes a student DDIM step from z_t land exactly on the teacher's
z_t'',

    x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t),

and on the last interval (t'' = data) the teacher's second x-prediction itself (the formula is
ill-conditioned there). Loss weights: "truncated SNR" max(SNR, 1) |x^ - x~|^2 (default) or
"SNR+1" (1 + SNR) |x^ - x~|^2 (= the v-space MSE).
"""

from __future__ import annotations

import torch

from ..noise import NoiseSchedule, expand_like


@torch.no_grad()
def progressive_target(schedule: NoiseSchedule, teacher_x0, z_t: torch.Tensor, t, t1, t2) -> torch.Tensor:
    """x-tilde for student time t and teacher half-steps t1 (= t'), t2 (= t''; None = data).

    ``teacher_x0(z, t) -> x0`` is the teacher's clean prediction; t, t1, t2 are per-sample
    continuous times (t2 may hold NaN where the interval ends at the data).
    """
    x1 = teacher_x0(z_t, t)
    z1 = schedule.ddim_step(z_t, x1, t, t1)
    x2 = teacher_x0(z1, t1)
    if t2 is None:
        return x2
    t2 = torch.as_tensor(t2, dtype=torch.float64, device=z_t.device)
    last = torch.isnan(t2)
    t2_safe = torch.where(last, torch.zeros_like(t2), t2)
    z2 = schedule.ddim_step(z1, x2, t1, t2_safe)
    a_t, s_t = schedule.alpha_sigma(t, z_t)
    a2, s2 = schedule.alpha_sigma(t2_safe, z_t)
    ratio = s2 / s_t
    x_tilde = (z2 - expand_like(ratio, z_t) * z_t) / expand_like(a2 - ratio * a_t, z_t)
    return torch.where(expand_like(last, z_t).bool(), x2, x_tilde)


def progressive_loss(schedule: NoiseSchedule, x_pred: torch.Tensor, x_target: torch.Tensor, t,
                     weighting: str = "truncated_snr") -> torch.Tensor:
    """Per-sample weighted x-space MSE (unreduced)."""
    snr = schedule.snr(t).to(x_pred.device).float()
    if weighting == "truncated_snr":
        w = snr.clamp_min(1.0)
    elif weighting == "snr+1":
        w = snr + 1.0
    else:
        raise ValueError(f"loss_weighting {weighting!r} is not 'truncated_snr' or 'snr+1'.")
    mse = (x_pred.float() - x_target.float()).pow(2).reshape(x_pred.shape[0], -1).mean(1)
    return w.reshape(-1) * mse

"""The hybrid sampler's chain (Gandikota & Bau 2025, "Distilling Diversity and Control in Diffusion Models"):
its steps, deterministic DDIM or LCM-style re-noising, and the base's rows between the student's grid rows.

STANDALONE FILE: imports torch, diffusers and the sibling ``one_step.py`` / ``samplers.py`` only (copied
into exported hybrid folders with ``hybrid.py``).

Rows are ``(time input, alpha_bar)`` in order of decreasing noise, as in ``samplers.py``; the chain state is
variance-preserving, x = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps.
"""

from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import randn_tensor

from .one_step import family_alpha_sigma, family_rows, noise_family
from .samplers import ddim_step, timestep_for

STUDENT_SAMPLERS = ("ddim", "stochastic")


def sample_hybrid(model_fn, x, times, renoise, callback=None, generator=None):
    """The hybrid's chain over ``times``: at row i the clean prediction x0 = ``model_fn(x, i, t_i)``, then the
    move to row i + 1 (the last row returns x0):

    * ``renoise[i + 1]`` false: deterministic DDIM (Song et al. 2021, eq. 12, eta = 0), the noise implied
      by x0 kept;
    * ``renoise[i + 1]`` true: the step of diffusers' ``LCMScheduler`` (Luo et al. 2023, Algorithm 3, the
      multistep sampler DMD2's students run with), x0 re-noised with FRESH noise,
      x_{i+1} = sqrt(abar_{i+1}) x0 + sqrt(1 - abar_{i+1}) eps_new, eps_new drawn from ``generator`` as
      ``LCMScheduler.step`` draws it (LCM's boundary scalings, c_out = 1 and c_skip = 0 up to 1e-6 at
      t >= 50 with its timestep_scaling 10, are left out).

    ``callback({"i", "t", "x", "denoised"})`` after every step (x: the state after the step)."""
    n = len(times)
    for i in range(n):
        denoised = model_fn(x, i, times[i, 0].item())
        if i + 1 == n:
            x = denoised
        else:
            ab, ab_next = float(times[i, 1]), float(times[i + 1, 1])
            if renoise[i + 1]:
                noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=denoised.dtype)
                x = ab_next**0.5 * denoised + (1 - ab_next) ** 0.5 * noise
            else:
                x = ddim_step(x, denoised, ab**0.5, (1 - ab) ** 0.5, ab_next**0.5, (1 - ab_next) ** 0.5)
        if callback is not None:
            callback({"i": i, "t": times[i, 0].item(), "x": x, "denoised": denoised})
    return x


def base_alpha_bar(base_scheduler, alpha_bar: float) -> float:
    """The noise level a base is evaluated at for a row at ``alpha_bar``: the row's own, except where the
    base cannot reach it (alpha_bar = 0 on a VP table: its last entry; beyond an EDM base's sigma_max:
    sigma_max)."""
    family = noise_family(base_scheduler)
    if family == "vp" and alpha_bar <= 0:
        return float(base_scheduler.alphas_cumprod[-1])
    if family == "edm":
        s_max = float(base_scheduler.config.sigma_max)
        return max(alpha_bar, 1.0 / (1.0 + s_max * s_max))
    return alpha_bar


def base_substeps(base_scheduler, alpha_bar: float, alpha_bar_next: float | None,
                  m: int) -> list[list[float]]:
    """The m - 1 rows between a base row at ``alpha_bar`` and the next row (None: the data), spaced evenly
    in the base's own time input: table index (VP), c_noise = ln(sigma) / 4 (EDM), s T (flow)."""
    family = noise_family(base_scheduler)
    if family == "vp":
        b_ac = torch.as_tensor(base_scheduler.alphas_cumprod, dtype=torch.float64).cpu()
        tb = timestep_for(b_ac, alpha_bar)
        tb_next = timestep_for(b_ac, alpha_bar_next) if alpha_bar_next is not None else 0.0
        rows = []
        for j in range(1, m):
            t = round(tb - j * (tb - tb_next) / m)
            rows.append([float(t), float(b_ac[t])])
        return rows
    s0 = family_alpha_sigma(family, base_alpha_bar(base_scheduler, alpha_bar))[1]
    if alpha_bar_next is not None:
        s1 = family_alpha_sigma(family, base_alpha_bar(base_scheduler, alpha_bar_next))[1]
    else:
        s1 = float(base_scheduler.config.sigma_min) if family == "edm" else 0.0
    if family == "edm":
        sig = [math.exp(math.log(s0) - j * (math.log(s0) - math.log(s1)) / m) for j in range(1, m)]
    else:
        sig = [s0 - j * (s0 - s1) / m for j in range(1, m)]
    return family_rows(base_scheduler, sig).tolist() if sig else []


def with_base_substeps(base_scheduler, times: torch.Tensor, k: int, m: int) -> torch.Tensor:
    """The chain's rows with m - 1 base sub-steps (:func:`base_substeps`) between each of the first k rows of
    ``times`` and the next row."""
    rows = []
    for i in range(k):
        rows.append(times[i].tolist())  # the row itself: the base meets it at the matched noise level
        rows += base_substeps(base_scheduler, float(times[i, 1]),
                              float(times[i + 1, 1]) if i + 1 < len(times) else None, m)
    rows += times[k:].tolist()
    out = torch.tensor(rows, dtype=torch.float64)
    if (out[1:, 1] <= out[:-1, 1]).any():
        raise ValueError(f"num_base_substeps={m} is too fine for the base's table between these grid points; "
                         "use fewer substeps.")
    return out

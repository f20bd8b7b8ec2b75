"""Samplers: pure functions with one signature (k-diffusion style).

STANDALONE FILE: imports numpy, torch and diffusers' ``randn_tensor`` only (exported folders copy it).

    sample_x(model_fn, x, times, callback=None, generator=None) -> x

* ``times``: a float64 tensor of shape (N, 2) from :func:`vp_grid` on integer timesteps (such as
  :func:`trailing_timesteps` or a student's own grid): one row ``(timestep, alpha_bar)`` per network
  evaluation, in order of decreasing noise; sampling ends at the data (alpha_bar = 1). ``alpha_bar`` is
  the variance-preserving noise level,
  x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps, the coordinate in which two models with
  different schedules meet at a matched noise level; ``timestep`` is what the model is called with.
  Or shape (N, 3) from :func:`ddim_rows`: a third column, the alpha_bar each step goes to (diffusers'
  DDIMScheduler at any N, with either ``set_alpha_to_one``; DDIM and ancestral sampling).
* ``model_fn(x, i, timestep) -> denoised``: the clean-sample prediction x0 at row i.
* ``callback({"i", "t", "x", "denoised"})`` after every step (x: the state after the step).
* ``generator``: the torch.Generator of the stochastic samplers' fresh noise.

Samplers: deterministic DDIM (Song et al. 2021, eq. 12, eta = 0), the stochastic N-step sampler of
Meng et al. 2023 (sec. 4.2), and DDPM ancestral sampling (Ho et al. 2020, eq. 6-7; DDIM with eta = 1).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor


# Copied from distill.sampling.trailing_timesteps
def trailing_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """diffusers' trailing spacing, computed as its schedulers compute it (``np.arange``'s rounding included):
    1 -> [999], 2 -> [999, 499], 4 -> [999, 749, 499, 249]."""
    if num_inference_steps < 1 or num_inference_steps > num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, {num_train_timesteps}], got "
                         f"{num_inference_steps}.")
    grid = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_inference_steps))
    return [int(t) - 1 for t in grid]


# Copied from distill.sampling.vp_grid
def vp_grid(alphas_cumprod: torch.Tensor, timesteps) -> torch.Tensor:
    """The (timestep, alpha_bar) rows of integer ``timesteps`` on a discrete VP table."""
    ts = [int(t) for t in timesteps]
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly descending, got {ts}.")
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    return torch.tensor([[float(t), float(ac[t])] for t in ts], dtype=torch.float64)


# Copied from distill.sampling.ddim_rows
def ddim_rows(alphas_cumprod: torch.Tensor, num_inference_steps: int,
              final_alpha_cumprod: float = 1.0) -> torch.Tensor:
    """diffusers' ``DDIMScheduler`` on trailing spacing as sampler rows (timestep, alpha_bar, alpha_bar of the
    step's target): the network is called at the trailing timesteps t_i and each step goes to
    t_i - T // N (diffusers' ``prev_timestep``; the next row's timestep only when N divides T), the last one
    to ``final_alpha_cumprod`` (1 with ``set_alpha_to_one``, else alpha_bar_0: the image keeps that noise)."""
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    stride = len(ac) // num_inference_steps
    ts = trailing_timesteps(num_inference_steps, len(ac))
    target = [float(ac[t - stride]) if t >= stride else float(final_alpha_cumprod) for t in ts]
    return torch.tensor([[float(t), float(ac[t]), a] for t, a in zip(ts, target)], dtype=torch.float64)


def timestep_for(alphas_cumprod: torch.Tensor, alpha_bar: float) -> float:
    """The (fractional) training index of a VP table at noise level ``alpha_bar`` (exact on table entries;
    log-SNR interpolated between them): how a model meets another model's grid at the same noise level."""
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    hit = (ac == alpha_bar).nonzero()
    if len(hit):
        return float(hit[0, 0])
    lam = torch.log(ac / (1 - ac))  # decreasing in t
    target = torch.log(torch.tensor(alpha_bar / (1 - alpha_bar), dtype=torch.float64))
    if target >= lam[0]:
        return 0.0
    if target <= lam[-1]:
        return float(len(ac) - 1)
    hi = int((lam < target).nonzero()[0, 0])
    lo = hi - 1
    return lo + float((lam[lo] - target) / (lam[lo] - lam[hi]))


# Copied from distill.sampling.ddim_step
def ddim_step(x, denoised, alpha, sigma, alpha_next, sigma_next):
    """One DDIM step (Song et al. 2021, eq. 12, eta = 0) from coefficients (alpha, sigma) to (alpha_next,
    sigma_next): the noise implied by ``denoised`` is kept. Coefficients: floats or broadcastable tensors."""
    eps = (x - alpha * denoised) / sigma
    return alpha_next * denoised + sigma_next * eps


# Copied from distill.sampling._coefficients
def _coefficients(times: torch.Tensor, i: int):
    ab = float(times[i, 1])
    return ab, ab**0.5, (1 - ab) ** 0.5


# Copied from distill.sampling._target
def _target(times: torch.Tensor, i: int):
    """The coefficients the step from row i goes to: the third column's alpha_bar when given (diffusers'
    DDIM targets, :func:`ddim_rows`), else the next row's."""
    ab = float(times[i, 2]) if times.shape[1] == 3 else float(times[i + 1, 1])
    return ab, ab**0.5, (1 - ab) ** 0.5


# Copied from distill.sampling._chain
def _chain(model_fn, x, times, callback, step):
    """The loop every sampler shares: evaluate the model at row i, move with ``step(x, denoised, i)`` (the
    last row returns the clean prediction, or steps to its target with a third column), report to the
    callback."""
    n = len(times)
    for i in range(n):
        denoised = model_fn(x, i, times[i, 0].item())
        x = denoised if i + 1 == n and times.shape[1] == 2 else step(x, denoised, i)
        if callback is not None:
            callback({"i": i, "t": times[i, 0].item(), "x": x, "denoised": denoised})
    return x


# Copied from distill.sampling.sample_ddim
def sample_ddim(model_fn, x, times, callback=None, generator=None):
    """Deterministic DDIM on ``times``; the last step returns the clean prediction."""

    def step(x, denoised, i):
        _, a, s = _coefficients(times, i)
        _, a_next, s_next = _target(times, i)
        return ddim_step(x, denoised, a, s, a_next, s_next)

    return _chain(model_fn, x, times, callback, step)


# Copied from distill.sampling.sample_meng_stochastic
def sample_meng_stochastic(model_fn, x, times, callback=None, generator=None):
    """Meng et al. 2023, sec. 4.2: from t_i one DDIM step of twice the nominal length, to t_{i+2} (the data
    when t_{i+1} is the last grid time), then forward to t_{i+1} with the forward marginal,
    z_{i+1} = sqrt(abar_{i+1} / abar_{i+2}) z_{i+2} + sqrt(1 - abar_{i+1} / abar_{i+2}) xi.
    The last interval is deterministic, so it also costs N network evaluations. Two-column rows only."""
    if times.shape[1] != 2:
        raise ValueError("sample_meng_stochastic steps between grid rows; it takes (timestep, alpha_bar) "
                         "rows (vp_grid), not DDIM target rows (ddim_rows).")

    def step(x, denoised, i):
        _, a, s = _coefficients(times, i)
        ab_next = float(times[i + 1, 1])
        ab_k = float(times[i + 2, 1]) if i + 2 < len(times) else 1.0
        z_k = ddim_step(x, denoised, a, s, ab_k**0.5, (1 - ab_k) ** 0.5)
        noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        ratio = ab_next / ab_k
        return ratio**0.5 * z_k + max(1.0 - ratio, 0.0) ** 0.5 * noise

    return _chain(model_fn, x, times, callback, step)


def sample_ddpm_ancestral(model_fn, x, times, callback=None, generator=None, temperature=1.0):
    """Ancestral sampling from the DDPM posterior q(x_s | x_t, x0 = denoised) (Ho et al. 2020, eq. 6-7),
    i.e. DDIM with eta = 1 (Song et al. 2021, eq. 16), between consecutive grid times. ``temperature``
    scales the fresh noise of each step (MAR's sampling temperature, Li et al. 2024; 1 = the posterior)."""

    def step(x, denoised, i):
        ab, a, s = _coefficients(times, i)
        ab_next, a_next, s_next = _target(times, i)
        c = (s_next / s) * max(1.0 - ab / ab_next, 0.0) ** 0.5  # posterior std
        eps = (x - a * denoised) / s
        noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return a_next * denoised + max(s_next**2 - c**2, 0.0) ** 0.5 * eps + temperature * c * noise

    return _chain(model_fn, x, times, callback, step)

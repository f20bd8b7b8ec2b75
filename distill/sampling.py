"""Samplers on a discrete variance-preserving grid: pure functions with one signature (k-diffusion style).

    sample_x(model_fn, x, times, callback=None, generator=None) -> x

* ``times``: a float64 tensor of shape (N, 2) from :func:`vp_grid` on integer timesteps (such as
  :func:`trailing_timesteps`): one row ``(timestep, alpha_bar)`` per network evaluation, in order of
  decreasing noise; sampling ends at the data (alpha_bar = 1). ``alpha_bar`` is the variance-preserving
  noise level, x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps (Ho et al. 2020, eq. 4). Or shape
  (N, 3) from :func:`ddim_rows`: a third column, the alpha_bar each step goes to (diffusers' DDIMScheduler
  at any N, with either ``set_alpha_to_one``).
* ``model_fn(x, i, timestep) -> denoised``: the clean-sample prediction x0 at row i.
* ``callback({"i", "t", "x", "denoised"})`` after every step (x: the state after the step).
* ``generator``: the torch.Generator of the stochastic sampler's fresh noise.

Samplers: deterministic DDIM (Song et al. 2021, eq. 12, eta = 0) and the stochastic N-step sampler of
Meng et al. 2023 (sec. 4.2).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor


def trailing_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """diffusers' trailing spacing, computed as its schedulers compute it (``np.arange``'s rounding included):
    1 -> [999], 2 -> [999, 499], 4 -> [999, 749, 499, 249]."""
    if num_inference_steps < 1 or num_inference_steps > num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, {num_train_timesteps}], got "
                         f"{num_inference_steps}.")
    grid = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_inference_steps))
    return [int(t) - 1 for t in grid]


def vp_grid(alphas_cumprod: torch.Tensor, timesteps) -> torch.Tensor:
    """The (timestep, alpha_bar) rows of integer ``timesteps`` on a discrete VP table."""
    ts = [int(t) for t in timesteps]
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly descending, got {ts}.")
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    return torch.tensor([[float(t), float(ac[t])] for t in ts], dtype=torch.float64)


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


def ddim_step(x, denoised, alpha, sigma, alpha_next, sigma_next):
    """One DDIM step (Song et al. 2021, eq. 12, eta = 0) from coefficients (alpha, sigma) to (alpha_next,
    sigma_next): the noise implied by ``denoised`` is kept. Coefficients: floats or broadcastable tensors."""
    eps = (x - alpha * denoised) / sigma
    return alpha_next * denoised + sigma_next * eps


def _coefficients(times: torch.Tensor, i: int):
    ab = float(times[i, 1])
    return ab, ab**0.5, (1 - ab) ** 0.5


def _target(times: torch.Tensor, i: int):
    """The coefficients the step from row i goes to: the third column's alpha_bar when given (diffusers'
    DDIM targets, :func:`ddim_rows`), else the next row's."""
    ab = float(times[i, 2]) if times.shape[1] == 3 else float(times[i + 1, 1])
    return ab, ab**0.5, (1 - ab) ** 0.5


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


def sample_ddim(model_fn, x, times, callback=None, generator=None):
    """Deterministic DDIM on ``times``; the last step returns the clean prediction."""

    def step(x, denoised, i):
        _, a, s = _coefficients(times, i)
        _, a_next, s_next = _target(times, i)
        return ddim_step(x, denoised, a, s, a_next, s_next)

    return _chain(model_fn, x, times, callback, step)


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

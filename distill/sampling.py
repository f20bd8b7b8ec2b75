"""Samplers on a discrete variance-preserving grid: pure functions with one signature (k-diffusion style).

    sample_x(model_fn, x, times, callback=None, generator=None) -> x

* ``times``: a float64 tensor of shape (N, 2) from :func:`vp_grid` on integer timesteps (such as
  :func:`trailing_timesteps`): one row ``(timestep, alpha_bar)`` per network evaluation, in order of
  decreasing noise; sampling ends at the data (alpha_bar = 1). ``alpha_bar`` is the variance-preserving
  noise level, x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps (Ho et al. 2020, eq. 4).
* ``model_fn(x, i, timestep) -> denoised``: the clean-sample prediction x0 at row i.
* ``callback({"i", "t", "x", "denoised"})`` after every step (x: the state after the step).
* ``generator``: the torch.Generator of the stochastic sampler's fresh noise.

Samplers: deterministic DDIM (Song et al. 2021, eq. 12, eta = 0) and the stochastic N-step sampler of
Meng et al. 2023 (sec. 4.2).
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor


def trailing_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """diffusers' trailing spacing: 1 -> [999], 2 -> [999, 499], 4 -> [999, 749, 499, 249]."""
    if num_inference_steps < 1 or num_inference_steps > num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, {num_train_timesteps}], got "
                         f"{num_inference_steps}.")
    step = num_train_timesteps / num_inference_steps
    return [round(num_train_timesteps - i * step) - 1 for i in range(num_inference_steps)]


def vp_grid(alphas_cumprod: torch.Tensor, timesteps) -> torch.Tensor:
    """The (timestep, alpha_bar) rows of integer ``timesteps`` on a discrete VP table."""
    ts = [int(t) for t in timesteps]
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly descending, got {ts}.")
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    return torch.tensor([[float(t), float(ac[t])] for t in ts], dtype=torch.float64)


def ddim_step(x, denoised, alpha, sigma, alpha_next, sigma_next):
    """One DDIM step (Song et al. 2021, eq. 12, eta = 0) from coefficients (alpha, sigma) to (alpha_next,
    sigma_next): the noise implied by ``denoised`` is kept. Coefficients: floats or broadcastable tensors."""
    eps = (x - alpha * denoised) / sigma
    return alpha_next * denoised + sigma_next * eps


def _coefficients(times: torch.Tensor, i: int):
    ab = float(times[i, 1])
    return ab, ab**0.5, (1 - ab) ** 0.5


def _chain(model_fn, x, times, callback, step):
    """The loop every sampler shares: evaluate the model at row i, move with ``step(x, denoised, i)`` (the
    last row returns the clean prediction), report to the callback."""
    n = len(times)
    for i in range(n):
        denoised = model_fn(x, i, times[i, 0].item())
        x = denoised if i + 1 == n else step(x, denoised, i)
        if callback is not None:
            callback({"i": i, "t": times[i, 0].item(), "x": x, "denoised": denoised})
    return x


def sample_ddim(model_fn, x, times, callback=None, generator=None):
    """Deterministic DDIM on ``times``; the last step returns the clean prediction."""

    def step(x, denoised, i):
        _, a, s = _coefficients(times, i)
        _, a_next, s_next = _coefficients(times, i + 1)
        return ddim_step(x, denoised, a, s, a_next, s_next)

    return _chain(model_fn, x, times, callback, step)


def sample_meng_stochastic(model_fn, x, times, callback=None, generator=None):
    """Meng et al. 2023, sec. 4.2: from t_i one DDIM step of twice the nominal length, to t_{i+2} (the data
    when t_{i+1} is the last grid time), then forward to t_{i+1} with the forward marginal,
    z_{i+1} = sqrt(abar_{i+1} / abar_{i+2}) z_{i+2} + sqrt(1 - abar_{i+1} / abar_{i+2}) xi.
    The last interval is deterministic, so it also costs N network evaluations."""

    def step(x, denoised, i):
        _, a, s = _coefficients(times, i)
        ab_next = float(times[i + 1, 1])
        ab_k = float(times[i + 2, 1]) if i + 2 < len(times) else 1.0
        z_k = ddim_step(x, denoised, a, s, ab_k**0.5, (1 - ab_k) ** 0.5)
        noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        ratio = ab_next / ab_k
        return ratio**0.5 * z_k + max(1.0 - ratio, 0.0) ** 0.5 * noise

    return _chain(model_fn, x, times, callback, step)

"""DiSA step annealing: fewer diffusion-head steps as autoregressive generation advances.

STANDALONE FILE: Python's ``math`` only (copied into exported pipeline folders).

Zhao et al. 2025, "DiSA: Diffusion Step Annealing in Autoregressive Image Generation", sec. 3, and
their reference implementation (``MAR_DiSA/models/diffloss.py``, ``DiffLoss.sample``). At AR iteration
k of K the per-token diffusion head samples with T_k steps, from ``upper`` = T_hi at the start to
``lower`` = T_lo at the end; with p = k / (K - 1) and D = T_hi - T_lo:

    linear     T_k = T_lo + int((K - 1 - k) / (K - 1) * D)          = T_lo + floor((1 - p) D)
    cosine     T_k = T_lo + int((cos(pi k / (K - 1)) + 1) / 2 * D)   = T_lo + floor((1 + cos(pi p)) D / 2)
    two-stage  T_k = T_hi if k < (K - 1) / 2 else T_lo
    constant   T_k = T_lo                                             (the "just use few steps" baseline)

``int`` truncates toward zero and the arithmetic is done in the reference's order, so the step
counts are those of the reference code bit for bit. K = 1 (one iteration generates every token)
divides by zero in the reference; here the single iteration is the first one (p = 0): T_hi for
linear, cosine and two-stage, T_lo for constant. A callable ``schedule(k, K, upper, lower) -> int``
may replace the named ones.
"""

from __future__ import annotations

import math

SCHEDULES = ("linear", "cosine", "two-stage", "constant")


def annealed_steps(k: int, num_iter: int, upper: int, lower: int, schedule="linear") -> int:
    """T_k, the diffusion steps of AR iteration ``k`` (0-based) of ``num_iter``."""
    if not 1 <= lower <= upper:
        raise ValueError(f"diffusion step bounds must satisfy 1 <= lower <= upper, got lower={lower}, "
                         f"upper={upper}.")
    if not 0 <= k < num_iter:
        raise ValueError(f"AR iteration k={k} is outside [0, {num_iter}).")
    if callable(schedule):
        steps = int(schedule(k, num_iter, upper, lower))
        if steps < 1:
            raise ValueError(f"the step schedule gave {steps} diffusion steps at iteration {k}; it must give "
                             ">= 1.")
        return steps
    span, last = upper - lower, num_iter - 1
    if schedule == "constant":
        return lower
    if last == 0:  # K = 1: the one iteration is the first (p = 0)
        return upper
    if schedule == "linear":
        return lower + int((last - k) / last * span)
    if schedule == "cosine":
        return lower + int((math.cos(math.pi * k / last) + 1) / 2 * span)
    if schedule == "two-stage":
        return upper if k < last / 2 else lower
    raise ValueError(f"step_schedule {schedule!r} is not one of {', '.join(SCHEDULES)} (or a callable).")


def step_schedule(num_iter: int, upper: int, lower: int, schedule="linear") -> list[int]:
    """[T_0, ..., T_{K-1}] for ``num_iter`` AR iterations."""
    if num_iter < 1:
        raise ValueError(f"num_iter must be >= 1, got {num_iter}.")
    return [annealed_steps(k, num_iter, upper, lower, schedule) for k in range(num_iter)]


def head_timesteps(num_steps: int, num_train_timesteps: int = 1000, max_timestep: int = 950) -> list[int]:
    """The descending training indices a ``num_steps``-step head sampler visits: ADM's ``space_timesteps``
    (an accumulated stride (T - 1) / (n - 1) from 0, Python ``round``), then every index clipped to
    ``max_timestep`` and duplicates merged. DiSA's sampler clips at 950 (its ``clip_timesteps`` default), so
    near-1000 indices collapse and n = 50 visits 48 distinct indices; MAR's own sampler (and DiSA's
    "default" one) does not clip: ``max_timestep = T - 1``. One step samples at ``max_timestep`` (ADM's
    spacing would give index 0 alone)."""
    if num_steps < 1 or num_steps > num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}.")
    if num_steps == 1:
        return [max_timestep]
    stride, cur, taken = (num_train_timesteps - 1) / (num_steps - 1), 0.0, []
    for _ in range(num_steps):
        taken.append(min(round(cur), max_timestep))
        cur += stride
    return sorted(set(taken), reverse=True)

"""The diffusion-head loss of masked autoregressive generation (Li et al. 2024, eq. 2), with the learned
variance of Nichol & Dhariwal 2021 (improved DDPM) that MAR's and DiSA's reference heads train.

For each masked token x_0 with its conditioning vector z, t uniform over the T = 1000 indices of the
schedule and eps ~ N(0, I), x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps:

    L_simple = || eps - eps_theta(x_t | t, z) ||^2                                  (MAR eq. 2)

A head that also outputs v_raw (``learn_sigma``) is trained with the hybrid loss (Nichol & Dhariwal
2021, eq. 16, lambda = 0.001):

    L_hybrid = L_simple + lambda L_vlb,   L_vlb = sum_t L_t ~ T L_t for one uniform t,

    L_t = KL( q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t) )        for t > 0,
    L_0 = -log p_theta(x_0 | x_1)  (ADM's decoder: the Gaussian's mass on x_0's bin of width 2/255),

in bits per dimension, p_theta's mean built from sg(eps_theta) (eq. 16's stop-gradient: L_vlb trains
the variance only) and its variance the learned range (eq. 15)

    log Sigma_theta = v log beta_t + (1 - v) log beta~_t,   v = (v_raw + 1) / 2,

with beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t) the posterior variance (beta~_0 = 0 is replaced by
beta~_1, as ADM clips it). lambda T = 1 for T = 1000: ADM's code adds L_t to L_simple unscaled.
"""

from __future__ import annotations

import math

import torch

VLB_WEIGHT = 0.001  # lambda of Nichol & Dhariwal 2021, eq. 16


def posterior_coefficients(alphas_cumprod: torch.Tensor):
    """(beta_t, coef_x0_t, coef_xt_t, log beta~_t clipped) of the chain whose noise levels are
    ``alphas_cumprod`` (ascending t; abar_{-1} = 1). On a subset of a schedule's indices this is ADM's
    respaced chain (SpacedDiffusion: beta_j = 1 - abar_{t_j} / abar_{t_{j-1}}). The posterior mean is
    mu~_t = coef_x0 x_0 + coef_xt x_t (Ho et al. 2020, eq. 7); float64."""
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    prev = torch.cat([ac.new_ones(1), ac[:-1]])
    beta = 1 - ac / prev
    coef_x0 = beta * prev.sqrt() / (1 - ac)
    coef_xt = (1 - prev) * (1 - beta).sqrt() / (1 - ac)
    var = beta * (1 - prev) / (1 - ac)
    clipped = torch.cat([var[1:2], var[1:]]) if len(var) > 1 else var
    return beta, coef_x0, coef_xt, clipped.log()


def learned_range_log_variance(v_raw: torch.Tensor, log_beta, log_beta_tilde) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 15: log Sigma = v log beta + (1 - v) log beta~, v = (v_raw + 1) / 2."""
    v = (v_raw + 1) / 2
    return v * log_beta + (1 - v) * log_beta_tilde


def gaussian_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def discretized_gaussian_log_likelihood(x, mean, log_scale) -> torch.Tensor:
    """log of N(mean, e^{2 log_scale})'s mass on x's bin of ADM's decoder (Ho et al. 2020, eq. 13): data in
    [-1, 1] on 256 levels, bins [x - 1/255, x + 1/255], the outer two open to -inf / +inf; per element,
    nats. The normal CDF is exact (ADM uses a tanh approximation of it)."""
    inv = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv * (x - mean + 1 / 255))
    cdf_min = torch.special.ndtr(inv * (x - mean - 1 / 255))
    mass = torch.where(x < -0.999, cdf_plus, torch.where(x > 0.999, 1 - cdf_min, cdf_plus - cdf_min))
    return mass.clamp(min=1e-12).log()


def vlb_term(eps_pred, v_raw, x0, x_t, t, alphas_cumprod) -> torch.Tensor:
    """L_t in bits per dimension (KL for t > 0, decoder NLL for t = 0) of p_theta with mean from ``eps_pred``
    and the learned-range variance of ``v_raw``, on the chain ``alphas_cumprod``; per row."""
    beta, c0, ct, log_tilde = (c.to(x_t.device)[t].float()[:, None]
                               for c in posterior_coefficients(alphas_cumprod))
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).to(x_t.device)[t].float()[:, None]
    x0_pred = (x_t - (1 - abar).sqrt() * eps_pred) / abar.sqrt()
    mean_p = c0 * x0_pred + ct * x_t
    logvar_p = learned_range_log_variance(v_raw, beta.log(), log_tilde)
    kl = gaussian_kl(c0 * x0 + ct * x_t, log_tilde, mean_p, logvar_p).mean(dim=1)
    nll = -discretized_gaussian_log_likelihood(x0, mean_p, 0.5 * logvar_p).mean(dim=1)
    return torch.where(t == 0, nll, kl) / math.log(2.0)


def diffusion_head_loss(head, tokens: torch.Tensor, cond: torch.Tensor, alphas_cumprod: torch.Tensor,
                        generator: torch.Generator, learn_sigma: bool = False) -> torch.Tensor:
    """Per-token loss (unreduced, float32) of ``head(x_t, t, z)`` on ``tokens`` (N, D) with conditioning
    vectors ``cond`` (N, C): L_simple, or with ``learn_sigma`` (head output (N, 2D): eps, v_raw) L_simple +
    lambda T L_t; t and eps are drawn from ``generator`` on its device."""
    n, d, device = len(tokens), tokens.shape[1], tokens.device
    t = torch.randint(0, len(alphas_cumprod), (n,), generator=generator, device=generator.device).to(device)
    eps = torch.randn(*tokens.shape, generator=generator, device=generator.device).to(device)
    abar = alphas_cumprod[t].to(tokens.dtype)[:, None]
    x_t = abar.sqrt() * tokens + (1 - abar).sqrt() * eps
    out = head(x_t, t, cond).float()
    simple = (out[:, :d] - eps).pow(2).mean(dim=1)
    if not learn_sigma:
        return simple
    vlb = vlb_term(out[:, :d].detach(), out[:, d:], tokens.float(), x_t.float(), t, alphas_cumprod)
    return simple + VLB_WEIGHT * len(alphas_cumprod) * vlb

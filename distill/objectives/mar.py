"""The diffusion-head loss of masked autoregressive generation (Li et al. 2024, eq. 2).

For each masked token x_i with its conditioning vector z_i, t uniform over the schedule's indices and
eps ~ N(0, I):

    L(z_i, x_i) = E_{eps, t} || eps - eps_theta( sqrt(abar_t) x_i + sqrt(1 - abar_t) eps | t, z_i ) ||^2
"""

from __future__ import annotations

import torch


def diffusion_head_loss(head, tokens: torch.Tensor, cond: torch.Tensor, alphas_cumprod: torch.Tensor,
                        generator: torch.Generator) -> torch.Tensor:
    """Per-token loss (unreduced, float32) of ``head(x_t, t, z)`` on ``tokens`` (N, D) with conditioning
    vectors ``cond`` (N, C); t and eps are drawn from ``generator`` on its device."""
    n, device = len(tokens), tokens.device
    t = torch.randint(0, len(alphas_cumprod), (n,), generator=generator, device=generator.device).to(device)
    eps = torch.randn(*tokens.shape, generator=generator, device=generator.device).to(device)
    abar = alphas_cumprod[t].to(tokens.dtype)[:, None]
    x_t = abar.sqrt() * tokens + (1 - abar).sqrt() * eps
    return (head(x_t, t, cond).float() - eps).pow(2).mean(dim=1)

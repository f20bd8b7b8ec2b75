"""Masked-autoregressive sampling with DiSA step annealing.

STANDALONE FILE: imports torch, diffusers and the sibling ``annealing.py`` / ``one_step.py`` /
``samplers.py`` only (exported folders carry them).

MAR sampling (Li et al. 2024, sec. 3.3; the reference ``sample_tokens``): tokens start unknown; at AR
iteration k of K the transformer conditions on the known tokens, the number still unknown afterwards
is floor(L cos(pi/2 (k + 1) / K)) (MaskGIT's cosine; at least one token is generated per iteration, all
the rest at the last), the tokens to generate are taken in a random order per image, and each is
sampled by the diffusion head with DDPM ancestral steps (Ho et al. 2020, eq. 6-7) on ADM's respaced chain
(the betas recomputed from abar at the kept indices), whose fresh noise is scaled by ``temperature``. A
head with ``learn_sigma`` (MAR's and DiSA's reference) samples with its learned-range variance
(Nichol & Dhariwal 2021, eq. 15) log Sigma = v log beta_j + (1 - v) log beta~_j on that chain; an
epsilon-only head with the fixed posterior variance beta~_j. Classifier-free guidance (Ho & Salimans 2022)
mixes the head's conditional and null-class predictions, eps_u + s_k (eps_c - eps_u) (the variance is the
conditional one's), with MAR's linear schedule s_k = 1 + (s - 1) (L - max(m_k, 1)) / L (m_k: tokens still
unknown after iteration k; the reference's mask_len is at least 1, also at the last iteration).

DiSA (Zhao et al. 2025): ``step_schedule`` ("linear", "cosine", "two-stage", "constant" or a callable)
gives iteration k T_k head steps, from ``diffusion_steps`` down to ``min_diffusion_steps`` (see
``annealing.py``), on DiSA's head grids clipped at index 950; ``step_schedule=None`` uses
``diffusion_steps`` at every iteration on the full respaced range (MAR's sampler, whose default is 100).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .annealing import head_timesteps
from .annealing import step_schedule as annealed_steps
from .one_step import ExportedPipelineMixin, classifier_free_guidance, default_labels, device_dtype, to_output
from .samplers import sample_ddpm_ancestral, vp_grid


# Copied from distill.objectives.mar.posterior_coefficients
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


# Copied from distill.objectives.mar.learned_range_log_variance
def learned_range_log_variance(v_raw: torch.Tensor, log_beta, log_beta_tilde) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 15: log Sigma = v log beta + (1 - v) log beta~, v = (v_raw + 1) / 2."""
    v = (v_raw + 1) / 2
    return v * log_beta + (1 - v) * log_beta_tilde


def sample_learned_range(model_fn, x, times, generator=None, temperature=1.0):
    """ADM's ancestral sampler with a learned-range variance (Nichol & Dhariwal 2021, eq. 15) on the chain
    of the ``times`` rows (:func:`vp_grid`, descending): ``model_fn(x, i, timestep) -> (denoised, v_raw)``;
    x <- mu~(x, denoised) + temperature Sigma^(1/2) noise; the last row returns the clean prediction (its
    posterior mean: abar_{-1} = 1)."""
    n = len(times)
    beta, coef_x0, coef_xt, log_tilde = posterior_coefficients(times[:, 1].flip(0))
    for i in range(n):
        denoised, v_raw = model_fn(x, i, times[i, 0].item())
        if i + 1 == n:
            return denoised
        j = n - 1 - i  # the row's index in the ascending chain
        mean = float(coef_x0[j]) * denoised + float(coef_xt[j]) * x
        log_var = learned_range_log_variance(v_raw, float(beta[j].log()), float(log_tilde[j]))
        noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = mean + temperature * torch.exp(0.5 * log_var) * noise
    return x




@dataclass
class MaskedAutoregressiveOutput(BaseOutput):
    """images; the head steps T_k of each AR iteration; the head evaluations (network calls) in all."""

    images: list | np.ndarray | torch.Tensor
    diffusion_steps: list
    head_evaluations: int


def unknown_after(k: int, num_iter: int, seq_len: int, unknown: int) -> int:
    """Tokens still unknown after AR iteration k (MAR / MaskGIT cosine masking schedule)."""
    if k == num_iter - 1:
        return 0
    target = math.floor(seq_len * math.cos(math.pi / 2 * (k + 1) / num_iter))
    return max(1, min(unknown - 1, target))


def random_orders(batch_size: int, seq_len: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """A random generation order per image (B, L), drawn on the generator's device (a CUDA generator with a
    CPU draw raises), then moved to ``device``."""
    draw_on = generator.device if generator is not None else device
    draws = torch.rand(batch_size, seq_len, generator=generator, device=draw_on)
    return torch.argsort(draws, dim=1).to(device)


class MaskedAutoregressivePipeline(ExportedPipelineMixin, DiffusionPipeline):
    """Sample a :class:`MaskedAutoregressiveModel` (``mar``) on the VP ``scheduler`` it was trained with."""

    model_cpu_offload_seq = "mar"

    def __init__(self, mar, scheduler):
        super().__init__()
        self.register_modules(mar=mar, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels=None, num_iter: int = 16, step_schedule=None,
                 diffusion_steps: int = 50, min_diffusion_steps: int = 5, temperature: float = 1.0,
                 guidance_scale: float = 1.0, generator: torch.Generator | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        model = self.mar
        device, dtype = device_dtype(self, model)
        seq_len, dim = model.seq_len, model.token_dim
        learn_sigma = getattr(model.config, "learn_sigma", False)
        if not 1 <= num_iter <= seq_len:
            raise ValueError(f"num_iter={num_iter}: this model has {seq_len} tokens; use 1 to {seq_len} "
                             "iterations.")
        if guidance_scale != 1.0 and not model.config.num_classes:
            raise ValueError(f"guidance_scale={guidance_scale}: this model is unconditional; use 1.0.")
        steps = ([int(diffusion_steps)] * num_iter if step_schedule is None else
                 annealed_steps(num_iter, int(diffusion_steps), int(min_diffusion_steps), step_schedule))
        ac = self.scheduler.alphas_cumprod
        # MAR's sampler: the full respaced range; DiSA's: indices clipped at 950
        max_timestep = len(ac) - 1 if step_schedule is None else 950
        labels = default_labels(batch_size, model.config.num_classes, class_labels, device)
        null = torch.full((batch_size,), model.config.num_classes, device=device, dtype=torch.long)
        # rank[b, i]: position of token i in image b's generation order
        rank = torch.argsort(random_orders(batch_size, seq_len, generator, device), dim=1)
        tokens = torch.zeros(batch_size, seq_len, dim, device=device, dtype=dtype)
        mask = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
        guided = guidance_scale != 1.0
        evaluations = 0
        for k in self.progress_bar(range(num_iter)):
            z = model.encode(tokens, mask, labels)
            z_null = model.encode(tokens, mask, null) if guided else None
            left = unknown_after(k, num_iter, seq_len, int(mask[0].sum()))
            mask_next = rank < left  # the first `left` tokens of each order stay unknown
            new = mask & ~mask_next
            scale = 1 + (guidance_scale - 1) * (seq_len - max(left, 1)) / seq_len
            cond = z[new] if not guided else torch.cat([z[new], z_null[new]])
            grid = vp_grid(ac, head_timesteps(steps[k], len(ac), max_timestep))
            x = randn_tensor((int(new.sum()), dim), generator=generator, device=device, dtype=dtype)

            def predict(x_t, i, timestep, cond=cond, grid=grid, scale=scale):
                """(denoised, v_raw of the conditional rows or None) at row i of the head's grid."""
                ab = float(grid[i, 1])
                x_in = torch.cat([x_t, x_t]) if guided else x_t
                out = model(x_in, torch.full((len(x_in),), timestep, device=device), cond)
                eps, v_raw = out[:, :dim], (out[:len(x_t), dim:] if learn_sigma else None)
                if guided:
                    eps_c, eps_u = eps.chunk(2)
                    eps = classifier_free_guidance(eps_c, eps_u, scale)
                return (x_t - (1 - ab) ** 0.5 * eps) / ab**0.5, v_raw

            if learn_sigma:
                tokens[new] = sample_learned_range(predict, x, grid, generator=generator,
                                                   temperature=temperature)
            else:
                tokens[new] = sample_ddpm_ancestral(lambda *a, predict=predict: predict(*a)[0], x, grid,
                                                    generator=generator, temperature=temperature)
            evaluations += len(grid)
            mask = mask_next
        images = to_output(model.unpatchify(tokens).float(), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, steps, evaluations)
        return MaskedAutoregressiveOutput(images=images, diffusion_steps=steps, head_evaluations=evaluations)

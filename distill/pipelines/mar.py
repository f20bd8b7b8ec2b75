"""Masked-autoregressive sampling with DiSA step annealing.

STANDALONE FILE: imports torch, diffusers and the sibling ``annealing.py`` / ``one_step.py`` /
``samplers.py`` only (exported folders carry them).

MAR sampling (Li et al. 2024, sec. 3.3; the reference ``sample_tokens``): tokens start unknown; at AR
iteration k of K the transformer conditions on the known tokens, the number still unknown afterwards
is floor(L cos(pi/2 (k + 1) / K)) (MaskGIT's cosine; at least one token is generated per iteration, all
the rest at the last), the tokens to generate are taken in a random order per image, and each is
sampled by the diffusion head with DDPM ancestral steps (Ho et al. 2020, eq. 6-7) whose fresh noise is
scaled by ``temperature``. Classifier-free guidance (Ho & Salimans 2022) mixes the head's conditional
and null-class predictions, eps_u + s_k (eps_c - eps_u), with MAR's linear schedule
s_k = 1 + (s - 1) (L - m_k) / L (m_k: tokens still unknown after iteration k).

DiSA (Zhao et al. 2025): ``step_schedule`` ("linear", "cosine", "two-stage", "constant" or a callable)
gives iteration k T_k head steps, from ``diffusion_steps`` down to ``min_diffusion_steps`` (see
``annealing.py``); ``step_schedule=None`` uses ``diffusion_steps`` at every iteration (MAR's sampler).
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
        if not 1 <= num_iter <= seq_len:
            raise ValueError(f"num_iter={num_iter}: this model has {seq_len} tokens; use 1 to {seq_len} "
                             "iterations.")
        if guidance_scale != 1.0 and not model.config.num_classes:
            raise ValueError(f"guidance_scale={guidance_scale}: this model is unconditional; use 1.0.")
        steps = ([int(diffusion_steps)] * num_iter if step_schedule is None else
                 annealed_steps(num_iter, int(diffusion_steps), int(min_diffusion_steps), step_schedule))
        labels = default_labels(batch_size, model.config.num_classes, class_labels, device)
        null = torch.full((batch_size,), model.config.num_classes, device=device, dtype=torch.long)
        orders = torch.argsort(torch.rand(batch_size, seq_len, generator=generator), dim=1).to(device)
        rank = torch.argsort(orders, dim=1)  # rank[b, i]: position of token i in image b's generation order
        tokens = torch.zeros(batch_size, seq_len, dim, device=device, dtype=dtype)
        mask = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
        ac = self.scheduler.alphas_cumprod
        guided = guidance_scale != 1.0
        evaluations = 0
        for k in self.progress_bar(range(num_iter)):
            z = model.encode(tokens, mask, labels)
            z_null = model.encode(tokens, mask, null) if guided else None
            left = unknown_after(k, num_iter, seq_len, int(mask[0].sum()))
            mask_next = rank < left  # the first `left` tokens of each order stay unknown
            new = mask & ~mask_next
            scale = 1 + (guidance_scale - 1) * (seq_len - left) / seq_len
            cond = z[new] if not guided else torch.cat([z[new], z_null[new]])
            grid = vp_grid(ac, head_timesteps(steps[k], len(ac)))
            x = randn_tensor((int(new.sum()), dim), generator=generator, device=device, dtype=dtype)

            def denoise(x_t, i, timestep, cond=cond, grid=grid, scale=scale):
                ab = float(grid[i, 1])
                x_in = torch.cat([x_t, x_t]) if guided else x_t
                eps = model(x_in, torch.full((len(x_in),), timestep, device=device), cond)
                if guided:
                    eps_c, eps_u = eps.chunk(2)
                    eps = classifier_free_guidance(eps_c, eps_u, scale)
                return (x_t - (1 - ab) ** 0.5 * eps) / ab**0.5

            tokens[new] = sample_ddpm_ancestral(denoise, x, grid, generator=generator,
                                                temperature=temperature)
            evaluations += len(grid)
            mask = mask_next
        images = to_output(model.unpatchify(tokens).float(), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, steps, evaluations)
        return MaskedAutoregressiveOutput(images=images, diffusion_steps=steps, head_evaluations=evaluations)


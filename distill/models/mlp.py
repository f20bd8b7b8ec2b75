"""MLP denoiser / generator for low-dimensional data (2-D toys, flattened small images).

STANDALONE FILE: imports torch and diffusers only. It is copied into exported pipeline folders so
that ``DiffusionPipeline.from_pretrained(path, trust_remote_code=True)`` works without distill.

The network maps ``(x_t, timestep, class_label) -> output`` with the same call convention as
diffusers' ``UNet2DModel`` (``model(sample, timestep, class_labels=None).sample``), so it can be
used as a teacher, a fake score, or a one-step generator.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017; DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
                      / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class MLPDenoiser(ModelMixin, ConfigMixin):
    """Residual MLP with sinusoidal time embedding and an optional class embedding.

    Args:
        data_dim: flattened data dimension (2 for 2-D toys).
        hidden: width of the hidden layers.
        num_layers: number of residual blocks.
        time_embed_dim: width of the time / class embedding.
        num_class_embeds: number of class embeddings (including a null class for CFG), or None.
        sample_shape: optional shape to reshape the output to (e.g. [1, 8, 8]); inputs of that
            shape are flattened on the way in.
        guidance_embed_dim: width of the sinusoidal embedding of the guidance weight w (guided
            distillation, Meng et al. 2023 sec. 4.1), or None. The w branch ends in a zero-initialised
            layer, so a fresh w-conditioned model equals the plain conditional model; ``w = 0`` (the
            default input) is the conditional model, diffusers' ``guidance_scale = 1 + w``.
        time_scale: the time input is embedded as ``time_scale * timestep``. 1 for VP indices (0..999) and
            flow times (sigma T); EDM's c_noise = ln(sigma) / 4 spans only about [-1.6, 1.1], where a
            sinusoidal embedding of periods up to 10^4 is nearly constant, so an EDM student stretches it
            onto a range of about 1000.
    """

    @register_to_config
    def __init__(self, data_dim: int = 2, hidden: int = 256, num_layers: int = 3, time_embed_dim: int = 128,
                 num_class_embeds: int | None = None, sample_shape: list | None = None,
                 guidance_embed_dim: int | None = None, time_scale: float = 1.0):
        super().__init__()
        self.time_proj = nn.Sequential(nn.Linear(time_embed_dim, hidden), nn.SiLU(),
                                       nn.Linear(hidden, hidden))
        self.class_embedding = nn.Embedding(num_class_embeds, hidden) if num_class_embeds else None
        self.guidance_proj = None
        if guidance_embed_dim:
            self.guidance_proj = nn.Sequential(nn.Linear(guidance_embed_dim, hidden), nn.SiLU(),
                                               nn.Linear(hidden, hidden))
            nn.init.zeros_(self.guidance_proj[-1].weight)
            nn.init.zeros_(self.guidance_proj[-1].bias)
        self.inp = nn.Linear(data_dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(num_layers)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, data_dim))

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                return_dict: bool = True, guidance_weight: torch.Tensor | None = None):
        batch = sample.shape[0]
        x = sample.reshape(batch, -1)
        t = torch.as_tensor(timestep, device=x.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if self.config.time_scale != 1.0:
            t = t * self.config.time_scale
        emb = self.time_proj(timestep_embedding(t, self.config.time_embed_dim).to(x.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("This MLPDenoiser is class-conditional: pass class_labels.")
            emb = emb + self.class_embedding(class_labels.long())
        if self.guidance_proj is not None:
            w = torch.zeros(batch, device=x.device) if guidance_weight is None else torch.as_tensor(
                guidance_weight, device=x.device).float().expand(batch)
            emb = emb + self.guidance_proj(
                timestep_embedding(1000.0 * w, self.config.guidance_embed_dim).to(x.dtype))
        elif guidance_weight is not None:
            raise ValueError("This MLPDenoiser has no guidance input (guidance_embed_dim is None).")
        h = self.inp(x) + emb
        for block in self.blocks:
            h = h + block(h + emb)
        out = self.out(h).reshape(sample.shape)
        if not return_dict:
            return (out,)
        return UNet2DOutput(sample=out)

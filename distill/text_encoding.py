"""Text conditioning and latent decoding of Stable-Diffusion-format teachers.

* :func:`encode_prompt`: as diffusers' StableDiffusionPipeline (last hidden state of CLIPTextModel) and
  StableDiffusionXLPipeline (penultimate hidden states of both encoders concatenated, pooled output of
  the second; Podell et al. 2023, sec. 2.1);
* :func:`sdxl_time_ids`: SDXL's size and crop conditioning (Podell et al. 2023, sec. 2.2);
* :func:`latents_to_images`: the VAE decoder of latent diffusion (Rombach et al. 2022, sec. 3);
* :func:`guidance_embedding`: the guidance weight w of guided distillation (Meng et al. 2023) as a
  sinusoidal embedding (Vaswani et al. 2017, sec. 3.5), as diffusers' LatentConsistencyModelPipeline.
"""

from __future__ import annotations

import math

import torch


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of 1000 w (VDM; diffusers'
    ``LatentConsistencyModelPipeline.get_guidance_scale_embedding``)."""
    w = w.float().reshape(-1) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device)
                      * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def encode_prompt(tokenizers, text_encoders, prompts: list[str],
                  device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(embeds (B, L, D), pooled (B, D') or None) of ``prompts``, as diffusers' SD / SDXL pipelines do."""
    sdxl = len(text_encoders) > 1
    embeds, pooled = [], None
    for tok, enc in zip(tokenizers, text_encoders):
        ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        out = enc(ids, output_hidden_states=sdxl)
        if sdxl:
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds
                pooled = out[0]
            embeds.append(out.hidden_states[-2])
        else:
            embeds.append(out[0])
    return torch.cat(embeds, dim=-1), pooled


def sdxl_time_ids(height: int, width: int, batch: int, device) -> torch.Tensor:
    """SDXL's added time ids (original size, crop top-left, target size) for unconditioned crops."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32,
                        device=device).expand(batch, 6)


def latents_to_images(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode of model-space latents (undoing scaling_factor, shift_factor, latents_mean/std) ->
    [-1, 1]."""
    cfg = vae.config
    z = latents.to(vae.dtype)
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        mean = torch.tensor(cfg.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
        z = z * std / cfg.scaling_factor + mean
    else:
        z = z / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
    return vae.decode(z).sample

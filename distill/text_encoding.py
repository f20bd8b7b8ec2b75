"""Text conditioning and latent decoding of Stable-Diffusion-format teachers.

* :func:`encode_prompt`: as diffusers' StableDiffusionPipeline (last hidden state of CLIPTextModel) and
  StableDiffusionXLPipeline (penultimate hidden states of both encoders concatenated, pooled output of
  the second; Podell et al. 2023, sec. 2.1);
* :func:`encode_prompt_sd3`: as diffusers' StableDiffusion3Pipeline (CLIP-L, CLIP-G and T5, Esser et al.
  2024, sec. 5.1); :func:`encode_prompt_flux`: as diffusers' FluxPipeline (CLIP-L pooled, T5);
  :func:`encode_prompt_t5`: as diffusers' PixArtSigmaPipeline (T5 with its attention mask);
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


def encode_prompt_sd3(tokenizers, text_encoders, prompts: list[str], device, joint_attention_dim: int,
                      max_sequence_length: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds (B, 77 + L_T5, D), pooled (B, D_L + D_G)) of ``prompts`` as diffusers'
    StableDiffusion3Pipeline encodes them (Esser et al. 2024, sec. 5.1): the penultimate hidden states of
    CLIP-L and CLIP-G concatenated on features and zero-padded to the T5 width, followed on the sequence
    axis by T5-XXL's last hidden state (``max_sequence_length`` tokens; zeros of ``joint_attention_dim``
    when the folder has no T5); pooled: both CLIP projections concatenated."""
    clip_embeds, pooled = [], []
    for tok, enc in zip(tokenizers[:2], text_encoders[:2]):
        ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        out = enc(ids, output_hidden_states=True)
        pooled.append(out[0])
        clip_embeds.append(out.hidden_states[-2].to(text_encoders[0].dtype))
    clip = torch.cat(clip_embeds, dim=-1)
    if len(text_encoders) > 2:
        ids = tokenizers[2](list(prompts), padding="max_length", max_length=max_sequence_length,
                            truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
        t5 = text_encoders[2](ids.to(device))[0]
    else:
        t5 = torch.zeros(len(prompts), max_sequence_length, joint_attention_dim, device=device,
                         dtype=clip.dtype)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)


def encode_prompt_flux(tokenizers, text_encoders, prompts: list[str], device,
                       max_sequence_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds (B, L_T5, D), pooled (B, D_L)) of ``prompts`` as diffusers' FluxPipeline encodes them: T5's
    last hidden state (``max_sequence_length`` tokens) and CLIP-L's pooled output."""
    tok, enc = tokenizers[0], text_encoders[0]
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    pooled = enc(ids.to(device), output_hidden_states=False).pooler_output.to(enc.dtype)
    ids = tokenizers[1](list(prompts), padding="max_length", max_length=max_sequence_length, truncation=True,
                        return_tensors="pt").input_ids
    return text_encoders[1](ids.to(device), output_hidden_states=False)[0], pooled


def encode_prompt_t5(tokenizers, text_encoders, prompts: list[str], device,
                     max_sequence_length: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds (B, L, D), attention mask (B, L)) of ``prompts`` as diffusers' PixArtSigmaPipeline encodes
    them (without its optional caption cleaning): T5's last hidden state over ``max_sequence_length`` padded
    tokens, with the mask the transformer's cross-attention uses."""
    tok = tokenizers[0](list(prompts), padding="max_length", max_length=max_sequence_length, truncation=True,
                        add_special_tokens=True, return_tensors="pt")
    mask = tok.attention_mask.to(device)
    return text_encoders[0](tok.input_ids.to(device), attention_mask=mask)[0], mask


def sdxl_time_ids(height: int, width: int, batch: int, device) -> torch.Tensor:
    """SDXL's added time ids (original size, crop top-left, target size) for unconditioned crops."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32,
                        device=device).expand(batch, 6)


def latents_to_images(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode of model-space latents (undoing scaling_factor, shift_factor, latents_mean/std) ->
    [-1, 1]. A VAE held in fp16 whose config asks for ``force_upcast`` (SDXL's, which overflows in fp16)
    decodes in fp32, as diffusers' pipelines do, and goes back to fp16."""
    cfg = vae.config
    upcast = vae.dtype == torch.float16 and getattr(cfg, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    z = latents.to(vae.dtype)
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        mean = torch.tensor(cfg.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
        z = z * std / cfg.scaling_factor + mean
    else:
        z = z / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
    images = vae.decode(z).sample
    if upcast:
        vae.to(torch.float16)
    return images

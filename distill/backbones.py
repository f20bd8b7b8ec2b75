"""How each denoiser class is called: its time input, its condition keywords and its guidance input.

Every network a trainer or teacher evaluates goes through :func:`call`:

    network(x, timestep=timestep, **network_kwargs(network, cond), **guidance_kwargs(network, w)).sample

* the time input is the schedule's ``timestep(t)`` (:meth:`distill.noise.NoiseSchedule.timestep`), by
  keyword (a transformer's second positional input is its text condition);
* conditions by what ``forward`` accepts: ``class_labels`` (``UNet2DModel``, distill's MLP, DiT's
  ``DiTTransformer2DModel`` / ``Transformer2DModel``, whose null class is ``num_embeds_ada_norm``);
  ``encoder_hidden_states`` with SDXL's ``added_cond_kwargs`` (``UNet2DConditionModel``, Podell et al. 2023,
  sec. 2.2); ``pooled_projections`` (SD3-class transformers, Esser et al. 2024);
* the guidance weight w of guided distillation (Meng et al. 2023, sec. 4.1) as ``guidance_weight``
  (distill's guided UNet and MLP) or ``timestep_cond`` (``UNet2DConditionModel``'s ``time_cond_proj_dim``
  input, as diffusers' LatentConsistencyModelPipeline);
* learned-variance outputs (DiT, PixArt: 2C channels, Nichol & Dhariwal 2021, sec. 3.1) are read as their
  first C channels, the prediction; the variance half is dropped as diffusers' DiTPipeline does;
* FLUX.1 (``FluxTransformer2DModel``, Black Forest Labs 2024): the (B, C, H, W) latents go in as 2x2 patches
  (tokens of 4C), with position ids (0, row, column) per patch and zeros per text token, the time as
  ``timestep / 1000`` and, for FLUX.1-dev (``guidance_embeds``), the embedded guidance scale as ``guidance``
  (one pass, no classifier-free second pass), as diffusers' FluxPipeline calls it.

A new backbone class is one entry here.
"""

from __future__ import annotations

import inspect

import torch

from .conditioning import Condition
from .text_encoding import guidance_embedding


def _unwrap(net):
    net = getattr(net, "module", net)  # DistributedDataParallel
    net = getattr(net, "_orig_mod", net)  # torch.compile
    net = getattr(net, "shared_base", net)  # a LoRA view (distill.lora.AdapterView) of a shared base
    return getattr(net, "wrapped_network", net)  # a guidance-input wrapper (GuidedTransformer2DModel)


def _kind(net) -> str:
    """The diffusers class a network is (FSDP2's ``fully_shard`` swaps in a subclass ``FSDP<Class>``)."""
    for cls in type(_unwrap(net)).__mro__:
        if cls.__module__.startswith("diffusers") or cls.__module__.startswith("distill"):
            return cls.__name__
    return type(_unwrap(net)).__name__


def _accepts(net, name: str) -> bool:
    net = _unwrap(net)
    try:
        return name in inspect.signature(net.forward).parameters
    except (TypeError, ValueError):
        return False


def network_kwargs(net, cond: Condition | None) -> dict:
    """Keyword arguments that pass ``cond`` to a diffusers denoiser ``net``.

    ``UNet2DModel`` / distill's MLP: ``class_labels``. ``UNet2DConditionModel``:
    ``encoder_hidden_states`` and, for SDXL's ``addition_embed_type="text_time"``,
    ``added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}``. Transformers that take
    ``pooled_projections`` (SD3 class) get the pooled embedding there.
    """
    if cond is None or cond.kind == "none":
        return {}
    if cond.kind == "class":
        return {"class_labels": cond.class_labels}
    kw = {"encoder_hidden_states": cond.embeds}
    if cond.mask is not None:
        kw["encoder_attention_mask"] = cond.mask
    if _kind(net) == "PixArtTransformer2DModel":  # PixArt-Sigma's size conditioning: none
        kw["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    if cond.pooled is not None:
        if _accepts(net, "pooled_projections"):
            kw["pooled_projections"] = cond.pooled
        elif getattr(getattr(_unwrap(net), "config", None), "addition_embed_type", None) == "text_time":
            kw["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
    return kw


def guidance_kwargs(net, w: torch.Tensor | None) -> dict:
    """The guidance weight w (Meng et al.'s, = guidance_scale - 1) as a network input (None: none)."""
    if w is None:
        return {}
    dim = getattr(_unwrap(net).config, "time_cond_proj_dim", None)
    if dim:
        return {"timestep_cond": guidance_embedding(w, dim).to(w.device)}
    return {"guidance_weight": w}


def text_encoding(net) -> str:
    """How a text teacher's prompts are encoded for ``net``: 'sd3' (CLIP-L + CLIP-G + T5,
    ``SD3Transformer2DModel``), 'flux' (CLIP-L pooled + T5, ``FluxTransformer2DModel``) or 'clip' (Stable
    Diffusion's / SDXL's CLIP encoders, the UNets) or 't5' (T5 with its attention mask, PixArt)."""
    return {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux",
            "PixArtTransformer2DModel": "t5"}.get(_kind(net), "clip")


def embeds_guidance(net) -> bool:
    """The network takes the guidance scale as an input (FLUX.1-dev's ``guidance_embeds``): guidance is one
    pass with ``guidance=scale``, not classifier-free guidance."""
    return bool(getattr(getattr(_unwrap(net), "config", None), "guidance_embeds", False))


def default_embedded_guidance() -> float:
    """The guidance scale diffusers' FluxPipeline gives a guidance-embedding network by default (3.5)."""
    import diffusers

    return float(inspect.signature(diffusers.FluxPipeline.__call__).parameters["guidance_scale"].default)


def stock_pipeline(net) -> str | None:
    """The stock diffusers pipeline of a transformer teacher (its sampling loop is the reference), or None."""
    return {"DiTTransformer2DModel": "DiTPipeline", "SD3Transformer2DModel": "StableDiffusion3Pipeline",
            "FluxTransformer2DModel": "FluxPipeline",
            "PixArtTransformer2DModel": "PixArtSigmaPipeline"}.get(_kind(net))


def any_size(net) -> bool:
    """The network samples any latent size (SD3's cropped position embedding, FLUX.1's rotary ids)."""
    return stock_pipeline(net) in ("StableDiffusion3Pipeline", "FluxPipeline")


def stock_sigmas(net, num_steps: int):
    """The noise levels the stock pipeline passes to its scheduler's ``set_timesteps`` (FluxPipeline:
    linspace(1, 1/N, N), before the shift), or None (the scheduler's own grid)."""
    if stock_pipeline(net) != "FluxPipeline":
        return None
    import numpy as np

    return np.linspace(1.0, 1 / num_steps, num_steps)


def token_patch(net) -> int:
    """The latent patch one image token covers: the config's ``patch_size``, FLUX's 2x2 packing."""
    return 2 if _kind(net) == "FluxTransformer2DModel" else _unwrap(net).config.patch_size


def latent_shape(net) -> list[int] | None:
    """(C, H, W) of what a diffusers transformer / UNet denoises at its default size: ``in_channels`` x
    ``sample_size``^2; FLUX.1 (no ``sample_size``; 2x2-patch tokens of ``in_channels`` = 4C): C = in / 4 at
    FluxPipeline's default 128 x 128 latents. None for other networks."""
    cfg = getattr(_unwrap(net), "config", None)
    if _kind(net) == "FluxTransformer2DModel":
        return [cfg.in_channels // 4, 128, 128]
    if hasattr(cfg, "in_channels") and getattr(cfg, "sample_size", None) is not None:
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return [cfg.in_channels, size, size]
    return None


def forward(net, x: torch.Tensor, timestep: torch.Tensor, **kwargs) -> torch.Tensor:
    """``net``'s prediction at (x, timestep): the time input second, or by keyword where ``forward`` names
    it later (SD3's and PixArt's second input is the text condition), and of a learned-variance output (2C
    channels) the first C. FLUX.1: the latents in 2x2 patches with their position ids, the time / 1000, the
    output unpacked."""
    inner = getattr(net, "module", net)  # DistributedDataParallel
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    inner = getattr(inner, "shared_base", inner)  # a LoRA view of a shared base
    inner = getattr(inner, "wrapped_network", inner)  # a guidance-input wrapper
    if any(c.__name__ == "FluxTransformer2DModel" for c in type(inner).__mro__):  # (FSDP2: a subclass)
        b, c, h, w = x.shape
        tokens = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, 4 * c)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=x.dtype)
        img_ids[..., 1] += torch.arange(h // 2, device=x.device, dtype=x.dtype)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x.device, dtype=x.dtype)[None, :]
        txt = kwargs["encoder_hidden_states"]
        txt_ids = torch.zeros(txt.shape[1], 3, device=x.device, dtype=x.dtype)
        out = net(hidden_states=tokens, timestep=timestep.to(x.dtype) / 1000, img_ids=img_ids.reshape(-1, 3),
                  txt_ids=txt_ids, **kwargs).sample
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
    names = list(inspect.signature(inner.forward).parameters)
    if "timestep" in names and names.index("timestep") != 1:
        out = net(x, timestep=timestep, **kwargs).sample
    else:
        out = net(x, timestep, **kwargs).sample
    return out[:, : x.shape[1]] if out.ndim == x.ndim and out.shape[1] == 2 * x.shape[1] else out


def call(net, x: torch.Tensor, timestep: torch.Tensor, cond: Condition | None = None,
         w: torch.Tensor | None = None, guidance: torch.Tensor | None = None) -> torch.Tensor:
    """The raw output of ``net`` (in its prediction type) at ``x`` and ``timestep``; ``guidance``: the
    embedded guidance scale of a guidance-embedding network (per example)."""
    extra = {"guidance": guidance} if guidance is not None else {}
    return forward(net, x, timestep, **network_kwargs(net, cond), **guidance_kwargs(net, w), **extra)

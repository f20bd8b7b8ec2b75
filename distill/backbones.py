"""How each denoiser class is called: its time input, its condition keywords and its guidance input.

Every network a trainer or teacher evaluates goes through :func:`call`:

    network(x, timestep, **network_kwargs(network, cond), **guidance_kwargs(network, w)).sample

* the time input is the schedule's ``timestep(t)`` (:meth:`distill.noise.NoiseSchedule.timestep`);
* conditions by what ``forward`` accepts: ``class_labels`` (``UNet2DModel``, distill's MLP);
  ``encoder_hidden_states`` with SDXL's ``added_cond_kwargs`` (``UNet2DConditionModel``, Podell et al. 2023,
  sec. 2.2); ``pooled_projections`` (SD3-class transformers, Esser et al. 2024);
* the guidance weight w of guided distillation (Meng et al. 2023, sec. 4.1) as ``guidance_weight``
  (distill's guided UNet and MLP) or ``timestep_cond`` (``UNet2DConditionModel``'s ``time_cond_proj_dim``
  input, as diffusers' LatentConsistencyModelPipeline).

A new backbone class is one entry here.
"""

from __future__ import annotations

import inspect

import torch

from .conditioning import Condition
from .text_encoding import guidance_embedding


def _unwrap(net):
    net = getattr(net, "module", net)  # DistributedDataParallel
    return getattr(net, "_orig_mod", net)  # torch.compile


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


def call(net, x: torch.Tensor, timestep: torch.Tensor, cond: Condition | None = None,
         w: torch.Tensor | None = None) -> torch.Tensor:
    """The raw output of ``net`` (in its prediction type) at ``x`` and ``timestep``."""
    return net(x, timestep, **network_kwargs(net, cond), **guidance_kwargs(net, w)).sample

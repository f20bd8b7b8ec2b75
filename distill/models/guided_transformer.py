"""A diffusers transformer (DiT, PixArt, SD3) that also takes the guidance weight w (guided distillation).

STANDALONE FILE: imports torch and diffusers only (copied into exported pipeline folders).

Meng et al. 2023, "On Distillation of Guided Diffusion Models" (CVPR 2023), sec. 4.1: the stage-one
student x_eta(z_t, c, w) is conditioned on w through an embedding added to the time embedding. The
transformers have no such input, so this wrapper holds the diffusers transformer (state-dict keys
``transformer.*``), embeds ``1000 w`` sinusoidally (diffusers' ``get_timestep_embedding``, as LCM's
guidance-scale embedding), maps it with a two-layer MLP whose last layer is zero-initialised, and adds it,
for the duration of one call, to the output of each of the transformer's time-embedding modules (DiT: every
block's timestep + class embedder; PixArt: ``adaln_single.emb``; SD3 and FLUX.1-schnell:
``time_text_embed``). A fresh
wrapper around a teacher's weights therefore equals the conditional teacher (w = 0 means "no guidance";
diffusers' ``guidance_scale`` is ``1 + w``).
"""

from __future__ import annotations

import diffusers
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

TIME_EMBEDDINGS = ("CombinedTimestepLabelEmbeddings", "PixArtAlphaCombinedTimestepSizeEmbeddings",
                   "CombinedTimestepTextProjEmbeddings")


class GuidedTransformer2DModel(ModelMixin, ConfigMixin):
    """A diffusers transformer plus a guidance-weight embedding.

    Args:
        transformer_class: the wrapped class (``DiTTransformer2DModel``, ``PixArtTransformer2DModel``,
            ``SD3Transformer2DModel`` or a ``FluxTransformer2DModel`` without guidance input).
        transformer_config: its config (a dict).
        guidance_embed_dim: width of the sinusoidal embedding of ``1000 w``.
        in_channels, sample_size: the wrapped transformer's (read by pipelines).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, transformer_class: str = "SD3Transformer2DModel",
                 transformer_config: dict | None = None, guidance_embed_dim: int = 256,
                 in_channels: int | None = None, sample_size: int | None = None):
        super().__init__()
        cfg = {k: v for k, v in (transformer_config or {}).items() if not k.startswith("_")}
        self.transformer = getattr(diffusers, transformer_class).from_config(cfg)
        for m in self.transformer.modules():  # a student: DiT's own label dropout (its CFG training) off
            if type(m).__name__ == "LabelEmbedding":
                m.dropout_prob = 0.0
        self.time_embeddings = [m for m in self.transformer.modules() if type(m).__name__ in TIME_EMBEDDINGS]
        if not self.time_embeddings:
            raise ValueError(f"{transformer_class} has none of the time embeddings {TIME_EMBEDDINGS}.")
        width = self.transformer.config.num_attention_heads * self.transformer.config.attention_head_dim
        self.guidance_embedding = nn.Sequential(nn.Linear(guidance_embed_dim, width), nn.SiLU(),
                                                nn.Linear(width, width))
        nn.init.zeros_(self.guidance_embedding[-1].weight)
        nn.init.zeros_(self.guidance_embedding[-1].bias)

    @classmethod
    def from_transformer(cls, transformer, guidance_embed_dim: int = 256) -> GuidedTransformer2DModel:
        """Wrap a trained transformer (its weights copied); the result equals it at w = 0."""
        config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
        model = cls(type(transformer).__name__, config, guidance_embed_dim, config.get("in_channels"),
                    config.get("sample_size"))
        model.transformer.load_state_dict(transformer.state_dict())
        model.to(transformer.device)
        return model if transformer.dtype == torch.float32 else model.to(transformer.dtype)

    @property
    def wrapped_network(self):
        """The transformer whose call convention (inputs, text encoding) this model follows."""
        return self.transformer

    def enable_gradient_checkpointing(self):
        self.transformer.enable_gradient_checkpointing()

    def forward(self, hidden_states: torch.Tensor, timestep=None, guidance_weight: torch.Tensor | None = None,
                **kwargs):
        batch = hidden_states.shape[0]
        w = torch.zeros(batch, device=hidden_states.device) if guidance_weight is None else torch.as_tensor(
            guidance_weight, device=hidden_states.device).float().reshape(-1).expand(batch)
        g = get_timestep_embedding(1000.0 * w, self.config.guidance_embed_dim, flip_sin_to_cos=True,
                                   downscale_freq_shift=0)
        g = self.guidance_embedding(g.to(self.transformer.dtype))
        hooks = [m.register_forward_hook(lambda _m, _i, out: out + g.to(out.dtype))
                 for m in self.time_embeddings]
        try:
            return self.transformer(hidden_states, timestep=timestep, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()

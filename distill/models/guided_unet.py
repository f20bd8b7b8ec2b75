"""A diffusers ``UNet2DModel`` that also takes the guidance weight w (guided distillation).

STANDALONE FILE: imports torch and diffusers only (copied into exported pipeline folders).

Meng et al. 2023, "On Distillation of Guided Diffusion Models" (CVPR 2023), sec. 4.1: the
stage-one student x_eta(z_t, c, w) is conditioned on w through an embedding added to the time
embedding (the VDM recipe: a sinusoidal embedding of w, like that of t). ``UNet2DModel`` has no
such input (only ``UNet2DConditionModel`` has ``time_cond_proj_dim``), so this wrapper holds a
plain ``UNet2DModel`` (state-dict keys ``unet.*``), embeds ``1000 w`` sinusoidally (diffusers'
``get_timestep_embedding``, as LCM's ``guidance_scale_embedding``), maps it with a two-layer MLP
whose last layer is zero-initialised, and adds it to the UNet's time embedding through a forward
hook for the duration of one call. A fresh wrapper around a teacher's weights therefore equals the
conditional teacher (w = 0 means "no guidance"; diffusers' ``guidance_scale`` is ``1 + w``).
"""

from __future__ import annotations

import torch
from diffusers import UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class GuidedUNet2DModel(ModelMixin, ConfigMixin):
    """``UNet2DModel`` plus a guidance-weight embedding.

    Args:
        unet_config: the wrapped ``UNet2DModel``'s config (a dict).
        guidance_embed_dim: width of the sinusoidal embedding of ``1000 w``.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, unet_config: dict | None = None, guidance_embed_dim: int = 64):
        super().__init__()
        cfg = {k: v for k, v in (unet_config or {}).items() if not k.startswith("_")}
        self.unet = UNet2DModel.from_config(cfg)
        width = self.unet.time_embedding.linear_2.out_features
        self.guidance_embedding = nn.Sequential(nn.Linear(guidance_embed_dim, width), nn.SiLU(),
                                                nn.Linear(width, width))
        nn.init.zeros_(self.guidance_embedding[-1].weight)
        nn.init.zeros_(self.guidance_embedding[-1].bias)

    @classmethod
    def from_unet(cls, unet: UNet2DModel, guidance_embed_dim: int = 64) -> GuidedUNet2DModel:
        """Wrap a trained ``UNet2DModel`` (its weights copied); the result equals it at w = 0."""
        config = {k: v for k, v in unet.config.items() if not k.startswith("_")}  # no _name_or_path (a Path)
        model = cls(unet_config=config, guidance_embed_dim=guidance_embed_dim)
        model.unet.load_state_dict(unet.state_dict())
        model.to(unet.device)
        return model if unet.dtype == torch.float32 else model.to(unet.dtype)

    @property
    def in_channels(self) -> int:
        return self.unet.config.in_channels

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                return_dict: bool = True, guidance_weight: torch.Tensor | None = None):
        batch = sample.shape[0]
        w = torch.zeros(batch, device=sample.device) if guidance_weight is None else torch.as_tensor(
            guidance_weight, device=sample.device).float().reshape(-1).expand(batch)
        g = get_timestep_embedding(1000.0 * w, self.config.guidance_embed_dim, flip_sin_to_cos=True,
                                   downscale_freq_shift=0)
        g = self.guidance_embedding(g.to(self.unet.dtype))
        hook = self.unet.time_embedding.register_forward_hook(lambda _m, _i, out: out + g.to(out.dtype))
        try:
            return self.unet(sample, timestep, class_labels=class_labels, return_dict=return_dict)
        finally:
            hook.remove()

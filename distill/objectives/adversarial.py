"""The adversarial pieces shared by the score methods' GAN terms (DMD2, Yin et al. 2024b, sec. 4.2; SiDA, Zhou
et al. 2025; Uni-Instruct's density-ratio discriminator; MSD's ADM stage, Song et al. 2025, sec. 3.3): a
discriminator head on the fake-score network's features, its BCE and the generator's non-saturating term."""

from __future__ import annotations

import torch
from torch import nn


class DiscriminatorHead(nn.Module):
    """Logit from captured fake-score features: spatial maps (a UNet's mid block) and token sequences (a
    transformer's last block) are pooled after the head, vectors (distill's MLP) used as they are."""

    def __init__(self, channels: int, spatial: bool):
        super().__init__()
        self.spatial = spatial
        self.net = (nn.Sequential(nn.SiLU(), nn.Conv2d(channels, channels, 1), nn.SiLU(),
                                  nn.Conv2d(channels, 1, 1))
                    if spatial else nn.Sequential(nn.SiLU(), nn.Linear(channels, channels), nn.SiLU(),
                                                  nn.Linear(channels, 1)))

    def forward(self, feats) -> torch.Tensor:
        feats = feats[-1] if isinstance(feats, tuple) else feats  # SD3's joint block: (text, image) tokens
        out = self.net(feats)
        if self.spatial:
            return out.mean(dim=(1, 2, 3))
        return out.mean(dim=1).squeeze(1) if out.ndim == 3 else out.squeeze(1)  # (B, tokens, 1): token mean


def feature_module(net):
    """(module whose output the head reads, its feature width, spatial?): a UNet's mid block, a transformer's
    last block (DiT, SD3: image tokens), distill's MLP's last block."""
    if hasattr(net, "mid_block") and net.mid_block is not None:
        return net.mid_block, net.config.block_out_channels[-1], True
    if hasattr(net, "transformer_blocks"):
        cfg = net.config
        return net.transformer_blocks[-1], cfg.num_attention_heads * cfg.attention_head_dim, False
    if hasattr(net, "blocks"):
        return net.blocks[-1], net.config.hidden, False
    raise ValueError(f"No discriminator feature layer known for {type(net).__name__}.")


def discriminator_loss(logit_real: torch.Tensor, logit_fake: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy: noised data -> 1, noised generator samples -> 0 (per sample)."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    return bce(logit_real, torch.ones_like(logit_real), reduction="none") + bce(
        logit_fake, torch.zeros_like(logit_fake), reduction="none")


def generator_gan_loss(logit_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN generator term (DMD2 / SiDA): softplus(-logit)."""
    return torch.nn.functional.softplus(-logit_fake)

"""A small masked-autoregressive (MAR) image generator with a per-token diffusion head.

STANDALONE FILE: imports torch and diffusers only (exported next to its weights as ``distill_mar``).

Li et al. 2024, "Autoregressive Image Generation without Vector Quantization" (MAR):

* the image is cut into patches ("tokens", continuous vectors of C p^2 values);
* a bidirectional transformer reads the known tokens (unknown ones replaced by a learned mask token,
  MaskGIT-style, in one stack rather than MAR's encoder / decoder pair) and a class token (label
  ``num_classes`` = the null class, for classifier-free guidance), and produces a conditioning
  vector z_i for every token;
* a small MLP diffusion head eps(x_t, t, z_i) models p(x_i | z_i) per token, trained with the
  diffusion loss (MAR eq. 2, epsilon prediction on the cosine schedule):

      L(z, x) = E_{eps, t} || eps - eps_theta(sqrt(abar_t) x + sqrt(1 - abar_t) eps, t, z) ||^2.

The head's residual blocks are modulated by t and z (adaptive layer norm, as MAR's SimpleMLPAdaLN).
With ``learn_sigma=True`` (MAR's and DiSA's reference heads) it outputs 2 C p^2 values per token: eps and
v_raw, the interpolation of Nichol & Dhariwal 2021, eq. 15, log Sigma = v log beta_t + (1 - v) log beta~_t
with v = (v_raw + 1) / 2, trained with their hybrid loss (eq. 16). ``learn_sigma=False`` (the default of
folders exported before it existed) is the epsilon-only head sampled with the fixed posterior variance.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) timesteps, shape (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class AdaLNBlock(nn.Module):
    """x + gate * MLP(modulate(LN(x), shift, scale)), with (shift, scale, gate) from the condition."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x, c):
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class DiffusionHead(nn.Module):
    """eps_theta(x_t, t, z): the per-token denoiser (MAR's diffusion head); ``out_dim`` = 2 ``token_dim``
    appends the variance interpolation v_raw."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, out_dim: int):
        super().__init__()
        self.width = width
        self.x_in = nn.Linear(token_dim, width)
        self.t_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.c_in = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(AdaLNBlock(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, out_dim)
        for layer in (self.ada[1], self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x_t, timestep, z):
        c = self.t_mlp(timestep_embedding(timestep, self.width)) + self.c_in(z)
        h = self.x_in(x_t)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.out(self.norm(h) * (1 + scale) + shift)


class MaskedAutoregressiveModel(ModelMixin, ConfigMixin):
    """MAR: transformer over image tokens + per-token diffusion head.

    Args:
        sample_size, in_channels: the image (square).
        patch_size: side of a token's patch; a token holds ``in_channels * patch_size**2`` values.
        width, depth, num_heads, mlp_ratio: the transformer.
        num_classes: classes (label ``num_classes`` is the null class); 0 = unconditional.
        head_width, head_depth: the diffusion head.
        learn_sigma: the head also outputs the variance interpolation v_raw (Nichol & Dhariwal 2021, eq. 15).
    """

    @register_to_config
    def __init__(self, sample_size: int = 16, in_channels: int = 1, patch_size: int = 2, width: int = 128,
                 depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0, num_classes: int = 10,
                 head_width: int = 128, head_depth: int = 3, learn_sigma: bool = False):
        super().__init__()
        if sample_size % patch_size:
            raise ValueError(f"sample_size={sample_size} is not a multiple of patch_size={patch_size}.")
        self.token_in = nn.Linear(self.token_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, self.seq_len + 1, width) * 0.02)
        self.class_emb = nn.Embedding(num_classes + 1, width)
        layer = nn.TransformerEncoderLayer(width, num_heads, int(width * mlp_ratio), dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = DiffusionHead(self.token_dim, width, head_width, head_depth,
                                  out_dim=self.token_dim * (2 if learn_sigma else 1))

    @property
    def token_dim(self) -> int:
        return self.config.in_channels * self.config.patch_size**2

    @property
    def seq_len(self) -> int:
        return (self.config.sample_size // self.config.patch_size) ** 2

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, C p^2), tokens in raster order."""
        b, c, h, w = x.shape
        p = self.config.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, C p^2) -> (B, C, H, W)."""
        b = tokens.shape[0]
        p, c, s = self.config.patch_size, self.config.in_channels, self.config.sample_size
        n = s // p
        x = tokens.reshape(b, n, n, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, s, s)

    def encode(self, tokens: torch.Tensor, mask: torch.Tensor,
               class_labels: torch.Tensor | None) -> torch.Tensor:
        """Conditioning vectors z (B, L, width) from the known tokens (``mask`` True = unknown)."""
        b = tokens.shape[0]
        h = torch.where(mask[..., None], self.mask_token.to(tokens.dtype), self.token_in(tokens))
        if class_labels is None:
            class_labels = torch.full((b,), self.config.num_classes, device=tokens.device, dtype=torch.long)
        h = torch.cat([self.class_emb(class_labels)[:, None], h], dim=1) + self.pos
        return self.norm(self.blocks(h))[:, 1:]

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The diffusion head: eps prediction for noisy tokens x_t (N, C p^2) at timesteps (N,) given z
        (N, width); with ``learn_sigma`` (N, 2 C p^2): eps, then v_raw."""
        return self.head(x_t, timestep, z)

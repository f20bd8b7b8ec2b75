"""Routing of conditions to students in multi-student distillation (MSD, Song et al. 2024, "Multi-Student
Diffusion Distillation for Better One-Step Generators"): a prompt goes to the student of the
nearest centroid of its text-encoder feature.
"""

from __future__ import annotations

import torch


def prompt_feature(embeds: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
    """The routing feature of encoded prompts: the pooled embedding when the teacher has one (SDXL), else the
    token-mean of the text encoder's hidden states; L2-normalised, float32."""
    f = pooled if pooled is not None else embeds.float().mean(dim=1)
    return torch.nn.functional.normalize(f.float(), dim=-1)


def nearest_centroid(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return torch.cdist(features.float(), centroids.to(features.device, torch.float32)).argmin(dim=1)

"""Partitions of the conditioning set and routing of conditions to students in multi-student distillation
(MSD, Song et al. 2024, "Multi-Student Diffusion Distillation for Better One-Step Generators"): classes by
consecutive blocks, a seeded random split or a file; prompts by k-means on their text-encoder features,
a prompt going to the student of the nearest centroid. Features and centroids are float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import ConfigError


def prompt_feature(embeds: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
    """The routing feature of encoded prompts: the pooled embedding when the teacher has one (SDXL), else the
    token-mean of the text encoder's hidden states; L2-normalised, float32."""
    f = pooled if pooled is not None else embeds.float().mean(dim=1)
    return torch.nn.functional.normalize(f.float(), dim=-1)


def nearest_centroid(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return torch.cdist(features.float(), centroids.to(features.device, torch.float32)).argmin(dim=1)


def class_partition(kind: str, num_classes: int, k: int, seed: int = 0, file: str | None = None) -> list[int]:
    """The student of each class: consecutive blocks, a seeded balanced random split, or a JSON file."""
    if k > num_classes:
        raise ConfigError(f"msd.num_students={k} is more than the teacher's {num_classes} classes: every "
                          f"student needs at least one class; use msd.num_students <= {num_classes}.")
    if kind == "blocks":
        return [c * k // num_classes for c in range(num_classes)]
    if kind == "random":
        perm = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()
        table = [0] * num_classes
        for i, c in enumerate(perm):
            table[c] = i % k
        return table
    if kind == "file":
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"msd.partition_file={file!r} does not exist; it should be a JSON list giving "
                              f"the student (0..{k - 1}) of each of the {num_classes} classes.")
        table = json.loads(path.read_text())
        if (not isinstance(table, list) or len(table) != num_classes
                or not all(isinstance(s, int) and 0 <= s < k for s in table)):
            raise ConfigError(f"msd.partition_file={file!r} must hold a JSON list of {num_classes} integers "
                              f"in [0, {k}) (the student of each class); it holds {str(table)[:200]}.")
        return table
    raise ConfigError(f"msd.partition={kind!r} is for text teachers; a class-conditional teacher takes "
                      "blocks, random or file.")


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 100) -> torch.Tensor:
    """Centroids of k-means (k-means++ initialisation, Lloyd iterations), seeded."""
    gen = torch.Generator().manual_seed(seed)
    x = x.float().cpu()
    cents = [x[torch.randint(len(x), (1,), generator=gen)].squeeze(0)]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(cents)).min(dim=1).values.pow(2)
        cents.append(x[torch.multinomial(d2 + 1e-12, 1, generator=gen)].squeeze(0))
    c = torch.stack(cents)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(dim=1)
        new = torch.stack([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(k)])
        if torch.allclose(new, c):
            break
        c = new
    return c

"""Reports: sample grids, FID JSON + Markdown, FID-vs-steps plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch


def save_grid(x: torch.Tensor, path, nrow: int | None = None, title: str | None = None) -> Path:
    """Save samples as a PNG: images (B, C, H, W) in [0, 1] as a grid, 2-D points as a scatter plot."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.as_tensor(x).detach().float().cpu()
    if x.ndim == 2:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
        ax.scatter(x[:, 0], x[:, 1], s=3, alpha=0.6)
        ax.set_aspect("equal")
        if title:
            ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path
    from PIL import Image

    b, c, h, w = x.shape
    nrow = nrow or int(math.ceil(math.sqrt(b)))
    ncol = int(math.ceil(b / nrow))
    grid = torch.ones(c, ncol * (h + 2) + 2, nrow * (w + 2) + 2)
    for i in range(b):
        r, q = divmod(i, nrow)
        grid[:, 2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + q * (w + 2): 2 + q * (w + 2) + w] = x[i]
    arr = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    if c == 1:
        arr = np.repeat(arr, 3, axis=2)
    scale = max(1, 256 // max(arr.shape[:2]))
    img = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), resample=0)
    img.save(path)
    return path


def write_json(obj, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
    return path

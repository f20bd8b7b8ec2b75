"""Exact metrics for samples of the 2-D Gaussian-mixture toys."""

from __future__ import annotations

import torch


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, num_projections: int = 512, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two equal-size point sets (sorted 1-D projections)."""
    n = min(len(x), len(y))
    x, y = x[:n].double(), y[:n].double()
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], num_projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ dirs, dim=0)
    py, _ = torch.sort(y @ dirs, dim=0)
    return float(((px - py) ** 2).mean().sqrt())


def mode_coverage(x: torch.Tensor, means: torch.Tensor, std: float, weights: torch.Tensor | None = None):
    """(number of modes that receive at least half their expected mass, share of samples within
    3 std of a mode). Samples farther than 3 std from every mode count for no mode."""
    means = torch.as_tensor(means, dtype=torch.float64)
    d = torch.cdist(x.double(), means)
    near = d.min(1).values < 3 * std
    k = len(means)
    w = (torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None
         else torch.as_tensor(weights).double())
    counts = torch.bincount(d.argmin(1)[near], minlength=k).double()
    covered = int((counts >= 0.5 * w * len(x)).sum())
    return covered, float(near.double().mean())


def toy_report(samples: torch.Tensor, teacher_model, reference: torch.Tensor) -> dict:
    """SWD to exact samples, mode coverage, and mean NLL under the true density (vs true samples)."""
    means = teacher_model.mix_means.cpu()
    std = float(teacher_model.mix_variances.sqrt().mean())
    covered, near = mode_coverage(samples, means, std)
    nll = float(-teacher_model.clean_log_prob(samples).mean())
    nll_true = float(-teacher_model.clean_log_prob(reference).mean())
    return {"swd": sliced_wasserstein(samples, reference), "modes": covered, "num_modes": len(means),
            "near_mode": near, "nll": nll, "nll_true_samples": nll_true}

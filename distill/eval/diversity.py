"""Sample diversity under one condition (Gandikota & Bau 2025 report it for distilled vs base models).

Both metrics work on the features of the FID extractor (the same torch-fidelity extractor and layer the
report names), L2-normalised, for a set of n >= 2 samples generated under the same condition:

* ``pairwise_distance``: the mean cosine distance 1 - cos(f_i, f_j) over the n(n-1)/2 pairs
  (the paper averages a learned perceptual distance, DreamSim, the same way);
* ``vendi``: the Vendi score (Friedman & Dieng 2023, "The Vendi Score: A Diversity Evaluation Metric for
  Machine Learning", eq. 1): exp of the Shannon entropy of the eigenvalues of K / n, K_ij = cos(f_i, f_j).
  It is the "effective number" of distinct samples, between 1 (all equal) and n (all orthogonal).
"""

from __future__ import annotations

import torch


def _normalised(features: torch.Tensor) -> torch.Tensor:
    f = torch.as_tensor(features, dtype=torch.float64).reshape(len(features), -1)
    if len(f) < 2:
        raise ValueError(f"Diversity needs at least 2 samples under one condition, got {len(f)}.")
    return torch.nn.functional.normalize(f, dim=1)


def pairwise_distance(features: torch.Tensor) -> float:
    """Mean cosine distance over distinct pairs."""
    f = _normalised(features)
    n = len(f)
    sim = f @ f.T
    return float((1 - sim).sum() / (n * (n - 1)))  # the diagonal contributes 1 - 1 = 0


def vendi(features: torch.Tensor) -> float:
    """exp(-sum_i lambda_i log lambda_i), lambda the eigenvalues of K / n with the cosine kernel K."""
    f = _normalised(features)
    lam = torch.linalg.eigvalsh(f @ f.T / len(f)).clamp_min(0)
    lam = lam[lam > 0]
    return float(torch.exp(-(lam * lam.log()).sum()))


def diversity_by_condition(features: torch.Tensor, groups: list) -> dict:
    """Both metrics per condition (``groups[i]``: the condition of sample i) and their means over
    conditions."""
    by: dict = {}
    for i, g in enumerate(groups):
        by.setdefault(g, []).append(i)
    per = {g: {"pairwise_distance": pairwise_distance(features[idx]), "vendi": vendi(features[idx]),
               "n": len(idx)}
           for g, idx in by.items() if len(idx) >= 2}
    if not per:
        raise ValueError("Diversity needs at least 2 samples under some condition; generate more samples.")
    return {"pairwise_distance": sum(v["pairwise_distance"] for v in per.values()) / len(per),
            "vendi": sum(v["vendi"] for v in per.values()) / len(per), "per_condition": per}

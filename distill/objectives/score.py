"""Losses of the score-distillation family, in denoiser (x0) space.

Notation: x_t = alpha x0 + sigma eps with x0 = G(z) carrying the generator's gradient; D_p and D_psi
are the teacher's and the fake score's x0 predictions at x_t (parameters frozen, GRADIENT FLOWS THROUGH
THEIR INPUT x_t); c = alpha / sigma^2, so that the score-space quantities of the papers are

    delta = s_p - s_psi = c (D_p - D_psi) = c d,
    K = s_psi - grad log q(x_t | x0) = c (D_psi - x0) = c k.

All per-sample sums are divided by n (values per sample), so learning rates do not depend on
resolution; the time weight is w(t) = 1 / (2 c^2 n) in score space (x0-space weight 1), the free
w(t) of the papers. Every loss returns an unreduced per-sample vector (EDM style); trainers take the
batch mean, which fixes the papers' mean-versus-sum difference (DMD reduces its surrogate by a mean over
values, Diff-Instruct and SiD sum over values): gradient magnitude is that of a per-value mean,
independent of batch size and resolution.

* SIM (Luo et al. 2024, sec. 3.2, the score-gradient theorem): divergence E_pi[g(d)] with the
  sampling distribution held fixed; tractable surrogate <grad g(d), k> with
  L2: g(d) = mean(d^2)/2, and pseudo-Huber: g(d) = sqrt(mean(d^2) + c_h^2) - c_h (c_h = ``huber_c``,
  on the per-value RMS of d: the paper's pseudo-Huber distance, sec. 3.3, gives no value of c).
* SiD(alpha) (Zhou et al. 2024): <d, k> + (1 - alpha) |d|^2 per value; alpha = 1 is SIM-L2,
  alpha = 0.5 the exact Fisher-divergence gradient.
* Uni-Instruct (Wang et al. 2025, eq. 3.2): the expanded f-divergence
  int w E_q[h(r) |delta|^2] dt with h(r) = r^2 f''(r), r = p_t / q_t; per sample
      (a) full:   h <d,k> + (h - r h')/2 |d|^2 + (c/2) <sg(kappa d), x_t>,
                  kappa = -r^2 h'' |d|^2 + 2 r h' <d,k>
      (b) fixed:  h <d,k> - r h'/2 |d|^2   + (c/2) <sg(kappa' d), x_t>,
                  kappa' = -r (h' + r h'') |d|^2 + 2 r h' <d,k>
  (inner products per value). The third term is the gradient of h(r(x_t)) through x_t
  (grad log r = delta), so the ratio estimate itself is detached. Forms (a) (sampling distribution
  free) and (b) (held fixed, as in SIM) are derived from eq. 3.2 and checked against finite differences
  in tests/test_score_gradients.py.
* The public Uni-Instruct code's estimator (:class:`ReferenceUniInstructLoss`): the SiD core weighted by
  h(sg(r)) per sample, with its own ratio estimate (:func:`reference_density_ratio`).
* Diff-Instruct / DMD (Luo et al. 2023; Yin et al. 2024, sec. 3.2): the IKL gradient
  <sg(D_psi - D_p), x0>; DMD adds the per-sample normaliser 1 / mean|x0 - D_p|.
"""

from __future__ import annotations

import torch

DIVERGENCES = ("rkl", "fkl", "jeffreys", "js", "chi2")


def h_of(divergence: str, r: torch.Tensor, jeffreys_weights: tuple[float, float] = (1.0, 1.0)):
    """h(r) = r^2 f''(r) (Wang et al. 2025, eq. 3.2) and its first two derivatives for the supported f;
    Jeffreys as w_f KL(p||q) + w_r KL(q||p): h = w_f r + w_r (the paper's 1 + r at weights (1, 1))."""
    one, zero = torch.ones_like(r), torch.zeros_like(r)
    if divergence == "rkl":
        return one, zero, zero
    if divergence == "fkl":
        return r, one, zero
    if divergence == "jeffreys":
        w_f, w_r = jeffreys_weights
        return w_f * r + w_r, w_f * one, zero
    if divergence == "chi2":
        return 2 * r * r, 4 * r, 4 * one
    if divergence == "js":
        return r / (r + 1), 1 / (r + 1) ** 2, -2 / (r + 1) ** 3
    raise ValueError(f"Unknown divergence {divergence!r}; choose one of {DIVERGENCES}.")


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def _per_sample(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(c, dtype=like.dtype, device=like.device).reshape(-1).expand(like.shape[0])


class SIMLoss:
    """Score Implicit Matching / SiD(alpha) generator surrogate (per-sample, unreduced)."""

    def __init__(self, distance: str = "pseudo_huber", huber_c: float = 1.0, sid_alpha: float | None = None,
                 sample_weight: str = "none"):
        if distance not in ("pseudo_huber", "l2"):
            raise ValueError(f"distance {distance!r} is not 'pseudo_huber' or 'l2'.")
        if sid_alpha is not None and distance != "l2":
            raise ValueError("sid_alpha (SiD) is defined with the L2 distance: set distance=l2.")
        self.distance, self.c, self.alpha, self.sample_weight = distance, huber_c, sid_alpha, sample_weight

    def __call__(self, x0, x_t, d_real, d_fake, coef=None) -> torch.Tensor:
        d, k = _flat(d_real - d_fake), _flat(d_fake - x0)
        n = d.shape[1]
        if self.distance == "l2":
            grad_g = d / n
        else:
            rms2 = (d * d).mean(1, keepdim=True)
            grad_g = d / (n * torch.sqrt(rms2 + self.c**2))
        loss = (grad_g * k).sum(1)
        if self.alpha is not None:
            loss = loss + (1 - self.alpha) * (d * d).mean(1)
        return loss / _sample_norm(self.sample_weight, x0, d_real)


class UniInstructLoss:
    """Uni-Instruct f-divergence surrogate, forms (a) ``full`` and (b) ``fixed`` of the module docstring."""

    def __init__(self, divergence: str = "fkl", sampling: str = "full", sample_weight: str = "none",
                 jeffreys_weights: tuple[float, float] = (1.0, 1.0)):
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence {divergence!r}: choose one of {DIVERGENCES} (or di / dmd).")
        if sampling not in ("full", "fixed"):
            raise ValueError(f"sampling {sampling!r} is not 'full' or 'fixed'.")
        self.divergence, self.sampling, self.sample_weight = divergence, sampling, sample_weight
        self.jeffreys_weights = tuple(jeffreys_weights)

    def weight(self, ratio: torch.Tensor) -> torch.Tensor:
        """h(r)."""
        return h_of(self.divergence, ratio, self.jeffreys_weights)[0]

    def __call__(self, x0, x_t, d_real, d_fake, coef, ratio) -> torch.Tensor:
        d, k = _flat(d_real - d_fake), _flat(d_fake - x0)
        n = d.shape[1]
        r = _per_sample(ratio, d).detach()
        c = _per_sample(coef, d)
        h, h1, h2 = h_of(self.divergence, r, self.jeffreys_weights)
        dk, dd = (d * k).sum(1) / n, (d * d).sum(1) / n
        if self.sampling == "full":
            score_norm = (h - r * h1) / 2
            kappa = -r * r * h2 * dd + 2 * r * h1 * dk
        else:
            score_norm = -r * h1 / 2
            kappa = -r * (h1 + r * h2) * dd + 2 * r * h1 * dk
        # w <sg(kappa_score delta), x_t> with w = 1 / (2 c^2 n), delta = c d and kappa_score = c^2 n kappa
        # (kappa is built from per-value means): (c / 2) kappa <sg(d), x_t>, a SUM over values, not a mean
        di_branch = (c / 2) * kappa.detach() * (d.detach() * _flat(x_t)).sum(1)
        loss = h * dk + score_norm * dd + di_branch
        return loss / _sample_norm(self.sample_weight, x0, d_real)


class ReferenceUniInstructLoss:
    """The estimator of the public Uni-Instruct code (its ``Forward-KL`` / ``Jeffrey-KL`` branches): the SiD
    core of the SiDA code, <d, k> + (1 - alpha) |d|^2 per value (Zhou et al. 2024, eq. 9; alpha = 1: the SIM
    core), weighted per sample by h(sg(r)), with h(r) = r for forward KL, w_f r + w_r for Jeffreys (the code
    mixes 0.4 forward + 0.6 reverse) and 1 for reverse KL. Unlike :class:`UniInstructLoss` it carries no
    gradient of h(r(x_t)) through x_t and no -r h'/2 |d|^2 term: a weighted SiD, not the expanded divergence's
    exact gradient."""

    def __init__(self, divergence: str = "fkl", alpha: float = 1.2, sample_weight: str = "sid",
                 jeffreys_weights: tuple[float, float] = (0.4, 0.6)):
        if divergence not in ("fkl", "jeffreys", "rkl"):
            raise ValueError(f"divergence {divergence!r}: the reference estimator has fkl, jeffreys and rkl.")
        self.divergence, self.alpha, self.sample_weight = divergence, alpha, sample_weight
        self.jeffreys_weights = tuple(jeffreys_weights)

    def weight(self, ratio: torch.Tensor) -> torch.Tensor:
        """h(r) of the reference's branch."""
        if self.divergence == "fkl":
            return ratio
        if self.divergence == "jeffreys":
            w_f, w_r = self.jeffreys_weights
            return w_f * ratio + w_r
        return torch.ones_like(ratio)

    def __call__(self, x0, x_t, d_real, d_fake, coef, ratio) -> torch.Tensor:
        d, k = _flat(d_real - d_fake), _flat(d_fake - x0)
        core = (d * k).mean(1) + (1 - self.alpha) * (d * d).mean(1)
        h = self.weight(_per_sample(ratio, d).detach())
        return h * core / _sample_norm(self.sample_weight, x0, d_real)


def reference_density_ratio(logit: torch.Tensor, x0, d_real, values: int) -> torch.Tensor:
    """The public Uni-Instruct code's density ratio for its forward-KL / Jeffreys branches, r = -L / (1 - L)
    with L the generator's GAN loss as that code computes it: the BATCH mean of softplus(-clamp(logit, +-10))
    (torch's BCEWithLogitsLoss, mean reduction), divided by each sample's SiD normaliser sg(mean|x0 - D_p|)
    and multiplied by the values per sample. Detached. (L > 1 makes r = L / (L - 1) slightly above 1.)"""
    with torch.no_grad():
        bce = torch.nn.functional.softplus(-logit.float().clamp(-10, 10)).mean()
        loss = values * bce / _sample_norm("sid", x0, d_real).float()
        return -loss / (1 - loss)


class DiffInstructLoss:
    """Diff-Instruct (IKL) / DMD generator surrogate <sg(D_psi - D_p), x0> per value."""

    def __init__(self, normalize: bool = False):
        self.normalize = normalize

    def __call__(self, x0, x_t, d_real, d_fake, coef=None, ratio=None) -> torch.Tensor:
        g = _flat(d_fake - d_real).detach()
        loss = (g * _flat(x0)).mean(1)
        return loss / _sample_norm("sid" if self.normalize else "none", x0, d_real)


def _sample_norm(kind: str, x0, d_real) -> torch.Tensor:
    """SiD / DMD per-sample normaliser sg(mean|x0 - D_p|) (clipped at 1e-5), or 1."""
    if kind == "none":
        return torch.ones(x0.shape[0], device=x0.device, dtype=x0.dtype)
    if kind == "sid":
        return _flat(x0 - d_real).abs().mean(1).detach().clamp_min(1e-5)
    raise ValueError(f"sample_weight {kind!r} is not 'none' or 'sid'.")


def fake_score_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Denoising score matching of the fake score on detached generator samples (Luo et al. 2023),
    per-sample mean squared error in the network's own parameterisation."""
    return _flat(pred.float() - target.float()).pow(2).mean(1)

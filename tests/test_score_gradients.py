"""Gradient checks of the score-distillation losses.

Affine generator x0 = theta1 + theta2 z, a two-Gaussian teacher, VP noise at one time: everything is
closed form. The gradient of each loss class (as the trainers apply it: autograd through the input of
frozen teacher / fake-score functions) must equal the finite-difference gradient of the divergence it
claims to minimise, computed by quadrature.

In ``dim`` dimensions the problem is ``dim`` i.i.d. copies of the 1-D one with a SHARED generator
(x0_i = theta1 + theta2 z_i): teacher and generator densities are products, the density ratio is the
product of the 1-D ratios, and every loss is a per-value mean. The exact objective is then computed
two independent ways: on a 2-D grid (``dim`` = 2, any divergence), and for h(r) a polynomial in r
(rkl, fkl, jeffreys, chi2) by factorising E_pi[r^m sum_i d_i^2] = dim E_pi[r^m d^2] E_pi[r^m]^(dim-1)
into 1-D quadratures (any ``dim``). A term scaled by the wrong power of ``dim`` fails at dim > 1.
"""

import math

import pytest
import torch

from distill.objectives.score import DiffInstructLoss, SIMLoss, UniInstructLoss, h_of

A, S = 0.8, 0.6  # alpha, sigma at the chosen time (alpha^2 + sigma^2 = 1)
MU, SD = torch.tensor([-2.0, 2.0], dtype=torch.float64), 0.5
THETA0 = torch.tensor([0.7, 1.3], dtype=torch.float64)
GRID = torch.linspace(-12, 12, 200001, dtype=torch.float64)
DX = GRID[1] - GRID[0]
GRID2 = torch.linspace(-9, 9, 2401, dtype=torch.float64)  # per axis of the 2-D grid
DX2 = GRID2[1] - GRID2[0]
# h(r) = sum a_m r^m
POLY_H = {"rkl": {0: 1.0}, "fkl": {1: 1.0}, "jeffreys": {0: 1.0, 1: 1.0}, "chi2": {2: 2.0}}


def log_p(x):
    var = A * A * SD * SD + S * S
    comps = -0.5 * (x[..., None] - A * MU) ** 2 / var - 0.5 * math.log(2 * math.pi * var) + math.log(0.5)
    return torch.logsumexp(comps, -1)


def score_p(x):
    var = A * A * SD * SD + S * S
    w = torch.softmax(-0.5 * (x[..., None] - A * MU) ** 2 / var, -1)
    return (w * (A * MU - x[..., None]) / var).sum(-1)


def log_q(x, th):
    var = A * A * th[1] ** 2 + S * S
    return -0.5 * (x - A * th[0]) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)


def score_q(x, th):
    return -(x - A * th[0]) / (A * A * th[1] ** 2 + S * S)


def denoiser(score, x):  # x0 prediction from a score: (x + sigma^2 s) / alpha
    return (x + S * S * score) / A


def fd(fn, th, eps=1e-4):
    g = torch.zeros(2, dtype=torch.float64)
    for i in range(2):
        e = torch.zeros(2, dtype=torch.float64)
        e[i] = eps
        g[i] = (fn(th + e) - fn(th - e)) / (2 * eps)
    return g


def quad(weight_density, values):
    return (weight_density * values).sum() * DX


def surrogate_grad(loss_fn, dim=1, n=None, seed=0, with_ratio=False):
    n = n or 2_000_000 // dim  # 2M values
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, dim, generator=g, dtype=torch.float64)
    eps = torch.randn(n, dim, generator=g, dtype=torch.float64)
    z, eps = torch.cat([z, -z]), torch.cat([eps, -eps])  # antithetic
    th = THETA0.clone().requires_grad_(True)
    x0 = th[0] + th[1] * z
    x_t = A * x0 + S * eps
    d_real = denoiser(score_p(x_t), x_t)
    d_fake = denoiser(score_q(x_t, THETA0), x_t)  # fake score frozen at theta0, input-differentiable
    coef = torch.full((len(z),), A / (S * S), dtype=torch.float64)
    kwargs = {}
    if with_ratio:  # the product of the per-coordinate ratios
        kwargs["ratio"] = torch.exp((log_p(x_t) - log_q(x_t, THETA0)).sum(1)).detach()
    loss = loss_fn(x0, x_t, d_real, d_fake, coef, **kwargs).mean()
    (grad,) = torch.autograd.grad(loss, th)
    return grad


def d_of(x, th):
    return denoiser(score_p(x), x) - denoiser(score_q(x, th), x)


def q0():
    return torch.exp(log_q(GRID, THETA0))


def grid2_objective(th, sampling, integrand):
    """(1/2) E_pi[integrand] over the 2-D product density pi (q_theta for full, q_theta0 for fixed);
    ``integrand(r, mean_d2)`` gets the product ratio r and the per-value mean of d^2 at every grid point."""
    lq = log_q(GRID2, th)
    lpi = lq if sampling == "full" else log_q(GRID2, THETA0)
    lr = log_p(GRID2) - lq
    d2 = d_of(GRID2, th) ** 2
    pi = torch.exp(lpi[:, None] + lpi[None, :])
    vals = integrand(torch.exp(lr[:, None] + lr[None, :]), (d2[:, None] + d2[None, :]) / 2)
    return (pi * vals).sum() * DX2 * DX2


def _expanded(divergence, sampling, dim=1):
    """The expanded f-divergence per value, (1/dim) E_pi[h(r) |d|^2 / 2], exactly (see module docstring)."""
    if dim == 2:
        return lambda th: grid2_objective(th, sampling, lambda r, md2: h_of(divergence, r)[0] * md2 / 2)
    if dim > 1:
        return _factorised(divergence, sampling, dim)

    def objective(th):
        d = d_of(GRID, th)
        r = torch.exp(log_p(GRID) - log_q(GRID, th))
        density = torch.exp(log_q(GRID, th)) if sampling == "full" else q0()
        return quad(density, h_of(divergence, r)[0] * d * d / 2)

    return objective


def _factorised(divergence, sampling, dim):
    """For h(r) = sum_m a_m r^m: sum_m a_m E_pi1[r^m d^2 / 2] E_pi1[r^m]^(dim - 1), 1-D quadratures."""
    def objective(th):
        d = d_of(GRID, th)
        r = torch.exp(log_p(GRID) - log_q(GRID, th))
        density = torch.exp(log_q(GRID, th)) if sampling == "full" else q0()
        return sum(a * quad(density, r**m * d * d / 2) * quad(density, r**m) ** (dim - 1)
                   for m, a in POLY_H[divergence].items())

    return objective


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("distance,c", [("l2", None), ("pseudo_huber", 0.3), ("pseudo_huber", 3.0)])
def test_sim_gradient_equals_fixed_pi_divergence_gradient(distance, c, dim):
    loss = SIMLoss(distance=distance, huber_c=c or 1.0)

    def g(md2):  # g(d) on the per-value mean of d^2
        return md2 / 2 if distance == "l2" else torch.sqrt(md2 + c * c) - c

    if dim == 1:
        exact = fd(lambda th: quad(q0(), g(d_of(GRID, th) ** 2)), THETA0)
    else:
        exact = fd(lambda th: grid2_objective(th, "fixed", lambda r, md2: g(md2)), THETA0)
    got = surrogate_grad(loss, dim=dim)
    torch.testing.assert_close(got, exact, rtol=0.03, atol=1e-2 * exact.abs().max())


UI_CASES = [(f, n) for f in ("rkl", "fkl", "jeffreys", "js", "chi2") for n in (1, 2, 4) if n < 4
            or f in POLY_H]


@pytest.mark.parametrize("divergence,dim", UI_CASES)
@pytest.mark.parametrize("sampling", ["full", "fixed"])
def test_uni_instruct_gradient_equals_expanded_f_divergence_gradient(divergence, sampling, dim):
    exact = fd(_expanded(divergence, sampling, dim), THETA0)
    n = 2_000_000 if divergence == "chi2" else None  # h = 2 r^2 of a product ratio: heavy tails, more samples
    got = surrogate_grad(UniInstructLoss(divergence, sampling), dim=dim, n=n, with_ratio=True)
    torch.testing.assert_close(got, exact, rtol=0.04, atol=1e-2 * exact.abs().max())


def test_the_two_exact_objectives_agree_in_two_dimensions():
    """The 2-D grid and the factorised 1-D quadratures are independent computations of one number."""
    th = THETA0 + torch.tensor([0.1, -0.2], dtype=torch.float64)
    for divergence in POLY_H:
        for sampling in ("full", "fixed"):
            grid = _expanded(divergence, sampling, 2)(th)
            torch.testing.assert_close(grid, _factorised(divergence, sampling, 2)(th), rtol=1e-6, atol=1e-9)


def test_detaching_h_inside_the_sim_branch_would_be_wrong():
    """Without the DI branch (public-code style) the FKL gradient is off."""
    exact = fd(_expanded("fkl", "full"), THETA0)
    loss = UniInstructLoss("fkl", "full")

    def no_di(x0, x_t, d_real, d_fake, coef, ratio):
        return loss(x0, x_t.detach() * 0, d_real, d_fake, coef * 0, ratio)

    wrong = surrogate_grad(no_di, n=400_000, with_ratio=True)
    assert (wrong - exact).abs().max() > 0.2 * exact.abs().max()


@pytest.mark.parametrize("dim", [1, 2, 4])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.2])
def test_sid_alpha_gradient(alpha, dim):
    full = fd(_expanded("rkl", "full", dim), THETA0)
    fixed = fd(_expanded("rkl", "fixed", dim), THETA0)
    exact = (2 * alpha - 1) * fixed + (2 - 2 * alpha) * full
    got = surrogate_grad(SIMLoss(distance="l2", sid_alpha=alpha), dim=dim)
    torch.testing.assert_close(got, exact, rtol=0.03, atol=1e-2 * full.abs().max())


@pytest.mark.parametrize("dim", [1, 2, 4])
def test_diff_instruct_gradient_is_ikl_gradient(dim):
    """KL(q || p) of the product densities, per value, is the 1-D KL: its gradient at any dim."""
    def kl(th):
        q = torch.exp(log_q(GRID, th))
        return quad(q, log_q(GRID, th) - log_p(GRID))

    exact = fd(kl, THETA0) * S * S / (A * A)
    got = surrogate_grad(DiffInstructLoss(), dim=dim)
    torch.testing.assert_close(got, exact, rtol=0.03, atol=1e-2 * exact.abs().max())


# ---------------------------------------------------------------------- the public code's forms
def _batch(seed=0, b=6, shape=(3, 4, 4)):
    """x0 carrying a gradient, x_t, and teacher / fake x0 predictions that depend on x_t (nonlinear)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, *shape, generator=g, dtype=torch.float64).requires_grad_(True)
    x_t = A * x0 + S * torch.randn(b, *shape, generator=g, dtype=torch.float64)
    d_real, d_fake = torch.tanh(0.9 * x_t) + 0.1, 0.7 * torch.sin(x_t)
    return x0, x_t, d_real, d_fake, g


@pytest.mark.parametrize("divergence,weights", [("fkl", None), ("jeffreys", (0.4, 0.6)), ("jeffreys", (1, 2)),
                                                ("rkl", None)])
@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_reference_estimator_is_the_public_codes_weighted_sid_loss(divergence, weights, alpha):
    """The public Uni-Instruct code (fsim_loss.py, fsim_training_loop.py): per value
    (y_real - y_fake)((y_real - y) - alpha (y_real - y_fake)) / sg(mean|y - y_real|), summed over values,
    times sg(r) (forward KL), 0.4 sg(r) + 0.6 (Jeffrey-KL) or 1; ours takes the mean over values."""
    from distill.objectives.score import ReferenceUniInstructLoss

    x0, x_t, d_real, d_fake, g = _batch()
    r = torch.rand(6, generator=g, dtype=torch.float64) * 3
    kwargs = {"jeffreys_weights": weights} if weights else {}
    ours = ReferenceUniInstructLoss(divergence, alpha, "sid", **kwargs)(x0, x_t, d_real, d_fake, None, r)
    wf = (x0 - d_real).abs().mean(dim=(1, 2, 3), keepdim=True).detach()
    ref = ((d_real - d_fake) * ((d_real - x0) - alpha * (d_real - d_fake)) / wf).sum(dim=(1, 2, 3))
    w_f, w_r = weights or (0.4, 0.6)
    h = {"fkl": r, "jeffreys": w_f * r + w_r, "rkl": torch.ones_like(r)}[divergence]
    n = x0[0].numel()
    torch.testing.assert_close(ours * n, h * ref)
    (grad_ours,) = torch.autograd.grad(ours.sum() * n, x0, retain_graph=True)
    (grad_ref,) = torch.autograd.grad((h * ref).sum(), x0)
    torch.testing.assert_close(grad_ours, grad_ref)
    # ... and it is not the exact expanded-divergence gradient (no h(r(x_t)) gradient, no -r h'/2 |d|^2)
    if divergence != "rkl":
        exact = UniInstructLoss(divergence, "fixed", "sid", **kwargs)(x0, x_t, d_real, d_fake, A / S**2, r)
        assert (exact - ours).abs().max() > 1e-3


def test_reference_density_ratio_is_the_public_codes():
    """r = -L / (1 - L), L = BCEWithLogitsLoss()(clamp(logit, +-10), 1) (a batch mean) / sg(mean|y - y_real|)
    times the values per sample (fsim_training_loop.py, Forward-KL branch)."""
    from distill.objectives.score import reference_density_ratio

    x0, _, d_real, _, g = _batch(1)
    logit = torch.randn(6, generator=g, dtype=torch.float64) * 8  # some beyond the clamp
    r = reference_density_ratio(logit, x0, d_real, x0[0].numel())
    bce = torch.nn.BCEWithLogitsLoss()(logit.clamp(-10, 10).float(), torch.ones(6))
    loss = bce * x0[0].numel() / (x0 - d_real).abs().mean(dim=(1, 2, 3)).detach().float()
    torch.testing.assert_close(r, -loss / (1 - loss))
    assert not r.requires_grad and len(set(r.tolist())) == 6  # one batch-mean BCE, per-sample normalisers


def test_dmd_gradient_equals_dmd2_distribution_matching_loss():
    """DiffInstructLoss(normalize=True) against DMD2's compute_distribution_matching_loss (Yin et al. 2024b,
    the reference code): grad = (p_real - p_fake) / mean|p_real|, p = x - D, and
    loss = 0.5 mse(x, sg(x - grad)) with a mean over every value of the batch."""
    x0, x_t, d_real, d_fake, _ = _batch(2)
    ours = DiffInstructLoss(normalize=True)(x0, x_t, d_real, d_fake).mean()
    (g_ours,) = torch.autograd.grad(ours, x0, retain_graph=True)
    p_real, p_fake = x0.detach() - d_real, x0.detach() - d_fake
    grad = torch.nan_to_num((p_real - p_fake) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True))
    dmd2 = 0.5 * torch.nn.functional.mse_loss(x0, (x0 - grad).detach(), reduction="mean")
    (g_dmd2,) = torch.autograd.grad(dmd2, x0)
    torch.testing.assert_close(g_ours, g_dmd2)
    assert g_ours.abs().max() > 0


@pytest.mark.parametrize("gradient", ["exact", "reference"])
def test_mean_h_normalisation_removes_the_ratio_scale_for_forward_kl_only(gradient):
    """The trainers' variance reduction divides each sample's loss by the batch mean of h(r): for forward KL
    (h = r, every term linear in r) the gradient no longer depends on the ratio's scale (an unnormalised
    density ratio), for Jeffreys (h = 1 + r) it does."""
    from distill.objectives.score import ReferenceUniInstructLoss

    x0, x_t, d_real, d_fake, g = _batch(3)
    r = torch.rand(6, generator=g, dtype=torch.float64) + 0.2

    def grad(divergence, ratio):
        loss_fn = (UniInstructLoss(divergence, "full") if gradient == "exact"
                   else ReferenceUniInstructLoss(divergence))
        per = loss_fn(x0, x_t, d_real, d_fake, A / S**2, ratio) / loss_fn.weight(ratio).mean()
        return torch.autograd.grad(per.mean(), x0, retain_graph=True)[0]

    torch.testing.assert_close(grad("fkl", r), grad("fkl", 7 * r))
    assert (grad("jeffreys", r) - grad("jeffreys", 7 * r)).abs().max() > 1e-4

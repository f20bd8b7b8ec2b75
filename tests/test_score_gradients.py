"""Gradient checks of the score-distillation losses (score_distillation.md s9.2-s9.3).

Affine generator x0 = theta1 + theta2 z, a two-Gaussian teacher, VP noise at one time: everything is
closed form. The gradient of each loss class (as the trainers apply it: autograd through the input of
frozen teacher / fake-score functions) must equal the finite-difference gradient of the divergence it
claims to minimise, computed by quadrature.
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


def log_p(x):
    var = A * A * SD * SD + S * S
    comps = -0.5 * (x[:, None] - A * MU) ** 2 / var - 0.5 * math.log(2 * math.pi * var) + math.log(0.5)
    return torch.logsumexp(comps, 1)


def score_p(x):
    var = A * A * SD * SD + S * S
    w = torch.softmax(-0.5 * (x[:, None] - A * MU) ** 2 / var, 1)
    return (w * (A * MU - x[:, None]) / var).sum(1)


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


def surrogate_grad(loss_fn, n=2_000_000, seed=0, with_ratio=False):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    eps = torch.randn(n, generator=g, dtype=torch.float64)
    z, eps = torch.cat([z, -z]), torch.cat([eps, -eps])  # antithetic
    th = THETA0.clone().requires_grad_(True)
    x0 = th[0] + th[1] * z
    x_t = A * x0 + S * eps
    d_real = denoiser(score_p(x_t), x_t)
    d_fake = denoiser(score_q(x_t, THETA0), x_t)  # fake score frozen at theta0, input-differentiable
    coef = torch.full((len(z),), A / (S * S), dtype=torch.float64)
    kwargs = {}
    if with_ratio:
        kwargs["ratio"] = torch.exp(log_p(x_t) - log_q(x_t, THETA0)).detach()
    loss = loss_fn(x0[:, None], x_t[:, None], d_real[:, None], d_fake[:, None], coef, **kwargs).mean()
    (grad,) = torch.autograd.grad(loss, th)
    return grad


def d_of(x, th):
    return denoiser(score_p(x), x) - denoiser(score_q(x, th), x)


def q0():
    return torch.exp(log_q(GRID, THETA0))


@pytest.mark.parametrize("distance,c", [("l2", None), ("pseudo_huber", 0.3), ("pseudo_huber", 3.0)])
def test_sim_gradient_equals_fixed_pi_divergence_gradient(distance, c):
    loss = SIMLoss(distance=distance, huber_c=c or 1.0)

    def objective(th):
        d = d_of(GRID, th)
        g = d * d / 2 if distance == "l2" else torch.sqrt(d * d + c * c) - c
        return quad(q0(), g)

    exact = fd(objective, THETA0)
    got = surrogate_grad(loss)
    torch.testing.assert_close(got, exact, rtol=0.03, atol=1e-2 * exact.abs().max())


def _expanded(divergence, sampling):
    def objective(th):
        d = d_of(GRID, th)
        r = torch.exp(log_p(GRID) - log_q(GRID, th))
        h, _, _ = h_of(divergence, r)
        density = torch.exp(log_q(GRID, th)) if sampling == "full" else q0()
        return quad(density, h * d * d / 2)

    return objective


@pytest.mark.parametrize("divergence", ["rkl", "fkl", "jeffreys", "js", "chi2"])
@pytest.mark.parametrize("sampling", ["full", "fixed"])
def test_uni_instruct_gradient_equals_expanded_f_divergence_gradient(divergence, sampling):
    exact = fd(_expanded(divergence, sampling), THETA0)
    got = surrogate_grad(UniInstructLoss(divergence, sampling), with_ratio=True)
    torch.testing.assert_close(got, exact, rtol=0.04, atol=1e-2 * exact.abs().max())


def test_detaching_h_inside_the_sim_branch_would_be_wrong():
    """Without the DI branch (public-code style) the FKL gradient is off (spec s5.2, s9.3)."""
    exact = fd(_expanded("fkl", "full"), THETA0)
    loss = UniInstructLoss("fkl", "full")

    def no_di(x0, x_t, d_real, d_fake, coef, ratio):
        return loss(x0, x_t.detach() * 0, d_real, d_fake, coef * 0, ratio)

    wrong = surrogate_grad(no_di, n=400_000, with_ratio=True)
    assert (wrong - exact).abs().max() > 0.2 * exact.abs().max()


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.2])
def test_sid_alpha_gradient(alpha):
    full = fd(_expanded("rkl", "full"), THETA0)
    fixed = fd(_expanded("rkl", "fixed"), THETA0)
    exact = (2 * alpha - 1) * fixed + (2 - 2 * alpha) * full
    got = surrogate_grad(SIMLoss(distance="l2", sid_alpha=alpha))
    torch.testing.assert_close(got, exact, rtol=0.03, atol=1e-2 * full.abs().max())


def test_diff_instruct_gradient_is_ikl_gradient():
    def kl(th):
        q = torch.exp(log_q(GRID, th))
        return quad(q, log_q(GRID, th) - log_p(GRID))

    exact = fd(kl, THETA0) * S * S / (A * A)
    got = surrogate_grad(DiffInstructLoss())
    torch.testing.assert_close(got, exact, rtol=0.03, atol=1e-2 * exact.abs().max())

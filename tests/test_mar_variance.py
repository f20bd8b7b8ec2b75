"""MAR's learned head variance (Nichol & Dhariwal 2021, as MAR's and DiSA's reference heads): the
variational-bound term against the closed-form Gaussian KL and the discretized decoder likelihood, the
stop-gradient of the hybrid loss, the learned range on ADM's respaced chain against ADM's SpacedDiffusion
formula and diffusers' DDPMScheduler, and the sampler against diffusers' learned-range DDPM steps and the
fixed-small sampler."""

import json
import math

import diffusers
import numpy as np
import pytest
import torch

from distill.models import MaskedAutoregressiveModel
from distill.objectives.mar import (
    diffusion_head_loss,
    discretized_gaussian_log_likelihood,
    learned_range_log_variance,
    posterior_coefficients,
    vlb_term,
)
from distill.pipelines import MaskedAutoregressivePipeline
from distill.pipelines.annealing import head_timesteps
from distill.pipelines.mar import sample_learned_range
from distill.pipelines.samplers import sample_ddpm_ancestral, vp_grid


def _scheduler(**kw):
    return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                   clip_sample=False, **kw)


def _adm_spaced_betas(alphas_cumprod, kept):
    """ADM's SpacedDiffusion.__init__: new betas from alphas_cumprod at the kept indices (ascending)."""
    betas, last = [], 1.0
    for i, ac in enumerate(alphas_cumprod):
        if i in kept:
            betas.append(1 - ac / last)
            last = ac
    return np.array(betas)


@pytest.mark.parametrize("n, clip", [(5, 950), (50, 950), (100, 999), (7, 999)])
def test_learned_range_ends_are_beta_tilde_and_beta_on_the_respaced_chain(n, clip):
    ac = _scheduler().alphas_cumprod.double().numpy()
    kept = sorted(head_timesteps(n, 1000, clip))
    betas = _adm_spaced_betas(ac, set(kept))
    sub = ac[kept]
    prev = np.append(1.0, sub[:-1])
    tilde = betas * (1 - prev) / (1 - sub)  # ADM's posterior_variance
    beta, _, _, log_tilde = posterior_coefficients(torch.tensor(sub))
    np.testing.assert_allclose(beta.numpy(), betas, rtol=1e-12)
    lo = learned_range_log_variance(torch.tensor(-1.0, dtype=torch.float64), beta.log(), log_tilde)  # v = 0
    hi = learned_range_log_variance(torch.tensor(1.0, dtype=torch.float64), beta.log(), log_tilde)  # v = 1
    np.testing.assert_allclose(lo.exp().numpy()[1:], tilde[1:], rtol=1e-10)
    assert math.isclose(float(lo[0].exp()), tilde[1], rel_tol=1e-10)  # beta~_0 = 0, clipped to beta~_1 as ADM
    np.testing.assert_allclose(hi.exp().numpy(), betas, rtol=1e-10)
    # diffusers' learned_range variance on the same respaced timesteps (t > 0; it clamps beta~_0 at 1e-20)
    sched = _scheduler(variance_type="learned_range")
    sched.set_timesteps(timesteps=kept[::-1])
    v = torch.tensor(0.3)
    ours = learned_range_log_variance(v.double(), beta.log(), log_tilde)
    for j, t in enumerate(kept[1:], start=1):
        assert math.isclose(float(sched._get_variance(t, predicted_variance=v)), float(ours[j]), rel_tol=1e-5,
                            abs_tol=1e-7)


def test_vlb_term_is_the_gaussian_kl_and_the_decoder_nll_in_bits():
    torch.manual_seed(0)
    ac = _scheduler().alphas_cumprod
    t = torch.tensor([1, 10, 500, 998, 999, 0])
    x0 = torch.rand(6, 8) * 2 - 1
    x0[-1, :2] = torch.tensor([-1.0, 1.0])  # the decoder's open outer bins
    eps_pred, v_raw, noise = torch.randn(6, 8), torch.rand(6, 8) * 2 - 1, torch.randn(6, 8)
    abar = ac[t].double()[:, None]
    x_t = (abar.sqrt() * x0 + (1 - abar).sqrt() * noise).float()
    got = vlb_term(eps_pred, v_raw, x0, x_t, t, ac)
    a64, x0d, xtd, epsd, vd = ac.double(), x0.double(), x_t.double(), eps_pred.double(), v_raw.double()
    for row, ti in enumerate(t.tolist()):
        ab, ab_prev = float(a64[ti]), (float(a64[ti - 1]) if ti else 1.0)
        beta = 1 - ab / ab_prev
        x0_hat = (xtd[row] - math.sqrt(1 - ab) * epsd[row]) / math.sqrt(ab)
        c0, ct = beta * math.sqrt(ab_prev) / (1 - ab), (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab)
        mean_p = c0 * x0_hat + ct * xtd[row]
        ab0, ab1 = float(a64[0]), float(a64[1])
        # beta~_0 = 0 is clipped to beta~_1 (ADM's posterior_log_variance_clipped)
        tilde = beta * (1 - ab_prev) / (1 - ab) if ti else (1 - ab1 / ab0) * (1 - ab0) / (1 - ab1)
        frac = (vd[row] + 1) / 2
        var_p = torch.exp(frac * math.log(beta) + (1 - frac) * math.log(tilde))
        p = torch.distributions.Normal(mean_p, var_p.sqrt())
        if ti:
            q = torch.distributions.Normal(c0 * x0d[row] + ct * xtd[row], math.sqrt(tilde))
            nats = torch.distributions.kl_divergence(q, p).mean()
        else:  # -log of the mass on [x - 1/255, x + 1/255], the outer bins open
            upper = torch.where(x0d[row] > 0.999, torch.ones(()), p.cdf(x0d[row] + 1 / 255))
            lower = torch.where(x0d[row] < -0.999, torch.zeros(()), p.cdf(x0d[row] - 1 / 255))
            nats = -(upper - lower).log().mean()
        assert math.isclose(float(got[row]), float(nats) / math.log(2), rel_tol=2e-4, abs_tol=1e-6), ti


def test_decoder_likelihood_sums_to_one_over_the_256_bins():
    levels = torch.linspace(-1, 1, 256)
    log_mass = discretized_gaussian_log_likelihood(levels, torch.full((256,), 0.3), torch.full((256,), -2.0))
    mass = log_mass.exp()
    assert math.isclose(float(mass.sum()), 1.0, rel_tol=1e-5)


class _Head(torch.nn.Module):
    """A linear head whose eps and v_raw outputs are separate parameters."""

    def __init__(self, d):
        super().__init__()
        self.eps, self.v = torch.nn.Linear(d + 1, d), torch.nn.Linear(d + 1, d)

    def forward(self, x_t, t, z):
        h = torch.cat([x_t, t[:, None].float() / 1000], dim=1)
        return torch.cat([self.eps(h), torch.tanh(self.v(h))], dim=1)


def test_hybrid_loss_is_simple_plus_vlb_with_the_mean_stopped():
    torch.manual_seed(1)
    head, ac = _Head(4), _scheduler().alphas_cumprod
    tokens, cond = torch.rand(64, 4) * 2 - 1, torch.zeros(64, 1)
    hybrid = diffusion_head_loss(head, tokens, cond, ac, torch.Generator().manual_seed(0), learn_sigma=True)
    simple = diffusion_head_loss(lambda x, t, z: head(x, t, z)[:, :4], tokens, cond, ac,
                                 torch.Generator().manual_seed(0))
    # the same draws: recompute L_t from them (lambda T = 0.001 * 1000 = 1)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (64,), generator=g)
    eps = torch.randn(64, 4, generator=g)
    x_t = ac[t, None].sqrt() * tokens + (1 - ac[t, None]).sqrt() * eps
    out = head(x_t, t, cond)
    torch.testing.assert_close(hybrid, simple + vlb_term(out[:, :4], out[:, 4:], tokens, x_t, t, ac))
    # eq. 16's stop-gradient: the eps parameters get L_simple's gradient only, the v parameters L_vlb's
    g_hybrid = torch.autograd.grad(hybrid.mean(), [head.eps.weight, head.v.weight])
    g_simple = torch.autograd.grad(simple.mean(), head.eps.weight)[0]
    torch.testing.assert_close(g_hybrid[0], g_simple)
    assert g_hybrid[1].abs().sum() > 0


@pytest.mark.parametrize("n, clip", [(6, 950), (20, 999)])
def test_sampler_equals_diffusers_learned_range_ddpm_on_the_respaced_timesteps(n, clip):
    sched = _scheduler(variance_type="learned_range")
    kept = head_timesteps(n, 1000, clip)
    sched.set_timesteps(timesteps=kept)
    grid = vp_grid(sched.alphas_cumprod, kept)
    torch.manual_seed(0)
    w_eps, w_v = torch.randn(3, 3) * 0.3, torch.randn(3, 3) * 0.3

    def net(x, timestep):
        return torch.cat([torch.tanh(x @ w_eps + timestep / 1000), torch.tanh(x @ w_v)], dim=1)

    def model_fn(x, i, timestep):
        out = net(x, timestep)
        ab = float(grid[i, 1])
        return (x - (1 - ab) ** 0.5 * out[:, :3]) / ab**0.5, out[:, 3:]

    x = torch.randn(5, 3)
    ours = sample_learned_range(model_fn, x.clone(), grid, generator=torch.Generator().manual_seed(3))
    g, ref = torch.Generator().manual_seed(3), x.clone()
    for t in sched.timesteps:
        ref = sched.step(net(ref, float(t)), t, ref, generator=g).prev_sample
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_sampler_with_v_zero_is_the_fixed_small_sampler_and_temperature_scales_its_noise():
    ac = _scheduler().alphas_cumprod
    grid = vp_grid(ac, head_timesteps(8))
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(2)) * 0.3

    def denoised(x, i, timestep):
        return torch.tanh(x @ w) * (1 + timestep / 1000)

    x = torch.randn(4, 3)
    for temperature in (1.0, 0.6):
        fixed = sample_ddpm_ancestral(denoised, x, grid, generator=torch.Generator().manual_seed(5),
                                      temperature=temperature)
        learned = sample_learned_range(lambda *a: (denoised(*a), -torch.ones(4, 3)), x, grid,
                                       generator=torch.Generator().manual_seed(5), temperature=temperature)
        torch.testing.assert_close(learned, fixed, rtol=1e-5, atol=1e-5)


def _pipe(learn_sigma):
    torch.manual_seed(0)
    model = MaskedAutoregressiveModel(sample_size=4, in_channels=1, patch_size=2, width=16, depth=1,
                                      num_heads=2, num_classes=3, head_width=16, head_depth=1,
                                      learn_sigma=learn_sigma)
    pipe = MaskedAutoregressivePipeline(model, _scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folders_without_learn_sigma_load_the_epsilon_head_and_v_zero_samples_as_it(tmp_path):
    fixed, learned = _pipe(False), _pipe(True)
    g = torch.Generator().manual_seed(1)
    for layer in (fixed.mar.head.out, fixed.mar.head.ada[1]):
        layer.weight.data = torch.randn(layer.weight.shape, generator=g) * 0.1
        layer.bias.data = layer.bias + 0.05
    state = fixed.mar.state_dict()
    out_w, out_b = state.pop("head.out.weight"), state.pop("head.out.bias")
    learned.mar.load_state_dict(state, strict=False)
    learned.mar.head.out.weight.data = torch.cat([out_w, torch.zeros_like(out_w)])
    learned.mar.head.out.bias.data = torch.cat([out_b, -torch.ones_like(out_b)])  # v_raw = -1: v = 0
    for schedule in (None, "cosine"):
        kw = dict(batch_size=3, num_iter=3, step_schedule=schedule, diffusion_steps=8, min_diffusion_steps=3,
                  guidance_scale=2.0, output_type="pt")
        torch.testing.assert_close(learned(generator=torch.Generator().manual_seed(4), **kw).images,
                                   fixed(generator=torch.Generator().manual_seed(4), **kw).images,
                                   rtol=1e-5, atol=1e-5)
    # a folder exported before learn_sigma existed has no such key: it loads as the epsilon-only head
    fixed.mar.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("learn_sigma")
    (tmp_path / "config.json").write_text(json.dumps(config))
    old = MaskedAutoregressiveModel.from_pretrained(tmp_path)
    assert not old.config.learn_sigma and old.head.out.out_features == old.token_dim

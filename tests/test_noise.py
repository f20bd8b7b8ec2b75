"""NoiseSchedule against diffusers' own add_noise, get_velocity and DDIMScheduler.step."""

import diffusers
import pytest
import torch

from distill.noise import NoiseSchedule
from distill.pipelines.samplers import trailing_timesteps

SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
def test_vp_matches_add_noise_and_velocity(beta_schedule):
    sched = diffusers.DDPMScheduler(beta_schedule=beta_schedule)
    ns = NoiseSchedule.from_scheduler(sched)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    ks = torch.tensor([0, 1, 250, 500, 998, 999])
    t = ns.t_from_timestep(ks)
    torch.testing.assert_close(ns.add_noise(x0, eps, t), sched.add_noise(x0, eps, ks), atol=1e-5, rtol=0)
    v = ns.from_x0_eps(x0, eps, t, "v_prediction")
    torch.testing.assert_close(v, sched.get_velocity(x0, eps, ks), atol=1e-5, rtol=0)
    torch.testing.assert_close(ns.timestep(t), ks.float(), atol=1e-3, rtol=0)


@pytest.mark.parametrize("src", ["epsilon", "sample", "v_prediction", "flow"])
@pytest.mark.parametrize("dst", ["epsilon", "sample", "v_prediction", "flow"])
def test_conversions_round_trip(src, dst):
    ns = NoiseSchedule.vp_from_betas("squaredcos_cap_v2")
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    x_t = ns.add_noise(x0, eps, t)
    out = ns.from_x0_eps(x0, eps, t, src)
    conv = ns.convert(out, x_t, t, src, dst)
    torch.testing.assert_close(conv, ns.from_x0_eps(x0, eps, t, dst), atol=1e-4, rtol=1e-4)
    x0_back, eps_back = ns.to_x0_eps(conv, x_t, t, dst)
    torch.testing.assert_close(x0_back, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps_back, eps, atol=1e-4, rtol=1e-4)


def test_score_is_minus_eps_over_sigma():
    ns = NoiseSchedule.vp_from_betas("linear")
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    t = torch.full((4,), 0.4, dtype=torch.float64)
    x_t = ns.add_noise(x0, eps, t)
    torch.testing.assert_close(ns.score_from_x0(x0, x_t, t), -eps / ns.sigma(t)[:, None].float(),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
# diffusers steps to t - T//n: exact grids only when n divides T
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_ddim_step_matches_diffusers_trailing(beta_schedule, pred, steps):
    ddim = diffusers.DDIMScheduler(beta_schedule=beta_schedule, prediction_type=pred,
                                   timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)
    ddim.set_timesteps(steps)
    ns = NoiseSchedule.from_scheduler(ddim)
    T = ns.num_train_timesteps
    times = [k / (T - 1) for k in trailing_timesteps(steps, T)]
    assert [round(t * 999) for t in times] == ddim.timesteps.tolist()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 4, 4, generator=g)
    ref = x.clone()
    for i, k in enumerate(ddim.timesteps):
        out = torch.randn(3, 2, 4, 4, generator=g)  # any network output
        ref = ddim.step(out, k, ref).prev_sample
        t = times[i]
        x0, _ = ns.to_x0_eps(out, x, t)
        x = ns.ddim_step(x, x0, t, times[i + 1] if i + 1 < steps else None)
        torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-5)


def test_logsnr_continuous_and_monotone():
    ns = NoiseSchedule.vp_from_betas("squaredcos_cap_v2")
    t = torch.linspace(0, 1, 5001, dtype=torch.float64)
    lam = ns.logsnr(t)
    assert (lam[1:] < lam[:-1]).all()
    a, s = ns.alpha(t), ns.sigma(t)
    torch.testing.assert_close(a * a + s * s, torch.ones_like(a))


def test_flow_matches_flowmatch_scale_noise():
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ns = NoiseSchedule.from_scheduler(sched)
    assert ns.kind == "flow" and ns.prediction_type == "flow"
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    sched.set_timesteps(10)
    for k, sig in zip(sched.timesteps[:5], sched.sigmas[:5]):
        t = (sig / (3.0 - 2.0 * sig)).item()  # invert the shift s = 3t / (1 + 2t)
        torch.testing.assert_close(ns.sigma(t).float(), sig, atol=1e-6, rtol=0)
        ref = sched.scale_noise(x0, k.reshape(1), eps)
        torch.testing.assert_close(ns.add_noise(x0, eps, t), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(ns.timestep(t), k, atol=1e-2, rtol=0)
    # flow velocity eps - x0 converts to x0 exactly
    t = torch.tensor(0.37, dtype=torch.float64)
    x_t = ns.add_noise(x0, eps, t)
    torch.testing.assert_close(ns.to_x0_eps(eps - x0, x_t, t, "flow")[0], x0, atol=1e-5, rtol=0)


def test_edm_sigmas_match_karras():
    sched = diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, rho=7.0)
    ns = NoiseSchedule.from_scheduler(sched)
    sched.set_timesteps(12)
    ts = torch.linspace(1, 0, 12, dtype=torch.float64)
    torch.testing.assert_close(ns.sigma(ts).float(), sched.sigmas[:-1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ns.timestep(ts), sched.timesteps.float(), rtol=1e-4, atol=1e-5)
    assert float(ns.alpha(0.3)) == 1.0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="prediction_type 'eps'"):
        NoiseSchedule(kind="vp", alphas_cumprod=torch.ones(3) * 0.5, prediction_type="eps")

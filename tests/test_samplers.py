"""The one sampler signature: DDIM, Meng's stochastic sampler and DDPM ancestral sampling as pure functions
(checked against diffusers' DDIMScheduler), callbacks with x0, and matched noise levels across tables."""

import diffusers
import pytest
import torch

from distill.noise import NoiseSchedule
from distill.pipelines.samplers import (
    sample_ddim,
    sample_ddpm_ancestral,
    timestep_for,
    trailing_timesteps,
    vp_grid,
)


def _linear_model(x, t):
    return torch.tanh(0.7 * x) + 0.002 * t  # a fixed, nonlinear stand-in for a network's epsilon output


@pytest.mark.parametrize("eta,sampler", [(0.0, sample_ddim), (1.0, sample_ddpm_ancestral)])
@pytest.mark.parametrize("steps", [4, 10])
def test_samplers_equal_diffusers_ddim_with_eta(eta, sampler, steps):
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(steps)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    ref = x.clone()
    for t in sched.timesteps:
        ref = sched.step(_linear_model(ref, int(t)), t, ref, eta=eta, generator=g).prev_sample
    ac = sched.alphas_cumprod.to(torch.float64)
    times = vp_grid(ac, sched.timesteps.tolist())

    def model_fn(z, i, t):  # epsilon -> x0
        ab = float(times[i, 1])
        return (z - (1 - ab) ** 0.5 * _linear_model(z, int(t))) / ab**0.5

    out = sampler(model_fn, x.clone(), times, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    if eta:  # the fresh noise matters
        again = sampler(model_fn, x.clone(), times, generator=torch.Generator().manual_seed(6))
        assert (again - out).abs().max() > 1e-3


def test_callback_gets_step_time_state_and_x0():
    ac = diffusers.DDPMScheduler().alphas_cumprod
    times = vp_grid(ac, trailing_timesteps(3))
    seen = []
    x = torch.randn(2, 2, generator=torch.Generator().manual_seed(0))
    out = sample_ddim(lambda z, i, t: 0.5 * z, x, times, callback=seen.append)
    assert [s["i"] for s in seen] == [0, 1, 2] and [s["t"] for s in seen] == [999.0, 666.0, 332.0]
    assert set(seen[0]) == {"i", "t", "x", "denoised"}
    torch.testing.assert_close(seen[-1]["x"], out)
    torch.testing.assert_close(seen[-1]["denoised"], out)  # the last step returns the clean prediction
    with pytest.raises(ValueError, match="strictly descending"):
        vp_grid(ac, [10, 20])


def test_timestep_for_meets_another_table_at_the_same_noise_level():
    lin = diffusers.DDPMScheduler(beta_schedule="linear").alphas_cumprod.to(torch.float64)
    cos = NoiseSchedule.vp_from_betas("squaredcos_cap_v2")
    for t in (0, 250, 999):  # exact on the table's own entries
        assert timestep_for(lin, float(lin[t])) == float(t)
    for k in (100, 400, 750):  # a linear-table noise level located on the cosine table
        target = float(lin[k])
        t = timestep_for(cos.alphas_cumprod, target)
        assert 0 < t < 999 and t != k
        lam = cos.logsnr(torch.tensor(t / 999, dtype=torch.float64))
        torch.testing.assert_close(lam, torch.log(torch.tensor(target / (1 - target), dtype=torch.float64)))

"""The one sampler signature: DDIM, Meng's stochastic sampler and DDPM ancestral sampling as pure functions
(checked against diffusers' DDIMScheduler), callbacks with x0, and matched noise levels across tables."""

import diffusers
import numpy as np
import pytest
import torch

from distill.noise import NoiseSchedule
from distill.pipelines import FewStepPipeline
from distill.pipelines.samplers import (
    ddim_rows,
    sample_ddim,
    sample_ddpm_ancestral,
    sample_meng_stochastic,
    timestep_for,
    trailing_timesteps,
    vp_grid,
)


def _linear_model(x, t):
    return torch.tanh(0.7 * x) + 0.002 * t  # a fixed, nonlinear stand-in for a network's epsilon output


def _diffusers_ddim(steps: int, eta: float, set_alpha_to_one: bool = True):
    """diffusers' DDIMScheduler (trailing, SD's betas) run on ``_linear_model`` from a fixed start: the
    scheduler, the start and diffusers' result."""
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    timestep_spacing="trailing", clip_sample=False,
                                    set_alpha_to_one=set_alpha_to_one)
    sched.set_timesteps(steps)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    ref = x.clone()
    for t in sched.timesteps:
        ref = sched.step(_linear_model(ref, int(t)), t, ref, eta=eta, generator=g).prev_sample
    return sched, x, ref


def _ours(sampler, x, times, seed: int = 5):
    """``sampler`` on ``_linear_model`` (epsilon, turned into x0 at each row's alpha_bar) over ``times``."""
    def model_fn(z, i, t):
        ab = float(times[i, 1])
        return (z - (1 - ab) ** 0.5 * _linear_model(z, int(t))) / ab**0.5

    return sampler(model_fn, x.clone(), times, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("eta,sampler", [(0.0, sample_ddim), (1.0, sample_ddpm_ancestral)])
@pytest.mark.parametrize("steps", [4, 10])
def test_samplers_equal_diffusers_ddim_with_eta(eta, sampler, steps):
    sched, x, ref = _diffusers_ddim(steps, eta)
    times = vp_grid(sched.alphas_cumprod.to(torch.float64), sched.timesteps.tolist())
    out = _ours(sampler, x, times)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    if eta:  # the fresh noise matters
        assert (_ours(sampler, x, times, seed=6) - out).abs().max() > 1e-3


@pytest.mark.parametrize("eta,sampler", [(0.0, sample_ddim), (1.0, sample_ddpm_ancestral)])
@pytest.mark.parametrize("steps", [3, 6, 7, 48])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_rows_equal_diffusers_ddim_at_every_step_count(eta, sampler, steps, set_alpha_to_one):
    """diffusers steps from t to t - T // N (not to the next trailing timestep when N does not divide T)
    and ends at alpha_bar_0 without set_alpha_to_one: ddim_rows reproduces both, the plain trailing grid
    does not."""
    sched, x, ref = _diffusers_ddim(steps, eta, set_alpha_to_one)
    ac = sched.alphas_cumprod.to(torch.float64)
    times = ddim_rows(ac, steps, float(sched.final_alpha_cumprod))
    assert times[:, 0].tolist() == sched.timesteps.tolist()
    torch.testing.assert_close(_ours(sampler, x, times), ref, rtol=1e-6, atol=1e-6)
    rows_only = _ours(sampler, x, vp_grid(ac, sched.timesteps.tolist()))
    assert (rows_only - ref).abs().max() > 1e-4  # N = 6 with set_alpha_to_one: 1000 % 6 = 4


def test_trailing_timesteps_are_diffusers_at_every_step_count():
    """diffusers' trailing grid rounds np.arange's values (937.4999... at N = 48 -> 936, where rounding
    1000 - 3 T / N = 937.5 would give 937): equal to DDIMScheduler.set_timesteps for every N <= 1000."""
    sched = diffusers.DDIMScheduler(timestep_spacing="trailing")
    for n in range(1, 1001):
        sched.set_timesteps(n)
        assert trailing_timesteps(n) == sched.timesteps.tolist(), n


def test_teacher_ddim_baselines_are_diffusers_ddim_pipeline_at_any_step_count():
    """A teacher's 'DDIM N steps' baseline (FewStepPipeline with the teacher's DDIMScheduler) equals
    diffusers' own DDIMPipeline, at N = 7 (not a divisor of 1000) with either set_alpha_to_one; so does
    Teacher.sample."""
    from distill.teachers import Teacher

    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    torch.manual_seed(0)
    for p in unet.parameters():  # an untrained UNet whose output depends on x and t
        p.data.normal_(0, 0.1)
    for flag in (True, False):
        ddim = diffusers.DDIMScheduler(timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=flag)
        ref = diffusers.DDIMPipeline(unet, ddim)(batch_size=2, num_inference_steps=7, output_type="np",
                                                 generator=torch.Generator().manual_seed(3)).images
        ours = FewStepPipeline(unet, ddim, num_inference_steps=7)(
            batch_size=2, generator=torch.Generator().manual_seed(3), output_type="np").images
        np.testing.assert_allclose(ours, ref, atol=1e-5)
        teacher = Teacher.from_model(unet, diffusers.DDIMScheduler(set_alpha_to_one=flag), source="test")
        x = teacher.sample(2, 7, torch.Generator().manual_seed(3))
        np.testing.assert_allclose((x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), ref, atol=1e-5)
    with pytest.raises(ValueError, match="vp_grid"):
        sample_meng_stochastic(lambda z, i, t: z, x, ddim_rows(ddim.alphas_cumprod, 3))


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

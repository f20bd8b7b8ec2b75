"""The Denoiser: a network read at continuous time in its prediction type, classifier-free guided; checked
against diffusers' own scheduler arithmetic and against separate conditional / unconditional passes."""

import diffusers
import pytest
import torch

from distill.backbones import guidance_kwargs
from distill.conditioning import Condition
from distill.denoiser import Denoiser
from distill.models.guided_unet import GuidedUNet2DModel
from distill.noise import NoiseSchedule


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("k", [1, 250, 625, 999])
def test_x0_equals_diffusers_pred_original_sample(tiny_unet, pred, k):
    """At a training index k, x0 is DDPMScheduler.step's pred_original_sample for every prediction type."""
    net = tiny_unet(sample_size=8, in_channels=2)
    sched = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=pred,
                                    clip_sample=False)
    schedule = NoiseSchedule.from_scheduler(sched)
    den = Denoiser(net, schedule)
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(k))
    with torch.no_grad():
        got = den.x0(x, schedule.t_from_timestep(k))
        out = net(x, k).sample
    want = sched.step(out, k, x).pred_original_sample
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(den.output(x, schedule.t_from_timestep(k)), out)


def test_guidance_is_bound_once_and_mixes_two_passes(tiny_unet):
    """The bound scale s gives u + s (c - u) from one batched pass; a call may override it (per example too),
    and s = 1 or no condition is one plain pass."""
    net = tiny_unet(sample_size=8, in_channels=1, num_class_embeds=4)
    schedule = NoiseSchedule.vp_from_betas(prediction_type="epsilon")
    null = Condition(class_labels=torch.tensor([3]))
    cond = Condition(class_labels=torch.tensor([0, 1, 2, 0]), null=null)
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 0.4, dtype=torch.float64)
    plain = Denoiser(net, schedule)
    with torch.no_grad():
        c = plain.output(x, t, cond)
        u = plain.output(x, t, Condition(class_labels=torch.full((4,), 3)))
        guided = Denoiser(net, schedule, guidance_scale=2.5)
        torch.testing.assert_close(guided.output(x, t, cond), u + 2.5 * (c - u), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(guided.output(x, t, cond, guidance_scale=1.0), c)
        per_example = torch.tensor([1.0, 2.0, 3.0, 4.0])
        want = u + per_example.view(-1, 1, 1, 1) * (c - u)
        torch.testing.assert_close(guided.output(x, t, cond, guidance_scale=per_example), want,
                                   rtol=1e-5, atol=1e-5)
        # x0 of the guided output = the guided x0 (every parameterisation is affine in the output)
        x0c, x0u = plain.x0(x, t, cond), plain.x0(x, t, Condition(class_labels=torch.full((4,), 3)))
        torch.testing.assert_close(guided.x0(x, t, cond), x0u + 2.5 * (x0c - x0u), rtol=1e-4, atol=1e-4)


def test_a_guidance_input_reaches_the_network_as_w(tiny_unet):
    """A w-conditioned network (guided distillation) gets w as its input, not a two-pass mix."""
    net = GuidedUNet2DModel.from_unet(tiny_unet(num_class_embeds=4), guidance_embed_dim=16)
    torch.nn.init.normal_(net.guidance_embedding[-1].weight)  # zero-initialised: make w matter
    schedule = NoiseSchedule.vp_from_betas(prediction_type="v_prediction")
    den = Denoiser(net, schedule)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.7], dtype=torch.float64)
    cond = Condition(class_labels=torch.tensor([1, 2]))
    w = torch.tensor([0.0, 3.0])
    with torch.no_grad():
        got = den.output(x, t, cond, w=w)
        want = net(x, schedule.timestep(t), class_labels=cond.class_labels, **guidance_kwargs(net, w)).sample
        torch.testing.assert_close(got, want)
        assert not torch.allclose(got, den.output(x, t, cond, w=torch.zeros(2)))


def test_on_rebinds_the_network_only(tiny_unet):
    a, b = tiny_unet(seed=0), tiny_unet(seed=1)
    den = Denoiser(a, NoiseSchedule.vp_from_betas(), "sample", guidance_scale=3.0)
    other = den.on(b)
    assert other.network is b and den.network is a
    assert (other.schedule, other.prediction_type, other.guidance_scale) == (den.schedule, "sample", 3.0)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_exported_pipelines_convert_and_guide_as_the_denoiser(tiny_unet, pred):
    """The pipelines' standalone copies (x0 at table coefficients, classifier-free guidance) give the
    Denoiser's guided x0 at integer timesteps of the table, which diffusers' DDPMScheduler confirms."""
    from distill.pipelines.one_step import classifier_free_guidance, x0_from_output

    net = tiny_unet(sample_size=8, in_channels=2, num_class_embeds=3)
    sched = diffusers.DDPMScheduler(prediction_type=pred, clip_sample=False)
    schedule = NoiseSchedule.from_scheduler(sched)
    den = Denoiser(net, schedule, guidance_scale=3.0)
    cond = Condition(class_labels=torch.tensor([0, 1]), null=Condition(class_labels=torch.tensor([2])))
    for k in (10, 500, 990):
        x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(k))
        ab = float(sched.alphas_cumprod[k])
        with torch.no_grad():
            c = net(x, k, class_labels=torch.tensor([0, 1])).sample
            u = net(x, k, class_labels=torch.tensor([2, 2])).sample
            out = classifier_free_guidance(c, u, 3.0)
            want = x0_from_output(out, x, ab**0.5, (1 - ab) ** 0.5, pred)
            got = den.x0(x, schedule.t_from_timestep(k), cond)
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)
        torch.testing.assert_close(want, sched.step(out, k, x).pred_original_sample, rtol=2e-4, atol=2e-4)

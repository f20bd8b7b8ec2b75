"""The exact Gaussian-mixture teacher and the Teacher wrapper."""

import diffusers
import numpy as np
import pytest
import torch

from distill.data import toy_mixture
from distill.errors import ConfigError
from distill.models import GaussianMixtureTeacher
from distill.teachers import Teacher, analytic_teacher


@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("diagonal", [False, True])
def test_gmm_score_equals_autograd_of_log_density(pred, diagonal):
    g = torch.Generator().manual_seed(0)
    means = torch.randn(5, 3, generator=g)
    stds = (0.2 + torch.rand(5, 3, generator=g)) if diagonal else (0.2 + torch.rand(5, generator=g))
    gmm = GaussianMixtureTeacher(means.tolist(), stds.tolist(), weights=[1, 2, 3, 4, 5], prediction_type=pred)
    teacher = Teacher.from_model(gmm, diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2",
                                                              prediction_type=pred))
    for t in (0.05, 0.3, 0.61, 0.9):
        x = torch.randn(16, 3, generator=g, dtype=torch.float64).requires_grad_(True)
        logp = gmm.log_prob(x, timestep=t * 999).sum()
        (auto,) = torch.autograd.grad(logp, x)
        score = teacher.score(x.detach(), torch.tensor(t))
        torch.testing.assert_close(score, auto, rtol=1e-6, atol=1e-6 / teacher.schedule.sigma(t).item())


def test_gmm_ddim_200_steps_reproduces_weights_and_means():
    mix = toy_mixture("gaussians8")
    weights = [1, 1, 2, 2, 3, 3, 4, 4]
    gmm = GaussianMixtureTeacher(mix["means"], mix["stds"], weights=weights)
    teacher = Teacher.from_model(gmm, diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    n = 6000
    x = teacher.sample(n, num_steps=200, generator=torch.Generator().manual_seed(0))
    means = torch.tensor(mix["means"], dtype=torch.float32)
    comp = torch.cdist(x, means).argmin(1)
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    freq = torch.bincount(comp, minlength=8).double() / n
    se = (w * (1 - w) / n).sqrt()
    assert ((freq - w).abs() < 4 * se).all(), (freq, w)
    for k in range(8):
        xs = x[comp == k]
        assert (xs.mean(0) - means[k]).abs().max() < 4 * 0.1 / len(xs) ** 0.5 + 0.01
        assert abs(xs.std(0).mean().item() - 0.1) < 0.02


def test_gmm_in_stock_ddpm_pipeline():
    # two constant 1x4x4 images at -0.5 and +0.5, weights 1:3
    means = [[-0.5] * 16, [0.5] * 16]
    gmm = GaussianMixtureTeacher(means, [0.05, 0.05], weights=[1, 3], sample_shape=[1, 4, 4])
    pipe = diffusers.DDPMPipeline(unet=gmm,
                                  scheduler=diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    pipe.set_progress_bar_config(disable=True)
    img = pipe(batch_size=400, generator=torch.Generator().manual_seed(0), output_type="np",
               num_inference_steps=1000).images
    assert img.shape == (400, 4, 4, 1)
    m = img.reshape(400, -1).mean(1)
    hi = m > 0.5
    assert abs(hi.mean() - 0.75) < 4 * np.sqrt(0.75 * 0.25 / 400)
    assert abs(m[hi].mean() - 0.75) < 0.01 and abs(m[~hi].mean() - 0.25) < 0.01


def test_class_conditional_gmm_and_cfg_convention():
    teacher = analytic_teacher("toy:gaussians8", conditional=True)
    assert teacher.num_classes == 8
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(0.5)
    labels = teacher.condition(class_labels=torch.tensor([0, 1, 2, 3]))
    cond = teacher.network_output(x, t, labels)
    uncond = teacher.network_output(x, t, None)
    for gs in (1.0, 3.0, 7.5):
        guided = teacher.network_output(x, t, labels, guidance_scale=gs)
        torch.testing.assert_close(guided, uncond + gs * (cond - uncond))
    torch.testing.assert_close(teacher.network_output(x, t, labels, guidance_scale=1.0), cond)
    # the old label-tensor argument is refused clearly
    with pytest.raises(TypeError, match="teacher.condition"):
        teacher.network_output(x, t, torch.tensor([0, 1, 2, 3]))
    # the null label is the marginal mixture: equal to the unconditional teacher
    plain = analytic_teacher("toy:gaussians8")
    torch.testing.assert_close(plain.network_output(x, t), uncond)
    # conditional x0 near t=0 snaps to the labelled mode
    x0 = teacher.predict_x0(torch.zeros(8, 2), torch.tensor(0.99),
                            teacher.condition(class_labels=torch.arange(8)))
    means = torch.tensor(toy_mixture("gaussians8")["means"], dtype=torch.float32)
    assert torch.cdist(x0, means).argmin(1).tolist() == list(range(8))


def test_teacher_from_pretrained_folder_and_errors(tmp_path, tiny_unet):
    unet = tiny_unet(num_class_embeds=4)
    sched = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path / "t")
    # num_class_embeds=4 is 3 classes + a null class, or 4 classes: a stock folder does not say which
    with pytest.raises(ConfigError, match=r"num_class_embeds=4.*teacher\.num_classes: 3"):
        Teacher.from_pretrained(str(tmp_path / "t"))
    with pytest.raises(ConfigError, match="num_classes must be 3"):
        Teacher.from_pretrained(str(tmp_path / "t"), num_classes=4)
    teacher = Teacher.from_pretrained(str(tmp_path / "t"), num_classes=3)
    assert teacher.num_classes == 3 and teacher.prediction_type == "v_prediction"
    assert teacher.sample_shape == [1, 8, 8]
    x = torch.randn(2, 1, 8, 8)
    out = unet(x, torch.full((2,), 500.0), class_labels=torch.tensor([1, 2])).sample
    cond = teacher.condition(class_labels=torch.tensor([1, 2]))
    torch.testing.assert_close(teacher.network_output(x, torch.tensor(500 / 999), cond), out)
    with pytest.raises(FileNotFoundError, match="no_such_teacher"):
        Teacher.from_pretrained("./no_such_teacher")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        Teacher.from_pretrained("google/ddpm-cifar10-32")




def test_fid_teacher_wrapper_reads_the_class_count_or_refuses(tmp_path, tiny_unet):
    """A stock DDPMPipeline with a class-conditional UNet: num_class_embeds=4 may be 3 classes + null or 4
    classes; the FID wrapper refuses to guess, and takes the count its folder's model_index.json states."""
    import json

    from distill import load_pipeline
    from distill.eval.fid import teacher_as_sampler

    diffusers.DDPMPipeline(unet=tiny_unet(num_class_embeds=4),
                           scheduler=diffusers.DDPMScheduler()).save_pretrained(tmp_path / "t")
    with pytest.raises(ConfigError, match="num_class_embeds=4"):
        teacher_as_sampler(load_pipeline(str(tmp_path / "t")))
    index = json.loads((tmp_path / "t" / "model_index.json").read_text())
    (tmp_path / "t" / "model_index.json").write_text(json.dumps({**index, "num_classes": 3}))
    few = teacher_as_sampler(load_pipeline(str(tmp_path / "t")))
    assert few.config.num_classes == 3 and type(few.scheduler).__name__ == "DDIMScheduler"

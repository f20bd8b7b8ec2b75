"""HybridPipeline (Gandikota & Bau 2025): base steps first, the distilled student after, on one DDIM chain."""

import diffusers
import numpy as np
import pytest
import torch

from distill import FewStepPipeline, HybridPipeline, OneStepPipeline, export_pipeline, load_pipeline
from distill.models import GaussianMixtureTeacher
from distill.pipelines.samplers import trailing_timesteps
from distill.teachers import analytic_teacher

MEANS = [[-1.0, 0.5], [1.5, -0.5]]


def _gmm(beta_schedule="squaredcos_cap_v2", stds=(0.3, 0.2), means=MEANS, prediction_type="epsilon",
         classes=None):
    model = GaussianMixtureTeacher(means, list(stds), component_classes=classes, beta_schedule=beta_schedule,
                                   prediction_type=prediction_type)
    return model, diffusers.DDPMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type)


def _pipes(student_schedule="squaredcos_cap_v2"):
    base_net, base_sched = _gmm()
    # a "student": a different mixture (so the two models are told apart), few-step on the trailing
    # 4-step grid
    student_net, student_sched = _gmm(student_schedule, stds=(0.1, 0.1), means=[[0.0, 1.0], [1.0, 0.0]],
                                      prediction_type="sample")
    base = FewStepPipeline(base_net, base_sched, num_inference_steps=4, sample_shape=[2])
    student = FewStepPipeline(student_net, student_sched, num_inference_steps=4, sample_shape=[2])
    for p in (base, student):
        p.set_progress_bar_config(disable=True)
    return base, student


def _run(pipe, **kw):
    return pipe(batch_size=64, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images


def test_zero_base_steps_is_the_student_and_all_base_steps_is_the_base():
    base, student = _pipes()
    hybrid = HybridPipeline.from_pipelines(base, student)
    hybrid.set_progress_bar_config(disable=True)
    torch.testing.assert_close(_run(hybrid, num_base_steps=0), _run(student), rtol=0, atol=0)
    torch.testing.assert_close(_run(hybrid, num_base_steps=4), _run(base, timesteps=trailing_timesteps(4)),
                               rtol=0, atol=0)
    one, two = _run(hybrid, num_base_steps=1), _run(hybrid, num_base_steps=2)
    assert (one - _run(student)).abs().max() > 1e-3 and (one - two).abs().max() > 1e-3
    out = hybrid(batch_size=5, num_base_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt",
                 return_trajectory=True)
    assert len(out.trajectory) == 4 and all(t.shape == (5, 2) for t in out.trajectory)
    torch.testing.assert_close(out.trajectory[-1], out.images)
    with pytest.raises(ValueError, match="num_base_steps=5"):
        hybrid(batch_size=2, num_base_steps=5)


def test_one_step_student_with_and_without_base_steps():
    base, _ = _pipes()
    gen_net, gen_sched = _gmm(stds=(0.1, 0.1), prediction_type="sample")
    student = OneStepPipeline(gen_net, gen_sched, generator_timestep=625, sample_shape=[2])
    student.set_progress_bar_config(disable=True)
    hybrid = HybridPipeline.from_pipelines(base, student)
    hybrid.set_progress_bar_config(disable=True)
    torch.testing.assert_close(_run(hybrid, num_base_steps=0), _run(student), rtol=0, atol=0)
    assert hybrid.grid(2)[0] == [999, 812, 625]
    # two base steps: a hand-written loop of the base's DDIM (Song et al. 2021, eq. 12) from z at 999 to 812
    # and on to t* = 625, where the generator takes over; each step's clean prediction is the trajectory
    z = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    ac = base.scheduler.alphas_cumprod.to(torch.float64)
    x, expected = z.double(), []
    for t, t_next in ((999, 812), (812, 625)):
        eps = base.unet(x, torch.tensor(t)).sample
        x0 = (x - (1 - ac[t]).sqrt() * eps) / ac[t].sqrt()
        x = ac[t_next].sqrt() * x0 + (1 - ac[t_next]).sqrt() * eps
        expected.append(x0)
    expected.append(gen_net(x, torch.tensor(625)).sample)
    with pytest.warns(UserWarning, match="outside the hybrid paper's setting"):
        out = hybrid(batch_size=3, num_base_steps=2, latents=z, output_type="pt", return_trajectory=True)
    for got, want in zip(out.trajectory, expected, strict=True):
        torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.images, expected[-1].float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_stochastic_steps_are_lcm_schedulers_steps(k):
    """student_sampler="stochastic" is the paper's setting (DMD2 with diffusers' LCMScheduler, the base
    through the same scheduler): the outputs of k base steps and then the student's go through
    ``LCMScheduler.step`` on the student's grid (LCM's own 4 steps, 999 759 499 259; SD's scaled-linear
    table), one generator drawing z and then each step's fresh noise. k = 0: the student alone as diffusers
    samples it."""
    from diffusers.utils.torch_utils import randn_tensor

    table = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    base_net = GaussianMixtureTeacher(MEANS, [0.3, 0.2], **table)
    st_net = GaussianMixtureTeacher([[0.0, 1.0], [1.0, 0.0]], [0.1, 0.1], **table)  # epsilon: one scheduler
    sched = diffusers.DDPMScheduler(**table)
    lcm = diffusers.LCMScheduler(**table)
    lcm.set_timesteps(4)
    grid = lcm.timesteps.tolist()
    assert grid == [999, 759, 499, 259]
    base = FewStepPipeline(base_net, sched, num_inference_steps=4, sample_shape=[2])
    student = FewStepPipeline(st_net, sched, timesteps=grid, sample_shape=[2])
    hybrid = HybridPipeline.from_pipelines(base, student, student_sampler="stochastic")
    hybrid.set_progress_bar_config(disable=True)
    out = hybrid(batch_size=64, num_base_steps=k, generator=torch.Generator().manual_seed(0),
                 output_type="pt", return_trajectory=True)
    gen = torch.Generator().manual_seed(0)
    x = randn_tensor((64, 2), generator=gen, dtype=hybrid.dtype)  # the mixtures': float64
    for i, t in enumerate(lcm.timesteps):
        step = lcm.step((base_net if i < k else st_net)(x, t).sample, t, x, generator=gen)
        x = step.prev_sample
        torch.testing.assert_close(out.trajectory[i], step.denoised.float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.images, x.float(), rtol=0, atol=1e-5)
    # the deterministic chain is another: same z, no fresh noise
    ddim = hybrid(batch_size=64, num_base_steps=k, generator=torch.Generator().manual_seed(0),
                  output_type="pt", student_sampler="ddim").images
    assert (ddim - out.images).abs().max() > 0.1
    with pytest.raises(ValueError, match="student_sampler='lcm'"):
        hybrid(batch_size=2, student_sampler="lcm")


def test_stochastic_one_step_student_and_base_substeps_in_closed_form():
    """Stochastic with a one-step generator after 2 base steps: each step onto a grid row is
    x' = sqrt(abar') x0 + sqrt(1 - abar') eps_new, eps_new the generator's draws after z; base sub-steps
    (num_base_substeps = 2: 999 -> 906 inside the first base interval) stay DDIM and draw nothing."""
    base, _ = _pipes()
    gen_net, gen_sched = _gmm(stds=(0.1, 0.1), prediction_type="sample")
    student = OneStepPipeline(gen_net, gen_sched, generator_timestep=625, sample_shape=[2])
    hybrid = HybridPipeline.from_pipelines(base, student, student_sampler="stochastic")
    hybrid.set_progress_bar_config(disable=True)
    ac = base.scheduler.alphas_cumprod.to(torch.float64)

    def x0_base(x, t):
        return (x - (1 - ac[t]).sqrt() * base.unet(x, torch.tensor(t)).sample) / ac[t].sqrt()

    for m, rows in ((1, [999, 812, 625]), (2, [999, 906, 812, 718, 625])):
        assert hybrid.schedule(2, num_base_substeps=m)[0][:, 0].tolist() == rows
        gen = torch.Generator().manual_seed(0)
        z = torch.randn(5, 2, generator=gen, dtype=torch.float64)  # the mixtures' dtype
        x = z
        for t, t_next in zip(rows, rows[1:]):
            x0 = x0_base(x, t)
            if rows.index(t_next) % m == 0:  # a grid row: fresh noise
                eps = torch.randn(5, 2, generator=gen, dtype=torch.float64)
            else:  # a base sub-step: DDIM
                eps = (x - ac[t].sqrt() * x0) / (1 - ac[t]).sqrt()
            x = ac[t_next].sqrt() * x0 + (1 - ac[t_next]).sqrt() * eps
        with pytest.warns(UserWarning, match="outside the hybrid paper's setting"):
            out = hybrid(batch_size=5, num_base_steps=2, num_base_substeps=m,
                         generator=torch.Generator().manual_seed(0), output_type="pt").images
        torch.testing.assert_close(out, gen_net(x, torch.tensor(625)).sample.float(), rtol=0, atol=1e-5)


def test_hand_over_is_at_the_students_noise_level_in_closed_form():
    """Base on a cosine table, student on a linear one. (a) For data that is a point mass the base's clean
    prediction is exact, and a chain started on the true marginal of its first row hands the student exactly
    the marginal of the student's first row: N(sqrt(abar) mu, 1 - abar) with abar from the STUDENT's table.
    (b) For Gaussian data the hand-over is the DDIM step with the exact posterior mean at the student's noise
    level (an index reused across tables would evaluate the base at another level and fail)."""
    mu = torch.tensor([[0.7, -0.4]], dtype=torch.float64)
    seen = {}

    class Spy(torch.nn.Module):  # records the student's input and predicts x0 = 0
        def __init__(self, net):
            super().__init__()
            self.net, self.config, self.dtype = net, net.config, torch.float32

        def forward(self, x, t, **kw):
            if "x" not in seen:  # the student's first call: the hand-over state
                seen["x"], seen["t"] = x.clone(), t
            return self.net(x, t, **kw)

    for std, atol in ((1e-4, 1e-5), (0.5, 1e-6)):
        seen.clear()
        base_net, base_sched = _gmm("squaredcos_cap_v2", stds=(std,), means=mu.tolist())
        st_net, st_sched = _gmm("linear", stds=(0.1,), means=[[0.0, 0.0]], prediction_type="sample")
        base = FewStepPipeline(base_net.double(), base_sched, num_inference_steps=4, sample_shape=[2])
        student = FewStepPipeline(Spy(st_net.double()), st_sched, num_inference_steps=4, sample_shape=[2])
        hybrid = HybridPipeline.from_pipelines(base, student)
        hybrid.set_progress_bar_config(disable=True)
        ac = st_sched.alphas_cumprod.to(torch.float64)
        t0, t1 = trailing_timesteps(4)[:2]
        a0, s0, a1, s1 = ac[t0].sqrt(), (1 - ac[t0]).sqrt(), ac[t1].sqrt(), (1 - ac[t1]).sqrt()
        xi = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        z = a0 * mu + s0 * xi  # the true marginal at the first row (student's table)
        hybrid(batch_size=len(z), num_base_steps=1, latents=z, output_type="pt")
        assert int(seen["t"][0]) == t1
        var = std**2
        # exact posterior mean at the student's level
        x0 = mu + a0 * var / (a0**2 * var + s0**2) * (z - a0 * mu)
        expected = a1 * x0 + s1 * (z - a0 * x0) / s0
        torch.testing.assert_close(seen["x"], expected, rtol=0, atol=atol)
        if std < 1e-3:  # the point mass: exactly the student's first-step marginal
            x1 = seen["x"]
            torch.testing.assert_close(x1.mean(0), (a1 * mu)[0], atol=4 * s1.item() / len(z) ** 0.5, rtol=0)
            torch.testing.assert_close(x1.std(0), s1.expand(2), atol=0.02, rtol=0)


def test_hybrid_exports_and_reloads(tmp_path):
    teacher = analytic_teacher("gaussians8", conditional=True)
    base = FewStepPipeline(teacher.model, teacher.scheduler, num_inference_steps=4, sample_shape=[2],
                           num_classes=8)
    student = FewStepPipeline(teacher.model, teacher.scheduler, num_inference_steps=2, sample_shape=[2],
                              num_classes=8)
    hybrid = HybridPipeline.from_pipelines(base, student, num_base_steps=1)
    path = export_pipeline(hybrid, tmp_path / "hybrid")
    again = load_pipeline(str(path))
    assert type(again).__name__ == "HybridPipeline" and again.config.num_base_steps == 1
    for p in (hybrid, again):
        p.set_progress_bar_config(disable=True)
    labels = torch.arange(16) % 8
    a = hybrid(batch_size=16, class_labels=labels, base_guidance_scale=2.0,
               generator=torch.Generator().manual_seed(3), output_type="np").images
    b = again(batch_size=16, class_labels=labels, base_guidance_scale=2.0,
              generator=torch.Generator().manual_seed(3), output_type="np").images
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="same classes"):
        HybridPipeline.from_pipelines(base, FewStepPipeline(*_gmm(), num_inference_steps=2, sample_shape=[2]))


# ---------------------------------------------------------------------- diversity metrics
def test_diversity_metrics_in_closed_form():
    from distill.eval.diversity import diversity_by_condition, pairwise_distance, vendi

    eye = torch.eye(5)
    assert pairwise_distance(eye) == pytest.approx(1.0) and vendi(eye) == pytest.approx(5.0)
    same = torch.ones(4, 3)
    assert pairwise_distance(same) == pytest.approx(0.0, abs=1e-12) and vendi(same) == pytest.approx(1.0)
    two = torch.cat([torch.tensor([[1.0, 0.0]]).repeat(3, 1), torch.tensor([[0.0, 2.0]]).repeat(3, 1)])
    assert vendi(two) == pytest.approx(2.0)  # two distinct directions, equally often: 2 effective samples
    assert pairwise_distance(two) == pytest.approx(9 / 15)  # 9 of the 15 pairs are orthogonal
    f = torch.randn(7, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u = f / f.norm(dim=1, keepdim=True)
    lam = np.linalg.eigvalsh((u @ u.T).numpy() / 7)
    lam = lam[lam > 1e-15]
    assert vendi(f) == pytest.approx(float(np.exp(-(lam * np.log(lam)).sum())), rel=1e-9)
    cos = (u @ u.T).numpy()
    assert pairwise_distance(f) == pytest.approx(
        float(np.mean([1 - cos[i, j] for i in range(7) for j in range(i)])))
    div = diversity_by_condition(torch.cat([eye, torch.ones(4, 5)]), [0] * 5 + [1] * 4)
    assert div["per_condition"][0]["vendi"] == pytest.approx(5.0) and div["vendi"] == pytest.approx(3.0)


def test_hybrid_cli_trajectory_grid_and_fid_diversity(tmp_path):
    from distill.cli import main
    from distill.eval.fid import teacher_as_sampler

    digits = "distill/assets/digits_teacher"
    few = teacher_as_sampler(load_pipeline(digits))
    few.register_to_config(num_inference_steps=2)
    export_pipeline(few, tmp_path / "student")  # the teacher at 2 steps stands in for a few-step student
    assert main(["hybrid", digits, str(tmp_path / "student"), "--num-base-steps", "1", "--out",
                 str(tmp_path / "hybrid")]) == 0
    assert main(["hybrid", digits, str(tmp_path / "student"), "--num-base-steps", "1", "--student-sampler",
                 "stochastic", "--out", str(tmp_path / "lcm")]) == 0
    assert load_pipeline(str(tmp_path / "lcm")).config.student_sampler == "stochastic"
    assert load_pipeline(str(tmp_path / "hybrid")).config.student_sampler == "ddim"
    assert main(["hybrid", digits, str(tmp_path / "student"), "--num-base-steps", "3", "--out",
                 str(tmp_path / "bad")]) == 2  # more base steps than the student's grid has
    assert main(["sample", str(tmp_path / "hybrid"), "--trajectory", "--num-images", "3", "--out",
                 str(tmp_path / "traj.png")]) == 0
    from PIL import Image

    w, h = Image.open(tmp_path / "traj.png").size
    assert w < h  # 2 columns (steps) by 3 rows (samples)
    assert main(["sample", str(tmp_path / "student"), "--trajectory", "--out", str(tmp_path / "x.png")]) == 2
    assert main(["fid", str(tmp_path / "hybrid"), "--reference", "sklearn:digits", "--num-samples", "60",
                 "--metrics", "fid", "--diversity", "--out", str(tmp_path / "rep")]) == 0
    import json

    row = json.loads((tmp_path / "rep" / "fid_report.json").read_text())["results"][0]
    assert row["nfe"] == 2 and 0 < row["diversity_pairwise"] < 1 and 1 < row["vendi"] < 60
    assert row["diversity_conditions"] == 1  # unconditional: one set


def test_base_substeps_refine_the_base_intervals():
    base, student = _pipes()
    hybrid = HybridPipeline.from_pipelines(base, student)
    hybrid.set_progress_bar_config(disable=True)
    torch.testing.assert_close(_run(hybrid, num_base_steps=4, num_base_substeps=2),
                               _run(base, timesteps=[999, 874, 749, 624, 499, 374, 249, 124]), rtol=0, atol=0)
    times, k = hybrid.schedule(1, num_base_substeps=4)
    assert k == 4 and times[:, 0].tolist() == [999, 936, 874, 812, 749, 499, 249]
    out = hybrid(batch_size=3, num_base_steps=1, num_base_substeps=4,
                 generator=torch.Generator().manual_seed(0), output_type="pt", return_trajectory=True)
    assert len(out.trajectory) == 7
    torch.testing.assert_close(_run(hybrid, num_base_steps=1, num_base_substeps=1),
                               _run(hybrid, num_base_steps=1))
    with pytest.raises(ValueError, match="too fine"):
        hybrid.schedule(1, num_base_substeps=400)


def test_a_stock_class_conditional_base_takes_its_class_count_from_the_student(tiny_unet):
    """A stock DDPMPipeline base whose UNet has num_class_embeds=4 (3 classes + null, or 4 classes): the
    hybrid accepts it with a 3-class student (null last) and refuses a 4-class one, instead of assuming."""
    base = diffusers.DDPMPipeline(unet=tiny_unet(num_class_embeds=4), scheduler=diffusers.DDPMScheduler())

    def student(classes):
        return FewStepPipeline(tiny_unet(num_class_embeds=classes + 1, seed=1), diffusers.DDPMScheduler(),
                               num_inference_steps=2, num_classes=classes)

    hybrid = HybridPipeline.from_pipelines(base, student(3))
    assert hybrid.config.num_classes == 3
    with pytest.raises(ValueError, match=r"num_class_embeds=4.*the student has 4"):
        HybridPipeline.from_pipelines(base, student(4))

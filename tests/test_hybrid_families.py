"""HybridPipeline across noise families: a VP, EDM or flow-matching base with a VP, EDM or flow student.

The exact Gaussian-mixture teacher (``analytic_teacher("gaussians8", noise=...)``) is the same distribution in
every family, so at equal log-SNR every family's model gives the same clean prediction: a hybrid of two exact
teachers is the student-family teacher's own DDIM chain, and the state it hands over is, in the student's
own coordinates, x_t = alpha_s x0_base + sigma_s eps_base."""

import math

import diffusers
import numpy as np
import pytest
import torch

from distill import FewStepPipeline, HybridPipeline, OneStepPipeline, export_pipeline, load_pipeline
from distill.noise import NoiseSchedule
from distill.pipelines import hybrid as hybrid_module
from distill.pipelines.samplers import timestep_for, trailing_timesteps
from distill.teachers import analytic_teacher

N = 256


def _teacher(family):
    return analytic_teacher("gaussians8", noise=family, flow_shift=3.0)


def _few(family, n=4, net=None, **kw):
    t = _teacher(family)
    pipe = FewStepPipeline(net if net is not None else t.model.double(), t.scheduler, num_inference_steps=n,
                           sample_shape=[2], **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _hybrid(base, student, **kw):
    hybrid = HybridPipeline.from_pipelines(base, student, **kw)
    hybrid.set_progress_bar_config(disable=True)
    return hybrid


def _z(n=N, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Spy(torch.nn.Module):
    """Records every call's (input, time input) and forwards to the wrapped network."""

    def __init__(self, net):
        super().__init__()
        self.net, self.config, self.calls = net, net.config, []

    def forward(self, x, t, **kw):
        self.calls.append((x.clone(), t.clone()))
        return self.net(x, t, **kw)


def _alpha_sigma(family, sigma):
    """(alpha, sigma) of x_t = alpha x0 + sigma eps at an EDM / flow noise level sigma."""
    return (1.0 if family == "edm" else 1.0 - sigma), sigma


# ---------------------------------------------------------------------- (a) exact hand-over
@pytest.mark.parametrize("base_family, student_family, sigmas, ks, atol", [
    # the flow's own grid starts at pure noise (s = 1, alpha_bar = 0): the VP base is evaluated there at its
    # table's last entry, alpha_bar = 2.4e-9 on the cosine table, which its clean estimate barely feels
    ("vp", "flow", None, (1, 2, 3, 4), 1e-4),
    ("vp", "flow", [0.99, 0.9, 0.7, 0.4, 0.15], (1, 2, 3, 4, 5), 1e-6),
    ("flow", "vp", None, (1, 2, 3, 4), 1e-6),
    # (the EDM grid's last level, sigma_min = 0.002, is less noisy than the VP table's index 0: k <= 3)
    ("vp", "edm", None, (1, 2, 3), 1e-6),
    # an EDM base reaches sigma_max = 80, i.e. flow s <= 80/81: the flow student's grid starts below that
    ("edm", "flow", [0.97, 0.9, 0.7, 0.4, 0.15], (1, 2, 3, 4, 5), 1e-6),
    ("flow", "edm", None, (1, 2, 3, 4), 1e-6),
])
def test_exact_teachers_hand_over_exactly_across_families(base_family, student_family, sigmas, ks, atol):
    base = _few(base_family)
    student = _few(student_family, sigmas=sigmas)
    hybrid = _hybrid(base, student)
    z = _z()
    own = student(batch_size=N, latents=z, output_type="pt").images  # the student family's own DDIM chain
    torch.testing.assert_close(hybrid(batch_size=N, latents=z, num_base_steps=0, output_type="pt").images,
                               own, rtol=0, atol=1e-7)
    for k in ks:
        out = hybrid(batch_size=N, latents=z, num_base_steps=k, output_type="pt").images
        torch.testing.assert_close(out, own, rtol=0, atol=atol)
    # a base that is NOT the same distribution is told apart (the comparison has teeth)
    other = analytic_teacher("gaussians25", noise=base_family, flow_shift=3.0)
    wrong = _hybrid(_few(base_family, net=other.model.double()), student)
    far = wrong(batch_size=N, latents=z, num_base_steps=max(ks), output_type="pt").images
    assert (far - own).abs().max() > 1e-2


def test_edm_base_beyond_its_sigma_max_is_evaluated_at_sigma_max():
    """The flow's pure-noise row (s = 1) lies beyond any EDM ramp: the base is evaluated at its sigma_max on
    x_t = sqrt(1 + sigma_max^2) x_vp (EDM's own start, sigma_max z, up to 1 / sigma_max^2)."""
    edm = _teacher("edm")
    spy = Spy(edm.model.double())
    base = FewStepPipeline(spy, edm.scheduler, num_inference_steps=4, sample_shape=[2])
    hybrid = _hybrid(base, _few("flow"))
    z = _z(8)
    hybrid(batch_size=8, latents=z, num_base_steps=1, output_type="pt")
    (x_in, t), = spy.calls
    s_max, s_data = edm.scheduler.config.sigma_max, edm.scheduler.config.sigma_data
    torch.testing.assert_close(t.double(), torch.full((8,), math.log(s_max) / 4, dtype=torch.float64))
    torch.testing.assert_close(x_in, z * (1 + s_max**2) ** 0.5 / (s_max**2 + s_data**2) ** 0.5)


# ---------------------------------------------------------------------- (b) the state handed over
@pytest.mark.parametrize("base_family, student_family", [("vp", "flow"), ("vp", "edm"), ("flow", "edm"),
                                                         ("edm", "flow"), ("flow", "vp"), ("edm", "vp")])
def test_state_handed_over_is_the_students_family_step(base_family, student_family, monkeypatch):
    """The student's first input, read in the student's own family, is x_t1 = alpha_1 x0_base + sigma_1
    eps_base with eps_base = (x_t0 - alpha_0 x0_base) / sigma_0: x0_base the exact posterior mean at the
    first row's log-SNR (the student family's closed form), the input scaled as that family's network sees
    it (EDM: c_in x_t); and it is sqrt(alpha_1^2 + sigma_1^2) times the chain's VP-coordinate state after the
    base row, the VP DDIM step of the same x0. Flow grids start below s = 1 and VP grids below the EDM ramp's
    top, where every base is exact (the rows beyond a base's reach are tested above)."""
    st = _teacher(student_family)
    spy = Spy(st.model.double())
    grid = {"flow": {"sigmas": [0.97, 0.8, 0.5, 0.2]}, "edm": {},
            "vp": {"timesteps": [899, 599, 299, 99]} if base_family == "edm" else {}}[student_family]
    student = FewStepPipeline(spy, st.scheduler, num_inference_steps=4, sample_shape=[2], **grid)
    student.set_progress_bar_config(disable=True)
    base = _few(base_family)
    hybrid = _hybrid(base, student)
    z = _z()
    states = []
    chain = hybrid_module.sample_hybrid

    def recording(model_fn, x, times, renoise, callback=None, **kw):  # the chain's states (VP coordinates)
        return chain(model_fn, x, times, renoise, callback=lambda st: (states.append(st["x"]), callback(st)),
                     **kw)

    monkeypatch.setattr(hybrid_module, "sample_hybrid", recording)
    out = hybrid(batch_size=N, latents=z, num_base_steps=1, output_type="pt", return_trajectory=True)
    x_in, t_in = spy.calls[0]
    if student_family == "vp":
        ac = st.scheduler.alphas_cumprod.double()
        time0, time1 = hybrid.grid(0)[0][:2]
        (a0, s0), (a1, s1) = [(ac[t].sqrt().item(), (1 - ac[t]).sqrt().item()) for t in (time0, time1)]
        x_t0 = z if time0 == 999 else s0 * z  # the VP chain starts from z at T - 1, from sigma(t) z below
        x_t1 = x_in
    else:
        sig = hybrid.grid(0)[0]
        (a0, s0), (a1, s1) = _alpha_sigma(student_family, sig[0]), _alpha_sigma(student_family, sig[1])
        x_t0 = s0 * z  # EDM: sigma_max z; flow: s_0 z
        time0 = math.log(sig[0]) / 4 if student_family == "edm" else sig[0] * 1000
        time1 = math.log(sig[1]) / 4 if student_family == "edm" else sig[1] * 1000
        c_in = 1 / (s1**2 + st.scheduler.config.sigma_data**2) ** 0.5 if student_family == "edm" else 1.0
        x_t1 = x_in / c_in
    torch.testing.assert_close(t_in.double(), torch.full((N,), float(time1), dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)
    x0 = st.model.posterior_mean(x_t0, torch.tensor(float(time0), dtype=torch.float64))
    torch.testing.assert_close(out.trajectory[0].double(), x0, rtol=0, atol=1e-6)
    expected = a1 * x0 + s1 * (x_t0 - a0 * x0) / s0  # the student family's own step
    torch.testing.assert_close(x_t1, expected, rtol=0, atol=1e-6)
    # the chain's state after the base row, in VP coordinates, is the VP DDIM step of the same x0 ...
    n0, n1 = (a0 * a0 + s0 * s0) ** 0.5, (a1 * a1 + s1 * s1) ** 0.5
    ab0, ab1 = (a0 / n0) ** 2, (a1 / n1) ** 2
    eps = (x_t0 / n0 - ab0**0.5 * x0) / (1 - ab0) ** 0.5
    torch.testing.assert_close(states[0], ab1**0.5 * x0 + (1 - ab1) ** 0.5 * eps, rtol=0, atol=1e-6)
    # ... and the student's x_t is sqrt(alpha^2 + sigma^2) times it
    torch.testing.assert_close(x_t1, n1 * states[0], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- one-step EDM / flow students
def _one_step(family, index=625, net=None):
    """A one-step 'generator' of an EDM / flow teacher configured as training writes it (score_helpers'
    ``generator_noise``): t* = the index as continuous time, sigma(t*) and the network time at t*."""
    t = _teacher(family)
    schedule = NoiseSchedule.from_scheduler(t.scheduler)
    t_star = schedule.t_from_timestep(index)
    pipe = OneStepPipeline(net if net is not None else t.model.double(), t.scheduler,
                           generator_timestep=index, sample_shape=[2],
                           generator_sigma=float(schedule.sigma(t_star)),
                           generator_time=float(schedule.timestep(t_star)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", ["edm", "flow"])
def test_one_step_edm_or_flow_student_with_a_vp_base(family):
    st = _teacher(family)
    spy = Spy(st.model.double())
    student = _one_step(family, net=spy)
    s_star, time_star = student.config.generator_sigma, student.config.generator_time
    a_star = 1.0 if family == "edm" else 1.0 - s_star
    c_in = 1 / (s_star**2 + st.scheduler.config.sigma_data**2) ** 0.5 if family == "edm" else 1.0
    hybrid = _hybrid(_few("vp"), student)
    z = _z()
    # no base step: the generator alone, on sigma(t*) z
    alone = student(batch_size=N, latents=z, output_type="pt").images
    spy.calls.clear()
    torch.testing.assert_close(hybrid(batch_size=N, latents=z, num_base_steps=0, output_type="pt").images,
                               alone, rtol=0, atol=1e-6)
    (x_in, t_in), = spy.calls
    torch.testing.assert_close(x_in, c_in * s_star * z, rtol=1e-9, atol=1e-9)
    assert torch.all(t_in == torch.tensor(time_star, dtype=t_in.dtype))
    # base rows evenly in the student's time input from the top of its range down to t*
    top = st.scheduler.config.sigma_max if family == "edm" else 1.0
    grid, k = hybrid.grid(2)
    mid = (top * s_star) ** 0.5 if family == "edm" else (top + s_star) / 2
    assert k == 2 and grid == pytest.approx([top, mid, s_star], rel=1e-12)
    # one base step: the generator sees the base's re-projection at its own sigma(t*)
    spy.calls.clear()
    out = hybrid(batch_size=N, latents=z, num_base_steps=1, output_type="pt", return_trajectory=True)
    (x_in, t_in), = spy.calls
    assert torch.all(t_in == torch.tensor(time_star, dtype=t_in.dtype))
    x_t0 = top * z  # EDM: sigma_max z; flow: z at s = 1
    x0_base = out.trajectory[0].double()
    if family == "edm":  # the VP base is exact there (sigma_max = 80 lies inside the cosine table)
        torch.testing.assert_close(x0_base, st.model.posterior_mean(x_t0, torch.tensor(math.log(top) / 4)),
                                   rtol=0, atol=1e-6)
    eps = (x_t0 - (1.0 if family == "edm" else 0.0) * x0_base) / top
    x_star = a_star * x0_base + s_star * eps
    torch.testing.assert_close(x_in / c_in, x_star, rtol=0, atol=1e-6)
    # the exact teacher as generator: its output is the posterior mean at (x_t*, t*)
    torch.testing.assert_close(out.images.double(), st.model.posterior_mean(
        x_star, torch.tensor(time_star, dtype=torch.float64)), rtol=0, atol=1e-5)
    assert len(out.trajectory) == 2 and torch.isfinite(out.images).all()
    with pytest.raises(ValueError, match="one-step generator"):
        hybrid(batch_size=2, num_base_steps=1, num_inference_steps=2)


def test_one_step_vp_student_with_a_flow_base():
    gen = analytic_teacher("gaussians8")
    student = OneStepPipeline(gen.model.double(), gen.scheduler, generator_timestep=625, sample_shape=[2])
    hybrid = _hybrid(_few("flow"), student)
    z = _z()
    ac = gen.scheduler.alphas_cumprod.double()
    for k in (0, 1, 2):
        out = hybrid(batch_size=N, latents=z, num_base_steps=k, output_type="pt").images
        if k == 0:
            torch.testing.assert_close(out, student(batch_size=N, latents=z, output_type="pt").images,
                                       rtol=0, atol=0)
        # exact models: the VP teacher's own DDIM chain on the same rows
        rows = [round(999 - i * (999 - 625) / k) for i in range(k)] + [625] if k else [625]
        assert hybrid.grid(k)[0] == rows
        x = z if rows[0] == 999 else (1 - ac[rows[0]]).sqrt() * z
        for i, t in enumerate(rows):
            x0 = gen.model.posterior_mean(x, torch.tensor(float(t), dtype=torch.float64))
            if i + 1 < len(rows):
                ab, ab1 = ac[t], ac[rows[i + 1]]
                x = ab1.sqrt() * x0 + (1 - ab1).sqrt() * (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        torch.testing.assert_close(out.double(), x0, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- base sub-steps, base coordinates
@pytest.mark.parametrize("family", ["flow", "edm"])
def test_non_vp_base_substeps_are_even_in_its_time_input(family):
    """m sub-steps per base row, spaced evenly in the base's time input (flow: s; EDM: ln sigma), the last row
    down to 0 (flow) or sigma_min (EDM): with the base on every row, the base's own chain on that refined
    grid."""
    base, student = _few(family), _few(family)
    hybrid = _hybrid(base, student)
    sig = hybrid.grid(0)[0]
    if family == "flow":
        ends = sig[1:] + [0.0]
        fine = [v for s0, s1 in zip(sig, ends) for v in (s0, (s0 + s1) / 2)]
    else:
        ends = sig[1:] + [base.scheduler.config.sigma_min]
        fine = [v for s0, s1 in zip(sig, ends) for v in (s0, (s0 * s1) ** 0.5)]
    times, k = hybrid.schedule(4, num_base_substeps=2)
    assert k == 8
    torch.testing.assert_close(times, base.rows(sigmas=fine), rtol=1e-12, atol=1e-9)
    z = _z()
    torch.testing.assert_close(hybrid(batch_size=N, latents=z, num_base_steps=4, num_base_substeps=2,
                                      output_type="pt").images,
                               base(batch_size=N, latents=z, sigmas=fine, output_type="pt").images,
                               rtol=0, atol=1e-6)
    # a sub-step count the grid cannot take
    assert len(hybrid.schedule(1, num_base_substeps=3)[0]) == 6


def test_vp_base_substeps_on_a_flow_students_grid():
    """A VP base keeps its table's timesteps for sub-steps between two flow rows (log-SNR matched)."""
    base = _few("vp")
    hybrid = _hybrid(base, _few("flow"))
    rows = hybrid.rows(1)[0]
    ac = base.scheduler.alphas_cumprod.double()
    times, k = hybrid.schedule(1, num_base_substeps=2)
    assert k == 2 and len(times) == 5
    tb0, tb1 = timestep_for(ac, float(rows[0, 1])), timestep_for(ac, float(rows[1, 1]))
    t = round(tb0 - (tb0 - tb1) / 2)
    assert tb0 == 999 and times[1].tolist() == [float(t), float(ac[t])]
    torch.testing.assert_close(times[[0, 2, 3, 4]], rows)


# ---------------------------------------------------------------------- export, refusals
def test_mixed_family_hybrid_exports_and_reloads(tmp_path):
    hybrid = _hybrid(_few("vp"), _few("flow", sigmas=[0.95, 0.6, 0.3]), num_base_steps=1)
    path = export_pipeline(hybrid, tmp_path / "hybrid")
    again = load_pipeline(str(path))
    again.set_progress_bar_config(disable=True)
    assert type(again.student_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert again.config.student_sigmas == [0.95, 0.6, 0.3]
    a = hybrid(batch_size=8, generator=torch.Generator().manual_seed(3), output_type="np").images
    b = again(batch_size=8, generator=torch.Generator().manual_seed(3), output_type="np").images
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_from_pipelines_refuses_what_it_cannot_place():
    vp = _few("vp")
    ve = FewStepPipeline(_teacher("vp").model, diffusers.ScoreSdeVeScheduler(), sample_shape=[2])
    with pytest.raises(ValueError, match="base pipeline .*ScoreSdeVeScheduler"):
        HybridPipeline.from_pipelines(ve, vp)
    with pytest.raises(ValueError, match="student pipeline .*ScoreSdeVeScheduler"):
        HybridPipeline.from_pipelines(vp, ve)
    # a one-step EDM / flow student must say where t* lies
    edm = _teacher("edm")
    bare = OneStepPipeline(edm.model, edm.scheduler, generator_timestep=625, sample_shape=[2])
    with pytest.raises(ValueError, match="generator_sigma"):
        HybridPipeline.from_pipelines(vp, bare)
    # a dynamically shifted flow student without its own grid
    dyn = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        HybridPipeline.from_pipelines(vp, FewStepPipeline(_teacher("flow").model, dyn, sample_shape=[2]))
    # ... which is fine as the BASE (evaluated at given noise levels, no grid of its own)
    _hybrid(FewStepPipeline(_teacher("flow").model, dyn, sample_shape=[2]), vp)
    hybrid = _hybrid(vp, _few("edm"))
    with pytest.raises(ValueError, match="num_base_steps=5"):
        hybrid(batch_size=2, num_base_steps=5)


def test_text_to_image_hybrid_across_families(tiny_sd_folder):
    """SD-format models: a flow-matching text-to-image base with the VP (SD) student's grid; every row on
    the base is the flow sampler on that grid's log-SNRs (the same network read as a flow model: only the
    rows' arithmetic is checked), and a VP SD base with a flow student runs, zero base steps being the
    student alone."""
    from distill.pipelines import TextToImagePipeline

    sd = diffusers.DiffusionPipeline.from_pretrained(tiny_sd_folder / "sd")
    parts = dict(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer)
    vp_sched = diffusers.DDIMScheduler.from_config(sd.scheduler.config, timestep_spacing="trailing",
                                                   clip_sample=False, set_alpha_to_one=True)
    flow_sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    vp = TextToImagePipeline(sd.unet, scheduler=vp_sched, num_inference_steps=3, **parts)
    flow = TextToImagePipeline(sd.unet, scheduler=flow_sched, num_inference_steps=3, **parts)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a red cat", "a blue dog"]

    def run(pipe, latents=z, **kw):
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt=prompts, latents=latents, output_type="np", **kw).images

    hybrid = HybridPipeline.from_pipelines(flow, vp)
    rows = hybrid.rows(0)[0]
    ab = rows[:, 1]
    s = ((1 - ab).sqrt() / (ab.sqrt() + (1 - ab).sqrt())).tolist()  # the flow sigma at each row's log-SNR
    # the VP chain starts from z at T - 1; the flow pipeline from s_0 z in VP coordinates sqrt(1 - abar_0) z
    np.testing.assert_allclose(run(hybrid, num_base_steps=3),
                               run(TextToImagePipeline(sd.unet, scheduler=flow_sched, sigmas=s, **parts),
                                   latents=z / (1 - ab[0].item()) ** 0.5), rtol=0, atol=2e-4)
    # the chain steps row to row: the student on its trailing grid (alone, a DDIMScheduler without a stored
    # grid steps to t - T // N as diffusers' DDIM does, 666 -> 333 where the grid's next row is 332)
    on_grid = TextToImagePipeline(sd.unet, scheduler=vp_sched, timesteps=trailing_timesteps(3), **parts)
    np.testing.assert_array_equal(run(hybrid, num_base_steps=0), run(on_grid))
    hybrid = HybridPipeline.from_pipelines(vp, flow)
    np.testing.assert_allclose(run(hybrid, num_base_steps=0), run(flow), rtol=0, atol=1e-5)
    out = hybrid(prompt=prompts, latents=z, output_type="np", num_base_steps=1, base_guidance_scale=2.0,
                 return_trajectory=True)
    assert len(out.trajectory) == 3 and np.isfinite(out.images).all()
    assert np.abs(out.images - run(flow)).max() > 1e-4

"""EDM and flow-matching schedules against diffusers' own EDMEulerScheduler / FlowMatchEulerDiscreteScheduler
arithmetic, the exact Gaussian-mixture teacher written in each family, and the sampler on every family."""

import math

import diffusers
import pytest
import torch

from distill.denoiser import Denoiser
from distill.noise import NoiseSchedule, flow_shift_mu
from distill.teachers import analytic_teacher

T = torch.tensor([0.0, 0.1, 0.35, 0.6, 0.85, 1.0], dtype=torch.float64)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sigma_schedule", ["karras", "exponential"])
def test_edm_preconditioning_equals_diffusers(pred, sigma_schedule):
    sched = diffusers.EDMEulerScheduler(prediction_type=pred, sigma_data=0.7, sigma_schedule=sigma_schedule)
    ns = NoiseSchedule.from_scheduler(sched)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(6, 3, 4, 4, generator=g) * 5, torch.randn(6, 3, 4, 4, generator=g)
    sigma = ns.sigma(T)
    assert math.isclose(sigma[0], 0.002, rel_tol=1e-9) and math.isclose(sigma[-1], 80.0, rel_tol=1e-9)
    s4 = sigma.float().view(-1, 1, 1, 1)
    torch.testing.assert_close(ns.scale_input(x, T), sched.precondition_inputs(x, s4))
    torch.testing.assert_close(ns.timestep(T), sched.precondition_noise(sigma.float()))
    x0, eps = ns.to_x0_eps(out, x, T)
    torch.testing.assert_close(x0, sched.precondition_outputs(x, out, s4), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x, x0 + s4 * eps, rtol=1e-5, atol=1e-4)
    # the inverse of the sigma ramp, and the grid of the scheduler's own set_timesteps
    torch.testing.assert_close(ns.t_from_sigma(sigma), T)
    sched.set_timesteps(7)
    torch.testing.assert_close(ns.sigma(ns.sampling_times(7)), sched.sigmas[:7].double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("family", ["vp", "edm", "flow", "flow_inverted"])
def test_round_trips_in_every_family(family):
    """x0 / eps -> each parameterisation the family takes -> x0 / eps, and the score by Tweedie's formula."""
    ns = {"vp": NoiseSchedule.vp_from_betas(),
          "edm": NoiseSchedule.from_scheduler(diffusers.EDMEulerScheduler()),
          "flow": NoiseSchedule.from_scheduler(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)),
          "flow_inverted": NoiseSchedule.from_scheduler(
              diffusers.FlowMatchEulerDiscreteScheduler(invert_sigmas=True))}[family]
    preds = {"vp": ["epsilon", "sample", "v_prediction", "flow"],
             "edm": ["epsilon", "v_prediction", "sample"],
             "flow": ["flow", "sample", "epsilon", "v_prediction"], "flow_inverted": ["flow"]}[family]
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g,
                                                                            dtype=torch.float64)
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95], dtype=torch.float64)
    x_t = ns.add_noise(x0, eps, t)
    a, s = ns.alpha_sigma(t)
    for pred in preds:
        out = ns.from_x0_eps(x0, eps, t, pred)
        back = ns.to_x0_eps(out, x_t, t, pred)
        torch.testing.assert_close(back[0], x0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(back[1], eps, rtol=1e-9, atol=1e-9)
    # the score of x_t | x0 is -eps / sigma
    torch.testing.assert_close(ns.score_from_x0(x0, x_t, t), -eps / s[:, None], rtol=1e-9, atol=1e-9)
    if family.startswith("flow"):
        torch.testing.assert_close(a + s, torch.ones_like(a))
        v = ns.from_x0_eps(x0, eps, t, "flow")
        torch.testing.assert_close(v, (x0 - eps) if family == "flow_inverted" else (eps - x0))
        want = (1 - s if family == "flow_inverted" else s) * 1000
        torch.testing.assert_close(ns.timestep(t), want.float())


def _flow_scheduler_steps(model, sched, x, num_steps, **kwargs):
    """diffusers' own loop: FlowMatchEulerDiscreteScheduler stepping ``model``."""
    sched.set_timesteps(num_steps, **kwargs)
    for ts in sched.timesteps:
        out = model(x, ts.expand(x.shape[0])).sample
        x = sched.step(out, ts, x).prev_sample
    return x


@pytest.mark.parametrize("dynamic", [False, True])
def test_flow_sampler_equals_flow_match_euler(dynamic):
    """Teacher.sample on a flow teacher (the exact mixture) is diffusers' Euler loop, static and dynamic
    shift (mu from the image token count: a static shift of e^mu)."""
    teacher = analytic_teacher("gaussians8", noise="flow", flow_shift=3.0)
    config = {"shift": 3.0}
    seq = 1024
    if dynamic:
        config = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}
        teacher.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**config)
        teacher.schedule = NoiseSchedule.from_scheduler(teacher.scheduler, image_seq_len=seq)
        teacher.denoiser.schedule = teacher.schedule
        mu = flow_shift_mu(seq, teacher.scheduler.config)
        assert math.isclose(teacher.schedule.shift, math.exp(mu))
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    for n in (1, 3, 8):
        ours = teacher.sample(64, num_steps=n, noise=z.clone())
        sched = diffusers.FlowMatchEulerDiscreteScheduler(**config)
        theirs = _flow_scheduler_steps(teacher.model, sched, z.clone().double(), n,
                                       **({"mu": mu} if dynamic else {}))
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-4)


def test_edm_sampler_equals_edm_euler():
    teacher = analytic_teacher("gaussians8", noise="edm")
    sched = teacher.scheduler
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    for n in (2, 5, 12):
        ours = teacher.sample(64, num_steps=n, noise=z.clone())
        sched.set_timesteps(n)
        x = z.double() * sched.init_noise_sigma
        for ts in sched.timesteps:
            out = teacher.model(sched.scale_model_input(x, ts), ts.expand(64)).sample
            x = sched.step(out, ts, x).prev_sample
        torch.testing.assert_close(ours.double(), x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["edm", "flow"])
def test_few_step_pipeline_is_the_familys_euler_sampler(family):
    """FewStepPipeline on an EDM / flow scheduler samples as diffusers' EDMEulerScheduler /
    FlowMatchEulerDiscreteScheduler step the same network from the same noise: on the scheduler's own
    grid and on a stored grid of noise levels (flow: diffusers shifts the sigmas it is given, so the
    stored grid is the shifted one)."""
    from distill.pipelines import FewStepPipeline

    teacher = analytic_teacher("gaussians8", noise=family, flow_shift=3.0)
    model = teacher.model.double()
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    flow_sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    for n in (1, 3, 6):
        pipe = FewStepPipeline(model, teacher.scheduler, num_inference_steps=n, sample_shape=[2])
        pipe.set_progress_bar_config(disable=True)
        ours = pipe(batch_size=64, latents=z.clone(), output_type="pt").images.double()
        if family == "flow":
            theirs = _flow_scheduler_steps(model, flow_sched, z.clone(), n)
        else:
            sched = diffusers.EDMEulerScheduler.from_config(teacher.scheduler.config)
            sched.set_timesteps(n)
            x = z.clone() * sched.sigmas[0]
            for ts in sched.timesteps:
                out = model(sched.scale_model_input(x, ts), ts.expand(64)).sample
                x = sched.step(out, ts, x).prev_sample
            theirs = x
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours, teacher.sample(64, num_steps=n, noise=z.float()).double(),
                                   rtol=1e-4, atol=1e-4)
    if family == "flow":  # a stored grid: diffusers' set_timesteps(sigmas=u) shifts u
        u = [1.0, 0.6, 0.25]
        shifted = [3 * v / (1 + 2 * v) for v in u]
        pipe = FewStepPipeline(model, teacher.scheduler, num_inference_steps=3, sample_shape=[2],
                               sigmas=shifted)
        pipe.set_progress_bar_config(disable=True)
        ours = pipe(batch_size=64, latents=z.clone(), output_type="pt").images.double()
        flow_sched.set_timesteps(sigmas=u)
        x = z.clone()
        for ts in flow_sched.timesteps:
            x = flow_sched.step(model(x, ts.expand(64)).sample, ts, x).prev_sample
        torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="takes sigmas="):
            pipe(batch_size=2, timesteps=[999, 499])


def test_the_mixture_is_one_teacher_in_every_family():
    """At equal log-SNR the vp, edm and flow teachers are the same posterior mean: x0 of the flow state
    x_f = (1 - s) x0 + s eps read through each family's Denoiser equals the closed-form E[x0 | x_t]."""
    teachers = {f: analytic_teacher("gaussians8", noise=f, flow_shift=2.0) for f in ("vp", "edm", "flow")}
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(32, 2, generator=g, dtype=torch.float64) * 2, torch.randn(32, 2, generator=g,
                                                                                   dtype=torch.float64)
    vp = teachers["vp"]
    for k in (100, 400, 700, 950):
        t_vp = vp.schedule.t_from_timestep(k)
        lam = float(vp.schedule.logsnr(t_vp))
        x_vp = vp.schedule.add_noise(x0, eps, t_vp)
        want = vp.model.posterior_mean(x_vp, torch.tensor(float(k)))
        got = {"vp": vp.predict_x0(x_vp, t_vp)}
        # the same point in flow (s / (1 - s) = e^(-lam / 2)) and EDM (sigma = e^(-lam / 2)) coordinates
        r = math.exp(-lam / 2)
        flow, edm = teachers["flow"], teachers["edm"]
        s = r / (1 + r)
        t_flow = flow.schedule.t_from_sigma(torch.tensor(s, dtype=torch.float64))
        got["flow"] = flow.predict_x0(x_vp * math.sqrt((1 - s) ** 2 + s**2), t_flow)
        t_edm = edm.schedule.t_from_sigma(torch.tensor(r, dtype=torch.float64))
        got["edm"] = edm.predict_x0(x_vp * math.sqrt(1 + r * r), t_edm)
        for fam, x0_hat in got.items():
            torch.testing.assert_close(x0_hat.double(), want, rtol=1e-4, atol=1e-4, msg=f"{fam} at k={k}")


@pytest.mark.parametrize("family", ["edm", "flow"])
def test_a_denoiser_scales_edm_inputs_and_reads_the_velocity(family):
    """The Denoiser of an EDM / flow teacher calls the network as diffusers' schedulers do."""
    teacher = analytic_teacher("gaussians8", noise=family)
    den = Denoiser(teacher.model, teacher.schedule)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.full((4,), 0.4, dtype=torch.float64)
    sigma = float(teacher.schedule.sigma(0.4))
    if family == "edm":
        sched = teacher.scheduler
        out = teacher.model(sched.precondition_inputs(x, sigma), sched.precondition_noise(sigma)).sample
        want = sched.precondition_outputs(x, out, sigma)
    else:
        v = teacher.model(x, torch.tensor(sigma * 1000)).sample
        want = x - sigma * v
    torch.testing.assert_close(den.x0(x, t), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
def test_a_dynamic_shift_is_the_schedulers_time_shift_at_every_t(time_shift_type):
    """sigma(t) of a dynamically shifted schedule is diffusers' time_shift(mu) of t, for both shift types,
    and its sampling grid the scheduler's own."""
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True,
                                                      time_shift_type=time_shift_type)
    ns = NoiseSchedule.from_scheduler(sched, image_seq_len=3000)
    mu = flow_shift_mu(3000, sched.config)
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert math.isclose(mu, calculate_shift(3000), rel_tol=1e-12)  # FluxPipeline's own mu
    t = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    torch.testing.assert_close(ns.sigma(t), sched.time_shift(mu, 1.0, t))
    sched.set_timesteps(5, mu=mu)
    torch.testing.assert_close(ns.sigma(ns.sampling_times(5)), sched.sigmas[:5].double(), rtol=1e-6, atol=0)


def test_dynamic_shift_needs_the_token_count():
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="image_seq_len"):
        NoiseSchedule.from_scheduler(sched)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        NoiseSchedule.from_scheduler(diffusers.FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True))


PLAIN_LOAD = """
import sys, numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
x = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), output_type="np").images
assert "distill" not in sys.modules
np.save(sys.argv[2], x)
print(type(pipe.scheduler).__name__)
"""


ROUNDS = ["start_steps=4", "steps_per_round=1", "final_rounds_multiplier=1"]
FOLDER_METHODS = {  # method: (class-conditional teacher, overrides for a 2-update run)
    "sim": (False, []), "uni_instruct": (False, ["uni_instruct.ratio_warmup_steps=0"]),
    "msd": (True, ["msd.tsm_steps=1"]), "progressive": (False, [f"progressive.{o}" for o in ROUNDS]),
    "guided": (True, ["guided.stage_one_steps=1", "guided.start_steps=2", "guided.steps_per_round=1",
                      "guided.final_rounds_multiplier=1"])}


@pytest.mark.parametrize("method", list(FOLDER_METHODS))
@pytest.mark.parametrize("scheduler", ["EDMEulerScheduler", "FlowMatchEulerDiscreteScheduler"])
def test_a_pixel_edm_or_flow_teacher_folder_distils_and_exports(method, scheduler, tiny_unet, tmp_path):
    """A UNet2DModel folder with an EDM or flow-matching scheduler: 2 updates of every method, the export
    keeps the teacher's scheduler class and samples the same in plain diffusers (no distill); one-step
    exports are the generator read at t* as training reads it (one t* conversion)."""
    import os
    import subprocess
    import sys

    import numpy as np

    from distill import load_pipeline
    from distill.cli import main

    conditional, extra = FOLDER_METHODS[method]
    folder = tmp_path / "teacher"
    diffusers.DDPMPipeline(unet=tiny_unet(sample_size=8, in_channels=1, num_class_embeds=11 if conditional
                                          else None),
                           scheduler=getattr(diffusers, scheduler)()).save_pretrained(folder)
    out = tmp_path / "run"
    rc = main(["train", f"configs/{method}_digits.yaml", f"teacher.path={folder}", f"output_dir={out}",
               "train.max_steps=2", "train.batch_size=4", "train.mixed_precision=no", "train.report_to=none",
               "train.progress_bar=false", "eval.enabled=false", *extra,
               *(["teacher.num_classes=10"] if conditional else [])])
    assert rc == 0
    pipe = load_pipeline(str(out / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == scheduler
    mine = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.isfinite(mine).all()
    res = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out / "pipeline"), str(tmp_path / "p.npy")],
                         cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == scheduler
    np.testing.assert_array_equal(mine, np.load(tmp_path / "p.npy"))
    if method in ("progressive", "guided"):
        # the stored grid is the last round's trailing grid as noise levels sigma(t) of the teacher
        schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
        assert pipe.config.sigmas == pytest.approx([float(schedule.sigma(1.0))])
        return
    if method == "msd":
        return
    # the pipeline's x0 is the training Denoiser's at t* (the config's index 625) on sigma(t*) z
    schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
    t_star = schedule.t_from_timestep(pipe.config.generator_timestep)
    assert pipe.config.generator_timestep == 625
    assert math.isclose(pipe.config.generator_sigma, float(schedule.sigma(t_star)), rel_tol=1e-12)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x0 = Denoiser(pipe.generator, schedule, pipe.config.prediction_type).x0(
            float(schedule.sigma(t_star)) * z, t_star.expand(3))
    pt = pipe(batch_size=3, latents=z, output_type="pt").images
    torch.testing.assert_close(pt, (x0 / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-5)


def test_teacher_trainer_flow_objective_is_rectified_flow(tmp_path):
    """teacher_train.noise=flow: the network sees (1 - s) x0 + s eps at time s T and regresses the velocity
    eps - x0 (Esser et al. 2024, eq. 3): recovered from the network's inputs with a spy network."""
    from distill.config import load_config
    from distill.trainers import trainer_class

    cfg = load_config("configs/teacher_digits.yaml",
                      [f"output_dir={tmp_path}", "teacher_train.noise=flow", "teacher_train.flow_shift=3",
                       "teacher_train.t_sampling=logit_normal", "train.batch_size=16", "train.report_to=none",
                       "train.progress_bar=false", "train.mixed_precision=no"])
    trainer = trainer_class("teacher")(cfg)
    trainer.setup()
    assert type(trainer.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    seen = {}
    net = trainer.modules["student"]

    def spy(module, args, kwargs, out):
        seen["x"], seen["time"] = args[0].detach(), args[1].detach()
        out.sample.data.zero_()  # predict v = 0: the loss is then E ||eps - x0||^2

    handle = net.register_forward_hook(spy, with_kwargs=True)
    trainer.rng = trainer.step_generator(0, 0)
    batch = trainer._batch()
    objective = trainer.objective(batch, 0)
    update = next(objective)
    handle.remove()
    s = (seen["time"].double() / 1000).view(-1, 1, 1, 1)
    assert ((s > 0) & (s < 1)).all() and s.std() > 0.05
    x0 = batch["x"].double()
    eps = (seen["x"].double() - (1 - s) * x0) / s
    want = ((eps - x0) ** 2).mean()
    torch.testing.assert_close(update.loss.double(), want, rtol=1e-4, atol=1e-5)
    assert abs(float(eps.std()) - 1) < 0.2  # the recovered noise is standard normal


@pytest.mark.parametrize("scheduler", ["EDMEulerScheduler", "FlowMatchEulerDiscreteScheduler"])
def test_an_edm_or_flow_teacher_folder_is_compared_with_its_own_euler_sampler(scheduler, tiny_unet, tmp_path):
    """`distill fid --compare` on an EDM / flow teacher folder samples with the family's Euler sampler on the
    scheduler's own grid: the same images as diffusers' scheduler stepping the teacher's network from the same
    noise (EDM: with its input preconditioning, which the stock DDPMPipeline loop would skip)."""
    from diffusers.utils.torch_utils import randn_tensor

    from distill.eval.fid import teacher_as_sampler

    folder = tmp_path / "teacher"
    kwargs = {"shift": 2.0} if scheduler.startswith("Flow") else {"sigma_max": 20.0}
    diffusers.DDPMPipeline(unet=tiny_unet(sample_size=8, in_channels=1),
                           scheduler=getattr(diffusers, scheduler)(**kwargs)).save_pretrained(folder)
    stock = diffusers.DDPMPipeline.from_pretrained(folder)
    pipe = teacher_as_sampler(stock)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "FewStepPipeline"
    ours = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), num_inference_steps=6,
                output_type="pt").images
    z = randn_tensor((3, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    sched = stock.scheduler
    sched.set_timesteps(6)
    x = z * sched.sigmas[0]
    with torch.no_grad():
        for ts in sched.timesteps:
            x_in = sched.scale_model_input(x, ts) if hasattr(sched, "scale_model_input") else x
            x = sched.step(stock.unet(x_in, ts.expand(3)).sample, ts, x).prev_sample
    torch.testing.assert_close(ours, (x / 2 + 0.5).clamp(0, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["edm", "flow"])
def test_msd_on_the_mixture_in_each_family_exports_what_it_trained(family, tmp_path):
    """MSD (2 updates) on the exact mixture as an EDM / flow teacher: the exported pipeline routes each class
    to its student and samples exactly the trainer's generator read at t* (one conversion of t*)."""
    from distill import load_pipeline
    from distill.conditioning import Condition
    from distill.config import load_config
    from distill.trainers import trainer_class

    cfg = load_config("configs/msd_gaussians8.yaml",
                      [f"output_dir={tmp_path}", f"teacher.noise={family}", "train.max_steps=2",
                       "msd.tsm_steps=3", "train.batch_size=32", "train.progress_bar=false",
                       "train.report_to=none", "eval.enabled=false"])
    trainer = trainer_class("msd")(cfg)
    pipe = load_pipeline(str(trainer.train()))
    assert type(pipe.scheduler).__name__ == type(trainer.teacher.scheduler).__name__
    labels = torch.arange(trainer.teacher.num_classes)
    z = torch.randn(len(labels), 2, generator=torch.Generator().manual_seed(0))
    got = pipe(class_labels=labels, latents=z, output_type="pt").images
    table = pipe.config.routing["student_of_class"]
    with torch.no_grad(), trainer.ema_weights():  # the export holds the students' EMA weights
        for c in range(len(labels)):
            net = trainer.unwrap(f"student_{table[c]}")
            want = trainer.generate(net, z[c:c + 1], Condition(class_labels=labels[c:c + 1]))
            torch.testing.assert_close(got[c:c + 1], want.float(), rtol=1e-5, atol=1e-5)


def test_teacher_trainer_edm_objective_is_edms_preconditioned_loss(tmp_path):
    """teacher_train.noise=edm: ln sigma ~ N(-1.2, 1.2), the network sees c_in (x0 + sigma eps) at c_noise =
    ln(sigma) / 4 and its loss is lambda(sigma) ||D - x0||^2 = ||F - (x0 - c_skip x_t) / c_out||^2 (Karras
    et al. 2022, Table 1): recovered from the network's inputs with a spy network; the export is an EDM
    teacher."""
    from distill.config import load_config
    from distill.teachers import Teacher
    from distill.trainers import trainer_class

    cfg = load_config("configs/teacher_digits.yaml",
                      [f"output_dir={tmp_path}", "teacher_train.noise=edm", "train.batch_size=512",
                       "train.max_steps=1", "train.report_to=none", "train.progress_bar=false",
                       "train.mixed_precision=no", "eval.enabled=false"])
    trainer = trainer_class("teacher")(cfg)
    trainer.setup()
    sched = trainer.scheduler
    assert type(sched).__name__ == "EDMEulerScheduler"
    seen = {}

    def spy(module, args, kwargs, out):
        seen["x"], seen["time"] = args[0].detach(), args[1].detach()
        out.sample.data.zero_()  # F = 0: the loss is then E ||(x0 - c_skip x_t) / c_out||^2

    handle = trainer.modules["student"].register_forward_hook(spy, with_kwargs=True)
    trainer.rng = trainer.step_generator(0, 0)
    batch = trainer._batch()
    update = next(trainer.objective(batch, 0))
    handle.remove()
    sigma = torch.exp(4 * seen["time"].double()).view(-1, 1, 1, 1)
    ln_sigma = torch.log(sigma)
    assert abs(float(ln_sigma.mean()) + 1.2) < 0.15 and abs(float(ln_sigma.std()) - 1.2) < 0.15
    x0 = batch["x"].double()
    x_t = seen["x"].double() * torch.sqrt(sigma**2 + 0.25)  # c_in = 1 / sqrt(sigma^2 + sigma_data^2)
    eps = (x_t - x0) / sigma
    assert abs(float(eps.std()) - 1) < 0.05 and abs(float(eps.mean())) < 0.05
    c_skip, c_out = 0.25 / (sigma**2 + 0.25), sigma * 0.5 / torch.sqrt(sigma**2 + 0.25)
    want = (((x0 - c_skip * x_t) / c_out) ** 2).mean()
    torch.testing.assert_close(update.loss.double(), want, rtol=1e-4, atol=1e-5)
    final = trainer_class("teacher")(cfg).train()
    assert Teacher.from_pretrained(str(final)).schedule.kind == "edm"


def test_a_flow_teacher_run_reports_fid_with_the_teacher_rows(tiny_unet, tmp_path):
    """The end-of-training report of a SIM run on a flow teacher folder evaluates the teacher with its own
    Euler loop at eval.teacher_steps, next to the one-step student."""
    import json

    from distill.cli import main

    folder = tmp_path / "teacher"
    diffusers.DDPMPipeline(unet=tiny_unet(sample_size=8, in_channels=1),
                           scheduler=diffusers.FlowMatchEulerDiscreteScheduler()).save_pretrained(folder)
    out = tmp_path / "run"
    rc = main(["train", "configs/sim_digits.yaml", f"teacher.path={folder}", f"output_dir={out}",
               "train.max_steps=1", "train.batch_size=4", "train.mixed_precision=no", "train.report_to=none",
               "train.progress_bar=false", "eval.num_samples=40", "eval.teacher_steps=[2,4]"])
    assert rc == 0
    rows = json.loads((out / "report" / "fid_report.json").read_text())["results"]
    got = {(r["model"].split("@")[0], r["nfe"]) for r in rows}
    assert {("student", 1), ("teacher", 2), ("teacher", 4)} <= got, got


def test_builtin_flow_teacher_is_a_stock_folder_with_recognisable_digits():
    """builtin:digits-flow (configs/teacher_digits_flow.yaml) is a DDPMPipeline folder with a
    FlowMatchEulerDiscreteScheduler; the stock loop (its Euler sampler) at 50 steps draws all ten digits."""
    from distill.eval.extractors import DigitsNet, make_extractor
    from distill.teachers import ASSETS, Teacher

    pipe = diffusers.DDPMPipeline.from_pretrained(ASSETS / "digits_teacher_flow")
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    pipe.set_progress_bar_config(disable=True)
    x = pipe(batch_size=200, generator=torch.Generator().manual_seed(0), num_inference_steps=50,
             output_type="np").images
    u8 = torch.from_numpy(x).permute(0, 3, 1, 2).mul(255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    ext, _, _ = make_extractor("digits")
    with torch.no_grad():
        probs = ext.net(DigitsNet.preprocess(u8))[1].softmax(1)
    assert probs.max(1).values.mean() > 0.9
    assert len(set(probs.argmax(1).tolist())) == 10
    assert Teacher.from_pretrained("builtin:digits-flow").schedule.kind == "flow"


@pytest.mark.parametrize("config", ["configs/teacher_digits_flow.yaml", "configs/sim_digits_flow.yaml"])
def test_the_flow_digits_configs_run(config, tmp_path):
    from distill.cli import main

    rc = main(["train", config, f"output_dir={tmp_path}", "train.max_steps=2", "train.batch_size=8",
               "train.report_to=none", "train.progress_bar=false", "eval.enabled=false"])
    assert rc == 0 and (tmp_path / "pipeline" / "model_index.json").is_file()


TEXT_METHODS = {
    "sim": ["train.max_steps=2"], "uni_instruct": ["train.max_steps=2", "uni_instruct.ratio_warmup_steps=0"],
    "msd": ["train.max_steps=2", "msd.num_students=2", "msd.tsm_steps=0"],
    "progressive": ["progressive.start_steps=2", "progressive.target_steps=1",
                    "progressive.steps_per_round=1"],
    "guided": ["guided.start_steps=2", "guided.target_steps=1", "guided.steps_per_round=1",
               "guided.stage_one_steps=1"]}


@pytest.mark.parametrize("method", [pytest.param(m, marks=() if m == "sim" else pytest.mark.slow)
                                    for m in TEXT_METHODS])
@pytest.mark.parametrize("scheduler", ["EDMDPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler"])
def test_a_text_teacher_of_each_family_distils_and_exports(method, scheduler, tmp_path_factory, tmp_path):
    """A Stable-Diffusion-format folder (UNet2DConditionModel, VAE, CLIP) whose scheduler is EDM's (Playground
    v2.5's layout) or flow matching's: every method trains, the export keeps the teacher's scheduler class and
    samples the same images in plain diffusers (no distill) as in distill."""
    import json
    import os
    import subprocess
    import sys

    import numpy as np
    from conftest import make_tiny_sd

    from distill import load_pipeline
    from distill.cli import main

    root = tmp_path_factory.mktemp("sd_family")
    folder = make_tiny_sd(root / "sd")
    getattr(diffusers, scheduler)().save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", scheduler]
    (folder / "model_index.json").write_text(json.dumps(index))
    (root / "prompts.txt").write_text("a red cat\na blue dog\na small house\na green tree\n")
    out = tmp_path / "run"
    rc = main(["train", f"configs/{method}_sd15.yaml", f"teacher.path={folder}", f"output_dir={out}",
               f"data.spec=prompts:{root / 'prompts.txt'}", "train.batch_size=2",
               "data.teacher_sample_steps=2",
               "train.mixed_precision=no", "train.report_to=none", "train.progress_bar=false",
               "eval.enabled=false", *TEXT_METHODS[method]])
    assert rc == 0
    pipe = load_pipeline(str(out / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == scheduler
    mine = pipe(prompt=["a red cat", "a blue dog"], generator=torch.Generator().manual_seed(0),
                output_type="np").images
    res = subprocess.run([sys.executable, "-c", TEXT_PLAIN_LOAD, str(out / "pipeline"),
                          str(tmp_path / "p.npy")],
                         cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == scheduler
    plain = np.load(tmp_path / "p.npy")
    assert plain.shape == (2, 16, 16, 3) and np.isfinite(plain).all() and plain.std() > 0.01
    np.testing.assert_array_equal(mine, plain)


TEXT_PLAIN_LOAD = """
import sys, numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
x = pipe(prompt=["a red cat", "a blue dog"], generator=torch.Generator().manual_seed(0),
         output_type="np").images
assert "distill" not in sys.modules
np.save(sys.argv[2], x)
print(type(pipe.scheduler).__name__)
"""


def test_a_lora_student_of_a_flow_teacher_is_refused_before_any_update(tiny_unet, tmp_path):
    """LoRA adapters are exported for the teacher's own pipeline with a VP scheduler: on an EDM / flow teacher
    student.lora_rank is refused at build, naming the scheduler and the fix."""
    from distill.config import ConfigError, load_config
    from distill.trainers import trainer_class

    diffusers.DDPMPipeline(tiny_unet(), diffusers.FlowMatchEulerDiscreteScheduler()).save_pretrained(
        tmp_path / "teacher")
    cfg = load_config("configs/sim_digits.yaml",
                      [f"output_dir={tmp_path / 'run'}", f"teacher.path={tmp_path / 'teacher'}",
                       "student.lora_rank=4", "train.report_to=none", "eval.enabled=false"])
    trainer = trainer_class("sim")(cfg)
    want = "lora_rank=4 with a FlowMatchEulerDiscreteScheduler teacher.*remove student.lora_rank"
    with pytest.raises(ConfigError, match=want):
        trainer.train()
    assert trainer.step == 0 and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("pred", ["v_prediction", "flow", "sample"])
def test_a_one_step_flow_student_is_read_as_training_reads_it(pred):
    """OneStepPipeline on a flow scheduler reads the generator's output in its prediction type as the training
    Denoiser does (v = alpha eps - sigma x0 with alpha + sigma = 1, so x0 = (alpha x - sigma v) / (alpha^2 +
    sigma^2)), at t* < 1 where alpha > 0."""
    from distill.models.mlp import MLPDenoiser
    from distill.pipelines import OneStepPipeline

    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ns = NoiseSchedule.from_scheduler(sched)
    torch.manual_seed(0)
    net = MLPDenoiser(data_dim=2, hidden=32, num_layers=2)
    t_star = ns.t_from_timestep(625)
    sigma, time = float(ns.sigma(t_star)), float(ns.timestep(t_star))
    pipe = OneStepPipeline(net, sched, generator_timestep=625, sample_shape=[2], generator_sigma=sigma,
                           generator_time=time, prediction_type=pred)
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = Denoiser(net, ns, pred).x0(sigma * z, t_star.expand(16))
        got = pipe(batch_size=16, latents=z, output_type="pt").images
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)

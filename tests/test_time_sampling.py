"""Time sampling (``t_sampling``) and time weighting (``time_weighting``) of the one-step score-distillation
methods in every noise family, against diffusers' SD3 training utilities and EDM's lognormal sigma."""

import math
from types import SimpleNamespace

import diffusers
import pytest
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from distill.config import ConfigError, load_config
from distill.engine.batches import BatchMaker
from distill.noise import NoiseSchedule
from distill.trainers import trainer_class
from distill.trainers.score_helpers import OneStepScoreHelpers, time_weight
from distill.trainers.sim import SIMConfig

FAST = ["train.progress_bar=false", "train.report_to=none", "train.checkpointing_steps=1000",
        "eval.enabled=false"]

SCHEDULES = {
    "vp_cosine": lambda: NoiseSchedule.vp_from_betas("squaredcos_cap_v2"),
    "vp_linear": lambda: NoiseSchedule.vp_from_betas("linear"),
    "edm_karras": lambda: NoiseSchedule.from_scheduler(diffusers.EDMEulerScheduler()),
    "edm_exponential": lambda: NoiseSchedule.from_scheduler(
        diffusers.EDMEulerScheduler(sigma_schedule="exponential")),
    "flow": lambda: NoiseSchedule.from_scheduler(diffusers.FlowMatchEulerDiscreteScheduler()),
    "flow_shift3": lambda: NoiseSchedule.from_scheduler(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)),
}


class Draws(OneStepScoreHelpers, BatchMaker):
    """sample_t of a one-step trainer on a CPU generator, with a sim section."""

    def __init__(self, schedule, seed=0, **section):
        self.section = SIMConfig(**section)
        self.teacher = SimpleNamespace(schedule=schedule)
        self.device = torch.device("cpu")
        self.rng = torch.Generator().manual_seed(seed)
        self.config = SimpleNamespace(teacher=SimpleNamespace(beta_schedule="squaredcos_cap_v2"))
        self.reference_times()


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_t_from_logsnr_inverts_logsnr(name):
    ns = SCHEDULES[name]()
    t = torch.cat([torch.linspace(1e-3, 1, 997, dtype=torch.float64),
                   torch.rand(3000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)])
    lam = ns.logsnr(t)
    torch.testing.assert_close(ns.logsnr(ns.t_from_logsnr(lam)), lam, rtol=0, atol=1e-9)
    torch.testing.assert_close(ns.t_from_logsnr(lam), t, rtol=0, atol=1e-9)
    if ns.kind == "vp":  # at the table's points (index k) and between them, and beyond its ends
        table = ns.logsnr(torch.arange(1000, dtype=torch.float64) / 999)
        torch.testing.assert_close(ns.t_from_logsnr(table), torch.arange(1000, dtype=torch.float64) / 999,
                                   rtol=0, atol=1e-12)
        mid = (table[:-1] + table[1:]) / 2
        torch.testing.assert_close(ns.t_from_logsnr(mid) * 999, torch.arange(999, dtype=torch.float64) + 0.5,
                                   rtol=0, atol=1e-9)
        torch.testing.assert_close(ns.logsnr(ns.t_from_logsnr(mid)), mid, rtol=0, atol=1e-9)
        assert ns.t_from_logsnr(table[0] + 1).item() == 0 and ns.t_from_logsnr(table[-1] - 1).item() == 1
    else:  # closed form: any log-SNR, here ln sigma_EDM in [-5, 4]
        lam = torch.linspace(-8, 10, 301, dtype=torch.float64)
        torch.testing.assert_close(ns.logsnr(ns.t_from_logsnr(lam)), lam, rtol=0, atol=1e-9)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.3, 1.5), (-0.8, 0.6)])
def test_logit_normal_is_diffusers_sd3_density_from_the_same_generator(mean, std):
    """u = sigmoid(N(mean, std)) from the step's generator is diffusers' compute_density_for_timestep_sampling
    from a generator of the same seed (its float64 draws: the default dtype set to float64), then clamped."""
    n = 4096
    torch.set_default_dtype(torch.float64)
    try:
        want = compute_density_for_timestep_sampling("logit_normal", n, logit_mean=mean, logit_std=std,
                                                     generator=torch.Generator().manual_seed(7))
    finally:
        torch.set_default_dtype(torch.float32)
    ns = SCHEDULES["flow_shift3"]()  # t is the unshifted time: the schedule does not enter
    got = Draws(ns, seed=7, t_sampling="logit_normal", logit_mean=mean, logit_std=std, t_min=0.0,
                t_max=1.0).sample_t(n)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    clamped = Draws(ns, seed=7, t_sampling="logit_normal", logit_mean=mean, logit_std=std, t_min=0.2,
                    t_max=0.7).sample_t(n)
    torch.testing.assert_close(clamped, want.clamp(0.2, 0.7), rtol=0, atol=1e-15)
    assert (clamped == 0.2).any() and (clamped == 0.7).any()


@pytest.mark.parametrize("p_mean,p_std", [(-1.2, 1.2), (0.4, 0.7)])
@pytest.mark.parametrize("name", ["vp_cosine", "edm_karras", "flow_shift3"])
def test_lognormal_draws_edm_sigma_lognormal_in_every_family(name, p_mean, p_std):
    """ln sigma_EDM = ln(sigma / alpha) = -logsnr / 2 of the drawn t is p_mean + p_std z, z the N(0, 1) draws
    of the same generator (exactly, wherever the range does not clamp), and has mean p_mean and std p_std."""
    ns, n = SCHEDULES[name](), 200_000
    t = Draws(ns, seed=3, t_sampling="lognormal", p_mean=p_mean, p_std=p_std, t_min=0.0,
              t_max=1.0).sample_t(n)
    z = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ln_sigma = -ns.logsnr(t) / 2
    inside = (t > 0) & (t < 1)
    assert inside.float().mean() > 0.999
    torch.testing.assert_close(ln_sigma[inside], (p_mean + p_std * z)[inside], rtol=0, atol=1e-9)
    assert abs(ln_sigma.mean().item() - p_mean) < 0.01 and abs(ln_sigma.std().item() - p_std) < 0.01
    # a narrower range clamps the draws onto its ends
    t = Draws(ns, seed=3, t_sampling="lognormal", p_mean=p_mean, p_std=p_std, t_min=0.3,
              t_max=0.6).sample_t(n)
    free = ns.t_from_logsnr(-2 * (p_mean + p_std * z))
    torch.testing.assert_close(t, free.clamp(0.3, 0.6), rtol=0, atol=0)


def test_uniform_is_the_draw_it_always_was():
    """The default takes the same one float64 uniform draw per time from the step's generator, so every number
    of an existing run stays as it was, and the generator is left where it was."""
    d = Draws(SCHEDULES["vp_cosine"](), seed=5)
    assert d.section.t_sampling == "uniform" and d.section.time_weighting == "none"
    g = torch.Generator().manual_seed(5)
    want = 0.02 + (0.98 - 0.02) * torch.rand(64, generator=g, dtype=torch.float64)
    assert torch.equal(d.sample_t(64), want)
    assert torch.equal(d.rng.get_state(), g.get_state())
    per_sample = torch.randn(64)
    assert d.weight_generator_loss(per_sample, want) is per_sample


@pytest.mark.parametrize("kind", ["sigma_sqrt", "cosmap"])
def test_time_weights_are_diffusers_sd3_weights_on_flow_sigmas(kind):
    ns = SCHEDULES["flow_shift3"]()
    t = torch.linspace(0.02, 0.98, 97, dtype=torch.float64)
    want = compute_loss_weighting_for_sd3(kind, sigmas=ns.sigma(t))
    torch.testing.assert_close(time_weight(ns, t, kind), want.double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["vp_cosine", "edm_karras", "flow_shift3"])
def test_time_weights_read_the_flow_sigma_at_the_same_logsnr(name):
    """On vp and edm the weights are those of the flow sigma s with s / (1 - s) = sigma / alpha; 1 - s for
    one_minus_sigma."""
    ns, flow = SCHEDULES[name](), SCHEDULES["flow"]()
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    s = flow.sigma(flow.t_from_logsnr(ns.logsnr(t)))
    for kind in ("sigma_sqrt", "cosmap"):
        want = compute_loss_weighting_for_sd3(kind, sigmas=s).double()
        torch.testing.assert_close(time_weight(ns, t, kind), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(time_weight(ns, t, "one_minus_sigma"), 1 - s, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("override, key", [
    ("sim.t_sampling=gaussian", "sim.t_sampling"),
    ("uni_instruct.time_weighting=snr", "uni_instruct.time_weighting"),
    ("msd.logit_std=0", "msd.logit_std"),
    ("sim.p_std=-1", "sim.p_std"),
    ("uni_instruct.logit_mean=nan", "uni_instruct.logit_mean"),
    ("msd.p_mean=inf", "msd.p_mean"),
])
def test_bad_time_sampling_values_are_refused_by_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_sigma_sqrt_needs_a_positive_t_min():
    with pytest.raises(ConfigError, match=r"sim\.t_min: 0\.0 .*sim\.time_weighting=sigma_sqrt"):
        load_config(None, ["sim.time_weighting=sigma_sqrt", "sim.t_min=0"])
    assert load_config(None, ["sim.time_weighting=sigma_sqrt"]).sim.time_weighting == "sigma_sqrt"


def _first_updates(config, tmp_path, *overrides):
    """The fake-score loss, generator loss, the generator's unweighted per-sample loss and its times of step 0
    (no update applied between them)."""
    cfg = load_config(config, FAST + [f"output_dir={tmp_path}", "train.batch_size=64", *overrides])
    trainer = trainer_class(cfg.method)(cfg)
    trainer.setup()
    seen = {"t": [], "per_sample": []}
    sample_t, loss = trainer.sample_t, trainer.loss

    def record_t(n):
        seen["t"].append(sample_t(n))
        return seen["t"][-1]

    def record_loss(*args):
        seen["per_sample"].append(loss(*args))
        return seen["per_sample"][-1]

    trainer.sample_t, trainer.loss = record_t, record_loss
    trainer.rng = trainer.step_generator(0, 0)
    objective = trainer.objective(trainer._batch(), 0)
    fake = next(objective)
    gen = objective.send({fake.networks[0]: torch.tensor(0.0)})
    return fake.loss.detach(), gen.loss.detach(), seen["per_sample"][-1].detach(), seen["t"][-1], trainer


@pytest.mark.parametrize("config, method", [("configs/sim_gaussians8.yaml", "sim"),
                                            ("configs/uni_instruct_gaussians8.yaml", "uni_instruct")])
def test_the_weight_multiplies_the_generator_loss_only(config, method, tmp_path):
    extra = [f"{method}.init_denoiser_steps=0", "teacher.noise=flow"]
    if method == "uni_instruct":
        extra += ["uni_instruct.divergence=rkl"]
    fake0, gen0, per_sample, t, _ = _first_updates(config, tmp_path / "none", *extra)
    fake1, gen1, _, t1, trainer = _first_updates(config, tmp_path / "cosmap", *extra,
                                                 f"{method}.time_weighting=cosmap")
    assert torch.equal(fake0, fake1) and torch.equal(t, t1)
    w = time_weight(trainer.teacher.schedule, t, "cosmap").float()
    torch.testing.assert_close(gen1, (per_sample * w).mean(), rtol=1e-6, atol=1e-8)
    assert not torch.allclose(gen0, gen1)


@pytest.mark.parametrize("config, overrides", [
    ("configs/sim_gaussians8.yaml", ["teacher.noise=flow", "sim.t_sampling=logit_normal",
                                     "sim.time_weighting=cosmap", "sim.init_denoiser_steps=2"]),
    ("configs/uni_instruct_gaussians8.yaml", ["teacher.noise=edm", "uni_instruct.t_sampling=lognormal",
                                              "uni_instruct.time_weighting=one_minus_sigma",
                                              "uni_instruct.init_denoiser_steps=2",
                                              "uni_instruct.ratio_warmup_steps=0"]),
    ("configs/msd_gaussians8.yaml", ["teacher.noise=vp", "msd.t_sampling=lognormal",
                                     "msd.time_weighting=sigma_sqrt", "msd.tsm_steps=2",
                                     "msd.num_students=2"]),
], ids=["sim-flow", "uni_instruct-edm", "msd-vp"])
def test_two_training_steps_run(config, overrides, tmp_path):
    cfg = load_config(config, FAST + [f"output_dir={tmp_path}", "train.max_steps=2", "train.batch_size=32",
                                      "train.log_every=1", *overrides])
    trainer = trainer_class(cfg.method)(cfg)
    path = trainer.train()
    assert (path / "model_index.json").is_file()
    last = trainer.history[-1]
    assert math.isfinite(last["gen_loss"]) and math.isfinite(last["fake_loss"])


@pytest.mark.parametrize("noise", ["edm", "flow"])
def test_times_on_vp_puts_the_same_noise_levels_on_every_family(noise):
    """``times_on: vp``: t*, t_min / t_max and the uniform draws are points of the VP table of
    teacher.beta_schedule mapped at equal log-SNR, so an edm or flow teacher trains at the VP run's noise
    levels; on a vp teacher it is the identity (the same draws, bitwise)."""
    vp = SCHEDULES["vp_cosine"]()
    ns = SCHEDULES["edm_karras" if noise == "edm" else "flow_shift3"]()
    d = Draws(ns, seed=7, times_on="vp")
    mine = d.sample_t(256)
    g = torch.Generator().manual_seed(7)
    ref = 0.02 + (0.98 - 0.02) * torch.rand(256, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ns.logsnr(mine), vp.logsnr(ref), rtol=0, atol=1e-9)
    assert not torch.allclose(mine, ref)  # the times differ; the noise levels do not
    d = Draws(ns, seed=7, times_on="vp", t_sampling="lognormal", t_min=0.1, t_max=0.9)
    z = torch.randn(256, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    want = vp.logsnr(vp.t_from_logsnr(-2 * (-1.2 + 1.2 * z)).clamp(0.1, 0.9))
    torch.testing.assert_close(ns.logsnr(d.sample_t(256)), want, rtol=0, atol=1e-9)
    on_vp = Draws(vp, seed=7, times_on="vp")
    assert torch.equal(on_vp.sample_t(256), ref)


@pytest.mark.parametrize("noise", ["edm", "flow"])
def test_times_on_vp_puts_the_generator_at_the_vp_runs_noise_level(noise, tmp_path):
    """The one-step generator of configs/sim_gaussians8.yaml (times_on: vp, generator_timestep 800) sits at
    the log-SNR of VP index 800 on an edm / flow teacher, and its export carries that sigma."""
    cfg = load_config("configs/sim_gaussians8.yaml",
                      [*FAST, f"output_dir={tmp_path}", f"teacher.noise={noise}",
                       "sim.init_denoiser_steps=0"])
    trainer = trainer_class("sim")(cfg)
    trainer.setup()
    vp = NoiseSchedule.vp_from_betas("squaredcos_cap_v2")
    sched = trainer.teacher.schedule
    want = vp.logsnr(torch.tensor(800 / 999, dtype=torch.float64))
    torch.testing.assert_close(sched.logsnr(trainer.t_star), want, rtol=0, atol=1e-9)
    assert trainer.generator_noise()["generator_sigma"] == float(sched.sigma(trainer.t_star))

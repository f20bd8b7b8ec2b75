"""Shared pieces of one-step score distillation (Diff-Instruct, DMD, SiD, SIM, Uni-Instruct, MSD).

Networks (Luo et al. 2023 sec. 3; Yin et al. 2024 sec. 3): the frozen teacher D_p; a fake score D_psi
trained by denoising score matching on detached generator samples; the one-step generator G, the
denoiser evaluated at the fixed index t* on sigma(t*) z and read in its prediction type (the SiD-LSG
parameterisation, Zhou et al. 2024). The helpers take a :class:`ScoreGroup` (which registered networks
form one generator / fake score pair), so one trainer can hold several (multi-student distillation).

A trainer that mixes in :class:`OneStepScoreHelpers` sets ``t_star`` (continuous t of the generator
index), ``pred`` (the prediction type of generator and fake score), ``loss`` (called as
``loss(x0, x_t, d_real, d_fake, coef)``) and has a ``section`` with ``t_min`` / ``t_max``, ``t_sampling``
(with ``logit_mean`` / ``logit_std`` / ``p_mean`` / ``p_std``) and ``time_weighting``.

Time of the fake-score and generator losses (``t_sampling``, :meth:`OneStepScoreHelpers.sample_t`):
``uniform`` in [t_min, t_max] (the SiD / SIM / Uni-Instruct reference code); ``logit_normal``: t =
sigmoid(N(logit_mean, logit_std)) as the unshifted time (Esser et al. 2024, sec. 3.1, eq. 19; diffusers'
``compute_density_for_timestep_sampling``); ``lognormal``: ln sigma_EDM ~ N(p_mean, p_std) with sigma_EDM =
sigma / alpha of the family (Karras et al. 2022, Table 1, P_mean / P_std), i.e. log-SNR = -2 ln sigma_EDM,
mapped to t by :meth:`NoiseSchedule.t_from_logsnr`.

Time weight of the generator loss (``time_weighting``, :func:`time_weight`), a per-sample multiplier on
top of the x0-space weight 1 of objectives.score, in the flow sigma s of the family.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import diffusers
import torch

from .. import backbones
from ..engine import Update, build_network, frozen
from ..errors import ConfigError
from ..noise import NoiseSchedule
from ..objectives.score import DiffInstructLoss, fake_score_loss
from ..pipelines import OneStepPipeline, TextToImagePipeline


def time_weight(schedule, t: torch.Tensor, kind: str) -> torch.Tensor:
    """The generator loss's weight at time t (float64), in the flow sigma s = sigma / (alpha + sigma): on a
    flow teacher its own sigma (alpha + sigma = 1), on vp / edm the flow sigma at the same log-SNR
    (s / (1 - s) = sigma / alpha). ``sigma_sqrt``: s^-2 and ``cosmap``: 2 / (pi (1 - 2 s + 2 s^2)) (Esser et
    al. 2024, sec. 3.1, the CosMap density of eq. 21; diffusers' ``compute_loss_weighting_for_sd3``);
    ``one_minus_sigma``: 1 - s (SiD on flow-matching teachers, Zhou et al. 2025, "Score Distillation of
    Flow Matching Models", arXiv 2509.25127). ``none`` (weight 1) multiplies nothing:
    :meth:`OneStepScoreHelpers.weight_generator_loss` leaves the loss as it is."""
    a, sigma = schedule.alpha_sigma(t)
    s = sigma / (a + sigma)
    if kind == "sigma_sqrt":
        return s**-2
    if kind == "cosmap":
        return 2 / (math.pi * (1 - 2 * s + 2 * s * s))
    if kind == "one_minus_sigma":
        return 1 - s
    raise ValueError(f"time_weighting {kind!r} is not one of 'sigma_sqrt', 'cosmap', 'one_minus_sigma'.")


def one_step_checks(key: str, s) -> list[tuple]:
    """The checks every one-step score-distillation section shares (SIM, Uni-Instruct, MSD)."""
    n = s.fake_steps_per_generator_step
    return [
        (0 <= s.generator_timestep < 1000, f"{key}.generator_timestep", s.generator_timestep,
         "a training index in [0, 999]"),
        (0 <= s.t_min < s.t_max <= 1, f"{key}.t_min/t_max", (s.t_min, s.t_max), "0 <= t_min < t_max <= 1"),
        (n is None or n >= 1, f"{key}.fake_steps_per_generator_step", n, "an integer >= 1"
         + (" or null (the method's default)" if key == "uni_instruct" else "")),
        (math.isfinite(s.logit_mean), f"{key}.logit_mean", s.logit_mean, "a finite number"),
        (math.isfinite(s.logit_std) and s.logit_std > 0, f"{key}.logit_std", s.logit_std,
         "a positive number (the std of the logit-normal time)"),
        (math.isfinite(s.p_mean), f"{key}.p_mean", s.p_mean, "a finite number"),
        (math.isfinite(s.p_std) and s.p_std > 0, f"{key}.p_std", s.p_std,
         "a positive number (the std of ln sigma_EDM)"),
        (s.time_weighting != "sigma_sqrt" or s.t_min > 0, f"{key}.t_min", s.t_min,
         f"t_min > 0 with {key}.time_weighting=sigma_sqrt (sigma^-2 is infinite at t = 0 on a flow teacher), "
         "or another time_weighting"),
    ]


@dataclass
class ScoreGroup:
    """The networks one score-distillation update trains together, by their registered names: a one-step
    generator, its fake score and (Uni-Instruct) the discriminator head on the fake score's features."""

    generator: str = "student"
    fake: str = "fake"
    disc: str | None = None


def check_student_prediction(teacher, pred: str) -> None:
    """A student of a flow-matching teacher starts at or near pure noise (alpha = 0 at t = 1), where an
    epsilon output gives no x0: it predicts the velocity (the teacher's), v or x0 itself."""
    if teacher.schedule.kind == "flow" and pred == "epsilon":
        raise ConfigError("student.prediction_type='epsilon' on a flow-matching teacher: a student near pure "
                          "noise predicts the velocity ('flow', the teacher's), 'v_prediction' or 'sample'; "
                          "remove it or set one of those.")


class OneStepScoreHelpers:
    """Generator sampling, the fake-score update and the generator update of one :class:`ScoreGroup`."""

    def reference_times(self) -> None:
        """The schedule ``section.times_on`` reads t_min / t_max, generator_timestep and the drawn t on:
        the teacher's own, or (``vp``, on an edm / flow teacher) the VP table of ``teacher.beta_schedule``,
        each reference time then mapped to the teacher's time of equal log-SNR."""
        sched = self.teacher.schedule
        self._vp_times = None
        if self.section.times_on == "vp" and sched.kind != "vp":
            self._vp_times = NoiseSchedule.vp_from_betas(self.config.teacher.beta_schedule,
                                                         sched.num_train_timesteps)

    def on_teacher_times(self, t: torch.Tensor) -> torch.Tensor:
        """Reference times -> the teacher's (identity unless ``times_on=vp`` on an edm / flow teacher)."""
        if self._vp_times is None:
            return t
        return self.teacher.schedule.t_from_logsnr(self._vp_times.logsnr(t)).to(t.device)

    def set_generator_timestep(self, index: int) -> None:
        """t* = the generator's training index as continuous time (on ``times_on``'s schedule); sigma(t*), t*
        and the network's timestep at t* are kept on the device (no host copy per batch)."""
        sched = self.teacher.schedule
        self.reference_times()
        self.t_star = self.on_teacher_times(sched.t_from_timestep(index))
        self._sigma_star = float(sched.sigma(self.t_star))
        self._t_star_device = self.t_star.to(self.device)
        self._timestep_star = sched.timestep(self.t_star).to(self.device)

    def generate(self, net, z: torch.Tensor, cond) -> torch.Tensor:
        """x0 = G(z): the denoiser at t* on sigma(t*) z (same math as OneStepPipeline)."""
        return self.as_denoiser(net).x0(self._sigma_star * z, self._t_star_device, cond,
                                        timestep=self._timestep_star.expand(z.shape[0]))

    def sample_t(self, n: int) -> torch.Tensor:
        """n times of the fake-score / generator losses from this step's generator (float64), by
        ``section.t_sampling`` (module docstring). logit_normal and lognormal draw N(0, 1) on the step's
        generator as diffusers' ``compute_density_for_timestep_sampling`` does and are then clamped to
        [t_min, t_max] (the mass outside the range sits on its ends)."""
        s = self.section
        if s.t_sampling == "uniform":
            return self.on_teacher_times(s.t_min + (s.t_max - s.t_min) * self.rand(n, dtype=torch.float64))
        z = torch.randn(n, generator=self.rng, device=self.rng.device, dtype=torch.float64).to(self.device)
        if s.t_sampling == "logit_normal":
            t = torch.sigmoid(s.logit_mean + s.logit_std * z)
        else:  # lognormal: log-SNR = -2 ln sigma_EDM
            sched = self.teacher.schedule if self._vp_times is None else self._vp_times
            t = sched.t_from_logsnr(-2 * (s.p_mean + s.p_std * z))
        return self.on_teacher_times(t.clamp(s.t_min, s.t_max))

    def weight_generator_loss(self, per_sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The generator's per-sample loss times ``time_weight`` at its times (unchanged for ``none``)."""
        kind = self.section.time_weighting
        if kind == "none":
            return per_sample
        return per_sample * time_weight(self.teacher.schedule, t, kind).to(per_sample.dtype)

    def teacher_x0(self, x_t, t, cond) -> torch.Tensor:
        """D_p: the teacher's clean-sample prediction, guided by ``teacher.guidance_scale``."""
        with self.accelerator.autocast():
            return self.teacher.denoiser.x0(x_t, t, cond).float()

    def fake_inputs(self, g: ScoreGroup, cond, b: int):
        """Noised detached generator samples and the fake score's regression target (DSM)."""
        sched = self.teacher.schedule
        z = self.randn(b, *self.teacher.sample_shape)
        with torch.no_grad():
            x_g = self.generate(self.unwrap(g.generator), z, cond)
        t = self.sample_t(b)
        eps = self.randn(*x_g.shape)
        return sched.add_noise(x_g, eps, t), t, sched.from_x0_eps(x_g, eps, t, self.pred)

    def fake_step(self, g: ScoreGroup, cond, b: int, batch: dict):
        """One fake-score update (denoising score matching on detached generator samples)."""
        x_t, t, target = self.fake_inputs(g, cond, b)
        pred = self.as_denoiser(self.modules[g.fake]).output(x_t, t, cond)
        loss = fake_score_loss(pred, target).mean()
        norms = yield Update(loss, g.fake)
        return {"fake_loss": loss.detach(), "fake_grad_norm": norms[g.fake]}

    def generator_terms(self, g: ScoreGroup, cond, b: int, through_inputs: bool = True):
        """x0, x_t, t, D_p, D_psi and c = alpha / sigma^2 for a fresh generator batch. ``through_inputs``: the
        loss takes gradients through the inputs of the teacher and the fake score (SIM, SiD, Uni-Instruct);
        Diff-Instruct / DMD detach both outputs, so their passes then run without autograd and keep no
        activations."""
        sched = self.teacher.schedule
        z = self.randn(b, *self.teacher.sample_shape)
        x0 = self.generate(self.modules[g.generator], z, cond)
        t = self.sample_t(b)
        eps = self.randn(*x0.shape)
        x_t = sched.add_noise(x0, eps, t)
        with torch.set_grad_enabled(through_inputs and torch.is_grad_enabled()):
            # the caller holds the fake network frozen
            d_fake = self.as_denoiser(self.unwrap(g.fake)).x0(x_t, t, cond)
            d_real = self.teacher_x0(x_t, t, cond)
        a, s = sched.alpha_sigma(t, x_t)
        coef = (a / (s * s)).float()
        return x0, x_t, t, d_real, d_fake, coef

    def generator_step(self, g: ScoreGroup, cond, b: int, batch: dict, step: int, extra_loss=None,
                       per_sample_term=None, frozen_too=()):
        """One generator update on ``self.loss`` with gradients through the INPUT of the frozen teacher and
        fake networks, plus ``per_sample_term(x_t, t)`` (a per-sample loss and its logs, added before the
        mean, e.g. DMD2's GAN term through a frozen discriminator in ``frozen_too``) and ``extra_loss()`` (a
        scalar, e.g. DMD's regression term) when given. The fake network stays frozen through the backward
        pass: toggling requires_grad between forward and backward would make gradient-checkpoint
        recomputation differ from the forward."""
        logs = {}
        with frozen(self.unwrap(g.fake), *frozen_too):
            x0, x_t, t, d_real, d_fake, coef = self.generator_terms(
                g, cond, b, through_inputs=not isinstance(self.loss, DiffInstructLoss))
            per_sample = self.weight_generator_loss(self.loss(x0, x_t, d_real, d_fake, coef), t)
            if per_sample_term is not None:
                term, term_logs = per_sample_term(x_t, t)
                per_sample = per_sample + term
                logs.update(term_logs)
            loss = self.finite_mean(per_sample)
            if extra_loss is not None:
                extra = extra_loss()
                logs["extra_loss"] = extra.detach()
                loss = loss + extra
            norms = yield Update(loss, g.generator)
        return {"gen_loss": loss.detach(), "grad_norm": norms[g.generator],
                "teacher_gap": (d_real - d_fake).detach().pow(2).mean().sqrt(), **logs}

    # ------------------------------------------------------------------ build
    def build_pair(self) -> None:
        """The generator and its fake score: LoRA adapters on the teacher's own network, copies of the
        teacher, or fresh networks fitted to it; registered as ``self.group`` with the generator's EMA;
        ``self.loss`` from the method's ``make_loss``."""
        cfg, sec = self.config, self.section
        t = self.teacher
        shape, ncls = t.sample_shape, t.num_classes
        if self.lora:  # student and fake score: LoRA adapters on the teacher's own (shared, frozen) network
            gen, fake = self.lora_views(["student", "fake"], sec.gradient_checkpointing)
            self.pred = t.prediction_type
        else:
            if cfg.student.arch == "copy":
                gen = build_network(cfg, t, shape, ncls)
                self.pred = t.prediction_type
            else:
                gen = build_network(cfg, t, shape, ncls)
                self.pred = cfg.student.prediction_type or t.prediction_type
                check_student_prediction(t, self.pred)
                if sec.init_denoiser_steps:
                    self.fit_to_teacher(gen, sec.init_denoiser_steps, self.pred)
            fake = copy.deepcopy(gen).requires_grad_(True).train()
            if sec.gradient_checkpointing:
                for net in (t.model, fake, gen):
                    if hasattr(net, "enable_gradient_checkpointing"):
                        net.enable_gradient_checkpointing()
        self.group = ScoreGroup()
        self.add(self.group.generator, gen, lr=cfg.optim.lr, ema=True)
        self.add(self.group.fake, fake, lr=sec.lr_fake or cfg.optim.lr)
        self.set_generator_timestep(sec.generator_timestep)
        self.loss = self.make_loss()
        self.num_classes = ncls

    # ------------------------------------------------------------------ step / export
    def objective(self, batch: dict, step: int):
        """The two-time-scale rule: ``fake_steps_per_generator_step`` fake-score updates, then (after
        ``fake_warmup_steps``) one generator update."""
        sec = self.section
        b, cond = batch["size"], batch["cond"]
        logs = {}
        for _ in range(self.fake_steps_per_generator_step):
            logs.update((yield from self.fake_step(self.group, cond, b, batch)))
        if step >= sec.fake_warmup_steps:
            logs.update((yield from self.generator_step(self.group, cond, b, batch, step)))
        return logs

    def export_scheduler(self):
        """The teacher family's scheduler: DDPMScheduler from a VP table, or the teacher's own EDM / flow
        scheduler class, in the generator's parameterisation."""
        sched = self.teacher.scheduler
        if self.teacher.schedule.kind == "vp":
            return diffusers.DDPMScheduler.from_config(sched.config, prediction_type=self.pred)
        edm_pred = self.teacher.schedule.kind == "edm" and self.pred != "sample"
        return type(sched).from_config(sched.config, **({"prediction_type": self.pred} if edm_pred else {}))

    def generator_noise(self) -> dict:
        """t*'s noise level and network time for the export, as training computed them (EDM and flow)."""
        if self.teacher.schedule.kind == "vp":
            return {}
        return {"generator_sigma": self._sigma_star, "generator_time": float(self._timestep_star),
                "prediction_type": self.pred}

    def export(self, for_samples: bool = False):
        frozen = self.teacher.frozen_components(reload=not for_samples)  # latent teachers: VAE, text parts
        if self.teacher.is_text:
            net = self.export_network(self.group.generator)
            return TextToImagePipeline(**{"unet": None, self.teacher.network_name: net},
                                       scheduler=self.export_scheduler(),
                                       generator_timestep=self.section.generator_timestep,
                                       force_zeros_for_empty_prompt=self.teacher.force_zeros_for_empty_prompt,
                                       **frozen, **self.teacher.export_size, **self.generator_noise())
        return OneStepPipeline(self.export_network(self.group.generator), self.export_scheduler(),
                               generator_timestep=self.section.generator_timestep,
                               sample_shape=self.teacher.sample_shape, num_classes=self.num_classes,
                               **frozen, **self.generator_noise())

    def lora_inference(self) -> tuple:
        """One Euler step at t*: the teacher pipeline's input (z times the scheduler's init_noise_sigma,
        divided by sqrt(sigma_VE^2 + 1)) is then sigma(t*) z, and one Euler step to sigma = 0 returns the
        denoised x0 = G(z). SD3 / FLUX.1 teachers: their own flow scheduler at one step from s = 1 (x0 = z -
        v), SD3 without CFG, FLUX.1-dev at the embedded guidance the student was trained with."""
        if self.teacher.schedule.kind == "flow":
            cfg = backbones.stock_pipeline(self.teacher.weights) == "StableDiffusion3Pipeline"
            return copy.deepcopy(self.teacher.scheduler), {"num_inference_steps": 1,
                                                           **({"guidance_scale": 1.0} if cfg else {})}
        sched = diffusers.EulerDiscreteScheduler.from_config(self.teacher.scheduler.config,
                                                             prediction_type=self.pred,
                                                             timestep_spacing="trailing")
        t_star = self.section.generator_timestep
        steps = {"num_inference_steps": 1} if t_star == self.teacher.schedule.num_train_timesteps - 1 else {
            "timesteps": [t_star]}
        return sched, {**steps, "guidance_scale": 1.0}

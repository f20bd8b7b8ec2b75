"""ScoreImplicitMatchingTrainer: one-step SIM distillation (Luo et al. 2024, "One-Step Diffusion
Distillation through Score Implicit Matching", NeurIPS 2024; score_distillation.md s4).

Networks (s0.2): the frozen teacher D_p; a fake score D_psi (a copy of the teacher, or for the
analytic teacher an MLP initialised like the generator); the one-step generator G, the denoiser
evaluated at the fixed index t* (``sim.generator_timestep``) on sigma(t*) z, read in its
prediction type (SiD-LSG parameterisation, s0.2), exported as :class:`OneStepPipeline`.

Each step: ``fake_steps_per_generator_step`` fake-score updates by denoising score matching on
detached generator samples (s0.3), then one generator update on the SIM surrogate

    L = <grad g(D_p - D_psi), D_psi - x0>   at x_t = alpha G(z) + sigma eps,   t ~ U[t_min, t_max]

with gradients through the INPUT of the frozen teacher and fake networks (objectives.score.SIMLoss).
Defaults follow the SiD/DI code the SIM authors build on (paper_checks.md s1): Adam betas (0, 0.999)
(set optim.betas), 1:1 updates, generator EMA. ``distance: l2`` with ``sid_alpha: A`` is SiD(alpha)
(Zhou et al. 2024); ``sid_alpha: 1`` equals SIM-L2.

The loss is not a convergence signal (it oscillates around zero, s8.6): watch ``grad_norm``,
``fake_loss`` and the FID / toy metrics instead.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import diffusers
import torch

from ..conditioning import network_kwargs
from ..objectives.score import SIMLoss, fake_score_loss
from ..pipelines import OneStepPipeline, TextToImagePipeline
from .base import DistillationTrainer, build_network, frozen


@dataclass
class ScoreGroup:
    """The networks one score-distillation update trains together, by their registered names: a one-step
    generator, its fake score and (Uni-Instruct) the discriminator head on the fake score's features. The
    helpers below take a group, so a trainer can hold several (multi-student distillation)."""

    generator: str = "student"
    fake: str = "fake"
    disc: str | None = None


class ScoreImplicitMatchingTrainer(DistillationTrainer):
    method = "sim"

    @property
    def section(self):
        return self.config.sim

    def make_loss(self):
        s = self.section
        return SIMLoss(distance=s.distance, huber_c=s.huber_c, sid_alpha=s.sid_alpha, sample_weight=s.sample_weight)

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        cfg, sec = self.config, self.section
        t = self.teacher
        shape, ncls = t.sample_shape, t.num_classes
        if cfg.student.arch == "copy":
            gen = build_network(cfg, t, shape, ncls)
            self.gen_pred = t.prediction_type
        else:
            cfg.student.conditional = bool(ncls)
            gen = build_network(cfg, t, shape, ncls)
            self.gen_pred = cfg.student.prediction_type or t.prediction_type
            if sec.init_denoiser_steps:
                self.fit_to_teacher(gen, sec.init_denoiser_steps, self.gen_pred)
        fake = copy.deepcopy(gen).requires_grad_(True).train()
        self.fake_pred = self.gen_pred
        if sec.gradient_checkpointing:
            for net in (t.model, fake, gen):
                if hasattr(net, "enable_gradient_checkpointing"):
                    net.enable_gradient_checkpointing()
        self.group = ScoreGroup()
        self.add(self.group.generator, gen, lr=cfg.optim.lr, ema=True)
        self.add(self.group.fake, fake, lr=sec.lr_fake or cfg.optim.lr)
        self.t_star = torch.tensor(sec.generator_timestep / (t.schedule.num_train_timesteps - 1), dtype=torch.float64)
        self.loss = self.make_loss()
        self.num_classes = ncls

    @property
    def fake_steps_per_generator_step(self) -> int:
        return self.section.fake_steps_per_generator_step

    # ------------------------------------------------------------------ pieces
    def generate(self, net, z: torch.Tensor, cond) -> torch.Tensor:
        """x0 = G(z): the denoiser at t* on sigma(t*) z (same math as OneStepPipeline)."""
        sched = self.teacher.schedule
        sigma = sched.sigma(self.t_star).item()
        x_in = sigma * z
        ts = sched.timestep(self.t_star).expand(z.shape[0]).to(z.device)
        with self.accelerator.autocast():
            out = net(x_in, ts, **network_kwargs(net, cond)).sample.float()
        return sched.to_x0_eps(out, x_in, self.t_star, self.gen_pred)[0]

    def sample_t(self, n: int) -> torch.Tensor:
        s = self.section
        return (s.t_min + (s.t_max - s.t_min) * torch.rand(n, generator=self.rng, dtype=torch.float64)).to(self.device)

    def fake_x0(self, net, x_t, t, cond) -> torch.Tensor:
        sched = self.teacher.schedule
        with self.accelerator.autocast():
            out = net(x_t, sched.timestep(t), **network_kwargs(net, cond)).sample.float()
        return sched.to_x0_eps(out, x_t, t, self.fake_pred)[0]

    def teacher_x0(self, x_t, t, cond) -> torch.Tensor:
        with self.accelerator.autocast():
            return self.teacher.predict_x0(x_t, t, cond, self.config.teacher.guidance_scale).float()

    def fake_inputs(self, g: ScoreGroup, cond, b: int):
        """Noised detached generator samples and the fake score's regression target (s0.3)."""
        sched = self.teacher.schedule
        z = self.randn(b, *self.teacher.sample_shape)
        with torch.no_grad():
            x_g = self.generate(self.unwrap(g.generator), z, cond)
        t = self.sample_t(b)
        eps = self.randn(*x_g.shape)
        return sched.add_noise(x_g, eps, t), t, sched.from_x0_eps(x_g, eps, t, self.fake_pred)

    def fake_step(self, g: ScoreGroup, cond, b: int, batch: dict) -> dict:
        x_t, t, target = self.fake_inputs(g, cond, b)
        fake = self.modules[g.fake]
        with self.accelerator.autocast():
            pred = fake(x_t, self.teacher.schedule.timestep(t), **network_kwargs(fake, cond)).sample
        loss = fake_score_loss(pred, target).mean()
        norm = self.step_optimizer(g.fake, loss)
        return {"fake_loss": loss.item(), "fake_grad_norm": norm}

    def generator_terms(self, g: ScoreGroup, cond, b: int):
        """x0, x_t, t, D_p, D_psi and c = alpha / sigma^2 for a fresh generator batch."""
        sched = self.teacher.schedule
        z = self.randn(b, *self.teacher.sample_shape)
        x0 = self.generate(self.modules[g.generator], z, cond)
        t = self.sample_t(b)
        eps = self.randn(*x0.shape)
        x_t = sched.add_noise(x0, eps, t)
        d_fake = self.fake_x0(self.unwrap(g.fake), x_t, t, cond)  # the caller holds the fake network frozen
        d_real = self.teacher_x0(x_t, t, cond)
        a, s = sched.alpha_sigma(t, x_t)
        coef = (a / (s * s)).float()
        return x0, x_t, t, d_real, d_fake, coef

    def generator_step(self, g: ScoreGroup, cond, b: int, batch: dict, step: int) -> dict:
        # the fake network stays frozen through the backward pass: toggling requires_grad between forward and
        # backward would make gradient-checkpoint recomputation differ from the forward
        with frozen(self.unwrap(g.fake)):
            x0, x_t, t, d_real, d_fake, coef = self.generator_terms(g, cond, b)
            per_sample = self.loss(x0, x_t, d_real, d_fake, coef)
            loss = self.finite_mean(per_sample)
            norm = self.step_optimizer(g.generator, loss)
        return {"gen_loss": loss.item(), "grad_norm": norm,
                "teacher_gap": (d_real - d_fake).pow(2).mean().sqrt().item()}

    # ------------------------------------------------------------------ step / export
    def train_step(self, batch: dict, step: int) -> dict:
        sec = self.section
        b, cond = batch["size"], batch["cond"]
        logs = {}
        for _ in range(self.fake_steps_per_generator_step):
            logs.update(self.fake_step(self.group, cond, b, batch))
        if step >= sec.fake_warmup_steps:
            logs.update(self.generator_step(self.group, cond, b, batch, step))
        return logs

    def export_scheduler(self):
        return diffusers.DDPMScheduler.from_config(self.teacher.scheduler.config, prediction_type=self.gen_pred)

    def export(self, for_samples: bool = False):
        if self.teacher.is_text:
            return TextToImagePipeline(self.unwrap(self.group.generator), scheduler=self.export_scheduler(),
                                       generator_timestep=self.section.generator_timestep,
                                       force_zeros_for_empty_prompt=self.teacher.force_zeros_for_empty_prompt,
                                       **self.teacher.frozen_components(reload=not for_samples))
        return OneStepPipeline(self.unwrap(self.group.generator), self.export_scheduler(),
                               generator_timestep=self.section.generator_timestep,
                               sample_shape=self.teacher.sample_shape, num_classes=self.num_classes)

    def card_info(self) -> dict:
        s = self.section
        return {"method": self.method, "teacher": self.config.teacher.path, "steps_to_sample": 1,
                "generator_timestep (t*)": s.generator_timestep, "distance": s.distance, "huber_c": s.huber_c,
                "sid_alpha": s.sid_alpha}

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

import diffusers
import torch

from ..objectives.score import SIMLoss
from ..pipelines import OneStepPipeline, TextToImagePipeline
from .base import DistillationTrainer, build_network
from .score_helpers import OneStepScoreHelpers, ScoreGroup


class ScoreImplicitMatchingTrainer(OneStepScoreHelpers, DistillationTrainer):
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
        if self.lora:  # student and fake score: LoRA adapters on the teacher's own (shared, frozen) network
            gen, fake = self.lora_views(["student", "fake"], sec.gradient_checkpointing)
            self.gen_pred = t.prediction_type
        else:
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
            if sec.gradient_checkpointing:
                for net in (t.model, fake, gen):
                    if hasattr(net, "enable_gradient_checkpointing"):
                        net.enable_gradient_checkpointing()
        self.fake_pred = self.gen_pred
        self.group = ScoreGroup()
        self.add(self.group.generator, gen, lr=cfg.optim.lr, ema=True)
        self.add(self.group.fake, fake, lr=sec.lr_fake or cfg.optim.lr)
        self.t_star = torch.tensor(sec.generator_timestep / (t.schedule.num_train_timesteps - 1), dtype=torch.float64)
        self.loss = self.make_loss()
        self.num_classes = ncls

    @property
    def fake_steps_per_generator_step(self) -> int:
        return self.section.fake_steps_per_generator_step

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
            return TextToImagePipeline(self.export_network(self.group.generator), scheduler=self.export_scheduler(),
                                       generator_timestep=self.section.generator_timestep,
                                       force_zeros_for_empty_prompt=self.teacher.force_zeros_for_empty_prompt,
                                       **self.teacher.frozen_components(reload=not for_samples))
        return OneStepPipeline(self.export_network(self.group.generator), self.export_scheduler(),
                               generator_timestep=self.section.generator_timestep,
                               sample_shape=self.teacher.sample_shape, num_classes=self.num_classes)

    def lora_inference(self) -> tuple:
        """One Euler step at t*: the teacher pipeline's input (z times the scheduler's init_noise_sigma, divided by
        sqrt(sigma_VE^2 + 1)) is then sigma(t*) z, and one Euler step to sigma = 0 returns the denoised x0 = G(z)."""
        sched = diffusers.EulerDiscreteScheduler.from_config(self.teacher.scheduler.config, prediction_type=self.gen_pred,
                                                             timestep_spacing="trailing")
        t_star = self.section.generator_timestep
        steps = {"num_inference_steps": 1} if t_star == self.teacher.schedule.num_train_timesteps - 1 else {
            "timesteps": [t_star]}
        return sched, {**steps, "guidance_scale": 1.0}

    def card_info(self) -> dict:
        s = self.section
        return {"method": self.method, "teacher": self.config.teacher.path, "steps_to_sample": 1,
                "generator_timestep (t*)": s.generator_timestep, "distance": s.distance, "huber_c": s.huber_c,
                "sid_alpha": s.sid_alpha}

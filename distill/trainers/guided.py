"""GuidedDistillationTrainer (Meng et al. 2023, "On Distillation of Guided Diffusion Models",
CVPR 2023, sec. 4).

Stage one: a w-conditioned student x_eta(z_t, c, w) regresses the classifier-free-guided teacher

    x^w(z_t) = (1 + w) x_c(z_t) - w x_null(z_t)                     (Meng et al. eq. 5)

with w ~ U[w_min, w_max] per example and t uniform on the teacher's discrete table, weighted by the
same truncated-SNR x-space weight as progressive distillation (the paper's lambda-weighting is not
stated in what could be read). The student is the teacher's own network with a
zero-initialised w embedding added to its time embedding (``GuidedUNet2DModel`` / ``MLPDenoiser``
with ``guidance_embed_dim``), so it starts as the conditional teacher.

Stage two: progressive distillation (Salimans & Ho 2022) of the stage-one model from
``start_steps`` down to ``target_steps``, the same w in round teacher and student.

FLUX.1-dev takes the guidance scale as a network input already (its authors distilled the guidance in): it
is stage one's model, so stage one is skipped and the rounds feed s = 1 + w to that input.

Convention: the config and the pipeline speak diffusers' ``guidance_scale`` s = 1 + w; the networks
take Meng's w (``guidance_weight=``). Exports: ``rounds/steps-<start_steps>`` is the stage-one model,
then one folder per round, the last also as ``pipeline``; each is a ``FewStepPipeline`` whose
``pipe(guidance_scale=s)`` samples in its trained step count, deterministic (DDIM) or with
``stochastic=True`` (the paper's stochastic N-step sampler, see pipelines/few_step.py).

Choices where the paper could not be read: w range default
s in [1, 5] (w in [0, 4], the recalled pixel range); sinusoidal embedding of 1000 w (diffusers/LCM);
stage-one length ``stage_one_steps``; stage two uses the progressive round lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import backbones
from ..engine import DistillationTrainer, Update, build_network
from ..errors import ConfigError, require
from ..objectives.progressive import progressive_loss
from .rounds import HalvingRounds, RoundsConfig, round_plan

if TYPE_CHECKING:
    from ..config import Config


@dataclass
class GuidedConfig(RoundsConfig):
    """Guided distillation (Meng et al. 2023): stage one + progressive rounds from ``start_steps``.

    Guidance scales use diffusers' convention s = 1 + w (w: Meng et al.'s weight, 0 = no guidance).
    Defaults: s in [1, 5] is the paper's pixel range w in [0, 4] (recalled, not read in the paper).
    """

    guidance_min: float = 1.0  # diffusers guidance_scale range, sampled uniformly per example
    guidance_max: float = 5.0
    default_guidance_scale: float = 2.0  # what the exported pipeline uses when guidance_scale is not passed
    stage_one_steps: int = 1000  # updates of the w-conditioned regression onto the CFG teacher
    guidance_embed_dim: int = 64  # sinusoidal embedding width of 1000 w
    guidance_lr_multiplier: float = 10.0  # learning-rate multiplier of the new (zero-initialised) w embedding

    def validate(self, cfg: Config) -> None:
        self.validate_rounds(cfg, "guided", strict=False)
        require([(1.0 <= self.guidance_min <= self.guidance_max, "guided.guidance_min/guidance_max",
                   (self.guidance_min, self.guidance_max),
                   "1 <= guidance_min <= guidance_max (diffusers' guidance_scale = 1 + w; 1 = no guidance)"),
                  (self.stage_one_steps >= 1, "guided.stage_one_steps", self.stage_one_steps,
                   "an integer >= 1")])
        if cfg.method == "guided" and cfg.teacher.guidance_scale is not None:
            raise ConfigError(f"teacher.guidance_scale={cfg.teacher.guidance_scale}: guided distillation "
                              "samples its own guidance scales (guided.guidance_min / guidance_max); remove "
                              "teacher.guidance_scale.")


class GuidedDistillationTrainer(HalvingRounds, DistillationTrainer):
    method = "guided"

    @property
    def section(self):
        return self.config.guided

    @property
    def embedded(self) -> bool:
        """The teacher takes the guidance scale as an input already (FLUX.1-dev, guidance-distilled by its
        authors): it is stage one's w-conditioned model, so stage one is skipped and the rounds feed the scale
        s = 1 + w to that input, in round teacher and student alike."""
        return backbones.embeds_guidance(self.teacher.weights)

    def build(self) -> None:
        if self.lora and not self.embedded:
            raise ConfigError(f"student.lora_rank={self.config.student.lora_rank} with guided distillation "
                              f"of {self.config.teacher.path!r}: the student learns a new guidance "
                              "embedding, which a LoRA adapter cannot hold; remove student.lora_rank "
                              "(LoRA guided students exist for teachers that take the guidance scale as an "
                              "input: FLUX.1-dev).")
        super().build()

    def make_plan(self) -> list[tuple[int, int]]:
        sec = self.section
        stage_one = [] if self.embedded else [(sec.start_steps, sec.stage_one_steps)]
        return stage_one + round_plan(
            sec.start_steps, sec.target_steps, sec.steps_per_round, sec.final_rounds_multiplier)

    def make_student(self):
        cfg, t, sec = self.config, self.teacher, self.section
        if not (t.num_classes or t.is_text):
            raise ConfigError(f"guided distillation needs a class-conditional teacher with a null class or a "
                              f"text-to-image teacher for classifier-free guidance; {cfg.teacher.path!r} is "
                              "unconditional. Train one with `distill teacher` and "
                              "teacher_train.label_dropout > 0 (configs/guided_digits.yaml does), or use "
                              "teacher.path=analytic:gaussians8 with teacher.conditional=true.")
        if cfg.student.arch == "copy":
            self.pred = t.prediction_type
            return build_network(cfg, t, t.sample_shape, t.num_classes,
                                 None if self.embedded else sec.guidance_embed_dim)
        net = build_network(cfg, t, t.sample_shape, t.num_classes, sec.guidance_embed_dim)
        self.pred = self.student_prediction()
        self.fit_to_teacher(net, sec.init_denoiser_steps, self.pred)  # w = 0: the conditional teacher
        return net

    def lr_multipliers(self) -> dict[str, float]:
        """The new w embedding learns faster than the copied teacher weights
        (``guided.guidance_lr_multiplier``)."""
        m = self.section.guidance_lr_multiplier
        return {"guidance_embedding.": m, "guidance_proj.": m, "time_embedding.cond_proj.": m}

    def guidance_weight(self, batch_size: int) -> torch.Tensor:
        """Meng's w = s - 1 with s ~ U[guidance_min, guidance_max] per example."""
        sec = self.section
        s = sec.guidance_min + (sec.guidance_max - sec.guidance_min) * self.rand(batch_size)
        return s - 1.0

    def objective(self, batch: dict, step: int):
        """Stage one (Meng et al. 2023, eq. 6): the w-conditioned student regresses the CFG teacher; then
        the progressive rounds."""
        r = self.enter_round(step)
        if r > 0 or self.embedded:
            return (yield from super().objective(batch, step))
        # stage one: regress the CFG teacher at every noise level
        sched = self.teacher.schedule
        T = sched.num_train_timesteps
        x0 = batch["x"]
        b, cond = x0.shape[0], batch["cond"]
        w = self.guidance_weight(b)
        t = sched.t_from_timestep(torch.randint(T, (b,), generator=self.rng, dtype=torch.float64,
                                                device=self.rng.device))
        z = sched.add_noise(x0, self.randn(*x0.shape), t)
        with torch.no_grad(), self.accelerator.autocast():
            target = self.teacher.denoiser.x0(z, t, cond, guidance_scale=1.0 + w).float()
        x_pred = self.as_denoiser(self.modules["student"]).x0(z, t, cond, w=w)
        loss = progressive_loss(sched, x_pred, target, t, self.section.loss_weighting).mean()
        norms = yield Update(loss, "student")
        return {"loss": loss.detach(), "grad_norm": norms["student"], "round": r,
                "student_steps": self.plan[r][0]}

    def pipeline_kwargs(self) -> dict:
        sec = self.section
        return {"guidance_conditioned": True, "guidance_scale": sec.default_guidance_scale,
                "guidance_range": [sec.guidance_min, sec.guidance_max]}

    def lora_inference(self) -> tuple:
        """The rounds' scheduler and arguments, at the default guidance scale where the network takes the
        scale as an input (FLUX.1-dev; FluxPipeline's ``guidance_scale``)."""
        scheduler, kwargs = super().lora_inference()
        if self.embedded:
            kwargs["guidance_scale"] = self.section.default_guidance_scale
        return scheduler, kwargs

    def card_info(self) -> dict:
        sec = self.section
        return {**super().card_info(), "guidance_range": [sec.guidance_min, sec.guidance_max],
                "guidance_convention": "guidance_scale = 1 + w (diffusers); the network takes w",
                "stage_one_steps": sec.stage_one_steps}

"""UniInstructTrainer (Wang et al. 2025, "Uni-Instruct: One-step Diffusion Model through Unified
Diffusion Divergence Instruction", NeurIPS 2025).

Minimises the diffusion expansion of an f-divergence D_f(p_0 || q_0) = int w(t) E_q[h(r_t)
|s_p - s_q|^2] dt, h(r) = r^2 f''(r), r = p_t / q_t, with the tractable three-branch gradient
(objectives.score.UniInstructLoss, checked against finite differences in the tests):
``divergence`` in rkl | fkl | jeffreys | js | chi2 (chi2 and JS did worst in the paper's ablation;
the default is fkl, the ImageNet-64 1.02 setting; Jeffreys gave CIFAR-10 1.46).

The ratio r is estimated from a discriminator head on the fake-score network's features (the mid
block of a UNet, the last block of an MLP): trained with BCE on noised data (1) vs noised generator
samples (0) together with the fake score, r = exp(logit) clamped to exp(+-ratio_clip), h(r)
normalised by its batch mean (variance reduction). Uni-Instruct therefore needs real data.
``gan_weight > 0`` adds the non-saturating GAN term to the generator (DMD2 / SiDA style).

Special cases reachable by configuration (documented in the README):
* SIM = ``divergence: rkl, sampling: fixed`` (or the sim trainer); SiD(alpha=0.5) = ``rkl, full``;
* Diff-Instruct = ``divergence: di``; DMD (distribution matching) = ``divergence: dmd``;
* f-distill-style weighting = the DI branch with h(r) (the ``full`` form's third term).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from ..engine import DistillationTrainer, Update, frozen
from ..errors import require
from ..lora import AdapterView
from ..objectives.adversarial import DiscriminatorHead, discriminator_loss, feature_module, generator_gan_loss
from ..objectives.score import (
    DiffInstructLoss,
    ReferenceUniInstructLoss,
    UniInstructLoss,
    fake_score_loss,
    reference_density_ratio,
)
from .score_helpers import OneStepScoreHelpers, ScoreGroup, one_step_checks

if TYPE_CHECKING:
    from ..config import Config


@dataclass
class UniInstructConfig:
    """Uni-Instruct (Wang et al. 2025): the diffusion expansion of an f-divergence, with Diff-Instruct
    (``di``) and DMD (``dmd``) as special cases."""

    generator_timestep: int = 625  # t*: the generator is the denoiser at this index on sigma(t*) z
    lr_fake: float | None = None  # default optim.lr
    t_min: float = 0.02  # time range of the generator / fake-score losses (continuous t)
    t_max: float = 0.98
    # time of the fake-score and generator losses (docs/noise_families.md), clamped to [t_min, t_max]:
    # uniform; logit_normal: t = sigmoid(N(logit_mean, logit_std)) (SD3);
    # lognormal: ln sigma_EDM ~ N(p_mean, p_std) (EDM)
    t_sampling: Literal["uniform", "logit_normal", "lognormal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    p_mean: float = -1.2
    p_std: float = 1.2
    # per-sample weight of the generator loss in the flow sigma s: sigma_sqrt s^-2, cosmap, 1 - s (none: 1)
    time_weighting: Literal["none", "sigma_sqrt", "cosmap", "one_minus_sigma"] = "none"
    # where generator_timestep, t_min / t_max and the drawn t live: the teacher's own continuous time, or the
    # VP table of teacher.beta_schedule, mapped to the teacher's family at equal log-SNR (the same noise
    # levels on a vp, edm or flow teacher; identity on vp)
    times_on: Literal["teacher", "vp"] = "teacher"
    fake_warmup_steps: int = 0  # fake-score-only steps before the generator moves
    init_denoiser_steps: int = 0  # student.arch mlp/unet: fit the network to the teacher first ("copy")
    sample_weight: Literal["none", "sid"] = "none"  # sid: divide by sg(mean|x0 - D_p|) (SiD / DMD)
    gradient_checkpointing: bool = False
    divergence: Literal["rkl", "fkl", "jeffreys", "js", "chi2", "di", "dmd"] = "fkl"
    sampling: Literal["full", "fixed"] = "full"  # (a) exact expanded-divergence gradient / (b) SIM convention
    gan_weight: float = 0.0  # generator GAN term weight (0 = off)
    discriminator_weight: float = 1.0
    ratio_clip: float = 10.0  # clamp of the discriminator logit (log-ratio)
    normalize_ratio: bool = True  # divide h(r) by its batch mean (variance reduction)
    # exact: the expanded divergence's gradient (UniInstructLoss); reference: the public code's estimator, the
    # SiD core weighted by h(sg(r)) with the SiD normaliser (ReferenceUniInstructLoss; fkl, jeffreys, rkl)
    gradient: Literal["exact", "reference"] = "exact"
    reference_alpha: float = 1.2  # the reference's SiD alpha in its core (1 = the SIM core)
    # Jeffreys = w_f KL(p||q) + w_r KL(q||p), h = w_f r + w_r; null: (1, 1) exact (the paper's 1 + r),
    # (0.4, 0.6) reference (its code)
    jeffreys_weights: list[float] | None = None
    # logit: r = exp(clamped discriminator logit); reference: the public code's r = -L / (1 - L) from the
    # generator's GAN loss value (objectives.score.reference_density_ratio)
    ratio_estimator: Literal["logit", "reference"] = "logit"
    ratio_warmup_steps: int = 0  # f != rkl: pure SIM-L2 (rkl, sampling fixed) before this step
    # fake-score updates per generator update; null = the method's published default: 5 for dmd (DMD2's
    # two-time-scale rule, which replaces DMD's regression loss), 1 otherwise
    fake_steps_per_generator_step: int | None = None

    @property
    def needs_ratio(self) -> bool:
        """The f-divergences other than reverse KL weight by h(r): the density ratio from a discriminator."""
        return self.divergence not in ("di", "dmd", "rkl")

    @property
    def uses_discriminator(self) -> bool:
        return self.needs_ratio or self.gan_weight > 0

    @property
    def detaches_teacher_and_fake(self) -> bool:
        """Diff-Instruct / DMD detach the teacher's and fake's outputs; without a GAN term (which needs the
        fake's features) their generator passes need no autograd."""
        return self.divergence in ("di", "dmd") and not self.gan_weight > 0

    def validate(self, cfg: Config) -> None:
        require(one_step_checks("uni_instruct", self) + [
            (self.ratio_clip > 0, "uni_instruct.ratio_clip", self.ratio_clip, "a positive number"),
            (self.gan_weight >= 0, "uni_instruct.gan_weight", self.gan_weight, "a number >= 0"),
            (self.ratio_warmup_steps >= 0, "uni_instruct.ratio_warmup_steps", self.ratio_warmup_steps,
             "an integer >= 0"),
            (self.gradient == "exact" or self.divergence in ("fkl", "jeffreys", "rkl"),
             "uni_instruct.gradient", self.gradient,
             "exact for this divergence (the reference estimator has fkl, jeffreys and rkl)"),
            (self.jeffreys_weights is None or len(self.jeffreys_weights) == 2,
             "uni_instruct.jeffreys_weights", self.jeffreys_weights, "two numbers [w_forward, w_reverse]")])

    @property
    def jeffreys(self) -> tuple[float, float]:
        if self.jeffreys_weights is not None:
            return tuple(float(w) for w in self.jeffreys_weights)
        return (0.4, 0.6) if self.gradient == "reference" else (1.0, 1.0)



class UniInstructTrainer(OneStepScoreHelpers, DistillationTrainer):
    method = "uni_instruct"

    @property
    def section(self):
        return self.config.uni_instruct

    def make_loss(self):
        s = self.section
        if s.divergence in ("di", "dmd"):
            return DiffInstructLoss(normalize=s.divergence == "dmd")
        if s.gradient == "reference":
            return ReferenceUniInstructLoss(s.divergence, s.reference_alpha, "sid", s.jeffreys)
        return UniInstructLoss(s.divergence, s.sampling, s.sample_weight, s.jeffreys)

    def generator_loss(self, step: int):
        """The generator's surrogate at ``step``: before ``ratio_warmup_steps`` an f-divergence run uses
        pure SIM-L2 (reverse KL with the sampling distribution held fixed, form (b); = SiD alpha = 1), the
        core the public Uni-Instruct code trains alone first; afterwards the configured loss."""
        if self.needs_ratio and step < self.section.ratio_warmup_steps:
            return self.warmup_loss
        return self.loss

    @property
    def fake_steps_per_generator_step(self) -> int:
        """DMD2 (Yin et al. 2024b, sec. 4.1): without DMD's regression loss, 5 fake-score updates per
        generator update keep the fake score tracking the generator (1:1 is reported unstable)."""
        n = self.section.fake_steps_per_generator_step
        return n if n is not None else (5 if self.section.divergence == "dmd" else 1)

    @property
    def needs_ratio(self) -> bool:
        return self.section.needs_ratio

    @property
    def uses_discriminator(self) -> bool:
        return self.section.uses_discriminator

    def build(self) -> None:
        self.build_pair()
        s = self.section
        reference = s.gradient == "reference"
        self.warmup_loss = (ReferenceUniInstructLoss("rkl", s.reference_alpha, "sid") if reference
                            else UniInstructLoss("rkl", "fixed", s.sample_weight))
        self._features = {}
        if not self.uses_discriminator:
            return
        g = self.group
        g.disc = "disc"
        fake = self.modules[g.fake]
        module, channels, spatial = feature_module(getattr(fake, "shared_base", fake))
        # a LoRA fake score shares its layers with the student and the teacher: keep the fake's features only
        mine = fake.active if isinstance(fake, AdapterView) else (lambda: True)
        module.register_forward_hook(
            lambda _m, _i, out: self._features.__setitem__("f", out) if mine() else None)
        self.add(g.disc, DiscriminatorHead(channels, spatial),
                 lr=self.section.lr_fake or self.config.optim.lr)

    def _logit(self, head) -> torch.Tensor:
        return head(self._features.pop("f")).float()

    @property
    def needs_clean_samples(self) -> bool:
        """The discriminator is trained on noised real samples (data, or for prompts-only data the
        teacher's)."""
        return self.uses_discriminator

    def fake_step(self, g: ScoreGroup, cond, b: int, batch: dict):
        """The fake score's DSM update and, with a discriminator, the head's BCE in the same backward."""
        if not self.uses_discriminator:
            return (yield from super().fake_step(g, cond, b, batch))
        sched = self.teacher.schedule
        x_t, t, target = self.fake_inputs(g, cond, b)
        fake, head = self.as_denoiser(self.modules[g.fake]), self.modules[g.disc]
        pred = fake.output(x_t, t, cond)
        with self.accelerator.autocast():
            logit_fake = self._logit(head)
        x_real = sched.add_noise(batch["x"], self.randn(*batch["x"].shape), t)
        fake.output(x_real, t, cond)  # the head reads the fake score's features at the real samples
        with self.accelerator.autocast():
            logit_real = self._logit(head)
        dsm = fake_score_loss(pred, target).mean()
        bce = discriminator_loss(logit_real, logit_fake).mean()
        loss = dsm + self.section.discriminator_weight * bce
        norms = yield Update(loss, g.fake, g.disc)
        acc = ((logit_real > 0).float().mean() + (logit_fake < 0).float().mean()) / 2
        return {"fake_loss": dsm.detach(), "disc_loss": bce.detach(), "disc_acc": acc,
                "fake_grad_norm": norms[g.fake]}

    def generator_step(self, g: ScoreGroup, cond, b: int, batch: dict, step: int):
        nets = [self.unwrap(g.fake)] + ([self.unwrap(g.disc)] if self.uses_discriminator else [])
        # frozen through the backward pass (see ScoreImplicitMatchingTrainer.generator_step)
        with frozen(*nets):
            return (yield from self._generator_step(g, cond, b, step))

    def _generator_step(self, g: ScoreGroup, cond, b: int, step: int):
        sec = self.section
        self._features.clear()
        loss_fn = self.generator_loss(step)
        x0, x_t, t, d_real, d_fake, coef = self.generator_terms(
            g, cond, b, through_inputs=not sec.detaches_teacher_and_fake)
        logs = {}
        ratio = None
        gan = None
        if self.uses_discriminator:
            # features of the fake network at x_t (input-differentiable)
            logit = self._logit(self.unwrap(g.disc))
            if sec.ratio_estimator == "reference":
                ratio = reference_density_ratio(logit, x0, d_real, x0[0].numel())
                log_r = ratio.clamp_min(1e-30).log()
            else:
                log_r = logit.detach().clamp(-sec.ratio_clip, sec.ratio_clip)
                ratio = log_r.exp()
            logs["log_ratio_mean"] = log_r.mean()
            if sec.gan_weight > 0:
                gan = generator_gan_loss(logit)
        if self.needs_ratio and loss_fn is not self.warmup_loss:
            r = ratio if ratio is not None else torch.ones(b, device=x0.device)
            per_sample = loss_fn(x0, x_t, d_real, d_fake, coef, r)
            if sec.normalize_ratio:  # h(r) / mean h(r): variance reduction
                per_sample = per_sample / loss_fn.weight(r).mean().detach().clamp_min(1e-8)
        else:
            per_sample = loss_fn(x0, x_t, d_real, d_fake, coef, torch.ones(b, device=x0.device))
        # the divergence's time weight; the GAN term keeps its own weight gan_weight
        per_sample = self.weight_generator_loss(per_sample, t)
        if gan is not None:
            per_sample = per_sample + sec.gan_weight * gan
        loss = self.finite_mean(per_sample)
        norms = yield Update(loss, g.generator)
        logs.update(gen_loss=loss.detach(), grad_norm=norms[g.generator],
                    teacher_gap=(d_real - d_fake).detach().pow(2).mean().sqrt())
        return logs

    def card_info(self) -> dict:
        s = self.section
        return {"method": self.method, "teacher": self.config.teacher.path, "steps_to_sample": 1,
                "generator_timestep (t*)": s.generator_timestep, "divergence (f)": s.divergence,
                "sampling": s.sampling, "gradient": s.gradient, "gan_weight": s.gan_weight}

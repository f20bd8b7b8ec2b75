"""ScoreImplicitMatchingTrainer: one-step SIM distillation (Luo et al. 2024, "One-Step Diffusion
Distillation through Score Implicit Matching", NeurIPS 2024).

Networks: the frozen teacher D_p; a fake score D_psi (a copy of the teacher, or for the
analytic teacher an MLP initialised like the generator); the one-step generator G, the denoiser
evaluated at the fixed index t* (``sim.generator_timestep``) on sigma(t*) z, read in its
prediction type (the SiD-LSG parameterisation, Zhou et al. 2024), exported as :class:`OneStepPipeline`.

Each step: ``fake_steps_per_generator_step`` fake-score updates by denoising score matching on
detached generator samples, then one generator update on the SIM surrogate

    L = <grad g(D_p - D_psi), D_psi - x0>   at x_t = alpha G(z) + sigma eps,   t ~ U[t_min, t_max]

with gradients through the INPUT of the frozen teacher and fake networks (objectives.score.SIMLoss).
``sim.t_sampling`` draws t logit-normal (SD3) or lognormal in sigma (EDM) instead, and ``sim.time_weighting``
weights L per sample (score_helpers; docs/noise_families.md).
Defaults follow the SiD / Diff-Instruct code the SIM authors build on: Adam betas (0, 0.999)
(set optim.betas), 1:1 updates, generator EMA. ``distance: l2`` with ``sid_alpha: A`` is SiD(alpha)
(Zhou et al. 2024); ``sid_alpha: 1`` equals SIM-L2.

The loss is not a convergence signal (it oscillates around zero): watch ``grad_norm``,
``fake_loss`` and the FID / toy metrics instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..engine import DistillationTrainer
from ..errors import ConfigError, require
from ..objectives.score import SIMLoss
from .score_helpers import OneStepScoreHelpers, one_step_checks

if TYPE_CHECKING:
    from ..config import Config


@dataclass
class SIMConfig:
    """Score Implicit Matching (Luo et al. 2024) and the score-distillation family."""

    generator_timestep: int = 625  # t*: the generator is the denoiser at this index on sigma(t*) z
    distance: Literal["pseudo_huber", "l2"] = "pseudo_huber"
    huber_c: float = 1.0  # pseudo-Huber constant, applied to the per-sample RMS of delta (see docs)
    fake_steps_per_generator_step: int = 1
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
    sid_alpha: float | None = None  # SiD(alpha) (Zhou et al. 2024): needs distance=l2; 1.0 = SIM-L2
    sample_weight: Literal["none", "sid"] = "none"  # sid: divide by sg(mean|x0 - D_p|) (SiD / DMD)
    gradient_checkpointing: bool = False

    def validate(self, cfg: Config) -> None:
        require(one_step_checks("sim", self) + [(self.huber_c > 0, "sim.huber_c", self.huber_c,
                                                   "a positive number")])
        if self.sid_alpha is not None and self.distance != "l2":
            raise ConfigError(f"sim.sid_alpha={self.sid_alpha} (SiD, Zhou et al. 2024) is defined with the "
                              f"L2 distance, but sim.distance is {self.distance!r}: add sim.distance=l2, or "
                              "remove sim.sid_alpha for SIM's pseudo-Huber distance.")



class ScoreImplicitMatchingTrainer(OneStepScoreHelpers, DistillationTrainer):
    method = "sim"

    @property
    def section(self):
        return self.config.sim

    def make_loss(self):
        s = self.section
        return SIMLoss(distance=s.distance, huber_c=s.huber_c, sid_alpha=s.sid_alpha,
                       sample_weight=s.sample_weight)

    def build(self) -> None:
        self.build_pair()

    @property
    def fake_steps_per_generator_step(self) -> int:
        return self.section.fake_steps_per_generator_step

    def card_info(self) -> dict:
        s = self.section
        return {"method": self.method, "teacher": self.config.teacher.path, "steps_to_sample": 1,
                "generator_timestep (t*)": s.generator_timestep, "distance": s.distance, "huber_c": s.huber_c,
                "sid_alpha": s.sid_alpha}

"""TeacherTrainer: plain denoising score matching, to make teachers for builtin data.

Loss (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eq. 14, L_simple):
``E_{k, x0, eps} || net(sqrt(abar_k) x0 + sqrt(1 - abar_k) eps, k) - target ||^2`` with ``k``
uniform over the training indices and target eps, x0 or v per ``teacher_train.prediction_type``.
``teacher_train.noise=flow`` trains a rectified-flow model instead (Liu et al. 2022; Esser et al. 2024,
eq. 3 and sec. 3.1): ``E || net((1 - s) x0 + s eps, s T) - (eps - x0) ||^2`` with s = shift(t) and t uniform
or logit-normal (``teacher_train.t_sampling``, Esser et al. 2024, sec. 3.1).
``teacher_train.noise=edm`` trains an EDM model (Karras et al. 2022, eq. 2 and Table 1, "Training"):
ln sigma ~ N(P_mean, P_std) (``teacher_train.p_mean`` / ``p_std``, -1.2 / 1.2), x_t = x0 + sigma eps, the
network F sees c_in x_t at c_noise = ln(sigma) / 4, and the loss lambda(sigma) ||D(x_t) - x0||^2 with
lambda = 1 / c_out^2 is the plain MSE of F against its target (x0 - c_skip x_t) / c_out; sigma_data 0.5,
sigma in [0.002, 80] (diffusers' ``EDMEulerScheduler``, epsilon parameterisation of its c_out).

Options:
* ``label_dropout > 0``: class-conditional training with a null class (label ``num_classes``) in
  place of the true label with that probability, for classifier-free guidance (Ho & Salimans 2022).
* ``curriculum_clusters = N > 0``: the task-difficulty curriculum of Kim et al. 2024
  ("Denoising Task Difficulty-based Curriculum for Training Diffusion Models"): indices split into N uniform
  clusters, training starts on the highest-noise (easiest) cluster and adds the next harder one whenever
  the smoothed loss has not improved for ``curriculum_patience`` steps; after N stages all indices are used.

Export: image teachers as a stock ``DDPMPipeline`` folder (loadable by any diffusers tool); an
MLP teacher for 2-D data as a ``FewStepPipeline`` (DDPMPipeline assumes images).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import diffusers
import torch

from ..conditioning import Condition
from ..denoiser import Denoiser
from ..engine import DistillationTrainer, Update, build_network
from ..errors import ConfigError, require
from ..noise import NoiseSchedule
from ..pipelines import FewStepPipeline

if TYPE_CHECKING:
    from ..config import Config


@dataclass
class TeacherTrainConfig:
    """TeacherTrainer: plain denoising score matching (Ho et al. 2020, eq. 14)."""

    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"  # vp only
    # vp only (a flow teacher predicts the velocity). v: stable at every SNR; epsilon amplifies its error by
    # 1/alpha at t=999
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = "v_prediction"
    # flow: a rectified-flow teacher (velocity; FlowMatchEulerDiscreteScheduler); edm: EDM's preconditioned
    # denoiser (EDMEulerScheduler)
    noise: Literal["vp", "edm", "flow"] = "vp"
    flow_shift: float = 1.0  # flow: the static shift of its sigmas
    t_sampling: Literal["uniform", "logit_normal"] = "uniform"  # flow: t ~ U[0, 1] or sigmoid(N(0, 1))
    p_mean: float = -1.2  # edm: ln sigma ~ N(p_mean, p_std) (Karras et al. 2022, Table 1)
    p_std: float = 1.2
    label_dropout: float = 0.0  # > 0: class-conditional with a null class, for classifier-free guidance
    curriculum_clusters: int = 0  # > 0: task-difficulty curriculum (Kim et al. 2024) with N clusters
    curriculum_patience: int = 200

    def validate(self, cfg: Config) -> None:
        require([(0 <= self.label_dropout < 1, "teacher_train.label_dropout", self.label_dropout,
                   "a number in [0, 1)"),
                 (self.flow_shift > 0, "teacher_train.flow_shift", self.flow_shift, "a positive number")])
        if self.noise != "vp" and (self.label_dropout > 0 or self.curriculum_clusters):
            raise ConfigError(f"teacher_train.noise={self.noise} trains unconditional teachers without a "
                              "curriculum for now: remove teacher_train.label_dropout and "
                              "teacher_train.curriculum_clusters.")
        if self.noise != "flow" and (self.flow_shift != 1.0 or self.t_sampling != "uniform"):
            raise ConfigError("teacher_train.flow_shift / teacher_train.t_sampling apply to "
                              f"teacher_train.noise=flow; a {self.noise} teacher draws its noise levels "
                              "its own way.")
        require([(self.p_std > 0, "teacher_train.p_std", self.p_std, "a positive number")])



class TeacherTrainer(DistillationTrainer):
    method = "teacher"
    uses_teacher = False
    needs_clean_samples = True

    def check_data(self) -> None:
        if not getattr(self.data, "has_images", True) or getattr(self.data, "has_prompts", False):
            raise ConfigError(f"data.spec={self.config.data.spec!r} holds prompts: training or fine-tuning a "
                              "text-to-image teacher is out of scope for distill (use the diffusers "
                              "text_to_image training example). `distill teacher` trains pixel-space "
                              "teachers on image data (e.g. sklearn:digits), optionally class-conditional.")

    def build(self) -> None:
        tc = self.config.teacher_train
        if tc.noise == "flow":
            self.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=tc.num_train_timesteps, shift=tc.flow_shift)
        elif tc.noise == "edm":
            self.scheduler = diffusers.EDMEulerScheduler(num_train_timesteps=tc.num_train_timesteps,
                                                         sigma_data=0.5, prediction_type="epsilon")
        else:
            self.scheduler = diffusers.DDPMScheduler(num_train_timesteps=tc.num_train_timesteps,
                                                     beta_schedule=tc.beta_schedule,
                                                     prediction_type=tc.prediction_type)
        self.schedule = NoiseSchedule.from_scheduler(self.scheduler)
        self.pred = self.schedule.prediction_type
        self.num_classes = self.data.num_classes if tc.label_dropout > 0 else 0
        if tc.label_dropout > 0 and not self.data.num_classes:
            raise ConfigError(f"teacher_train.label_dropout={tc.label_dropout} needs labelled data; "
                              f"{self.config.data.spec!r} has no labels.")
        net = build_network(self.config, None, self.data.sample_shape, self.num_classes)
        self.add("student", net, lr=self.config.optim.lr, ema=True)
        self.stage = 1 if tc.curriculum_clusters else 0
        self.best, self.since, self.smooth = float("inf"), 0, None

    # ------------------------------------------------------------------ curriculum
    def _index_range(self) -> tuple[int, int]:
        tc = self.config.teacher_train
        T, n = tc.num_train_timesteps, tc.curriculum_clusters
        if not n or self.stage > n:
            return 0, T
        return (n - self.stage) * T // n, T

    def _update_curriculum(self, loss: float) -> None:
        tc = self.config.teacher_train
        if not tc.curriculum_clusters or self.stage > tc.curriculum_clusters:
            return
        self.smooth = loss if self.smooth is None else 0.98 * self.smooth + 0.02 * loss
        if self.smooth < self.best - 1e-6:
            self.best, self.since = self.smooth, 0
        else:
            self.since += 1
        if self.since >= tc.curriculum_patience:
            self.stage += 1
            self.best, self.since, self.smooth = float("inf"), 0, None

    def state(self) -> dict:
        return {"stage": self.stage, "best": self.best if self.best != float("inf") else None,
                "since": self.since, "smooth": self.smooth}

    def load_state(self, state: dict) -> None:
        self.stage = state.get("stage", self.stage)
        self.best = state["best"] if state.get("best") is not None else float("inf")
        self.since, self.smooth = state.get("since", 0), state.get("smooth")

    # ------------------------------------------------------------------ step
    def objective(self, batch: dict, step: int):
        """Denoising score matching (Ho et al. 2020, eq. 14) in the configured prediction type."""
        tc = self.config.teacher_train
        x0 = batch["x"]
        b = x0.shape[0]
        if tc.noise == "flow":
            u = self.rand(b, dtype=torch.float64)
            t = torch.sigmoid(torch.special.ndtri(u)) if tc.t_sampling == "logit_normal" else u
            k = None  # the network's time is s T
        elif tc.noise == "edm":  # ln sigma ~ N(P_mean, P_std); log-SNR = -2 ln sigma
            z = torch.randn(b, generator=self.rng, device=self.rng.device, dtype=torch.float64)
            t = self.schedule.t_from_logsnr(-2 * (tc.p_mean + tc.p_std * z)).clamp(0, 1).to(self.device)
            k = None  # the network's time is c_noise
        else:
            lo, hi = self._index_range()
            k = torch.randint(lo, hi, (b,), generator=self.rng, device=self.rng.device).to(self.device)
            t = self.schedule.t_from_timestep(k)
        eps = self.randn(*x0.shape)
        x_t = self.schedule.add_noise(x0, eps, t)
        target = self.schedule.from_x0_eps(x0, eps, t, self.pred)
        cond = None
        if self.num_classes:  # condition dropout to the null class, for classifier-free guidance
            if getattr(self, "_null", None) is None:
                self._null = Condition(class_labels=torch.tensor([self.num_classes], device=self.device))
            cond = Condition(class_labels=batch["label"],
                             null=self._null).drop(self.rand(b) < tc.label_dropout)
        net = Denoiser(self.modules["student"], self.schedule, self.pred, autocast=self.accelerator.autocast)
        pred = net.output(x_t, t, cond, timestep=k)
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        norms = yield Update(loss, "student")
        if tc.curriculum_clusters:  # the curriculum decides on the host: one synchronisation per step
            self._update_curriculum(loss.item())
        return {"loss": loss.detach(), "grad_norm": norms["student"], "curriculum_stage": self.stage or None}

    def export(self, for_samples: bool = False):
        net = self.unwrap("student")
        if isinstance(net, diffusers.UNet2DModel) and not self.num_classes:
            return diffusers.DDPMPipeline(unet=net, scheduler=self.scheduler)
        return FewStepPipeline(net, self.scheduler, num_inference_steps=50, num_classes=self.num_classes)

    def sample_kwargs(self) -> dict:
        return {"num_inference_steps": 50}

    def card_info(self) -> dict:
        tc = self.config.teacher_train
        noise = {"vp": {"beta_schedule": tc.beta_schedule},
                 "edm": {"noise": "edm (Karras et al. 2022)", "p_mean": tc.p_mean, "p_std": tc.p_std},
                 "flow": {"noise": "flow (rectified flow)", "flow_shift": tc.flow_shift,
                          "t_sampling": tc.t_sampling}}[tc.noise]
        return {"method": "teacher (denoising score matching)", "data": self.config.data.spec,
                "prediction_type": self.pred, **noise, "num_classes": self.num_classes}

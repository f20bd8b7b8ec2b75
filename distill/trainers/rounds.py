"""Halving rounds (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models",
Algorithm 2), shared by progressive and guided distillation: rounds N -> N/2 -> ... -> ``target_steps``; in
each the student starts as the current teacher, its optimizer is reset and the learning rate decays linearly
to 0; the target is the closed-form x-tilde of two teacher DDIM steps on the student's own grid
(:mod:`distill.objectives.progressive`). Each round's student is exported to ``output_dir/rounds/steps-N``;
the exported weights of a round are exactly the next round's teacher (no EMA, as in the paper).

A trainer mixing in :class:`HalvingRounds` supplies ``section`` (its config section), ``make_plan`` (the
[(student steps, updates)] of its rounds) and ``make_student`` (round 0's student, setting ``self.pred``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import diffusers
import torch

from .. import backbones
from ..engine import Update
from ..errors import ConfigError, require
from ..export import export_pipeline
from ..objectives.progressive import progressive_loss, progressive_target
from ..pipelines import FewStepPipeline, TextToImagePipeline
from ..sampling import trailing_timesteps
from .score_helpers import check_student_prediction

if TYPE_CHECKING:
    from ..config import Config


@dataclass
class RoundsConfig:
    """The halving rounds of progressive distillation (Salimans & Ho 2022), shared by the progressive and
    guided sections."""

    start_steps: int = 64
    target_steps: int = 1
    steps_per_round: int = 500
    # the 2- and 1-step rounds train this much longer (the paper: 100k instead of 50k updates)
    final_rounds_multiplier: float = 2.0
    loss_weighting: Literal["truncated_snr", "snr+1"] = "truncated_snr"
    init_denoiser_steps: int = 1000  # student.arch mlp/unet: fit the network to the teacher first
    gradient_checkpointing: bool = False  # recompute the student's activations in backward (large teachers)
    # an EMA of the student within each round (decay train.ema_decay), started from the round's first weights;
    # its weights end the round: the round's export and the next round's teacher (false: the paper's no EMA)
    round_ema: bool = False

    def validate_rounds(self, cfg: Config, key: str, strict: bool) -> None:
        """``strict``: target_steps < start_steps (guided's stage one may already be at target_steps)."""
        require([(pow2(self.start_steps) and pow2(self.target_steps)
                  and (self.target_steps < self.start_steps if strict
                       else self.target_steps <= self.start_steps),
                  f"{key}.start_steps/target_steps", (self.start_steps, self.target_steps),
                  f"powers of two with target {'<' if strict else '<='} start")])
        if cfg.method == key and cfg.optim.lr_milestones:
            raise ConfigError(f"optim.lr_milestones={cfg.optim.lr_milestones} with method {key}: {key} "
                              "decays the learning rate linearly within each halving round; remove "
                              "optim.lr_milestones.")


def pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def round_plan(start_steps: int, target_steps: int, steps_per_round: int,
               multiplier: float) -> list[tuple[int, int]]:
    """[(student steps, training updates)] for every halving round."""
    plan, n = [], start_steps
    while n > target_steps:
        n //= 2
        plan.append((n, int(round(steps_per_round * (multiplier if n <= 2 else 1.0)))))
    return plan


class HalvingRounds:
    """The rounds, their grids and targets, the per-round optimizer reset and learning-rate decay, the
    exports."""

    needs_clean_samples = True

    def student_prediction(self) -> str:
        """A fresh (non-copy) student's output: ``student.prediction_type``, else v (Salimans & Ho 2022,
        sec. 4) on VP and EDM teachers and the teacher's velocity on flow teachers (near pure noise, where
        alpha = 0, only the velocity or x0 determine the sample)."""
        pred = self.config.student.prediction_type or (
            "flow" if self.teacher.schedule.kind == "flow" else "v_prediction")
        check_student_prediction(self.teacher, pred)
        return pred

    def build(self) -> None:
        cfg, sec = self.config, self.section
        t = self.teacher
        T = t.schedule.num_train_timesteps
        if sec.start_steps > T:
            raise ConfigError(f"{self.method}.start_steps: {sec.start_steps} exceeds the {T}-entry schedule "
                              f"table; use a power of two <= {T}.")
        self.plan = self.make_plan()
        self.bounds = [0]
        for _, n in self.plan:
            self.bounds.append(self.bounds[-1] + n)
        if cfg.train.max_steps != self.bounds[-1]:
            self.accelerator.print(f"{self.method}: {len(self.plan)} rounds {[n for n, _ in self.plan]} "
                                   f"steps, {self.bounds[-1]} updates (train.max_steps is not used)")
        self.max_steps = self.bounds[-1]  # the rounds define the length of the run
        # student and round teacher: LoRA adapters on the teacher's own (shared, frozen) network
        if self.lora:
            net, round_teacher = self.lora_views(["student", "round_teacher"], sec.gradient_checkpointing)
            round_teacher.requires_grad_(False)
            self.pred = t.prediction_type
        else:
            net = self.make_student()
            if sec.gradient_checkpointing and hasattr(net, "enable_gradient_checkpointing"):
                net.enable_gradient_checkpointing()
            round_teacher = copy.deepcopy(net).requires_grad_(False).eval()
        # no EMA by default (Salimans & Ho use none for distillation): the linear decay of the learning rate
        # to 0 ends every round on settled weights; with round_ema the EMA's weights end it. Either way the
        # exported student IS the next round's teacher
        self.add("student", net, lr=cfg.optim.lr, lr_multipliers=self.lr_multipliers(), ema=sec.round_ema)
        self.add("round_teacher", round_teacher)
        self.round, self._round_started = 0, -1
        self.num_classes = t.num_classes

    def lr_multipliers(self) -> dict[str, float] | None:
        return None

    def round_of(self, step: int) -> int:
        for i in range(len(self.plan)):
            if step < self.bounds[i + 1]:
                return i
        return len(self.plan) - 1

    def grids(self, r: int) -> tuple[list[int], list[int]]:
        n_student = self.plan[r][0]
        T = self.teacher.schedule.num_train_timesteps
        teacher_grid = trailing_timesteps(2 * n_student, T) if 2 * n_student <= T else None
        return teacher_grid, trailing_timesteps(n_student, T)

    def _settle_round(self) -> None:
        """The end of a round with ``round_ema``: the student takes the EMA's weights (which then restarts
        from them)."""
        if "student" in self.emas:
            self.emas["student"].copy_to(list(self.unwrap("student").parameters()))

    def _start_round(self, r: int) -> None:
        """New round: the finished student (as exported) becomes the frozen teacher; optimizer reset."""
        student = self.unwrap("student")
        if r > 0:
            self._settle_round()
            if self.accelerator.is_main_process:
                self.export_round(r - 1)
            self.unwrap("round_teacher").load_state_dict(student.state_dict())
        opt = self.optimizers["student"]
        inner = getattr(opt, "optimizer", opt)
        inner.state.clear()
        self.round = r

    def _set_lr(self, step: int) -> None:
        r = self.round_of(step)
        lo, hi = self.bounds[r], self.bounds[r + 1]
        scale = 1.0 - (step - lo) / max(hi - lo, 1)  # linear decay to 0 within the round
        for g in self.optimizers["student"].param_groups:
            g["lr"] = self._base_lr["student"] * scale * g.get("lr_mult", 1.0)

    def state(self) -> dict:
        return {"round": self.round}

    def load_state(self, state: dict) -> None:
        self.round = int(state.get("round", 0))

    def teacher_x0(self, r: int, z, t, cond, w=None):
        """Round r's teacher: the original teacher (guided when teacher.guidance_scale is set), then the
        previous round's student."""
        if r == 0:
            with self.accelerator.autocast():
                return self.teacher.denoiser.x0(z, t, cond, w=w).float()
        return self.as_denoiser(self.unwrap("round_teacher")).x0(z, t, cond, w=w)

    def guidance_weight(self, batch_size: int):
        """Per-example guidance weight w fed to student and round teacher (None: not guided)."""
        return None

    def enter_round(self, step: int) -> int:
        r = self.round_of(step)
        if r != self._round_started:
            if step == self.bounds[r]:
                self._start_round(r)
            else:  # resumed mid-round: networks, optimizer and EMA came from the checkpoint
                self.round = r
            self._round_started = r
        return r

    def objective(self, batch: dict, step: int):
        """One round step: the student's single step regresses two teacher steps (Salimans & Ho 2022,
        Algorithm 2)."""
        r = self.enter_round(step)
        sched = self.teacher.schedule
        teacher_grid, student_grid = self.grids(r)
        x0 = batch["x"]
        b, cond = x0.shape[0], batch["cond"]
        w = self.guidance_weight(b)
        j = torch.randint(len(student_grid), (b,), generator=self.rng, device=self.rng.device).to(self.device)
        grid = self._grid_tensor(r, teacher_grid)  # the teacher grid and -1 (the interval ends at the data)
        k0, k1, k2 = (grid[2 * j + d] for d in (0, 1, 2))
        t, t1 = sched.t_from_timestep(k0), sched.t_from_timestep(k1)
        t2 = torch.where(k2 >= 0, sched.t_from_timestep(k2), float("nan"))
        z = sched.add_noise(x0, self.randn(*x0.shape), t)
        target = progressive_target(sched, lambda zz, tt: self.teacher_x0(r, zz, tt, cond, w), z, t, t1, t2)
        x_pred = self.as_denoiser(self.modules["student"]).x0(z, t, cond, w=w)
        loss = progressive_loss(sched, x_pred, target, t, self.section.loss_weighting).mean()
        norms = yield Update(loss, "student")
        return {"loss": loss.detach(), "grad_norm": norms["student"], "round": r,
                "student_steps": self.plan[r][0]}

    def _grid_tensor(self, r: int, teacher_grid: list[int]) -> torch.Tensor:
        """Round ``r``'s teacher grid followed by -1, as a float64 tensor on the device (made once per
        round)."""
        if getattr(self, "_grid_round", None) != r:
            self._grid_round = r
            self._grid = torch.tensor(teacher_grid + [-1], dtype=torch.float64, device=self.device)
        return self._grid

    def export_scheduler(self):
        """VP: DDIM on the trailing grid; EDM and flow: the teacher's own scheduler class (EDM in the
        student's parameterisation), its grid the student's noise levels (:meth:`student_sigmas`)."""
        sched, kind = self.teacher.scheduler, self.teacher.schedule.kind
        if kind == "vp":
            return diffusers.DDIMScheduler.from_config(sched.config, prediction_type=self.pred,
                                                       timestep_spacing="trailing", clip_sample=False,
                                                       set_alpha_to_one=True)
        edm_pred = kind == "edm" and self.pred != "sample"
        return type(sched).from_config(sched.config, **({"prediction_type": self.pred} if edm_pred else {}))

    def student_grid(self, r: int) -> dict:
        """Round r's grid as the exported pipeline stores it: training indices on a VP table; on EDM and flow
        the noise levels sigma(t) of those times (a flow's shift included) and the student's output type."""
        sched, grid = self.teacher.schedule, self.grids(r)[1]
        if sched.kind == "vp":
            return {"timesteps": grid}
        return {"sigmas": sched.sigma(sched.t_from_timestep(torch.tensor(grid))).tolist(),
                "prediction_type": self.pred}

    def export(self, r: int | None = None, for_samples: bool = False):
        r = self.round_of(self.step - 1) if r is None else r
        n = self.plan[r][0]
        frozen = self.teacher.frozen_components(reload=not for_samples)  # latent teachers: VAE, text parts
        if self.teacher.is_text:
            net = self.export_network("student")
            return TextToImagePipeline(**{"unet": None, self.teacher.network_name: net},
                                       scheduler=self.export_scheduler(),
                                       num_inference_steps=n, **self.student_grid(r),
                                       force_zeros_for_empty_prompt=self.teacher.force_zeros_for_empty_prompt,
                                       **frozen, **self.teacher.export_size, **self.pipeline_kwargs())
        return FewStepPipeline(self.export_network("student"), self.export_scheduler(), num_inference_steps=n,
                               sample_shape=self.teacher.sample_shape, num_classes=self.num_classes,
                               **self.student_grid(r), **frozen, **self.pipeline_kwargs())

    def pipeline_kwargs(self) -> dict:
        return {}

    def lora_inference(self) -> tuple:
        """DDIM on the trailing grid of the last round's step count (= the student's own grid), no
        guidance. SD3 / FLUX.1 teachers: their own flow scheduler on the student's grid, passed as the
        unshifted ``sigmas`` their pipelines shift (Euler = DDIM on it)."""
        n = self.plan[-1][0]
        if self.teacher.schedule.kind == "flow":
            sched = self.teacher.schedule
            times = sched.t_from_timestep(torch.tensor(self.grids(len(self.plan) - 1)[1]))
            cfg = backbones.stock_pipeline(self.teacher.weights) == "StableDiffusion3Pipeline"
            return copy.deepcopy(self.teacher.scheduler), {
                "num_inference_steps": n, "sigmas": [float(t) for t in times],
                **({"guidance_scale": 1.0} if cfg else {})}
        return self.export_scheduler(), {"num_inference_steps": n, "guidance_scale": 1.0}

    def export_round(self, r: int):
        return export_pipeline(self.export(r), self.out / "rounds" / f"steps-{self.plan[r][0]}",
                               {**self.card_info(), "steps": self.plan[r][0],
                                "steps_to_sample": self.plan[r][0]})

    def finish(self, seconds: float):
        self._settle_round()
        if self.accelerator.is_main_process:
            self.export_round(len(self.plan) - 1)
        return super().finish(seconds)

    def card_info(self) -> dict:
        s = self.section
        return {"method": self.method, "teacher": self.config.teacher.path, "start_steps": s.start_steps,
                "target_steps": s.target_steps, "steps_to_sample": self.plan[-1][0],
                "loss_weighting": s.loss_weighting, "prediction_type": self.pred}

"""Hybrid base/distilled sampling (Gandikota & Bau 2025, "Distilling Diversity and Control in Diffusion
Models", sec. 4: the base model takes the first, composition-setting step(s); the distilled model the rest).

STANDALONE FILE: imports torch, diffusers and the sibling ``one_step.py`` / ``samplers.py`` /
``text_to_image.py`` / ``hybrid_steps.py`` only.

The hybrid runs ONE chain (``hybrid_steps.sample_hybrid``) over the student's grid: the first
``num_base_steps`` rows are evaluated by the base model, the remaining rows by the student. Its steps
(``student_sampler``):

* ``"ddim"``: deterministic DDIM between all rows (the noise implied by each clean prediction is kept);
* ``"stochastic"``: the paper's setting. Its DMD2 students sample with diffusers' ``LCMScheduler`` and its
  notebook runs the base through the same scheduler (``base_scheduler = distilled_scheduler``, base
  guidance 0), so every step onto a grid row, the hand-over included, re-noises the clean prediction with
  FRESH noise, x' = sqrt(abar') x0 + sqrt(1 - abar') eps_new (``LCMScheduler.step``; drawn from
  ``generator`` after z). Base sub-steps (``num_base_substeps``) stay DDIM.

A row carries
its variance-preserving noise level alpha_bar = alpha^2 / (alpha^2 + sigma^2) (read from the student's
table, or from its EDM / flow noise level); the base is evaluated at the same alpha_bar, i.e. at equal
log-SNR, in its own family, never at a reused index. The hand-over is therefore the re-projection of the
base's last clean prediction onto the student's first noise level, x = sqrt(abar_s) x0_base +
sqrt(1 - abar_s) eps, at a matched noise level (eps: the base's (ddim) or fresh noise (stochastic)).

Noise families (``one_step.noise_family``): base and student may each be variance-preserving (an
``alphas_cumprod`` table), EDM (``EDMEulerScheduler``: its preconditioning) or flow matching
(``FlowMatchEulerDiscreteScheduler``: the velocity), in any mix. The chain state is kept in the VP
coordinates x_vp, x_t = sqrt(alpha^2 + sigma^2) x_vp in each family (as ``FewStepPipeline`` samples EDM and
flow students; there DDIM is EDM's and the flow's Euler step), so in the student's own family the hand-over
is x_t = alpha_s x0_base + sigma_s eps_base. Each model is evaluated at the row's alpha_bar:

* a VP model at the timestep of ITS table with that alpha_bar (``samplers.timestep_for``: exact when the
  tables agree, log-SNR interpolated when they differ), its output read with the row's coefficients;
* an EDM or flow model at the sigma of that alpha_bar in its family (``one_step.family_alpha_sigma``), its
  time input ``family_timestep``, its clean prediction ``family_x0``.

A row noisier than a base can be evaluated at is evaluated at the base's noisiest level (the chain then
continues from that clean estimate at the row's own level): a flow grid's pure-noise row (s = 1,
alpha_bar = 0) on a VP base at the last index of its table, with that entry's coefficients (as diffusers
takes z for x_{T-1}); rows beyond an EDM base's ``sigma_max`` at sigma_max (EDM's own start).

Pixel or latent samples of one shape. Text-to-image models (Stable-Diffusion format) share the student's
``vae`` / ``text_encoder(_2)`` / ``tokenizer(_2)``: ``pipe(prompt=...)``, the base optionally with
classifier-free guidance against the negative (default: empty) prompt, samples decoded by the VAE. A
FLUX.1-dev network takes its guidance scale as an input instead (one pass): the base ``base_guidance_scale``
(default 3.5, FluxPipeline's), the student the scale it was trained at (a guided student: ``guidance_scale``).

Grids: a few-step student's own grid (VP: its stored timesteps or the trailing grid of
``num_inference_steps``; EDM / flow: its stored ``sigmas`` or its scheduler's own ``set_timesteps`` grid);
for a one-step generator (evaluated at index t*; on EDM / flow at its stored ``generator_sigma`` and
``generator_time``), ``num_base_steps`` base rows spaced evenly in the student's time input from the top of
its range down to t* (VP: the table index from T - 1; EDM: c_noise = ln(sigma) / 4, i.e. evenly in log-SNR,
from ``sigma_max``; flow: evenly in s from 1), then t* (the generator then sees the base's re-projected
sample at t* instead of sigma(t*) z). A one-step generator with base steps is OUTSIDE the paper's setting
(a few-step DMD2 student) and warns: trained on sigma(t*) z alone, it now sees signal plus noise. A VP
student's chain starts from z at the top of its table (diffusers' convention) and from sigma(t) z below it
(the one-step generator's input); an EDM / flow student's from x_t = sigma_0 z (EDM: sigma_max z; flow: z at
s = 1), as ``FewStepPipeline``.

``num_base_substeps=m`` lets the base cover each of its intervals with m DDIM steps of its own, spaced
evenly in the base's own time input between the two rows' noise levels: a VP base's table timesteps (as
before), an EDM base's c_noise (evenly in log sigma, i.e. in log-SNR; down to ``sigma_min`` after the last
row), a flow base's sigma s (down to 0 after the last row). A better first clean estimate for m - 1 more
base evaluations per base row (the paper's setting is m = 1).

``num_base_steps=0`` is the student alone; every row on the base (m = 1) is the base's own DDIM sampler on
that grid. ``return_trajectory=True`` also returns each step's clean prediction (the "Diffusion Target" of the
paper's sec. 4.3), one image batch per step.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .hybrid_steps import STUDENT_SAMPLERS, base_alpha_bar, sample_hybrid, with_base_substeps
from .one_step import (
    ExportedPipelineMixin,
    classifier_free_guidance,
    default_labels,
    device_dtype,
    family_alpha_sigma,
    family_rows,
    family_timestep,
    family_x0,
    forward,
    noise_family,
    scheduler_sigmas,
    to_output,
    x0_from_output,
)
from .samplers import timestep_for, trailing_timesteps, vp_grid
from .text_to_image import (
    encode_for,
    guidance_embedding,
    is_flux,
    latents_to_images,
    sdxl_time_ids,
    unet_text_kwargs,
)


def _network(pipe):
    """A pipeline's denoiser: a one-step ``generator``, a ``unet`` or a ``transformer`` (DiT, PixArt, SD3)."""
    for name in ("generator", "unet", "transformer"):
        net = getattr(pipe, name, None)
        if net is not None:
            return net
    return None


def _latent_shape(pipe) -> list[int]:
    """(C, H, W) of a text-to-image pipeline's latents: stored size (SD3 / FLUX) or the network's."""
    net = _network(pipe)
    size = pipe.config.get("sample_size") or net.config.sample_size
    return [net.config.in_channels // 4 if is_flux(net) else net.config.in_channels, size, size]


@dataclass
class HybridPipelineOutput(BaseOutput):
    images: object
    trajectory: list | None = None  # per step, the clean prediction in output_type (return_trajectory=True)


class HybridPipeline(ExportedPipelineMixin, DiffusionPipeline):
    """Base model for the first steps, distilled student for the rest.

    Args:
        base_unet, base_scheduler: the base (teacher) denoiser and its scheduler: VP (``alphas_cumprod``),
            EDM or flow matching.
        student_unet, student_scheduler: the distilled student and its scheduler (VP, EDM or flow; its
            ``prediction_type`` is the student's unless ``student_prediction_type`` says otherwise).
        student_generator_timestep: a one-step generator's index t* (None: a few-step denoiser).
        student_num_inference_steps, student_timesteps: a few-step student's step count and grid (VP).
        student_sigmas: an EDM or flow few-step student's own grid of noise levels (x_t's sigma, noisiest
            first); None: its scheduler's own ``set_timesteps`` grid.
        student_generator_sigma, student_generator_time: an EDM or flow one-step generator's sigma(t*) and
            network time input at t* (as its training wrote them).
        student_prediction_type, base_prediction_type: a model's output when it is not its scheduler's own
            (e.g. "sample"); None: the scheduler's (flow: the velocity).
        num_base_steps: default number of base steps.
        student_sampler: default steps of the chain: "ddim" (deterministic) or "stochastic" (LCMScheduler's
            re-noising with fresh noise onto every grid row, the paper's setting).
        sample_shape: shape of one sample.
        num_classes: classes of class-conditional models (both; label ``num_classes`` is the null).
        student_guidance_conditioned, student_guidance_scale: a guided-distillation student and its
            default guidance scale (it takes w = s - 1 as ``guidance_weight``, or as the embedded
            ``timestep_cond`` of a UNet2DConditionModel).
        vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2: text-to-image models' shared parts (a
            class-conditional latent model, DiT's: the VAE alone).
        text_encoder_3, tokenizer_3: SD3's T5 encoder (optional).
        force_zeros_for_empty_prompt: the null prompt is zeros (SDXL) instead of the encoded "".
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->base_unet->student_unet->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                            "text_encoder_3", "tokenizer_3"]

    def __init__(self, base_unet, base_scheduler, student_unet, student_scheduler,
                 student_generator_timestep: int | None = None, student_num_inference_steps: int = 4,
                 student_timesteps: list | None = None, num_base_steps: int = 1, num_base_substeps: int = 1,
                 sample_shape: list | None = None, num_classes: int = 0,
                 student_guidance_conditioned: bool = False, student_guidance_scale: float = 1.0, vae=None,
                 text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                 force_zeros_for_empty_prompt: bool = False, student_sigmas: list | None = None,
                 student_generator_sigma: float | None = None, student_generator_time: float | None = None,
                 student_prediction_type: str | None = None, base_prediction_type: str | None = None,
                 text_encoder_3=None, tokenizer_3=None, student_sampler: str = "ddim"):
        super().__init__()
        _check_sampler(student_sampler)
        self.register_modules(base_unet=base_unet, base_scheduler=base_scheduler, student_unet=student_unet,
                              student_scheduler=student_scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                              text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
        if sample_shape is None:
            cfg = student_unet.config
            sample_shape = ([cfg.in_channels, cfg.sample_size, cfg.sample_size] if hasattr(cfg, "in_channels")
                            else [cfg.data_dim])
        self.register_to_config(
            student_generator_timestep=(None if student_generator_timestep is None
                                        else int(student_generator_timestep)),
            student_num_inference_steps=int(student_num_inference_steps),
            student_timesteps=list(student_timesteps) if student_timesteps is not None else None,
            num_base_steps=int(num_base_steps), num_base_substeps=int(num_base_substeps),
            sample_shape=list(sample_shape), num_classes=int(num_classes),
            student_guidance_conditioned=bool(student_guidance_conditioned),
            student_guidance_scale=float(student_guidance_scale),
            force_zeros_for_empty_prompt=bool(force_zeros_for_empty_prompt),
            student_sigmas=[float(v) for v in student_sigmas] if student_sigmas is not None else None,
            student_generator_sigma=(None if student_generator_sigma is None
                                     else float(student_generator_sigma)),
            student_generator_time=None if student_generator_time is None else float(student_generator_time),
            student_prediction_type=student_prediction_type, base_prediction_type=base_prediction_type,
            student_sampler=student_sampler)

    @classmethod
    def from_pipelines(cls, base, student, num_base_steps: int = 1, num_base_substeps: int = 1,
                       student_sampler: str = "ddim") -> HybridPipeline:
        """Build from a loaded base pipeline (a FewStepPipeline or a DDPMPipeline: ``unet`` + ``scheduler``;
        for text-to-image a StableDiffusion(XL)Pipeline or TextToImagePipeline) and a loaded distill student
        (OneStepPipeline, FewStepPipeline or TextToImagePipeline, whose text parts the hybrid shares). Each
        may be of any noise family (VP, EDM, flow matching)."""
        families = {}
        for name, p in (("base", base), ("student", student)):
            sched = getattr(p, "scheduler", None)
            try:
                families[name] = noise_family(sched)
            except ValueError:
                raise ValueError(f"The {name} pipeline needs a variance-preserving (alphas_cumprod: DDPM / "
                                 "DDIM), EDM or flow-matching scheduler; "
                                 f"{type(p).__name__} has {type(sched).__name__}.") from None
            if _network(p) is None:
                raise ValueError(f"The {name} pipeline needs a denoiser (unet or transformer); "
                                 f"{type(p).__name__} has none.")
        s_cfg = student.config
        text = getattr(student, "text_encoder", None) is not None
        one_step = hasattr(student, "generator") or getattr(s_cfg, "generator_timestep", None) is not None
        s_net = _network(student)
        text_parts = {"vae": student.vae} if getattr(student, "vae", None) is not None else {}
        if text:
            if getattr(base, "text_encoder", None) is None:
                raise ValueError("A text-to-image student needs a text-to-image base (a "
                                 f"Stable-Diffusion-format pipeline); got {type(base).__name__}.")
            text_parts = {k: getattr(student, k, None) for k in (
                "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                "tokenizer_3")}
            text_parts["force_zeros_for_empty_prompt"] = bool(
                getattr(s_cfg, "force_zeros_for_empty_prompt", False))
        sigmas = gen_sigma = gen_time = None
        if families["student"] != "vp":
            sched = student.scheduler
            if one_step:
                gen_sigma, gen_time = s_cfg.get("generator_sigma"), s_cfg.get("generator_time")
                if gen_sigma is None or gen_time is None:
                    raise ValueError(f"The student is a one-step generator on a {type(sched).__name__} "
                                     "without generator_sigma / generator_time in its config (training "
                                     "writes t*'s noise level and network time there); the hybrid cannot "
                                     "place it.")
            else:
                sigmas = s_cfg.get("sigmas")
                if sigmas is None and sched.config.get("use_dynamic_shifting"):
                    raise ValueError(f"The student's {type(sched).__name__} shifts dynamically "
                                     "(use_dynamic_shifting=true) and the student stores no sigmas: its grid "
                                     "depends on the image size; give the student its grid (sigmas=).")
        b_classes = int(getattr(base.config, "num_classes", 0) or 0)
        b_cfg = _network(base).config
        s_classes = int(getattr(s_cfg, "num_classes", 0) or 0)
        n_embeds = getattr(b_cfg, "num_class_embeds", None)
        if not b_classes and n_embeds:  # a stock folder: the UNet's table may or may not hold a null row
            if s_classes != n_embeds - 1:
                raise ValueError(f"The base's UNet has num_class_embeds={n_embeds} and its pipeline does not "
                                 f"say how many are classes; the student has {s_classes}. A hybrid needs the "
                                 "base's null class as its last row: give the base pipeline "
                                 f"num_classes={n_embeds - 1} (distill's FewStepPipeline) or use a student "
                                 "of that many classes.")
            b_classes = s_classes
        if not b_classes and getattr(b_cfg, "norm_type", None) == "ada_norm_zero":  # DiT: null = num_embeds
            b_classes = int(b_cfg.num_embeds_ada_norm)
        if b_classes != s_classes:
            raise ValueError(f"The base has {b_classes} classes and the student {s_classes}: a hybrid needs "
                             "both conditioned on the same classes (or both unconditional).")
        return cls(_network(base), base.scheduler, s_net, student.scheduler,
                   student_generator_timestep=s_cfg.generator_timestep if one_step else None,
                   student_num_inference_steps=getattr(s_cfg, "num_inference_steps", 1),
                   student_timesteps=getattr(s_cfg, "timesteps", None), num_base_steps=num_base_steps,
                   num_base_substeps=num_base_substeps, student_sampler=student_sampler,
                   sample_shape=list(s_cfg.sample_shape) if not text else _latent_shape(student),
                   num_classes=s_classes,
                   student_guidance_conditioned=bool(getattr(s_cfg, "guidance_conditioned", False)),
                   student_guidance_scale=float(getattr(s_cfg, "guidance_scale", 1.0)),
                   student_sigmas=sigmas, student_generator_sigma=gen_sigma, student_generator_time=gen_time,
                   student_prediction_type=s_cfg.get("prediction_type"),
                   base_prediction_type=base.config.get("prediction_type"), **text_parts)

    def grid(self, num_base_steps: int, num_inference_steps: int | None = None) -> tuple[list, int]:
        """(the student's grid: its table's timesteps of every row on a VP table, its noise levels sigma
        (x_t's) on EDM / flow; how many rows the base takes)."""
        family = noise_family(self.student_scheduler)
        t_star = self.config.student_generator_timestep
        if t_star is not None and num_inference_steps not in (None, 1):
            raise ValueError("The student is a one-step generator; "
                             f"num_inference_steps={num_inference_steps}.")
        if family != "vp":
            if t_star is not None:  # base rows evenly in the student's time input from the top down to t*
                k, s_star = num_base_steps, float(self.config.student_generator_sigma)
                if family == "edm":
                    top = math.log(float(self.student_scheduler.config.sigma_max))
                    base = [math.exp(top - i * (top - math.log(s_star)) / k) for i in range(k)] if k else []
                else:
                    base = [1.0 - i * (1.0 - s_star) / k for i in range(k)] if k else []
                return base + [s_star], k
            stored = self.config.get("student_sigmas")
            if num_inference_steps is None and stored is not None:
                sigmas = [float(v) for v in stored]
            else:
                sigmas = scheduler_sigmas(self.student_scheduler,
                                          num_inference_steps or self.config.student_num_inference_steps)
            if not 0 <= num_base_steps <= len(sigmas):
                raise ValueError(f"num_base_steps={num_base_steps} must lie in [0, {len(sigmas)}] (the "
                                 f"student's grid has {len(sigmas)} steps).")
            return sigmas, num_base_steps
        T = self.student_scheduler.config.num_train_timesteps
        if t_star is not None:
            k = num_base_steps
            base = [round((T - 1) - i * (T - 1 - t_star) / k) for i in range(k)] if k else []
            return base + [t_star], k
        if num_inference_steps is None and self.config.student_timesteps is not None:
            ts = [int(t) for t in self.config.student_timesteps]
        else:
            ts = trailing_timesteps(num_inference_steps or self.config.student_num_inference_steps, T)
        if not 0 <= num_base_steps <= len(ts):
            raise ValueError(f"num_base_steps={num_base_steps} must lie in [0, {len(ts)}] (the student's "
                             f"grid has {len(ts)} steps).")
        return ts, num_base_steps

    def rows(self, num_base_steps: int, num_inference_steps: int | None = None) -> tuple[torch.Tensor, int]:
        """(the (student time input, alpha_bar) rows of the student's grid, how many of them the base
        takes). Each step goes to the next row (a student holding a ``DDIMScheduler`` without a stored grid
        samples alone to t - T // N, diffusers' DDIM: the same where N divides T)."""
        grid, k = self.grid(num_base_steps, num_inference_steps)
        if noise_family(self.student_scheduler) == "vp":
            return vp_grid(self.student_scheduler.alphas_cumprod, grid), k
        rows = family_rows(self.student_scheduler, grid)
        if self.config.student_generator_timestep is not None:  # t*'s network time as training wrote it
            rows[-1, 0] = float(self.config.student_generator_time)
        return rows, k

    def schedule(self, num_base_steps: int, num_inference_steps: int | None = None,
                 num_base_substeps: int | None = None) -> tuple[torch.Tensor, int]:
        """(the (time input, alpha_bar) rows of the whole chain, how many of them the base evaluates; a row's
        time input is the student's, a base sub-step's the base's)."""
        times, k = self.rows(num_base_steps, num_inference_steps)
        m = self.config.num_base_substeps if num_base_substeps is None else int(num_base_substeps)
        if m < 1:
            raise ValueError(f"num_base_substeps must be >= 1, got {m}.")
        if m == 1 or k == 0:
            return times, k
        return with_base_substeps(self.base_scheduler, times, k, m), k * m

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_base_steps: int | None = None,
                 num_inference_steps: int | None = None, class_labels=None,
                 base_guidance_scale: float | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | list | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, return_trajectory: bool = False,
                 prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 num_base_substeps: int | None = None, student_sampler: str | None = None):
        device, dtype = device_dtype(self, self.student_unet)
        sampler = self.config.get("student_sampler", "ddim") if student_sampler is None else student_sampler
        _check_sampler(sampler)
        text = self.text_encoder is not None
        if text:
            if prompt is None:
                raise ValueError("This is a text-to-image hybrid: pass prompt=... (a string or a list of "
                                 "strings).")
            prompt = [prompt] if isinstance(prompt, str) else list(prompt)
            batch_size = len(prompt)
        k = self.config.num_base_steps if num_base_steps is None else int(num_base_steps)
        times, k = self.schedule(k, num_inference_steps, num_base_substeps)
        if k and self.config.student_generator_timestep is not None:
            warnings.warn("A one-step student after base steps is outside the hybrid paper's setting (a "
                          "few-step DMD2 student): the generator, trained on sigma(t*) z alone, now sees "
                          "signal plus noise at t*.", stacklevel=3)
        m = self.config.num_base_substeps if num_base_substeps is None else int(num_base_substeps)
        # the step onto row r re-noises (stochastic) unless r is a base sub-step (rows i m + 1 .. i m + m - 1)
        renoise = [sampler == "stochastic" and (r >= k or r % m == 0) for r in range(len(times))]
        b_family, s_family = noise_family(self.base_scheduler), noise_family(self.student_scheduler)
        base_ac = self.base_scheduler.alphas_cumprod if b_family == "vp" else None
        shape = (batch_size, *self.config.sample_shape)
        z = latents.to(device, dtype) if latents is not None else randn_tensor(shape, generator=generator,
                                                                                device=device, dtype=dtype)
        if s_family == "vp":
            T = self.student_scheduler.config.num_train_timesteps
            x = z if float(times[0, 0]) == T - 1 else (1 - float(times[0, 1])) ** 0.5 * z
        else:  # x_t = sigma_0 z (EDM: sigma_max z; flow: z at s = 1), in VP coordinates
            x = (1 - float(times[0, 1])) ** 0.5 * z
        b_embedded = getattr(self.base_unet.config, "guidance_embeds", False)  # FLUX.1-dev: one pass
        cfg = base_guidance_scale is not None and float(base_guidance_scale) != 1.0 and not b_embedded
        if text:
            s_kw, b_kw = self._text_kwargs(prompt, negative_prompt, cfg, device, dtype)
        else:
            labels = default_labels(batch_size, self.config.num_classes, class_labels, device)
            s_kw = {"class_labels": labels} if labels is not None else {}
            if cfg and labels is None:
                raise ValueError(f"base_guidance_scale={base_guidance_scale}: classifier-free guidance needs "
                                 "class-conditional models with a null class.")
            b_labels = (torch.cat([labels, torch.full_like(labels, self.config.num_classes)]) if cfg
                        else labels)
            b_kw = {"class_labels": b_labels} if b_labels is not None else {}
        s_embedded = getattr(self.student_unet.config, "guidance_embeds", False)
        s = 3.5  # FLUX.1-dev students without a guidance input of their own: FluxPipeline's 3.5
        if self.config.student_guidance_conditioned:
            s = self.config.student_guidance_scale if guidance_scale is None else float(guidance_scale)
            w = torch.full((batch_size,), s - 1.0, device=device)  # Meng's w = s - 1
            dim = getattr(self.student_unet.config, "time_cond_proj_dim", None)
            if dim:
                s_kw["timestep_cond"] = guidance_embedding(w, dim).to(device, dtype)
            elif not s_embedded:
                s_kw["guidance_weight"] = w
        if s_embedded:  # FLUX.1-dev: the scale itself is an input
            s_kw["guidance"] = torch.full((batch_size,), float(s), device=device)
        if b_embedded:  # (FluxPipeline's default 3.5)
            b_kw["guidance"] = torch.full((batch_size,), float(base_guidance_scale or 3.5), device=device)
        b_pred = (self.config.get("base_prediction_type") or self.base_scheduler.config.get("prediction_type")
                  or "flow")
        s_pred = (self.config.get("student_prediction_type")
                  or self.student_scheduler.config.get("prediction_type") or "flow")
        bar = self.progress_bar(total=len(times))

        def base_net(x_in, tb):
            if not cfg:
                return forward(self.base_unet, x_in, torch.full((batch_size,), tb, device=device), **b_kw)
            # out_uncond + s (out_cond - out_uncond)
            c, u = forward(self.base_unet, torch.cat([x_in, x_in]),
                           torch.full((2 * batch_size,), tb, device=device), **b_kw).chunk(2)
            return classifier_free_guidance(c, u, float(base_guidance_scale))

        def model_fn(x_t, i, t):
            ab = float(times[i, 1])
            if i < k and b_family != "vp":  # the base at this noise level in its own family
                ab_b = base_alpha_bar(self.base_scheduler, ab)
                tb = family_timestep(self.base_scheduler, family_alpha_sigma(b_family, ab_b)[1])
                return family_x0(self.base_scheduler, lambda x_in: base_net(x_in, tb), x_t, ab_b, b_pred)
            if i >= k and s_family != "vp":  # the student at its own (time input, noise level)
                return family_x0(self.student_scheduler, lambda x_in: forward(
                    self.student_unet, x_in, torch.full((batch_size,), t, device=device), **s_kw),
                    x_t, ab, s_pred)
            a, sig = ab**0.5, (1 - ab) ** 0.5
            if i < k:  # a VP base, at the timestep of its own table with this noise level
                tb = timestep_for(base_ac, ab)
                tb = int(tb) if float(tb).is_integer() else tb
                if ab <= 0:  # pure noise (a flow grid's s = 1): the table's noisiest entry
                    ab_b = base_alpha_bar(self.base_scheduler, ab)
                    a, sig = ab_b**0.5, (1 - ab_b) ** 0.5
                return x0_from_output(base_net(x_t, tb), x_t, a, sig, b_pred)
            out = forward(self.student_unet, x_t, torch.full((batch_size,), int(t), device=device), **s_kw)
            return x0_from_output(out, x_t, a, sig, s_pred)

        trajectory = []

        def callback(state):
            bar.update()
            if return_trajectory:
                trajectory.append(state["denoised"])

        x = sample_hybrid(model_fn, x, times, renoise, callback=callback, generator=generator)
        bar.close()

        def out(v):
            decoded = latents_to_images(self.vae, v).float() if self.vae is not None else v
            return to_output(decoded, output_type)

        images = out(x)
        traj = [out(d) for d in trajectory] if return_trajectory else None
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, traj) if return_trajectory else (images,)
        return HybridPipelineOutput(images=images, trajectory=traj)

    def _text_kwargs(self, prompt: list[str], negative_prompt, cfg: bool, device, dtype) -> tuple[dict, dict]:
        """(student, base) keyword arguments of a text-to-image hybrid; the base's carry [cond; null] with
        CFG."""
        toks = [t for t in (self.tokenizer, self.tokenizer_2, self.tokenizer_3) if t is not None]
        encs = [e for e in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if e is not None]
        emb, pooled, mask = encode_for(self.student_unet, toks, encs, prompt, device)
        emb, pooled = emb.to(device, dtype), None if pooled is None else pooled.to(device, dtype)
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        size = self.config.sample_shape[-1] * f
        sdxl = getattr(self.student_unet.config, "addition_embed_type", None) == "text_time"
        ids = sdxl_time_ids(size, size, len(prompt), device).to(dtype) if sdxl else None
        s_kw = unet_text_kwargs(self.student_unet, emb, pooled, ids, mask)
        if not cfg:
            return s_kw, unet_text_kwargs(self.base_unet, emb, pooled, ids, mask)
        neg = negative_prompt if negative_prompt is not None else ""
        neg = [neg] * len(prompt) if isinstance(neg, str) else list(neg)
        zeros = negative_prompt is None and self.config.force_zeros_for_empty_prompt
        n_emb, n_pool, n_mask = encode_for(self.student_unet, toks, encs, neg, device, zeros)
        n_emb, n_pool = n_emb.to(device, dtype), None if n_pool is None else n_pool.to(device, dtype)
        b_kw = unet_text_kwargs(self.base_unet, torch.cat([emb, n_emb]),
                                None if pooled is None else torch.cat([pooled, n_pool]),
                                None if ids is None else ids.repeat(2, 1),
                                None if mask is None else torch.cat([mask, n_mask]))
        return s_kw, b_kw


def _check_sampler(sampler: str) -> None:
    if sampler not in STUDENT_SAMPLERS:
        raise ValueError(f"student_sampler={sampler!r}: use one of {', '.join(STUDENT_SAMPLERS)}.")

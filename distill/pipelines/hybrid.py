"""Hybrid base/distilled sampling (Gandikota & Bau 2025, "Distilling Diversity and Control in Diffusion
Models", sec. 4: the base model takes the first, composition-setting step(s); the distilled model the rest).

STANDALONE FILE: imports torch, diffusers and the sibling ``one_step.py`` / ``samplers.py`` /
``text_to_image.py`` only.

The hybrid runs ONE deterministic DDIM chain (``samplers.sample_ddim``) over the student's grid: the first
``num_base_steps`` rows are evaluated by the base model, the remaining rows by the student. A row carries
its noise level alpha_bar (read from the student's table); the base is evaluated at the timestep of ITS
table with the same alpha_bar (``samplers.timestep_for``: exact when the tables agree, log-SNR
interpolated when they differ), never at a reused index. The hand-over is therefore the DDIM
re-projection of the base's last clean prediction onto the student's first noise level,
x = sqrt(abar_s) x0_base + sqrt(1 - abar_s) eps_base, at a matched noise level. Both models must have
variance-preserving schedules (``alphas_cumprod``); pixel or latent samples of one shape. Text-to-image
models (Stable-Diffusion format) share the student's ``vae`` / ``text_encoder(_2)`` / ``tokenizer(_2)``:
``pipe(prompt=...)``, the base optionally with classifier-free guidance against the negative (default:
empty) prompt, samples decoded by the VAE.

Grids: a few-step student's own grid (its stored timesteps or the trailing grid of
``num_inference_steps``); for a one-step generator (evaluated at index t*), ``num_base_steps`` base rows
spaced evenly from the top of the table down to t*, then t* (the generator then sees the base's
re-projected sample at t* instead of sigma(t*) z). The chain starts from z at the top of the table
(diffusers' convention) and from sigma(t) z below it (the one-step generator's input).

``num_base_substeps=m`` lets the base cover each of its intervals with m DDIM steps of its own (its table's
timesteps evenly spaced between the two rows' noise levels): a better first clean estimate for m - 1 more
base evaluations per base row (the paper's setting is m = 1).

``num_base_steps=0`` is the student alone; every row on the base (m = 1) is the base's own DDIM sampler on
that grid. ``return_trajectory=True`` also returns each step's clean prediction (the "Diffusion Target" of the
paper's sec. 4.3), one image batch per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .one_step import (
    ExportedPipelineMixin,
    classifier_free_guidance,
    default_labels,
    device_dtype,
    to_output,
    x0_from_output,
)
from .samplers import sample_ddim, timestep_for, trailing_timesteps, vp_grid
from .text_to_image import (
    encode_prompt,
    guidance_embedding,
    latents_to_images,
    sdxl_time_ids,
    unet_text_kwargs,
)


@dataclass
class HybridPipelineOutput(BaseOutput):
    images: object
    trajectory: list | None = None  # per step, the clean prediction in output_type (return_trajectory=True)


class HybridPipeline(ExportedPipelineMixin, DiffusionPipeline):
    """Base model for the first steps, distilled student for the rest.

    Args:
        base_unet, base_scheduler: the base (teacher) denoiser and its VP scheduler.
        student_unet, student_scheduler: the distilled student and its VP scheduler (its
            ``prediction_type`` is the student's).
        student_generator_timestep: a one-step generator's index t* (None: a few-step denoiser).
        student_num_inference_steps, student_timesteps: a few-step student's step count and grid.
        num_base_steps: default number of base steps.
        sample_shape: shape of one sample.
        num_classes: classes of class-conditional models (both; label ``num_classes`` is the null).
        student_guidance_conditioned, student_guidance_scale: a guided-distillation student and its
            default guidance scale (it takes w = s - 1 as ``guidance_weight``, or as the embedded
            ``timestep_cond`` of a UNet2DConditionModel).
        vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2: text-to-image models' shared parts.
        force_zeros_for_empty_prompt: the null prompt is zeros (SDXL) instead of the encoded "".
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->base_unet->student_unet->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]

    def __init__(self, base_unet, base_scheduler, student_unet, student_scheduler,
                 student_generator_timestep: int | None = None, student_num_inference_steps: int = 4,
                 student_timesteps: list | None = None, num_base_steps: int = 1, num_base_substeps: int = 1,
                 sample_shape: list | None = None, num_classes: int = 0,
                 student_guidance_conditioned: bool = False, student_guidance_scale: float = 1.0, vae=None,
                 text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                 force_zeros_for_empty_prompt: bool = False):
        super().__init__()
        self.register_modules(base_unet=base_unet, base_scheduler=base_scheduler, student_unet=student_unet,
                              student_scheduler=student_scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
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
            force_zeros_for_empty_prompt=bool(force_zeros_for_empty_prompt))

    @classmethod
    def from_pipelines(cls, base, student, num_base_steps: int = 1,
                       num_base_substeps: int = 1) -> HybridPipeline:
        """Build from a loaded base pipeline (a FewStepPipeline or a DDPMPipeline: ``unet`` + ``scheduler``;
        for text-to-image a StableDiffusion(XL)Pipeline or TextToImagePipeline) and a loaded distill student
        (OneStepPipeline, FewStepPipeline or TextToImagePipeline, whose text parts the hybrid shares)."""
        for name, p in (("base", base), ("student", student)):
            sched = getattr(p, "scheduler", None)
            if sched is None or not hasattr(sched, "alphas_cumprod"):
                raise ValueError(f"The {name} pipeline needs a variance-preserving scheduler with "
                                 f"alphas_cumprod (DDPM / DDIM); {type(p).__name__} has "
                                 f"{type(sched).__name__}.")
        s_cfg = student.config
        text = getattr(student, "text_encoder", None) is not None
        one_step = hasattr(student, "generator") or getattr(s_cfg, "generator_timestep", None) is not None
        s_net = student.generator if hasattr(student, "generator") else student.unet
        text_parts = {}
        if text:
            if getattr(base, "text_encoder", None) is None:
                raise ValueError("A text-to-image student needs a text-to-image base (a "
                                 f"Stable-Diffusion-format pipeline); got {type(base).__name__}.")
            text_parts = {k: getattr(student, k, None)
                          for k in ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
            text_parts["force_zeros_for_empty_prompt"] = bool(
                getattr(s_cfg, "force_zeros_for_empty_prompt", False))
        b_classes = int(getattr(base.config, "num_classes", 0) or 0)
        if not b_classes and getattr(base.unet.config, "num_class_embeds", None):
            b_classes = base.unet.config.num_class_embeds - 1
        s_classes = int(getattr(s_cfg, "num_classes", 0) or 0)
        if b_classes != s_classes:
            raise ValueError(f"The base has {b_classes} classes and the student {s_classes}: a hybrid needs "
                             "both conditioned on the same classes (or both unconditional).")
        return cls(base.unet, base.scheduler, s_net, student.scheduler,
                   student_generator_timestep=s_cfg.generator_timestep if one_step else None,
                   student_num_inference_steps=getattr(s_cfg, "num_inference_steps", 1),
                   student_timesteps=getattr(s_cfg, "timesteps", None), num_base_steps=num_base_steps,
                   num_base_substeps=num_base_substeps,
                   sample_shape=list(s_cfg.sample_shape) if not text else None, num_classes=s_classes,
                   student_guidance_conditioned=bool(getattr(s_cfg, "guidance_conditioned", False)),
                   student_guidance_scale=float(getattr(s_cfg, "guidance_scale", 1.0)), **text_parts)

    def grid(self, num_base_steps: int, num_inference_steps: int | None = None) -> tuple[list[int], int]:
        """(the student-table timesteps of every row, how many rows the base takes)."""
        T = self.student_scheduler.config.num_train_timesteps
        t_star = self.config.student_generator_timestep
        if t_star is not None:
            if num_inference_steps not in (None, 1):
                raise ValueError("The student is a one-step generator; "
                                 f"num_inference_steps={num_inference_steps}.")
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

    def schedule(self, num_base_steps: int, num_inference_steps: int | None = None,
                 num_base_substeps: int | None = None) -> tuple[torch.Tensor, int]:
        """(the (timestep, alpha_bar) rows of the whole chain, how many of them the base evaluates)."""
        ts, k = self.grid(num_base_steps, num_inference_steps)
        m = self.config.num_base_substeps if num_base_substeps is None else int(num_base_substeps)
        if m < 1:
            raise ValueError(f"num_base_substeps must be >= 1, got {m}.")
        times = vp_grid(self.student_scheduler.alphas_cumprod, ts)
        if m == 1 or k == 0:
            return times, k
        b_ac = torch.as_tensor(self.base_scheduler.alphas_cumprod, dtype=torch.float64).cpu()
        rows = []
        for i in range(k):
            rows.append(times[i].tolist())  # the row itself: the base meets it at the matched noise level
            tb = timestep_for(b_ac, float(times[i, 1]))
            tb_next = timestep_for(b_ac, float(times[i + 1, 1])) if i + 1 < len(ts) else 0.0
            for j in range(1, m):
                t = round(tb - j * (tb - tb_next) / m)
                rows.append([float(t), float(b_ac[t])])
        rows += times[k:].tolist()
        out = torch.tensor(rows, dtype=torch.float64)
        if (out[1:, 1] <= out[:-1, 1]).any():
            raise ValueError(f"num_base_substeps={m} is too fine for the base's table between these grid "
                             "points; use fewer substeps.")
        return out, k * m

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_base_steps: int | None = None,
                 num_inference_steps: int | None = None, class_labels=None,
                 base_guidance_scale: float | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | list | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, return_trajectory: bool = False,
                 prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 num_base_substeps: int | None = None):
        device, dtype = device_dtype(self, self.student_unet)
        text = self.text_encoder is not None
        if text:
            if prompt is None:
                raise ValueError("This is a text-to-image hybrid: pass prompt=... (a string or a list of "
                                 "strings).")
            prompt = [prompt] if isinstance(prompt, str) else list(prompt)
            batch_size = len(prompt)
        k = self.config.num_base_steps if num_base_steps is None else int(num_base_steps)
        times, k = self.schedule(k, num_inference_steps, num_base_substeps)
        base_ac = self.base_scheduler.alphas_cumprod
        T = self.student_scheduler.config.num_train_timesteps
        shape = (batch_size, *self.config.sample_shape)
        z = latents.to(device, dtype) if latents is not None else randn_tensor(shape, generator=generator,
                                                                                device=device, dtype=dtype)
        x = z if float(times[0, 0]) == T - 1 else (1 - float(times[0, 1])) ** 0.5 * z
        cfg = base_guidance_scale is not None and float(base_guidance_scale) != 1.0
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
        if self.config.student_guidance_conditioned:
            s = self.config.student_guidance_scale if guidance_scale is None else float(guidance_scale)
            w = torch.full((batch_size,), s - 1.0, device=device)  # Meng's w = s - 1
            dim = getattr(self.student_unet.config, "time_cond_proj_dim", None)
            if dim:
                s_kw["timestep_cond"] = guidance_embedding(w, dim).to(device, dtype)
            else:
                s_kw["guidance_weight"] = w
        b_pred = self.base_scheduler.config.prediction_type
        s_pred = self.student_scheduler.config.prediction_type
        bar = self.progress_bar(total=len(times))

        def model_fn(x_t, i, t):
            ab = float(times[i, 1])
            a, sig = ab**0.5, (1 - ab) ** 0.5
            if i < k:  # the base, at the timestep of its own table with this noise level
                tb = timestep_for(base_ac, ab)
                tb = int(tb) if float(tb).is_integer() else tb
                if not cfg:
                    out = self.base_unet(x_t, torch.full((batch_size,), tb, device=device), **b_kw).sample
                else:  # out_uncond + s (out_cond - out_uncond)
                    c, u = self.base_unet(torch.cat([x_t, x_t]),
                                          torch.full((2 * batch_size,), tb, device=device),
                                          **b_kw).sample.chunk(2)
                    out = classifier_free_guidance(c, u, float(base_guidance_scale))
                return x0_from_output(out, x_t, a, sig, b_pred)
            out = self.student_unet(x_t, torch.full((batch_size,), int(t), device=device), **s_kw).sample
            return x0_from_output(out, x_t, a, sig, s_pred)

        trajectory = []

        def callback(state):
            bar.update()
            if return_trajectory:
                trajectory.append(state["denoised"])

        x = sample_ddim(model_fn, x, times, callback=callback)
        bar.close()

        def out(v):
            return to_output(latents_to_images(self.vae, v).float() if text else v, output_type)

        images = out(x)
        traj = [out(d) for d in trajectory] if return_trajectory else None
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, traj) if return_trajectory else (images,)
        return HybridPipelineOutput(images=images, trajectory=traj)

    def _text_kwargs(self, prompt: list[str], negative_prompt, cfg: bool, device, dtype) -> tuple[dict, dict]:
        """(student, base) keyword arguments of a text-to-image hybrid; the base's carry [cond; null] with
        CFG."""
        toks = [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]
        encs = [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]
        emb, pooled = encode_prompt(toks, encs, prompt, device)
        emb, pooled = emb.to(device, dtype), None if pooled is None else pooled.to(device, dtype)
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        size = self.student_unet.config.sample_size * f
        sdxl = getattr(self.student_unet.config, "addition_embed_type", None) == "text_time"
        ids = sdxl_time_ids(size, size, len(prompt), device).to(dtype) if sdxl else None
        s_kw = unet_text_kwargs(self.student_unet, emb, pooled, ids)
        if not cfg:
            return s_kw, unet_text_kwargs(self.base_unet, emb, pooled, ids)
        neg = negative_prompt if negative_prompt is not None else ""
        neg = [neg] * len(prompt) if isinstance(neg, str) else list(neg)
        n_emb, n_pool = encode_prompt(toks, encs, neg, device)
        if negative_prompt is None and self.config.force_zeros_for_empty_prompt:
            n_emb, n_pool = torch.zeros_like(n_emb), None if n_pool is None else torch.zeros_like(n_pool)
        n_emb, n_pool = n_emb.to(device, dtype), None if n_pool is None else n_pool.to(device, dtype)
        b_kw = unet_text_kwargs(self.base_unet, torch.cat([emb, n_emb]),
                                None if pooled is None else torch.cat([pooled, n_pool]),
                                None if ids is None else ids.repeat(2, 1))
        return s_kw, b_kw

"""N-step sampler pipeline for progressive / guided students (and for teachers at few steps).

STANDALONE FILE: imports torch, diffusers and the sibling ``one_step.py`` / ``samplers.py`` only
(exported folders carry them; diffusers copies relative imports of remote code).

Samplers (``samplers.py``: pure functions of the denoiser's x0 prediction on a descending grid):
* deterministic DDIM (Song et al. 2021, eq. 12, eta = 0) on the stored or trailing grid; with a
  ``DDIMScheduler`` and no stored grid, exactly diffusers' ``DDIMScheduler`` (``timestep_spacing="trailing"``,
  ``clip_sample=False``, either ``set_alpha_to_one``) at any N (``samplers.ddim_rows``): a teacher's baseline;
* the stochastic N-step sampler of Meng et al. 2023 ("On Distillation of Guided Diffusion Models",
  sec. 4.2, after the EDM stochastic sampler): from grid time t_i take one
  deterministic DDIM step of twice the nominal length, to t_{i+2} (the data when t_{i+1} is the
  last grid time), then go forward to t_{i+1} with the forward marginal,
  z_{i+1} = sqrt(abar_{i+1} / abar_{i+2}) z_{i+2} + sqrt(1 - abar_{i+1} / abar_{i+2}) xi;
  the last interval is deterministic, so it also costs N network evaluations.

Guided-distillation students take the guidance weight w as a network input. The pipeline speaks
diffusers' convention, ``guidance_scale = 1 + w`` (w = 0: the conditional model, no guidance), and
passes ``guidance_weight = guidance_scale - 1`` to the network.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from .one_step import (
    ExportedPipelineMixin,
    classifier_free_guidance,
    decode_output,
    default_labels,
    device_dtype,
    family_rows,
    family_x0,
    forward,
    noise_family,
    scheduler_sigmas,
    x0_from_output,
)
from .samplers import ddim_rows, sample_ddim, sample_meng_stochastic, trailing_timesteps, vp_grid

logger = logging.get_logger(__name__)


class FewStepPipeline(ExportedPipelineMixin, DiffusionPipeline):
    """Sample with N network evaluations on a stored or trailing grid.

    Args:
        unet: the denoiser (``UNet2DModel``, distill's MLP, ...).
        scheduler: the teacher family's diffusers scheduler: a VP one (``alphas_cumprod``,
            ``prediction_type``), an EDM one (``EDMEulerScheduler``: its preconditioning) or a flow-matching
            one (``FlowMatchEulerDiscreteScheduler``: the velocity); the same sampler runs on each, on the
            variance-preserving coordinates at equal log-SNR (there DDIM is EDM's and the flow's Euler step).
        num_inference_steps: default number of steps (the student's trained step count).
        timesteps: a VP student's own descending grid of training indices; overrides the trailing grid
            when given and ``num_inference_steps`` is not changed by the caller.
        sigmas: an EDM or flow student's own descending grid of noise levels (x_t's sigma, a flow's shift
            included), used like ``timesteps``; without it, the scheduler's own ``set_timesteps`` grid.
        prediction_type: the network's output when it is not the scheduler's own ("sample": x0 itself);
            None: the scheduler's (flow: the velocity).
        sample_shape, num_classes: as in ``OneStepPipeline``.
        guidance_conditioned: the network takes the guidance weight w as ``guidance_weight=``
            input (guided-distillation students); ``pipe(guidance_scale=s)`` passes w = s - 1.
        guidance_scale: the default ``guidance_scale`` of a guidance-conditioned student.
        guidance_range: the [min, max] ``guidance_scale`` range it was trained on (a warning is
            logged outside it).
        vae: as in ``OneStepPipeline`` (latent students, DiT's).
    """

    model_cpu_offload_seq = "unet->vae"
    _optional_components = ["vae"]

    def __init__(self, unet, scheduler, num_inference_steps: int = 4, timesteps: list | None = None,
                 sample_shape: list | None = None, num_classes: int = 0, guidance_conditioned: bool = False,
                 guidance_scale: float = 1.0, guidance_range: list | None = None, sigmas: list | None = None,
                 prediction_type: str | None = None, vae=None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        if sample_shape is None:
            cfg = unet.config
            sample_shape = ([cfg.in_channels, cfg.sample_size, cfg.sample_size] if hasattr(cfg, "in_channels")
                            else [cfg.data_dim])
        self.register_to_config(num_inference_steps=int(num_inference_steps),
                                timesteps=list(timesteps) if timesteps is not None else None,
                                sample_shape=list(sample_shape), num_classes=int(num_classes),
                                guidance_conditioned=bool(guidance_conditioned),
                                guidance_scale=float(guidance_scale),
                                guidance_range=list(guidance_range) if guidance_range is not None else None,
                                sigmas=[float(v) for v in sigmas] if sigmas is not None else None,
                                prediction_type=prediction_type)

    def grid(self, num_inference_steps: int | None = None, timesteps: list | None = None) -> list[int]:
        if timesteps is not None:
            ts = [int(t) for t in timesteps]
        elif num_inference_steps is None and self.config.timesteps is not None:
            ts = [int(t) for t in self.config.timesteps]
        else:
            n = num_inference_steps or self.config.num_inference_steps
            ts = trailing_timesteps(n, self.scheduler.config.num_train_timesteps)
        if any(a <= b for a, b in zip(ts, ts[1:])):
            raise ValueError(f"timesteps must be strictly descending, got {ts}.")
        return ts

    def rows(self, num_inference_steps: int | None = None, timesteps: list | None = None,
             sigmas: list | None = None) -> torch.Tensor:
        """The sampler rows (network time input, alpha_bar) of the grid: training indices on a VP table,
        noise levels on an EDM or flow scheduler."""
        if noise_family(self.scheduler) == "vp":
            if sigmas is not None:
                raise ValueError("sigmas= is the grid of an EDM or flow-matching scheduler; this pipeline's "
                                 f"{type(self.scheduler).__name__} takes timesteps=.")
            n = num_inference_steps or self.config.num_inference_steps
            stored = timesteps is not None or (num_inference_steps is None
                                               and self.config.timesteps is not None)
            if isinstance(self.scheduler, DDIMScheduler) and not stored:  # diffusers' DDIM, at any N
                return ddim_rows(self.scheduler.alphas_cumprod, n, float(self.scheduler.final_alpha_cumprod))
            return vp_grid(self.scheduler.alphas_cumprod, self.grid(num_inference_steps, timesteps))
        if timesteps is not None:
            raise ValueError(f"timesteps= is the grid of a VP table; this pipeline's "
                             f"{type(self.scheduler).__name__} takes sigmas= (noise levels, noisiest first).")
        if sigmas is None and num_inference_steps is None and self.config.get("sigmas") is not None:
            sigmas = self.config.sigmas
        if sigmas is None:
            sigmas = scheduler_sigmas(self.scheduler, num_inference_steps or self.config.num_inference_steps)
        return family_rows(self.scheduler, sigmas)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int | None = None,
                 timesteps: list | None = None, generator: torch.Generator | list | None = None,
                 class_labels=None, guidance_scale: float | None = None, stochastic: bool = False,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
                 sigmas: list | None = None):
        device, dtype = device_dtype(self, self.unet)
        times = self.rows(num_inference_steps, timesteps, sigmas)
        family = noise_family(self.scheduler)
        shape = (batch_size, *self.config.sample_shape)
        x = latents.to(device, dtype) if latents is not None else randn_tensor(shape, generator=generator,
                                                                                device=device, dtype=dtype)
        if family != "vp":  # x_t = sigma_0 z (EDM: sigma_max z; flow: z at s = 1), in VP coordinates
            ab0 = float(times[0, 1])
            x = x * (1 - ab0) ** 0.5
        labels = default_labels(batch_size, self.config.num_classes, class_labels, device)
        kwargs = {"class_labels": labels} if labels is not None else {}
        if self.config.guidance_conditioned:
            s = self.config.guidance_scale if guidance_scale is None else float(guidance_scale)
            lo_hi = self.config.guidance_range
            if lo_hi and not lo_hi[0] <= s <= lo_hi[1]:
                logger.warning(f"guidance_scale={s} is outside the range {lo_hi} this student was "
                               "trained on.")
            kwargs["guidance_weight"] = torch.full((batch_size,), s - 1.0, device=device)  # Meng's w = s - 1
        cfg_scale = None
        if (not self.config.guidance_conditioned and guidance_scale is not None
                and float(guidance_scale) != 1.0):
            if labels is None:
                raise ValueError(f"guidance_scale={guidance_scale}: classifier-free guidance needs a "
                                 "class-conditional model with a null class; this pipeline is "
                                 "unconditional. Leave guidance_scale unset.")
            cfg_scale = float(guidance_scale)  # classifier-free guidance, 2 evaluations per step
            kwargs["class_labels"] = torch.cat([labels, torch.full_like(labels, self.config.num_classes)])
        pred_type = (self.config.get("prediction_type") or self.scheduler.config.get("prediction_type")
                     or "flow")
        bar = self.progress_bar(total=len(times))

        def network(x_in, t):
            if cfg_scale is None:
                return forward(self.unet, x_in, torch.full((batch_size,), t, device=device), **kwargs)
            # out_uncond + s (out_cond - out_uncond), the diffusers convention
            cond, uncond = forward(self.unet, torch.cat([x_in, x_in]),
                                   torch.full((2 * batch_size,), t, device=device), **kwargs).chunk(2)
            return classifier_free_guidance(cond, uncond, cfg_scale)

        def denoise(x_t, i, t):
            ab = float(times[i, 1])
            if family != "vp":
                return family_x0(self.scheduler, lambda x_in: network(x_in, t), x_t, ab, pred_type)
            return x0_from_output(network(x_t, int(t)), x_t, ab**0.5, (1 - ab) ** 0.5, pred_type)

        sampler = sample_meng_stochastic if stochastic else sample_ddim
        x = sampler(denoise, x, times, callback=lambda _: bar.update(), generator=generator)
        bar.close()
        images = decode_output(self.vae, x, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

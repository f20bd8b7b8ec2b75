"""N-step sampler pipeline for progressive / guided students (and for teachers at few steps).

STANDALONE FILE: imports torch, diffusers and the sibling ``one_step.py`` only (exported folders
carry both files; diffusers copies relative imports of remote code).

Samplers (pure functions of the denoiser's x0 prediction on a descending integer grid):
* deterministic DDIM (Song et al. 2021, eq. 12, eta = 0), equal to diffusers' ``DDIMScheduler``
  with ``timestep_spacing="trailing"``, ``set_alpha_to_one=True``, ``clip_sample=False``;
* the stochastic multistep sampler (Meng et al. 2023, sec. 4.2; the consistency-model multistep
  form): predict x0, then re-noise it to the next grid time with fresh noise.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .one_step import ExportedPipelineMixin, default_labels, device_dtype, to_output, x0_from_output


def trailing_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """diffusers' trailing spacing: 1 -> [999], 2 -> [999, 499], 4 -> [999, 749, 499, 249]."""
    if num_inference_steps < 1 or num_inference_steps > num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, {num_train_timesteps}], got {num_inference_steps}.")
    step = num_train_timesteps / num_inference_steps
    return [round(num_train_timesteps - i * step) - 1 for i in range(num_inference_steps)]


def sample_loop(denoise, x: torch.Tensor, timesteps: list[int], alphas_cumprod: torch.Tensor,
                stochastic: bool = False, generator=None, callback=None) -> torch.Tensor:
    """Run a DDIM (or stochastic multistep) chain from noise ``x`` at ``timesteps[0]`` to data.

    ``denoise(x, t) -> x0`` is the model's clean prediction at integer index t.
    """
    for i, t in enumerate(timesteps):
        ac = alphas_cumprod[t].item()
        x0 = denoise(x, t, ac**0.5, (1 - ac) ** 0.5)
        if i + 1 == len(timesteps):
            x = x0
        else:
            ac_next = alphas_cumprod[timesteps[i + 1]].item()
            if stochastic:
                noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            else:
                noise = (x - ac**0.5 * x0) / (1 - ac) ** 0.5
            x = ac_next**0.5 * x0 + (1 - ac_next) ** 0.5 * noise
        if callback is not None:
            callback(i, t, x)
    return x


class FewStepPipeline(ExportedPipelineMixin, DiffusionPipeline):
    """Sample with N network evaluations on a stored or trailing grid.

    Args:
        unet: the denoiser (``UNet2DModel``, distill's MLP, ...).
        scheduler: a diffusers VP scheduler (``alphas_cumprod``, ``prediction_type``).
        num_inference_steps: default number of steps (the student's trained step count).
        timesteps: the student's own descending grid; overrides the trailing grid when given and
            ``num_inference_steps`` is not changed by the caller.
        sample_shape, num_classes: as in ``OneStepPipeline``.
        guidance_conditioned: the network takes the guidance weight as ``guidance_scale=`` input
            (guided-distillation students).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler, num_inference_steps: int = 4, timesteps: list | None = None,
                 sample_shape: list | None = None, num_classes: int = 0, guidance_conditioned: bool = False):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        if sample_shape is None:
            cfg = unet.config
            sample_shape = [cfg.in_channels, cfg.sample_size, cfg.sample_size] if hasattr(cfg, "in_channels") else [
                cfg.data_dim]
        self.register_to_config(num_inference_steps=int(num_inference_steps),
                                timesteps=list(timesteps) if timesteps is not None else None,
                                sample_shape=list(sample_shape), num_classes=int(num_classes),
                                guidance_conditioned=bool(guidance_conditioned))

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

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int | None = None, timesteps: list | None = None,
                 generator: torch.Generator | list | None = None, class_labels=None,
                 guidance_scale: float | None = None, stochastic: bool = False, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        device, dtype = device_dtype(self, self.unet)
        ts = self.grid(num_inference_steps, timesteps)
        shape = (batch_size, *self.config.sample_shape)
        x = latents.to(device, dtype) if latents is not None else randn_tensor(shape, generator=generator,
                                                                                device=device, dtype=dtype)
        labels = default_labels(batch_size, self.config.num_classes, class_labels, device)
        kwargs = {"class_labels": labels} if labels is not None else {}
        if self.config.guidance_conditioned:
            w = 1.0 if guidance_scale is None else float(guidance_scale)
            kwargs["guidance_scale"] = torch.full((batch_size,), w, device=device, dtype=dtype)
        elif guidance_scale is not None:
            raise ValueError("This student was not trained with a guidance input: do not pass guidance_scale.")
        pred_type = self.scheduler.config.prediction_type
        ac = self.scheduler.alphas_cumprod.to(torch.float64)
        bar = self.progress_bar(total=len(ts))

        def denoise(x_t, t, alpha, sigma):
            out = self.unet(x_t, torch.full((batch_size,), t, device=device), **kwargs).sample
            return x0_from_output(out, x_t, alpha, sigma, pred_type)

        x = sample_loop(denoise, x, ts, ac, stochastic=stochastic, generator=generator,
                        callback=lambda *_: bar.update())
        bar.close()
        images = to_output(x, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

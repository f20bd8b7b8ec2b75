"""Text-to-image pipeline for students of Stable-Diffusion-format (latent, text-conditioned) teachers.

STANDALONE FILE: imports torch, diffusers and the sibling ``one_step.py`` / ``samplers.py`` only
(exported folders carry all three; diffusers copies relative imports of remote code).

Components are the standard diffusers ones (``vae``, ``text_encoder``, ``tokenizer``, for SDXL also
``text_encoder_2`` / ``tokenizer_2``, ``scheduler``) plus the student ``unet``. The student works
in the VAE's latent space; samples are decoded with the VAE's scaling (and shift) factors.

* one-step students (SIM, Uni-Instruct): the UNet evaluated once at training index
  ``generator_timestep`` on ``sigma(t*) z`` (SiD-LSG / Diff-Instruct generator parameterisation);
* few-step students (progressive, guided, or the teacher itself): deterministic DDIM on the
  trailing grid (Song et al. 2021, eq. 12), or the stochastic sampler of Meng et al. 2023 sec. 4.2;
* every noise family: a VP table (``alphas_cumprod``), an EDM scheduler (its preconditioning) or a
  flow-matching one (the velocity), as in ``one_step.py`` / ``few_step.py``;
* guidance-conditioned students (guided distillation, Meng et al. 2023): the guidance weight
  w = guidance_scale - 1 enters through ``UNet2DConditionModel``'s ``time_cond_proj_dim`` input, embedded
  as in diffusers' LatentConsistencyModelPipeline (:func:`guidance_embedding`);
* any other few-step model with ``guidance_scale > 1``: classifier-free guidance
  ``uncond + s (cond - uncond)`` (Ho & Salimans 2022, eq. 6) against the negative (default: empty) prompt.

Prompt encoding follows diffusers' StableDiffusionPipeline (last hidden state of CLIPTextModel) and
StableDiffusionXLPipeline (penultimate hidden states of both encoders concatenated, pooled output of
the second, added time ids (H, W, 0, 0, H, W); zeros as the null prompt when the teacher's
``force_zeros_for_empty_prompt`` says so).
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, EulerDiscreteScheduler, ImagePipelineOutput
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from .one_step import (
    ExportedPipelineMixin,
    classifier_free_guidance,
    family_rows,
    family_x0,
    forward,
    latents_to_images,
    noise_family,
    one_step_input,
    scheduler_sigmas,
    to_output,
    x0_from_output,
)
from .samplers import ddim_rows, sample_ddim, sample_meng_stochastic, trailing_timesteps, vp_grid

logger = logging.get_logger(__name__)


# Copied from distill.text_encoding.guidance_embedding
def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of 1000 w (VDM; diffusers'
    ``LatentConsistencyModelPipeline.get_guidance_scale_embedding``)."""
    w = w.float().reshape(-1) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device)
                      * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


# Copied from distill.text_encoding.encode_prompt
def encode_prompt(tokenizers, text_encoders, prompts: list[str],
                  device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(embeds (B, L, D), pooled (B, D') or None) of ``prompts``, as diffusers' SD / SDXL pipelines do."""
    sdxl = len(text_encoders) > 1
    embeds, pooled = [], None
    for tok, enc in zip(tokenizers, text_encoders):
        ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        out = enc(ids, output_hidden_states=sdxl)
        if sdxl:
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds
                pooled = out[0]
            embeds.append(out.hidden_states[-2])
        else:
            embeds.append(out[0])
    return torch.cat(embeds, dim=-1), pooled


# Copied from distill.text_encoding.encode_prompt_sd3
def encode_prompt_sd3(tokenizers, text_encoders, prompts: list[str], device, joint_attention_dim: int,
                      max_sequence_length: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds (B, 77 + L_T5, D), pooled (B, D_L + D_G)) of ``prompts`` as diffusers'
    StableDiffusion3Pipeline encodes them (Esser et al. 2024, sec. 5.1): the penultimate hidden states of
    CLIP-L and CLIP-G concatenated on features and zero-padded to the T5 width, followed on the sequence
    axis by T5-XXL's last hidden state (``max_sequence_length`` tokens; zeros of ``joint_attention_dim``
    when the folder has no T5); pooled: both CLIP projections concatenated."""
    clip_embeds, pooled = [], []
    for tok, enc in zip(tokenizers[:2], text_encoders[:2]):
        ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        out = enc(ids, output_hidden_states=True)
        pooled.append(out[0])
        clip_embeds.append(out.hidden_states[-2].to(text_encoders[0].dtype))
    clip = torch.cat(clip_embeds, dim=-1)
    if len(text_encoders) > 2:
        ids = tokenizers[2](list(prompts), padding="max_length", max_length=max_sequence_length,
                            truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
        t5 = text_encoders[2](ids.to(device))[0]
    else:
        t5 = torch.zeros(len(prompts), max_sequence_length, joint_attention_dim, device=device,
                         dtype=clip.dtype)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)


# Copied from distill.text_encoding.encode_prompt_flux
def encode_prompt_flux(tokenizers, text_encoders, prompts: list[str], device,
                       max_sequence_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds (B, L_T5, D), pooled (B, D_L)) of ``prompts`` as diffusers' FluxPipeline encodes them: T5's
    last hidden state (``max_sequence_length`` tokens) and CLIP-L's pooled output."""
    tok, enc = tokenizers[0], text_encoders[0]
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    pooled = enc(ids.to(device), output_hidden_states=False).pooler_output.to(enc.dtype)
    ids = tokenizers[1](list(prompts), padding="max_length", max_length=max_sequence_length, truncation=True,
                        return_tensors="pt").input_ids
    return text_encoders[1](ids.to(device), output_hidden_states=False)[0], pooled


# Copied from distill.text_encoding.encode_prompt_t5
def encode_prompt_t5(tokenizers, text_encoders, prompts: list[str], device,
                     max_sequence_length: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds (B, L, D), attention mask (B, L)) of ``prompts`` as diffusers' PixArtSigmaPipeline encodes
    them (without its optional caption cleaning): T5's last hidden state over ``max_sequence_length`` padded
    tokens, with the mask the transformer's cross-attention uses."""
    tok = tokenizers[0](list(prompts), padding="max_length", max_length=max_sequence_length, truncation=True,
                        add_special_tokens=True, return_tensors="pt")
    mask = tok.attention_mask.to(device)
    return text_encoders[0](tok.input_ids.to(device), attention_mask=mask)[0], mask


# Copied from distill.text_encoding.sdxl_time_ids
def sdxl_time_ids(height: int, width: int, batch: int, device) -> torch.Tensor:
    """SDXL's added time ids (original size, crop top-left, target size) for unconditioned crops."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32,
                        device=device).expand(batch, 6)


def is_sd3(net) -> bool:
    """An SD3-class transformer (text from CLIP-L, CLIP-G and T5; the pooled CLIP embeddings as
    ``pooled_projections``)."""
    return type(getattr(net, "wrapped_network", net)).__name__ == "SD3Transformer2DModel"


def is_flux(net) -> bool:
    """A FLUX.1 transformer (text from CLIP-L pooled and T5; 2x2-patch tokens of 4C channels)."""
    return type(getattr(net, "wrapped_network", net)).__name__ == "FluxTransformer2DModel"


def is_pixart(net) -> bool:
    """A PixArt transformer (T5 text with its attention mask, no size conditioning: PixArt-Sigma's)."""
    return type(getattr(net, "wrapped_network", net)).__name__ == "PixArtTransformer2DModel"


def encode_for(net, tokenizers, text_encoders, prompts: list[str], device, zeros: bool = False):
    """(embeds, pooled, attention mask) of ``prompts`` as the stock pipeline of ``net``'s family encodes them
    (PixArt: T5 with its mask; SD3: CLIP-L + CLIP-G + T5; FLUX.1: T5 + CLIP-L pooled; else SD / SDXL's CLIP);
    ``zeros``: SDXL's zero null prompt."""
    net = getattr(net, "wrapped_network", net)  # a guidance-input wrapper encodes as its transformer
    if is_pixart(net):
        embeds, mask = encode_prompt_t5(tokenizers, text_encoders, prompts, device)
        return embeds, None, mask
    if is_sd3(net):
        embeds, pooled = encode_prompt_sd3(tokenizers, text_encoders, prompts, device,
                                           net.config.joint_attention_dim)
    elif is_flux(net):
        embeds, pooled = encode_prompt_flux(tokenizers, text_encoders, prompts, device)
    else:
        embeds, pooled = encode_prompt(tokenizers, text_encoders, prompts, device)
    if zeros:
        embeds, pooled = torch.zeros_like(embeds), None if pooled is None else torch.zeros_like(pooled)
    return embeds, pooled, None


def unet_text_kwargs(unet, embeds, pooled, time_ids, mask=None) -> dict:
    kw = {"encoder_hidden_states": embeds}
    if is_pixart(unet):
        kw.update(encoder_attention_mask=mask, added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    elif is_sd3(unet) or is_flux(unet):
        kw["pooled_projections"] = pooled
    elif getattr(unet.config, "addition_embed_type", None) == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    return kw


class TextToImagePipeline(ExportedPipelineMixin, DiffusionPipeline):
    """Sample a distilled text-to-image student (one step, or few DDIM steps).

    Args:
        unet: the student ``UNet2DConditionModel`` (or None with ``transformer``).
        vae, text_encoder, tokenizer, scheduler: the teacher's components.
        text_encoder_2, tokenizer_2: SDXL's / SD3's second text encoder (optional).
        transformer: the student ``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` /
            ``PixArtTransformer2DModel`` of an SD3 / SD3.5 / FLUX.1 / PixArt-Sigma teacher, in place of
            ``unet``.
        text_encoder_3, tokenizer_3: SD3's T5 encoder (optional, as in diffusers: without it the T5 part of
            the text embedding is zeros).
        generator_timestep: one-step students: the training index t* of the generator; None for
            few-step students.
        num_inference_steps, timesteps: few-step students: the trained step count and grid (VP tables).
        sigmas: few-step students of EDM and flow teachers: the grid as noise levels (x_t's sigma).
        generator_sigma, generator_time: one-step students of EDM and flow teachers: sigma(t*) and the
            network's time input at t*.
        prediction_type: the student's output when it is not the scheduler's own; None: the scheduler's.
        guidance_conditioned: the network takes w (guided distillation): a UNet through ``timestep_cond``,
            a transformer wrapper as ``guidance_weight``; FLUX.1-dev's own ``guidance`` input takes the scale
            s = 1 + w.
        guidance_scale: default guidance scale (guided students; CFG of few-step models).
        guidance_range: the [min, max] guidance-scale range a guided student was trained on.
        force_zeros_for_empty_prompt: the null prompt is zeros (SDXL) instead of the encoded "".
        sample_size: the latent height and width the student was trained at (SD3 / FLUX.1 sample any size);
            None: the network's own ``sample_size`` (FLUX.1: 128).
        embedded_guidance: a FLUX.1-dev student's ``guidance`` input (the value it was trained with); None:
            FluxPipeline's default, 3.5.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->unet->transformer->vae"
    _optional_components = ["unet", "transformer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                            "tokenizer_3"]

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler,
                 text_encoder_2=None, tokenizer_2=None, generator_timestep: int | None = None,
                 num_inference_steps: int = 1, timesteps: list | None = None,
                 guidance_conditioned: bool = False, guidance_scale: float = 1.0,
                 guidance_range: list | None = None, force_zeros_for_empty_prompt: bool = False,
                 sigmas: list | None = None,
                 generator_sigma: float | None = None, generator_time: float | None = None,
                 prediction_type: str | None = None, transformer=None, text_encoder_3=None, tokenizer_3=None,
                 sample_size: int | None = None, embedded_guidance: float | None = None):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("Pass the student network as unet= (a UNet2DConditionModel) or transformer= (an "
                             "SD3Transformer2DModel, with unet=None), exactly one of them.")
        self.register_modules(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                              transformer=transformer, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
        self.register_to_config(generator_timestep=(None if generator_timestep is None
                                                    else int(generator_timestep)),
                                num_inference_steps=int(num_inference_steps),
                                timesteps=list(timesteps) if timesteps is not None else None,
                                guidance_conditioned=bool(guidance_conditioned),
                                guidance_scale=float(guidance_scale),
                                guidance_range=list(guidance_range) if guidance_range is not None else None,
                                force_zeros_for_empty_prompt=bool(force_zeros_for_empty_prompt),
                                sigmas=[float(v) for v in sigmas] if sigmas is not None else None,
                                generator_sigma=generator_sigma, generator_time=generator_time,
                                prediction_type=prediction_type, sample_size=sample_size,
                                embedded_guidance=embedded_guidance)

    @property
    def latent_size(self) -> int:
        """The latent height and width sampled."""
        return self.config.get("sample_size") or getattr(self.network.config, "sample_size", None) or 128

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def network(self):
        """The student: ``unet`` or ``transformer``."""
        return self.unet if self.unet is not None else self.transformer

    def _encoders(self):
        toks = [t for t in (self.tokenizer, self.tokenizer_2, self.tokenizer_3) if t is not None]
        encs = [e for e in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if e is not None]
        return toks, encs

    @torch.no_grad()
    def encode_prompt(self, prompt, device, negative: bool = False):
        """(embeds, pooled, attention mask) of a list of prompts (pooled: SDXL, SD3, FLUX; mask: PixArt);
        for the default null prompt of an SDXL-class model, zeros."""
        zeros = negative and self.config.force_zeros_for_empty_prompt and all(p == "" for p in prompt)
        return encode_for(self.network, *self._encoders(), prompt, device, zeros)

    def rows(self, num_inference_steps: int | None) -> torch.Tensor:
        """The sampler rows (network time input, alpha_bar): the stored or trailing grid on a VP table (a
        ``DDIMScheduler`` without a stored grid: diffusers' DDIM steps, ``ddim_rows``), the stored or the
        scheduler's own noise levels on EDM and flow."""
        n = num_inference_steps or self.config.num_inference_steps
        if noise_family(self.scheduler) != "vp":
            stored = self.config.get("sigmas")
            sigmas = stored if num_inference_steps is None and stored is not None else scheduler_sigmas(
                self.scheduler, n)
            return family_rows(self.scheduler, sigmas)
        if num_inference_steps is None and self.config.timesteps is not None:
            ts = [int(t) for t in self.config.timesteps]
        elif isinstance(self.scheduler, DDIMScheduler):  # diffusers' DDIM, at any N
            return ddim_rows(self.scheduler.alphas_cumprod, n, float(self.scheduler.final_alpha_cumprod))
        else:
            ts = trailing_timesteps(n, self.scheduler.config.num_train_timesteps)
        return vp_grid(self.scheduler.alphas_cumprod, ts)

    def stock_layout(self) -> tuple[str, object, dict] | None:
        """(stock pipeline class, scheduler, call arguments) with which diffusers' own
        StableDiffusionPipeline / StableDiffusionXLPipeline samples this student's images, without
        classifier-free guidance: an SD / SDXL UNet on a VP table without a guidance input. One step: Euler
        (trailing spacing) at ``timesteps=[t*]``, which starts from sigma(t*) z, the generator's input, and
        takes x0 (Euler in sigma = sqrt((1 - abar) / abar) is the DDIM update). N steps: DDIM on the
        trailing grid from z, as here, where that grid is the student's and N divides the table (diffusers'
        DDIM steps to t - T // N). None for other students."""
        if self.unet is None or self.config.guidance_conditioned or noise_family(self.scheduler) != "vp":
            return None
        pred = self.config.get("prediction_type") or self.scheduler.config.prediction_type
        name = "StableDiffusionXLPipeline" if self.text_encoder_2 is not None else "StableDiffusionPipeline"
        if self.config.generator_timestep is not None:
            scheduler = EulerDiscreteScheduler.from_config(self.scheduler.config, timestep_spacing="trailing",
                                                           prediction_type=pred)
            return name, scheduler, {"timesteps": [self.config.generator_timestep], "guidance_scale": 1.0}
        n, T = self.config.num_inference_steps, self.scheduler.config.num_train_timesteps
        grid = trailing_timesteps(n, T)
        if T % n or [int(t) for t in (self.config.timesteps or grid)] != grid:
            return None
        scheduler = DDIMScheduler.from_config(self.scheduler.config, timestep_spacing="trailing",
                                              set_alpha_to_one=True, clip_sample=False, prediction_type=pred)
        return name, scheduler, {"num_inference_steps": n, "guidance_scale": 1.0}

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 num_images_per_prompt: int = 1, generator: torch.Generator | list | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 pooled_prompt_embeds: torch.Tensor | None = None,
                 negative_pooled_prompt_embeds: torch.Tensor | None = None, stochastic: bool = False,
                 output_type: str = "pil", return_dict: bool = True):
        unet = self.network
        device = self._execution_device
        dtype = unet.dtype
        one_step = self.config.generator_timestep is not None
        if one_step and num_inference_steps not in (None, 1):
            raise ValueError(f"This is a one-step student; num_inference_steps={num_inference_steps} is not "
                             "possible.")
        # ---- prompts
        mask = neg_mask = None  # PixArt's T5 attention masks (given embeddings attend to every token)
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("Pass prompt=... (a string or a list of strings) or prompt_embeds=...")
            prompt = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds, pooled_prompt_embeds, mask = self.encode_prompt(prompt, device)
        batch = prompt_embeds.shape[0] * num_images_per_prompt
        sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
        if sdxl and pooled_prompt_embeds is None:
            raise ValueError("This SDXL-class UNet needs pooled_prompt_embeds along with prompt_embeds.")
        s = self.config.guidance_scale if guidance_scale is None else float(guidance_scale)
        cfg = not self.config.guidance_conditioned and guidance_scale is not None and s != 1.0
        if cfg and one_step:
            raise ValueError(f"guidance_scale={guidance_scale}: a one-step student has its guidance "
                             "distilled in (the teacher's guidance scale at training); leave guidance_scale "
                             "unset.")
        if cfg and negative_prompt_embeds is None:
            neg = negative_prompt if negative_prompt is not None else ""
            neg = [neg] * prompt_embeds.shape[0] if isinstance(neg, str) else list(neg)
            negative_prompt_embeds, negative_pooled_prompt_embeds, neg_mask = self.encode_prompt(
                neg, device, negative=negative_prompt is None)

        def rep(x):
            return None if x is None else x.to(device, dtype).repeat_interleave(num_images_per_prompt, dim=0)

        embeds, pooled = rep(prompt_embeds), rep(pooled_prompt_embeds)
        height = self.latent_size * self.vae_scale_factor
        time_ids = sdxl_time_ids(height, height, batch, device).to(dtype) if sdxl else None
        mask = None if mask is None else mask.repeat_interleave(num_images_per_prompt, dim=0)
        kwargs = unet_text_kwargs(unet, embeds, pooled, time_ids, mask)
        if cfg:
            n_emb, n_pool = rep(negative_prompt_embeds), rep(negative_pooled_prompt_embeds)
            both_masks = None if mask is None or neg_mask is None else torch.cat(
                [mask, neg_mask.repeat_interleave(num_images_per_prompt, dim=0)])
            kwargs = unet_text_kwargs(unet, torch.cat([embeds, n_emb]), None if pooled is None else
                                      torch.cat([pooled, n_pool]),
                                      None if time_ids is None else time_ids.repeat(2, 1), both_masks)
        embedded = getattr(unet.config, "guidance_embeds", False)  # FLUX.1-dev: the scale is an input
        if self.config.guidance_conditioned:
            lo_hi = self.config.guidance_range
            if lo_hi and not lo_hi[0] <= s <= lo_hi[1]:
                logger.warning(f"guidance_scale={s} is outside the range {lo_hi} this student was "
                               "trained on.")
            w = torch.full((batch,), s - 1.0, device=device)  # Meng et al.'s w = guidance_scale - 1
            dim = getattr(unet.config, "time_cond_proj_dim", None)
            if dim:
                kwargs["timestep_cond"] = guidance_embedding(w, dim).to(device, dtype)
            elif not embedded:  # a guidance-input wrapper (transformers)
                kwargs["guidance_weight"] = w
        if embedded:  # a guided student's scale s, else the scale it was trained with (FluxPipeline's 3.5)
            g = s if self.config.guidance_conditioned else self.config.get("embedded_guidance") or 3.5
            kwargs["guidance"] = torch.full((2 * batch if cfg else batch,), float(g), device=device)
        # ---- latents
        channels = unet.config.in_channels // 4 if is_flux(unet) else unet.config.in_channels
        shape = (batch, channels, self.latent_size, self.latent_size)
        x = latents.to(device, dtype) if latents is not None else randn_tensor(shape, generator=generator,
                                                                                device=device, dtype=dtype)
        family = noise_family(self.scheduler)
        pred_type = (self.config.get("prediction_type") or self.scheduler.config.get("prediction_type")
                     or "flow")
        if one_step:
            _, x_in, t, to_x0 = one_step_input(self.scheduler, self.config, x)
            for _ in self.progress_bar(range(1)):
                out = forward(unet, x_in, torch.full((batch,), t, device=device), **kwargs)
            x = to_x0(out)
        else:
            times = self.rows(num_inference_steps)
            bar = self.progress_bar(total=len(times))
            if family != "vp":  # x_t = sigma_0 z, in VP coordinates
                x = x * (1 - float(times[0, 1])) ** 0.5

            def network(x_in, t):
                if not cfg:
                    return forward(unet, x_in, torch.full((batch,), t, device=device), **kwargs)
                cond, uncond = forward(unet, torch.cat([x_in, x_in]),
                                       torch.full((2 * batch,), t, device=device), **kwargs).chunk(2)
                return classifier_free_guidance(cond, uncond, s)

            def denoise(x_t, i, t):
                ab = float(times[i, 1])
                if family != "vp":
                    return family_x0(self.scheduler, lambda x_in: network(x_in, t), x_t, ab, pred_type)
                return x0_from_output(network(x_t, int(t)), x_t, ab**0.5, (1 - ab) ** 0.5, pred_type)

            sampler = sample_meng_stochastic if stochastic else sample_ddim
            x = sampler(denoise, x, times, callback=lambda _: bar.update(), generator=generator)
            bar.close()
        if output_type == "latent":
            images = x
        else:
            images = to_output(latents_to_images(self.vae, x).float(), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

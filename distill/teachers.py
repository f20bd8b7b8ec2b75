"""Teachers: one frozen-denoiser API for every trainer.

``Teacher.denoiser`` (a :class:`~distill.denoiser.Denoiser`) evaluates the frozen diffusers network at
continuous time ``t`` (see :mod:`distill.noise`) on a :class:`~distill.conditioning.Condition`, with
classifier-free guidance; ``predict_x0`` / ``network_output`` / ``score`` are its clean-sample prediction,
raw output and score.

A teacher knows its space: pixel teachers (``UNet2DModel``, distill's MLP, the analytic mixture)
train in data space, ``encode`` / ``decode`` are the identity; Stable-Diffusion-format teachers
(``UNet2DConditionModel`` + ``AutoencoderKL`` + CLIP text encoder(s) + tokenizer(s), the
StableDiffusionPipeline / StableDiffusionXLPipeline folder layout) train in the VAE's latent space,
``encode`` / ``decode`` go through the VAE with its scaling / shift factors, and
``condition(prompts=...)`` encodes prompts once per batch with an LRU cache.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from pathlib import Path

import diffusers
import torch

from . import backbones
from .conditioning import Condition, as_condition
from .denoiser import Denoiser
from .errors import ConfigError
from .export import read_model_index, resolve_pretrained
from .models import GaussianMixtureTeacher
from .noise import NoiseSchedule
from .teacher_folder import (
    component_class,
    damaged,
    image_tokens,
    infer_classes,
    infer_shape,
    load_latent_parts,
)

BUILTIN = {"builtin:digits": "digits_teacher", "builtin:digits-cond": "digits_teacher_cond",
           "builtin:digits-flow": "digits_teacher_flow"}
ASSETS = Path(__file__).parent / "assets"


class Teacher:
    """A frozen denoiser + schedule with one API at continuous time.

    Args:
        model: a diffusers-style denoiser, called as :func:`distill.backbones.call` says.
        schedule: its :class:`NoiseSchedule` (``prediction_type`` included).
        num_classes: classes of a conditional teacher; label ``num_classes`` is the null class.
        sample_shape: shape of one training-space sample (latents for a latent teacher).
        scheduler: the diffusers scheduler it came with (kept for export).
        vae: the ``AutoencoderKL`` of a latent teacher (None: pixel space).
        text_encoders, tokenizers: CLIP text encoder(s) and tokenizer(s) of a text teacher.
        force_zeros_for_empty_prompt: the null prompt is zeros (SDXL), not the encoded "".
        folder: the pipeline folder it was loaded from (exports re-read the frozen parts from it).
        prompt_cache_size: prompts whose encodings are kept (LRU).
    """

    def __init__(self, model, schedule: NoiseSchedule, num_classes: int = 0, sample_shape=None,
                 scheduler=None, source: str | None = None, vae=None, text_encoders=(), tokenizers=(),
                 force_zeros_for_empty_prompt: bool = False, folder: Path | None = None,
                 prompt_cache_size: int = 4096, network_subfolder: str | None = None):
        self.model = model.eval().requires_grad_(False)
        self.schedule = schedule
        self.num_classes = int(num_classes)
        self.sample_shape = list(sample_shape) if sample_shape is not None else infer_shape(model)
        self.scheduler = scheduler
        self.source = source
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        self.text_encoders = [e.eval().requires_grad_(False) for e in text_encoders]
        self.tokenizers = list(tokenizers)
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.folder = folder
        self.network_subfolder = network_subfolder
        self.denoiser = Denoiser(self.model, schedule, prepare=self._prepare)
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = int(prompt_cache_size)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model, scheduler, num_classes: int | None = None, **kwargs) -> Teacher:
        """``num_classes``: a class-conditional UNet's classes (label ``num_classes`` = its null class);
        required there, since ``num_class_embeds`` may or may not count a null class."""
        return cls(model, NoiseSchedule.from_scheduler(scheduler, image_seq_len=image_tokens(model)),
                   num_classes=infer_classes(model, num_classes, repr(kwargs.get("source") or "the teacher")),
                   scheduler=scheduler, **kwargs)

    @classmethod
    def from_pretrained(cls, path_or_id: str, device: str | torch.device = "cpu",
                        dtype=torch.float32, num_classes: int | None = None) -> Teacher:
        """A diffusers pipeline folder or Hub id (``unet`` + ``scheduler``; for text-to-image also ``vae``,
        ``text_encoder`` and ``tokenizer``, SDXL's ``text_encoder_2`` / ``tokenizer_2``), or
        ``builtin:digits``. Every part is loaded frozen in ``dtype``. ``num_classes``: a class-conditional
        UNet's classes, when its folder's ``model_index.json`` does not say (distill's exports do)."""
        src = str(path_or_id)
        if src in BUILTIN:
            folder = ASSETS / BUILTIN[src]
            if not folder.is_dir():
                raise FileNotFoundError(f"The builtin teacher {src!r} is missing at {folder}; reinstall "
                                        "distill.")
        elif src.startswith(("builtin:", "analytic:")):
            raise FileNotFoundError(f"No builtin teacher {src!r}: the builtin teachers are "
                                    f"{', '.join(BUILTIN)} (analytic:gaussians8 / analytic:gaussians25 in a "
                                    "config's teacher.path).")
        else:
            folder = resolve_pretrained(src)
        index = read_model_index(folder)
        net_name = next((k for k in ("unet", "transformer", "generator") if k in index), None)
        if net_name is None or "scheduler" not in index:
            raise ConfigError(f"Teacher folder {str(folder)!r} needs a 'unet' (or 'transformer') and a "
                              f"'scheduler'; it has {sorted(k for k in index if not k.startswith('_'))}.")
        with damaged(folder, net_name):
            model = (component_class(index[net_name])
                     .from_pretrained(folder / net_name, dtype=dtype).to(device))
        with damaged(folder, "scheduler"):
            scheduler = getattr(diffusers, index["scheduler"][1]).from_pretrained(folder / "scheduler")
        text = {}
        if any((index.get(k) or [None])[0] is not None for k in ("vae", "text_encoder")):
            with damaged(folder, "vae / text encoder / tokenizer"):
                text = load_latent_parts(folder, index, device, dtype)
        stated = num_classes if num_classes is not None else index.get("num_classes")
        return cls.from_model(model, scheduler, num_classes=stated, source=src, folder=folder,
                              network_subfolder=net_name, **text)

    # ------------------------------------------------------------------ space
    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    def stored_network(self) -> torch.nn.Module:
        """A trainable fp32 copy of the network as stored (re-read from the teacher's folder, so a teacher
        held in bf16 gives the unrounded weights; a teacher built in memory is copied), without any LoRA
        layer, and without DiT's built-in class-label dropout in training mode (distill drops conditions
        itself, ``Condition.drop``)."""
        net = self.weights
        if self.folder is not None and self.network_subfolder is not None:
            fresh = type(net).from_pretrained(self.folder / self.network_subfolder, dtype=torch.float32)
        elif not any("lora_" in k for k in net.state_dict()):
            fresh = copy.deepcopy(net)
        else:  # a LoRA-carrying network: its own weights sit under ``base_layer``
            fresh = type(net).from_config(net.config)
            fresh.load_state_dict({k.replace(".base_layer.", "."): v for k, v in net.state_dict().items()
                                   if "lora_" not in k})
        for m in fresh.modules():  # DiT's own label dropout (its CFG training) would drop a student's classes
            if type(m).__name__ == "LabelEmbedding":
                m.dropout_prob = 0.0
        return fresh.float().to(self.device).requires_grad_(True).train()

    def set_resolution(self, resolution: int) -> None:
        """Sample ``resolution`` x ``resolution`` images: the latent size of a teacher that samples any size
        (SD3, FLUX.1: a multiple of the VAE factor times the 2x2 patch), and the dynamic shift's mu of its
        token count, as their stock pipelines do for ``height`` / ``width``."""
        step = self.vae_scale_factor * 2
        if not backbones.any_size(self.model) or not self.is_latent:
            raise ConfigError(f"data.resolution={resolution}: {type(self.model).__name__} samples one size "
                              f"({self.image_shape[-1]} px); remove data.resolution.")
        if resolution % step:
            raise ConfigError(f"data.resolution={resolution} must be a multiple of {step} (the VAE factor x "
                              "the 2x2 patch) for this teacher.")
        self.sample_shape = [self.sample_shape[0], resolution // self.vae_scale_factor,
                             resolution // self.vae_scale_factor]
        self.schedule = NoiseSchedule.from_scheduler(self.scheduler, image_seq_len=image_tokens(self.model,
                                                                                              self.sample_shape))
        self.denoiser.schedule = self.schedule

    @property
    def export_size(self) -> dict:
        """The latent size a text-to-image export samples at, for networks that sample any size (SD3,
        FLUX.1); empty for the others (their own ``sample_size``)."""
        return {"sample_size": self.sample_shape[-1]} if backbones.any_size(self.model) else {}

    @property
    def network_name(self) -> str:
        """The network's component name in a pipeline: ``unet``, or ``transformer`` (DiT, SD3)."""
        return self.network_subfolder if self.network_subfolder in ("unet", "transformer") else "unet"

    @property
    def weights(self) -> torch.nn.Module:
        """The module holding the network's weights (with LoRA students, ``model`` is a view of a shared
        base)."""
        return getattr(self.model, "shared_base", self.model)

    @property
    def device(self):
        net = self.weights
        return next(iter(net.buffers()), next(iter(net.parameters()), torch.zeros(1))).device

    @property
    def dtype(self) -> torch.dtype | None:
        """The network's reduced precision (bf16 / fp16) when it was loaded in one, else None (inputs
        kept)."""
        p = next(iter(self.weights.parameters()), None)
        return p.dtype if p is not None and p.dtype in (torch.bfloat16, torch.float16) else None

    @property
    def is_latent(self) -> bool:
        return self.vae is not None

    @property
    def is_text(self) -> bool:
        return bool(self.text_encoders)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.is_latent else 1

    @property
    def image_shape(self) -> list[int]:
        """Shape of one image: the sample shape in pixel space; (3, H f, W f) for a latent teacher."""
        if not self.is_latent:
            return list(self.sample_shape)
        f = self.vae_scale_factor
        return [self.vae.config.in_channels, self.sample_shape[1] * f, self.sample_shape[2] * f]

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> training space: a sample of the VAE posterior, shifted and scaled
        (identity for pixel teachers)."""
        if not self.is_latent:
            return images
        cfg = self.vae.config
        dist = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32,
                            device=generator.device if generator is not None else "cpu").to(dist.mean.device)
        z = (dist.mean.float() + dist.std.float() * noise)
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean, device=z.device).view(1, -1, 1, 1)
            std = torch.tensor(cfg.latents_std, device=z.device).view(1, -1, 1, 1)
            return (z - mean) * cfg.scaling_factor / std
        return (z - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Training space -> images in [-1, 1] (identity for pixel teachers)."""
        if not self.is_latent:
            return x
        from .text_encoding import latents_to_images

        return latents_to_images(self.vae, x).float()

    # ------------------------------------------------------------------ conditions
    def condition(self, class_labels=None, prompts: list[str] | None = None,
                  negative_prompts: list[str] | None = None, batch: int | None = None) -> Condition | None:
        """The :class:`Condition` this teacher takes, with its null attached.

        Class teachers: ``class_labels`` (None: the null class for ``batch`` rows). Text teachers:
        ``prompts`` (None: the empty prompt for ``batch`` rows) and optional ``negative_prompts`` as the
        null. Unconditional teachers: None.
        """
        if self.is_text:
            if class_labels is not None:
                raise ValueError("This is a text-to-image teacher: pass prompts=..., not class_labels.")
            if prompts is None:
                prompts = [""] * (batch or 1)
            cond = self._encode_prompts(list(prompts))
            if negative_prompts is None:
                null = self._null_text()
            else:
                null = self._encode_prompts(list(negative_prompts))
            cond.null = null
            return cond
        if prompts is not None:
            raise ValueError(f"Teacher {self.source!r} is not a text-to-image teacher; it takes no prompts.")
        if not self.num_classes:
            if class_labels is not None:
                raise ValueError(f"Teacher {self.source!r} is unconditional; it takes no class labels.")
            return None
        null = self._null_class()
        if class_labels is None:
            return Condition(class_labels=torch.full((batch or 1,), self.num_classes, device=self.device),
                             null=null)
        labels = torch.as_tensor(class_labels, device=self.device).long().reshape(-1)
        if batch is not None and labels.numel() == 1:
            labels = labels.expand(batch)
        return Condition(class_labels=labels, null=null)

    def _null_class(self) -> Condition:
        """The null-class condition on the teacher's device (made once: no host copy per batch)."""
        device = self.device
        if getattr(self, "_null_cache", None) is None or self._null_cache.class_labels.device != device:
            self._null_cache = Condition(class_labels=torch.tensor([self.num_classes], device=device))
        return self._null_cache

    def _null_text(self) -> Condition:
        null = self._encode_prompts([""])
        if self.force_zeros_for_empty_prompt:
            null = null.map(torch.zeros_like) if null.time_ids is None else Condition(
                embeds=torch.zeros_like(null.embeds), pooled=torch.zeros_like(null.pooled),
                time_ids=null.time_ids)
        return null

    @torch.no_grad()
    def _encode_prompts(self, prompts: list[str]) -> Condition:
        """Encode ``prompts`` (each distinct prompt once, repeated prompts from the LRU cache)."""
        from .text_encoding import (
            encode_prompt,
            encode_prompt_flux,
            encode_prompt_sd3,
            encode_prompt_t5,
            sdxl_time_ids,
        )

        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            style, mask = backbones.text_encoding(self.model), None
            if style == "sd3":
                embeds, pooled = encode_prompt_sd3(self.tokenizers, self.text_encoders, missing, self.device,
                                                   self.model.config.joint_attention_dim)
            elif style == "flux":
                embeds, pooled = encode_prompt_flux(self.tokenizers, self.text_encoders, missing, self.device)
            elif style == "t5":
                (embeds, mask), pooled = encode_prompt_t5(self.tokenizers, self.text_encoders, missing,
                                                          self.device), None
            else:
                embeds, pooled = encode_prompt(self.tokenizers, self.text_encoders, missing, self.device)
            for i, p in enumerate(missing):
                self._cache[p] = (embeds[i], None if pooled is None else pooled[i],
                                  None if mask is None else mask[i])
        for p in prompts:
            self._cache.move_to_end(p)
        rows = [self._cache[p] for p in prompts]
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        embeds = torch.stack([r[0] for r in rows])
        pooled = torch.stack([r[1] for r in rows]) if rows[0][1] is not None else None
        mask = torch.stack([r[2] for r in rows]) if rows[0][2] is not None else None
        time_ids = None
        if getattr(self.model.config, "addition_embed_type", None) == "text_time":
            h, w = self.image_shape[1:]
            time_ids = sdxl_time_ids(h, w, len(prompts), self.device).to(embeds.dtype)
        return Condition(embeds=embeds, pooled=pooled, time_ids=time_ids, mask=mask)

    # ------------------------------------------------------------------ evaluation
    def _prepare(self, x_t: torch.Tensor, cond: Condition | None):
        """The network input in the teacher's dtype and the condition on its device; a missing condition on
        a conditional teacher is its null (unguided)."""
        cond = as_condition(cond)
        b = x_t.shape[0]
        if cond is None and (self.num_classes or self.is_text):
            cond = self.condition(batch=b)
        x_in = x_t.to(self.dtype) if self.dtype is not None else x_t
        if cond is not None:
            cond = cond.expand(b).to(x_t.device,
                                     self.dtype or (torch.float32 if cond.kind == "text" else None))
        return x_in, cond

    def network_output(self, x_t: torch.Tensor, t, cond: Condition | None = None,
                       guidance_scale=None) -> torch.Tensor:
        """Raw output (in ``prediction_type``), classifier-free guided by ``guidance_scale`` (default: the
        scale bound to ``self.denoiser``, none unless a trainer bound ``teacher.guidance_scale``)."""
        return self.denoiser.output(x_t, t, cond, guidance_scale)

    def predict_x0(self, x_t, t, cond: Condition | None = None, guidance_scale=None) -> torch.Tensor:
        return self.denoiser.x0(x_t, t, cond, guidance_scale=guidance_scale)

    def score(self, x_t, t, cond: Condition | None = None, guidance_scale=None) -> torch.Tensor:
        return self.denoiser.score(x_t, t, cond, guidance_scale=guidance_scale)

    @torch.no_grad()
    def sample(self, n: int, num_steps: int = 50, generator: torch.Generator | None = None,
               cond: Condition | None = None, guidance_scale=None, stochastic: bool = False,
               noise: torch.Tensor | None = None, stock: bool | None = None) -> torch.Tensor:
        """DDIM samples in training space (the baseline every student is compared with; for latent teachers,
        also the clean latents of prompts-only training data): vp teachers as diffusers' ``DDIMScheduler``
        (trailing spacing, no clipping, the teacher config's ``set_alpha_to_one``) at any N; edm
        and flow teachers on their own scheduler's grid, where DDIM is EDM's / the flow's Euler step.
        ``noise``: the starting z (default: drawn from ``generator``): x_T = z on vp, sigma_max z on edm,
        pure noise z at s = 1 on flow. ``stock``: instead, the teacher's own diffusers scheduler stepped as
        its stock pipeline steps it (:meth:`sample_stock`); None: so for the transformer teachers that have a
        stock pipeline (DiT, SD3, FLUX.1), unless ``stochastic``."""
        from .sampling import ddim_rows, sample_ddim, sample_meng_stochastic, trailing_timesteps, vp_grid

        shape = (n, *self.sample_shape)
        gen_device = generator.device if generator is not None else "cpu"
        x = (torch.randn(shape, generator=generator, device=gen_device) if noise is None
             else noise).to(self.device)
        if stock is None:
            stock = backbones.stock_pipeline(self.model) is not None and not stochastic
        if stock:
            return self.sample_stock(x, num_steps, cond, guidance_scale, generator)
        sched = self.schedule
        sampler = sample_meng_stochastic if stochastic else sample_ddim
        if sched.kind == "vp":
            T = sched.num_train_timesteps
            if stochastic:
                times = vp_grid(sched.alphas_cumprod, trailing_timesteps(num_steps, T))
            else:  # diffusers' DDIMScheduler (trailing) with the teacher's own set_alpha_to_one, at any N
                final = diffusers.DDIMScheduler.from_config(self.scheduler.config).final_alpha_cumprod
                times = ddim_rows(sched.alphas_cumprod, num_steps, float(final))

            def denoise(x_t, i, k):
                return self.predict_x0(x_t, torch.tensor(int(k) / (T - 1)), cond, guidance_scale)

            return sampler(denoise, x, times, generator=generator)
        # the same sampler on the variance-preserving coordinates x_vp = x_t / scale at equal log-SNR
        ts = sched.sampling_times(num_steps)
        abar, scale = sched.vp_equivalent(ts)
        times = torch.stack([torch.arange(len(ts), dtype=torch.float64), abar], dim=1)

        def denoise_vp(x_vp, i, _):
            return self.predict_x0(x_vp * float(scale[i]), ts[i], cond, guidance_scale)

        x = x * float(sched.sigma(ts[0]) / scale[0])  # sigma(t_0) z, in vp coordinates
        return sampler(denoise_vp, x, times, generator=generator)

    @torch.no_grad()
    def sample_stock(self, x: torch.Tensor, num_steps: int, cond: Condition | None = None,
                     guidance_scale=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """The loop of diffusers' own pipelines (DiTPipeline, StableDiffusion3Pipeline, ...) from the noise
        ``x``: the teacher's scheduler after ``set_timesteps(num_steps)`` (with the dynamic shift's mu of its
        image token count), the network's raw output at each of its timesteps, classifier-free guided, and
        the scheduler's ``step``."""
        sched = copy.deepcopy(self.scheduler)
        mu = (self.schedule.scheduler_config or {}).get("mu")
        kwargs = {"mu": mu} if mu is not None else {}
        grid = backbones.stock_sigmas(self.model, num_steps)
        if grid is not None:
            kwargs["sigmas"] = grid
        sched.set_timesteps(num_steps, device=x.device, **kwargs)
        x = x * getattr(sched, "init_noise_sigma", 1.0)
        b = x.shape[0]
        sigmas = getattr(sched, "sigmas", None)
        for i, t in enumerate(sched.timesteps):
            x_in = x
            if self.schedule.kind == "vp":  # (a VP Euler-type scheduler's input scaling; identity for DDIM)
                tc, x_in = self.schedule.t_from_timestep(t.item()), sched.scale_model_input(x, t)
            else:  # the step's own noise level; the Denoiser applies EDM's c_in itself
                s = sigmas[i].double()
                tc = self.schedule.t_from_sigma(1 - s if self.schedule.invert_sigmas else s)
            out = self.denoiser.output(x_in, tc, cond, guidance_scale, timestep=t.expand(b).to(x.device))
            x = sched.step(out.to(x.dtype), t, x, generator=generator).prev_sample
        return x

    def frozen_components(self, reload: bool = True) -> dict:
        """The VAE, text encoder(s) and tokenizer(s) as pipeline components (a class-conditional latent
        teacher's: the VAE alone); with ``reload`` re-read from the teacher folder in their stored precision
        (an export should not keep bf16 copies)."""
        if not self.is_latent:
            return {}
        if reload and self.folder is not None:
            index = json.loads((self.folder / "model_index.json").read_text())
            parts = load_latent_parts(self.folder, index, "cpu", None)
        else:
            parts = {"vae": self.vae, "text_encoders": self.text_encoders, "tokenizers": self.tokenizers}
        encs, toks = parts["text_encoders"], parts["tokenizers"]
        if not encs:
            return {"vae": parts["vae"]}
        out = {"vae": parts["vae"], "text_encoder": encs[0], "tokenizer": toks[0]}
        for i, suffix in ((1, "_2"), (2, "_3")):
            out[f"text_encoder{suffix}"] = encs[i] if len(encs) > i else None
            out[f"tokenizer{suffix}"] = toks[i] if len(toks) > i else None
        return out


def analytic_teacher(name: str, prediction_type: str = "epsilon", beta_schedule: str = "squaredcos_cap_v2",
                     conditional: bool = False, noise: str = "vp", flow_shift: float = 1.0) -> Teacher:
    """The exact Gaussian-mixture teacher of a toy data spec (``toy:gaussians8`` / ``toy:gaussians25``),
    written as a ``noise`` = vp (DDPMScheduler), edm (EDMEulerScheduler) or flow
    (FlowMatchEulerDiscreteScheduler with ``flow_shift``) model."""
    from .data import toy_mixture

    mix = toy_mixture(name.removeprefix("toy:").removeprefix("analytic:"))
    if not conditional:
        mix.pop("component_classes")
    if noise == "flow":
        prediction_type = "flow"
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=flow_shift)
    elif noise == "edm":
        scheduler = diffusers.EDMEulerScheduler(prediction_type=prediction_type)
    else:
        scheduler = diffusers.DDPMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type)
    model = GaussianMixtureTeacher(**mix, beta_schedule=beta_schedule, prediction_type=prediction_type,
                                   noise=noise)
    return Teacher.from_model(model, scheduler, source=name)


__all__ = ["Teacher", "GaussianMixtureTeacher", "analytic_teacher", "component_class"]

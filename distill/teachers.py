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
from contextlib import contextmanager
from pathlib import Path

import diffusers
import torch

from .conditioning import Condition, as_condition
from .denoiser import Denoiser
from .errors import ConfigError
from .export import read_model_index, resolve_pretrained
from .models import EXPORT_NAMES, GaussianMixtureTeacher
from .noise import NoiseSchedule

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
        self.sample_shape = list(sample_shape) if sample_shape is not None else _infer_shape(model)
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
    def from_model(cls, model, scheduler, **kwargs) -> Teacher:
        return cls(model, NoiseSchedule.from_scheduler(scheduler), num_classes=_infer_classes(model),
                   scheduler=scheduler, **kwargs)

    @classmethod
    def from_pretrained(cls, path_or_id: str, device: str | torch.device = "cpu",
                        dtype=torch.float32) -> Teacher:
        """A diffusers pipeline folder or Hub id (``unet`` + ``scheduler``; for text-to-image also ``vae``,
        ``text_encoder`` and ``tokenizer``, SDXL's ``text_encoder_2`` / ``tokenizer_2``), or
        ``builtin:digits``. Every part is loaded frozen in ``dtype``."""
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
        with _damaged(folder, net_name):
            model = (component_class(index[net_name])
                     .from_pretrained(folder / net_name, dtype=dtype).to(device))
        with _damaged(folder, "scheduler"):
            scheduler = getattr(diffusers, index["scheduler"][1]).from_pretrained(folder / "scheduler")
        text = {}
        if "text_encoder" in index or "vae" in index:
            with _damaged(folder, "vae / text encoder / tokenizer"):
                text = _load_text_parts(folder, index, device, dtype)
        return cls.from_model(model, scheduler, source=src, folder=folder, network_subfolder=net_name, **text)

    # ------------------------------------------------------------------ space
    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    def stored_network(self) -> torch.nn.Module:
        """A trainable fp32 copy of the network as stored (re-read from the teacher's folder, so a teacher
        held in bf16 gives the unrounded weights; a teacher built in memory is copied), without any LoRA
        layer."""
        net = self.weights
        if self.folder is not None and self.network_subfolder is not None:
            fresh = type(net).from_pretrained(self.folder / self.network_subfolder, dtype=torch.float32)
        elif not any("lora_" in k for k in net.state_dict()):
            fresh = copy.deepcopy(net)
        else:  # a LoRA-carrying network: its own weights sit under ``base_layer``
            fresh = type(net).from_config(net.config)
            fresh.load_state_dict({k.replace(".base_layer.", "."): v for k, v in net.state_dict().items()
                                   if "lora_" not in k})
        return fresh.float().to(self.device).requires_grad_(True).train()

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
        from .text_encoding import encode_prompt, sdxl_time_ids

        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            embeds, pooled = encode_prompt(self.tokenizers, self.text_encoders, missing, self.device)
            for i, p in enumerate(missing):
                self._cache[p] = (embeds[i], None if pooled is None else pooled[i])
        for p in prompts:
            self._cache.move_to_end(p)
        rows = [self._cache[p] for p in prompts]
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        embeds = torch.stack([r[0] for r in rows])
        pooled = torch.stack([r[1] for r in rows]) if rows[0][1] is not None else None
        time_ids = None
        if getattr(self.model.config, "addition_embed_type", None) == "text_time":
            h, w = self.image_shape[1:]
            time_ids = sdxl_time_ids(h, w, len(prompts), self.device).to(embeds.dtype)
        return Condition(embeds=embeds, pooled=pooled, time_ids=time_ids)

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
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM samples in training space (the baseline every student is compared with; for latent teachers,
        also the clean latents of prompts-only training data): vp teachers on diffusers' trailing grid; edm
        and flow teachers on their own scheduler's grid, where DDIM is EDM's / the flow's Euler step.
        ``noise``: the starting z (default: drawn from ``generator``): x_T = z on vp, sigma_max z on edm,
        pure noise z at s = 1 on flow."""
        from .sampling import sample_ddim, sample_meng_stochastic, trailing_timesteps, vp_grid

        shape = (n, *self.sample_shape)
        gen_device = generator.device if generator is not None else "cpu"
        x = (torch.randn(shape, generator=generator, device=gen_device) if noise is None
             else noise).to(self.device)
        sched = self.schedule
        sampler = sample_meng_stochastic if stochastic else sample_ddim
        if sched.kind == "vp":
            T = sched.num_train_timesteps
            times = vp_grid(sched.alphas_cumprod, trailing_timesteps(num_steps, T))

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

    def frozen_components(self, reload: bool = True) -> dict:
        """The VAE, text encoder(s) and tokenizer(s) as pipeline components; with ``reload`` re-read
        from the teacher folder in their stored precision (an export should not keep bf16 copies)."""
        if not self.is_latent:
            return {}
        if reload and self.folder is not None:
            index = json.loads((self.folder / "model_index.json").read_text())
            parts = _load_text_parts(self.folder, index, "cpu", None)
        else:
            parts = {"vae": self.vae, "text_encoders": self.text_encoders, "tokenizers": self.tokenizers}
        encs, toks = parts["text_encoders"], parts["tokenizers"]
        return {"vae": parts["vae"], "text_encoder": encs[0], "tokenizer": toks[0],
                "text_encoder_2": encs[1] if len(encs) > 1 else None,
                "tokenizer_2": toks[1] if len(toks) > 1 else None}


def _load_text_parts(folder: Path, index: dict, device, dtype) -> dict:
    """VAE, text encoder(s) and tokenizer(s) of a Stable-Diffusion-format folder, frozen, in ``dtype``
    (None: as stored)."""
    import transformers

    missing = [k for k in ("vae", "text_encoder", "tokenizer") if k not in index or index[k][0] is None]
    if missing:
        raise ConfigError(f"Teacher folder {str(folder)!r} looks like a text-to-image pipeline but has no "
                          f"{missing}; a Stable-Diffusion-format folder has unet, vae, text_encoder, "
                          "tokenizer and scheduler.")
    kw = {} if dtype is None else {"dtype": dtype}
    vae = getattr(diffusers, index["vae"][1]).from_pretrained(folder / "vae", **kw).to(device)
    encs, toks = [], []
    for suffix in ("", "_2"):
        enc_spec, tok_spec = index.get(f"text_encoder{suffix}"), index.get(f"tokenizer{suffix}")
        if not enc_spec or enc_spec[0] is None:
            continue
        encs.append(getattr(transformers, enc_spec[1]).from_pretrained(folder / f"text_encoder{suffix}", **kw)
                    .to(device).eval().requires_grad_(False))
        toks.append(getattr(transformers, tok_spec[1]).from_pretrained(folder / f"tokenizer{suffix}"))
    force_zeros = bool(index.get("force_zeros_for_empty_prompt", False))
    return {"vae": vae.eval().requires_grad_(False), "text_encoders": encs, "tokenizers": toks,
            "force_zeros_for_empty_prompt": force_zeros}


@contextmanager
def _damaged(folder: Path, part: str):
    """A component that fails to load (truncated safetensors, bad config.json) is named with its folder."""
    try:
        yield
    except (ConfigError, FileNotFoundError):
        raise
    except Exception as err:  # safetensors, json, diffusers / transformers loading errors
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConfigError(f"Could not load the teacher's {part} from {str(folder)!r} ({type(err).__name__}: "
                          f"{first[:300]}): a file there is damaged or incomplete; download or export the "
                          "folder again.") from err


def component_class(spec):
    """The class a ``model_index.json`` entry ``[library, class name]`` names (diffusers' or distill's)."""
    lib, name = spec
    if lib in ("diffusers",):
        return getattr(diffusers, name)
    for module, export_name in EXPORT_NAMES.items():
        if lib == export_name or lib == module.__name__:
            return getattr(module, name)
    raise ConfigError(f"Teacher network class {spec} is neither a diffusers class nor a distill model.")


def _infer_shape(model) -> list[int]:
    cfg = model.config
    if isinstance(model, GaussianMixtureTeacher):
        return list(model.sample_shape)
    if hasattr(cfg, "in_channels") and hasattr(cfg, "sample_size"):
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return [cfg.in_channels, size, size]
    if hasattr(cfg, "data_dim"):
        return list(cfg.sample_shape) if getattr(cfg, "sample_shape", None) else [cfg.data_dim]
    raise ConfigError(f"Cannot infer the sample shape of {type(model).__name__}; pass sample_shape.")


def _infer_classes(model) -> int:
    if isinstance(model, GaussianMixtureTeacher):
        return model.num_classes
    n = getattr(model.config, "num_class_embeds", None)
    return int(n) - 1 if n else 0


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

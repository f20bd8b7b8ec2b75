"""Teachers: one frozen-denoiser API for every trainer (DESIGN.md s3).

``Teacher.predict_x0(x_t, t, class_labels, guidance_scale)`` evaluates a diffusers denoiser at
continuous time ``t`` (see :mod:`distill.noise`) and returns its clean-sample prediction, with
classifier-free guidance in diffusers' convention

    out = out_uncond + guidance_scale (out_cond - out_uncond)            (w_paper = guidance_scale - 1)

(Ho & Salimans 2022, eq. 6). Guidance is applied to the raw network output; because every
parameterisation is affine in the output at fixed (x_t, t), the result is the same in epsilon, x0
or v. The null condition is the extra last class embedding (label ``num_classes``).

Latent and text teachers (``UNet2DConditionModel`` + VAE + text encoder) slot in through
``encoder_hidden_states`` in ``cond_kwargs`` and ``vae`` for the pixel <-> latent maps.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch

from .export import resolve_pretrained
from .models import EXPORT_NAMES, GaussianMixtureTeacher
from .noise import NoiseSchedule

BUILTIN = {"builtin:digits": "digits_teacher", "builtin:digits-cond": "digits_teacher_cond"}
ASSETS = Path(__file__).parent / "assets"


class Teacher:
    """A frozen denoiser + schedule with one API at continuous time.

    Args:
        model: a diffusers-style denoiser: ``model(x, timestep, class_labels=...).sample``.
        schedule: its :class:`NoiseSchedule` (``prediction_type`` included).
        num_classes: classes of a conditional teacher; label ``num_classes`` is the null class.
        sample_shape: shape of one sample (e.g. [1, 16, 16] or [2]).
        scheduler: the diffusers scheduler it came with (kept for export).
    """

    def __init__(self, model, schedule: NoiseSchedule, num_classes: int = 0, sample_shape=None, scheduler=None,
                 source: str | None = None):
        self.model = model.eval().requires_grad_(False)
        self.schedule = schedule
        self.num_classes = int(num_classes)
        self.sample_shape = list(sample_shape) if sample_shape is not None else _infer_shape(model)
        self.scheduler = scheduler
        self.source = source

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model, scheduler, **kwargs) -> Teacher:
        return cls(model, NoiseSchedule.from_scheduler(scheduler), num_classes=_infer_classes(model),
                   scheduler=scheduler, **kwargs)

    @classmethod
    def from_pretrained(cls, path_or_id: str, device: str | torch.device = "cpu", dtype=torch.float32) -> Teacher:
        """A diffusers pipeline folder (``unet`` + ``scheduler``), a Hub id, or ``builtin:digits``."""
        src = str(path_or_id)
        if src in BUILTIN:
            folder = ASSETS / BUILTIN[src]
            if not folder.is_dir():
                raise FileNotFoundError(f"The builtin teacher {src!r} is missing at {folder}; reinstall distill.")
        else:
            folder = resolve_pretrained(src)
        index_file = folder / "model_index.json"
        if not index_file.is_file():
            raise FileNotFoundError(f"Teacher folder {str(folder)!r} has no model_index.json.")
        index = json.loads(index_file.read_text())
        net_name = next((k for k in ("unet", "transformer", "generator") if k in index), None)
        if net_name is None or "scheduler" not in index:
            raise ValueError(f"Teacher folder {str(folder)!r} needs a 'unet' (or 'transformer') and a 'scheduler'; "
                             f"it has {sorted(k for k in index if not k.startswith('_'))}.")
        model = _component_class(index[net_name]).from_pretrained(folder / net_name).to(device, dtype)
        scheduler = getattr(diffusers, index["scheduler"][1]).from_pretrained(folder / "scheduler")
        return cls.from_model(model, scheduler, source=src)

    # ------------------------------------------------------------------ evaluation
    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    @property
    def device(self):
        return next(iter(self.model.buffers()), next(iter(self.model.parameters()), torch.zeros(1))).device

    def _timesteps(self, t, batch: int, device) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        return self.schedule.timestep(t).to(device)

    def _labels(self, class_labels, batch: int, device):
        if not self.num_classes:
            return None
        if class_labels is None:
            return torch.full((batch,), self.num_classes, device=device, dtype=torch.long)
        labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
        return labels.expand(batch) if labels.numel() == 1 else labels

    def network_output(self, x_t: torch.Tensor, t, class_labels=None, guidance_scale: float | None = None,
                       **cond_kwargs) -> torch.Tensor:
        """Raw output (in ``prediction_type``), classifier-free guided when ``guidance_scale`` is set."""
        b = x_t.shape[0]
        ts = self._timesteps(t, b, x_t.device)
        labels = self._labels(class_labels, b, x_t.device)
        guided = guidance_scale is not None and labels is not None and (
            torch.as_tensor(guidance_scale).numel() > 1 or float(guidance_scale) != 1.0)  # per-sample scales allowed
        if not guided:
            kw = {"class_labels": labels} if labels is not None else {}
            return self.model(x_t, ts, **kw, **cond_kwargs).sample
        null = torch.full_like(labels, self.num_classes)
        out = self.model(torch.cat([x_t, x_t]), torch.cat([ts, ts]), class_labels=torch.cat([labels, null]),
                         **cond_kwargs).sample
        cond, uncond = out.chunk(2)
        w = torch.as_tensor(guidance_scale, device=x_t.device, dtype=out.dtype)
        w = w.reshape(-1, *([1] * (x_t.ndim - 1))) if w.ndim else w
        return uncond + w * (cond - uncond)

    def predict_x0(self, x_t, t, class_labels=None, guidance_scale=None, **cond_kwargs) -> torch.Tensor:
        out = self.network_output(x_t, t, class_labels, guidance_scale, **cond_kwargs)
        return self.schedule.to_x0_eps(out, x_t, t)[0].to(x_t.dtype)

    def epsilon(self, x_t, t, class_labels=None, guidance_scale=None, **cond_kwargs) -> torch.Tensor:
        out = self.network_output(x_t, t, class_labels, guidance_scale, **cond_kwargs)
        return self.schedule.to_x0_eps(out, x_t, t)[1].to(x_t.dtype)

    def score(self, x_t, t, class_labels=None, guidance_scale=None, **cond_kwargs) -> torch.Tensor:
        x0 = self.predict_x0(x_t, t, class_labels, guidance_scale, **cond_kwargs)
        return self.schedule.score_from_x0(x0, x_t, t).to(x_t.dtype)

    @torch.no_grad()
    def sample(self, n: int, num_steps: int = 50, generator: torch.Generator | None = None, class_labels=None,
               guidance_scale=None, stochastic: bool = False) -> torch.Tensor:
        """DDIM samples on diffusers' trailing grid (the baseline every student is compared with)."""
        from .pipelines.few_step import sample_loop, trailing_timesteps

        shape = (n, *self.sample_shape)
        x = torch.randn(shape, generator=generator).to(self.device)
        T = self.schedule.num_train_timesteps
        steps = trailing_timesteps(num_steps, T)
        ac = self.schedule.alphas_cumprod

        def denoise(x_t, k, alpha, sigma):
            return self.predict_x0(x_t, torch.tensor(k / (T - 1)), class_labels, guidance_scale)

        return sample_loop(denoise, x, steps, ac, stochastic=stochastic, generator=generator)


def _component_class(spec):
    lib, name = spec
    if lib in ("diffusers",):
        return getattr(diffusers, name)
    for module, export_name in EXPORT_NAMES.items():
        if lib == export_name or lib == module.__name__:
            return getattr(module, name)
    raise ValueError(f"Teacher network class {spec} is neither a diffusers class nor a distill model.")


def _infer_shape(model) -> list[int]:
    cfg = model.config
    if isinstance(model, GaussianMixtureTeacher):
        return list(model.sample_shape)
    if hasattr(cfg, "in_channels") and hasattr(cfg, "sample_size"):
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return [cfg.in_channels, size, size]
    if hasattr(cfg, "data_dim"):
        return list(cfg.sample_shape) if getattr(cfg, "sample_shape", None) else [cfg.data_dim]
    raise ValueError(f"Cannot infer the sample shape of {type(model).__name__}; pass sample_shape.")


def _infer_classes(model) -> int:
    if isinstance(model, GaussianMixtureTeacher):
        return model.num_classes
    n = getattr(model.config, "num_class_embeds", None)
    return int(n) - 1 if n else 0


def analytic_teacher(name: str, prediction_type: str = "epsilon", beta_schedule: str = "squaredcos_cap_v2",
                     conditional: bool = False) -> Teacher:
    """The exact Gaussian-mixture teacher of a toy data spec (``toy:gaussians8`` / ``toy:gaussians25``)."""
    from .data import toy_mixture

    mix = toy_mixture(name.removeprefix("toy:").removeprefix("analytic:"))
    if not conditional:
        mix.pop("component_classes")
    model = GaussianMixtureTeacher(**mix, beta_schedule=beta_schedule, prediction_type=prediction_type)
    scheduler = diffusers.DDPMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type)
    return Teacher.from_model(model, scheduler, source=name)


__all__ = ["Teacher", "GaussianMixtureTeacher", "analytic_teacher"]

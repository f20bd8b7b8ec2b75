"""Batches of a run: the teacher and the data (loaded, checked against each other, placed on the device), the
seeded generators of every (step, micro-step, rank), and one batch in the teacher's space (conditions, VAE
encoding, the teacher's own samples for prompts-only data).

Reproducibility: data indices and noise of step s, micro-step m on rank r come from generators seeded by
(seed, s, m, r). A resumed run therefore sees exactly the batches and noise of an uninterrupted one, and its
final weights are bitwise equal on CPU.
"""

from __future__ import annotations

import torch

from .. import backbones
from ..config import Config
from ..data import StreamedImages, cache_images
from ..errors import ConfigError
from ..teachers import Teacher, analytic_teacher


def load_teacher(cfg: Config, device) -> Teacher:
    """The frozen teacher, in bf16 when ``train.mixed_precision=bf16`` (its parts are never trained), its
    denoiser guided by ``teacher.guidance_scale``."""
    path = cfg.teacher.path
    if path.startswith("analytic:"):
        teacher = analytic_teacher(path, prediction_type=cfg.teacher.prediction_type,
                                   beta_schedule=cfg.teacher.beta_schedule,
                                   conditional=cfg.teacher.conditional, noise=cfg.teacher.noise,
                                   flow_shift=cfg.teacher.flow_shift)
        teacher.model.to(device)
    else:
        dtype = torch.bfloat16 if cfg.train.mixed_precision == "bf16" else torch.float32
        teacher = Teacher.from_pretrained(path, device=device, dtype=dtype,
                                          num_classes=cfg.teacher.num_classes)
        if cfg.data.resolution is not None and backbones.any_size(teacher.model):
            teacher.set_resolution(cfg.data.resolution)  # SD3 / FLUX.1 sample the size the config asks for
    if cfg.teacher.guidance_scale is not None and not (teacher.num_classes or teacher.is_text):
        raise ConfigError(f"teacher.guidance_scale={cfg.teacher.guidance_scale} needs a class-conditional "
                          f"teacher with a null class or a text-to-image teacher; {path!r} is unconditional. "
                          "Remove teacher.guidance_scale.")
    true_cfg = cfg.teacher.true_cfg_scale
    if true_cfg is not None and not backbones.embeds_guidance(teacher.model):
        raise ConfigError(f"teacher.true_cfg_scale={true_cfg} is CFG on top of an embedded guidance input "
                          f"(FLUX.1-dev); {path!r} has none: use teacher.guidance_scale={true_cfg} instead.")
    teacher.denoiser.guidance_scale = cfg.teacher.guidance_scale  # bound once: every teacher pass is guided
    teacher.denoiser.true_cfg_scale = true_cfg
    return teacher



class BatchMaker:
    """The data part of :class:`~distill.engine.loop.DistillationTrainer`."""

    uses_teacher = True  # the teacher is loaded before the data (its resolution, space and conditioning)
    needs_clean_samples = False  # a method that noises clean samples (data, or the teacher's own samples)

    def randn(self, *shape, like: torch.Tensor | None = None) -> torch.Tensor:
        """Noise drawn on the training device from this micro-step's generator (no host copy)."""
        dtype = like.dtype if like is not None else torch.float32
        return torch.randn(*shape, generator=self.rng, device=self.rng.device, dtype=dtype).to(self.device)

    def rand(self, *shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.rand(*shape, generator=self.rng, device=self.rng.device, dtype=dtype).to(self.device)

    @property
    def host_rng(self) -> torch.Generator:
        """A CPU generator of this micro-step for draws the host needs (prompt rows, MAR's masking ratio): on
        a CPU run the one generator itself, so that every draw comes from one stream as before."""
        if self.rng is None or self.rng.device.type == "cpu":
            return self.rng
        return self._host_rng

    def step_seed(self, step: int, micro: int) -> int:
        return (self.config.train.seed * 1_000_003 + step * 1009 + micro * 17
                + self.accelerator.process_index * 7919) % (2**63)

    def step_generator(self, step: int, micro: int) -> torch.Generator:
        """The generator of step ``step``, micro-step ``micro`` on this process, on the training device,
        seeded by (seed, step, micro-step, rank): a resumed run draws exactly the noise of an uninterrupted
        one."""
        seed = self.step_seed(step, micro)
        if self.device.type != "cpu":
            self._host_rng = torch.Generator().manual_seed(seed)
        return torch.Generator(device=self.device).manual_seed(seed)

    def place_data(self) -> None:
        """In-memory data (toys, digits, and image sets small enough, decoded once: ``data.device_cache_gib``)
        becomes one tensor on the training device, so a batch is an index on the device. Larger image sets are
        decoded ahead by ``data.num_workers`` DataLoader workers into pinned memory. A method that needs no
        clean samples (SIM, MSD) never touches the images: its batches are labels or prompts."""
        cached = (cache_images(self.data, self.config.data.device_cache_gib) if self.needs_clean_samples
                  else None)
        if cached is not None:
            self.data = cached
        if hasattr(self.data, "x"):
            self._data_x = self.data.x.to(self.device)
        elif self.needs_clean_samples and getattr(self.data, "has_images", False):
            d, b, rows = self.config.data, self.config.train.batch_size, self.batch_indices
            self._stream = StreamedImages(
                self.data,
                lambda step, micro: rows(torch.Generator().manual_seed(self.step_seed(step, micro)), b),
                self.config.train.gradient_accumulation_steps, self.max_steps, d.num_workers,
                pin_memory=self.device.type == "cuda")
        labels = self.data.labels if hasattr(self.data, "labels") else self.data.all_labels()
        self._data_labels = labels.to(self.device)
        self._unlabelled = bool((labels < 0).any())

    def teacher_image_size(self, resolution: int | None,
                           channels: int | None) -> tuple[int | None, int | None]:
        """The data's resolution and channels: the teacher's images (pixel teachers: its sample shape; latent
        teachers: UNet size x VAE factor). A ``data.resolution`` / ``data.channels`` that disagrees is
        refused."""
        shape, path = self.teacher.image_shape, self.config.teacher.path
        if len(shape) != 3:
            return resolution, channels
        for key, given, own in (("data.resolution", resolution, shape[-1]),
                                ("data.channels", channels, shape[0])):
            if given is not None and given != own:
                raise ConfigError(f"{key}={given} does not match the teacher: {path!r} makes "
                                  f"{'x'.join(map(str, shape))} images (channels x height x width). Remove "
                                  f"{key} (it defaults to the teacher's) or set {key}={own}.")
        return shape[-1], shape[0]

    def check_data(self) -> None:
        """Refuse data that cannot condition this teacher, or whose samples are not the teacher's shape
        (before any network is built)."""
        t, d, spec = self.teacher, self.data, self.config.data.spec
        if t is None:
            return
        if t.is_text and not getattr(d, "has_prompts", False):
            raise ConfigError(f"data.spec={spec!r} has no prompts, and {self.config.teacher.path!r} is a "
                              "text-to-image teacher: use data.spec=prompts:FILE (one prompt per line) or "
                              "image data with a caption column (data.caption_column).")
        if not t.is_text and not getattr(d, "has_images", True):
            raise ConfigError(f"data.spec={spec!r} holds prompts only, but {self.config.teacher.path!r} is "
                              "not a text-to-image teacher; use image data (e.g. sklearn:digits).")
        own = list(t.image_shape)
        if getattr(d, "has_images", True) and d.sample_shape is not None and list(d.sample_shape) != own:
            raise ConfigError(f"data.spec={spec!r} gives samples of shape "
                              f"{'x'.join(map(str, d.sample_shape))}, but the teacher "
                              f"{self.config.teacher.path!r} takes {'x'.join(map(str, own))}: use the "
                              "teacher's data (e.g. uoft-cs/cifar10 for google/ddpm-cifar10-32, "
                              "sklearn:digits for builtin:digits, toy:gaussians8 for analytic:gaussians8).")

    def batch_indices(self, gen: torch.Generator, b: int) -> torch.Tensor:
        """The data rows of one batch, drawn on ``gen``'s device: uniform with replacement (a method may
        stratify them)."""
        return torch.randint(len(self.data), (b,), generator=gen, device=gen.device)

    def _batch(self) -> dict:
        """One batch in the teacher's space: ``x`` (clean samples, or None when the method needs none),
        ``cond`` (a :class:`Condition`, or None), ``label`` and ``size``. In-memory data is indexed on the
        device; prompt rows are drawn on the host (their strings are host data)."""
        b = self.config.train.batch_size
        prompts = getattr(self.data, "prompts", None)
        streamed = self._stream is not None and self.needs_clean_samples
        host = prompts is not None or streamed  # rows the host needs: drawn on the host generator
        idx = self.batch_indices(self.host_rng if host else self.rng, b)
        if prompts is not None:
            prompts = [prompts[i] for i in idx.tolist()]  # a CPU tensor: no device synchronisation
        images = self._stream.images(self.step, self._micro) if streamed else None
        idx = idx.to(self.device)
        y = self._data_labels[idx]
        t = self.teacher
        cond = None
        if t is not None and t.is_text:
            cond = t.condition(prompts=prompts)
        elif t is not None and t.num_classes:
            if self._unlabelled:  # unlabelled rows under a class-conditional teacher: random classes
                y = torch.where(y < 0, torch.randint(t.num_classes, y.shape, generator=self.rng,
                                                     device=self.rng.device).to(y.device), y)
            cond = t.condition(class_labels=y)
        x = None
        if self.needs_clean_samples and getattr(self.data, "has_images", True):
            if self._data_x is not None:
                x = self._data_x[idx]
                x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x  # images cached as bytes
            else:  # streamed images, decoded ahead by the DataLoader's workers
                x = images.to(self.device, non_blocking=True)
            if t is not None and t.is_latent:
                with self.accelerator.autocast():
                    x = t.encode(x, generator=self.rng)
        elif self.needs_clean_samples:  # prompts only: the teacher's own samples stand in for data
            with self.accelerator.autocast():
                x = t.sample(b, self.config.data.teacher_sample_steps, self.rng, cond).float()
        return {"x": x, "cond": cond, "label": y, "size": b}

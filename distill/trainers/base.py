"""DistillationTrainer: the one Accelerate training loop (DESIGN.md s4).

A method subclasses it and supplies

    build(self)                   networks and optimizers, registered with ``self.add(...)``
    train_step(self, batch, step) one update; returns a dict of scalar logs
    export(self)                  the student as a diffusers pipeline object

The base class owns everything else: the ``Accelerator`` (data parallel, gradient accumulation,
mixed precision), ``prepare``, the EMA of the student (diffusers ``EMAModel``), atomic
pickle-free checkpoints with ``checkpoints_total_limit`` and exact resume, trackers, the progress
bar, sample grids, the export with a model card, and the optional FID report at the end.

Reproducibility: data indices and noise of step s, micro-step m on rank r come from generators
seeded by (seed, s, m, r). A resumed run therefore sees exactly the batches and noise of an
uninterrupted one, and its final weights are bitwise equal on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import diffusers
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from tqdm.auto import tqdm

from ..checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..conditioning import network_kwargs
from ..config import Config, ConfigError, validate
from ..data import StreamedImages, cache_images, load_data
from ..ema import ForeachEMA
from ..export import export_lora_adapter, export_pipeline
from ..lora import AdapterView, adapter_state_dict, add_adapters, default_targets, matches, merged_copy
from ..models import GuidedUNet2DModel, MLPDenoiser
from ..runs import (
    Interrupted,
    TrainingDiverged,
    check_resumable,
    clear_output_dir,
    fingerprint,
    prepare_output_dir,
    write_run,
)
from ..sharding import Gathered, ShardedLoad, gather, load_ema, load_model, load_optimizer, reshard
from ..teachers import Teacher, analytic_teacher

logger = logging.getLogger("distill")


@contextlib.contextmanager
def frozen(*modules: torch.nn.Module):
    """Parameters of ``modules`` do not require grad inside the block (their flags restored after)."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        # an FSDP2 network that ran frozen (no backward reached its weights) is left unsharded, holding
        # gathered weights with the frozen flags; reshard it so its next pass gathers afresh
        reshard(*modules)


@contextlib.contextmanager
def _stop_on_signals(trainer):
    """SIGINT and SIGTERM set ``trainer._stop_signal`` (the loop checkpoints and stops after the current step);
    a second SIGINT interrupts at once. Outside the main thread nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if trainer._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer._stop_signal = signum
        if trainer.accelerator.is_main_process:
            print(f"\n{signal.Signals(signum).name}: finishing step {trainer.step + 1} and writing a checkpoint "
                  "(Ctrl-C again to abandon it)...", file=sys.stderr, flush=True)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


REFUSED_LAUNCH = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}


def make_accelerator(cfg: Config) -> Accelerator:
    """An Accelerator for this config; refuses set-ups that would silently misbehave.

    An Accelerate FSDP launch (``accelerate launch --use_fsdp`` or ``configs/accelerate/fsdp.yaml``) turns on
    ``train.fsdp``: distill shards its trained networks itself (see :mod:`distill.sharding`) over a plain
    multi-process Accelerator. DeepSpeed is refused: it takes one model per engine, and a score-distillation
    step trains two or three networks from one loss. fp16 is refused (see ``config.validate``); an fp16
    launch flag is refused too rather than silently overridden.
    """
    for var, name in REFUSED_LAUNCH.items():
        if os.environ.get(var, "").lower() in ("1", "true", "yes"):
            raise ConfigError(f"This launch uses {name} ({var} is set by your Accelerate config), which distill does not "
                              "support: a score-distillation step trains two or three networks from one loss, and "
                              f"{name} takes one model per engine. Shard with FSDP instead (`distill launch "
                              "--config_file configs/accelerate/fsdp.yaml CONFIG`, or train.fsdp=true), or use plain "
                              "data parallel (`distill launch --multi_gpu --num_processes N CONFIG`).")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes"):
        os.environ.pop("ACCELERATE_USE_FSDP")  # distill shards itself; Accelerate runs plain multi-process
        if not cfg.train.fsdp:
            cfg.train.fsdp = True
            validate(cfg)
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower() == "fp16":
        raise ConfigError("The launch asks for fp16 mixed precision (accelerate launch --mixed_precision fp16 or "
                          "its config file), which distill refuses: use --mixed_precision bf16 together with "
                          "train.mixed_precision=bf16, or no mixed precision.")
    mp = cfg.train.mixed_precision
    cuda = torch.cuda.is_available()
    report = cfg.train.report_to
    log_with = None
    if report == "tensorboard":
        try:
            import tensorboard  # noqa: F401

            log_with = "tensorboard"
        except ImportError:
            logger.warning("tensorboard is not installed: logging to the console only (pip install tensorboard).")
    acc = Accelerator(
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        mixed_precision=mp,
        cpu=not cuda,  # CPU data parallel: `accelerate launch --multi_gpu` then runs MULTI_CPU over gloo
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "logs")),
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and acc.num_processes == 1:
        raise RuntimeError(
            f"WORLD_SIZE={world} but Accelerate set up a single unsynchronised process: the copies would train "
            "independently. On a CPU machine launch with "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m distill train ...`.")
    return acc


def load_teacher(cfg: Config, device) -> Teacher:
    """The frozen teacher, in bf16 when ``train.mixed_precision=bf16`` (its parts are never trained)."""
    path = cfg.teacher.path
    if path.startswith("analytic:"):
        teacher = analytic_teacher(path, prediction_type=cfg.teacher.prediction_type,
                                   beta_schedule=cfg.teacher.beta_schedule, conditional=cfg.teacher.conditional)
        teacher.model.to(device)
    else:
        dtype = torch.bfloat16 if cfg.train.mixed_precision == "bf16" else torch.float32
        teacher = Teacher.from_pretrained(path, device=device, dtype=dtype)
    if cfg.teacher.guidance_scale is not None and not (teacher.num_classes or teacher.is_text):
        raise ConfigError(f"teacher.guidance_scale={cfg.teacher.guidance_scale} needs a class-conditional teacher "
                          f"with a null class or a text-to-image teacher; {path!r} is unconditional. Remove "
                          "teacher.guidance_scale.")
    if teacher.schedule.kind != "vp":
        name = type(teacher.scheduler).__name__
        raise ConfigError(f"teacher.path={path!r} comes with a {name} ({teacher.schedule.kind} noise schedule); the "
                          "trainers, their exported pipelines and the DDIM baselines support variance-preserving "
                          "schedules only (DDPMScheduler / DDIMScheduler tables, epsilon, sample or v_prediction). "
                          "EDM and flow-matching teachers are not supported yet.")
    return teacher


def build_network(cfg: Config, teacher: Teacher | None, sample_shape: list[int], num_classes: int,
                  guidance_embed_dim: int | None = None):
    """A student / generator / fake-score network as ``student.arch`` says.

    ``guidance_embed_dim``: also take the guidance weight w as input (guided distillation): an
    ``MLPDenoiser`` with a w embedding, or a ``UNet2DModel`` wrapped in ``GuidedUNet2DModel``; in
    both the w branch starts at zero, so a copied teacher is unchanged at w = 0.
    """
    s = cfg.student
    if s.arch == "copy":
        if teacher is None or not any(True for _ in teacher.model.parameters()):
            raise ConfigError("student.arch: 'copy' needs a teacher with weights; the analytic teacher has none. "
                              "Use student.arch=mlp or student.arch=unet.")
        net = teacher.stored_network()  # fp32 master weights as stored, whatever dtype the teacher is held in
        if guidance_embed_dim:
            net = _with_guidance_input(net, guidance_embed_dim)
        return net.requires_grad_(True).train()
    if teacher is not None and teacher.is_latent:
        raise ConfigError(f"student.arch: {s.arch!r} builds a pixel-space network; a latent text-to-image teacher "
                          "needs student.arch=copy (a copy of its UNet2DConditionModel).")
    n_embeds = num_classes + 1 if (s.conditional and num_classes) else None
    if s.arch == "mlp":
        return MLPDenoiser(data_dim=math.prod(sample_shape), hidden=s.hidden, num_layers=s.num_layers,
                           num_class_embeds=n_embeds, sample_shape=sample_shape if len(sample_shape) > 1 else None,
                           guidance_embed_dim=guidance_embed_dim)
    if len(sample_shape) != 3:
        raise ConfigError(f"student.arch: 'unet' needs image data (C, H, W); the data has shape {sample_shape}.")
    chans = list(s.block_out_channels)
    down = ["DownBlock2D"] * len(chans)
    up = ["UpBlock2D"] * len(chans)
    if s.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    net = diffusers.UNet2DModel(sample_size=sample_shape[1], in_channels=sample_shape[0],
                                out_channels=sample_shape[0], block_out_channels=chans,
                                layers_per_block=s.layers_per_block, down_block_types=down, up_block_types=up,
                                norm_num_groups=8, attention_head_dim=8, num_class_embeds=n_embeds)
    return _with_guidance_input(net, guidance_embed_dim) if guidance_embed_dim else net


def _with_guidance_input(net, dim: int):
    if isinstance(net, MLPDenoiser):
        out = MLPDenoiser.from_config({**net.config, "guidance_embed_dim": dim})
        missing, unexpected = out.load_state_dict(net.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("guidance_proj.") for k in missing)
        return out.to(net.device)
    if isinstance(net, diffusers.UNet2DModel):
        return GuidedUNet2DModel.from_unet(net, dim)
    if isinstance(net, diffusers.UNet2DConditionModel):
        # LCM-style guidance input (Luo et al. 2023): time_embedding.cond_proj maps the w embedding into the time
        # embedding's input; zero-initialised, so the copy equals the teacher at every w until it learns
        config = {k: v for k, v in net.config.items() if not k.startswith("_")}
        out = diffusers.UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": dim})
        missing, unexpected = out.load_state_dict(net.state_dict(), strict=False)
        assert not unexpected and set(missing) == {"time_embedding.cond_proj.weight"}, (missing, unexpected)
        torch.nn.init.zeros_(out.time_embedding.cond_proj.weight)
        return out.to(net.device)
    raise ConfigError(f"A guidance input can be added to MLPDenoiser, UNet2DModel and UNet2DConditionModel networks, "
                      f"not to {type(net).__name__}; use student.arch=mlp or student.arch=unet.")


class DistillationTrainer:
    """The shared loop. Subclasses implement ``build``, ``train_step`` and ``export``."""

    method = "base"

    def __init__(self, config: Config, accelerator: Accelerator | None = None, overwrite: bool = False):
        self.config = config
        self.out = Path(config.output_dir)
        self.accelerator = accelerator or make_accelerator(config)
        self.device = self.accelerator.device
        self.modules: dict[str, torch.nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.emas: dict[str, ForeachEMA] = {}
        self._base_lr: dict[str, float] = {}
        self._add_args: dict[str, tuple] = {}
        self.sharded = False  # train.fsdp: the trained networks are FSDP2-sharded (distill.sharding)
        self.rng: torch.Generator | None = None  # this micro-step's generator on the training device
        self._host_rng: torch.Generator | None = None  # the same seed on the CPU (host-side draws on a GPU run)
        self.step = 0
        self.history: list[dict] = []
        self._counts: dict = {}
        self.teacher: Teacher | None = None
        self.data = None
        self._built = False
        self.overwrite = overwrite
        # the run as configured, before build() fills in derived values (student.conditional, progressive's
        # max_steps): what checkpoints and run.json record, and what output_dir/config.yaml holds
        self.fingerprint = fingerprint(config)
        self._config_yaml = config.to_yaml()
        self.already_finished = False  # train() found the run finished: nothing trained, nothing exported
        self._continue = False  # output_dir holds this same run: continue it from its latest checkpoint
        self._resume_path: Path | None = None
        # non-finite bookkeeping, on the device between synchronisations: why the current step is non-finite
        # (reason -> bool tensor), the reasons seen since the last check, the current and longest run of
        # non-finite steps
        self._flags: dict[str, torch.Tensor] = {}
        self._reasons: dict[str, torch.Tensor] = {}
        self._bad_run: torch.Tensor | None = None
        self._worst_run: torch.Tensor | None = None
        self._stop_signal: int | None = None
        self._data_x = self._data_labels = None  # in-memory data on the training device (see setup)
        self._stream: StreamedImages | None = None  # images too many to cache, decoded ahead by workers
        self._micro = 0
        self.compile_seconds: float | None = None  # train.compile: the first update's time, compilation included

    # ------------------------------------------------------------------ hooks for methods
    def build(self) -> None:
        raise NotImplementedError

    def train_step(self, batch: dict, step: int) -> dict:
        raise NotImplementedError

    def export(self, for_samples: bool = False) -> diffusers.DiffusionPipeline:
        """The student as a pipeline. ``for_samples``: for a sample grid only (a text pipeline may then
        reuse the teacher's in-memory parts instead of re-reading them from its folder)."""
        raise NotImplementedError

    def state(self) -> dict:
        """JSON-able method state saved in checkpoints (curricula, counters)."""
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def card_info(self) -> dict:
        return {"method": self.method, "teacher": self.config.teacher.path}

    def sample_kwargs(self) -> dict:
        """Extra arguments for the exported pipeline when drawing sample grids."""
        return {}

    # ------------------------------------------------------------------ helpers for methods
    def add(self, name: str, module: torch.nn.Module, lr: float | None = None, ema: bool = False,
            betas: list[float] | None = None, lr_multipliers: dict[str, float] | None = None) -> None:
        """Register a network; with ``lr`` it gets an Adam(W) optimizer, with ``ema`` an EMA copy.
        ``lr_multipliers``: parameter-name prefix -> learning-rate multiplier (its own param group)."""
        module = module.to(self.device)
        self.modules[name] = module
        self._add_args[name] = (lr, ema, betas, lr_multipliers)
        self._optimize(name)

    def _optimize(self, name: str) -> None:
        """The optimizer and EMA of a registered network, over its current parameters."""
        module = self.modules[name]
        lr, ema, betas, lr_multipliers = self._add_args[name]
        if lr is not None:
            o = self.config.optim
            groups: dict[float, list] = {}
            for pname, p in module.named_parameters():
                mult = next((m for prefix, m in (lr_multipliers or {}).items() if pname.startswith(prefix)), 1.0)
                groups.setdefault(mult, []).append(p)
            params = [{"params": ps, "lr": lr * m, "lr_mult": m} for m, ps in groups.items()]
            # fused AdamW (one kernel per step; it skips a step with non-finite gradients on the device, see
            # apply_gradients); sharded (DTensor) parameters use the foreach implementation
            kind = {"foreach": True} if self.sharded else {"fused": True}
            self.optimizers[name] = torch.optim.AdamW(params, lr=lr, betas=tuple(betas or o.betas),
                                                      weight_decay=o.weight_decay, eps=o.eps, **kind)
            self._base_lr[name] = lr
        if ema:
            self.emas[name] = ForeachEMA(module.parameters(), decay=self.config.train.ema_decay)

    def unwrap(self, name: str) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.modules[name])

    def step_optimizer(self, name: str, loss: torch.Tensor) -> float | None:
        """backward, clip, step, zero_grad for one registered network; returns the gradient norm."""
        self.accelerator.backward(loss)
        return self.apply_gradients(name)

    def count(self, key: str, n) -> None:
        """Add ``n`` (a number or a tensor: no host sync here) to a counter that is logged as ``key``,
        summed over the steps since the last log."""
        self._counts[key] = self._counts.get(key, 0) + n

    def flag(self, reason: str, bad: torch.Tensor) -> None:
        """Mark the current step non-finite where ``bad`` (a bool tensor, kept on the device) is True."""
        old = self._flags.get(reason)
        self._flags[reason] = bad if old is None else old | bad

    def finite_mean(self, per_sample: torch.Tensor) -> torch.Tensor:
        """Batch mean of the finite per-sample losses; the dropped samples are counted (``nonfinite_samples``).
        A batch with no finite sample gives a zero loss and marks the step non-finite. No host synchronisation."""
        keep = torch.isfinite(per_sample)
        kept = keep.sum()
        self.count("nonfinite_samples", keep.numel() - kept)
        self.flag("every sample's loss", kept == 0)
        return torch.where(keep, per_sample, 0).sum() / kept.clamp_min(1)

    def apply_gradients(self, name: str) -> torch.Tensor | None:
        """Clipping, optimizer step and zero_grad of one network whose gradients are already accumulated;
        returns the (pre-clip) gradient norm as a tensor. An update whose gradient holds a non-finite value is
        skipped (as a loss scaler does): the gradient tensors holding one are counted as ``nonfinite_grads/NAME``,
        the skipped update as ``skipped_updates/NAME``, and the step is marked non-finite (see
        ``train.max_nonfinite_steps``). All of it stays on the device: the norms decide, and fused AdamW skips
        its step (parameters, moments and step count) where ``found_inf`` is set."""
        opt = self.optimizers[name]
        inner = getattr(opt, "optimizer", opt)
        params = [p for p in self.modules[name].parameters() if p.grad is not None]
        if not (self.accelerator.sync_gradients and params):
            opt.step()  # Accelerate's optimizer wrapper steps only at the end of an accumulation
            opt.zero_grad(set_to_none=True)
            return None
        if self.sharded:
            return self._apply_sharded_gradients(name, params)
        grads = [p.grad for p in params]
        norms = torch.stack(torch._foreach_norm(grads, 2.0))
        total = torch.linalg.vector_norm(norms, 2.0)  # torch.nn.utils.clip_grad_norm_'s total norm, bitwise
        bad = ~torch.isfinite(norms)
        found_inf = bad.any()
        self.count(f"nonfinite_grads/{name}", bad.sum())
        self.count(f"skipped_updates/{name}", found_inf.long())
        self.flag(f"network {name!r}", found_inf)
        max_norm = self.config.optim.max_grad_norm
        if max_norm is not None:  # clip_grad_norm_'s scaling, bitwise
            torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))
        inner.found_inf = found_inf.float()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    def _apply_sharded_gradients(self, name: str, params: list) -> torch.Tensor | None:
        """apply_gradients for FSDP2-sharded (DTensor) parameters: the foreach optimizer cannot skip on the
        device, so the host decides (one synchronisation per update)."""
        opt = self.optimizers[name]
        bad = _plain(sum((~torch.isfinite(p.grad)).sum() for p in params))
        self.count(f"nonfinite_grads/{name}", bad)
        self.count(f"skipped_updates/{name}", (bad > 0).long())
        self.flag(f"network {name!r}", bad > 0)
        if bool(bad):
            opt.zero_grad(set_to_none=True)
            return None
        max_norm = self.config.optim.max_grad_norm
        if max_norm is not None:
            norm = _plain(self.accelerator.clip_grad_norm_(params, max_norm))
        else:
            norm = torch.norm(torch.stack([_plain(p.grad.norm()) for p in params]))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return norm

    def fit_to_teacher(self, net, steps: int, prediction_type: str, indices: torch.Tensor | None = None) -> None:
        """Regress ``net`` on the teacher's own prediction at noised data for ``steps`` Adam steps.

        The stand-in for "start from a copy of the teacher" when the teacher has no weights to copy
        (the analytic Gaussian-mixture teacher), and MSD's teacher score matching for students smaller
        than the teacher (Song et al. 2024). ``indices``: the data rows to draw from (default: all).
        Seeded, deterministic.
        """
        t, cfg = self.teacher, self.config
        net.to(self.device)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(cfg.train.seed + 12345)
        for _ in range(steps):
            idx = torch.randint(len(self.data) if indices is None else len(indices), (cfg.train.batch_size,),
                                generator=gen)
            idx = idx if indices is None else indices[idx]
            x0 = self.data.x[idx].to(self.device)
            labels = self.data.labels[idx].to(self.device) if t.num_classes else None
            cond = t.condition(class_labels=labels) if labels is not None and not (labels < 0).any() else None
            tt = torch.rand(len(x0), generator=gen, dtype=torch.float64).to(self.device)
            x_t = t.schedule.add_noise(x0, torch.randn(x0.shape, generator=gen).to(self.device), tt)
            with torch.no_grad():  # the teacher the trainer distils: with teacher.guidance_scale when set
                out = t.network_output(x_t, tt, cond, cfg.teacher.guidance_scale)
                target = t.schedule.convert(out, x_t, tt, t.prediction_type, prediction_type)
            loss = (net(x_t, t.schedule.timestep(tt), **network_kwargs(net, cond)).sample - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.zero_grad(set_to_none=True)  # a gradient left here would be added to the first training update

    # ------------------------------------------------------------------ LoRA (student.lora_rank)
    @property
    def lora(self) -> bool:
        return self.config.student.lora_rank is not None

    def lora_views(self, names: list[str], checkpointing: bool) -> list[AdapterView]:
        """One LoRA adapter per name on the teacher's own network, which stays frozen and shared; the teacher
        becomes the view with every adapter off. Returns the views, in ``names`` order (see :mod:`distill.lora`)."""
        s, base = self.config.student, self.teacher.weights
        targets = s.lora_target_modules or default_targets(base)
        if not targets:
            raise ConfigError(f"student.lora_rank needs student.lora_target_modules for a {type(base).__name__} "
                              "teacher (module name suffixes to adapt, e.g. ['to_q', 'to_k', 'to_v']); defaults exist "
                              "for UNet2DModel and UNet2DConditionModel.")
        if not matches(base, targets):
            raise ConfigError(f"student.lora_target_modules={targets} matches no layer of the teacher's "
                              f"{type(base).__name__}: name module suffixes such as 'to_q' or 'conv1'.")
        add_adapters(base, names, s.lora_rank, s.lora_alpha, targets)
        self.teacher.model = AdapterView(base, None, checkpointing)
        return [AdapterView(base, n, checkpointing) for n in names]

    def export_network(self, name: str) -> torch.nn.Module:
        """A registered network as a plain standalone network (a LoRA view: merged into a copy of the base)."""
        net = self.unwrap(name)
        return merged_copy(net, self.teacher.stored_network().eval()) if isinstance(net, AdapterView) else net

    def lora_inference(self) -> tuple:
        """(scheduler, call kwargs) with which the teacher's own pipeline plus the student adapter samples."""
        raise NotImplementedError

    def export_lora(self) -> Path:
        """``output_dir/lora``: the student adapter for the teacher's own pipeline (see export_lora_adapter)."""
        t = self.teacher
        sdxl = None if not t.is_text else len(t.text_encoders) > 1
        scheduler, kwargs = self.lora_inference()
        view = self.unwrap("student")
        return export_lora_adapter(adapter_state_dict(view), view.shared_base.distill_lora_config, self.out / "lora",
                                   scheduler, kwargs, self.card_info(), sdxl)

    def randn(self, *shape, like: torch.Tensor | None = None) -> torch.Tensor:
        """Noise drawn on the training device from this micro-step's generator (no host copy)."""
        dtype = like.dtype if like is not None else torch.float32
        return torch.randn(*shape, generator=self.rng, device=self.rng.device, dtype=dtype).to(self.device)

    def rand(self, *shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.rand(*shape, generator=self.rng, device=self.rng.device, dtype=dtype).to(self.device)

    @property
    def host_rng(self) -> torch.Generator:
        """A CPU generator of this micro-step for draws the host needs (prompt rows, MAR's masking ratio): on a
        CPU run the one generator itself, so that every draw comes from one stream as before."""
        if self.rng is None or self.rng.device.type == "cpu":
            return self.rng
        return self._host_rng

    def step_seed(self, step: int, micro: int) -> int:
        return (self.config.train.seed * 1_000_003 + step * 1009 + micro * 17
                + self.accelerator.process_index * 7919) % (2**63)

    def step_generator(self, step: int, micro: int) -> torch.Generator:
        """The generator of step ``step``, micro-step ``micro`` on this process, on the training device, seeded
        by (seed, step, micro-step, rank): a resumed run draws exactly the noise of an uninterrupted one."""
        seed = self.step_seed(step, micro)
        if self.device.type != "cpu":
            self._host_rng = torch.Generator().manual_seed(seed)
        return torch.Generator(device=self.device).manual_seed(seed)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        if self._built:
            return
        cfg = self.config
        torch.manual_seed(cfg.train.seed)
        resolution, channels = cfg.data.resolution, cfg.data.channels
        if self.uses_teacher:
            self.teacher = load_teacher(cfg, self.device)
            resolution, channels = self.teacher_image_size(resolution, channels)
        self.data = load_data(cfg.data.spec, resolution=resolution, num_samples=cfg.data.num_samples,
                              seed=cfg.train.seed, channels=channels or 3, caption_column=cfg.data.caption_column)
        self.check_data()
        self.build()
        self.choose_attention()
        self.place_data()
        if cfg.train.compile:
            self.compile_networks()
        if cfg.train.fsdp:
            self.shard()
        else:
            names = list(self.modules)
            prepared = self.accelerator.prepare(*[self.modules[n] for n in names],
                                                *[self.optimizers[n] for n in self.optimizers])
            if not isinstance(prepared, (list, tuple)):
                prepared = [prepared]
            for i, n in enumerate(names):
                self.modules[n] = prepared[i]
            for j, n in enumerate(list(self.optimizers)):
                self.optimizers[n] = prepared[len(names) + j]
        for ema in self.emas.values():
            ema.to(self.device)
        self._built = True

    def choose_attention(self) -> str | None:
        """PyTorch SDPA (diffusers' default processor), or xformers' memory-efficient attention when
        ``train.attention`` is xformers, or auto with xformers installed and CUDA; the choice is printed."""
        nets = [self.teacher.weights] if self.teacher is not None else []
        nets += [getattr(m, "shared_base", m) for m in self.modules.values()]
        nets = [n for n in nets if hasattr(n, "enable_xformers_memory_efficient_attention")]
        if not nets:
            return None
        want = self.config.train.attention
        have = importlib.util.find_spec("xformers") is not None and torch.cuda.is_available()
        if want == "xformers" and not have:
            raise ConfigError("train.attention=xformers needs the xformers package and a CUDA device (pip install "
                              "xformers); use train.attention=sdpa or auto.")
        choice = "xformers" if want == "xformers" or (want == "auto" and have) else "sdpa"
        if choice == "xformers":
            for n in nets:
                n.enable_xformers_memory_efficient_attention()
        self.accelerator.print("attention: " + ("xformers memory-efficient attention" if choice == "xformers" else
                                                "PyTorch scaled_dot_product_attention (SDPA)"))
        return choice

    def shard(self) -> None:
        """FSDP2-shard every network that has an optimizer (its optimizer and EMA rebuilt over the sharded
        parameters); frozen networks stay replicated. Keeps an unsharded template of each on the meta device for
        the export."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ConfigError("train.fsdp shards over the processes of a distributed launch, and this is a single "
                              "process: `distill launch --config_file configs/accelerate/fsdp.yaml CONFIG` (or "
                              "`distill launch --multi_gpu --num_processes N CONFIG train.fsdp=true`).")
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401

            from ..sharding import shard_network
        except ImportError as err:
            raise ConfigError(f"train.fsdp needs PyTorch's FSDP2 (torch >= 2.6; this is {torch.__version__}: {err}).") from None
        self._templates = {}
        self.sharded = True
        for name in list(self.optimizers):
            net = self.modules[name]
            self._templates[name] = copy.deepcopy(net).to("meta")
            shard_network(net)
            self._optimize(name)
        self.accelerator.print(f"sharding: FSDP2 over {self.accelerator.num_processes} process(es) for "
                               f"{', '.join(self._templates)}; frozen networks replicated")

    def place_data(self) -> None:
        """In-memory data (toys, digits, and image sets small enough, decoded once: ``data.device_cache_gib``)
        becomes one tensor on the training device, so a batch is an index on the device. Larger image sets are
        decoded ahead by ``data.num_workers`` DataLoader workers into pinned memory. A method that needs no clean
        samples (SIM, MSD) never touches the images: its batches are labels or prompts."""
        cached = cache_images(self.data, self.config.data.device_cache_gib) if self.needs_clean_samples else None
        if cached is not None:
            self.data = cached
        if hasattr(self.data, "x"):
            self._data_x = self.data.x.to(self.device)
        elif self.needs_clean_samples and getattr(self.data, "has_images", False):
            d, b, rows = self.config.data, self.config.train.batch_size, self.batch_indices
            self._stream = StreamedImages(
                self.data, lambda step, micro: rows(torch.Generator().manual_seed(self.step_seed(step, micro)), b),
                self.config.train.gradient_accumulation_steps, self.config.train.max_steps, d.num_workers,
                pin_memory=self.device.type == "cuda")
        labels = self.data.labels if hasattr(self.data, "labels") else self.data.all_labels()
        self._data_labels = labels.to(self.device)
        self._unlabelled = bool((labels < 0).any())

    def compile_networks(self) -> None:
        """``train.compile``: every network (the teacher's too) compiled in place with ``torch.compile``
        (``nn.Module.compile``: state-dict keys unchanged). Compilation happens at the first update, whose time
        is reported separately (``compile_seconds``)."""
        nets = [self.teacher.weights] if self.teacher is not None else []
        nets += [getattr(m, "shared_base", m) for m in self.modules.values()]
        regions = sum(compile_regions(net) for net in {id(n): n for n in nets}.values())
        self.accelerator.print(f"train.compile: {regions} region(s) of {len(nets)} network(s) compiled with "
                               "torch.compile (inductor); the first update includes the compilation")

    uses_teacher = True  # the teacher is loaded before the data (its resolution, space and conditioning)
    needs_clean_samples = False  # a method that noises clean samples (data, or the teacher's own samples)

    def teacher_image_size(self, resolution: int | None, channels: int | None) -> tuple[int | None, int | None]:
        """The data's resolution and channels: the teacher's images (pixel teachers: its sample shape; latent
        teachers: UNet size x VAE factor). A ``data.resolution`` / ``data.channels`` that disagrees is refused."""
        shape, path = self.teacher.image_shape, self.config.teacher.path
        if len(shape) != 3:
            return resolution, channels
        for key, given, own in (("data.resolution", resolution, shape[-1]), ("data.channels", channels, shape[0])):
            if given is not None and given != own:
                raise ConfigError(f"{key}={given} does not match the teacher: {path!r} makes "
                                  f"{'x'.join(map(str, shape))} images (channels x height x width). Remove {key} "
                                  f"(it defaults to the teacher's) or set {key}={own}.")
        return shape[-1], shape[0]

    def check_data(self) -> None:
        """Refuse data that cannot condition this teacher, or whose samples are not the teacher's shape
        (before any network is built)."""
        t, d, spec = self.teacher, self.data, self.config.data.spec
        if t is None:
            return
        if t.is_text and not getattr(d, "has_prompts", False):
            raise ConfigError(f"data.spec={spec!r} has no prompts, and {self.config.teacher.path!r} is a text-to-image "
                              "teacher: use data.spec=prompts:FILE (one prompt per line) or image data with a caption "
                              "column (data.caption_column).")
        if not t.is_text and not getattr(d, "has_images", True):
            raise ConfigError(f"data.spec={spec!r} holds prompts only, but {self.config.teacher.path!r} is not a "
                              "text-to-image teacher; use image data (e.g. sklearn:digits).")
        own = list(t.image_shape)
        if getattr(d, "has_images", True) and d.sample_shape is not None and list(d.sample_shape) != own:
            raise ConfigError(f"data.spec={spec!r} gives samples of shape {'x'.join(map(str, d.sample_shape))}, but "
                              f"the teacher {self.config.teacher.path!r} takes {'x'.join(map(str, own))}: use the "
                              "teacher's data (e.g. uoft-cs/cifar10 for google/ddpm-cifar10-32, sklearn:digits for "
                              "builtin:digits, toy:gaussians8 for analytic:gaussians8).")

    def batch_indices(self, gen: torch.Generator, b: int) -> torch.Tensor:
        """The data rows of one batch, drawn on ``gen``'s device: uniform with replacement (a method may
        stratify them)."""
        return torch.randint(len(self.data), (b,), generator=gen, device=gen.device)

    def _batch(self) -> dict:
        """One batch in the teacher's space: ``x`` (clean samples, or None when the method needs none),
        ``cond`` (a :class:`Condition`, or None), ``label`` and ``size``. In-memory data is indexed on the device;
        prompt rows are drawn on the host (their strings are host data)."""
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
                x = t.sample(b, self.config.data.teacher_sample_steps, self.rng, cond,
                             self.config.teacher.guidance_scale).float()
        return {"x": x, "cond": cond, "label": y, "size": b}

    def _set_lr(self, step: int) -> None:
        """Linear warm-up over ``optim.lr_warmup_steps``, then ``lr_gamma`` per milestone passed (torch's MultiStepLR)."""
        o = self.config.optim
        scale = min(1.0, (step + 1) / o.lr_warmup_steps) if o.lr_warmup_steps > 0 else 1.0
        scale *= o.lr_gamma ** sum(step >= m for m in o.lr_milestones)
        for name, opt in self.optimizers.items():
            for g in opt.param_groups:
                g["lr"] = self._base_lr[name] * scale * g.get("lr_mult", 1.0)

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        models = {n: self.unwrap(n) for n in self.modules}
        opts = {n: getattr(o, "optimizer", o) for n, o in self.optimizers.items()}
        emas = self.emas
        if self.sharded:  # every process gathers; the main process keeps the full tensors and writes them
            keep = acc.is_main_process
            models = {n: Gathered(gather(m.state_dict(), keep)) for n, m in models.items()}
            opts = {n: Gathered(gather(o.state_dict(), keep)) for n, o in opts.items()}
            emas = {n: Gathered(gather(e.state_dict(), keep)) for n, e in emas.items()}
        if acc.is_main_process:
            path = save_checkpoint(self.checkpoint_dir, self.step, models, opts, emas,
                                   {"method": self.method, "fingerprint": self.fingerprint,
                                    "history": self.history, "state": self.state()},
                                   self.config.train.checkpoints_total_limit)
            write_run(self.out, self.config, "running", self.step, self.fingerprint, checkpoint=str(path))
        acc.wait_for_everyone()
        return path

    def resume_plan(self) -> None:
        """Which checkpoint this run resumes from, checked against the config before anything loads."""
        cfg = self.config
        which = cfg.train.resume_from_checkpoint or ("latest" if self._continue else None)
        if not which:
            return
        path = latest_checkpoint(self.checkpoint_dir) if which == "latest" else Path(which)
        if path is None:
            if cfg.train.resume_from_checkpoint:
                self.accelerator.print(f"No checkpoint in {self.checkpoint_dir}: starting a new run.")
            return
        if not path.is_dir():
            found = [p.name for p in self.checkpoint_dir.glob("checkpoint-*")]
            raise ConfigError(f"train.resume_from_checkpoint={which!r} is not a checkpoint folder; use 'latest' or "
                              f"one of {found} (under {self.checkpoint_dir}).")
        state_file = path / "trainer_state.json"
        if not state_file.is_file():
            raise ConfigError(f"{str(path)!r} is not a complete distill checkpoint (no trainer_state.json).")
        saved = json.loads(state_file.read_text())
        check_resumable(saved.get("fingerprint"), cfg, f"Checkpoint {str(path)!r}",
                        written_with=path.parent.parent / "config.yaml")
        self._resume_path = path

    def resume(self) -> None:
        path = self._resume_path
        if path is None:
            return
        models = {n: self.unwrap(n) for n in self.modules}
        opts = {n: getattr(o, "optimizer", o) for n, o in self.optimizers.items()}
        emas = self.emas
        if self.sharded:  # each process reads the full tensors and keeps its shard
            models = {n: ShardedLoad(m, load_model) for n, m in models.items()}
            opts = {n: ShardedLoad(o, load_optimizer) for n, o in opts.items()}
            emas = {n: ShardedLoad(e, load_ema) for n, e in emas.items()}
        state = load_checkpoint(path, models, opts, emas)
        for ema in self.emas.values():  # loaded shadow weights are CPU tensors; EMAModel.step needs them on the device
            ema.to(self.device)
            ema.decay = self.config.train.ema_decay  # EMAModel.load_state_dict restores the saved decay
        self.step = int(state["step"])
        self.history = list(state.get("history", state.get("history_tail", [])))
        self.load_state(state.get("state", {}))
        self.accelerator.print(f"Resumed from {path} at step {self.step}.")

    # ------------------------------------------------------------------ the loop
    def _claim_output_dir(self) -> None:
        """Refuse a folder holding another run, continue this same run, or clear it (``overwrite``)."""
        acc = self.accelerator
        action = prepare_output_dir(self.config, self.overwrite)
        acc.wait_for_everyone()
        if action == "overwrite" and acc.is_main_process:
            clear_output_dir(self.out)
            acc.print(f"--overwrite: removed the earlier run in {self.out}.")
        self._continue = action == "continue"
        acc.wait_for_everyone()

    def train(self) -> Path | None:
        """Run to ``train.max_steps``; returns the exported pipeline folder (main process).

        SIGINT (Ctrl-C) and SIGTERM end the current step, write a checkpoint and raise
        :class:`Interrupted`; ``train.max_nonfinite_steps`` non-finite steps in a row raise
        :class:`TrainingDiverged`. ``output_dir/run.json`` records the state either way.
        """
        cfg, acc = self.config, self.accelerator
        self._claim_output_dir()
        self.resume_plan()
        started = time.time()
        self.setup()
        self.resume()
        finished = self.finished_run()
        if finished is not None:
            return finished
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(self._config_yaml)
            write_run(self.out, cfg, "running", self.step, self.fingerprint)
            acc.init_trackers(f"distill-{self.method}", config=_flat(cfg.to_dict()))
        try:
            with _stop_on_signals(self):
                self._loop()
        except Interrupted:
            self._record("interrupted")
            raise
        except BaseException as err:
            self._record("failed", error=f"{type(err).__name__}: {err}")
            raise
        path = self.finish(time.time() - started)
        self._record("finished")
        return path

    def _record(self, state: str, **extra) -> None:
        if self.accelerator.is_main_process:
            write_run(self.out, self.config, state, self.step, self.fingerprint, **extra)

    def finished_run(self) -> Path | None:
        """A resumed checkpoint already at train.max_steps is a finished run: reported, nothing trained or
        exported. The one exception completes its own run: this folder's checkpoint with no export yet (a run
        stopped between its last checkpoint and the export)."""
        path, max_steps = self._resume_path, self.config.train.max_steps
        if path is None or self.step < max_steps:
            return None
        run_dir = path.parent.parent
        same = run_dir.resolve() == self.out.resolve()
        if same and not (self.out / "pipeline" / "model_index.json").is_file():
            return None
        self.already_finished = True
        self.accelerator.print(f"The run in {run_dir} finished at step {self.step} (train.max_steps={max_steps}); its "
                               f"pipeline is {run_dir / 'pipeline'}. Nothing to do: raise train.max_steps to train "
                               "on" + (", or pass --overwrite to start afresh." if same else "."))
        return run_dir / "pipeline"

    def train_iteration(self) -> dict:
        """One update as ``train()`` runs it: for each micro-step its seeded generators, a batch and the method's
        ``train_step`` (backward, clipping, optimizer steps), then the EMA. Increments ``step`` and returns the
        method's logs of the last micro-step as tensors. Nothing here synchronises with the device: the non-finite
        state is kept on it and read at the checks of ``train()`` (every ``min(log_every, max_nonfinite_steps)``
        updates, and at checkpoints)."""
        cfg, acc = self.config, self.accelerator
        step = self.step
        self._set_lr(step)
        self._flags = {}
        logs: dict = {}
        for micro in range(cfg.train.gradient_accumulation_steps):
            self.rng, self._micro = self.step_generator(step, micro), micro
            batch = self._batch()
            with acc.accumulate(*self.modules.values()):
                logs = self.train_step(batch, step)
        for name, ema in self.emas.items():
            ema.step(self.unwrap(name).parameters())
        self.step += 1
        logs = {k: v for k, v in logs.items() if v is not None}
        for k, v in logs.items():
            if isinstance(v, torch.Tensor):
                self.flag(f"loss {k}", ~torch.isfinite(v.detach()).all())
        if self._bad_run is None:
            self._bad_run = torch.zeros((), dtype=torch.long, device=self.device)
            self._worst_run = torch.zeros((), dtype=torch.long, device=self.device)
        if self._flags:
            bad = torch.stack([f.reshape(()) for f in self._flags.values()]).any()
            self._bad_run = torch.where(bad, self._bad_run + 1, 0)
            self._worst_run = torch.maximum(self._worst_run, self._bad_run)
            for k, f in self._flags.items():
                old = self._reasons.get(k)
                self._reasons[k] = f if old is None else old | f
        else:
            self._bad_run = torch.zeros_like(self._bad_run)
        return logs

    def _loop(self) -> None:
        cfg, acc = self.config, self.accelerator
        tc = cfg.train
        bar = tqdm(total=tc.max_steps, initial=self.step, desc=f"{self.method}", dynamic_ncols=True,
                   disable=not (acc.is_main_process and tc.progress_bar))
        last_good = latest_checkpoint(self.checkpoint_dir)
        check_every = min(tc.log_every, tc.max_nonfinite_steps)
        while self.step < tc.max_steps:
            started = time.perf_counter()
            logs = self.train_iteration()
            if tc.compile and self.compile_seconds is None:
                self.compile_seconds = round(time.perf_counter() - started, 2)
                acc.print(f"train.compile: the first update took {self.compile_seconds} s (compilation included)")
            bar.update(1)
            s = self.step
            log_now = s % tc.log_every == 0 or s == tc.max_steps
            ckpt_now = s % tc.checkpointing_steps == 0 or s == tc.max_steps
            samples_now = bool(tc.sample_every) and s % tc.sample_every == 0
            signalled = acc.num_processes == 1 and self._stop_signal is not None
            if not (log_now or ckpt_now or samples_now or signalled or s % check_every == 0):
                continue
            state = self._synchronize(logs if log_now else None)  # the one host synchronisation
            if state["worst_run"] >= tc.max_nonfinite_steps:
                bar.close()
                raise TrainingDiverged(
                    f"Training stopped at step {s}: {state['worst_run']} steps in a row had non-finite values "
                    f"({', '.join(state['reasons'])}); their updates were skipped. The last good checkpoint is "
                    f"{last_good or 'none (no checkpoint was written)'}; resume from it with a lower optim.lr (or "
                    "raise train.max_nonfinite_steps). Nothing was exported.")
            if state["logs"] is not None:
                acc.log(state["logs"], step=s)
                self.history.append({"step": s, **state["logs"]})
                bar.set_postfix({k: f"{v:.3g}" for k, v in list(state["logs"].items())[:4]})
            stop = state["stop"]
            if (ckpt_now or stop) and state["bad_run"] == 0:
                last_good = self.save_checkpoint() or last_good
            if stop:
                bar.close()
                name = signal.Signals(stop).name
                written = "written" if state["bad_run"] == 0 else "is the last good one (this step was non-finite)"
                raise Interrupted(stop, f"{name} at step {s}: checkpoint {last_good} {written}. Resume with "
                                        f"the same command (or train.resume_from_checkpoint=latest).")
            if samples_now:
                self.save_samples(f"step-{s:06d}")
        bar.close()

    def _synchronize(self, logs: dict | None) -> dict:
        """Read the device-side state in one host synchronisation: the logs of this step (with the counters since
        the last log), the current and longest run of non-finite steps and their reasons, and the stop signal
        (a max over processes: one rank's signal stops them all at the same step)."""
        values: dict[str, object] = {"bad_run": self._bad_run, "worst_run": self._worst_run}
        reasons = {f"reason {k}": v for k, v in self._reasons.items()}
        values.update(reasons)
        if logs is not None:
            logs = {**logs, **self._counts}
            values.update({f"log {k}": v for k, v in logs.items()})
        if self.accelerator.num_processes > 1:
            flag = torch.tensor(self._stop_signal or 0, device=self.device)
            values["stop"] = self.accelerator.reduce(flag, reduction="max")
        tensors = [(k, v) for k, v in values.items() if isinstance(v, torch.Tensor)]
        read = dict(zip([k for k, _ in tensors], torch.stack([v.detach().double().reshape(()) for _, v in tensors])
                        .tolist())) if tensors else {}
        out = {k: read.get(k, v) for k, v in values.items()}
        if logs is not None:
            self._counts.clear()
        state = {"bad_run": int(out["bad_run"] or 0), "worst_run": int(out["worst_run"] or 0),
                 "reasons": sorted(k.removeprefix("reason ") for k in reasons if out[k]),
                 "logs": None if logs is None else {k: float(out[f"log {k}"]) for k in logs},
                 "stop": int(out["stop"]) or None if "stop" in out else self._stop_signal}
        self._reasons = {}
        self._worst_run = torch.zeros_like(self._bad_run) if self._bad_run is not None else None
        return state

    def finish(self, seconds: float) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        if self.sharded:
            self.unshard()
        if acc.is_main_process:
            bad = [n for n in self.modules if not all(torch.isfinite(p).all() for p in self.unwrap(n).parameters())]
            bad += [n for n, e in self.emas.items() if not all(torch.isfinite(p).all() for p in e.shadow_params)]
            if bad:
                raise TrainingDiverged(f"Network(s) {sorted(set(bad))} hold non-finite weights at step {self.step}: "
                                       "the student is not exported. Resume from an earlier checkpoint with a lower "
                                       "optim.lr.")
            self.save_samples("final")
            info = {**self.card_info(), "steps": self.step, "train_seconds": round(seconds, 1),
                    "config": self.config.to_dict()}
            with self.ema_weights():
                path = export_pipeline(self.export(), self.out / "pipeline", {"title": f"distill {self.method} student",
                                                                             **info})
                if "student" in self.modules and isinstance(self.unwrap("student"), AdapterView):
                    acc.print(f"LoRA adapter written to {self.export_lora()}")
            (self.out / "train_history.json").write_text(json.dumps(self.history, indent=1))
            acc.print(f"Pipeline written to {path}")
        acc.end_training()
        return path

    def unshard(self) -> None:
        """End of a sharded run: every process gathers the trained networks (EMA weights where tracked); the main
        process rebuilds them unsharded for the export. The EMA has been applied, so it is dropped."""
        keep = self.accelerator.is_main_process
        with self.ema_weights():
            full = {n: gather(self.modules[n].state_dict(), keep) for n in self._templates}
        self.emas = {}
        if keep:
            for name, state in full.items():
                net = self._templates[name].to_empty(device=self.device)
                net.load_state_dict(state)
                for key, buf in self.modules[name].named_buffers():  # buffers are replicated, never sharded
                    net.get_buffer(key).copy_(buf)
                self.modules[name] = net
        self.sharded = False

    # ------------------------------------------------------------------ EMA and samples
    class _EMAContext:
        def __init__(self, trainer):
            self.t = trainer

        def __enter__(self):
            for name, ema in self.t.emas.items():
                params = list(self.t.unwrap(name).parameters())
                ema.store(params)
                ema.copy_to(params)

        def __exit__(self, *exc):
            for name, ema in self.t.emas.items():
                ema.restore(list(self.t.unwrap(name).parameters()))

    def ema_weights(self):
        """Context in which the EMA-tracked networks hold their EMA weights."""
        return self._EMAContext(self)

    @torch.no_grad()
    def save_samples(self, tag: str, n: int = 64) -> Path | None:
        if not self.accelerator.is_main_process:
            return None
        gen = torch.Generator().manual_seed(self.config.train.seed)
        with self.ema_weights():
            pipe = self.export(for_samples=True)
            pipe.set_progress_bar_config(disable=True)
            if self.teacher is not None and self.teacher.is_text:  # the first prompts of the data
                prompts = [self.data[i]["prompt"] for i in range(min(16, len(self.data)))]
                x = pipe(prompt=prompts, generator=gen, output_type="pt", **self.sample_kwargs()).images
            else:
                x = pipe(batch_size=n, generator=gen, output_type="pt", **self.sample_kwargs()).images
        from ..eval.report import save_grid

        path = self.out / "samples" / f"{tag}.png"
        save_grid(x, path)
        return path


_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential)


def compile_regions(net: torch.nn.Module) -> int:
    """Compile ``net`` in place by regions (returns how many): a diffusers model's ``_repeated_blocks``
    (transformer blocks), else its innermost repeated blocks (a UNet's residual, attention, down- and upsampling
    blocks: classes that occur twice or more and hold layers), else the whole network. Blocks of one class and
    shape share one compiled graph, so a UNet compiles in a fraction of the whole-model time."""
    if not any(True for _ in net.parameters()):
        return 0
    if getattr(net, "_repeated_blocks", None) and hasattr(net, "compile_repeated_blocks"):
        net.compile_repeated_blocks()
        return len(net._repeated_blocks)
    counts: dict[type, int] = {}
    for m in net.modules():
        counts[type(m)] = counts.get(type(m), 0) + 1

    def block(m) -> bool:
        return (counts[type(m)] >= 2 and not isinstance(m, _CONTAINERS) and any(True for _ in m.children())
                and any(True for _ in m.parameters()))

    regions = [m for m in net.modules() if block(m) and not any(block(d) for d in m.modules() if d is not m)]
    for m in regions or [net]:
        m.compile()
    return len(regions) or 1


def _plain(x):
    """A DTensor reduction (a sharded network's gradient count or norm) as a plain tensor (a collective)."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out

"""The trained networks of a run: building them (a teacher copy, an MLP or a small UNet, with a guidance input
when asked), registering each with its fused AdamW and foreach EMA, the gradient step with its on-device
non-finite guard and clipping, LoRA views on a shared frozen teacher, FSDP2 sharding, attention choice and
``torch.compile`` by regions.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
from pathlib import Path

import diffusers
import torch

from .. import backbones
from ..config import Config
from ..denoiser import Denoiser
from ..ema import ForeachEMA
from ..errors import ConfigError
from ..export import export_lora_adapter
from ..lora import AdapterView, adapter_state_dict, add_adapters, default_targets, matches, merged_copy
from ..models import GuidedTransformer2DModel, GuidedUNet2DModel, MLPDenoiser
from ..objectives.regression import teacher_regression_loss
from ..sharding import gather, reshard
from ..teachers import Teacher


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



def time_scale(teacher: Teacher | None) -> float:
    """``MLPDenoiser.time_scale`` of a fresh student of ``teacher``: on EDM, 1000 over the span of c_noise =
    ln(sigma) / 4 between sigma_min and sigma_max (so its time input covers about 1000, as a VP index does);
    1 otherwise."""
    if teacher is None or teacher.schedule.kind != "edm":
        return 1.0
    ends = teacher.schedule.timestep(torch.tensor([0.0, 1.0], dtype=torch.float64))
    return 1000.0 / float(ends[1] - ends[0])


def build_network(cfg: Config, teacher: Teacher | None, sample_shape: list[int], num_classes: int,
                  guidance_embed_dim: int | None = None):
    """A student / generator / fake-score network as ``student.arch`` says; a fresh network (mlp, unet) is
    class-conditional with a null class (label ``num_classes``) when ``num_classes`` > 0.

    ``guidance_embed_dim``: also take the guidance weight w as input (guided distillation): an
    ``MLPDenoiser`` with a w embedding, or a ``UNet2DModel`` wrapped in ``GuidedUNet2DModel``; in
    both the w branch starts at zero, so a copied teacher is unchanged at w = 0.
    """
    s = cfg.student
    if s.arch == "copy":
        if teacher is None or not any(True for _ in teacher.model.parameters()):
            raise ConfigError("student.arch: 'copy' needs a teacher with weights; the analytic teacher has "
                              "none. Use student.arch=mlp or student.arch=unet.")
        net = teacher.stored_network()  # fp32 master weights as stored, whatever dtype the teacher is held in
        if guidance_embed_dim:
            net = _with_guidance_input(net, guidance_embed_dim)
        return net.requires_grad_(True).train()
    if teacher is not None and teacher.is_latent:
        raise ConfigError(f"student.arch: {s.arch!r} builds a pixel-space network; a latent text-to-image "
                          "teacher needs student.arch=copy (a copy of its UNet2DConditionModel).")
    n_embeds = num_classes + 1 if num_classes else None
    if s.arch == "mlp":
        return MLPDenoiser(data_dim=math.prod(sample_shape), hidden=s.hidden, num_layers=s.num_layers,
                           num_class_embeds=n_embeds,
                           sample_shape=sample_shape if len(sample_shape) > 1 else None,
                           guidance_embed_dim=guidance_embed_dim, time_scale=time_scale(teacher))
    if len(sample_shape) != 3:
        raise ConfigError("student.arch: 'unet' needs image data (C, H, W); the data has shape "
                          f"{sample_shape}.")
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
        # LCM-style guidance input (Luo et al. 2023): time_embedding.cond_proj maps the w embedding into the
        # time embedding's input; zero-initialised, so the copy equals the teacher at every w until it learns
        config = {k: v for k, v in net.config.items() if not k.startswith("_")}
        out = diffusers.UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": dim})
        missing, unexpected = out.load_state_dict(net.state_dict(), strict=False)
        assert not unexpected and set(missing) == {"time_embedding.cond_proj.weight"}, (missing, unexpected)
        torch.nn.init.zeros_(out.time_embedding.cond_proj.weight)
        return out.to(net.device)
    if type(net).__name__ in ("DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel",
                              "FluxTransformer2DModel"):
        return GuidedTransformer2DModel.from_transformer(net, dim)  # w added to the time embedding
    raise ConfigError(f"A guidance input can be added to MLPDenoiser, UNet2DModel, UNet2DConditionModel "
                      f"and the DiT / PixArt / SD3 transformers, not to {type(net).__name__}; use "
                      "student.arch=mlp or student.arch=unet.")



_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential)


def compile_regions(net: torch.nn.Module) -> int:
    """Compile ``net`` in place by regions (returns how many): a diffusers model's ``_repeated_blocks``
    (transformer blocks), else its innermost repeated blocks (a UNet's residual, attention, down- and
    upsampling blocks: classes that occur twice or more and hold layers), else the whole network. Blocks of
    one class and shape share one compiled graph, so a UNet compiles in a fraction of the whole-model time."""
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



class Update:
    """What a method's objective yields: one backward pass of ``loss`` (a scalar), then clipping, the
    non-finite guard and an optimizer step of each registered network in ``networks``, done by the loop.
    The ``yield`` returns the networks' gradient norms by name."""

    def __init__(self, loss: torch.Tensor, *networks: str):
        self.loss = loss
        self.networks = networks


class NetworkRegistry:
    """The registry part of :class:`~distill.engine.loop.DistillationTrainer`: ``modules`` / ``optimizers`` /
    ``emas`` by name, and what a method does with them (``add``, ``unwrap``,
    ``finite_mean``, LoRA views, the export of a network)."""

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
                mult = next((m for prefix, m in (lr_multipliers or {}).items() if pname.startswith(prefix)),
                            1.0)
                groups.setdefault(mult, []).append(p)
            params = [{"params": ps, "lr": lr * m, "lr_mult": m} for m, ps in groups.items()]
            # fused AdamW (one kernel per step; it skips a step with non-finite gradients on the device, see
            # apply_gradients); sharded (DTensor) parameters use the foreach implementation
            kind = self.optimizer_kind()
            self.optimizers[name] = torch.optim.AdamW(params, lr=lr, betas=tuple(betas or o.betas),
                                                      weight_decay=o.weight_decay, eps=o.eps, **kind)
            self._base_lr[name] = lr
        if ema:
            self.emas[name] = ForeachEMA(module.parameters(), decay=self.config.train.ema_decay)

    def optimizer_kind(self) -> dict:
        """AdamW's implementation flags: fused (skips a non-finite step on the device), or foreach for sharded
        (DTensor) parameters. A loaded optimizer state brings the flags of the run that saved it, so
        ``resume`` sets these again."""
        return {"foreach": True, "fused": None} if self.sharded else {"fused": True, "foreach": None}

    def as_denoiser(self, net) -> Denoiser:
        """A trained network of the method read as a denoiser: the teacher's schedule, the method's
        prediction type ``self.pred``, the run's autocast."""
        return Denoiser(net, self.teacher.schedule, self.pred, autocast=self.accelerator.autocast)

    def unwrap(self, name: str) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.modules[name])

    def count(self, key: str, n) -> None:
        """Add ``n`` (a number or a tensor: no host sync here) to a counter that is logged as ``key``,
        summed over the steps since the last log."""
        self._counts[key] = self._counts.get(key, 0) + n

    def flag(self, reason: str, bad: torch.Tensor) -> None:
        """Mark the current step non-finite where ``bad`` (a bool tensor, kept on the device) is True."""
        old = self._flags.get(reason)
        self._flags[reason] = bad if old is None else old | bad

    def finite_mean(self, per_sample: torch.Tensor) -> torch.Tensor:
        """Batch mean of the finite per-sample losses; the dropped samples are counted
        (``nonfinite_samples``). A batch with no finite sample gives a zero loss and marks the step
        non-finite. No host synchronisation."""
        keep = torch.isfinite(per_sample)
        kept = keep.sum()
        self.count("nonfinite_samples", keep.numel() - kept)
        self.flag("every sample's loss", kept == 0)
        return torch.where(keep, per_sample, 0).sum() / kept.clamp_min(1)

    def apply_gradients(self, name: str) -> torch.Tensor | None:
        """Clipping, optimizer step and zero_grad of one network whose gradients are already accumulated;
        returns the (pre-clip) gradient norm as a tensor. An update whose gradient holds a non-finite value is
        skipped (as a loss scaler does): the gradient tensors holding one are counted as
        ``nonfinite_grads/NAME``, the skipped update as ``skipped_updates/NAME``, and the step is marked
        non-finite (see ``train.max_nonfinite_steps``). All of it stays on the device: the norms decide, and
        fused AdamW skips its step (parameters, moments and step count) where ``found_inf`` is set."""
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

    def fit_to_teacher(self, net, steps: int, prediction_type: str,
                       indices: torch.Tensor | None = None) -> None:
        """Regress ``net`` on the teacher's own prediction at noised data for ``steps`` Adam steps.

        The stand-in for "start from a copy of the teacher" when the teacher has no weights to copy
        (the analytic Gaussian-mixture teacher), and MSD's teacher score matching for students smaller
        than the teacher (Song et al. 2024). ``indices``: the data rows to draw from (default: all).
        Seeded, deterministic.
        """
        t, cfg = self.teacher, self.config
        net.to(self.device)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        student = Denoiser(net, t.schedule, prediction_type)
        gen = torch.Generator().manual_seed(cfg.train.seed + 12345)
        for _ in range(steps):
            idx = torch.randint(len(self.data) if indices is None else len(indices), (cfg.train.batch_size,),
                                generator=gen)
            idx = idx if indices is None else indices[idx]
            x0 = self.data.x[idx].to(self.device)
            labels = self.data.labels[idx].to(self.device) if t.num_classes else None
            cond = t.condition(class_labels=labels) if labels is not None and not (labels < 0).any() else None
            # the teacher the trainer distils: with teacher.guidance_scale when set
            loss = teacher_regression_loss(student, t.denoiser, x0, cond, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.zero_grad(set_to_none=True)  # a gradient left here would be added to the first training update

    @property
    def lora(self) -> bool:
        return self.config.student.lora_rank is not None

    def lora_views(self, names: list[str], checkpointing: bool) -> list[AdapterView]:
        """One LoRA adapter per name on the teacher's own network, which stays frozen and shared; the teacher
        becomes the view with every adapter off. Returns the views, in ``names`` order (see
        :mod:`distill.lora`)."""
        s, base = self.config.student, self.teacher.weights
        kind = self.teacher.schedule.kind
        flow_stock = backbones.stock_pipeline(base) in ("StableDiffusion3Pipeline", "FluxPipeline")
        if kind != "vp" and not flow_stock:  # the adapter's export names the teacher pipeline's scheduler
            name = type(self.teacher.scheduler).__name__
            raise ConfigError(f"student.lora_rank={s.lora_rank} with a {name} teacher ({kind} noise "
                              "schedule): LoRA students are exported for the teacher's own pipeline with a "
                              "VP scheduler, or for SD3 / FLUX.1 with their flow scheduler, only; remove "
                              "student.lora_rank (a full student trains on every family).")
        t_star = getattr(getattr(self, "section", None), "generator_timestep", None)
        if flow_stock and t_star is not None and t_star != self.teacher.schedule.num_train_timesteps - 1:
            raise ConfigError(f"student.lora_rank with generator_timestep={t_star} on a flow teacher: "
                              "the teacher's own pipeline starts from pure noise, so a LoRA one-step student "
                              f"must be the generator at s = 1; set {self.method}.generator_timestep="
                              f"{self.teacher.schedule.num_train_timesteps - 1} or train a full student.")
        targets = s.lora_target_modules or default_targets(base)
        if not targets:
            raise ConfigError("student.lora_rank needs student.lora_target_modules for a "
                              f"{type(base).__name__} teacher (module name suffixes to adapt, e.g. ['to_q', "
                              "'to_k', 'to_v']); defaults exist for UNet2DModel and UNet2DConditionModel.")
        if not matches(base, targets):
            raise ConfigError(f"student.lora_target_modules={targets} matches no layer of the teacher's "
                              f"{type(base).__name__}: name module suffixes such as 'to_q' or 'conv1'.")
        add_adapters(base, names, s.lora_rank, s.lora_alpha, targets)
        self.teacher.model = AdapterView(base, None, checkpointing)
        return [AdapterView(base, n, checkpointing) for n in names]

    def export_network(self, name: str) -> torch.nn.Module:
        """A registered network as a plain standalone network (a LoRA view: merged into a copy of the
        base)."""
        net = self.unwrap(name)
        return merged_copy(net, self.teacher.stored_network().eval()) if isinstance(net, AdapterView) else net

    def lora_inference(self) -> tuple:
        """(scheduler, call kwargs) with which the teacher's own pipeline plus the student adapter samples."""
        raise NotImplementedError

    def export_lora(self) -> Path:
        """``output_dir/lora``: the student adapter for the teacher's own pipeline (see
        export_lora_adapter)."""
        t = self.teacher
        pipeline = backbones.stock_pipeline(t.weights) if t.is_text or t.is_latent else None
        if t.is_text and pipeline is None:
            pipeline = "StableDiffusionXLPipeline" if len(t.text_encoders) > 1 else "StableDiffusionPipeline"
        scheduler, kwargs = self.lora_inference()
        view = self.unwrap("student")
        return export_lora_adapter(adapter_state_dict(view), view.shared_base.distill_lora_config,
                                   self.out / "lora", scheduler, kwargs, self.card_info(), pipeline)

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
            raise ConfigError("train.attention=xformers needs the xformers package and a CUDA device (pip "
                              "install xformers); use train.attention=sdpa or auto.")
        choice = "xformers" if want == "xformers" or (want == "auto" and have) else "sdpa"
        if choice == "xformers":
            for n in nets:
                n.enable_xformers_memory_efficient_attention()
        self.accelerator.print("attention: " + ("xformers memory-efficient attention" if choice == "xformers"
                                                else "PyTorch scaled_dot_product_attention (SDPA)"))
        return choice

    def shard(self) -> None:
        """FSDP2-shard every network that has an optimizer (its optimizer and EMA rebuilt over the sharded
        parameters); frozen networks stay replicated. Keeps an unsharded template of each on the meta device
        for the export."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ConfigError("train.fsdp shards over the processes of a distributed launch, and this is a "
                              "single process: `distill launch --config_file configs/accelerate/fsdp.yaml "
                              "CONFIG` (or `distill launch --multi_gpu --num_processes N CONFIG "
                              "train.fsdp=true`).")
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401

            from ..sharding import shard_network
        except ImportError as err:
            raise ConfigError(f"train.fsdp needs PyTorch's FSDP2 (torch >= 2.6; this is {torch.__version__}: "
                              f"{err}).") from None
        self._templates = {}
        self.sharded = True
        for name in list(self.optimizers):
            net = self.modules[name]
            self._templates[name] = copy.deepcopy(net).to("meta")
            shard_network(net)
            self._optimize(name)
        self.accelerator.print(f"sharding: FSDP2 over {self.accelerator.num_processes} process(es) for "
                               f"{', '.join(self._templates)}; frozen networks replicated")

    def compile_networks(self) -> None:
        """``train.compile``: every network (the teacher's too) compiled in place with ``torch.compile``
        (``nn.Module.compile``: state-dict keys unchanged). Compilation happens at the first update, whose
        time is reported separately (``compile_seconds``)."""
        nets = [self.teacher.weights] if self.teacher is not None else []
        nets += [getattr(m, "shared_base", m) for m in self.modules.values()]
        regions = sum(compile_regions(net) for net in {id(n): n for n in nets}.values())
        self.accelerator.print(f"train.compile: {regions} region(s) of {len(nets)} network(s) compiled with "
                               "torch.compile (inductor); the first update includes the compilation")

    def unshard(self) -> None:
        """End of a sharded run: every process gathers the trained networks (EMA weights where tracked); the
        main process rebuilds them unsharded for the export. The EMA has been applied, so it is dropped."""
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

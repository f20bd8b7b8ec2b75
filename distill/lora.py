"""LoRA students that share the teacher's frozen weights (Hu et al. 2022, "LoRA: Low-Rank Adaptation of
Large Language Models", eq. 3: W x + (alpha / r) B A x, with B = 0 at the start).

A score-distillation run holds a teacher, a fake score and a student: three copies of a large UNet. With
``student.lora_rank`` set they become ONE frozen base network (the teacher's own weights, in the training
dtype) carrying two peft LoRA adapters, and three :class:`AdapterView` s of it:

* the teacher: the base with every adapter off;
* the student (generator): the base with adapter ``"student"``;
* the fake score (or progressive's round teacher): the base with its own adapter.

A view's parameters are its adapter's only, so optimizers, EMA, checkpoints, gradient clipping and the
trainable-parameter count see the adapter and nothing else. The adapter switch is made per forward pass
and restored after it (peft's own ``set_adapter`` would also flip ``requires_grad``, which the trainers
manage themselves). Gradient checkpointing must recompute a view's forward with the same adapter, so a
view checkpoints its whole forward pass (its recomputation re-enters the view) instead of diffusers'
per-block checkpointing, whose recomputation would run with whatever adapter is active at backward time.

Exports: :func:`merged_copy` (stored base + adapter as one plain network, for the self-contained pipeline) and
:func:`adapter_state_dict` (peft key format, written in diffusers' LoRA format by the trainers' export).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch

# LCM-LoRA's targets (diffusers examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py): attention
# projections, feed-forward, resnet convolutions, resampling convolutions and the time-embedding projections
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                "time_emb_proj"]
# transformers: the attention and feed-forward projections (DiT's blocks; SD3's and FLUX.1's joint blocks with
# their text-stream projections, as diffusers' examples/dreambooth/train_dreambooth_lora_{sd3,flux}.py target)
DIT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
JOINT_TARGETS = DIT_TARGETS + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                               "ff_context.net.0.proj", "ff_context.net.2"]
DEFAULT_TARGETS = {"UNet2DConditionModel": UNET_TARGETS, "UNet2DModel": UNET_TARGETS,
                   "DiTTransformer2DModel": DIT_TARGETS, "PixArtTransformer2DModel": DIT_TARGETS,
                   "SD3Transformer2DModel": JOINT_TARGETS,
                   "FluxTransformer2DModel": JOINT_TARGETS + ["proj_mlp"]}


def default_targets(net) -> list[str] | None:
    return DEFAULT_TARGETS.get(type(net).__name__)


def matches(net, targets: list[str]) -> list[str]:
    """Names of the modules of ``net`` that ``targets`` (module-name suffixes, peft's rule) select."""
    return [n for n, _ in net.named_modules() if any(n == t or n.endswith("." + t) for t in targets)]


def tuner_layers(net) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in net.modules() if isinstance(m, BaseTunerLayer)]


def add_adapters(base: torch.nn.Module, names: list[str], rank: int, alpha: float | None,
                 targets: list[str]) -> None:
    """Inject one LoRA adapter per name into ``base`` (in place), adapter weights in fp32 whatever the base's
    dtype (they are trained), all adapters off until a view switches one on."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=targets,
                        init_lora_weights=True)
    # peft warns that a second adapter joins the first: that is the design here
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for name in names:
            inject_adapter_in_model(config, base, adapter_name=name)
    for layer in tuner_layers(base):
        for key in ("lora_A", "lora_B"):
            for mod in getattr(layer, key).values():
                mod.float().requires_grad_(True)
        layer._disable_adapters = True
    base.distill_lora_config = {"r": rank, "lora_alpha": config.lora_alpha, "target_modules": list(targets)}


@contextmanager
def adapter_on(layers: list, name: str | None):
    """Adapter ``name`` (None: none) active in ``layers`` for the block; the previous state restored after."""
    saved = [(m._active_adapter, m._disable_adapters) for m in layers]
    for m in layers:
        if name is None:
            m._disable_adapters = True
        else:
            m._active_adapter, m._disable_adapters = [name], False
    try:
        yield
    finally:
        for m, (active, disabled) in zip(layers, saved):
            m._active_adapter, m._disable_adapters = active, disabled


class AdapterView(torch.nn.Module):
    """The shared ``base`` network run with one adapter (``adapter=None``: the frozen base alone).

    Its registered parameters are the adapter's LoRA matrices (the same tensors the base holds); the base
    itself is not a submodule, so ``.to()``, ``state_dict()``, optimizers and EMA leave the frozen weights
    alone. ``checkpointing``: recompute the whole forward pass in backward (see the module docstring).
    """

    def __init__(self, base: torch.nn.Module, adapter: str | None, checkpointing: bool = False):
        super().__init__()
        object.__setattr__(self, "shared_base", base)  # not registered: it belongs to the teacher
        object.__setattr__(self, "_layers", tuner_layers(base))
        self.adapter = adapter
        self.checkpointing = checkpointing
        self.lora = torch.nn.ModuleDict()
        if adapter is not None:
            tuned = {id(m) for m in self._layers}
            for path, layer in base.named_modules():
                if id(layer) in tuned:
                    for key in ("lora_A", "lora_B"):
                        self.lora[f"{path}.{key}".replace(".", ":")] = getattr(layer, key)[adapter]

    @property
    def config(self):
        return self.shared_base.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.shared_base.parameters()).dtype

    def active(self) -> bool:
        """Whether this view's adapter is the one running now (a forward hook on a shared submodule asks)."""
        layer = self._layers[0]
        if self.adapter is None:
            return layer._disable_adapters
        return not layer._disable_adapters and layer._active_adapter == [self.adapter]

    def _run(self, *args, **kwargs):
        with adapter_on(self._layers, self.adapter):
            return self.shared_base(*args, **kwargs)

    def forward(self, *args, **kwargs):
        if self.checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._run, *args, use_reentrant=False, **kwargs)
        return self._run(*args, **kwargs)


def adapter_state_dict(view: AdapterView) -> dict[str, torch.Tensor]:
    """The view's adapter in peft's key format (``<module>.lora_A.weight``), fp32 copies on the CPU."""
    return {key.replace(":", ".") + ".weight": mod.weight.detach().float().cpu().clone()
            for key, mod in view.lora.items()}


def merged_copy(view: AdapterView, stored: torch.nn.Module) -> torch.nn.Module:
    """``stored`` (a plain copy of the base network, e.g. re-read in its stored precision) with the view's
    adapter merged into its weights: W + (alpha / r) B A per adapted layer. Returns ``stored``."""
    if view.adapter is None:
        return stored
    for path, layer in view.shared_base.named_modules():
        if any(layer is m for m in view._layers):
            target = stored.get_submodule(path)
            with torch.no_grad():
                delta = layer.get_delta_weight(view.adapter)
                target.weight.add_(delta.to(target.weight.device, target.weight.dtype))
    return stored

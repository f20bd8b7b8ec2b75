"""Memory estimate of a distillation run: ``distill estimate-memory CONFIG``.

Per network of the config's method: parameters, weights (fp32 for trained networks and the frozen copies
distill keeps in fp32, the training dtype for the teacher and its VAE / text encoders), gradients (fp32),
AdamW state (two fp32 moments), the EMA copy, and the activations saved for backward at the config's batch
size. Activations are counted, not guessed: each network runs one forward pass on PyTorch's ``meta`` device
(shapes only, no memory, no weights downloaded: only the component ``config.json`` files are read) under a
saved-tensor hook that adds up what autograd keeps, with the method's requires-grad pattern (a trained
network keeps what its weights need; a frozen network the generator differentiates through keeps what its
input needs; a frozen network without gradient keeps nothing).

The peak of one training step is

    weights + optimizer state + EMA + max(activations of the largest update, gradients of one network)
    (+ on CUDA, the foreach AdamW step's temporary: one fp32 moment of the largest trained network)

because a network's gradients are freed after its optimizer step (``zero_grad(set_to_none=True)``) and the
saved activations are released during the backward pass that creates the gradients. With
``gradient_checkpointing`` the saved activations of an update are replaced by the largest single forward
pass (its recomputation; an upper bound for per-block checkpointing). bf16 mixed precision is counted as
bf16 activations. Transient buffers (prompt encoding, VAE encoding under ``no_grad``, the allocator's
fragmentation and the CUDA context, about 0.5 GiB) are not counted.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import backbones
from .config import Config
from .errors import ConfigError
from .lora import adapter_on, add_adapters, default_targets, tuner_layers

GIB = 1024**3
METHODS = ("sim", "uni_instruct", "progressive", "guided")


@dataclass
class NetworkMemory:
    name: str
    role: str
    params: int
    trainable: int
    weights: int  # bytes
    grads: int = 0
    optimizer: int = 0
    ema: int = 0
    activations: int = 0  # saved for backward in this network's heaviest forward pass of one step


@dataclass
class MemoryEstimate:
    networks: list[NetworkMemory]
    passes: list[int]  # saved activations of each forward pass of the heaviest update
    other_passes: list[int]  # the other update's (the fake score's)
    step_temporary: int
    checkpointing: bool
    notes: list[str] = field(default_factory=list)

    @property
    def update_activations(self) -> int:
        """Saved activations of the heaviest update: all its passes together, or with gradient checkpointing
        the largest single pass (its recomputation)."""
        def total(passes):
            return max(passes, default=0) if self.checkpointing else sum(passes)

        return max(total(self.passes), total(self.other_passes))

    @property
    def static(self) -> int:
        return sum(n.weights + n.optimizer + n.ema for n in self.networks)

    @property
    def peak(self) -> int:
        grads = max((n.grads for n in self.networks), default=0)
        return self.static + max(self.update_activations, grads) + self.step_temporary

    def table(self) -> str:
        rows = ["| network | role | parameters | trainable | weights | grads | optimizer | EMA | "
                "activations |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for n in self.networks:
            rows.append(f"| {n.name} | {n.role} | {n.params / 1e6:.1f}M | {n.trainable / 1e6:.2f}M | "
                        f"{_gib(n.weights)} | {_gib(n.grads)} | {_gib(n.optimizer)} | {_gib(n.ema)} | "
                        f"{_gib(n.activations)} |")
        rows += ["", f"Peak of one training step: {_gib(self.peak)} GiB = weights, optimizer state and EMA "
                     f"{_gib(self.static)} GiB + max(activations of one update "
                     f"{_gib(self.update_activations)} GiB, gradients of one network) + step temporary "
                     f"{_gib(self.step_temporary)} GiB."]
        return "\n".join(rows + [f"- {note}" for note in self.notes])


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


# ---------------------------------------------------------------------- reading the teacher's configs
def _teacher_folder(path: str) -> Path:
    from .teachers import ASSETS, BUILTIN

    if path in BUILTIN:
        return ASSETS / BUILTIN[path]
    if path.startswith("analytic:"):
        raise ConfigError(f"teacher.path={path!r} is an analytic mixture (no network); estimate-memory is "
                          "for teachers with a UNet (a diffusers pipeline folder or Hub id).")
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    from .export import resolve_pretrained

    try:  # the configs only: a few kB, no weights
        return Path(snapshot_download(path, allow_patterns=["*.json", "*.txt"]))
    except Exception:
        return resolve_pretrained(path)  # its error says what to do


def _meta_component(folder: Path, name: str, spec):
    from .teacher_folder import component_class

    lib, cls_name = spec
    with torch.device("meta"):
        if lib == "transformers":
            import transformers

            cls = getattr(transformers, cls_name)
            config = cls.config_class.from_pretrained(folder / name)
            return cls._from_config(config)
        cls = component_class(spec)
        return cls.from_config(cls.load_config(folder / name))


def meta_teacher(path: str) -> dict:
    """The teacher's parts built on the meta device from their config files: ``net``, ``frozen`` (VAE,
    text encoders), ``latent_scale`` (VAE factor) and the text encoders' output widths."""
    from .export import read_model_index

    folder = _teacher_folder(path)
    index = read_model_index(folder)
    net_name = next((k for k in ("unet", "transformer") if k in index), None)
    if net_name is None:
        raise ConfigError(f"Teacher folder {str(folder)!r} has no unet: nothing to estimate.")
    parts = {"net": _meta_component(folder, net_name, index[net_name]), "frozen": {}}
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if name in index and index[name][0] is not None:
            parts["frozen"][name] = _meta_component(folder, name, index[name])
    return parts


# ---------------------------------------------------------------------- counting saved activations
def saved_bytes(net, args: tuple, kwargs: dict, trained: list, input_grad: bool, dtype) -> int:
    """Bytes autograd saves for backward in one forward pass of ``net`` on the meta device, with gradients
    for the ``trained`` parameters and (``input_grad``) for the floating-point inputs."""
    if not (trained or input_grad):
        return 0
    weights = {id(p) for p in net.parameters()}
    seen: dict[int, torch.Tensor] = {}

    def pack(t):
        base = t._base if t._base is not None else t
        # a weight saved for backward costs nothing extra
        if id(t) not in weights and id(base) not in weights:
            seen[id(base)] = base
        return t

    train = {id(p) for p in trained}
    for p in net.parameters():
        p.requires_grad_(id(p) in train)
    args = tuple(a.detach().requires_grad_(input_grad) if torch.is_tensor(a) and a.is_floating_point() else a
                 for a in args)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _fused_attention():
        if len(args) == 2:  # a denoiser's (x, t): the backbone's call (FLUX's packing, keyword times)
            backbones.forward(net, *args, **kwargs)
        else:
            net(*args, **kwargs)
    total = 0
    for t in seen.values():
        size = torch.finfo(dtype).bits // 8 if t.is_floating_point() else t.element_size()
        total += t.numel() * size
    return total


class _FlashAttention(torch.autograd.Function):
    """What a fused attention kernel (PyTorch SDPA's flash / memory-efficient path, xformers) keeps for
    backward: q, k, v, the output and the row log-sum-exp, never the L x L attention matrix that the meta
    device's reference implementation would save."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextmanager
def _fused_attention():
    original = F.scaled_dot_product_attention
    def fused(*args, **kwargs):  # diffusers' attention dispatch passes query= / key= / value= by keyword
        q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")[len(args):]])[:3]
        return _FlashAttention.apply(q, k, v)

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _forward_inputs(net, batch: int, sample_shape, dtype, text_encoder):
    """Meta inputs of one forward pass: the noisy sample, the time and the condition the backbone takes
    (SD / SDXL: 77 CLIP tokens; SD3: 77 CLIP + 256 T5 tokens and the pooled CLIP-L / -G; FLUX.1: 512 T5
    tokens, CLIP-L pooled and the embedded guidance; class labels for UNet2DModel and DiT)."""
    x = torch.empty(batch, *sample_shape, device="meta", dtype=dtype)
    t = torch.zeros(batch, device="meta", dtype=torch.long)
    kw = {}
    cfg = net.config
    style = backbones.text_encoding(net)

    def empty(*shape):
        return torch.empty(batch, *shape, device="meta", dtype=dtype)

    if text_encoder is not None and style in ("sd3", "flux"):
        kw["encoder_hidden_states"] = empty(77 + 256 if style == "sd3" else 512, cfg.joint_attention_dim)
        kw["pooled_projections"] = empty(cfg.pooled_projection_dim)
        if backbones.embeds_guidance(net):
            kw["guidance"] = torch.empty(batch, device="meta", dtype=torch.float32)
    elif text_encoder is not None:  # SD-format: 77 prompt tokens
        kw["encoder_hidden_states"] = empty(77, cfg.cross_attention_dim)
        if getattr(cfg, "addition_embed_type", None) == "text_time":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kw["added_cond_kwargs"] = {"text_embeds": empty(pooled), "time_ids": empty(6)}
    elif getattr(cfg, "num_class_embeds", None) or getattr(cfg, "norm_type", None) == "ada_norm_zero":
        kw["class_labels"] = torch.zeros(batch, device="meta", dtype=torch.long)
    return (x, t), kw


# ---------------------------------------------------------------------- the estimate
def estimate(cfg: Config, device: str = "cuda") -> MemoryEstimate:
    """Memory of one training step of ``cfg`` (see the module docstring)."""
    if cfg.method not in METHODS:
        raise ConfigError(f"estimate-memory covers methods {', '.join(METHODS)}; method {cfg.method!r} is "
                          "not covered.")
    parts = meta_teacher(cfg.teacher.path)
    net = parts["net"]
    bf16 = cfg.train.mixed_precision == "bf16"
    low = torch.bfloat16 if bf16 else torch.float32
    low_bytes = 2 if bf16 else 4
    n_params = sum(p.numel() for p in net.parameters())
    text = parts["frozen"].get("text_encoder")
    channels, size, _ = backbones.latent_shape(net)
    if cfg.data.resolution and "vae" in parts["frozen"]:
        factor = 2 ** (len(parts["frozen"]["vae"].config.block_out_channels) - 1)
        size = cfg.data.resolution // factor
    sample_shape = [channels, size, size]
    b = cfg.train.batch_size
    one_step = cfg.method in ("sim", "uni_instruct")
    section = getattr(cfg, cfg.method)
    checkpointing = bool(getattr(section, "gradient_checkpointing", False))
    lora = cfg.student.lora_rank is not None
    rows: list[NetworkMemory] = [NetworkMemory("teacher", "frozen", n_params, 0, n_params * low_bytes)]
    for name, part in parts["frozen"].items():
        n = sum(p.numel() for p in part.parameters())
        rows.append(NetworkMemory(name, "frozen", n, 0, n * low_bytes))
    notes = [f"batch {b}, samples {'x'.join(map(str, sample_shape))}, {'bf16' if bf16 else 'fp32'} "
             "activations" + (", gradient checkpointing" if checkpointing else "")]
    trained = ["student", "fake"] if one_step else ["student"]
    if lora:
        targets = cfg.student.lora_target_modules or default_targets(net)
        add_adapters(net, ["probe"], cfg.student.lora_rank, cfg.student.lora_alpha, targets)
        n_train = sum(p.numel() for n_, p in net.named_parameters() if ".probe." in n_)
        notes.append(f"LoRA rank {cfg.student.lora_rank}: student and fake are adapters on the teacher's "
                     "weights")
    else:
        n_train = n_params
    for name in trained:
        ema = name == "student" and one_step
        rows.append(NetworkMemory(name, "trained", n_train if lora else n_params, n_train,
                                  0 if lora else n_train * 4, grads=n_train * 4, optimizer=n_train * 8,
                                  ema=n_train * 4 if ema else 0))
        if lora:
            rows[-1].weights = n_train * 4  # the fp32 adapter (the base weights are the teacher's row)
    if cfg.method in ("progressive", "guided"):
        rows.append(NetworkMemory("round_teacher", "frozen copy", n_train, 0, n_train * 4))

    # saved activations per forward pass, with the method's requires-grad pattern
    if bf16:
        torch.nn.Module.to(net, torch.bfloat16)  # (on meta: shapes only; diffusers' own .to() warns here)
    args, kw = _forward_inputs(net, b, sample_shape, low, text)
    adapter = [p for n_, p in net.named_parameters() if ".probe." in n_]
    with adapter_on(tuner_layers(net), "probe" if lora else None):  # student and fake: the adapter on (LoRA)
        trained_fwd = saved_bytes(net, args, kw, adapter if lora else list(net.parameters()), False, low)
        # a frozen network differentiated through its input: the fake score; the teacher's pass is the same
        # network (for LoRA without the adapter's few saved inputs), on twice the batch with CFG; saved
        # activations are linear in the batch
        # (Diff-Instruct / DMD without a GAN term: those passes run without autograd and keep nothing)
        detached = cfg.method == "uni_instruct" and section.detaches_teacher_and_fake
        through = saved_bytes(net, args, kw, [], True, low) if one_step and not detached else 0
    teacher_through = through * (2 if cfg.teacher.guidance_scale is not None and one_step else 1)
    for r in rows:
        r.activations = {"student": trained_fwd, "fake": trained_fwd,
                         "teacher": teacher_through}.get(r.name, 0)
    if one_step:  # generator update: student (weights) + teacher and fake (inputs); fake update: fake alone
        passes = [trained_fwd, teacher_through, through]
        # + the discriminator's real-data pass
        other = [trained_fwd] * (2 if cfg.method == "uni_instruct" and section.uses_discriminator else 1)
    else:
        passes, other = [trained_fwd], []
    if checkpointing:
        notes.append("gradient checkpointing: an update keeps its inputs and recomputes one pass at a time")
    temp = max((r.trainable for r in rows), default=0) * 4 if device == "cuda" else 0
    return MemoryEstimate(rows, passes, other, temp, checkpointing, notes)


def estimate_json(est: MemoryEstimate) -> str:
    return json.dumps({"peak_bytes": est.peak, "update_activations": est.update_activations,
                       "networks": [n.__dict__ for n in est.networks]}, indent=1)


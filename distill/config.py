"""Typed configuration: YAML in, dotted overrides, strict validation.

A config maps onto :class:`Config`: shared sections (``teacher``, ``data``, ``student``, ``optim``,
``train``, ``eval``) plus one section per method. Unknown keys, wrong types and impossible values
raise :class:`ConfigError` naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Union

import yaml

from .errors import ConfigError, require

if TYPE_CHECKING:
    from .trainers.guided import GuidedConfig
    from .trainers.mar import MARConfig
    from .trainers.multi_student import MSDConfig
    from .trainers.progressive import ProgressiveConfig
    from .trainers.sim import SIMConfig
    from .trainers.teacher import TeacherTrainConfig
    from .trainers.uni_instruct import UniInstructConfig


@dataclass
class TeacherConfig:
    """Where the teacher comes from: a diffusers folder or Hub id, ``builtin:digits``, or
    ``analytic:gaussians8`` / ``analytic:gaussians25`` (the exact Gaussian-mixture teacher)."""

    path: str = "builtin:digits"
    guidance_scale: float | None = None  # CFG of the teacher (diffusers convention); None = no guidance
    # FLUX.1-dev: two-pass CFG against the empty prompt on top of its embedded guidance_scale (FluxPipeline's
    # true_cfg_scale); None = one pass
    true_cfg_scale: float | None = None
    # a class-conditional UNet teacher whose folder does not say its class count: its classes, label
    # num_classes being the null class (= num_class_embeds - 1); distill's own exports say it
    num_classes: int | None = None
    # analytic teachers only:
    noise: Literal["vp", "edm", "flow"] = "vp"  # the family the exact mixture is written in
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon"  # vp (edm: epsilon / v)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"  # vp
    flow_shift: float = 1.0  # flow: the static shift of its sigmas
    conditional: bool = False


@dataclass
class DataConfig:
    """Training data (and the default FID reference): see :mod:`distill.data` for specs."""

    spec: str = "sklearn:digits"
    resolution: int | None = None  # None: the teacher's image resolution (teacher training: the data's)
    channels: int | None = None  # None: the teacher's image channels (teacher training: 3, or 1 for digits)
    num_samples: int = 20000  # toy data sets only
    # image+caption data / .csv / .jsonl prompts; None: prompt, caption or text
    caption_column: str | None = None
    # prompts-only data (prompts:FILE) for methods that need clean samples (progressive, guided,
    # Uni-Instruct's discriminator): the clean latents are the teacher's own DDIM samples with this many steps
    teacher_sample_steps: int = 25
    # image data sets up to this size (as uint8) are decoded once and kept on the training device; larger ones
    # are decoded every step (0: always)
    device_cache_gib: float = 2.0
    # DataLoader workers decoding the images of larger data sets ahead (0: in the main process)
    num_workers: int = 2


@dataclass
class StudentConfig:
    """The network trained as student / generator / fake score."""

    arch: Literal["copy", "mlp", "unet"] = "copy"  # copy = the teacher's own architecture and weights
    hidden: int = 256  # mlp
    num_layers: int = 3  # mlp
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # unet
    layers_per_block: int = 1  # unet
    attention: bool = True  # unet: attention in the lowest-resolution blocks
    prediction_type: Literal["epsilon", "sample", "v_prediction"] | None = None  # None = the teacher's
    # LoRA (sim, uni_instruct, progressive; student.arch=copy): student and fake score are adapters on ONE
    # frozen copy of the teacher (distill.lora). null = full networks
    lora_rank: int | None = None
    lora_alpha: float | None = None  # null = lora_rank (scale 1)
    # null = LCM-LoRA's list for UNet2DModel / UNet2DConditionModel
    lora_target_modules: list[str] | None = None


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    lr_warmup_steps: int = 0
    # step decay: lr *= lr_gamma at each of these updates
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 64  # per process
    seed: int = 0
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint folder
    # resume although optimizer / data / method-section values differ from the checkpoint's (never method,
    # teacher or student): for deliberate changes such as a new learning rate
    resume_allow_config_change: bool = False
    # stop after this many steps in a row with non-finite losses or gradients (each such update is skipped)
    max_nonfinite_steps: int = 20
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # fp16 is refused with a message (see validate)
    gradient_accumulation_steps: int = 1
    ema_decay: float = 0.999
    log_every: int = 10
    sample_every: int = 0  # 0: a sample grid at the end only
    report_to: Literal["tensorboard", "none"] = "tensorboard"
    progress_bar: bool = True
    # shard every trained network with PyTorch FSDP2 over the launch's processes (sim, uni_instruct; set by an
    # Accelerate FSDP launch too, see configs/accelerate/fsdp.yaml)
    fsdp: bool = False
    # attention of diffusers networks: auto = xformers when installed and on CUDA, else PyTorch SDPA
    attention: Literal["auto", "sdpa", "xformers"] = "auto"
    # compile every network with torch.compile (inductor; CPU and CUDA): the first update compiles
    compile: bool = False


@dataclass
class EvalConfig:
    """FID report written at the end of training (``distill fid`` has the same options)."""

    enabled: bool = False
    reference: str | None = None  # data spec; default: data.spec
    num_samples: int = 1000
    feature_extractor: Literal["digits", "inception-v3-compat"] = "digits"
    feature_extractor_weights: str | None = None
    teacher_steps: list[int] = field(default_factory=list)  # also evaluate the teacher at these step counts
    # guidance scales (diffusers convention) at which guidance-conditioned students and a class-conditional
    # teacher (with classifier-free guidance) are evaluated; empty = each pipeline's default
    guidance_scales: list[float] = field(default_factory=list)
    batch_size: int = 250
    seed: int = 0
    metrics: list[str] = field(default_factory=lambda: ["fid", "kid", "prc"])


def method_sections() -> dict[str, type]:
    """Each method's config section: a dataclass with ``validate(cfg)``, defined in the method's trainer
    file (imported on first use)."""
    from .trainers.guided import GuidedConfig
    from .trainers.mar import MARConfig
    from .trainers.multi_student import MSDConfig
    from .trainers.progressive import ProgressiveConfig
    from .trainers.sim import SIMConfig
    from .trainers.teacher import TeacherTrainConfig
    from .trainers.uni_instruct import UniInstructConfig

    return {"teacher_train": TeacherTrainConfig, "sim": SIMConfig, "uni_instruct": UniInstructConfig,
            "progressive": ProgressiveConfig, "guided": GuidedConfig, "msd": MSDConfig, "mar": MARConfig}


def _section(name: str):
    return field(default_factory=lambda: method_sections()[name]())


@dataclass
class Config:
    method: Literal["teacher", "sim", "uni_instruct", "progressive", "guided", "msd", "mar"] = "sim"
    output_dir: str = "outputs/run"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    teacher_train: TeacherTrainConfig = _section("teacher_train")
    sim: SIMConfig = _section("sim")
    uni_instruct: UniInstructConfig = _section("uni_instruct")
    progressive: ProgressiveConfig = _section("progressive")
    guided: GuidedConfig = _section("guided")
    msd: MSDConfig = _section("msd")
    mar: MARConfig = _section("mar")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.to_yaml())


# ---------------------------------------------------------------------- parsing
def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_describe(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str):
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: {value!r} is not valid; expected {_describe(tp)}.")
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}.")
    if origin is Literal:
        allowed = typing.get_args(tp)
        # YAML 1.1 reads a bare `no` (train.mixed_precision=no) as false
        if value is False and "no" in allowed:
            value = "no"
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of "
                              f"{', '.join(map(repr, allowed))}.")
        return value
    if origin is list:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
            except yaml.YAMLError:
                raise ConfigError(f"{key}: {value!r} is not a list; write it as [a, b] or a,b.") from None
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}.")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}: expected true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}.")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}.") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}.")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}.") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}.")
        return str(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp}.")


def field_types(cls) -> dict:
    """The resolved type of each field of a config dataclass (the method sections included)."""
    return typing.get_type_hints(cls, localns={c.__name__: c for c in method_sections().values()})


def _build(cls, data, prefix: str = ""):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}.")
    hints = field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"Unknown config key {full!r}; allowed keys here: {', '.join(names)}.")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Override {dotted!r}: {p!r} is not a section.")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like key.sub=value (e.g. train.max_steps=200).")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:  # not YAML (e.g. 'a: b', an unclosed quote): the text itself
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or nothing), apply dotted overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file {str(p)!r} not found. The configs shipped with distill are in "
                              "configs/.")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"Config file {str(p)!r} is not valid YAML: "
                              f"{' '.join(str(err).split())}") from None
    data = _merge(data, parse_overrides(overrides or []))
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Values that parse but cannot work: the shared sections here, each method's section in its own
    ``validate``. Everything a config alone can get wrong is found here, before any teacher, data or network
    loads."""
    t = cfg.train
    require([
        (t.max_steps >= 1, "train.max_steps", t.max_steps, "an integer >= 1"),
        (t.batch_size >= 1, "train.batch_size", t.batch_size, "an integer >= 1"),
        (t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps",
         t.gradient_accumulation_steps, "an integer >= 1"),
        (t.checkpointing_steps >= 1, "train.checkpointing_steps", t.checkpointing_steps, "an integer >= 1"),
        (t.checkpoints_total_limit is None or t.checkpoints_total_limit >= 1, "train.checkpoints_total_limit",
         t.checkpoints_total_limit, "null or an integer >= 1"),
        (t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", t.max_nonfinite_steps, "an integer >= 1"),
        (t.log_every >= 1, "train.log_every", t.log_every, "an integer >= 1"),
        (0.0 <= t.ema_decay < 1.0, "train.ema_decay", t.ema_decay, "a number in [0, 1)"),
        (cfg.optim.lr > 0, "optim.lr", cfg.optim.lr, "a positive number"),
        (all(m >= 1 for m in cfg.optim.lr_milestones) and list(cfg.optim.lr_milestones) == sorted(
            set(cfg.optim.lr_milestones)), "optim.lr_milestones", cfg.optim.lr_milestones,
         "increasing update counts >= 1, e.g. [2000]"),
        (0 < cfg.optim.lr_gamma <= 1, "optim.lr_gamma", cfg.optim.lr_gamma, "a number in (0, 1]"),
        (len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas",
         cfg.optim.betas, "two numbers in [0, 1)"),
        (cfg.data.teacher_sample_steps >= 1, "data.teacher_sample_steps", cfg.data.teacher_sample_steps,
         "an integer >= 1"),
        (cfg.data.device_cache_gib >= 0, "data.device_cache_gib", cfg.data.device_cache_gib, "a number >= 0"),
        (cfg.data.num_workers >= 0, "data.num_workers", cfg.data.num_workers, "an integer >= 0"),
        (cfg.eval.num_samples >= 2, "eval.num_samples", cfg.eval.num_samples, "an integer >= 2"),
        (cfg.teacher.flow_shift > 0, "teacher.flow_shift", cfg.teacher.flow_shift, "a positive number"),
        (cfg.teacher.true_cfg_scale is None or cfg.teacher.true_cfg_scale >= 1, "teacher.true_cfg_scale",
         cfg.teacher.true_cfg_scale, "null or a number >= 1 (FluxPipeline's true_cfg_scale; 1 = one pass)"),
    ])
    tc = cfg.teacher
    if not tc.path.startswith("analytic:") and (tc.noise != "vp" or tc.flow_shift != 1.0):
        raise ConfigError(f"teacher.noise={tc.noise} / teacher.flow_shift={tc.flow_shift} choose the family "
                          f"of an analytic: teacher; teacher.path={tc.path!r} brings its own scheduler (its "
                          "scheduler config decides the family): remove them.")
    if tc.noise == "edm" and tc.prediction_type == "sample":
        raise ConfigError("teacher.prediction_type='sample' with teacher.noise=edm: diffusers' EDM "
                          "schedulers precondition 'epsilon' or 'v_prediction' outputs; choose one of them.")
    for name in method_sections():
        getattr(cfg, name).validate(cfg)
    lora = cfg.student.lora_rank
    if lora is not None:
        if not (isinstance(lora, int) and lora >= 1):
            raise ConfigError(f"student.lora_rank: {lora!r} is impossible; expected an integer >= 1, or null "
                              "for full (not LoRA) student networks.")
        if cfg.method not in LORA_METHODS:
            raise ConfigError(f"student.lora_rank={lora} is supported by methods {', '.join(LORA_METHODS)}; "
                              f"method {cfg.method!r} trains full networks: remove student.lora_rank.")
        if cfg.student.arch != "copy":
            raise ConfigError(f"student.lora_rank={lora} adapts the teacher's own network and needs "
                              f"student.arch=copy (got {cfg.student.arch!r}).")
    if t.fsdp:
        if cfg.method not in FSDP_METHODS:
            raise ConfigError("train.fsdp (sharded training) is supported by methods "
                              f"{', '.join(FSDP_METHODS)}; method {cfg.method!r} trains unsharded: launch it "
                              "with plain data parallel (--multi_gpu).")
        for bad, why in ((lora is not None, "student.lora_rank (LoRA adapters are small: train them with "
                                            "plain data parallel; the frozen base is replicated either way)"),
                         (t.gradient_accumulation_steps > 1, "train.gradient_accumulation_steps > 1 (raise "
                                                             "train.batch_size instead)"),
                         (t.sample_every > 0, "train.sample_every > 0 (the final sample grid is still "
                                              "written)")):
            if bad:
                raise ConfigError(f"train.fsdp does not support {why}.")
    if t.mixed_precision == "fp16":
        raise ConfigError(
            "train.mixed_precision: 'fp16' is refused: its loss scaling needs one GradScaler update per step "
            "and unscaled gradients before clipping, and distill's trainers step two or three optimizers "
            "from one backward; use 'bf16' (same speed on Ampere/Hopper GPUs, no loss scaling) or 'no'.")
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise ConfigError(f"output_dir={cfg.output_dir!r} is a file, not a folder: choose another "
                          "output_dir.")


LORA_METHODS = ("sim", "uni_instruct", "progressive", "msd", "guided")
FSDP_METHODS = ("sim", "uni_instruct")



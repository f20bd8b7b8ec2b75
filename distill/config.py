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
from typing import Literal, Union

import yaml


class ConfigError(ValueError):
    """A config value is wrong; the message names the key, the value and the allowed values."""


@dataclass
class TeacherConfig:
    """Where the teacher comes from: a diffusers folder or Hub id, ``builtin:digits``, or
    ``analytic:gaussians8`` / ``analytic:gaussians25`` (the exact Gaussian-mixture teacher)."""

    path: str = "builtin:digits"
    guidance_scale: float | None = None  # CFG of the teacher (diffusers convention); None = no guidance
    # analytic teachers only:
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon"
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
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


@dataclass
class TeacherTrainConfig:
    """TeacherTrainer: plain denoising score matching (Ho et al. 2020, eq. 14)."""

    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    # v: stable at every SNR; epsilon amplifies its error by 1/alpha at t=999
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = "v_prediction"
    label_dropout: float = 0.0  # > 0: class-conditional with a null class, for classifier-free guidance
    curriculum_clusters: int = 0  # > 0: task-difficulty curriculum (Kim et al. 2024) with N clusters
    curriculum_patience: int = 200

    def validate(self, cfg: Config) -> None:
        _require([(0 <= self.label_dropout < 1, "teacher_train.label_dropout", self.label_dropout,
                   "a number in [0, 1)")])


@dataclass
class SIMConfig:
    """Score Implicit Matching (Luo et al. 2024) and the score-distillation family."""

    generator_timestep: int = 625  # t*: the generator is the denoiser at this index on sigma(t*) z
    distance: Literal["pseudo_huber", "l2"] = "pseudo_huber"
    huber_c: float = 1.0  # pseudo-Huber constant, applied to the per-sample RMS of delta (see docs)
    fake_steps_per_generator_step: int = 1
    lr_fake: float | None = None  # default optim.lr
    t_min: float = 0.02  # time range of the generator / fake-score losses (continuous t)
    t_max: float = 0.98
    fake_warmup_steps: int = 0  # fake-score-only steps before the generator moves
    init_denoiser_steps: int = 0  # student.arch mlp/unet: fit the network to the teacher first ("copy")
    sid_alpha: float | None = None  # SiD(alpha) (Zhou et al. 2024): needs distance=l2; 1.0 = SIM-L2
    sample_weight: Literal["none", "sid"] = "none"  # sid: divide by sg(mean|x0 - D_p|) (SiD / DMD)
    gradient_checkpointing: bool = False

    def validate(self, cfg: Config) -> None:
        _require(_one_step_checks("sim", self) + [(self.huber_c > 0, "sim.huber_c", self.huber_c,
                                                   "a positive number")])
        if self.sid_alpha is not None and self.distance != "l2":
            raise ConfigError(f"sim.sid_alpha={self.sid_alpha} (SiD, Zhou et al. 2024) is defined with the "
                              f"L2 distance, but sim.distance is {self.distance!r}: add sim.distance=l2, or "
                              "remove sim.sid_alpha for SIM's pseudo-Huber distance.")


@dataclass
class UniInstructConfig:
    """Uni-Instruct (Wang et al. 2025): the diffusion expansion of an f-divergence, with Diff-Instruct
    (``di``) and DMD (``dmd``) as special cases."""

    generator_timestep: int = 625  # t*: the generator is the denoiser at this index on sigma(t*) z
    lr_fake: float | None = None  # default optim.lr
    t_min: float = 0.02  # time range of the generator / fake-score losses (continuous t)
    t_max: float = 0.98
    fake_warmup_steps: int = 0  # fake-score-only steps before the generator moves
    init_denoiser_steps: int = 0  # student.arch mlp/unet: fit the network to the teacher first ("copy")
    sample_weight: Literal["none", "sid"] = "none"  # sid: divide by sg(mean|x0 - D_p|) (SiD / DMD)
    gradient_checkpointing: bool = False
    divergence: Literal["rkl", "fkl", "jeffreys", "js", "chi2", "di", "dmd"] = "fkl"
    sampling: Literal["full", "fixed"] = "full"  # (a) exact expanded-divergence gradient / (b) SIM convention
    gan_weight: float = 0.0  # generator GAN term weight (0 = off)
    discriminator_weight: float = 1.0
    ratio_clip: float = 10.0  # clamp of the discriminator logit (log-ratio)
    normalize_ratio: bool = True  # divide h(r) by its batch mean (variance reduction)
    ratio_warmup_steps: int = 0  # f != rkl: pure SIM-L2 (rkl, sampling fixed) before this step
    # fake-score updates per generator update; null = the method's published default: 5 for dmd (DMD2's
    # two-time-scale rule, which replaces DMD's regression loss), 1 otherwise
    fake_steps_per_generator_step: int | None = None

    @property
    def needs_ratio(self) -> bool:
        """The f-divergences other than reverse KL weight by h(r): the density ratio from a discriminator."""
        return self.divergence not in ("di", "dmd", "rkl")

    @property
    def uses_discriminator(self) -> bool:
        return self.needs_ratio or self.gan_weight > 0

    @property
    def detaches_teacher_and_fake(self) -> bool:
        """Diff-Instruct / DMD detach the teacher's and fake's outputs; without a GAN term (which needs the
        fake's features) their generator passes need no autograd."""
        return self.divergence in ("di", "dmd") and not self.gan_weight > 0

    def validate(self, cfg: Config) -> None:
        _require(_one_step_checks("uni_instruct", self) + [
            (self.ratio_clip > 0, "uni_instruct.ratio_clip", self.ratio_clip, "a positive number"),
            (self.gan_weight >= 0, "uni_instruct.gan_weight", self.gan_weight, "a number >= 0"),
            (self.ratio_warmup_steps >= 0, "uni_instruct.ratio_warmup_steps", self.ratio_warmup_steps,
             "an integer >= 0")])


@dataclass
class ProgressiveConfig:
    """Progressive distillation (Salimans & Ho 2022)."""

    start_steps: int = 64
    target_steps: int = 1
    steps_per_round: int = 500
    # the 2- and 1-step rounds train this much longer (the paper: 100k instead of 50k updates)
    final_rounds_multiplier: float = 2.0
    loss_weighting: Literal["truncated_snr", "snr+1"] = "truncated_snr"
    init_denoiser_steps: int = 1000  # student.arch mlp/unet: fit the network to the teacher first
    gradient_checkpointing: bool = False  # recompute the student's activations in backward (large teachers)

    def validate(self, cfg: Config, key: str = "progressive") -> None:
        strict = key == "progressive"  # guided: its stage one may already be at target_steps
        _require([(_pow2(self.start_steps) and _pow2(self.target_steps)
                   and (self.target_steps < self.start_steps if strict
                        else self.target_steps <= self.start_steps),
                   f"{key}.start_steps/target_steps", (self.start_steps, self.target_steps),
                   f"powers of two with target {'<' if strict else '<='} start")])
        if cfg.method == key and cfg.optim.lr_milestones:
            raise ConfigError(f"optim.lr_milestones={cfg.optim.lr_milestones} with method {key}: {key} "
                              "decays the learning rate linearly within each halving round; remove "
                              "optim.lr_milestones.")


@dataclass
class GuidedConfig(ProgressiveConfig):
    """Guided distillation (Meng et al. 2023): stage one + progressive rounds from ``start_steps``.

    Guidance scales use diffusers' convention s = 1 + w (w: Meng et al.'s weight, 0 = no guidance).
    Defaults: s in [1, 5] is the paper's pixel range w in [0, 4] (recalled, not read in the paper).
    """

    guidance_min: float = 1.0  # diffusers guidance_scale range, sampled uniformly per example
    guidance_max: float = 5.0
    default_guidance_scale: float = 2.0  # what the exported pipeline uses when guidance_scale is not passed
    stage_one_steps: int = 1000  # updates of the w-conditioned regression onto the CFG teacher
    guidance_embed_dim: int = 64  # sinusoidal embedding width of 1000 w
    guidance_lr_multiplier: float = 10.0  # learning-rate multiplier of the new (zero-initialised) w embedding

    def validate(self, cfg: Config, key: str = "guided") -> None:
        super().validate(cfg, key)
        _require([(1.0 <= self.guidance_min <= self.guidance_max, "guided.guidance_min/guidance_max",
                   (self.guidance_min, self.guidance_max),
                   "1 <= guidance_min <= guidance_max (diffusers' guidance_scale = 1 + w; 1 = no guidance)"),
                  (self.stage_one_steps >= 1, "guided.stage_one_steps", self.stage_one_steps,
                   "an integer >= 1")])
        if cfg.method == "guided" and cfg.teacher.guidance_scale is not None:
            raise ConfigError(f"teacher.guidance_scale={cfg.teacher.guidance_scale}: guided distillation "
                              "samples its own guidance scales (guided.guidance_min / guidance_max); remove "
                              "teacher.guidance_scale.")


@dataclass
class MSDConfig:
    """Multi-student distillation (Song et al. 2024): K one-step students, each distilled with a score-
    distillation objective on its own part of the conditioning set; a condition is routed to one student."""

    num_students: int = 4  # K
    # blocks: consecutive class ranges (the paper's ImageNet split); random: a seeded balanced split of the
    # classes; file: partition_file (JSON: a list, the student of each class); prompt_clusters: k-means on
    # the text teacher's prompt embeddings (text teachers)
    partition: Literal["blocks", "random", "file", "prompt_clusters"] = "blocks"
    partition_file: str | None = None
    objective: Literal["dmd", "di", "sim"] = "dmd"  # per-student one-step objective (the paper: DMD)
    distance: Literal["pseudo_huber", "l2"] = "pseudo_huber"  # objective: sim
    huber_c: float = 1.0  # objective: sim
    # one fake score for all students (K + 1 networks) instead of one per student (2K)
    shared_fake: bool = False
    generator_timestep: int = 625  # t*: each student is the denoiser at this index on sigma(t*) z
    fake_steps_per_generator_step: int = 1
    lr_fake: float | None = None  # default optim.lr
    t_min: float = 0.02
    t_max: float = 0.98
    # student.arch mlp/unet: teacher score matching on the student's part before distillation
    tsm_steps: int = 0
    # DMD's regression term (Yin et al. 2024 sec. 3.3, L2 here): weight (DMD: 0.25; 0 = off) and the number of
    # (noise, teacher DDIM sample at data.teacher_sample_steps) pairs, drawn from ALL conditions, not filtered
    regression_weight: float = 0.0
    regression_pairs: int = 1024
    gradient_checkpointing: bool = False

    def validate(self, cfg: Config) -> None:
        _require(_one_step_checks("msd", self) + [
            (self.huber_c > 0, "msd.huber_c", self.huber_c, "a positive number"),
            (self.num_students >= 1, "msd.num_students", self.num_students, "an integer >= 1"),
            (self.tsm_steps >= 0, "msd.tsm_steps", self.tsm_steps, "an integer >= 0"),
            (self.regression_weight >= 0, "msd.regression_weight", self.regression_weight, "a number >= 0"),
            (self.regression_pairs >= 1, "msd.regression_pairs", self.regression_pairs, "an integer >= 1")])
        b = cfg.train.batch_size
        if cfg.method == "msd" and b % self.num_students:
            raise ConfigError(f"train.batch_size={b} is not a multiple of "
                              f"msd.num_students={self.num_students}: each student trains on batch_size / "
                              "num_students samples of its own part per step. Use "
                              f"train.batch_size={max(1, b // self.num_students) * self.num_students}.")
        if cfg.method == "msd" and self.partition == "file" and not self.partition_file:
            raise ConfigError("msd.partition: 'file' needs msd.partition_file (a JSON list: the student of "
                              "each class).")


@dataclass
class MARConfig:
    """Masked-autoregressive generator (Li et al. 2024) trained on the data (no teacher); sampled with DiSA
    step annealing (Zhao et al. 2025). Model shape: ``distill.models.MaskedAutoregressiveModel``."""

    patch_size: int = 2
    width: int = 128
    depth: int = 4
    num_heads: int = 4
    head_width: int = 128
    head_depth: int = 3
    mask_ratio_min: float = 0.7  # masking ratio ~ normal(1, 0.25) truncated to [mask_ratio_min, 1] (MAR)
    label_dropout: float = 0.1  # null class for classifier-free guidance (MAR: 0.1)
    diffusion_batch_mul: int = 4  # head samples (t, noise) per token per step (MAR: 4)
    num_iter: int = 16  # sampling defaults written into the exported pipeline's card and sample grids
    diffusion_steps: int = 50

    def validate(self, cfg: Config) -> None:
        _require([(0 < self.mask_ratio_min <= 1, "mar.mask_ratio_min", self.mask_ratio_min,
                   "a number in (0, 1]"),
                  (0 <= self.label_dropout < 1, "mar.label_dropout", self.label_dropout,
                   "a number in [0, 1)"),
                  (self.diffusion_batch_mul >= 1, "mar.diffusion_batch_mul", self.diffusion_batch_mul,
                   "an integer >= 1"),
                  (self.width % self.num_heads == 0, "mar.width/num_heads", (self.width, self.num_heads),
                   "a width divisible by num_heads")])


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
    teacher_train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)
    sim: SIMConfig = field(default_factory=SIMConfig)
    uni_instruct: UniInstructConfig = field(default_factory=UniInstructConfig)
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)
    guided: GuidedConfig = field(default_factory=GuidedConfig)
    msd: MSDConfig = field(default_factory=MSDConfig)
    mar: MARConfig = field(default_factory=MARConfig)

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


def _build(cls, data, prefix: str = ""):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
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


SECTIONS = ("teacher_train", "sim", "uni_instruct", "progressive", "guided", "msd", "mar")


def validate(cfg: Config) -> None:
    """Values that parse but cannot work: the shared sections here, each method's section in its own
    ``validate``. Everything a config alone can get wrong is found here, before any teacher, data or network
    loads."""
    t = cfg.train
    _require([
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
    ])
    for name in SECTIONS:
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


def _require(checks: list[tuple]) -> None:
    """(ok, key, value, what is allowed) rows: the first that fails is a ConfigError naming the key and
    value."""
    for ok, key, value, allowed in checks:
        if not ok:
            raise ConfigError(f"{key}: {value!r} is impossible; expected {allowed}.")


LORA_METHODS = ("sim", "uni_instruct", "progressive")
FSDP_METHODS = ("sim", "uni_instruct")


def _one_step_checks(key: str, s) -> list[tuple]:
    """The checks every one-step score-distillation section shares (SIM, Uni-Instruct, MSD)."""
    n = s.fake_steps_per_generator_step
    return [
        (0 <= s.generator_timestep < 1000, f"{key}.generator_timestep", s.generator_timestep,
         "a training index in [0, 999]"),
        (0 <= s.t_min < s.t_max <= 1, f"{key}.t_min/t_max", (s.t_min, s.t_max), "0 <= t_min < t_max <= 1"),
        (n is None or n >= 1, f"{key}.fake_steps_per_generator_step", n, "an integer >= 1"
         + (" or null (the method's default)" if key == "uni_instruct" else "")),
    ]


def _pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0

"""MultiStudentTrainer: multi-student distillation (MSD; Song, Lorraine, Nie, Kreis, Lucas 2024,
"Multi-Student Diffusion Distillation for Better One-Step Generators", arXiv 2410.23274, ICML 2025).

The conditioning set is split into K disjoint parts V_1..V_K and one one-step student is distilled per
part, G_k = Distill(mu_teacher, D_k = F(D, V_k)); at inference each condition goes to its own student,
so a sample still costs one evaluation of one network while the K students together hold K times the
capacity. Partitions (``msd.partition``):

* ``blocks``: consecutive class ranges, student = floor(c K / C) (the paper's ImageNet split: 250 classes
  per student for K = 4; k-means on class embeddings was reported no better);
* ``random``: a seeded balanced split of the classes; ``file``: a JSON list, the student of each class;
* ``prompt_clusters`` (text teachers): seeded k-means on the normalised prompt embeddings of the training
  prompts (the paper splits the text encoder's embedding space); the centroids route at inference. The
features are fp32 at both ends: the centroids come from the text encoders as the export stores them, upcast
to fp32 (not the bf16 copies a mixed-precision run trains with), and the pipeline routes in fp32.

Per student, the one-step objective is a score-distillation method on the student's part only
(``msd.objective``): ``dmd`` (the paper's choice: DMD's normalised distribution-matching gradient,
Yin et al. 2024 eq. 7-8), ``di`` (Diff-Instruct) or ``sim`` (SIM, Luo et al. 2024), each with its fake
score trained by denoising score matching on the student's detached samples. Each step draws
``batch_size / K`` rows of every student's part, so K students see the same number of samples and
updates as one student at the same batch size (the paper's batch-controlled ablation).

Fake scores: one per student by default (``msd.shared_fake: false``): the paper describes every student
as its own DMD run, so each has its own fake score (2K networks). ``shared_fake: true`` trains one
conditional fake score on all students' samples (K + 1 networks); it is the same estimate in exact
arithmetic, because a condition belongs to one student, so the fake distribution at that condition is
that student's.

Students smaller than the teacher (``student.arch: mlp | unet``) cannot start as copies; the paper's
teacher score matching (TSM) stage first regresses each on the teacher's output at noised real data
of its part, L_TSM = E_t[lambda_t |mu_student(x_t, t) - mu_teacher(x_t, t)|^2] (``msd.tsm_steps``). The
fake scores are fitted to the UNGUIDED teacher (a fake score models the student's samples, as a teacher copy
does in DMD): fitted to the guided one it would equal the real score and the first DM gradient would vanish.

Stages (the paper's sec. 3): DM, then ADM, "adversarial distribution matching" (``msd.gan_weight`` > 0):
from ``msd.adm_start_step`` on, the run continues from the DM stage's networks (a run resumed from its
checkpoints continues the schedule) with DMD2's GAN term (Yin et al. 2024b, sec. 4.2). A discriminator head
on each fake score's features (a UNet's mid block) is trained with the fake score by BCE, noised REAL data
of the student's own part (its classes, or its prompts' route) -> 1 against noised samples of that student
-> 0, weighted ``discriminator_weight`` (DMD2: 1e-2); each student's generator loss adds ``gan_weight`` x
softplus(-D(x_t)) (DMD2: 3e-3 on ImageNet-64; the paper's ADM weights are not published). Before
``adm_start_step`` the heads stay untouched and the step is exactly the DM stage's. Prompts-only data: the
teacher's samples at the batch's prompts stand in for real data.

Update rule (``msd.fake_steps_per_generator_step``): DMD2's two-time-scale rule, 5 fake-score updates per
generator update (DMD's 1:1 without regression is reported unstable, DMD2 sec. 4.1); 1 with
``regression_weight`` > 0 is DMD's recipe.

DMD's regression term (``msd.regression_weight``, L2 between G(z) and the teacher's DDIM sample from the
same z, Yin et al. 2024 sec. 3.3) uses pairs of ALL conditions for every student: the paper found that
filtering the paired set by partition collapses the students. The pairs are made once at start-up.

LoRA (``student.lora_rank``): the K students and the fake score(s) are adapters on the teacher's own frozen
network (K + 1 or 2K adapters, one base); the export merges each student into its own copy.

Accelerate: every process holds all K students (and their fake scores and optimizer states) and trains
them all on its shard of each batch (plain data parallel); memory is K times a single-student run
(2K networks with Adam states, or K + 1 with ``shared_fake``).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from ..conditioning import Condition
from ..engine import DistillationTrainer, Update, build_network
from ..errors import ConfigError, require
from ..lora import AdapterView
from ..models import StudentBank
from ..objectives.adversarial import DiscriminatorHead, discriminator_loss, feature_module, generator_gan_loss
from ..objectives.score import DiffInstructLoss, SIMLoss, fake_score_loss
from ..partition import class_partition, kmeans, nearest_centroid, prompt_feature
from ..pipelines import MultiStudentPipeline
from .score_helpers import OneStepScoreHelpers, ScoreGroup, check_student_prediction, one_step_checks

if TYPE_CHECKING:
    from ..config import Config


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
    # DMD2's two-time-scale rule (5); DMD's 1:1 is stable only with regression_weight > 0
    fake_steps_per_generator_step: int = 5
    lr_fake: float | None = None  # default optim.lr
    t_min: float = 0.02
    t_max: float = 0.98
    # time of the fake-score and generator losses (docs/noise_families.md), clamped to [t_min, t_max]:
    # uniform; logit_normal: t = sigmoid(N(logit_mean, logit_std)) (SD3);
    # lognormal: ln sigma_EDM ~ N(p_mean, p_std) (EDM)
    t_sampling: Literal["uniform", "logit_normal", "lognormal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    p_mean: float = -1.2
    p_std: float = 1.2
    # per-sample weight of the generator loss in the flow sigma s: sigma_sqrt s^-2, cosmap, 1 - s (none: 1)
    time_weighting: Literal["none", "sigma_sqrt", "cosmap", "one_minus_sigma"] = "none"
    # where generator_timestep, t_min / t_max and the drawn t live: the teacher's own continuous time, or the
    # VP table of teacher.beta_schedule, mapped to the teacher's family at equal log-SNR (the same noise
    # levels on a vp, edm or flow teacher; identity on vp)
    times_on: Literal["teacher", "vp"] = "teacher"
    # student.arch mlp/unet: teacher score matching on the student's part before distillation
    tsm_steps: int = 0
    # DMD's regression term (Yin et al. 2024 sec. 3.3, L2 here): weight (DMD: 0.25; 0 = off) and the number of
    # (noise, teacher DDIM sample at data.teacher_sample_steps) pairs, drawn from ALL conditions, not filtered
    regression_weight: float = 0.0
    regression_pairs: int = 1024
    # ADM stage (DMD2's GAN term; 0 = the DM stage only): generator weight of softplus(-D) (DMD2: 3e-3 on
    # ImageNet-64), the head's BCE weight in the fake score's loss (DMD2: 1e-2), the step the stage starts at
    gan_weight: float = 0.0
    discriminator_weight: float = 1.0e-2
    adm_start_step: int = 0
    gradient_checkpointing: bool = False

    def validate(self, cfg: Config) -> None:
        require(one_step_checks("msd", self) + [
            (self.huber_c > 0, "msd.huber_c", self.huber_c, "a positive number"),
            (self.num_students >= 1, "msd.num_students", self.num_students, "an integer >= 1"),
            (self.tsm_steps >= 0, "msd.tsm_steps", self.tsm_steps, "an integer >= 0"),
            (self.regression_weight >= 0, "msd.regression_weight", self.regression_weight, "a number >= 0"),
            (self.regression_pairs >= 1, "msd.regression_pairs", self.regression_pairs, "an integer >= 1"),
            (self.gan_weight >= 0, "msd.gan_weight", self.gan_weight, "a number >= 0 (0: no ADM stage)"),
            (self.discriminator_weight > 0, "msd.discriminator_weight", self.discriminator_weight,
             "a positive number"),
            (self.adm_start_step >= 0, "msd.adm_start_step", self.adm_start_step, "an integer >= 0")])
        b = cfg.train.batch_size
        if cfg.method == "msd" and b % self.num_students:
            raise ConfigError(f"train.batch_size={b} is not a multiple of "
                              f"msd.num_students={self.num_students}: each student trains on batch_size / "
                              "num_students samples of its own part per step. Use "
                              f"train.batch_size={max(1, b // self.num_students) * self.num_students}.")
        if cfg.method == "msd" and self.partition == "file" and not self.partition_file:
            raise ConfigError("msd.partition: 'file' needs msd.partition_file (a JSON list: the student of "
                              "each class).")



@contextlib.contextmanager
def unguided(teacher):
    """The teacher's denoiser without its bound classifier-free guidance inside the block."""
    scale, teacher.denoiser.guidance_scale = teacher.denoiser.guidance_scale, None
    try:
        yield
    finally:
        teacher.denoiser.guidance_scale = scale


class MultiStudentTrainer(OneStepScoreHelpers, DistillationTrainer):
    method = "msd"

    @property
    def section(self):
        return self.config.msd

    # ------------------------------------------------------------------ partition
    def _row_labels(self) -> torch.Tensor:
        d = self.data
        if hasattr(d, "labels"):
            return d.labels
        if getattr(d, "label_col", None):
            return torch.tensor(d.ds[d.label_col])
        return torch.full((len(d),), -1)

    def _row_prompts(self) -> list[str]:
        d = self.data
        if hasattr(d, "prompts"):
            return list(d.prompts)
        return [str(p or "") for p in d.ds[d.caption_col]]

    def rows_condition(self, rows: torch.Tensor):
        """The teacher's condition for data rows (their class labels or prompts)."""
        if self.teacher.is_text:
            return self.teacher.condition(prompts=[self.row_prompts[int(i)] for i in rows])
        return self.teacher.condition(class_labels=self.row_labels[rows].to(self.device))

    def regression_pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, z, y): ``msd.regression_pairs`` data rows drawn from all the data, noise z, and the
        teacher's DDIM sample from x_T = z at that row's condition (seeded; the same on every process)."""
        cfg, t = self.config, self.teacher
        gen = torch.Generator().manual_seed(cfg.train.seed + 777)
        rows = torch.randint(len(self.data), (self.section.regression_pairs,), generator=gen)
        zs, ys = [], []
        for i in range(0, len(rows), 256):
            r = rows[i:i + 256]
            z = torch.randn(len(r), *t.sample_shape, generator=gen)
            with torch.no_grad(), self.accelerator.autocast():
                y = t.sample(len(r), cfg.data.teacher_sample_steps, gen, self.rows_condition(r), noise=z)
            zs.append(z)
            ys.append(y.float().cpu())
        return rows, torch.cat(zs), torch.cat(ys)

    def regression_loss(self, g: ScoreGroup, n: int) -> torch.Tensor:
        """weight x mean |G(z) - y|^2 on ``n`` pairs of any condition."""
        rows, z, y = self.pairs
        idx = torch.randint(len(z), (n,), generator=self.host_rng)  # the pairs are kept on the host
        x0 = self.generate(self.modules[g.generator], z[idx].to(self.device), self.rows_condition(rows[idx]))
        return self.section.regression_weight * (x0 - y[idx].to(self.device)).pow(2).mean()

    @torch.no_grad()
    def prompt_features(self, prompts: list[str]) -> torch.Tensor:
        """fp32 routing features of ``prompts``, encoded by the text encoders the export ships (re-read as
        stored) upcast to fp32, whatever precision the run holds the teacher's in."""
        t = self.teacher
        parts = t.frozen_components(reload=True)
        fp32 = copy.copy(t)  # the teacher with fp32 text encoders and its own prompt cache
        fp32.text_encoders = [copy.deepcopy(parts[k]).to(t.device, torch.float32)
                              for k in ("text_encoder", "text_encoder_2", "text_encoder_3")
                              if parts.get(k) is not None]
        fp32._cache = type(t._cache)()
        feats = []
        for i in range(0, len(prompts), 64):
            c = fp32.condition(prompts=prompts[i:i + 64])
            feats.append(prompt_feature(c.embeds, c.pooled).cpu())
        return torch.cat(feats)

    def partition(self) -> tuple[dict, torch.Tensor]:
        """(routing table for the pipeline, student of every data row)."""
        sec, t, k = self.section, self.teacher, self.section.num_students
        if t.is_text:
            if sec.partition != "prompt_clusters":
                raise ConfigError(f"msd.partition={sec.partition!r}: a text-to-image teacher is split by "
                                  "prompt; use msd.partition=prompt_clusters.")
            prompts = self.row_prompts = self._row_prompts()
            distinct = sorted(set(prompts))
            if len(distinct) < k:
                raise ConfigError(f"The data has {len(distinct)} distinct prompts for msd.num_students={k}: "
                                  f"use at most {len(distinct)} students or more prompts.")
            feats = self.prompt_features(distinct)
            cents = kmeans(feats, k, seed=self.config.train.seed)
            of_prompt = dict(zip(distinct, nearest_centroid(feats, cents).tolist()))
            rows = torch.tensor([of_prompt[p] for p in prompts])
            return {"kind": "prompt_clusters", "centroids": cents.tolist()}, rows
        if not t.num_classes:
            raise ConfigError("Multi-student distillation routes by condition; "
                              f"teacher.path={self.config.teacher.path!r} is unconditional. Use a "
                              "class-conditional or text-to-image teacher.")
        labels = self.row_labels = self._row_labels().long()
        if (labels < 0).any():
            raise ConfigError(f"data.spec={self.config.data.spec!r} has unlabelled rows; MSD gives each "
                              "student the data of its classes, so every row needs a class label.")
        table = class_partition(sec.partition, t.num_classes, k, self.config.train.seed, sec.partition_file)
        return {"kind": "classes", "student_of_class": table}, torch.tensor(table)[labels]

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        cfg, sec, t = self.config, self.section, self.teacher
        k = sec.num_students
        self.routing, rows = self.partition()
        self.parts = [(rows == j).nonzero().flatten() for j in range(k)]
        empty = [j for j, p in enumerate(self.parts) if len(p) == 0]
        if empty:
            raise ConfigError(f"Students {empty} have no data rows in their part "
                              f"(msd.partition={sec.partition!r}, data.spec={cfg.data.spec!r}); use fewer "
                              "students or data covering every part.")
        shape, ncls = t.sample_shape, t.num_classes
        if sec.tsm_steps and not hasattr(self.data, "x"):
            raise ConfigError("msd.tsm_steps needs in-memory image or toy data (it noises real samples).")
        self.pred = t.prediction_type if cfg.student.arch == "copy" else (cfg.student.prediction_type
                                                                              or t.prediction_type)
        check_student_prediction(t, self.pred)
        lr_fake = sec.lr_fake or cfg.optim.lr
        fake_names = ["fake"] if sec.shared_fake else [f"fake_{j}" for j in range(k)]
        if self.lora:  # students and fake scores: LoRA adapters on the teacher's own (shared, frozen) network
            if sec.tsm_steps:
                raise ConfigError(f"msd.tsm_steps={sec.tsm_steps} with student.lora_rank: LoRA students "
                                  "start as the teacher, so there is nothing to fit; set msd.tsm_steps=0.")
            names = [f"student_{j}" for j in range(k)] + fake_names
            views = self.lora_views(names, sec.gradient_checkpointing)
            gens, fakes = views[:k], dict(zip(fake_names, views[k:]))
        else:
            # teacher score matching (Song et al. 2024): each student on its part, on the (guided) teacher it
            # distils; each fake score on the UNGUIDED teacher (one conditional fake: on all data)
            gens, fakes = [], {}
            for j in range(k):
                gen = build_network(cfg, t, shape, ncls)
                if not sec.shared_fake:  # the student's start (a teacher copy, or the same fresh network)
                    fakes[f"fake_{j}"] = copy.deepcopy(gen)
                if sec.tsm_steps:
                    self.fit_to_teacher(gen, sec.tsm_steps, self.pred, indices=self.parts[j])
                    if not sec.shared_fake:
                        with unguided(t):
                            self.fit_to_teacher(fakes[f"fake_{j}"], sec.tsm_steps, self.pred,
                                                indices=self.parts[j])
                gens.append(gen)
            if sec.shared_fake:  # a teacher copy, or a small network fitted to the unguided teacher
                fake = build_network(cfg, t, shape, ncls)
                if sec.tsm_steps and cfg.student.arch != "copy":
                    with unguided(t):
                        self.fit_to_teacher(fake, sec.tsm_steps, self.pred)
                fakes = {"fake": fake}
        if sec.gradient_checkpointing and not self.lora:
            for net in (t.model, *gens, *fakes.values()):
                if hasattr(net, "enable_gradient_checkpointing"):
                    net.enable_gradient_checkpointing()
        for j, gen in enumerate(gens):
            self.add(f"student_{j}", gen, lr=cfg.optim.lr, ema=True)
        for name, fake in fakes.items():
            self.add(name, fake.requires_grad_(True).train(), lr=lr_fake)
        self.groups = [ScoreGroup(generator=f"student_{j}", fake="fake" if sec.shared_fake else f"fake_{j}")
                       for j in range(k)]
        if sec.gan_weight > 0:
            self.build_discriminators(fake_names)
        self.set_generator_timestep(sec.generator_timestep)
        self.pairs = self.regression_pairs() if sec.regression_weight > 0 else None
        self.loss = {"dmd": DiffInstructLoss(normalize=True), "di": DiffInstructLoss(normalize=False),
                     "sim": SIMLoss(distance=sec.distance, huber_c=sec.huber_c)}[sec.objective]

    def build_discriminators(self, fake_names: list[str]) -> None:
        """ADM: one discriminator head per fake score (DMD2: on its bottleneck), reading the features a
        forward hook keeps (of this fake only, where LoRA fakes share their layers)."""
        self._features = {}
        for name in fake_names:
            fake = self.modules[name]
            module, channels, spatial = feature_module(getattr(fake, "shared_base", fake))
            mine = fake.active if isinstance(fake, AdapterView) else (lambda: True)
            module.register_forward_hook(lambda _m, _i, out, name=name, mine=mine:
                                         self._features.__setitem__(name, out) if mine() else None)
            self.add(name.replace("fake", "disc"), DiscriminatorHead(channels, spatial),
                     lr=self.section.lr_fake or self.config.optim.lr)
        for g in self.groups:
            g.disc = g.fake.replace("fake", "disc")

    @property
    def needs_clean_samples(self) -> bool:
        """ADM's discriminators see real samples: each batch's rows of data (or, for prompts-only data, the
        teacher's samples), student by student."""
        return self.section.gan_weight > 0

    def adm(self, step: int) -> bool:
        """Whether ``step`` is in the ADM stage."""
        return self.section.gan_weight > 0 and step >= self.section.adm_start_step

    def fake_and_logit(self, fake, head, name: str, x_t, t, cond) -> tuple[torch.Tensor, torch.Tensor]:
        """The output of the fake score ``name`` (the network ``fake``) at x_t and D(x_t), the head on its
        features there."""
        pred = self.as_denoiser(fake).output(x_t, t, cond)
        with self.accelerator.autocast():
            return pred, head(self._features.pop(name)).float()

    def batch_indices(self, gen: torch.Generator, b: int) -> torch.Tensor:
        """batch_size / K rows of every student's part, student by student."""
        per = b // self.section.num_students
        # each part's rows on the drawing device, once
        if getattr(self, "_parts_on", (None,))[0] != gen.device:
            self._parts_on = (gen.device, [part.to(gen.device) for part in self.parts])
        return torch.cat([part[torch.randint(len(part), (per,), generator=gen, device=gen.device)]
                          for part in self._parts_on[1]])

    # ------------------------------------------------------------------ step
    def fake_update(self, g: ScoreGroup, x_t, t, target, cond, x_real):
        """One fake-score update by denoising score matching on detached student samples; in the ADM stage
        (``x_real`` given) its head's BCE in the same backward, real = ``x_real`` noised at the same t:
        L = DSM + discriminator_weight (softplus(-D(real)) + softplus(D(fake)))."""
        fake = self.modules[g.fake]
        if x_real is None:
            pred = self.as_denoiser(fake).output(x_t, t, cond)
            loss = fake_score_loss(pred, target).mean()
            norms = yield Update(loss, g.fake)
            return {"fake_loss": loss.detach(), "fake_grad_norm": norms[g.fake]}
        head = self.modules[g.disc]
        pred, logit_fake = self.fake_and_logit(fake, head, g.fake, x_t, t, cond)
        x_real_t = self.teacher.schedule.add_noise(x_real, self.randn(*x_real.shape), t)
        _, logit_real = self.fake_and_logit(fake, head, g.fake, x_real_t, t, cond)
        dsm = fake_score_loss(pred, target).mean()
        bce = discriminator_loss(logit_real, logit_fake).mean()
        norms = yield Update(dsm + self.section.discriminator_weight * bce, g.fake, g.disc)
        acc = ((logit_real > 0).float().mean() + (logit_fake < 0).float().mean()) / 2
        return {"fake_loss": dsm.detach(), "disc_loss": bce.detach(), "disc_acc": acc,
                "fake_grad_norm": norms[g.fake]}

    def generator_step(self, g: ScoreGroup, cond, b: int, batch: dict, step: int, extra_loss=None):
        """The DM stage's update (DMD's gradient, and DMD's regression term when set); in the ADM stage plus
        ``gan_weight`` x softplus(-D(x_t)) at the generator's own noised samples, through the frozen fake
        score and head (DMD2's generator loss)."""
        if not self.adm(step):
            return (yield from super().generator_step(g, cond, b, batch, step, extra_loss))
        fake, head = self.unwrap(g.fake), self.unwrap(g.disc)

        def gan_term(x_t, t):
            _, logit = self.fake_and_logit(fake, head, g.fake, x_t, t, cond)
            gan = generator_gan_loss(logit)
            return self.section.gan_weight * gan, {"gan_loss": gan.mean().detach()}

        return (yield from super().generator_step(g, cond, b, batch, step, extra_loss,
                                                  per_sample_term=gan_term, frozen_too=(head,)))

    def objective(self, batch: dict, step: int):
        """``fake_steps_per_generator_step`` rounds of fake-score updates (each student's, or the shared
        one), then one generator update per student, each on its own rows of the batch."""
        sec = self.section
        cond: Condition = batch["cond"]
        per = batch["size"] // sec.num_students
        conds = [cond[j * per:(j + 1) * per] for j in range(sec.num_students)]  # each student's rows
        # ADM: each student's discriminator sees the real rows of its own part (the shared one: all, in order)
        x_real = batch["x"] if self.adm(step) else None
        reals = [None if x_real is None else x_real[j * per:(j + 1) * per] for j in range(sec.num_students)]
        logs: list[dict] = []
        for _ in range(sec.fake_steps_per_generator_step):
            if sec.shared_fake:  # one update on every student's samples, rows in student order
                inputs = [self.fake_inputs(g, c, per) for g, c in zip(self.groups, conds)]
                x_t, t, target = (torch.cat(v) for v in zip(*inputs))
                logs.append((yield from self.fake_update(self.groups[0], x_t, t, target, cond, x_real)))
            else:
                for g, c, x in zip(self.groups, conds, reals):
                    logs.append((yield from self.fake_update(g, *self.fake_inputs(g, c, per), c, x)))
        for g, c in zip(self.groups, conds):
            reg = (lambda g=g: self.regression_loss(g, per)) if self.pairs is not None else None
            logs.append((yield from self.generator_step(g, c, per, batch, step, extra_loss=reg)))
        out = {}
        # means over students (and fake steps), in order
        for key in dict.fromkeys(k for d in logs for k in d):
            vals = [d[key] for d in logs if d.get(key) is not None]
            out[key] = sum(vals) / len(vals) if vals else None
        return out

    # ------------------------------------------------------------------ export
    def export(self, for_samples: bool = False):
        t = self.teacher
        bank = StudentBank.from_students([self.export_network(g.generator) for g in self.groups])
        parts = t.frozen_components(reload=not for_samples)  # latent teachers: VAE (and text parts)
        return MultiStudentPipeline(bank, self.export_scheduler(),
                                    generator_timestep=self.section.generator_timestep,
                                    sample_shape=t.sample_shape, num_classes=t.num_classes,
                                    routing=self.routing, **parts, **self.generator_noise())

    def card_info(self) -> dict:
        s = self.section
        return {"method": self.method, "teacher": self.config.teacher.path, "steps_to_sample": 1,
                "num_students": s.num_students, "partition": s.partition, "objective": s.objective,
                "shared_fake": s.shared_fake, "generator_timestep (t*)": s.generator_timestep,
                "tsm_steps": s.tsm_steps, "regression_weight": s.regression_weight,
                "fake_steps_per_generator_step": s.fake_steps_per_generator_step,
                "gan_weight (ADM)": s.gan_weight, "adm_start_step": s.adm_start_step}

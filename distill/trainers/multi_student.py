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
  prompts (the paper splits the text encoder's embedding space); the centroids route at inference.

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
of its part, L_TSM = E_t[lambda_t |mu_student(x_t, t) - mu_teacher(x_t, t)|^2] (``msd.tsm_steps``).

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

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from ..conditioning import Condition
from ..engine import DistillationTrainer, Update, build_network
from ..errors import ConfigError, require
from ..models import StudentBank
from ..objectives.score import DiffInstructLoss, SIMLoss, fake_score_loss
from ..partition import nearest_centroid, prompt_feature
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
    fake_steps_per_generator_step: int = 1
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
    gradient_checkpointing: bool = False

    def validate(self, cfg: Config) -> None:
        require(one_step_checks("msd", self) + [
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



def class_partition(kind: str, num_classes: int, k: int, seed: int = 0, file: str | None = None) -> list[int]:
    """The student of each class: consecutive blocks, a seeded balanced random split, or a JSON file."""
    if k > num_classes:
        raise ConfigError(f"msd.num_students={k} is more than the teacher's {num_classes} classes: every "
                          f"student needs at least one class; use msd.num_students <= {num_classes}.")
    if kind == "blocks":
        return [c * k // num_classes for c in range(num_classes)]
    if kind == "random":
        perm = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()
        table = [0] * num_classes
        for i, c in enumerate(perm):
            table[c] = i % k
        return table
    if kind == "file":
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"msd.partition_file={file!r} does not exist; it should be a JSON list giving "
                              f"the student (0..{k - 1}) of each of the {num_classes} classes.")
        table = json.loads(path.read_text())
        if (not isinstance(table, list) or len(table) != num_classes
                or not all(isinstance(s, int) and 0 <= s < k for s in table)):
            raise ConfigError(f"msd.partition_file={file!r} must hold a JSON list of {num_classes} integers "
                              f"in [0, {k}) (the student of each class); it holds {str(table)[:200]}.")
        return table
    raise ConfigError(f"msd.partition={kind!r} is for text teachers; a class-conditional teacher takes "
                      "blocks, random or file.")


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 100) -> torch.Tensor:
    """Centroids of k-means (k-means++ initialisation, Lloyd iterations), seeded."""
    gen = torch.Generator().manual_seed(seed)
    x = x.float().cpu()
    cents = [x[torch.randint(len(x), (1,), generator=gen)].squeeze(0)]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(cents)).min(dim=1).values.pow(2)
        cents.append(x[torch.multinomial(d2 + 1e-12, 1, generator=gen)].squeeze(0))
    c = torch.stack(cents)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(dim=1)
        new = torch.stack([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(k)])
        if torch.allclose(new, c):
            break
        c = new
    return c


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
            feats = []
            with torch.no_grad():
                for i in range(0, len(distinct), 64):
                    c = t.condition(prompts=distinct[i:i + 64])
                    feats.append(prompt_feature(c.embeds, c.pooled).cpu())
            feats = torch.cat(feats)
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
            gens = []
            for j in range(k):
                gen = build_network(cfg, t, shape, ncls)
                if sec.tsm_steps:  # teacher score matching on this student's part (Song et al. 2024)
                    self.fit_to_teacher(gen, sec.tsm_steps, self.pred, indices=self.parts[j])
                gens.append(gen)
            # one conditional fake score: a teacher copy, or a small network fitted on all data
            if sec.shared_fake:
                fake = build_network(cfg, t, shape, ncls)
                if sec.tsm_steps and cfg.student.arch != "copy":
                    self.fit_to_teacher(fake, sec.tsm_steps, self.pred)
                fakes = {"fake": fake}
            else:
                fakes = {f"fake_{j}": copy.deepcopy(g) for j, g in enumerate(gens)}
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
        self.set_generator_timestep(sec.generator_timestep)
        self.pairs = self.regression_pairs() if sec.regression_weight > 0 else None
        self.loss = {"dmd": DiffInstructLoss(normalize=True), "di": DiffInstructLoss(normalize=False),
                     "sim": SIMLoss(distance=sec.distance, huber_c=sec.huber_c)}[sec.objective]

    def batch_indices(self, gen: torch.Generator, b: int) -> torch.Tensor:
        """batch_size / K rows of every student's part, student by student."""
        per = b // self.section.num_students
        # each part's rows on the drawing device, once
        if getattr(self, "_parts_on", (None,))[0] != gen.device:
            self._parts_on = (gen.device, [part.to(gen.device) for part in self.parts])
        return torch.cat([part[torch.randint(len(part), (per,), generator=gen, device=gen.device)]
                          for part in self._parts_on[1]])

    # ------------------------------------------------------------------ step
    def shared_fake_step(self, cond, conds: list, per: int):
        """One update of the shared fake score on every student's detached samples (rows in student order)."""
        inputs = [self.fake_inputs(g, c, per) for g, c in zip(self.groups, conds)]
        x_t, t, target = (torch.cat(v) for v in zip(*inputs))
        pred = self.as_denoiser(self.modules["fake"]).output(x_t, t, cond)
        loss = fake_score_loss(pred, target).mean()
        norms = yield Update(loss, "fake")
        return {"fake_loss": loss.detach(), "fake_grad_norm": norms["fake"]}

    def objective(self, batch: dict, step: int):
        """``fake_steps_per_generator_step`` rounds of fake-score updates (each student's, or the shared
        one), then one generator update per student, each on its own rows of the batch."""
        sec = self.section
        cond: Condition = batch["cond"]
        per = batch["size"] // sec.num_students
        conds = [cond[j * per:(j + 1) * per] for j in range(sec.num_students)]  # each student's rows
        logs: list[dict] = []
        for _ in range(sec.fake_steps_per_generator_step):
            if sec.shared_fake:
                logs.append((yield from self.shared_fake_step(cond, conds, per)))
            else:
                for g, c in zip(self.groups, conds):
                    logs.append((yield from self.fake_step(g, c, per, batch)))
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
                "tsm_steps": s.tsm_steps, "regression_weight": s.regression_weight}

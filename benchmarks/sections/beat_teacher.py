"""(l) One step against the teacher's 50 steps on digits, over seeds.

Each idea of ``BEAT_IDEAS`` is trained once per seed (two runs side by side, one thread each, as ``distill``
subprocesses); its one-step student's FID at 1,000 and 5,000 samples (digits extractor, eval seed = training
seed) is set against the builtin teacher's 50-step DDIM FID at the same sizes and seeds, measured in this
run. Then the best recipe without its GAN term on the exact toy mixture: sliced W2 to exact samples
against the exact teacher's 50-step DDIM, with the floor of two exact sets. Goal: a one-step student below
the teacher's 50-step FID at 5,000 samples on 3 seeds.

``BEAT_IDEAS=1`` (comma-separated indices into ``BEAT_IDEAS``) trains only those ideas, and ``BEAT_TOY=0``
skips the toy part; the teacher is measured in every run.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch
from harness import (
    QUIET,
    exact_floor,
    flag,
    gaussians8_truth,
    load,
    open_pipeline,
    run_jobs,
    spread,
    table,
    train,
)

from distill.eval.toy import toy_report
from distill.teachers import ASSETS

BEAT_SEEDS = (0, 1, 2)
BEAT_TEACHER_STEPS = 50
# (idea, config, overrides, updates); each row is trained once per seed in BEAT_SEEDS (train.seed = eval seed)
BEAT_IDEAS = [
    ("quickstart: SIM, pseudo-Huber, t_min 0.02", "configs/quickstart.yaml", [], 400),
    # the GAN term on the real digits (DMD2 / SiDA: discriminator on the fake score's mid block, its BCE added
    # per sample to the generator's loss); weight 0.1: the best of 0.01 / 0.1 / 0.3 / 1.0 in 400-update probes
    ("best: Uni-Instruct rkl + GAN term 0.1, t_min 0.05, lr x0.3 after 2,000, EMA 0.998",
     "configs/best_digits.yaml", [], 4000),
    ("best without the GAN term", "configs/best_digits.yaml", ["uni_instruct.gan_weight=0"], 4000),
]
# the best digits recipe on the toy mixture: its 1,500 updates decayed after 1,000 (two thirds, as on digits)
BEAT_TOY = ("configs/uni_instruct_gaussians8.yaml", ["uni_instruct.divergence=rkl", "uni_instruct.t_min=0.05",
                                                     "optim.lr_milestones=[1000]", "optim.lr_gamma=0.3",
                                                     "train.ema_decay=0.998"])


def bench_beat_teacher(quick: bool) -> str:
    seeds = BEAT_SEEDS[:1] if quick else BEAT_SEEDS
    sizes = (1000,) if quick else (1000, 5000)
    chosen = os.environ.get("BEAT_IDEAS")
    picked = [BEAT_IDEAS[int(k)] for k in chosen.split(",")] if chosen else BEAT_IDEAS
    ideas = [(i, c, o, 20 if quick else n) for i, c, o, n in picked]
    with_toy = flag("BEAT_TOY", default=True)
    with tempfile.TemporaryDirectory() as tmp:
        def fid_job(name, src, n, s, *extra):
            return (name,
                    ["fid", src, "--reference", "sklearn:digits", "--num-samples", str(n), "--seed", str(s),
                     "--metrics", "fid", *extra, "--out", f"{tmp}/{name}"])

        trainings = sorted(((updates, k, s) for k, (*_, updates) in enumerate(ideas) for s in seeds),
                           reverse=True)
        jobs = [(f"run{k}-{s}",
                 ["train", ideas[k][1], *ideas[k][2], f"train.max_steps={updates}", f"train.seed={s}",
                  "eval.enabled=false", *QUIET, f"output_dir={tmp}/run{k}-{s}"])
                for updates, k, s in trainings]
        # longest trainings first; the teacher's evaluations fill the second core meanwhile
        jobs += [fid_job(f"teacher-{n}-{s}", str(ASSETS / "digits_teacher"), n, s, "--steps",
                         str(BEAT_TEACHER_STEPS))
                 for s in seeds for n in sizes]
        secs = run_jobs(jobs, tmp, parallel=2)
        run_jobs([fid_job(f"run{k}-{s}-{n}", f"{tmp}/run{k}-{s}/pipeline", n, s) for k in range(len(ideas))
                  for s in seeds
                  for n in sizes], tmp, parallel=2)

        def fid(name):
            return json.loads((Path(tmp) / name / "fid_report.json").read_text())["results"][0]["fid"]

        big = sizes[-1]
        below_col = f"seeds below the teacher at {big // 1000}k"
        rows = [[f"teacher, DDIM {BEAT_TEACHER_STEPS} steps", "-", "-",
                 *[spread([fid(f"teacher-{n}-{s}") for s in seeds]) for n in sizes], "-", len(seeds), "-"]]
        for k, (idea, cfg, extra, updates) in enumerate(ideas):
            rows.append([idea, f"`{' '.join([cfg, *extra])}`", updates,
                         *[spread([fid(f"run{k}-{s}-{n}") for s in seeds]) for n in sizes],
                         f"{sum(secs[f'run{k}-{s}'] for s in seeds) / len(seeds):.0f}", len(seeds),
                         f"{sum(fid(f'run{k}-{s}-{big}') < fid(f'teacher-{big}-{s}') for s in seeds)} of "
                         f"{len(seeds)}"])

        toy = _toy_rows(seeds, quick, tmp) if with_toy else None
    size_cols = [f"FID {n // 1000}k (mean +- sd over seeds)" for n in sizes]
    return ("### (l) One step vs the teacher's 50 steps on digits (builtin teacher; FID with the digits "
            "extractor against the 1,797 sklearn digits, eval seed = training seed; two trainings side by "
            "side, one thread each; goal: a one-step student below the teacher's 50-step FID at 5,000 "
            "samples on 3 seeds)\n\n"
            + table(["idea", "command", "updates", *size_cols, "train s", "seeds", below_col], rows)
            + ("" if toy is None else
               "\n\nThe same recipe on the exact toy mixture (8,000 samples, sliced W2 to exact samples; "
               "goal: below the exact teacher's 50-step DDIM, whose distance to the truth is the sampling "
               "floor plus its own error)\n\n"
               + table(["model", "steps", "sliced W2 (mean +- sd over seeds)", "train s"], toy))
            + "\n")


def _toy_rows(seeds, quick: bool, tmp: str) -> list[list]:
    """The best recipe without its GAN term (``BEAT_TOY``) on the exact toy mixture, against the exact
    teacher's DDIM."""
    teacher, ref = gaussians8_truth()
    floor = exact_floor(teacher, ref)["swd"]
    ddim = [toy_report(teacher.sample(8000, num_steps=BEAT_TEACHER_STEPS,
                                      generator=torch.Generator().manual_seed(s)),
                       teacher.model, ref)["swd"] for s in seeds]
    toy_cfg, toy_extra = BEAT_TOY
    swd, toy_secs = [], []
    for s in seeds:
        t0 = time.time()
        path, _ = train(load(toy_cfg, f"{tmp}/toy{s}", *toy_extra, f"train.seed={s}",
                             *(["train.max_steps=20"] if quick else [])))
        pipe = open_pipeline(path)
        toy_secs.append(time.time() - t0)  # training and loading the export
        x = pipe(batch_size=8000, generator=torch.Generator().manual_seed(s), output_type="pt").images
        swd.append(toy_report(x, teacher.model, ref)["swd"])
    return [["exact samples, another seed (floor)", "-", f"{floor:.4f}", "-"],
            [f"exact teacher, DDIM {BEAT_TEACHER_STEPS} steps", BEAT_TEACHER_STEPS, spread(ddim), "-"],
            [f"one-step student: `{' '.join([toy_cfg, *toy_extra])}`", 1, spread(swd),
             f"{sum(toy_secs) / len(toy_secs):.0f}"]]

"""(e) Progressive distillation on the exact toy:gaussians8 teacher.

Trains ``configs/progressive_gaussians8.yaml`` from 16 down to 1 step and compares each round's student
(8, 4, 2, 1 steps; 8,000 samples) with the teacher's DDIM at the same step count: sliced W2 to exact samples
and modes covered. Goal: the student closer to the truth than teacher DDIM at every step count.

Then the shipped settings (64 -> 1 steps) over ``SEEDS`` with and without ``progressive.round_ema``: the
one-step student's sliced W2 against the exact teacher's 8-step DDIM (goal: at or below it).
"""

from __future__ import annotations

import tempfile

import torch
from harness import gaussians8_truth, load, open_pipeline, spread, table, train

from distill.eval.toy import toy_report

SEEDS = (0, 1, 2)


def bench_progressive(quick: bool) -> str:
    teacher, ref = gaussians8_truth()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        _, secs = train(load("configs/progressive_gaussians8.yaml", tmp, "progressive.start_steps=16"))
        for n in (8, 4, 2, 1):
            pipe = open_pipeline(f"{tmp}/rounds/steps-{n}")
            x = pipe(batch_size=8000, generator=torch.Generator().manual_seed(0), output_type="pt").images
            s = toy_report(x, teacher.model, ref)
            d = toy_report(teacher.sample(8000, num_steps=n, generator=torch.Generator().manual_seed(0)),
                           teacher.model, ref)
            rows.append([n, s["swd"], f"{s['modes']}/8", d["swd"], f"{d['modes']}/8", d["swd"] / s["swd"]])
        seeds = SEEDS[:1] if quick else SEEDS
        ddim8 = [toy_report(teacher.sample(8000, num_steps=8, generator=torch.Generator().manual_seed(s)),
                            teacher.model, ref)["swd"] for s in seeds]
        ema_rows = [["exact teacher, DDIM 8 steps", "-", spread(ddim8), "-"]]
        for ema in (False, True):
            swd, took = [], []
            for s in seeds:
                out = f"{tmp}/shipped-{ema}-{s}"
                extra = ["progressive.start_steps=4"] if quick else []
                cfg = load("configs/progressive_gaussians8.yaml", out, f"progressive.round_ema={ema}",
                           f"train.seed={s}", *extra)
                path, t = train(cfg)
                pipe = open_pipeline(path)
                x = pipe(batch_size=8000, generator=torch.Generator().manual_seed(s), output_type="pt").images
                swd.append(toy_report(x, teacher.model, ref)["swd"])
                took.append(t)
            ema_rows.append([f"one-step student, round_ema={str(ema).lower()}",
                             f"`progressive.round_ema={str(ema).lower()}`", spread(swd),
                             f"{sum(took) / len(took):.0f}"])
    return (f"### (e) Progressive distillation on toy:gaussians8 (16 -> 1 steps, {secs:.0f} s of training; "
            "goal: student closer to the truth than teacher DDIM at every step count)\n\n"
            + table(["steps", "student SWD", "student modes", "teacher DDIM SWD", "DDIM modes",
                     "DDIM SWD / student SWD"], rows)
            + "\n\nThe shipped `configs/progressive_gaussians8.yaml` (64 -> 1 steps) with and without the "
              "per-round EMA (decay train.ema_decay = 0.99), 8,000 samples, mean +- sd over seeds "
              f"{', '.join(map(str, seeds))} (training seed = sampling seed); goal: the one-step student at "
              "or below the exact teacher's 8-step DDIM\n\n"
            + table(["model", "overrides", "sliced W2", "train s"], ema_rows) + "\n")

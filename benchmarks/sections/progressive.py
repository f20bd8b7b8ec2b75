"""(e) Progressive distillation on the exact toy:gaussians8 teacher.

Trains ``configs/progressive_gaussians8.yaml`` from 16 down to 1 step and compares each round's student
(8, 4, 2, 1 steps; 8,000 samples) with the teacher's DDIM at the same step count: sliced W2 to exact samples
and modes covered. Goal: the student closer to the truth than teacher DDIM at every step count.
"""

from __future__ import annotations

import tempfile

import torch
from harness import gaussians8_truth, load, open_pipeline, table, train

from distill.eval.toy import toy_report


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
    return (f"### (e) Progressive distillation on toy:gaussians8 (16 -> 1 steps, {secs:.0f} s of training; "
            "goal: student closer to the truth than teacher DDIM at every step count)\n\n"
            + table(["steps", "student SWD", "student modes", "teacher DDIM SWD", "DDIM modes",
                     "DDIM SWD / student SWD"], rows) + "\n")

"""(j) Multi-student distillation on the class-conditional digits teacher (Song et al. 2024 at our scale).

K = 4 students (copies of the class-conditional digits teacher, consecutive classes each) against K = 1,
same updates and batch (``configs/msd_digits.yaml``, DMD, batch 32 split evenly): FID with the digits
extractor, next to the teacher at 1 and 50 DDIM steps measured in the same run. Goal: K = 4 beats K = 1.
"""

from __future__ import annotations

import tempfile

from harness import load, open_pipeline, table, train

from distill import load_pipeline
from distill.eval.fid import compute_metrics, teacher_as_sampler
from distill.teachers import ASSETS

MSD_DIGITS_STEPS = 300


def bench_msd_digits(quick: bool) -> str:
    n = 500 if quick else 1000
    steps = 50 if quick else MSD_DIGITS_STEPS
    rows = []
    teacher = teacher_as_sampler(load_pipeline(str(ASSETS / "digits_teacher_cond")))
    teacher.set_progress_bar_config(disable=True)
    for k in (1, 50):
        r = compute_metrics(teacher, "sklearn:digits", ("fid",), n, "digits", steps=k)
        rows.append([f"teacher DDIM {k}", k, "-", r["fid"], "-"])
    with tempfile.TemporaryDirectory() as tmp:
        for k in (1, 4):
            path, secs = train(load("configs/msd_digits.yaml", f"{tmp}/{k}", "eval.enabled=false",
                                    f"train.max_steps={steps}", f"msd.num_students={k}"))
            pipe = open_pipeline(path)
            r = compute_metrics(pipe, "sklearn:digits", ("fid",), n, "digits")
            rows.append([f"K = {k} student{'s' if k > 1 else ''}", 1, steps, r["fid"], f"{secs:.0f}"])
    return ("### (j) Multi-student distillation on the class-conditional digits teacher "
            "(`configs/msd_digits.yaml`, students = copies of the teacher, DMD, batch 32 split evenly, "
            f"{steps} updates; {n} samples, FID with the digits extractor; goal (Song et al. 2024): K = 4 "
            "beats K = 1)\n\n"
            + table(["model", "steps", "updates", "FID (digits)", "train s"], rows) + "\n")

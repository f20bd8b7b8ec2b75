"""(h) Hybrid sampling on the class-conditional digits teacher (Gandikota & Bau 2025 at our scale).

Trains a 4-step progressive student of ``builtin:digits-cond`` (16 -> 4 steps) and compares the teacher's DDIM
(50 and 4 steps), the student alone, and hybrids whose first 1 or 2 steps are the teacher's: FID with the
digits extractor, diversity per class (pairwise cosine distance, Vendi) and images/s. Goal: hybrid diversity
>= 0.95x the 50-step teacher's, FID no worse than the student's, speed within 2x of the student's.
"""

from __future__ import annotations

import tempfile

from harness import load, open_pipeline, table, train

from distill import HybridPipeline, load_pipeline
from distill.eval.fid import compute_metrics, teacher_as_sampler
from distill.teachers import ASSETS


def bench_hybrid(quick: bool) -> str:
    n = 500 if quick else 1000
    with tempfile.TemporaryDirectory() as tmp:
        _, secs = train(load("configs/progressive_digits.yaml", tmp, "teacher.path=builtin:digits-cond",
                             "progressive.start_steps=16", "progressive.target_steps=4",
                             "eval.enabled=false"))
        student = open_pipeline(f"{tmp}/pipeline")
        teacher = teacher_as_sampler(load_pipeline(str(ASSETS / "digits_teacher_cond")))
        hybrid = HybridPipeline.from_pipelines(teacher, student)
        runs = [("teacher (DDIM)", teacher, 50, {}), ("teacher (DDIM)", teacher, 4, {}),
                ("student", student, None, {}),
                ("hybrid: 1 base + 3 student", hybrid, None, {"num_base_steps": 1}),
                ("hybrid: 2 base + 2 student", hybrid, None, {"num_base_steps": 2}),
                ("hybrid: 1 base interval in 4 DDIM steps + 3 student", hybrid, None,
                 {"num_base_steps": 1, "num_base_substeps": 4})]
        results = []
        for name, pipe, steps, kw in runs:
            pipe.set_progress_bar_config(disable=True)
            results.append((name, compute_metrics(pipe, "sklearn:digits", ("fid",), n, "digits", steps=steps,
                                                  diversity=True, **kw)))
    ref = results[0][1]
    stu = results[2][1]
    rows = []
    for name, r in results:
        per = [v["vendi"] for v in r["diversity_per_condition"].values()]
        speed = r["num_samples"] / r["generation_seconds"]
        rows.append([name, r["nfe"], r["fid"], r["diversity_pairwise"], r["vendi"],
                     f"{min(per):.3g}-{max(per):.3g}", r["diversity_pairwise"] / ref["diversity_pairwise"],
                     r["vendi"] / ref["vendi"], speed,
                     speed / (stu["num_samples"] / stu["generation_seconds"])])
    return ("### (h) Hybrid sampling on the class-conditional digits teacher (4-step progressive student, "
            f"{secs:.0f} s of training; {n} samples, 10 classes; diversity per class with the digits "
            "extractor's features, averaged; goal (Gandikota & Bau 2025): hybrid diversity >= 0.95x the "
            "50-step teacher's, FID no worse than the student's, speed within 2x of the student's)\n\n"
            + table(["sampler", "NFE", "FID (digits)", "pairwise cos distance", "Vendi",
                     "Vendi per class (min-max)", "distance / teacher-50", "Vendi / teacher-50", "images/s",
                     "speed / student"], rows)
            + "\n")

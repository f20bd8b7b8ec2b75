"""(h) Hybrid sampling on the class-conditional digits teacher (Gandikota & Bau 2025 at our scale).

Two students of ``builtin:digits-cond``, trained here: a one-step DMD student (``configs/msd_digits.yaml``
with one student: DMD, Yin et al. 2024, distilled from the teacher guided at scale ``DMD_GUIDANCE``, so its
diversity collapses as the paper's guided DMD2 student's does) and a 4-step progressive student (16 -> 4
steps, whose diversity stays close to the teacher's). For each, the student alone and hybrids whose first 1
or 2 steps are the unguided teacher's, with deterministic DDIM steps (``student_sampler="ddim"``) and with
the paper's LCM-style re-noising (``"stochastic"``), against the teacher's 50-step DDIM; each over ``SEEDS``
sampling seeds (mean +- sd): FID with the digits extractor, diversity per class (pairwise cosine distance,
Vendi) and images/s. Goal: hybrid diversity >= 0.95x the 50-step teacher's (both metrics), FID no worse
than the student's, speed within 2x of the student's. A one-step student after base steps is outside the
paper's setting (its generator, trained on sigma(t*) z alone, then sees signal plus noise).
"""

from __future__ import annotations

import tempfile
import warnings

import torch
from harness import load, open_pipeline, spread, table, train

from distill import HybridPipeline, OneStepPipeline, load_pipeline
from distill.eval.fid import compute_metrics, teacher_as_sampler
from distill.teachers import ASSETS

SEEDS = (0, 1, 2)
DMD_GUIDANCE = 3.0  # the teacher's CFG scale the DMD student is distilled from (DMD2 SDXL: 8)
DMD_UPDATES = 300


def _dmd_student(tmp: str, quick: bool):
    """The one-step DMD student (MSD with one student is plain DMD) as a OneStepPipeline."""
    path, secs = train(load("configs/msd_digits.yaml", f"{tmp}/dmd", "msd.num_students=1",
                            f"teacher.guidance_scale={DMD_GUIDANCE}",
                            f"train.max_steps={20 if quick else DMD_UPDATES}", "eval.enabled=false"))
    msd = load_pipeline(str(path))
    cfg = msd.config
    return OneStepPipeline(msd.students.students[0], msd.scheduler, generator_timestep=cfg.generator_timestep,
                           sample_shape=list(cfg.sample_shape), num_classes=cfg.num_classes), secs


def bench_hybrid(quick: bool) -> str:
    n = 300 if quick else 1000
    seeds = SEEDS[:1] if quick else SEEDS
    with tempfile.TemporaryDirectory() as tmp:
        dmd, dmd_secs = _dmd_student(tmp, quick)
        _, prog_secs = train(load("configs/progressive_digits.yaml", f"{tmp}/prog",
                                  "teacher.path=builtin:digits-cond", "progressive.start_steps=16",
                                  "progressive.target_steps=4", "eval.enabled=false"))
        prog = open_pipeline(f"{tmp}/prog/pipeline")
        teacher = teacher_as_sampler(load_pipeline(str(ASSETS / "digits_teacher_cond")))
        runs = [("teacher (DDIM)", teacher, 50, {}, None)]
        for label, student in ((f"DMD one-step (teacher CFG {DMD_GUIDANCE:g})", dmd),
                               ("progressive 4-step", prog)):
            hybrid = HybridPipeline.from_pipelines(teacher, student)
            runs.append((f"{label}: student", student, None, {}, label))
            for k in (1, 2):
                for sampler in ("ddim", "stochastic"):
                    runs.append((f"{label}: hybrid {k} base, {sampler}", hybrid, None,
                                 {"num_base_steps": k, "student_sampler": sampler}, label))
        results = []
        with warnings.catch_warnings():  # the one-step hybrids' "outside the paper's setting" (said above)
            warnings.simplefilter("ignore", UserWarning)
            for name, pipe, steps, kw, group in runs:
                pipe.set_progress_bar_config(disable=True)
                per_seed = [compute_metrics(pipe, "sklearn:digits", ("fid",), n, "digits", seed=s,
                                            steps=steps, diversity=True, **kw) for s in seeds]
                results.append((name, group, per_seed))
    ref = results[0][2]

    def mean(rs, key):
        return sum(r[key] for r in rs) / len(rs)

    def speed(rs):
        return torch.tensor([r["num_samples"] / r["generation_seconds"] for r in rs]).median().item()

    students = {g: rs for name, g, rs in results if name.endswith(": student")}
    rows = []
    for name, group, rs in results:
        stu = students.get(group)
        rows.append([name, rs[0]["nfe"], spread([r["fid"] for r in rs]),
                     spread([r["diversity_pairwise"] for r in rs]), spread([r["vendi"] for r in rs]),
                     mean(rs, "diversity_pairwise") / mean(ref, "diversity_pairwise"),
                     mean(rs, "vendi") / mean(ref, "vendi"), speed(rs),
                     speed(rs) / speed(stu) if stu else "-"])
    return ("### (h) Hybrid sampling on the class-conditional digits teacher (one-step DMD student, "
            f"{DMD_UPDATES} updates from the teacher at CFG {DMD_GUIDANCE:g}, {dmd_secs:.0f} s of training; "
            f"4-step progressive student, {prog_secs:.0f} s; {n} samples per seed, {len(seeds)} sampling "
            "seeds, "
            "mean +- sd; diversity per class with the digits extractor's features, averaged; the base is the "
            "unguided teacher; goal (Gandikota & Bau 2025): hybrid diversity >= 0.95x the 50-step teacher's, "
            "FID no worse than the student's, speed within 2x of the student's)\n\n"
            + table(["sampler", "NFE", "FID (digits)", "pairwise cos distance", "Vendi",
                     "distance / teacher-50", "Vendi / teacher-50", "images/s (median)", "speed / student"],
                    rows)
            + "\n")

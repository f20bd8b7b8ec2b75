"""(d) FID evaluation throughput with the digits extractor.

Two FID evaluations of the same one-step pipeline (built on the builtin digits teacher) against the sklearn
digits, in a fresh cache: the first computes the reference features, the second reads them from the cache;
then the reference part alone, cold vs cached. Goal: >= 5x faster for the cached reference part (the whole
evaluation is bounded by generating and featurising the new samples).
"""

from __future__ import annotations

import os
import tempfile
import time

from harness import table

from distill import OneStepPipeline
from distill.eval.extractors import make_extractor
from distill.eval.fid import compute_metrics, reference_features
from distill.teachers import Teacher


def bench_fid(quick: bool) -> str:
    n = 1000 if quick else 2000
    teacher = Teacher.from_pretrained("builtin:digits")
    pipe = OneStepPipeline(teacher.model, teacher.scheduler, generator_timestep=625)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["DISTILL_CACHE"] = cache
        t0 = time.time()
        first = compute_metrics(pipe, "sklearn:digits", ("fid",), n, batch_size=500)
        t1 = time.time() - t0
        t0 = time.time()
        second = compute_metrics(pipe, "sklearn:digits", ("fid",), n, batch_size=500)
        t2 = time.time() - t0
        # the reference part alone, cold vs cached
        ext, name, w = make_extractor("digits")
        os.environ["DISTILL_CACHE"] = cache + "/cold"
        t0 = time.time()
        reference_features("sklearn:digits", ext, name, w, 8)
        cold = time.time() - t0
        t0 = time.time()
        reference_features("sklearn:digits", ext, name, w, 8)
        warm = time.time() - t0
    rows = [["first evaluation", n, t1, n / t1, first["fid"]],
            ["second (cached reference)", n, t2, n / t2, second["fid"]]]
    return (f"### (d) FID evaluation throughput ({n} one-step samples, digits extractor)\n\n"
            + table(["run", "samples", "seconds", "images/s (generation + features)", "FID"], rows)
            + f"\n\nReference features: cold {cold:.3f} s, cached {warm:.4f} s -> "
              f"**{cold / max(warm, 1e-9):.0f}x**; whole evaluation speed-up {t1 / t2:.2f}x (goal >= 5x for "
              "the reference part; the whole evaluation is bounded by generating the new samples).\n")

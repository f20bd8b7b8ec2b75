"""(a) Sampling throughput on the builtin digits teacher (8x8), batch 64.

Measures samples/s of a one-step pipeline against the teacher's DDIM at 1 to 50 steps, and the overhead of
``OneStepPipeline`` over a bare forward of the same network, as interleaved pairs (median and 10-90% range).
Goal: the pipeline call costs <= 1.05x the bare network forward.
"""

from __future__ import annotations

import torch
from harness import deciles, paired_times, table, timeit

from distill import FewStepPipeline, OneStepPipeline
from distill.teachers import Teacher


def bench_sampling(quick: bool) -> str:
    teacher = Teacher.from_pretrained("builtin:digits")
    pipe_t = FewStepPipeline(teacher.model, teacher.scheduler, num_inference_steps=50)
    pipe_s = OneStepPipeline(teacher.model, teacher.scheduler, generator_timestep=625)
    for p in (pipe_t, pipe_s):
        p.set_progress_bar_config(disable=True)
    b = 64
    reps = 3 if quick else 5
    x = torch.randn(b, 1, 8, 8)
    ts = torch.full((b,), 625)

    def bare_forward():
        with torch.no_grad():
            return teacher.model(x, ts).sample

    one, bare, ratios = paired_times(lambda: pipe_s(batch_size=b, output_type="pt"), bare_forward,
                                     10 if quick else 30)
    rows = [["student (1 step)", 1, b / one, 1.0]]
    for n in (1, 2, 4, 8, 16, 50):
        t = timeit(lambda n=n: pipe_t(batch_size=b, num_inference_steps=n, output_type="pt"),
                   reps if n < 16 else 2)
        rows.append([f"teacher DDIM {n}", n, b / t, t / one])
    out = "### (a) Sampling, batch 64 (digits, 8x8)\n\n" + table(
        ["sampler", "NFE", "samples/s", "time / student time"], rows)
    q = deciles(ratios)
    out += (f"\n\nPipeline overhead: OneStepPipeline call / bare network forward, {len(ratios)} interleaved "
            f"pairs: median **{q[1]:.3f}**, 10-90% range {q[0]:.3f}-{q[2]:.3f} (goal <= 1.05; medians "
            f"{one * 1e3:.2f} ms vs {bare * 1e3:.2f} ms). A range that reaches below 1 is timing noise of "
            "that size.\n")
    return out

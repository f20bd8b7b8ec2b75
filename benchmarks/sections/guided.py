"""(f) Guided distillation on the class-conditional toy:gaussians8 teacher.

Trains ``configs/guided_gaussians8.yaml`` (stage one, then 16 -> 1 steps, guidance_scale in [1, 4]); at
guidance_scale 1, 2.5 and 4 and 4, 2, 1 steps, the sliced W2 of the student (deterministic and stochastic
sampler) and of the teacher's DDIM at the same steps to 250-step CFG-teacher samples, next to the noise
floor (250-step samples of another seed; 250 divides the 1,000 training steps, where diffusers' DDIM is a
consistent ODE solve: at 256 it steps to t - 3 between grid points 3.9 apart, 10x farther from 1,000-step
samples), and the share of samples nearest their own class's mode. Goal: the
student tracks the CFG teacher at every scale.
"""

from __future__ import annotations

import tempfile

import torch
from harness import load, open_pipeline, table, train

from distill.eval.toy import sliced_wasserstein
from distill.teachers import analytic_teacher


def bench_guided(quick: bool) -> str:
    n = 4000 if quick else 8000
    teacher = analytic_teacher("gaussians8", conditional=True)
    labels = torch.arange(n) % 8
    means = teacher.model.mix_means.float()

    def on_class(x):  # share of samples whose nearest mode is their own class
        return float((torch.cdist(x.float(), means).argmin(1) == labels).float().mean())

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        _, secs = train(load("configs/guided_gaussians8.yaml", tmp))
        cond = teacher.condition(class_labels=labels)
        for s in (1.0, 2.5, 4.0):
            ref = teacher.sample(n, 250, torch.Generator().manual_seed(1), cond, guidance_scale=s)
            floor = teacher.sample(n, 250, torch.Generator().manual_seed(2), cond, guidance_scale=s)
            for k in (4, 2, 1):
                pipe = open_pipeline(f"{tmp}/rounds/steps-{k}")
                x = pipe(batch_size=n, generator=torch.Generator().manual_seed(0), class_labels=labels,
                         guidance_scale=s, output_type="pt").images
                xs = pipe(batch_size=n, generator=torch.Generator().manual_seed(0), class_labels=labels,
                          guidance_scale=s, stochastic=True, output_type="pt").images
                d = teacher.sample(n, k, torch.Generator().manual_seed(0), cond, guidance_scale=s)
                rows.append([s, k, sliced_wasserstein(x, ref), sliced_wasserstein(xs, ref),
                             sliced_wasserstein(d, ref), sliced_wasserstein(floor, ref), on_class(x),
                             on_class(ref)])
    return (f"### (f) Guided distillation on the class-conditional toy:gaussians8 ({secs:.0f} s of training: "
            "stage one + 16 -> 1 steps, guidance_scale in [1, 4]; distances to 250-step CFG-teacher samples "
            f"at the same guidance_scale, {n} class-balanced samples; goal: the student tracks the CFG "
            "teacher at every scale)\n\n"
            + table(["guidance_scale", "steps", "student SWD to CFG teacher", "student, stochastic sampler",
                     "teacher DDIM (same steps) SWD", "noise floor (250-step, other seed)",
                     "student on-class share", "teacher on-class share"],
                    rows) + "\n")

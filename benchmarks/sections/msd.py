"""(i) Multi-student distillation on the class-conditional toy:gaussians8 (Song et al. 2024 at our scale).

K = 4 students against K = 1 of the same size (same per-sample inference cost, same updates, same total
batch, split evenly among the students), at two widths; and small students with teacher score matching
(TSM) against none at the same number of updates (and none with the TSM updates given to DM instead). Per
class: sliced W2 to exact samples of that class and the share of samples within 3 std of its mean, next to
the noise floor of exact samples. Goal: K = 4 beats K = 1 at the same per-sample cost, and TSM beats no TSM.
Then K = 4 against K = 1 with the ADM stage (DM, then DMD2's GAN term on exact samples of each student's
classes), over 3 training seeds; ``MSD_ADM_ONLY=1`` measures that table alone.
"""

from __future__ import annotations

import tempfile

import torch
from harness import flag, load, open_pipeline, spread, table, train

from distill.eval.toy import sliced_wasserstein
from distill.teachers import analytic_teacher

MSD_TOY_STEPS, MSD_TOY_BATCH, MSD_TSM, MSD_TOY_WIDTHS = 1000, 256, 300, (32, 128)
# the ADM comparison: DM up to MSD_ADM_START, then ADM to MSD_ADM_STEPS; the GAN weight is DMD2's ImageNet-64
# 3e-3 scaled by sqrt(12288 / 2), the DM gradient per value growing with the dimension (as configs/msd_digits)
MSD_ADM_SEEDS, MSD_ADM_START, MSD_ADM_STEPS, MSD_ADM_GAN = (0, 1, 2), 1000, 1500, 3e-3 * (12288 / 2) ** 0.5


def _per_class_toy(pipe, teacher, n: int) -> dict:
    """Per class c of toy:gaussians8: sliced W2 to exact samples of N(mu_c, std^2) and the share of samples
    within 3 std of mu_c (on-class); means and worst class."""
    means = teacher.model.mix_means.cpu().double()
    std = float(teacher.model.mix_variances.sqrt().mean())
    g = torch.Generator().manual_seed(1)
    sw, on = [], []
    for c in range(len(means)):
        x = pipe(class_labels=[c] * n, generator=torch.Generator().manual_seed(100 + c),
                 output_type="pt").images
        ref = means[c] + std * torch.randn(n, 2, generator=g, dtype=torch.float64)
        sw.append(sliced_wasserstein(x.double(), ref))
        on.append(float(((x.double() - means[c]).norm(dim=1) < 3 * std).double().mean()))
    return {"swd": sum(sw) / len(sw), "swd_worst": max(sw), "on": sum(on) / len(on), "on_worst": min(on)}


class _Exact:
    """The noise floor: exact class samples of another seed, called as a pipeline by the same metric."""

    def __init__(self, teacher):
        self.teacher = teacher

    def __call__(self, class_labels, generator, output_type):
        c, model = class_labels[0], self.teacher.model
        x = model.mix_means[c].cpu() + model.mix_variances[c].sqrt().cpu() * torch.randn(
            len(class_labels), 2, generator=generator)
        return type("Out", (), {"images": x})


def bench_msd(quick: bool) -> str:
    teacher = analytic_teacher("gaussians8", conditional=True)
    n = 500 if quick else 2000
    adm = _adm_table(teacher, n, quick)
    if flag("MSD_ADM_ONLY"):
        return adm
    steps = 300 if quick else MSD_TOY_STEPS
    runs = ([(f"K = 1, hidden {w}", [f"student.hidden={w}", "msd.num_students=1"]) for w in MSD_TOY_WIDTHS]
            + [(f"K = 4, hidden {w}", [f"student.hidden={w}", "msd.num_students=4"]) for w in MSD_TOY_WIDTHS])
    w = MSD_TOY_WIDTHS[0]
    runs += [(f"K = 4, hidden {w}, no TSM", [f"student.hidden={w}", "msd.num_students=4", "msd.tsm_steps=0"]),
             (f"K = 4, hidden {w}, no TSM (+{MSD_TSM} DM updates instead)",
              [f"student.hidden={w}", "msd.num_students=4", "msd.tsm_steps=0",
               f"train.max_steps={steps + MSD_TSM}"])]
    r = _per_class_toy(_Exact(teacher), teacher, n)
    rows = [["exact samples, another seed (noise floor)", "-", "-", "-", r["swd"], r["swd_worst"], r["on"],
             r["on_worst"], "-"]]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(runs):
            # later overrides win: a run's own train.max_steps / msd.tsm_steps replace these
            cfg = load("configs/msd_gaussians8.yaml", f"{tmp}/{i}", f"train.max_steps={steps}",
                       f"msd.tsm_steps={MSD_TSM}", f"train.batch_size={MSD_TOY_BATCH}", *extra)
            path, secs = train(cfg)
            pipe = open_pipeline(path)
            r = _per_class_toy(pipe, teacher, n)
            params = sum(p.numel() for p in pipe.students.students[0].parameters())
            rows.append([name, cfg.train.max_steps, cfg.msd.tsm_steps, params, r["swd"], r["swd_worst"],
                         r["on"], r["on_worst"], f"{secs:.0f}"])
    return ("### (i) Multi-student distillation on the class-conditional toy:gaussians8 (DMD per student, "
            f"batch {MSD_TOY_BATCH} split evenly among the students, {n} samples per class against exact "
            "samples of that class; goal (Song et al. 2024): K = 4 beats K = 1 at the same per-sample cost, "
            "and TSM beats no TSM)\n\n"
            + table(["students", "updates", "TSM steps", "params per student", "sliced W2 per class (mean)",
                     "sliced W2 (worst class)", "on-class share (mean)", "on-class (worst)", "train s"], rows)
            + "\n\n" + adm)


def _adm_table(teacher, n: int, quick: bool) -> str:
    """K = 4 against K = 1 (hidden 32, the same total batch) with the ADM stage, over training seeds."""
    seeds = MSD_ADM_SEEDS[:1] if quick else MSD_ADM_SEEDS
    start, steps = (100, 150) if quick else (MSD_ADM_START, MSD_ADM_STEPS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in (1, 4):
            res, secs = [], []
            for seed in seeds:
                cfg = load("configs/msd_gaussians8.yaml", f"{tmp}/k{k}-{seed}", f"train.max_steps={steps}",
                           f"msd.tsm_steps={MSD_TSM}", f"train.batch_size={MSD_TOY_BATCH}",
                           f"student.hidden={MSD_TOY_WIDTHS[0]}", f"msd.num_students={k}",
                           f"msd.adm_start_step={start}", f"msd.gan_weight={MSD_ADM_GAN}",
                           f"train.seed={seed}")
                path, t = train(cfg)
                res.append(_per_class_toy(open_pipeline(path), teacher, n))
                secs.append(t)
            rows.append([f"K = {k}, hidden {MSD_TOY_WIDTHS[0]}, DM then ADM", f"{start} + {steps - start}",
                         spread([r["swd"] for r in res]), spread([r["swd_worst"] for r in res]),
                         spread([r["on"] for r in res]), f"{sum(secs) / len(secs):.0f}"])
    return (f"K = 4 against K = 1 with the ADM stage (TSM {MSD_TSM} updates, DM, then DMD2's GAN term on "
            f"exact samples of each student's classes, weight {MSD_ADM_GAN:.3f}; batch {MSD_TOY_BATCH} split "
            f"evenly; training seeds {', '.join(map(str, seeds))}, mean +- sd):\n\n"
            + table(["students", "updates (DM + ADM)", "sliced W2 per class (mean)",
                     "sliced W2 (worst class)", "on-class share (mean)", "train s (mean)"], rows) + "\n")

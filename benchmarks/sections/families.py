"""(n) Every noise family on the exact toy:gaussians8 teacher: the same mixture written as a VP, EDM or flow
model (``teacher.noise``), each shipped toy config run with that one override, 3 seeds.

The data are identical in every family, so a gap between families is either a conversion bug or the
config's time choices landing on other noise levels (t_min / t_max and the generator's index t* are in
continuous time, which each family maps to its own sigma). Sliced W2 to 8,000 exact samples and modes
covered; the teacher's own 8-step sampler per family as the reference row. Goal: every family within
1.25x of the VP figure for each method, 8/8 modes.
"""

from __future__ import annotations

import tempfile

import torch
from harness import gaussians8_truth, load, open_pipeline, spread, table, train

from distill.eval.toy import toy_report
from distill.teachers import analytic_teacher

FAMILIES = ("vp", "edm", "flow")
METHODS = (("SIM (pseudo-Huber)", "configs/sim_gaussians8.yaml", []),
           ("Uni-Instruct rkl", "configs/uni_instruct_gaussians8.yaml", ["uni_instruct.divergence=rkl"]))


def bench_families(quick: bool) -> str:
    truth, ref = gaussians8_truth()
    rows = []
    for fam in FAMILIES:
        teacher = analytic_teacher("gaussians8", noise=fam)
        x = teacher.sample(8000, num_steps=8, generator=torch.Generator().manual_seed(0))
        r = toy_report(x, truth.model, ref)
        rows.append(["teacher, 8 steps of its own sampler", fam, f"{r['swd']:.4f}", f"{r['modes']}/8", "-",
                     "-"])
    return family_rows(METHODS, quick, rows, "(n) Noise families on toy:gaussians8")


def family_rows(methods, quick: bool, rows: list, title: str) -> str:
    """Each method's toy config under every family (``teacher.noise`` the only override), 1 or 3 seeds."""
    truth, ref = gaussians8_truth()
    seeds = (0,) if quick else (0, 1, 2)
    vp_swd = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg_path, extra in methods:
            for fam in FAMILIES:
                swd, modes, secs = [], [], []
                for seed in seeds:
                    out = f"{tmp}/{len(rows)}_{seed}"
                    path, s = train(load(cfg_path, out, f"teacher.noise={fam}", f"train.seed={seed}", *extra))
                    pipe = open_pipeline(path)
                    x = pipe(batch_size=8000, generator=torch.Generator().manual_seed(0),
                             output_type="pt").images
                    r = toy_report(x, truth.model, ref)
                    swd.append(r["swd"])
                    modes.append(r["modes"])
                    secs.append(s)
                mean = sum(swd) / len(swd)
                vp_swd.setdefault(name, mean)
                rows.append([name, fam, spread(swd), " / ".join(f"{m}/8" for m in modes),
                             f"{mean / vp_swd[name]:.2f}x", f"{sum(secs) / len(secs):.0f}"])
    return (f"### {title} (the exact mixture as a vp, edm or flow teacher; each "
            f"toy config with teacher.noise as its only override; {len(seeds)} seeds; sliced W2 to 8,000 "
            "exact samples)\n\n"
            + table(["model", "family", "sliced W2 (mean +- sd, per seed)", "modes per seed", "vs vp",
                     "train s"], rows) + "\n")

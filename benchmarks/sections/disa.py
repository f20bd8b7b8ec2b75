"""(k) DiSA step annealing on a MAR digits model, against MAR's own default sampler.

Trains ``configs/mar_digits.yaml`` (its head learns its variance, as MAR's and DiSA's reference heads; or
takes an export from ``DISTILL_MAR_PIPELINE``), then samples with a constant 100 head steps at every AR
iteration (the reference's ``num_sampling_steps``), both on DiSA's grid clipped at index 950 (the base of
every ratio) and as MAR's default sampler, which starts at index 999, against DiSA's schedules
100 -> 5 and 50 -> 5, a constant 5 (with the learned variance and with the fixed posterior variance, the
same head with v forced to 0), and the paper's setting of fewer AR iterations with linear 50 -> 5
(16 AR iterations otherwise, CFG 1.5): head evaluations, time inside the diffusion head, wall time and FID
with the digits extractor, for 3 seeds each, all in one run (seeds interleaved, so the machine's load
falls on every row alike). The full run also writes a sample grid to ``docs/mar_digits_cosine.png``.
Goal: >= 3x fewer head evaluations with FID within 5% of constant 100.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
from harness import ROOT, load, mean_sd, open_pipeline, spread, table, train

from distill.eval.fid import compute_metrics
from distill.eval.report import save_grid

MAR_STEPS = 3000  # configs/mar_digits.yaml
SETTINGS = [  # row, AR iterations, step_schedule, upper, lower, fixed-small variance; the first is the base
    ("constant 100 on DiSA's grid (clipped at index 950)", 16, "constant", 100, 100, False),
    ("constant 100, MAR's default sampler (up to index 999)", 16, None, 100, 100, False),
    ("cosine 100 -> 5", 16, "cosine", 100, 5, False),
    ("linear 100 -> 5", 16, "linear", 100, 5, False),
    ("two-stage 100 -> 5", 16, "two-stage", 100, 5, False),
    ("cosine 50 -> 5", 16, "cosine", 50, 5, False),
    ("linear 50 -> 5", 16, "linear", 50, 5, False),
    ("constant 5", 16, "constant", 5, 5, False),
    ("constant 5, fixed-small variance (v = 0)", 16, "constant", 5, 5, True),
    ("12 AR iterations, linear 50 -> 5 (the paper's fewer iterations)", 12, "linear", 50, 5, False),
]


def _wrap_head(head) -> dict:
    """Wrap ``head.forward``: its wall time accumulates in ``state["seconds"]``; with ``state["fixed"]`` its
    variance output is -1 (v = 0: the fixed posterior variance beta~, Nichol & Dhariwal 2021, eq. 15)."""
    state = {"seconds": 0.0, "fixed": False}
    inner, dim = head.forward, head.x_in.in_features

    def wrapped(*a, **kw):
        t = time.perf_counter()
        out = inner(*a, **kw)
        if state["fixed"]:
            out = torch.cat([out[:, :dim], -torch.ones_like(out[:, dim:])], dim=1)
        state["seconds"] += time.perf_counter() - t
        return out

    head.forward = wrapped
    return state


def _mean_sd(values: list[float], fmt: str) -> str:
    """``mean +- sd`` over seeds in ``fmt`` (``mean`` alone for one seed; the sd without a sign)."""
    mean, sd = mean_sd(values)
    return format(mean, fmt) + ("" if len(values) == 1 else " +- " + format(sd, fmt.lstrip("+")))


def bench_disa(quick: bool) -> str:
    n, seeds = (300, (0,)) if quick else (1000, (0, 1000, 2000))
    path = os.environ.get("DISTILL_MAR_PIPELINE")  # an already trained export (skips the training)
    secs, updates = None, 300 if quick else MAR_STEPS
    with tempfile.TemporaryDirectory() as tmp:
        if not path:
            path, secs = train(load("configs/mar_digits.yaml", f"{tmp}/mar",
                                    *(["train.max_steps=300"] if quick else [])))
            path = str(path)
        pipe = open_pipeline(path)
        if not pipe.mar.config.learn_sigma:
            raise SystemExit(f"{path}: this section compares the learned head variance; export a model "
                             "trained with mar.learn_sigma=true.")
        state = _wrap_head(pipe.mar.head)
        res = {name: {"head": [], "wall": [], "fid": []} for name, *_ in SETTINGS}
        evaluations = {}
        for seed in seeds:
            for name, num_iter, schedule, upper, lower, fixed in SETTINGS:
                state["seconds"], state["fixed"] = 0.0, fixed
                t0 = time.time()
                r = compute_metrics(pipe, "sklearn:digits", ("fid",), n, "digits", num_iter=num_iter,
                                    step_schedule=schedule, diffusion_steps=upper, min_diffusion_steps=lower,
                                    guidance_scale=1.5, seed=seed)
                res[name]["wall"].append(time.time() - t0)
                res[name]["head"].append(state["seconds"])
                res[name]["fid"].append(r["fid"])
                print(f"disa seed {seed} | {name}: FID {r['fid']:.3f}, head {state['seconds']:.1f} s, wall "
                      f"{res[name]['wall'][-1]:.1f} s", file=sys.stderr, flush=True)
                evaluations[name] = pipe(batch_size=1, num_iter=num_iter, step_schedule=schedule,
                                         diffusion_steps=upper, min_diffusion_steps=lower).head_evaluations
        state["fixed"] = False
        base = res[SETTINGS[0][0]]
        rows = []
        for name, *_ in SETTINGS:
            r = res[name]
            # paired by seed
            speed_up = {key: [b / v for b, v in zip(base[key], r[key])] for key in ("head", "wall")}
            fid_change = [100 * (v / b - 1) for b, v in zip(base["fid"], r["fid"])]
            rows.append([name, evaluations[name], f"{evaluations[SETTINGS[0][0]] / evaluations[name]:.2f}x",
                         f"{sum(r['head']) / len(seeds):.1f}", _mean_sd(speed_up["head"], ".2f") + "x",
                         f"{sum(r['wall']) / len(seeds):.1f}", _mean_sd(speed_up["wall"], ".2f") + "x",
                         spread(r["fid"]), _mean_sd(fid_change, "+.1f").replace(" +- ", "% +- ") + "%"])
        grid = ROOT / "docs" / "mar_digits_cosine.png"
        if not quick:
            x = pipe(batch_size=100, class_labels=[i // 10 for i in range(100)], num_iter=16,
                     step_schedule="cosine", diffusion_steps=50, min_diffusion_steps=5, guidance_scale=1.5,
                     generator=torch.Generator().manual_seed(0), output_type="pt").images
            save_grid(x, grid, nrow=10)
    if secs is None:  # a given export: its training time from its run.json
        run = json.loads((Path(path).parent / "run.json").read_text())
        secs = (datetime.fromisoformat(run["ended"]) - datetime.fromisoformat(run["started"])).total_seconds()
        updates = run["step"]
    trained = f"{updates} updates trained in {secs:.0f} s on this machine"
    return (f"### (k) DiSA step annealing on a MAR digits model (`configs/mar_digits.yaml`, learned head "
            f"variance, {trained}; CFG 1.5 with MAR's linear schedule, temperature 1; {n} samples per seed, "
            f"seeds {', '.join(map(str, seeds))}, FID with the digits extractor against the 1,797 digits at "
            "16x16; head evaluations per image batch; speed-ups and FID changes are per seed against "
            "constant 100 on the clipped grid at the same seed (mean +- sd); goal: >= 3x fewer head "
            "evaluations with FID within 5% of constant 100)\n\n"
            + table(["head schedule", "head evaluations", "fewer evaluations", "head s", "head speed-up",
                     "wall s", "wall speed-up", "FID (digits)", "FID vs constant 100"], rows)
            + (f"\n\nSamples (cosine 50 -> 5, one row per class): `docs/{grid.name}`.\n" if not quick
               else "\n"))

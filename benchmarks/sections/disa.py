"""(k) DiSA step annealing on a MAR digits model.

Trains ``configs/mar_digits.yaml`` (or takes an export from ``DISTILL_MAR_PIPELINE``), then samples with MAR's
sampler at a constant 50 head steps against linear / cosine / two-stage 50 -> 5, linear 25 -> 3 and a
constant 5 (16 AR iterations, CFG 1.5): wall time, time inside the diffusion head, head evaluations and FID
with the digits extractor, all in one run (constant 50 at other seeds gives the FID spread). The full run
also writes a sample grid to ``docs/mar_digits_cosine.png``. Goal: >= 3x less head time with FID within
10% of constant 50.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
from harness import ROOT, load, open_pipeline, table, train

from distill.eval.fid import compute_metrics
from distill.eval.report import save_grid

MAR_STEPS = 3000  # configs/mar_digits.yaml


def _time_head(head) -> list[float]:
    """Wrap ``head.forward`` to add its wall time to the returned one-element accumulator."""
    spent = [0.0]
    inner = head.forward

    def timed(*a, **kw):
        t = time.perf_counter()
        out = inner(*a, **kw)
        spent[0] += time.perf_counter() - t
        return out

    head.forward = timed
    return spent


def bench_disa(quick: bool) -> str:
    n = 500 if quick else 1000
    path = os.environ.get("DISTILL_MAR_PIPELINE")  # an already trained export (skips the training)
    secs = None
    with tempfile.TemporaryDirectory() as tmp:
        if not path:
            path, secs = train(load("configs/mar_digits.yaml", f"{tmp}/mar",
                                    *(["train.max_steps=300"] if quick else [])))
            path = str(path)
        pipe = open_pipeline(path)
        spent = _time_head(pipe.mar.head)
        settings = [("constant 50 (MAR's sampler)", None, 50, 50),
                    ("constant 50, other seeds (FID spread)", None, 50, 50),
                    ("linear 50 -> 5", "linear", 50, 5), ("cosine 50 -> 5", "cosine", 50, 5),
                    ("two-stage 50 -> 5", "two-stage", 50, 5), ("linear 25 -> 3", "linear", 25, 3),
                    ("constant 5", "constant", 50, 5)]
        rows, base = [], None
        for name, schedule, upper, lower in settings:
            spent[0] = 0.0
            t0 = time.time()
            r = compute_metrics(pipe, "sklearn:digits", ("fid",), n, "digits", num_iter=16,
                                step_schedule=schedule, diffusion_steps=upper, min_diffusion_steps=lower,
                                guidance_scale=1.5, seed=1000 if "other seeds" in name else 0)
            wall = time.time() - t0
            calls = pipe(batch_size=1, num_iter=16, step_schedule=schedule, diffusion_steps=upper,
                         min_diffusion_steps=lower).head_evaluations
            base = base or (spent[0], wall, r["fid"])
            rows.append([name, calls, f"{spent[0]:.1f}", f"{base[0] / spent[0]:.2f}x", f"{wall:.1f}",
                         f"{base[1] / wall:.2f}x", r["fid"], f"{100 * (r['fid'] / base[2] - 1):+.0f}%"])
        grid = ROOT / "docs" / "mar_digits_cosine.png"
        if not quick:
            x = pipe(batch_size=100, class_labels=[i // 10 for i in range(100)], num_iter=16,
                     step_schedule="cosine", diffusion_steps=50, min_diffusion_steps=5, guidance_scale=1.5,
                     generator=torch.Generator().manual_seed(0), output_type="pt").images
            save_grid(x, grid, nrow=10)
    if secs is None:  # a given export: its training time from its run.json
        run = json.loads((Path(path).parent / "run.json").read_text())
        secs = (datetime.fromisoformat(run["ended"]) - datetime.fromisoformat(run["started"])).total_seconds()
    trained = f"{300 if quick else MAR_STEPS} updates trained in {secs:.0f} s on this machine"
    return (f"### (k) DiSA step annealing on a MAR digits model (`configs/mar_digits.yaml`, {trained}; 16 AR "
            f"iterations, CFG 1.5, temperature 1; {n} samples, FID with the digits extractor against the "
            "1,797 digits at 16x16; head evaluations per image batch; goal: >= 3x less head time with FID "
            "within 10% of constant 50)\n\n"
            + table(["head schedule", "head evaluations", "head s", "head speed-up", "wall s",
                     "wall speed-up", "FID (digits)", "FID vs constant 50"], rows)
            + (f"\n\nSamples (cosine 50 -> 5, one row per class): `docs/{grid.name}`.\n" if not quick
               else "\n"))

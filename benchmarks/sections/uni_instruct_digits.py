"""(g) Uni-Instruct on digits: ``configs/uni_instruct_digits.yaml`` end to end.

Trains the config (2,000 updates, batch 32, forward KL) with its evaluation off, then runs the report that
training would write: FID with the digits extractor against the sklearn digits for the one-step student and
the teacher's DDIM, both measured in this run. Goal: the one-step student's FID close to the teacher's.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from harness import load, table

from distill.eval.evaluate import report_after_training
from distill.trainers import trainer_class


def bench_uni_instruct_digits(quick: bool) -> str:
    rows = []
    # the config's default; other f by adding ("rkl", ["uni_instruct.divergence=rkl"]) here
    runs = [("fkl", [])]
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in runs:
            cfg = load("configs/uni_instruct_digits.yaml", f"{tmp}/{name}", "eval.enabled=false", *extra)
            t0 = time.time()
            trainer = trainer_class(cfg.method)(cfg)
            path = trainer.train()
            secs = time.time() - t0
            cfg.eval.enabled = True
            report_after_training(trainer.config, trainer.teacher, trainer.data, path)
            rep = json.loads((Path(tmp) / name / "report" / "fid_report.json").read_text())
            for r in rep["results"]:
                label = (f"Uni-Instruct {name} student" if r["model"] == "student"
                         else f"teacher DDIM {r['steps']}")
                rows.append([label, r["steps"], r["fid"], r["num_samples"],
                             f"{secs:.0f}" if r["model"] == "student" else "-"])
    return ("### (g) Uni-Instruct on digits (`configs/uni_instruct_digits.yaml`, 2,000 updates, batch 32; "
            "FID with the digits extractor against sklearn digits, teacher measured in the same run)\n\n"
            + table(["model", "steps", "FID (digits)", "samples", "train s"], rows) + "\n")

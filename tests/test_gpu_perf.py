"""The GPU performance check (benchmarks/gpu_perf.py) runs end to end in its CPU dry run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = ["trainer", "batch", "mode", "compile s", "trainer ms/update", "bare ms", "ratio (median of pairs)",
          "ratio 10-90%", "img/s", "GFLOP/update", "TFLOP/s", "MFU (measured peak)", "MFU (datasheet)",
          "peak GiB", "status"]
TRAINERS = ["teacher", "sim", "uni_instruct", "progressive"]


def test_perf_dry_run(tmp_path):
    out = tmp_path / "perf"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("GPU_PERF_DRY_COMPILE", None)
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--perf", "--dry-run", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    md = (out / "perf.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert [c.strip() for c in table[0].strip("|").split("|")] == HEADER
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    rows = json.loads((out / "perf.json").read_text())["rows"]
    assert len(cells) == len(rows)
    assert [json.loads(line)["trainer"] for line in proc.stdout.splitlines() if line.startswith("{")] == [
        r["trainer"] for r in rows]  # one JSON line per row on stdout

    # rows timed against bare passes
    ran = [r for r in rows if r["status"].startswith("ok") and "bare_ms" in r]
    # the loop of an earlier commit (only where .gpu_baseline/ holds its source) and ratios to it
    for r in rows:
        if "loop before the change" in r["trainer"] and r["status"].startswith(("ok", "img/s")):
            assert r["img_per_s"] > 0 and (r.get("ratio", 1) > 0), r
    keys = [(r["trainer"], r["batch"], r["mode"]) for r in ran]
    assert len(keys) == len(set(keys))  # one row per (trainer, batch, mode)
    assert {(t, 4, "eager") for t in TRAINERS} <= set(keys), [r for r in rows if r not in ran]
    assert any(t.startswith("OneStepPipeline") for t, _, _ in keys)
    for r, c in zip(rows, cells):
        assert c[:3] == [r["trainer"], str(r["batch"]), r["mode"]]
        if r in ran:
            for k in ("ratio", "ratio_p10", "ratio_p90", "trainer_ms", "bare_ms", "img_per_s", "gflop"):
                assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] > 0, (k, r)
            assert r["ratio_p10"] <= r["ratio"] <= r["ratio_p90"]
            assert float(c[HEADER.index("ratio (median of pairs)")]) > 0
            assert c[HEADER.index("MFU (datasheet)")] == "n/a"  # no CUDA in the dry run

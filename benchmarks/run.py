"""distill benchmarks: every figure is a ratio measured side by side in the same run.

    python benchmarks/run.py [--only sampling,training,fid,quality,progressive,guided,uni_instruct_digits,
                                      hybrid,msd,msd_digits,disa,beat_teacher,families,families_rounds,
                                      score_forms]
                             [--quick]
    python benchmarks/gpu_check.py OUT   (on a GPU machine: bf16/CUDA smoke run of every trainer)

Prints Markdown tables and writes them, with the machine description, to benchmarks/results.md.
These are not tests: nothing here asserts; goals are printed next to the measured values.

Each section NAME is ``bench_NAME`` in ``benchmarks/sections/NAME.py`` (what it measures and its goal in that
module's docstring); what they share is in ``benchmarks/harness.py``. A section's result is written to
``benchmarks/results/NAME.md``; results.md gathers every section measured so far, in the order below.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # harness and sections/ sit next to this file
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from harness import RESULTS  # noqa: E402

# the sections, in results.md's order: the letters (a) ... (l), (n), (o) and (p) are their headings' labels
SECTIONS = ("sampling", "training", "fid", "quality", "progressive", "guided", "uni_instruct_digits",
            "hybrid", "msd", "msd_digits", "disa", "beat_teacher", "families", "families_rounds",
            "score_forms")


# sections measured on a GPU machine by benchmarks/gpu_check.py (m): kept in results.md, never rerun here
DEVICE_SECTIONS = ("gpu_loop",)


def section(name: str):
    """The function ``bench_NAME(quick) -> str`` of one section (its module imported on demand)."""
    return getattr(importlib.import_module(f"sections.{name}"), f"bench_{name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(SECTIONS))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    parts = [p.strip() for p in args.only.split(",")]
    unknown = [p for p in parts if p not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; the sections are {', '.join(SECTIONS)}")
    out = ["# distill benchmark results", "",
           f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} (threads "
           f"{torch.get_num_threads()}), CUDA {'yes' if torch.cuda.is_available() else 'no'}. Date: "
           f"{time.strftime('%Y-%m-%d')}. Command: `python "
           f"benchmarks/run.py{' --quick' if args.quick else ''}`.", ""]
    RESULTS.mkdir(exist_ok=True)
    for p in parts:
        t0 = time.time()
        text = section(p)(args.quick)
        print(text, flush=True)
        (RESULTS / f"{p}.md").write_text(f"{text}\n_({p}: {time.time() - t0:.0f} s, "
                                         f"{time.strftime('%Y-%m-%d %H:%M')}, `python benchmarks/run.py "
                                         f"--only {p}`)_\n")
    for name in (*SECTIONS, *DEVICE_SECTIONS):  # results.md = every section measured so far, in a fixed order
        if (RESULTS / f"{name}.md").is_file():
            out += [(RESULTS / f"{name}.md").read_text(), ""]
    (HERE / "results.md").write_text("\n".join(out))
    print(f"written to {HERE / 'results.md'}")


if __name__ == "__main__":
    main()

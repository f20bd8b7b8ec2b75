"""What the benchmark sections share: paths, the offline set-up, timing helpers, the Markdown table, the
overrides of every in-process training, the exact toy reference, and the subprocess runner of the sections
that train side by side.

Each section lives in ``benchmarks/sections/<name>.py`` and returns one Markdown section;
``benchmarks/run.py`` prints and writes them. Nothing here asserts: goals are printed next to the measured
values. Only distill's public names are used, here and in the sections.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent  # benchmarks/
ROOT = HERE.parent  # the repository: configs/, docs/, distill/
RESULTS = HERE / "results"  # one file per section; results.md gathers them
sys.path.insert(0, str(ROOT))

import diffusers  # noqa: E402

diffusers.utils.logging.disable_progress_bar()

# what every training run inside a section gets: no progress bar, no tracker
QUIET = ("train.progress_bar=false", "train.report_to=none")


# ---------------------------------------------------------------------- timing and tables
def timeit(fn, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() over `repeat` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def paired_times(fn_a, fn_b, pairs: int, warmup: int = 2):
    """Interleaved timing of two functions: (median a, median b, per-pair ratios a/b). Alternating the
    calls exposes both to the same machine state, so the ratio's spread shows the noise."""
    for _ in range(warmup):
        fn_a(), fn_b()
    ta, tb = [], []
    for i in range(pairs):
        for fn, acc in ((fn_a, ta), (fn_b, tb)) if i % 2 == 0 else ((fn_b, tb), (fn_a, ta)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return med(ta), med(tb), [a / b for a, b in zip(ta, tb)]


def deciles(ratios: list[float]) -> list[float]:
    """The 10%, 50% and 90% quantiles of interleaved-pair ratios (see :func:`paired_times`)."""
    return torch.tensor(ratios).quantile(torch.tensor([0.1, 0.5, 0.9])).tolist()


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines)


def flag(name: str, default: bool = False) -> bool:
    """A section's on / off switch from the environment: ``NAME=1`` or ``NAME=0`` (unset: ``default``)."""
    value = os.environ.get(name)
    if value is None:
        return default
    if value not in ("0", "1"):
        raise SystemExit(f"{name}={value!r}: set it to 1 (on) or 0 (off).")
    return value == "1"


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (float64; sd 0 for one value)."""
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def spread(values: list[float]) -> str:
    """``mean +- sd (v1 / v2 / ...)`` over seeds; the value alone for one seed."""
    mean, sd = mean_sd(values)
    per = " / ".join(f"{v:.3f}" for v in values)
    return f"{mean:.3f} +- {sd:.3f} ({per})" if len(values) > 1 else f"{values[0]:.3f}"


# ---------------------------------------------------------------------- training in process
def load(config: str, output_dir, *overrides: str):
    """``load_config`` of a repository config (path relative to the repository root) with ``output_dir``,
    :data:`QUIET` and then ``overrides`` (later overrides of the same key win)."""
    from distill.config import load_config

    return load_config(ROOT / config, [f"output_dir={output_dir}", *QUIET, *overrides])


def train(cfg) -> tuple[Path | None, float]:
    """Train ``cfg`` with its method's trainer to ``train.max_steps``: (exported pipeline folder, seconds)."""
    from distill.trainers import trainer_class

    t0 = time.time()
    path = trainer_class(cfg.method)(cfg).train()
    return path, time.time() - t0


def open_pipeline(path):
    """``load_pipeline`` with the progress bar off."""
    from distill import load_pipeline

    pipe = load_pipeline(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------- the exact toy reference
def gaussians8_truth(n: int = 8000):
    """The exact toy:gaussians8 teacher and ``n`` exact samples (seed 1): the reference of the toy
    sections."""
    from distill.teachers import analytic_teacher

    teacher = analytic_teacher("gaussians8")
    ref, _ = teacher.model.sample_data(n, generator=torch.Generator().manual_seed(1))
    return teacher, ref


def exact_floor(teacher, ref) -> dict:
    """The noise floor of the toy metrics: ``toy_report`` of as many exact samples of another seed (2)."""
    from distill.eval.toy import toy_report

    x = teacher.model.sample_data(len(ref), generator=torch.Generator().manual_seed(2))[0]
    return toy_report(x, teacher.model, ref)


# ---------------------------------------------------------------------- trainings side by side
def run_jobs(commands: list[tuple[str, list[str]]], logs: str, parallel: int) -> dict[str, float]:
    """Run ``distill`` subcommands ``(name, argv)`` as subprocesses, ``parallel`` at a time with one thread
    each, logging to ``logs/NAME.log``; seconds per job by name. A failing job stops the section with its
    log's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    pending, running, secs = list(commands), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            name, argv = pending.pop(0)
            log = Path(logs) / f"{name}.log"
            with open(log, "w") as f:
                proc = subprocess.Popen([sys.executable, "-m", "distill", *argv], cwd=ROOT, env=env,
                                        stdout=f, stderr=subprocess.STDOUT)
            running[name] = (proc, time.time(), log)
        time.sleep(0.5)
        for name, (proc, t0, log) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode:
                raise RuntimeError(f"job {name} failed (exit {proc.returncode}):\n{log.read_text()[-2000:]}")
            secs[name] = time.time() - t0
    return secs

"""Time the training loop of an earlier distill (a source tree given as the first argument) on the same
config: each iteration is that version's loop body (seeded generator, batch, ``train_step``, EMA, the per-step
``float()`` of every log and the stop check), between two device synchronisations. Prints one JSON line.

    python benchmarks/gpu_perf_old_loop.py OLD_SRC CONFIG ITERATIONS WARMUP [key=value ...]

Run by ``benchmarks/gpu_perf.py`` in a subprocess (the old package is also called ``distill``), so that a
"today's eager" figure is measured in the same run as the new loop; the old source is a copy of the package
at the commit before the GPU-loop work (``git archive COMMIT distill``), carried to the device as
``.gpu_baseline/``.
"""

import json
import math
import statistics
import sys
import time

src, config, iterations, warmup, *overrides = sys.argv[1:]
sys.path.insert(0, src)

import torch  # noqa: E402

from distill.config import load_config  # noqa: E402
from distill.trainers import trainer_class  # noqa: E402

assert sys.modules["distill"].__file__.startswith(src), sys.modules["distill"].__file__
cfg = load_config(config, overrides)
trainer = trainer_class(cfg.method)(cfg)
trainer.setup()
acc = trainer.accelerator
cuda = torch.cuda.is_available()


def old_iteration():
    """The loop body of distill before the GPU-loop change (its DistillationTrainer._loop, minus
    checkpoints)."""
    step = trainer.step
    trainer._set_lr(step)
    trainer._nonfinite = set()
    logs = {}
    for micro in range(cfg.train.gradient_accumulation_steps):
        trainer.rng = trainer.step_generator(step, micro)
        batch = trainer._batch(trainer.rng)
        with acc.accumulate(*trainer.modules.values()):
            logs = trainer.train_step(batch, step)
    for name, ema in trainer.emas.items():
        ema.step(trainer.unwrap(name).parameters())
    trainer.step += 1
    logs = {k: float(v) for k, v in logs.items() if v is not None}
    trainer._nonfinite.update(f"loss {k}={v}" for k, v in logs.items() if not math.isfinite(v))
    trainer._stop_requested()


times = []
for i in range(int(warmup) + int(iterations)):
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    old_iteration()
    if cuda:
        torch.cuda.synchronize()
    if i >= int(warmup):
        times.append(time.perf_counter() - t0)
print(json.dumps({"ms_median": 1e3 * statistics.median(times), "ms_min": 1e3 * min(times),
                  "ms_max": 1e3 * max(times), "iterations": len(times)}), flush=True)

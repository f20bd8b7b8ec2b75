"""(b) Training overhead: the time of one full trainer update against the network passes it needs.

For the digits teacher loop, SIM and Uni-Instruct (forward KL, ratio warm-up off), each trainer's
``train_iteration()`` (batch, noise, train step, EMA) is timed in interleaved pairs against the same passes
written as plain torch on the same networks (``benchmarks/bare_steps.py``: no Accelerate, no EMA, no
logging). Goal: median ratio <= 1.10 for the teacher loop and <= 1.15 for the distillation trainers.
"""

from __future__ import annotations

import tempfile

from bare_steps import Bare
from harness import deciles, load, paired_times, table

from distill.trainers import trainer_class


def _trainer_iteration(trainer):
    """One full trainer iteration (batch, objective and its updates, EMA) as the loop runs it."""
    trainer.step = 1000  # past any warm-up
    return trainer.train_iteration


def bench_training(quick: bool) -> str:
    rows = []
    steps = 8 if quick else 20  # interleaved pairs
    with tempfile.TemporaryDirectory() as tmp:
        specs = [
            ("teacher", "configs/teacher_digits.yaml", []),
            ("sim", "configs/sim_digits.yaml", []),
            ("uni_instruct (fkl)", "configs/uni_instruct_digits.yaml", ["uni_instruct.ratio_warmup_steps=0"]),
        ]
        for name, cfg_path, extra in specs:
            cfg = load(cfg_path, f"{tmp}/{name.split()[0]}", "train.checkpointing_steps=100000", *extra)
            trainer = trainer_class(cfg.method)(cfg)
            trainer.setup()

            # the network passes the method needs, in a bare loop of the same networks, interleaved with
            # the trainer
            b = cfg.train.batch_size
            passes = {"teacher": "1 fwd+bwd", "sim": "bare torch SIM step (same passes)",
                      "uni_instruct": "bare torch Uni-Instruct fkl step (same passes)"}[cfg.method]
            bare_step = Bare(trainer)
            t_trainer, bare, ratios = paired_times(_trainer_iteration(trainer), bare_step.run, steps)
            bare_step.close()
            q = deciles(ratios)
            rows.append([name, b, passes, t_trainer * 1e3, bare * 1e3, q[1], f"{q[0]:.3f}-{q[2]:.3f}"])
    return ("### (b) Training: per-iteration time / time of the network passes it needs (goal <= 1.10 for "
            "the teacher loop, <= 1.15 for the distillation trainers)\n\n"
            + table(["trainer", "batch", "network passes", "trainer ms/it", "bare passes ms",
                     "median ratio of interleaved pairs", "10-90% range"], rows) + "\n")

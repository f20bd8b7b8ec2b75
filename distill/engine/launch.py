"""The launch: the Accelerator a config asks for (refusing set-ups that would silently misbehave) and the
signal handling that turns SIGINT / SIGTERM into a checkpoint and a clean stop."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from ..config import Config, validate
from ..errors import ConfigError

logger = logging.getLogger("distill")


@contextlib.contextmanager
def stop_on_signals(trainer):
    """SIGINT and SIGTERM set ``trainer._stop_signal`` (the loop checkpoints and stops after the current
    step); a second SIGINT interrupts at once. Outside the main thread nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if trainer._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer._stop_signal = signum
        if trainer.accelerator.is_main_process:
            print(f"\n{signal.Signals(signum).name}: finishing step {trainer.step + 1} and writing a "
                  "checkpoint (Ctrl-C again to abandon it)...", file=sys.stderr, flush=True)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)



REFUSED_LAUNCH = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}


def make_accelerator(cfg: Config) -> Accelerator:
    """An Accelerator for this config; refuses set-ups that would silently misbehave.

    An Accelerate FSDP launch (``accelerate launch --use_fsdp`` or ``configs/accelerate/fsdp.yaml``) turns on
    ``train.fsdp``: distill shards its trained networks itself (see :mod:`distill.sharding`) over a plain
    multi-process Accelerator. DeepSpeed is refused: it takes one model per engine, and a score-distillation
    step trains two or three networks from one loss. fp16 is refused (see ``config.validate``); an fp16
    launch flag is refused too rather than silently overridden.
    """
    for var, name in REFUSED_LAUNCH.items():
        if os.environ.get(var, "").lower() in ("1", "true", "yes"):
            raise ConfigError(f"This launch uses {name} ({var} is set by your Accelerate config), which "
                              "distill does not support: a score-distillation step trains two or three "
                              f"networks from one loss, and {name} takes one model per engine. Shard with "
                              "FSDP instead (`distill launch --config_file configs/accelerate/fsdp.yaml "
                              "CONFIG`, or train.fsdp=true), or use plain data parallel (`distill launch "
                              "--multi_gpu --num_processes N CONFIG`).")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes"):
        os.environ.pop("ACCELERATE_USE_FSDP")  # distill shards itself; Accelerate runs plain multi-process
        if not cfg.train.fsdp:
            cfg.train.fsdp = True
            validate(cfg)
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower() == "fp16":
        raise ConfigError("The launch asks for fp16 mixed precision (accelerate launch --mixed_precision "
                          "fp16 or its config file), which distill refuses: use --mixed_precision bf16 "
                          "together with train.mixed_precision=bf16, or no mixed precision.")
    mp = cfg.train.mixed_precision
    cuda = torch.cuda.is_available()
    report = cfg.train.report_to
    log_with = None
    if report == "tensorboard":
        try:
            import tensorboard  # noqa: F401

            log_with = "tensorboard"
        except ImportError:
            logger.warning("tensorboard is not installed: logging to the console only (pip install "
                           "tensorboard).")
    acc = Accelerator(
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        mixed_precision=mp,
        cpu=not cuda,  # CPU data parallel: `accelerate launch --multi_gpu` then runs MULTI_CPU over gloo
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir,
                                            logging_dir=str(Path(cfg.output_dir) / "logs")),
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and acc.num_processes == 1:
        raise RuntimeError(
            f"WORLD_SIZE={world} but Accelerate set up a single unsynchronised process: the copies would "
            "train independently. On a CPU machine launch with "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m distill train ...`.")
    return acc

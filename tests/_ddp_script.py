"""Launched by test_framework under `accelerate launch --multi_gpu --num_processes 2`."""

import hashlib
import sys
from pathlib import Path

import torch

from distill.config import load_config
from distill.trainers import trainer_class

out, method = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "teacher")
common = [f"output_dir={out}", "student.hidden=32", "student.num_layers=1", "train.max_steps=15",
          "train.batch_size=32", "train.progress_bar=false", "train.report_to=none",
          "train.checkpointing_steps=100"]
if method == "msd":  # K = 2 students with their fake scores, all in one prepare()
    cfg = load_config("configs/msd_gaussians8.yaml", common + ["msd.num_students=2", "msd.tsm_steps=5"])
else:
    cfg = load_config(None, common + ["method=teacher", "data.spec=toy:gaussians8", "student.arch=mlp"])
trainer = trainer_class(cfg.method)(cfg)
trainer.setup()
acc = trainer.accelerator
trainer.rng = trainer.step_generator(0, 0)
first = trainer._batch()
# MSD needs no clean samples
first = first["x"] if first["x"] is not None else first["label"].float()[:, None]
trainer.train()
params = torch.cat([p.detach().flatten() for n in sorted(trainer.modules)
                    for p in trainer.unwrap(n).parameters()])
digest = hashlib.sha256(params.numpy().tobytes()).hexdigest()
Path(out, f"rank{acc.process_index}.txt").write_text(
    f"{acc.num_processes} {acc.distributed_type} {digest} {first[0, 0].item():.6f}\n")

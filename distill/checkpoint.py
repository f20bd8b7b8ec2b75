"""Pickle-free, atomic training checkpoints.

Accelerate's ``save_state`` stores optimizer and RNG states with pickle. distill writes only
safetensors and JSON, so a checkpoint can be loaded without executing code:

    checkpoint-STEP/
      model_<name>.safetensors        unwrapped network weights
      optim_<name>.safetensors/.json  optimizer tensors / param groups and scalars
      ema_<name>.safetensors/.json    EMA shadow weights / EMAModel scalars
      trainer_state.json              step and the method's own JSON state

A checkpoint is written to ``checkpoint-STEP.partial`` and renamed into place when complete, so a
run killed while writing never leaves a folder that :func:`latest_checkpoint` would pick.
Random streams need no saving: every step draws its data and noise from generators seeded by
(seed, step, micro-step, rank) (see ``DistillationTrainer.step_generator``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def _split_state(state: dict, prefix: str = "") -> tuple[dict, dict]:
    """Nested dict -> ({flat key: tensor}, JSON-able remainder with tensor places marked)."""
    tensors, rest = {}, {}
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            tensors[key] = v.detach().cpu().contiguous()
            rest[str(k)] = {"__tensor__": key}
        elif isinstance(v, dict):
            t, r = _split_state(v, key + ".")
            tensors.update(t)
            rest[str(k)] = {"__dict__": r, "__int_keys__": all(isinstance(x, int) for x in v)}
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, torch.Tensor) for x in v):
            for i, x in enumerate(v):
                tensors[f"{key}.{i}"] = x.detach().cpu().contiguous()
            rest[str(k)] = {"__tensor_list__": key, "n": len(v)}
        else:
            rest[str(k)] = v
    return tensors, rest


def _join_state(tensors: dict, rest: dict) -> dict:
    out = {}
    for k, v in rest.items():
        if isinstance(v, dict) and "__tensor__" in v:
            out[k] = tensors[v["__tensor__"]]
        elif isinstance(v, dict) and "__dict__" in v:
            inner = _join_state(tensors, v["__dict__"])
            out[k] = {int(a): b for a, b in inner.items()} if v["__int_keys__"] else inner
        elif isinstance(v, dict) and "__tensor_list__" in v:
            out[k] = [tensors[f"{v['__tensor_list__']}.{i}"] for i in range(v["n"])]
        else:
            out[k] = v
    return out


def save_state_dict(state: dict, folder: Path, stem: str) -> None:
    tensors, rest = _split_state(state)
    save_file(tensors, str(folder / f"{stem}.safetensors"))
    (folder / f"{stem}.json").write_text(json.dumps(rest))


def load_state_dict(folder: Path, stem: str) -> dict:
    tensors = load_file(str(folder / f"{stem}.safetensors"))
    return _join_state(tensors, json.loads((folder / f"{stem}.json").read_text()))


def save_checkpoint(root: Path, step: int, models: dict, optimizers: dict, emas: dict, trainer_state: dict,
                    total_limit: int | None = None) -> Path:
    """Write checkpoint-STEP atomically under ``root`` and prune to ``total_limit`` newest."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = root / f"checkpoint-{step}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, model in models.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / f"model_{name}.safetensors"))
    for name, opt in optimizers.items():
        save_state_dict(opt.state_dict(), tmp, f"optim_{name}")
    for name, ema in emas.items():
        save_state_dict(ema.state_dict(), tmp, f"ema_{name}")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if total_limit is not None:
        for old in list_checkpoints(root)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: Path, models: dict, optimizers: dict, emas: dict) -> dict:
    folder = Path(folder)
    if not (folder / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a complete distill checkpoint (no "
                                "trainer_state.json).")
    for name, model in models.items():
        model.load_state_dict(load_file(str(folder / f"model_{name}.safetensors")))
    for name, opt in optimizers.items():
        opt.load_state_dict(load_state_dict(folder, f"optim_{name}"))
    for name, ema in emas.items():
        ema.load_state_dict(load_state_dict(folder, f"ema_{name}"))
    return json.loads((folder / "trainer_state.json").read_text())


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first (``.partial`` folders are ignored)."""
    if not Path(root).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(root).iterdir() if p.is_dir() and (m := CKPT_RE.match(p.name))
             and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None

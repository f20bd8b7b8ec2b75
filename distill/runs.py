"""What a run is, so that a folder never mixes two of them.

* :func:`fingerprint` — the config values a checkpoint can only be resumed with: method, teacher, data,
  student, optimizer, seed, batch layout, precision and the method's own section. Not in it: the run's
  length (``train.max_steps``), checkpointing, logging and evaluation, which a resumed run may change.
* ``output_dir/run.json`` — state (``running``, ``finished``, ``failed``, ``interrupted``), the
  fingerprint and its hash, start and end times, the last step. A new run into a folder holding another
  run is refused (``--overwrite`` replaces it); the same config continues it from its latest checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from .config import Config
from .errors import ConfigError

# what a resumed run may never change: its networks and optimizer states would not load (or not mean the same)
STRUCTURAL = ("method", "teacher.", "student.")
# what a run writes into output_dir (and --overwrite removes)
RUN_ENTRIES = ("run.json", "config.yaml", "checkpoints", "pipeline", "rounds", "samples", "report", "logs",
               "train_history.json")


def fingerprint(cfg: Config) -> dict:
    """Flat {dotted key: value} of everything a checkpoint must agree with."""
    d = cfg.to_dict()
    train = {k: d["train"][k]
             for k in ("seed", "batch_size", "gradient_accumulation_steps", "mixed_precision")}
    parts = {"method": cfg.method, "teacher": d["teacher"], "data": d["data"], "student": d["student"],
             "optim": d["optim"], "train": train}
    if cfg.method in d:
        parts[cfg.method] = d[cfg.method]
    flat: dict = {}
    for key, value in parts.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def fingerprint_hash(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every key whose value differs (keys only one side has included)."""
    keys = sorted(set(old) | set(new), key=lambda k: (k != "method", k))
    missing = "<absent>"
    return [f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}" for k in keys
            if old.get(k, missing) != new.get(k, missing)]


def check_resumable(saved: dict | None, cfg: Config, where: str, written_with: Path | None = None) -> None:
    """Refuse a checkpoint (or run) of another run, naming the differing keys, before any weight loads.

    ``train.resume_allow_config_change=true`` lets non-structural keys differ (a new learning rate, a
    new batch size); method, teacher and student never may.
    """
    new = fingerprint(cfg)
    if saved is None:
        if cfg.train.resume_allow_config_change:
            return
        raise ConfigError(f"{where} records no run fingerprint (written by an older distill): it cannot be "
                          "checked to belong to this config. Set train.resume_allow_config_change=true to "
                          "resume it anyway.")
    diff = differences(saved, new)
    if not diff:
        return
    structural = [d for d in diff if d.startswith(STRUCTURAL)]
    if cfg.train.resume_allow_config_change and not structural:
        return
    shown = "; ".join((structural or diff)[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
    own = f" ({written_with})" if written_with is not None and Path(written_with).is_file() else ""
    fix = (f"Its networks cannot take these values: resume it with the config it was written with{own} or "
           "choose another output_dir (or --overwrite)."
           if structural else
           "Resume it with its own values, choose another output_dir (or --overwrite), or set "
           "train.resume_allow_config_change=true to continue it with the new ones.")
    raise ConfigError(f"{where} belongs to another run (saved -> this config): {shown}. {fix}")


def read_run(out: Path) -> dict | None:
    path = Path(out) / "run.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {"state": "unknown"}


def write_run(out: Path, cfg: Config, state: str, step: int, fp: dict, **extra) -> dict:
    """Write (atomically) ``output_dir/run.json``; ``fp``: the run's fingerprint (taken before training)."""
    old = read_run(out) or {}
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    record = {"state": state, "method": cfg.method, "config_hash": fingerprint_hash(fp), "step": step,
              "max_steps": cfg.train.max_steps, "started": old.get("started", now),
              "updated": now, **({"ended": now} if state != "running" else {}), **extra, "fingerprint": fp}
    Path(out).mkdir(parents=True, exist_ok=True)
    tmp = Path(out) / "run.json.partial"
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(Path(out) / "run.json")
    return record


def prepare_output_dir(cfg: Config, overwrite: bool) -> str:
    """Decide what a run does with ``output_dir`` before it starts: 'new', 'overwrite' or 'continue'.

    * empty or absent folder: a new run;
    * ``overwrite``: distill's entries of the old run are removed (other files are kept), a new run;
    * a run with the same fingerprint: it is continued from its latest checkpoint ('continue');
    * checkpoints without a run.json: continued (their fingerprint is checked when the trainer reads them);
    * another run: refused, naming the fix.

    Side effects (removal) belong to the caller's main process: this only reads unless ``overwrite``.
    """
    out = Path(cfg.output_dir)
    run = read_run(out)
    has_ckpts = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    if run is None and not has_ckpts:
        return "new"
    if overwrite:
        return "overwrite"
    if run is not None and run.get("fingerprint") == fingerprint(cfg):
        return "continue"
    if run is None:  # checkpoints without a run.json (copied, or a run killed before it wrote one): the
        return "continue"  # trainer checks the checkpoint's own fingerprint before it loads (resume_plan)
    if cfg.train.resume_from_checkpoint:  # the checkpoint's own fingerprint decides (check_resumable)
        return "continue"
    diff = differences(run.get("fingerprint") or {}, fingerprint(cfg))
    raise ConfigError(f"output_dir={str(out)!r} holds another {run.get('state', 'unknown')} run "
                      f"({run.get('method')}, started {run.get('started')}, step {run.get('step')}); this "
                      f"config differs in {'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}. Pass "
                      "--overwrite to replace it, or choose another output_dir.")


def clear_output_dir(out: Path) -> None:
    """Remove what an earlier run wrote (only distill's own entries)."""
    for name in RUN_ENTRIES:
        p = Path(out) / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

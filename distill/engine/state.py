"""The state of a run on disk: the output folder it claims, pickle-free checkpoints with fingerprinted resume,
and ``run.json`` (see :mod:`distill.runs`, :mod:`distill.checkpoint`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..errors import ConfigError
from ..runs import (
    check_resumable,
    clear_output_dir,
    prepare_output_dir,
    write_run,
)
from ..sharding import Gathered, ShardedLoad, gather, load_ema, load_model, load_optimizer


class RunState:
    """The checkpoint part of :class:`~distill.engine.loop.DistillationTrainer`."""

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        models = {n: self.unwrap(n) for n in self.modules}
        opts = {n: getattr(o, "optimizer", o) for n, o in self.optimizers.items()}
        emas = self.emas
        if self.sharded:  # every process gathers; the main process keeps the full tensors and writes them
            keep = acc.is_main_process
            models = {n: Gathered(gather(m.state_dict(), keep)) for n, m in models.items()}
            opts = {n: Gathered(gather(o.state_dict(), keep)) for n, o in opts.items()}
            emas = {n: Gathered(gather(e.state_dict(), keep)) for n, e in emas.items()}
        if acc.is_main_process:
            path = save_checkpoint(self.checkpoint_dir, self.step, models, opts, emas,
                                   {"method": self.method, "fingerprint": self.fingerprint,
                                    "history": self.history, "state": self.state()},
                                   self.config.train.checkpoints_total_limit)
            write_run(self.out, self.config, "running", self.step, self.fingerprint, checkpoint=str(path),
                      max_steps=self.max_steps)
        acc.wait_for_everyone()
        return path

    def resume_plan(self) -> None:
        """Which checkpoint this run resumes from, checked against the config before anything loads."""
        cfg = self.config
        which = cfg.train.resume_from_checkpoint or ("latest" if self._continue else None)
        if not which:
            return
        path = latest_checkpoint(self.checkpoint_dir) if which == "latest" else Path(which)
        if path is None:
            if cfg.train.resume_from_checkpoint:
                self.accelerator.print(f"No checkpoint in {self.checkpoint_dir}: starting a new run.")
            return
        if not path.is_dir():
            found = [p.name for p in self.checkpoint_dir.glob("checkpoint-*")]
            raise ConfigError(f"train.resume_from_checkpoint={which!r} is not a checkpoint folder; use "
                              f"'latest' or one of {found} (under {self.checkpoint_dir}).")
        state_file = path / "trainer_state.json"
        if not state_file.is_file():
            raise ConfigError(f"{str(path)!r} is not a complete distill checkpoint (no trainer_state.json).")
        saved = json.loads(state_file.read_text())
        check_resumable(saved.get("fingerprint"), cfg, f"Checkpoint {str(path)!r}",
                        written_with=path.parent.parent / "config.yaml")
        self._resume_path = path

    def resume(self) -> None:
        path = self._resume_path
        if path is None:
            return
        models = {n: self.unwrap(n) for n in self.modules}
        opts = {n: getattr(o, "optimizer", o) for n, o in self.optimizers.items()}
        emas = self.emas
        if self.sharded:  # each process reads the full tensors and keeps its shard
            models = {n: ShardedLoad(m, load_model) for n, m in models.items()}
            opts = {n: ShardedLoad(o, load_optimizer) for n, o in opts.items()}
            emas = {n: ShardedLoad(e, load_ema) for n, e in emas.items()}
        state = load_checkpoint(path, models, opts, emas)
        for opt in self.optimizers.values():  # the saved param groups carry the saving run's fused / foreach
            for group in getattr(opt, "optimizer", opt).param_groups:
                group.update(self.optimizer_kind())
        # loaded shadow weights are CPU tensors; EMAModel.step needs them on the device
        for ema in self.emas.values():
            ema.to(self.device)
            ema.decay = self.config.train.ema_decay  # EMAModel.load_state_dict restores the saved decay
        self.step = int(state["step"])
        self.history = list(state.get("history", state.get("history_tail", [])))
        self.load_state(state.get("state", {}))
        self.accelerator.print(f"Resumed from {path} at step {self.step}.")

    def _claim_output_dir(self) -> None:
        """Refuse a folder holding another run, continue this same run, or clear it (``overwrite``)."""
        acc = self.accelerator
        action = prepare_output_dir(self.config, self.overwrite)
        acc.wait_for_everyone()
        if action == "overwrite" and acc.is_main_process:
            clear_output_dir(self.out)
            acc.print(f"--overwrite: removed the earlier run in {self.out}.")
        self._continue = action == "continue"
        acc.wait_for_everyone()

    def _record(self, state: str, **extra) -> None:
        if self.accelerator.is_main_process:
            write_run(self.out, self.config, state, self.step, self.fingerprint, max_steps=self.max_steps,
                      **extra)

    def finished_run(self) -> Path | None:
        """A resumed checkpoint already at train.max_steps is a finished run: reported, nothing trained or
        exported. The one exception completes its own run: this folder's checkpoint with no export yet (a run
        stopped between its last checkpoint and the export)."""
        path, max_steps = self._resume_path, self.max_steps
        if path is None or self.step < max_steps:
            return None
        run_dir = path.parent.parent
        same = run_dir.resolve() == self.out.resolve()
        if same and not (self.out / "pipeline" / "model_index.json").is_file():
            return None
        self.already_finished = True
        self.accelerator.print(f"The run in {run_dir} finished at step {self.step} "
                               f"(train.max_steps={max_steps}); its pipeline is {run_dir / 'pipeline'}. "
                               "Nothing to do: raise train.max_steps to train "
                               "on" + (", or pass --overwrite to start afresh." if same else "."))
        return run_dir / "pipeline"

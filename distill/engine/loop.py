"""DistillationTrainer: the one Accelerate training loop.

A method subclasses it and supplies

    build(self)                  networks and optimizers, registered with ``self.add(...)``
    objective(self, batch, step) a generator: it yields an :class:`Update` (a loss and the networks it
                                 trains) for each optimizer step of the update, in order, receives their
                                 gradient norms, and returns a dict of logs (tensors stay on the device)
    export(self)                 the student as a diffusers pipeline object

The loop owns everything else: backward, clipping, the non-finite guard and the optimizer steps of each
yielded update, the ``Accelerator`` (data parallel, gradient accumulation, mixed precision),
``prepare``, the EMA, checkpoints and exact resume (:mod:`.state`), batches (:mod:`.batches`), the networks'
optimizer steps (:mod:`.networks`), trackers, the progress bar, sample grids and the export with a model card.
An update never waits for the device: its logs and non-finite state are read once per check
(``docs/gpu_loop.md``).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Generator
from pathlib import Path

import diffusers
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..checkpoint import latest_checkpoint
from ..config import Config
from ..data import StreamedImages, load_data
from ..ema import ForeachEMA
from ..errors import Interrupted, TrainingDiverged
from ..export import export_pipeline
from ..lora import AdapterView
from ..runs import fingerprint, write_run
from ..teachers import Teacher
from .batches import BatchMaker, load_teacher
from .launch import make_accelerator, stop_on_signals
from .networks import NetworkRegistry, Update
from .state import RunState


class DistillationTrainer(NetworkRegistry, BatchMaker, RunState):
    """The shared loop. Subclasses implement ``build``, ``objective`` and ``export``."""

    method = "base"

    def __init__(self, config: Config, accelerator: Accelerator | None = None, overwrite: bool = False):
        self.config = config
        self.out = Path(config.output_dir)
        self.accelerator = accelerator or make_accelerator(config)
        self.device = self.accelerator.device
        self.modules: dict[str, torch.nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.emas: dict[str, ForeachEMA] = {}
        self._base_lr: dict[str, float] = {}
        self._add_args: dict[str, tuple] = {}
        self.sharded = False  # train.fsdp: the trained networks are FSDP2-sharded (distill.sharding)
        self.rng: torch.Generator | None = None  # this micro-step's generator on the training device
        # the same seed on the CPU (host-side draws on a GPU run)
        self._host_rng: torch.Generator | None = None
        self.step = 0
        self.max_steps = config.train.max_steps  # the run's length (progressive: set by its rounds)
        self.history: list[dict] = []
        self._counts: dict = {}
        self.teacher: Teacher | None = None
        self.data = None
        self._built = False
        self.overwrite = overwrite
        # the run as configured, before build() fills in derived values (student.conditional, progressive's
        # max_steps): what checkpoints and run.json record, and what output_dir/config.yaml holds
        self.fingerprint = fingerprint(config)
        self._config_yaml = config.to_yaml()
        self.already_finished = False  # train() found the run finished: nothing trained, nothing exported
        self._continue = False  # output_dir holds this same run: continue it from its latest checkpoint
        self._resume_path: Path | None = None
        # non-finite bookkeeping, on the device between synchronisations: why the current step is non-finite
        # (reason -> bool tensor), the reasons seen since the last check, the current and longest run of
        # non-finite steps
        self._flags: dict[str, torch.Tensor] = {}
        self._reasons: dict[str, torch.Tensor] = {}
        self._bad_run: torch.Tensor | None = None
        self._worst_run: torch.Tensor | None = None
        self._stop_signal: int | None = None
        self._data_x = self._data_labels = None  # in-memory data on the training device (see setup)
        self._stream: StreamedImages | None = None  # images too many to cache, decoded ahead by workers
        self._micro = 0
        # train.compile: the first update's time, compilation included
        self.compile_seconds: float | None = None

    def build(self) -> None:
        raise NotImplementedError

    def objective(self, batch: dict, step: int) -> Generator[Update, dict, dict]:
        raise NotImplementedError

    def export(self, for_samples: bool = False) -> diffusers.DiffusionPipeline:
        """The student as a pipeline. ``for_samples``: for a sample grid only (a text pipeline may then
        reuse the teacher's in-memory parts instead of re-reading them from its folder)."""
        raise NotImplementedError

    def state(self) -> dict:
        """JSON-able method state saved in checkpoints (curricula, counters)."""
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def card_info(self) -> dict:
        return {"method": self.method, "teacher": self.config.teacher.path}

    def sample_kwargs(self) -> dict:
        """Extra arguments for the exported pipeline when drawing sample grids."""
        return {}

    def setup(self) -> None:
        if self._built:
            return
        cfg = self.config
        torch.manual_seed(cfg.train.seed)
        resolution, channels = cfg.data.resolution, cfg.data.channels
        if self.uses_teacher:
            self.teacher = load_teacher(cfg, self.device)
            resolution, channels = self.teacher_image_size(resolution, channels)
        self.data = load_data(cfg.data.spec, resolution=resolution, num_samples=cfg.data.num_samples,
                              seed=cfg.train.seed, channels=channels or 3,
                              caption_column=cfg.data.caption_column)
        self.check_data()
        self.build()
        self.choose_attention()
        self.place_data()
        if cfg.train.compile:
            self.compile_networks()
        if cfg.train.fsdp:
            self.shard()
        else:
            names = list(self.modules)
            prepared = self.accelerator.prepare(*[self.modules[n] for n in names],
                                                *[self.optimizers[n] for n in self.optimizers])
            if not isinstance(prepared, (list, tuple)):
                prepared = [prepared]
            for i, n in enumerate(names):
                self.modules[n] = prepared[i]
            for j, n in enumerate(list(self.optimizers)):
                self.optimizers[n] = prepared[len(names) + j]
        for ema in self.emas.values():
            ema.to(self.device)
        self._built = True

    def _set_lr(self, step: int) -> None:
        """Linear warm-up over ``optim.lr_warmup_steps``, then ``lr_gamma`` per milestone passed (torch's
        MultiStepLR)."""
        o = self.config.optim
        scale = min(1.0, (step + 1) / o.lr_warmup_steps) if o.lr_warmup_steps > 0 else 1.0
        scale *= o.lr_gamma ** sum(step >= m for m in o.lr_milestones)
        for name, opt in self.optimizers.items():
            for g in opt.param_groups:
                g["lr"] = self._base_lr[name] * scale * g.get("lr_mult", 1.0)

    def train(self) -> Path | None:
        """Run to ``train.max_steps``; returns the exported pipeline folder (main process).

        SIGINT (Ctrl-C) and SIGTERM end the current step, write a checkpoint and raise
        :class:`Interrupted`; ``train.max_nonfinite_steps`` non-finite steps in a row raise
        :class:`TrainingDiverged`. ``output_dir/run.json`` records the state either way.
        """
        cfg, acc = self.config, self.accelerator
        self._claim_output_dir()
        self.resume_plan()
        started = time.time()
        self.setup()
        self.resume()
        finished = self.finished_run()
        if finished is not None:
            return finished
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(self._config_yaml)
            write_run(self.out, cfg, "running", self.step, self.fingerprint, max_steps=self.max_steps)
            acc.init_trackers(f"distill-{self.method}", config=_flat(cfg.to_dict()))
        try:
            with stop_on_signals(self):
                self._loop()
        except Interrupted:
            self._record("interrupted")
            raise
        except BaseException as err:
            self._record("failed", error=f"{type(err).__name__}: {err}")
            raise
        path = self.finish(time.time() - started)
        self._record("finished")
        return path

    def train_iteration(self) -> dict:
        """One update as ``train()`` runs it: for each micro-step its seeded generators, a batch and the
        method's ``objective`` with each of its updates applied (backward, clipping, the optimizer step), then
        the EMA. Increments ``step`` and
        returns the method's logs of the last micro-step as tensors. Nothing here synchronises with the
        device: the non-finite state is kept on it and read at the checks of ``train()`` (every
        ``min(log_every, max_nonfinite_steps)`` updates, and at checkpoints)."""
        cfg, acc = self.config, self.accelerator
        step = self.step
        self._set_lr(step)
        self._flags = {}
        logs: dict = {}
        for micro in range(cfg.train.gradient_accumulation_steps):
            self.rng, self._micro = self.step_generator(step, micro), micro
            batch = self._batch()
            with acc.accumulate(*self.modules.values()):
                logs = self.run_objective(self.objective(batch, step))
        for name, ema in self.emas.items():
            ema.step(self.unwrap(name).parameters())
        self.step += 1
        logs = {k: v for k, v in logs.items() if v is not None}
        for k, v in logs.items():
            if isinstance(v, torch.Tensor):
                self.flag(f"loss {k}", ~torch.isfinite(v.detach()).all())
        if self._bad_run is None:
            self._bad_run = torch.zeros((), dtype=torch.long, device=self.device)
            self._worst_run = torch.zeros((), dtype=torch.long, device=self.device)
        if self._flags:
            bad = torch.stack([f.reshape(()) for f in self._flags.values()]).any()
            self._bad_run = torch.where(bad, self._bad_run + 1, 0)
            self._worst_run = torch.maximum(self._worst_run, self._bad_run)
            for k, f in self._flags.items():
                old = self._reasons.get(k)
                self._reasons[k] = f if old is None else old | f
        else:
            self._bad_run = torch.zeros_like(self._bad_run)
        return logs

    def run_objective(self, objective: Generator[Update, dict, dict]) -> dict:
        """Drive a method's objective: each yielded :class:`Update` is one backward pass and one optimizer
        step per network it names; its gradient norms are sent back. Returns the objective's logs."""
        try:
            update = next(objective)
            while True:
                self.accelerator.backward(update.loss)
                update = objective.send({name: self.apply_gradients(name) for name in update.networks})
        except StopIteration as done:
            return done.value

    def _loop(self) -> None:
        cfg, acc = self.config, self.accelerator
        tc = cfg.train
        bar = tqdm(total=self.max_steps, initial=self.step, desc=f"{self.method}", dynamic_ncols=True,
                   disable=not (acc.is_main_process and tc.progress_bar))
        last_good = latest_checkpoint(self.checkpoint_dir)
        check_every = min(tc.log_every, tc.max_nonfinite_steps)
        while self.step < self.max_steps:
            started = time.perf_counter()
            logs = self.train_iteration()
            if tc.compile and self.compile_seconds is None:
                self.compile_seconds = round(time.perf_counter() - started, 2)
                acc.print(f"train.compile: the first update took {self.compile_seconds} s (compilation "
                          "included)")
            bar.update(1)
            s = self.step
            log_now = s % tc.log_every == 0 or s == self.max_steps
            ckpt_now = s % tc.checkpointing_steps == 0 or s == self.max_steps
            samples_now = bool(tc.sample_every) and s % tc.sample_every == 0
            signalled = acc.num_processes == 1 and self._stop_signal is not None
            if not (log_now or ckpt_now or samples_now or signalled or s % check_every == 0):
                continue
            state = self._synchronize(logs if log_now else None)  # the one host synchronisation
            if state["worst_run"] >= tc.max_nonfinite_steps:
                bar.close()
                raise TrainingDiverged(
                    f"Training stopped at step {s}: {state['worst_run']} steps in a row had non-finite "
                    f"values ({', '.join(state['reasons'])}); their updates were skipped. The last good "
                    f"checkpoint is {last_good or 'none (no checkpoint was written)'}; resume from it with a "
                    "lower optim.lr (or raise train.max_nonfinite_steps). Nothing was exported.")
            if state["logs"] is not None:
                acc.log(state["logs"], step=s)
                self.history.append({"step": s, **state["logs"]})
                bar.set_postfix({k: f"{v:.3g}" for k, v in list(state["logs"].items())[:4]})
            stop = state["stop"]
            if (ckpt_now or stop) and state["bad_run"] == 0:
                last_good = self.save_checkpoint() or last_good
            if stop:
                bar.close()
                name = signal.Signals(stop).name
                written = ("written" if state["bad_run"] == 0
                           else "is the last good one (this step was non-finite)")
                raise Interrupted(stop, f"{name} at step {s}: checkpoint {last_good} {written}. Resume with "
                                        f"the same command (or train.resume_from_checkpoint=latest).")
            if samples_now:
                self.save_samples(f"step-{s:06d}")
        bar.close()

    def _synchronize(self, logs: dict | None) -> dict:
        """Read the device-side state in one host synchronisation: the logs of this step (with the counters
        since the last log), the current and longest run of non-finite steps and their reasons, and the stop
        signal (a max over processes: one rank's signal stops them all at the same step)."""
        values: dict[str, object] = {"bad_run": self._bad_run, "worst_run": self._worst_run}
        reasons = {f"reason {k}": v for k, v in self._reasons.items()}
        values.update(reasons)
        if logs is not None:
            logs = {**logs, **self._counts}
            values.update({f"log {k}": v for k, v in logs.items()})
        if self.accelerator.num_processes > 1:
            flag = torch.tensor(self._stop_signal or 0, device=self.device)
            values["stop"] = self.accelerator.reduce(flag, reduction="max")
        tensors = [(k, v) for k, v in values.items() if isinstance(v, torch.Tensor)]
        read = dict(zip([k for k, _ in tensors],
                        torch.stack([v.detach().double().reshape(()) for _, v in tensors])
                        .tolist())) if tensors else {}
        out = {k: read.get(k, v) for k, v in values.items()}
        if logs is not None:
            self._counts.clear()
        state = {"bad_run": int(out["bad_run"] or 0), "worst_run": int(out["worst_run"] or 0),
                 "reasons": sorted(k.removeprefix("reason ") for k in reasons if out[k]),
                 "logs": None if logs is None else {k: float(out[f"log {k}"]) for k in logs},
                 "stop": int(out["stop"]) or None if "stop" in out else self._stop_signal}
        self._reasons = {}
        self._worst_run = torch.zeros_like(self._bad_run) if self._bad_run is not None else None
        return state

    def finish(self, seconds: float) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        if self.sharded:
            self.unshard()
        if acc.is_main_process:
            bad = [n for n in self.modules
                   if not all(torch.isfinite(p).all() for p in self.unwrap(n).parameters())]
            bad += [n for n, e in self.emas.items()
                    if not all(torch.isfinite(p).all() for p in e.shadow_params)]
            if bad:
                raise TrainingDiverged(f"Network(s) {sorted(set(bad))} hold non-finite weights at step "
                                       f"{self.step}: the student is not exported. Resume from an earlier "
                                       "checkpoint with a lower optim.lr.")
            self.save_samples("final")
            info = {**self.card_info(), "steps": self.step, "train_seconds": round(seconds, 1),
                    "config": self.config.to_dict()}
            with self.ema_weights():
                path = export_pipeline(self.export(), self.out / "pipeline",
                                       {"title": f"distill {self.method} student", **info})
                if "student" in self.modules and isinstance(self.unwrap("student"), AdapterView):
                    acc.print(f"LoRA adapter written to {self.export_lora()}")
            (self.out / "train_history.json").write_text(json.dumps(self.history, indent=1))
            acc.print(f"Pipeline written to {path}")
        acc.end_training()
        return path

    @torch.no_grad()
    def save_samples(self, tag: str, n: int = 64) -> Path | None:
        if not self.accelerator.is_main_process:
            return None
        gen = torch.Generator().manual_seed(self.config.train.seed)
        with self.ema_weights():
            pipe = self.export(for_samples=True)
            pipe.set_progress_bar_config(disable=True)
            if self.teacher is not None and self.teacher.is_text:  # the first prompts of the data
                prompts = [self.data[i]["prompt"] for i in range(min(16, len(self.data)))]
                x = pipe(prompt=prompts, generator=gen, output_type="pt", **self.sample_kwargs()).images
            else:
                x = pipe(batch_size=n, generator=gen, output_type="pt", **self.sample_kwargs()).images
        from ..eval.report import save_grid

        path = self.out / "samples" / f"{tag}.png"
        save_grid(x, path)
        return path


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out

"""A run is safe to interrupt, rerun and resume: run.json, fingerprinted checkpoints, --overwrite, SIGINT /
SIGTERM on a real `distill train` process, and the stop on non-finite training."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill.cli import main
from distill.config import ConfigError, load_config
from distill.errors import TrainingDiverged
from distill.runs import fingerprint
from distill.trainers import trainer_class

ROOT = Path(__file__).resolve().parent.parent
TOY = "configs/sim_gaussians8.yaml"
FAST = ["train.progress_bar=false", "train.report_to=none", "sim.init_denoiser_steps=2",
        "train.batch_size=32"]


def _run(tmp_path, *extra, name="run"):
    return main(["train", TOY, *FAST, f"output_dir={tmp_path / name}", *extra])


def test_run_json_records_a_finished_run_and_a_rerun_does_nothing(tmp_path, capsys):
    assert _run(tmp_path, "train.max_steps=3", "train.checkpointing_steps=2") == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["state"] == "finished" and run["step"] == 3 and run["method"] == "sim" and run["ended"]
    assert run["fingerprint"] == fingerprint(load_config(TOY, FAST + [f"output_dir={tmp_path / 'run'}"]))
    weights = next((tmp_path / "run" / "pipeline").rglob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    capsys.readouterr()
    # the same command again: reported as finished, nothing retrained or re-exported
    assert _run(tmp_path, "train.max_steps=3", "train.checkpointing_steps=2") == 0
    assert "finished at step 3" in capsys.readouterr().out and weights.stat().st_mtime_ns == stamp
    # more steps: the run continues from its checkpoint at step 3 (max_steps is not part of the fingerprint)
    assert _run(tmp_path, "train.max_steps=5", "train.checkpointing_steps=2") == 0
    assert "Resumed from" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "run.json").read_text())["step"] == 5
    history = json.loads((tmp_path / "run" / "train_history.json").read_text())
    assert [h["step"] for h in history if h["step"] <= 5][-1] == 5


def test_overwrite_replaces_another_run(tmp_path, capsys):
    assert _run(tmp_path, "train.max_steps=2") == 0
    capsys.readouterr()
    assert _run(tmp_path, "train.max_steps=2", "optim.lr=0.001") == 2
    assert "holds another finished run" in capsys.readouterr().err
    started = json.loads((tmp_path / "run" / "run.json").read_text())["started"]
    (tmp_path / "run" / "notes.txt").write_text("mine")  # not distill's: kept
    time.sleep(1.1)
    assert main(["train", TOY, *FAST, f"output_dir={tmp_path / 'run'}", "train.max_steps=2", "optim.lr=0.001",
                 "--overwrite"]) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (run["state"] == "finished" and run["started"] != started
            and run["fingerprint"]["optim.lr"] == 0.001)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_resume_with_deliberate_changes_needs_the_flag(tmp_path):
    assert _run(tmp_path, "train.max_steps=2", "train.checkpointing_steps=1") == 0
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    cfg = load_config(TOY, FAST + [f"output_dir={tmp_path / 'b'}", "train.max_steps=3", "optim.lr=0.001",
                                   f"train.resume_from_checkpoint={ckpt}"])
    with pytest.raises(ConfigError,
                       match=r"optim.lr: 0.0003 -> 0.001.*train.resume_allow_config_change=true"):
        trainer_class("sim")(cfg).train()
    assert not (tmp_path / "b" / "run.json").exists()  # refused before anything was written
    cfg.train.resume_allow_config_change = True
    trainer = trainer_class("sim")(cfg)
    trainer.train()
    assert trainer.step == 3
    cfg = load_config(TOY, FAST + [f"output_dir={tmp_path / 'c'}", "train.max_steps=3", "student.hidden=64",
                                   f"train.resume_from_checkpoint={ckpt}",
                                   "train.resume_allow_config_change=true"])
    with pytest.raises(ConfigError,
                       match=r"student.hidden: 128 -> 64.*cannot take these values: resume it with the "
                             r"config it was written with \(.*run/config.yaml\)"):
        trainer_class("sim")(cfg).train()


def test_a_resumed_run_averages_with_its_own_ema_decay(tmp_path):
    """EMAModel.load_state_dict restores the saved decay; a resume that changes train.ema_decay must use the
    new one. diffusers' EMA decay at update k is min(decay, (1 + k) / (10 + k)): at the 13th update
    13/22 = 0.59, so the saved 0.9 and the new 0.5 give different shadows
    (shadow = d * saved shadow + (1 - d) * weights)."""
    from distill.checkpoint import load_state_dict

    assert _run(tmp_path, "train.max_steps=12", "train.checkpointing_steps=12", "train.ema_decay=0.9") == 0
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-12"
    saved = load_state_dict(ckpt, "ema_student")
    assert saved["decay"] == 0.9 and saved["optimization_step"] == 12
    cfg = load_config(TOY,
                      FAST + [f"output_dir={tmp_path / 'b'}", "train.max_steps=13", "train.ema_decay=0.5",
                              f"train.resume_from_checkpoint={ckpt}",
                              "train.resume_allow_config_change=true"])
    trainer = trainer_class("sim")(cfg)
    trainer.train()
    ema = trainer.emas["student"]
    assert ema.decay == 0.5 and ema.optimization_step == 13
    weights = list(trainer.unwrap("student").parameters())
    assert len(weights) == len(ema.shadow_params) == len(saved["shadow_params"])
    for shadow, old, w in zip(ema.shadow_params, saved["shadow_params"], weights):
        torch.testing.assert_close(shadow, 0.5 * old + 0.5 * w.detach())


def _nan_after(trainer, step):
    first = next(trainer.unwrap("student").parameters())
    first.register_hook(lambda g: g * float("nan") if trainer.step >= step else g)


def test_nonfinite_steps_are_skipped_then_the_run_stops_without_export(tmp_path):
    cfg = load_config(TOY,
                      FAST + [f"output_dir={tmp_path}", "train.max_steps=50", "train.checkpointing_steps=2",
                              "train.max_nonfinite_steps=3", "train.log_every=1"])
    trainer = trainer_class("sim")(cfg)
    trainer.setup()
    _nan_after(trainer, 4)
    before = {k: v.clone() for k, v in trainer.unwrap("student").state_dict().items()}
    with pytest.raises(TrainingDiverged) as err:
        trainer.train()
    msg = str(err.value)
    assert "stopped at step 7: 3 steps in a row" in msg and "network 'student'" in msg, msg
    assert str(tmp_path / "checkpoints" / "checkpoint-4") in msg and "Nothing was exported" in msg
    assert not (tmp_path / "pipeline").exists() and not (tmp_path / "checkpoints" / "checkpoint-6").exists()
    assert json.loads((tmp_path / "run.json").read_text())["state"] == "failed"
    logs = {h["step"]: h for h in trainer.history}
    assert logs[5]["skipped_updates/student"] == 1 and logs[4]["skipped_updates/student"] == 0
    after = trainer.unwrap("student").state_dict()  # the skipped updates left the weights finite
    assert all(torch.isfinite(v).all() for v in after.values()) and any(
        not torch.equal(before[k], after[k]) for k in before)


def test_a_nan_weighted_student_is_never_exported(tmp_path):
    cfg = load_config(TOY, FAST + [f"output_dir={tmp_path}", "train.max_steps=1"])
    trainer = trainer_class("sim")(cfg)
    trainer.setup()
    with torch.no_grad():
        next(trainer.unwrap("student").parameters()).fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match=r"\['student'\] hold non-finite weights"):
        trainer.finish(0.0)
    assert not (tmp_path / "pipeline").exists()


def test_diverged_run_exits_1_with_one_line(tmp_path, capsys, monkeypatch):
    import distill.trainers.sim as sim

    real = sim.ScoreImplicitMatchingTrainer.objective

    def nan_step(self, batch, step):
        _nan_after(self, 0) if step == 0 else None
        return (yield from real(self, batch, step))

    monkeypatch.setattr(sim.ScoreImplicitMatchingTrainer, "objective", nan_step)
    assert _run(tmp_path, "train.max_steps=10", "train.max_nonfinite_steps=2") == 1
    err = capsys.readouterr().err
    assert "distill: error: Training stopped at step 2" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_checkpoints_and_exits_then_the_same_command_resumes(tmp_path, sig, code):
    """A real `distill train` process: the signal ends the current step, a checkpoint is written, the exit
    code is 128 + N with one line saying how to resume; the same command then continues from that
    checkpoint."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "distill", "train", TOY, *FAST, f"output_dir={out}",
           "train.max_steps=100000", "train.checkpointing_steps=100000", "train.log_every=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "run.json").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(2.0)  # some steps
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == code, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert (last.startswith(f"distill: stopped by {sig.name} at step ")
            and "Resume with the same command" in last)
    assert "Traceback" not in stderr
    run = json.loads((out / "run.json").read_text())
    step = run["step"]
    assert (run["state"] == "interrupted" and step >= 1
            and (out / "checkpoints" / f"checkpoint-{step}").is_dir())
    # the same command with a reachable max_steps continues from the checkpoint
    res = subprocess.run(cmd[:-3] + [f"train.max_steps={step + 2}", "train.checkpointing_steps=100000",
                                     "train.log_every=1"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (f"at step {step}." in res.stdout
            and json.loads((out / "run.json").read_text())["state"] == "finished")


def test_a_finished_checkpoint_is_reported_never_re_exported_as_a_new_run(tmp_path, capsys):
    assert _run(tmp_path, "train.max_steps=2", "train.checkpointing_steps=1") == 0
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    capsys.readouterr()
    assert _run(tmp_path, "train.max_steps=2", f"train.resume_from_checkpoint={ckpt}", name="new") == 0
    assert f"The run in {tmp_path / 'run'} finished at step 2" in capsys.readouterr().out
    assert not (tmp_path / "new" / "pipeline").exists()
    # this folder's own last checkpoint without an export (stopped before it): the export is completed
    import shutil

    shutil.rmtree(tmp_path / "run" / "pipeline")
    assert _run(tmp_path, "train.max_steps=2") == 0
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()


def test_the_saved_config_yaml_resumes_its_own_run(tmp_path, capsys):
    """output_dir/config.yaml is the config as given (not the values build() derives, such as
    student.conditional for a class-conditional teacher), so it continues its run."""
    out = tmp_path / "run"
    assert main(["train", "configs/sim_gaussians8.yaml", *FAST, "teacher.conditional=true",
                 "train.max_steps=2", f"output_dir={out}"]) == 0
    capsys.readouterr()
    assert main(["train", str(out / "config.yaml"), "train.max_steps=3"]) == 0
    assert "Resumed from" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["step"] == 3

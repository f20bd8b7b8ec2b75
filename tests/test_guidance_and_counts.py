"""teacher.guidance_scale reaches every teacher evaluation; dropped samples and repaired gradients are
counted in the logs instead of vanishing silently."""

import pytest
import torch

from distill.config import ConfigError, load_config
from distill.denoiser import Denoiser
from distill.teachers import Teacher
from distill.trainers import trainer_class

FAST = ["train.progress_bar=false", "train.report_to=none", "train.checkpointing_steps=1000"]
COND = ["teacher.conditional=true", "teacher.guidance_scale=2.5", "train.batch_size=32"]


def _spy_guidance(monkeypatch):
    """The guidance scale of every evaluation of a teacher's Denoiser (the bound one unless a call passes
    its own)."""
    seen = []
    real = Denoiser.output

    def spy(self, x_t, t, cond=None, guidance_scale=None, **kwargs):
        if isinstance(getattr(self.prepare, "__self__", None), Teacher):
            seen.append(self.guidance_scale if guidance_scale is None else guidance_scale)
        return real(self, x_t, t, cond, guidance_scale, **kwargs)

    monkeypatch.setattr(Denoiser, "output", spy)
    return seen


@pytest.mark.parametrize("config,overrides", [
    # fit_to_teacher, then SIM
    ("configs/sim_gaussians8.yaml", ["sim.init_denoiser_steps=3", "train.max_steps=2"]),
    ("configs/progressive_gaussians8.yaml", ["progressive.start_steps=2", "progressive.steps_per_round=2",
                                             # round 0, student.arch=mlp
                                             "progressive.init_denoiser_steps=3"]),
])
def test_teacher_guidance_scale_is_used_by_every_teacher_evaluation(tmp_path, monkeypatch, config, overrides):
    seen = _spy_guidance(monkeypatch)
    cfg = load_config(config, FAST + COND + [f"output_dir={tmp_path}", *overrides])
    trainer_class(cfg.method)(cfg).train()
    assert len(seen) >= 5 and set(seen) == {2.5}, seen


def test_guidance_scale_on_an_unconditional_teacher_or_a_guided_run_is_refused(tmp_path):
    cfg = load_config("configs/progressive_gaussians8.yaml",
                      FAST + [f"output_dir={tmp_path}", "teacher.guidance_scale=2"])
    with pytest.raises(ConfigError, match="teacher.guidance_scale=2.0 needs a class-conditional teacher"):
        trainer_class(cfg.method)(cfg).train()
    with pytest.raises(ConfigError, match="guided distillation samples its own guidance scales"):
        load_config("configs/guided_gaussians8.yaml", ["teacher.guidance_scale=2"])


@pytest.mark.parametrize("config", ["configs/sim_gaussians8.yaml", "configs/uni_instruct_gaussians8.yaml"])
def test_dropped_samples_and_repaired_gradients_are_counted(tmp_path, config):
    cfg = load_config(config, FAST + [f"output_dir={tmp_path}", "train.max_steps=4", "train.log_every=2",
                                      "train.batch_size=32",
                                      f"{load_config(config).method}.init_denoiser_steps=0"])
    trainer = trainer_class(cfg.method)(cfg)
    trainer.setup()
    real_loss = trainer.loss

    def two_nan_samples(*args, **kw):
        out = real_loss(*args, **kw)
        nan = torch.zeros_like(out, dtype=torch.bool)
        nan[-2:] = True
        return torch.where(nan, float("nan"), out)  # no NaN flows back into the kept samples' gradients

    trainer.loss = two_nan_samples
    if hasattr(trainer, "warmup_loss"):
        trainer.warmup_loss = two_nan_samples
    first = next(trainer.unwrap("student").parameters())
    first.register_hook(lambda g: g.flatten().index_fill(0, torch.tensor([0, 1, 2]), float("nan")).view_as(g))
    trainer.train()
    logs = trainer.history
    assert [h["step"] for h in logs] == [2, 4]
    for h in logs:  # two generator steps per log window, each with one gradient tensor holding NaNs, skipped
        assert h["nonfinite_samples"] == 4 and h["nonfinite_grads/student"] == 2, h
        assert (h["skipped_updates/student"] == 2
                and h["nonfinite_grads/fake"] == h["skipped_updates/fake"] == 0)
    assert all(torch.isfinite(p).all() for p in trainer.unwrap("student").parameters())

"""SIM and Uni-Instruct trainers end to end on the exact Gaussian-mixture teacher."""

import pytest
import torch

from distill import load_pipeline
from distill.config import load_config
from distill.eval.toy import toy_report
from distill.teachers import analytic_teacher
from distill.trainers import trainer_class

FAST = ["train.progress_bar=false", "train.report_to=none", "train.checkpointing_steps=1000"]


def _run(config, tmp_path, *overrides):
    cfg = load_config(config, FAST + [f"output_dir={tmp_path}", *overrides])
    trainer = trainer_class(cfg.method)(cfg)
    path = trainer.train()
    return trainer, path


def _toy_metrics(path):
    pipe = load_pipeline(str(path))
    pipe.set_progress_bar_config(disable=True)
    teacher = analytic_teacher("gaussians8")
    ref, _ = teacher.model.sample_data(8000, generator=torch.Generator().manual_seed(1))
    x = pipe(batch_size=8000, generator=torch.Generator().manual_seed(0), output_type="pt").images
    ddim4 = teacher.sample(8000, num_steps=4, generator=torch.Generator().manual_seed(0))
    return toy_report(x, teacher.model, ref), toy_report(ddim4, teacher.model, ref)


def test_trainer_generator_equals_exported_pipeline(tmp_path):
    trainer, path = _run("configs/sim_gaussians8.yaml", tmp_path, "train.max_steps=3", "sim.init_denoiser_steps=5")
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    with trainer.ema_weights():
        ours = trainer.generate(trainer.unwrap("student"), z, None)
    pipe = load_pipeline(str(path))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=16, latents=z, output_type="pt").images
    torch.testing.assert_close(out, ours, atol=1e-5, rtol=1e-5)
    card = (path / "README.md").read_text()
    assert "pseudo_huber" in card and "generator_timestep" in card


@pytest.mark.parametrize("divergence", ["fkl", "di", "dmd", "rkl"])
def test_uni_instruct_runs_for_each_branch(tmp_path, divergence):
    trainer, path = _run("configs/uni_instruct_gaussians8.yaml", tmp_path, "train.max_steps=6",
                         "uni_instruct.init_denoiser_steps=5", f"uni_instruct.divergence={divergence}",
                         "uni_instruct.ratio_warmup_steps=2", "train.log_every=1")
    last = trainer.history[-1]
    assert all(torch.isfinite(torch.tensor(v)) for v in last.values())
    assert ("disc_loss" in last) == (divergence == "fkl")
    assert (path / "model_index.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("config,overrides", [
    ("configs/sim_gaussians8.yaml", []),
    ("configs/uni_instruct_gaussians8.yaml", ["uni_instruct.divergence=fkl"]),
    ("configs/uni_instruct_gaussians8.yaml", ["uni_instruct.divergence=rkl"]),
    ("configs/uni_instruct_gaussians8.yaml", ["uni_instruct.divergence=jeffreys"]),
])
def test_one_step_student_beats_teacher_4_step_ddim(tmp_path, config, overrides):
    _, path = _run(config, tmp_path, *overrides)
    student, ddim4 = _toy_metrics(path)
    assert student["modes"] == 8, student
    assert student["swd"] <= ddim4["swd"], (student, ddim4)

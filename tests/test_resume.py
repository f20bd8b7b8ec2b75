"""Exact resume for every trainer: a run resumed from an intermediate checkpoint ends with bitwise the
same weights, EMA and optimizer state as the uninterrupted run (CPU), whatever state the method keeps
(discriminator, progressive rounds, guided stage one / stage two)."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from distill.config import load_config
from distill.trainers import trainer_class

FAST = ["train.progress_bar=false", "train.report_to=none", "train.checkpoints_total_limit=null"]
TOY_PD = ["progressive.start_steps=4", "progressive.steps_per_round=4",
          "progressive.final_rounds_multiplier=1", "progressive.init_denoiser_steps=5", "train.batch_size=64"]
TOY_GD = ["guided.start_steps=4", "guided.stage_one_steps=4", "guided.steps_per_round=4",
          "guided.final_rounds_multiplier=1", "guided.init_denoiser_steps=5", "train.batch_size=64"]
CASES = {
    # name: (config, overrides, total steps, step of the checkpoint resumed from)
    "teacher": ("configs/teacher_gaussians8.yaml", ["train.max_steps=6", "train.batch_size=64"], 6, 3),
    "sim": ("configs/sim_gaussians8.yaml",
            ["train.max_steps=6", "sim.init_denoiser_steps=5", "train.batch_size=64"], 6, 3),
    "uni_instruct_fkl_with_discriminator": (
        "configs/uni_instruct_gaussians8.yaml", ["train.max_steps=6", "uni_instruct.init_denoiser_steps=5",
                                                 "uni_instruct.ratio_warmup_steps=2",
                                                 "uni_instruct.gan_weight=0.1", "train.batch_size=64"], 6, 3),
    "progressive_mid_round": ("configs/progressive_gaussians8.yaml", TOY_PD, 8, 2),
    "progressive_at_round_boundary": ("configs/progressive_gaussians8.yaml", TOY_PD, 8, 4),
    "guided_stage_one": ("configs/guided_gaussians8.yaml", TOY_GD, 12, 2),
    "guided_stage_two": ("configs/guided_gaussians8.yaml", TOY_GD, 12, 6),
    "msd_three_students": ("configs/msd_gaussians8.yaml",
                           ["train.max_steps=6", "msd.tsm_steps=5", "msd.num_students=3",
                            "train.batch_size=63"], 6, 3),
}


def _train(config, out, overrides, ckpt_every, resume=False):
    cfg = load_config(config,
                      FAST + [f"output_dir={out}", f"train.checkpointing_steps={ckpt_every}", *overrides]
                      + (["train.resume_from_checkpoint=latest"] if resume else []))
    trainer = trainer_class(cfg.method)(cfg)
    trainer.train()
    return trainer


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_run_is_bitwise_the_uninterrupted_one(tmp_path, case):
    config, overrides, total, at = CASES[case]
    full = _train(config, tmp_path / "full", overrides, at)
    assert full.step == total
    # a killed run: only the checkpoint at `at` survives, in a new output folder
    shutil.copytree(tmp_path / f"full/checkpoints/checkpoint-{at}",
                    tmp_path / f"part/checkpoints/checkpoint-{at}")
    resumed = _train(config, tmp_path / "part", overrides, at, resume=True)
    assert resumed.step == total
    a_dir = tmp_path / f"full/checkpoints/checkpoint-{total}"
    b_dir = tmp_path / f"part/checkpoints/checkpoint-{total}"
    files = sorted(p.name for p in a_dir.glob("*.safetensors"))
    assert (files == sorted(p.name for p in b_dir.glob("*.safetensors"))
            and any(f.startswith("optim_") for f in files))
    for name in files:
        a, b = load_file(a_dir / name), load_file(b_dir / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    if case.startswith(("progressive", "guided")):  # the rounds the resumed run exported are the same too
        written = list((tmp_path / "part/rounds").iterdir())
        assert written
        for folder in written:
            for f in folder.rglob("*.safetensors"):
                other = load_file(tmp_path / "full/rounds" / folder.name / f.relative_to(folder))
                assert all(torch.equal(v, other[k]) for k, v in load_file(f).items()), f


def test_resumed_ema_is_moved_to_the_device_after_loading(tmp_path, monkeypatch):
    """Checkpoint tensors load on the CPU; on a GPU the EMA then mixed CPU and CUDA tensors at its first
    step. A CPU machine has no second device, so the order of the calls is checked: the EMA is moved to
    the training device AFTER the checkpoint is loaded (the CUDA run is in benchmarks/gpu_check.py)."""
    import diffusers.training_utils

    import distill.engine.state as base

    overrides = CASES["sim"][1]
    _train("configs/sim_gaussians8.yaml", tmp_path, overrides, 3)
    calls = []
    real_load, real_to = base.load_checkpoint, diffusers.training_utils.EMAModel.to
    monkeypatch.setattr(base, "load_checkpoint", lambda *a: calls.append("load") or real_load(*a))
    monkeypatch.setattr(diffusers.training_utils.EMAModel, "to",
                        lambda self, device=None, dtype=None, **kw: calls.append(("to", str(device)))
                        or real_to(self, device=device, dtype=dtype, **kw))
    cfg = load_config("configs/sim_gaussians8.yaml", FAST + [f"output_dir={tmp_path}", *overrides,
                                                             "train.max_steps=8",
                                                             "train.resume_from_checkpoint=latest"])
    trainer = trainer_class("sim")(cfg)
    trainer.train()
    assert trainer.step == 8
    assert "load" in calls and ("to", str(trainer.device)) in calls[calls.index("load"):], calls


def test_progressive_exports_exactly_the_next_rounds_teacher(tmp_path):
    """Export and hand-over use the same (raw, as in the paper) weights."""
    trainer = _train("configs/progressive_gaussians8.yaml", tmp_path, TOY_PD, 100)
    assert not trainer.emas
    handed_over = load_file(tmp_path / "checkpoints/checkpoint-8/model_round_teacher.safetensors")
    exported = load_file(next((tmp_path / "rounds/steps-2").rglob("*.safetensors")))
    assert handed_over.keys() == exported.keys()
    assert all(torch.equal(handed_over[k], exported[k]) for k in exported)

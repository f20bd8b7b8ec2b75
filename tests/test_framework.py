"""The training framework: configs, the loop, checkpoints and exact resume, multi-process, CLI."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.checkpoint import latest_checkpoint, list_checkpoints
from distill.cli import main
from distill.config import ConfigError, load_config
from distill.teachers import Teacher
from distill.trainers import TeacherTrainer

TOY = ["method=teacher", "data.spec=toy:gaussians8", "student.arch=mlp", "student.hidden=64",
       "student.num_layers=2", "train.batch_size=128", "train.progress_bar=false", "train.report_to=none",
       "optim.lr=2e-3"]


def test_bad_config_fails_fast_with_key_named(tmp_path):
    with pytest.raises(ConfigError, match=r"Unknown config key 'train.max_step'.*max_steps"):
        load_config(None, ["train.max_step=5"])
    with pytest.raises(ConfigError, match=r"train.batch_size: expected an integer, got 'big'"):
        load_config(None, ["train.batch_size=big"])
    with pytest.raises(ConfigError,
                       match=r"train.mixed_precision: 'fp32' is not allowed; choose one of 'no', 'bf16'"):
        load_config(None, ["train.mixed_precision=fp32"])
    with pytest.raises(ConfigError, match=r"train.max_steps: 0 is impossible"):
        load_config(None, ["train.max_steps=0"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: sim\nsim: {distance: l3}\n")
    with pytest.raises(ConfigError, match=r"sim.distance: 'l3'.*'pseudo_huber', 'l2'"):
        load_config(bad)
    assert main(["train", str(bad)]) == 2
    cfg = load_config(None,
                      ["optim.betas=[0.0, 0.99]", "eval.teacher_steps=1,2,4",
                       "train.checkpoints_total_limit=null"])
    assert cfg.optim.betas == [0.0, 0.99] and cfg.eval.teacher_steps == [1, 2, 4]
    assert cfg.train.checkpoints_total_limit is None


def test_dry_run_prints_resolved_config(capsys):
    assert main(["train", "configs/teacher_gaussians8.yaml", "train.max_steps=7", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "method: teacher" in out


def test_fp16_is_refused_on_every_device_before_any_work(tmp_path, monkeypatch):
    """fp16 loss scaling with several optimizers per backward was wrong (NaN hygiene on scaled gradients,
    the scale updated between two optimizers' steps): refused at config time, also where CUDA exists."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="'fp16' is refused.*use 'bf16'"):
        load_config(None, TOY + [f"output_dir={tmp_path}", "train.mixed_precision=fp16"])
    assert main(["train", "configs/sim_digits.yaml", "train.mixed_precision=fp16"]) == 2
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # `accelerate launch --mixed_precision fp16`
    cfg = load_config(None, TOY + [f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="fp16.*refuses.*bf16"):
        TeacherTrainer(cfg)


def test_deepspeed_launches_are_refused_at_start_up(tmp_path, monkeypatch):
    # what `accelerate launch --config_file ds.yaml` exports
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    cfg = load_config(None, TOY + [f"output_dir={tmp_path}", "train.max_steps=2"])
    with pytest.raises(ConfigError, match="uses DeepSpeed.*does not support.*--multi_gpu"):
        TeacherTrainer(cfg)
    assert not tmp_path.joinpath("checkpoints").exists()


def test_teacher_on_gaussians8_covers_all_modes(tmp_path):
    cfg = load_config(None, TOY + [f"output_dir={tmp_path}", "train.max_steps=400", "train.ema_decay=0.99"])
    path = TeacherTrainer(cfg).train()
    teacher = Teacher.from_pretrained(str(path))
    x = teacher.sample(2000, num_steps=50, generator=torch.Generator().manual_seed(0))
    means = torch.tensor([[2 * torch.cos(torch.tensor(2 * torch.pi * k / 8)), 2 * torch.sin(torch.tensor(
        2 * torch.pi * k / 8))] for k in range(8)])
    d = torch.cdist(x, means)
    near = d.min(1).values < 0.5
    counts = torch.bincount(d.argmin(1)[near], minlength=8).double()
    assert near.float().mean() > 0.5, near.float().mean()  # 400 updates: ~0.62 of the samples within 0.5
    # per mode: Binomial(n_near, 1/8); every count within 4 standard deviations of n_near / 8
    n = float(near.sum())
    mean, std = n / 8, (n * (1 / 8) * (7 / 8)) ** 0.5
    assert ((counts - mean).abs() < 4 * std).all(), (counts, mean, std)
    assert (tmp_path / "samples" / "final.png").is_file() and (tmp_path / "config.yaml").is_file()


def test_learning_rate_warmup_and_milestones_follow_torch_schedulers(tmp_path):
    """optim.lr_warmup_steps then optim.lr_milestones / lr_gamma: the learning rate of every update equals
    torch's LinearLR warm-up (factor (k + 1) / 4) chained with MultiStepLR on the same base rate."""
    cfg = load_config(None, TOY + [f"output_dir={tmp_path}", "train.max_steps=12", "optim.lr_warmup_steps=4",
                                   "optim.lr_milestones=[6, 9]", "optim.lr_gamma=0.5"])
    trainer = TeacherTrainer(cfg)
    trainer.setup()
    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-3)
    warm = torch.optim.lr_scheduler.LinearLR(ref_opt, start_factor=0.25, total_iters=3)
    steps = torch.optim.lr_scheduler.MultiStepLR(ref_opt, milestones=[6, 9], gamma=0.5)
    ref = []
    for _ in range(12):
        ref.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        warm.step()
        steps.step()
    ours = []
    for k in range(12):
        trainer._set_lr(k)
        ours.append(trainer.optimizers["student"].param_groups[0]["lr"])
    assert ours == pytest.approx(ref, rel=1e-12)
    assert (ours[5] == pytest.approx(2e-3) and ours[6] == pytest.approx(1e-3)
            and ours[11] == pytest.approx(5e-4))
    for bad, match in (("optim.lr_milestones=[9, 6]", r"optim.lr_milestones: \[9, 6\].*increasing"),
                       ("optim.lr_gamma=0", r"optim.lr_gamma: 0")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, TOY + [bad])
    with pytest.raises(ConfigError, match=r"optim.lr_milestones.*progressive"):
        load_config(None, ["method=progressive", "optim.lr_milestones=[10]"])


def test_resume_gives_bitwise_identical_weights(tmp_path):
    common = (TOY
              + ["train.checkpointing_steps=10", "train.gradient_accumulation_steps=2",
                 "optim.lr_warmup_steps=5"])
    full = load_config(None, common + [f"output_dir={tmp_path / 'full'}", "train.max_steps=30"])
    TeacherTrainer(full).train()
    part = load_config(None, common + [f"output_dir={tmp_path / 'part'}", "train.max_steps=20"])
    TeacherTrainer(part).train()
    # a half-written checkpoint from a killed run must be ignored
    shutil.copytree(tmp_path / "part/checkpoints/checkpoint-20",
                    tmp_path / "part/checkpoints/checkpoint-25.partial")
    os.remove(tmp_path / "part/checkpoints/checkpoint-25.partial/trainer_state.json")
    assert latest_checkpoint(tmp_path / "part/checkpoints").name == "checkpoint-20"
    resumed = load_config(None, common + [f"output_dir={tmp_path / 'part'}", "train.max_steps=30",
                                          "train.resume_from_checkpoint=latest"])
    trainer = TeacherTrainer(resumed)
    trainer.train()
    assert trainer.step == 30
    for stem in ("model_student", "ema_student", "optim_student"):
        a = load_file(tmp_path / f"full/checkpoints/checkpoint-30/{stem}.safetensors")
        b = load_file(tmp_path / f"part/checkpoints/checkpoint-30/{stem}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (stem, k)
    # checkpoints_total_limit=2 (default) keeps the two newest
    kept = [p.name for p in list_checkpoints(tmp_path / "full/checkpoints")]
    assert kept == ["checkpoint-20", "checkpoint-30"]
    assert not list((tmp_path / "full").rglob("*.pkl")) and not list((tmp_path / "full").rglob("*.bin"))


def test_resume_from_missing_path_is_clear(tmp_path):
    cfg = load_config(None, TOY + [f"output_dir={tmp_path}", "train.max_steps=2",
                                   f"train.resume_from_checkpoint={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="nope' is not a checkpoint folder; use 'latest'"):
        TeacherTrainer(cfg).train()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["teacher", "msd"])
def test_two_process_accelerate_launch_keeps_ranks_identical(tmp_path, method):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    script = Path(__file__).with_name("_ddp_script.py")
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                          "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                          "--dynamo_backend", "no", str(script), str(tmp_path),
                          method], env=env, capture_output=True, text=True,
                         timeout=600,
                         cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    r0 = (tmp_path / "rank0.txt").read_text().split()
    r1 = (tmp_path / "rank1.txt").read_text().split()
    assert r0[0] == r1[0] == "2" and "MULTI_CPU" in r0[1]
    assert r0[2] == r1[2], "parameters differ between ranks"
    assert r0[3] != r1[3], "both ranks saw the same data"


def test_curriculum_starts_at_high_noise_and_accumulates_harder_clusters(tmp_path):
    cfg = load_config(None,
                      TOY
                      + [f"output_dir={tmp_path}", "train.max_steps=1", "teacher_train.curriculum_clusters=4",
                         "teacher_train.curriculum_patience=3"])
    trainer = TeacherTrainer(cfg)
    trainer.setup()
    assert trainer._index_range() == (750, 1000)  # the easiest (noisiest) cluster first
    for loss in (1.0, 1.0, 1.0, 1.0):  # no improvement for `patience` steps -> next stage
        trainer._update_curriculum(loss)
    assert trainer.stage == 2 and trainer._index_range() == (500, 1000)
    for _ in range(3):
        for loss in (1.0, 1.0, 1.0, 1.0):
            trainer._update_curriculum(loss)
    assert trainer._index_range() == (0, 1000)  # after the last stage: every index
    state = trainer.state()
    other = TeacherTrainer(cfg)
    other.setup()
    other.load_state(state)
    assert other._index_range() == (0, 1000) and other.stage == state["stage"]


def test_mixed_precision_no_override_is_read_as_the_string_no():
    """YAML 1.1 reads a bare `no` as false; `train.mixed_precision=no` must still mean 'no'."""
    from distill.config import load_config

    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"

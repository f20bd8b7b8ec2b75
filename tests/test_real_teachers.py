"""The real-teacher configs (configs/*_cifar10.yaml) on a locally built teacher of the real architecture: a
random-weight UNet2DModel with google/ddpm-cifar10-32's config and scheduler, and a local 32x32 RGB image
folder standing in for CIFAR-10 (nothing is downloaded). Each config trains 2 steps through `distill train`;
the export loads in plain diffusers in a fresh Python. The shape checks refuse data that does not fit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import diffusers
import pytest
import torch
from conftest import random_png_folder

from distill.cli import main

# google/ddpm-cifar10-32's unet and scheduler configs (the fields that shape the model), shared with
# benchmarks/gpu_perf.py
_CIFAR_FILE = Path(__file__).resolve().parent.parent / "benchmarks" / "model_configs" / "ddpm_cifar10.json"
_CIFAR = json.loads(_CIFAR_FILE.read_text())
CIFAR_UNET, CIFAR_SCHEDULER = _CIFAR["unet"], _CIFAR["scheduler"]


@pytest.fixture(scope="module")
def cifar_teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddpm-cifar10-32")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**CIFAR_UNET)
    assert 35.6e6 < sum(p.numel() for p in unet.parameters()) < 35.8e6  # the real model's 35.7M parameters
    diffusers.DDPMPipeline(unet=unet,
                           scheduler=diffusers.DDPMScheduler(**CIFAR_SCHEDULER)).save_pretrained(folder)
    images = random_png_folder(tmp_path_factory.mktemp("cifar_images") / "images", 8, size=32)
    return folder, images.parent


SMALL = ["train.max_steps=2", "train.batch_size=2", "train.mixed_precision=no", "train.checkpointing_steps=1",
         "train.report_to=none", "train.progress_bar=false", "eval.enabled=false"]
CONFIGS = {
    "sim": ["sim.fake_steps_per_generator_step=1"],
    "uni_instruct": ["uni_instruct.ratio_warmup_steps=0", "uni_instruct.gan_weight=0.01"],
    "progressive": ["progressive.start_steps=2", "progressive.steps_per_round=1",
                    "progressive.final_rounds_multiplier=2"],
}
PLAIN_LOAD = """
import sys, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
x = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="np").images
assert "distill" not in sys.modules and x.shape == (2, 32, 32, 3), x.shape
print(type(pipe).__name__, float(abs(x).sum()) > 0)
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", list(CONFIGS))
def test_real_teacher_config_trains_and_exports(method, cifar_teacher, tmp_path):
    teacher, images = cifar_teacher
    out = tmp_path / "run"
    rc = main(["train", f"configs/{method}_cifar10.yaml", f"teacher.path={teacher}", f"data.spec={images}",
               f"output_dir={out}", *SMALL, *CONFIGS[method]])
    assert rc == 0
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    res = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out / "pipeline")], cwd=tmp_path,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split()[1] == "True"


def test_data_of_another_shape_than_the_teacher_is_refused(cifar_teacher, tmp_path, capsys):
    """The README's real-teacher case: a digits config pointed at a CIFAR teacher names both shapes."""
    teacher, images = cifar_teacher
    rc = main(["train", "configs/sim_digits.yaml", f"teacher.path={teacher}", f"output_dir={tmp_path / 'a'}",
               "train.mixed_precision=no", "eval.enabled=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "gives samples of shape 1x32x32" in err and "takes 3x32x32" in err, err
    rc = main(["train", "configs/sim_cifar10.yaml", f"teacher.path={teacher}", f"data.spec={images}",
               "data.resolution=8", f"output_dir={tmp_path / 'b'}", "train.mixed_precision=no",
               "eval.enabled=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "data.resolution=8 does not match the teacher" in err and "3x32x32" in err, err
    rc = main(["train", "configs/sim_cifar10.yaml", f"teacher.path={teacher}", f"data.spec={images}",
               "data.channels=1", f"output_dir={tmp_path / 'c'}", "train.mixed_precision=no",
               "eval.enabled=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "data.channels=1 does not match the teacher" in err, err


def test_resolution_and_channels_and_fid_reference_follow_the_teacher_and_data(tmp_path):
    from distill.config import load_config

    for method in CONFIGS:
        cfg = load_config(f"configs/{method}_cifar10.yaml")
        assert cfg.data.resolution is None and cfg.data.channels is None and cfg.eval.reference is None
        assert cfg.teacher.path == "google/ddpm-cifar10-32" and cfg.data.spec == "uoft-cs/cifar10"


def test_the_progressive_cifar10_config_fits_the_teachers_table(tmp_path):
    """configs/progressive_cifar10.yaml's start_steps must fit google/ddpm-cifar10-32's 1,000-entry table (it
    asked for 1024, which the trainer refuses); a tiny UNet with that scheduler stands in for the teacher."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1,
                                 norm_num_groups=8)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**CIFAR_SCHEDULER)).save_pretrained(
        tmp_path / "teacher")
    images = random_png_folder(tmp_path / "images" / "images", 4, size=32).parent
    from distill.config import load_config
    from distill.trainers import trainer_class

    cfg = load_config("configs/progressive_cifar10.yaml", [
        f"teacher.path={tmp_path / 'teacher'}", f"data.spec={images}", f"output_dir={tmp_path / 'run'}",
        "train.mixed_precision=no", "train.report_to=none", "train.progress_bar=false"])
    trainer = trainer_class("progressive")(cfg)
    trainer.setup()  # builds the round plan against the teacher's table
    assert trainer.plan[0][0] == cfg.progressive.start_steps // 2 and trainer.plan[-1][0] == 1
    assert trainer.grids(0)[0][0] == 999  # the first round's teacher grid starts at the table's last entry

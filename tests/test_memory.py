"""distill estimate-memory against the measured peak tensor memory of tiny CPU runs (torch.profiler)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_sd

from distill.cli import main
from distill.config import load_config
from distill.memory import estimate, saved_bytes

REPO = Path(__file__).resolve().parent.parent
RUNS = {
    "sim full": ("sim", []),
    "sim LoRA": ("sim", ["student.lora_rank=4"]),
    "sim LoRA, no checkpointing": ("sim", ["student.lora_rank=4", "sim.gradient_checkpointing=false"]),
    "uni_instruct LoRA": ("uni_instruct",
                          ["student.lora_rank=4", "uni_instruct.gradient_checkpointing=false"]),
    "progressive LoRA": ("progressive", ["student.lora_rank=4", "progressive.start_steps=4",
                                         "progressive.target_steps=2", "progressive.steps_per_round=4"]),
}


@pytest.fixture(scope="module")
def mid_sd(tmp_path_factory):
    """An SD-format teacher with a 6M-parameter UNet: networks, not the interpreter, dominate the memory."""
    root = tmp_path_factory.mktemp("mid_sd")
    make_tiny_sd(root / "sd", block_out_channels=(64, 128), layers_per_block=2, attention_head_dim=8)
    (root / "prompts.txt").write_text("a red cat\na blue dog\n")
    return root


def _overrides(mid_sd, extra):
    return [f"teacher.path={mid_sd / 'sd'}", f"data.spec=prompts:{mid_sd / 'prompts.txt'}",
            "train.batch_size=2", "train.mixed_precision=no", "data.teacher_sample_steps=2", *extra]


@pytest.fixture(scope="module")
def measured(mid_sd, tmp_path_factory):
    out = {}
    for name, (method, extra) in RUNS.items():
        cmd = [sys.executable, str(REPO / "tests" / "_measure_memory.py"), f"configs/{method}_sd15.yaml",
               *_overrides(mid_sd, extra), f"output_dir={tmp_path_factory.mktemp('run')}"]
        res = subprocess.run(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])["peak"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_estimate_is_within_20_percent_of_the_measured_peak(mid_sd, measured, name):
    method, extra = RUNS[name]
    est = estimate(load_config(REPO / "configs" / f"{method}_sd15.yaml", _overrides(mid_sd, extra)),
                   device="cpu")
    print(f"{name}: estimate {est.peak / 2**20:.1f} MiB, measured {measured[name] / 2**20:.1f} MiB")
    assert abs(est.peak - measured[name]) <= 0.2 * measured[name], (name, est.peak, measured[name])


@pytest.mark.slow
def test_a_lora_sim_step_needs_less_memory_than_a_full_one(measured):
    assert measured["sim LoRA"] < 0.5 * measured["sim full"]
    assert measured["sim LoRA"] <= measured["sim LoRA, no checkpointing"]


def test_saved_activations_of_a_linear_layer_match_autograd():
    """The meta-device count is autograd's own: Linear keeps its input when the weight is trained and nothing
    when only the input needs a gradient (the weight itself is not counted)."""
    with torch.device("meta"):
        net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = torch.empty(5, 64, device="meta")
    trained = saved_bytes(net, (x,), {}, list(net.parameters()), False, torch.float32)
    # the first input, and ReLU's output (kept once for ReLU and Linear 2)
    assert trained == 4 * (5 * 64 + 5 * 32)
    through = saved_bytes(net, (x,), {}, [], True, torch.float32)
    assert through == 4 * (5 * 32)  # ReLU's output only
    assert saved_bytes(net, (x,), {}, [], False, torch.float32) == 0


def test_estimate_memory_command(mid_sd, capsys):
    assert main(["estimate-memory", "configs/sim_sd15.yaml", f"teacher.path={mid_sd / 'sd'}",
                 "student.lora_rank=8"]) == 0
    out = capsys.readouterr().out
    assert "| student | trained |" in out and "Peak of one training step" in out and "LoRA rank 8" in out
    assert main(["estimate-memory", "configs/sim_sd15.yaml", f"teacher.path={mid_sd / 'sd'}", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["peak_bytes"] > 0 and {n["name"] for n in data["networks"]} >= {"teacher", "student", "fake"}
    assert main(["estimate-memory", "configs/mar_digits.yaml"]) == 2
    assert "covers methods" in capsys.readouterr().err


MODEL_CONFIGS = Path(__file__).parent.parent / "benchmarks" / "model_configs"


def _params(config: str, cls: str, buffers: bool = False) -> int:
    import diffusers

    with torch.device("meta"):
        net = getattr(diffusers, cls).from_config(json.loads((MODEL_CONFIGS / config).read_text()))
    extra = sum(b.numel() for b in net.buffers()) if buffers else 0
    return sum(p.numel() for p in net.parameters()) + extra


def test_the_shipped_transformer_configs_have_the_published_parameter_counts():
    """The memory table's architectures are the published ones. DiT-XL/2: 675M (Peebles & Xie 2023,
    Table 1 / 4); diffusers' DiT keeps a copy of the timestep + class embedder in each of its 28 blocks (the
    conversion copies the one embedder), so 27 copies are counted once. SD3.5-medium: 2.5B (Stability AI's
    model card), with the 384 x 384 position-embedding table the reference code holds as a parameter
    (diffusers: a buffer). FLUX.1-dev: 12B ("a 12 billion parameter rectified flow transformer", its model
    card; 11.9B exactly)."""
    dit = _params("dit_xl2_256.json", "DiTTransformer2DModel")
    hidden = 16 * 72
    embedder = 1001 * hidden + (256 * hidden + hidden) + (hidden * hidden + hidden)  # labels + timestep MLP
    assert abs(dit - 27 * embedder - 675e6) / 675e6 < 0.005
    sd35 = _params("sd35_medium_transformer.json", "SD3Transformer2DModel", buffers=True)
    assert abs(sd35 - 2.5e9) / 2.5e9 < 0.02
    flux = _params("flux1_dev_transformer.json", "FluxTransformer2DModel")
    assert abs(flux - 11.9e9) / 11.9e9 < 0.005


@pytest.mark.parametrize("config", ["sim_dit", "sim_sd3", "sim_flux"])
def test_estimate_memory_covers_the_transformer_teachers(config, tmp_path):
    """estimate-memory on DiT-XL/2, SD3.5-medium and FLUX.1-dev config folders: a LoRA student needs less
    than a full one, a LoRA step with checkpointing less than without, and the teacher row holds the
    transformer's parameters."""
    from dataclasses import replace

    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    from memory_table import MODELS, config_folder

    name = next(k for k, v in MODELS.items() if v[0] == config)
    _, network, vae, encoders, sizes = MODELS[name]
    folder = config_folder(tmp_path, name, network, vae, encoders)
    peaks = {}
    for lora in (False, True):
        cfg = load_config(f"configs/{config}.yaml", [f"teacher.path={folder}", f"data.resolution={sizes[0]}",
                                                     "train.batch_size=1",
                                                     f"student.lora_rank={64 if lora else 'null'}"])
        est = estimate(cfg)
        assert est.networks[0].params == _params(network[1], network[2])
        peaks[lora] = (replace(est, checkpointing=True).peak, replace(est, checkpointing=False).peak)
    assert peaks[True][0] < peaks[False][0] and peaks[True][0] < peaks[True][1]
    assert peaks[False][0] <= peaks[False][1]  # full: the gradients may outweigh the saved activations

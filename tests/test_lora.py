"""LoRA students (distill.lora): adapters on one shared frozen teacher network, exports both ways."""

import json
import os
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import safetensors.torch
import torch

from distill import load_pipeline
from distill.config import ConfigError, load_config
from distill.lora import UNET_TARGETS, AdapterView, add_adapters, merged_copy
from distill.trainers import trainer_class

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a red cat", "a blue dog"]


def tiny_cond_unet(seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=4, cross_attention_dim=16)


def lora_rank_count(net, rank: int, targets) -> int:
    """Closed form of a LoRA adapter's size: r (in + out) per adapted Linear, r (in k^2 + out) per Conv2d."""
    n = 0
    for name, m in net.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(m, torch.nn.Linear):
            n += rank * (m.in_features + m.out_features)
        elif isinstance(m, torch.nn.Conv2d):
            n += rank * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
    return n


def test_views_share_one_frozen_base_and_switch_adapters_per_call():
    plain = tiny_cond_unet()
    base = tiny_cond_unet()
    add_adapters(base, ["student", "fake"], rank=4, alpha=8, targets=UNET_TARGETS)
    teacher, student, fake = AdapterView(base, None), AdapterView(base, "student"), AdapterView(base, "fake")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    kw = {"encoder_hidden_states": torch.randn(2, 5, 16)}
    ref = plain(x, t, **kw).sample
    # B = 0 at the start: every view is the teacher
    for view in (teacher, student, fake):
        torch.testing.assert_close(view(x, t, **kw).sample, ref)
    # only the adapter is a view's parameter set, and its size is the closed form r (in + out) per layer
    assert sum(p.numel() for p in teacher.parameters()) == 0
    n = sum(p.numel() for p in student.parameters())
    assert (n == lora_rank_count(plain, 4, UNET_TARGETS)
            and 0 < n < sum(p.numel() for p in plain.parameters()) / 5)
    assert all(p.requires_grad for p in student.parameters())
    assert {id(p) for p in student.parameters()}.isdisjoint(id(p) for p in fake.parameters())
    # a change to the student's adapter moves the student only
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    out_student = student(x, t, **kw).sample
    assert (out_student - ref).abs().max() > 1e-3
    torch.testing.assert_close(teacher(x, t, **kw).sample, ref)
    torch.testing.assert_close(fake(x, t, **kw).sample, ref)
    # the merged copy (W + alpha / r B A) equals the student view, with no peft layer left in it
    merged = merged_copy(student, tiny_cond_unet())
    torch.testing.assert_close(merged(x, t, **kw).sample, out_student, rtol=1e-4, atol=1e-5)
    assert not any("lora" in k for k in merged.state_dict())
    # diffusers' own LoRA application agrees: alpha / r scaling as written in the adapter's config
    d = tiny_cond_unet()
    from peft import LoraConfig

    d.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS))
    from peft import set_peft_model_state_dict

    from distill.lora import adapter_state_dict

    set_peft_model_state_dict(d, adapter_state_dict(student))
    torch.testing.assert_close(d(x, t, **kw).sample, out_student, rtol=1e-4, atol=1e-5)


def test_whole_forward_checkpointing_gives_the_gradients_of_no_checkpointing():
    """Student -> fake and teacher at the student's sample (a generator step): the gradients of the student
    adapter with whole-forward checkpointing equal those without. Per-block checkpointing of the shared base
    recomputes with the adapter active at backward time: torch detects the different computation."""
    def grads(mode):
        base = tiny_cond_unet()
        add_adapters(base, ["student", "fake"], rank=4, alpha=4, targets=UNET_TARGETS)
        ck = mode == "view"
        teacher, student, fake = (AdapterView(base, n, checkpointing=ck) for n in (None, "student", "fake"))
        torch.manual_seed(1)
        with torch.no_grad():
            for p in list(student.parameters()) + list(fake.parameters()):
                p.normal_(0, 0.05)
        if mode == "blocks":
            base.enable_gradient_checkpointing()
            base.train()
        fake.requires_grad_(False)
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 999])
        kw = {"encoder_hidden_states": torch.randn(2, 5, 16)}
        x0 = student(x, t, **kw).sample
        loss = ((teacher(x0, t // 2, **kw).sample - fake(x0, t // 2, **kw).sample) * x0).sum()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in student.parameters()])

    plain, view = grads("none"), grads("view")
    torch.testing.assert_close(view, plain)
    with pytest.raises(torch.utils.checkpoint.CheckpointError):  # what the whole-forward recomputation avoids
        grads("blocks")


def _train(method, folder, prompts_file, out, extra=()):
    overrides = {
        "sim": ["train.max_steps=2", "sim.lr_fake=0.01"],
        "uni_instruct": ["train.max_steps=2", "uni_instruct.lr_fake=0.01"],
        "progressive": ["progressive.start_steps=2", "progressive.target_steps=1",
                        "progressive.steps_per_round=2"],
        "msd": ["train.max_steps=2", "msd.num_students=2", "msd.lr_fake=0.01"],
        "guided": ["guided.start_steps=2", "guided.target_steps=1", "guided.steps_per_round=1"],
    }[method]
    cfg = load_config(REPO / "configs" / f"{method}_sd15.yaml", [
        f"teacher.path={folder}", f"data.spec=prompts:{prompts_file}", "train.batch_size=2",
        "data.teacher_sample_steps=2", "train.report_to=none", "train.progress_bar=false",
        f"output_dir={out}",
        "optim.lr=0.01", "train.mixed_precision=no", *overrides, *extra])
    from accelerate.state import AcceleratorState

    # runs of this file use different mixed precisions
    AcceleratorState._reset_state(reset_partial_state=True)
    trainer = trainer_class(cfg.method)(cfg)
    trainer.train()
    return trainer


PLAIN_LOAD = """
import json, os, sys, numpy as np, torch
from diffusers import DiffusionPipeline
index = json.load(open(os.path.join(sys.argv[1], "model_index.json")))
extra = ({"custom_pipeline": os.path.join(sys.argv[1], index["_distill_pipeline"][0] + ".py")}
         if "_distill_pipeline" in index else {})  # a stock layout: distill's pipeline as a custom pipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True, **extra)
pipe.set_progress_bar_config(disable=True)
lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
np.save(sys.argv[2], pipe(prompt=["a red cat", "a blue dog"], latents=lat, output_type="np").images)
assert "distill" not in sys.modules
"""


@pytest.mark.parametrize("method", ["sim", pytest.param("uni_instruct", marks=pytest.mark.slow),
                                    pytest.param("progressive", marks=pytest.mark.slow)])
def test_lora_students_train_and_export_an_adapter_for_the_teachers_own_pipeline(
        tiny_sd_folder, tmp_path, method):
    sd, out = tiny_sd_folder / "sd", tmp_path / "run"
    trainer = _train(method, sd, tiny_sd_folder / "prompts.txt", out, ["student.lora_rank=4"])
    # the trainable parameters are the adapters' only (closed form), and the teacher's weights are shared
    plain = diffusers.UNet2DConditionModel.from_pretrained(sd / "unet")
    expected = lora_rank_count(plain, 4, UNET_TARGETS)
    trainable = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n,
                 m in trainer.modules.items()}
    frozen_copy = {"sim": "fake", "uni_instruct": "fake", "progressive": "round_teacher"}[method]
    assert trainable["student"] == expected
    # progressive's round teacher: frozen
    assert trainable[frozen_copy] == (0 if method == "progressive" else expected)
    assert set(trainable) - {"student", frozen_copy} <= {"disc"}  # Uni-Instruct's discriminator head (small)
    assert trainer.teacher.weights is trainer.unwrap("student").shared_base
    ckpt = safetensors.torch.load_file(next((out / "checkpoints").glob("checkpoint-*"))
                                       / "model_student.safetensors")
    assert sum(v.numel() for v in ckpt.values()) == expected  # checkpoints hold the adapter, not the base
    # the adapter folder, loaded into the teacher's own pipeline with the scheduler it names, changes the
    # teacher's output and samples what the merged student pipeline samples
    lora = out / "lora"
    info = json.loads((lora / "distill_lora.json").read_text())
    teacher = diffusers.StableDiffusionPipeline.from_pretrained(sd, safety_checker=None)
    teacher.set_progress_bar_config(disable=True)
    teacher.scheduler = getattr(diffusers, info["scheduler"]).from_pretrained(lora, subfolder="scheduler")
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    before = teacher(PROMPTS, latents=lat, output_type="np", **info["call_kwargs"]).images
    teacher.load_lora_weights(lora)
    after = teacher(PROMPTS, latents=lat, output_type="np", **info["call_kwargs"]).images
    student = load_pipeline(str(out / "pipeline"))
    student.set_progress_bar_config(disable=True)
    mine = student(prompt=PROMPTS, latents=lat, output_type="np").images
    assert np.abs(after - before).max() > 1e-2
    np.testing.assert_allclose(after, mine, atol=2e-5)
    assert "load_lora_weights" in (lora / "README.md").read_text()
    # the merged export is a plain diffusers pipeline (no peft, no distill) with the same images
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out / "pipeline"), str(tmp_path / "p.npy")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), mine)
    unet = json.loads((out / "pipeline" / "unet" / "config.json").read_text())
    assert unet["_class_name"] == "UNet2DConditionModel"


def test_msd_lora_students_are_adapters_on_one_base_and_export_merged_each(tiny_sd_folder, tmp_path):
    """msd with student.lora_rank: K student adapters and the shared fake score's on the teacher's own frozen
    network (each the closed-form adapter size); the exported bank holds each student merged, its own
    adapter's delta added to the stored weights (under the EMA, as exported)."""
    sd, out = tiny_sd_folder / "sd", tmp_path / "run"
    trainer = _train("msd", sd, tiny_sd_folder / "prompts.txt", out, ["student.lora_rank=4"])
    plain = diffusers.UNet2DConditionModel.from_pretrained(sd / "unet")
    expected = lora_rank_count(plain, 4, UNET_TARGETS)
    trainable = {n: sum(p.numel() for p in m.parameters() if p.requires_grad)
                 for n, m in trainer.modules.items()}
    assert trainable == {"student_0": expected, "student_1": expected, "fake": expected}
    assert all(trainer.unwrap(n).shared_base is trainer.teacher.weights for n in trainable)
    bank = load_pipeline(str(out / "pipeline")).students
    assert len(bank) == 2 and type(bank.students[0]).__name__ == "UNet2DConditionModel"
    deltas = []
    with trainer.ema_weights():
        for j in range(2):
            view = trainer.unwrap(f"student_{j}")
            layer = next(m for m in view._layers)
            path = next(p for p, m in view.shared_base.named_modules() if m is layer)
            deltas.append(layer.get_delta_weight(f"student_{j}"))
            torch.testing.assert_close(bank.students[j].get_submodule(path).weight,
                                       plain.get_submodule(path).weight + deltas[j], rtol=1e-5, atol=1e-6)
    assert (deltas[0] - deltas[1]).abs().max() > 0  # two students, two adapters


def test_lora_resume_is_exact_and_bf16_keeps_the_merged_export_on_the_stored_weights(
        tiny_sd_folder, tmp_path):
    sd, prompts = tiny_sd_folder / "sd", tiny_sd_folder / "prompts.txt"
    full = _train("sim", sd, prompts, tmp_path / "a", ["student.lora_rank=2", "train.max_steps=4"])
    _train("sim", sd, prompts, tmp_path / "b", ["student.lora_rank=2", "train.max_steps=2"])
    resumed = _train("sim", sd, prompts, tmp_path / "b", ["student.lora_rank=2", "train.max_steps=4",
                                                          "train.resume_allow_config_change=true"])
    for (n, a), (_, b) in zip(full.unwrap("student").state_dict().items(),
                              resumed.unwrap("student").state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    # bf16: the teacher is held in bf16, but the merged export adds the adapter to the weights as stored
    trainer = _train("sim", sd, prompts, tmp_path / "c",
                     ["student.lora_rank=2", "train.mixed_precision=bf16"])
    assert trainer.teacher.weights.dtype == torch.bfloat16
    stored = diffusers.UNet2DConditionModel.from_pretrained(sd / "unet")
    exported = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "c" / "pipeline" / "unet")
    view = trainer.unwrap("student")
    with trainer.ema_weights():
        layer = next(m for m in view._layers)
        path = next(p for p, m in view.shared_base.named_modules() if m is layer)
        delta = layer.get_delta_weight("student")
    w_stored, w_out = stored.get_submodule(path).weight, exported.get_submodule(path).weight
    torch.testing.assert_close(w_out, w_stored + delta, rtol=1e-5, atol=1e-6)


def test_lora_refusals(tiny_sd_folder, tmp_path):
    with pytest.raises(ConfigError, match="student.lora_rank=4 is supported by methods"):
        load_config(REPO / "configs" / "mar_digits.yaml", ["student.lora_rank=4"])
    with pytest.raises(ConfigError, match="new guidance embedding, which a LoRA adapter cannot hold"):
        _train("guided", tiny_sd_folder / "sd", tiny_sd_folder / "prompts.txt", tmp_path / "g",
               ["student.lora_rank=4"])
    with pytest.raises(ConfigError, match="needs student.arch=copy"):
        load_config(REPO / "configs" / "sim_digits.yaml", ["student.lora_rank=4", "student.arch=mlp"])
    with pytest.raises(ConfigError, match="student.lora_rank: 0 is impossible"):
        load_config(REPO / "configs" / "sim_digits.yaml", ["student.lora_rank=0"])
    with pytest.raises(ConfigError,
                       match="train.attention=xformers needs the xformers package and a CUDA device"):
        _train("sim", tiny_sd_folder / "sd", tiny_sd_folder / "prompts.txt", tmp_path / "y",
               ["student.lora_rank=4", "train.attention=xformers"])
    with pytest.raises(ConfigError, match="matches no layer"):
        _train("sim", tiny_sd_folder / "sd", tiny_sd_folder / "prompts.txt", tmp_path / "x",
               ["student.lora_rank=4", "student.lora_target_modules=[nothing_here]"])


def test_lora_on_a_pixel_unet_teacher_writes_a_peft_adapter(tmp_path, tiny_unet):
    """A UNet2DModel teacher (no diffusers LoRA loader): the adapter is written in peft's format, and peft
    applied to the teacher's network reproduces the merged student."""
    import peft

    unet = tiny_unet(sample_size=8, in_channels=1)
    folder = tmp_path / "teacher"
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(folder)
    from conftest import random_png_folder

    random_png_folder(tmp_path / "imgs", 8, size=8)
    cfg = load_config(REPO / "configs" / "sim_digits.yaml", [
        f"teacher.path={folder}", f"data.spec={tmp_path / 'imgs'}", "data.channels=1", "train.max_steps=2",
        "train.batch_size=2", "student.lora_rank=3", "student.arch=copy", "optim.lr=0.01",
        "train.report_to=none",
        "train.progress_bar=false", "eval.enabled=false", f"output_dir={tmp_path / 'run'}"])
    trainer_class(cfg.method)(cfg).train()
    lora = tmp_path / "run" / "lora"
    conf = json.loads((lora / "adapter_config.json").read_text())
    net = diffusers.UNet2DModel.from_pretrained(folder / "unet")
    peft.inject_adapter_in_model(peft.LoraConfig(**{k: v for k, v in conf.items() if k != "peft_type"}), net)
    peft.set_peft_model_state_dict(net, safetensors.torch.load_file(lora / "adapter_model.safetensors"))
    merged = load_pipeline(str(tmp_path / "run" / "pipeline")).generator
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([999, 999])
    torch.testing.assert_close(net(x, t).sample, merged(x, t).sample, rtol=1e-4, atol=1e-5)
    plain = diffusers.UNet2DModel.from_pretrained(folder / "unet")
    assert (net(x, t).sample - plain(x, t).sample).abs().max() > 1e-4


def test_stored_network_of_an_in_memory_teacher_drops_its_adapters():
    """A teacher built in memory (no folder to re-read) carrying LoRA adapters: its stored network is the
    plain network, its weights taken from under peft's ``base_layer``."""
    from distill.teachers import Teacher

    plain = tiny_cond_unet()
    teacher = Teacher.from_model(tiny_cond_unet(), diffusers.DDPMScheduler())
    add_adapters(teacher.weights, ["student"], rank=2, alpha=2, targets=UNET_TARGETS)
    stored = teacher.stored_network()
    assert (type(stored) is diffusers.UNet2DConditionModel
            and not any("lora" in k for k in stored.state_dict()))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    kw = {"encoder_hidden_states": torch.randn(2, 5, 16)}
    torch.testing.assert_close(stored(x, t, **kw).sample, plain(x, t, **kw).sample)
    assert all(p.requires_grad for p in stored.parameters())

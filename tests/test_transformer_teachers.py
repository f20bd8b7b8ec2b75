"""Transformer teachers in their stock diffusers layouts (DiT, SD3, FLUX.1): loading, the backbone's call
convention, teacher sampling equal to the stock pipelines (DiTPipeline, StableDiffusion3Pipeline,
FluxPipeline) at the same steps, seed, condition and guidance scale, and every method's 2-update run and
export."""

import json

import diffusers
import numpy as np
import pytest
import torch
from conftest import make_tiny_dit, make_tiny_flux, make_tiny_pixart, make_tiny_sd3
from PIL import Image

from distill.cli import main
from distill.teachers import Teacher


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("transformer_teachers")
    dpm = diffusers.DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    return {"dit": make_tiny_dit(root / "dit"), "dit_dpm": make_tiny_dit(root / "dit_dpm", scheduler=dpm),
            "sd3": make_tiny_sd3(root / "sd3"), "sd3_no_t5": make_tiny_sd3(root / "sd3_no_t5", t5=False),
            "sd3_dynamic": make_tiny_sd3(root / "sd3_dynamic", use_dynamic_shifting=True,
                                         base_image_seq_len=4, max_image_seq_len=64, base_shift=0.5,
                                         max_shift=1.15),
            "flux": make_tiny_flux(root / "flux"), "flux_schnell": make_tiny_flux(root / "flux_schnell",
                                                                               guidance_embeds=False),
            "pixart": make_tiny_pixart(root / "pixart")}


def _ours(folder, n, steps, seed, guidance_scale, stock=True, resolution=None, **cond):
    teacher = Teacher.from_pretrained(folder)
    if resolution is not None:
        teacher.set_resolution(resolution)
    x = teacher.sample(n, steps, torch.Generator().manual_seed(seed), teacher.condition(**cond),
                       guidance_scale=guidance_scale, stock=stock)
    return (teacher.decode(x) / 2 + 0.5).clamp(0, 1)


def test_dit_folder_loads_as_a_class_conditional_latent_teacher(folders):
    teacher = Teacher.from_pretrained(folders["dit"])  # model_index names Transformer2DModel, as on the Hub
    assert type(teacher.model).__name__ == "DiTTransformer2DModel"
    assert teacher.num_classes == 1000 and teacher.is_latent and not teacher.is_text
    assert teacher.sample_shape == [4, 8, 8] and teacher.image_shape == [3, 16, 16]
    assert teacher.schedule.kind == "vp"
    # learned sigma: the network's 8 channels are read as the 4 epsilon channels, the first half
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = teacher.condition(class_labels=[3, 5])
    out = teacher.network_output(x, 0.5, cond)
    raw = teacher.model(x, timestep=torch.full((2,), 499.5), class_labels=cond.class_labels).sample
    assert raw.shape[1] == 8 and torch.equal(out, raw[:, :4])
    # the null class is num_classes: a guided output mixes the label's and class 1000's. The reference is one
    # pass over the (labels, null) batch, as the guided call makes: two passes of 2 differ from one of 4 by
    # float32 rounding (~1e-7), which s = 3 amplifies past the tolerance on some machines (1.3e-6 seen)
    both = teacher.model(torch.cat([x, x]), timestep=torch.full((4,), 499.5),
                         class_labels=torch.tensor([3, 5, 1000, 1000])).sample
    c, null = both[:2, :4], both[2:, :4]
    guided = teacher.network_output(x, 0.5, cond, guidance_scale=3.0)
    torch.testing.assert_close(guided, null + 3.0 * (c - null), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("folder", ["dit", "dit_dpm"])
@pytest.mark.parametrize("steps,scale", [(3, 4.0), (7, 1.0)])
def test_dit_teacher_sampling_equals_dit_pipeline(folders, folder, steps, scale):
    pipe = diffusers.DiTPipeline.from_pretrained(folders[folder])
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(class_labels=[1, 7, 999], num_inference_steps=steps, guidance_scale=scale,
               generator=torch.Generator().manual_seed(3), output_type="pt").images
    ours = _ours(folders[folder], 3, steps, 3, scale, class_labels=[1, 7, 999])
    assert ref.shape == ours.shape == (3, 3, 16, 16)
    assert (ours - ref).abs().max() <= 1 / 255 and ref.std() > 0.05
    # a different seed gives different images (the comparison is not vacuous)
    assert (_ours(folders[folder], 3, steps, 4, scale, class_labels=[1, 7, 999]) - ref).abs().max() > 0.05


@pytest.mark.parametrize("folder", ["sd3", "sd3_no_t5", "sd3_dynamic"])
@pytest.mark.parametrize("steps,scale,negative", [(3, 7.0, None), (4, 1.0, None), (2, 5.0, "blurry")])
def test_sd3_teacher_sampling_equals_sd3_pipeline(folders, folder, steps, scale, negative):
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if folder == "sd3_no_t5" else {}
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(folders[folder], **no_t5)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red cat", "dog"]
    ref = pipe(prompt=prompts, negative_prompt=None if negative is None else [negative] * 2,
               num_inference_steps=steps, guidance_scale=scale, generator=torch.Generator().manual_seed(0),
               output_type="pt").images
    neg = {} if negative is None else {"negative_prompts": [negative] * 2}
    for stock in (True, False):  # the scheduler's own loop, and DDIM on the same grid (the flow Euler step)
        ours = _ours(folders[folder], 2, steps, 0, scale, stock=stock, prompts=prompts, **neg)
        assert (ours - ref).abs().max() <= 1 / 255, (stock, (ours - ref).abs().max())
    assert ref.std() > 0.05


def test_sd3_dynamic_shift_reads_the_image_token_count(folders):
    teacher = Teacher.from_pretrained(folders["sd3_dynamic"])
    # 8x8 latents in 2x2 patches: 16 tokens; mu linear between (4, 0.5) and (64, 1.15), shift e^mu
    mu = 0.5 + (16 - 4) * (1.15 - 0.5) / (64 - 4)
    assert teacher.schedule.shift == pytest.approx(np.exp(mu))
    assert teacher.schedule.shift != Teacher.from_pretrained(folders["sd3"]).schedule.shift


@pytest.mark.parametrize("folder,steps,scale,true_cfg", [
    ("flux", 3, 3.5, None), ("flux", 2, 5.0, None),  # FLUX.1-dev: the embedded guidance, one pass
    ("flux_schnell", 3, None, None), ("flux_schnell", 2, None, 4.0)])  # schnell: none, or true CFG on ""
def test_flux_teacher_sampling_equals_flux_pipeline(folders, folder, steps, scale, true_cfg):
    pipe = diffusers.FluxPipeline.from_pretrained(folders[folder])
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red cat", "dog"]
    kw = {} if true_cfg is None else {"true_cfg_scale": true_cfg, "negative_prompt": ["", ""]}
    ref = pipe(prompt=prompts, height=16, width=16, num_inference_steps=steps, guidance_scale=scale or 3.5,
               generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images
    ours = _ours(folders[folder], 2, steps, 0, scale or true_cfg, resolution=16, prompts=prompts)
    assert ref.shape == ours.shape == (2, 3, 16, 16) and ref.std() > 0.05
    assert (ours - ref).abs().max() <= 1 / 255
    # the 2x2 packing, position ids and the dynamic shift of 16 tokens: mu linear between (4, 0.5), (64, 1.15)
    teacher = Teacher.from_pretrained(folders[folder])
    teacher.set_resolution(16)
    assert teacher.sample_shape == [4, 8, 8]
    assert teacher.schedule.shift == pytest.approx(np.exp(0.5 + (16 - 4) * 0.65 / 60))


def test_flux_dev_true_cfg_on_its_embedded_guidance_equals_flux_pipeline(folders, data, tmp_path, capsys):
    """FluxPipeline's true_cfg_scale with a negative prompt on FLUX.1-dev: both passes at the embedded scale,
    then CFG; `distill sample --true-cfg-scale` gives its images, and training binds teacher.true_cfg_scale
    (refused, with the fix, on a teacher without a guidance input)."""
    pipe = diffusers.FluxPipeline.from_pretrained(folders["flux"])
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=["a red cat"] * 2, negative_prompt=["blurry"] * 2, true_cfg_scale=2.5,
               guidance_scale=3.5, height=16, width=16, num_inference_steps=2,
               generator=torch.Generator().manual_seed(1), output_type="pt").images
    one_pass = pipe(prompt=["a red cat"] * 2, guidance_scale=3.5, height=16, width=16, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(1), output_type="pt").images
    from distill.eval.report import save_grid

    save_grid(ref, tmp_path / "ref.png")
    assert main(["sample", str(folders["flux"]), "--steps", "2", "--seed", "1", "--num-images", "2",
                 "--prompt", "a red cat", "--negative-prompt", "blurry", "--true-cfg-scale", "2.5",
                 "--resolution", "16", "--out", str(tmp_path / "ours.png")]) == 0
    assert np.abs(_png(tmp_path / "ours.png") - _png(tmp_path / "ref.png")).max() <= 1
    assert (ref - one_pass).abs().max() > 4 / 255  # the second pass shows beyond the tolerance
    assert main(["sample", str(folders["sd3"]), "--prompt", "x", "--true-cfg-scale", "2",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "use --guidance-scale 2.0" in capsys.readouterr().err
    common = [*data["flux"], "train.max_steps=1", "train.batch_size=2", "train.mixed_precision=no",
              "train.report_to=none", "train.progress_bar=false", "eval.enabled=false"]
    assert main(["train", "configs/sim_sd3.yaml", f"teacher.path={folders['sd3']}",
                 "teacher.true_cfg_scale=2", f"output_dir={tmp_path / 'a'}", *common]) == 2
    assert "teacher.true_cfg_scale=2.0 is CFG on top of an embedded guidance input" in capsys.readouterr().err


def _png(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_distill_sample_on_teacher_folders_equals_the_stock_pipelines(folders, tmp_path, capsys):
    from distill.eval.report import save_grid

    # DiT, no guidance argument: the stock default (4.0), its labels, 3 steps
    pipe = diffusers.DiTPipeline.from_pretrained(folders["dit"])
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(class_labels=[5, 9], num_inference_steps=3, generator=torch.Generator().manual_seed(2),
               output_type="pt").images
    save_grid(ref, tmp_path / "ref_dit.png")
    assert main(["sample", str(folders["dit"]), "--steps", "3", "--seed", "2", "--num-images", "2",
                 "--class-labels", "5,9", "--out", str(tmp_path / "dit.png")]) == 0
    assert "guidance scale 4.0" in capsys.readouterr().out
    assert np.abs(_png(tmp_path / "dit.png") - _png(tmp_path / "ref_dit.png")).max() <= 1
    # SD3 with a prompt, guidance 7.0 (its default) and the stock default step count is slow; 2 steps here
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(folders["sd3"])
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=["a red cat"] * 2, num_inference_steps=2, generator=torch.Generator().manual_seed(1),
               output_type="pt").images
    save_grid(ref, tmp_path / "ref_sd3.png")
    assert main(["sample", str(folders["sd3"]), "--steps", "2", "--seed", "1", "--num-images", "2",
                 "--prompt", "a red cat", "--out", str(tmp_path / "sd3.png")]) == 0
    assert "guidance scale 7.0" in capsys.readouterr().out
    assert np.abs(_png(tmp_path / "sd3.png") - _png(tmp_path / "ref_sd3.png")).max() <= 1
    # FLUX.1-dev at 16 px: its embedded guidance 3.5 by default
    pipe = diffusers.FluxPipeline.from_pretrained(folders["flux"])
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=["a red cat"] * 2, height=16, width=16, num_inference_steps=2,
               generator=torch.Generator().manual_seed(1), output_type="pt").images
    save_grid(ref, tmp_path / "ref_flux.png")
    assert main(["sample", str(folders["flux"]), "--steps", "2", "--seed", "1", "--num-images", "2",
                 "--prompt", "a red cat", "--resolution", "16", "--out", str(tmp_path / "flux.png")]) == 0
    assert "guidance scale 3.5" in capsys.readouterr().out
    assert np.abs(_png(tmp_path / "flux.png") - _png(tmp_path / "ref_flux.png")).max() <= 1
    # a text teacher without --prompt: one line naming the fix
    assert main(["sample", str(folders["sd3"]), "--out", str(tmp_path / "x.png")]) == 2
    assert "--prompt" in capsys.readouterr().err


TRANSFORMER_METHODS = {  # method: overrides for a 2-update run
    "sim": ["train.max_steps=2"], "uni_instruct": ["train.max_steps=2", "uni_instruct.ratio_warmup_steps=0"],
    "msd": ["train.max_steps=2", "msd.num_students=2", "msd.tsm_steps=0"],
    "progressive": ["progressive.start_steps=2", "progressive.target_steps=1",
                    "progressive.steps_per_round=1"],
    "guided": ["guided.start_steps=2", "guided.target_steps=1", "guided.steps_per_round=1",
               "guided.stage_one_steps=1"]}
FAMILY_METHODS = [("dit", m) for m in ("sim", "uni_instruct", "msd", "progressive")] + [
    (f, m) for f in ("sd3", "flux", "pixart") for m in ("sim", "uni_instruct", "progressive")] + [
    (f, "msd") for f in ("sd3", "pixart", "flux")] + [
    (f, "guided") for f in ("dit", "sd3", "pixart", "flux", "flux_schnell")]

PLAIN_LOAD = """
import sys, numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
text = getattr(pipe, "text_encoder", None) is not None
kw = {"prompt": ["a red cat", "a blue dog"]} if text else {"batch_size": 2, "class_labels": [1, 0]}
x = pipe(generator=torch.Generator().manual_seed(0), output_type="np", **kw).images
assert "distill" not in sys.modules
np.save(sys.argv[2], x)
print(type(pipe.scheduler).__name__)
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import random_png_folder

    root = tmp_path_factory.mktemp("transformer_data")
    for label in range(2):  # an imagefolder: class sub-folders become labels
        random_png_folder(root / "images" / str(label), 4, seed=label)
    (root / "prompts.txt").write_text("a red cat\na blue dog\na small house\na green tree\n")
    prompts = f"prompts:{root / 'prompts.txt'}"
    return {"dit": [f"data.spec={root / 'images'}"], "sd3": [f"data.spec={prompts}"],
            "flux": [f"data.spec={prompts}", "data.resolution=16"], "pixart": [f"data.spec={prompts}"],
            "flux_schnell": [f"data.spec={prompts}", "data.resolution=16"]}


@pytest.mark.parametrize("family,method", [pytest.param(f, m, marks=() if m == "sim" else pytest.mark.slow)
                                           for f, m in FAMILY_METHODS])
def test_a_transformer_teacher_distils_and_exports(folders, data, family, method, tmp_path):
    """``distill train configs/<method>_<family>.yaml`` on a tiny DiT / SD3 folder: 2 updates, the export
    samples the same images in plain diffusers (no distill) as in distill."""
    import json
    import os
    import subprocess
    import sys

    from distill import load_pipeline

    out = tmp_path / "run"
    extra = list(TRANSFORMER_METHODS[method])
    if (family, method) == ("dit", "msd"):  # the data hold classes 0 and 1 only: one student each
        (tmp_path / "part.json").write_text(json.dumps([0, 1] + [0] * 998))
        extra += ["msd.partition=file", f"msd.partition_file={tmp_path / 'part.json'}"]
    config = f"configs/{method}_{family}.yaml" if family != "flux_schnell" else "configs/guided_sd3.yaml"
    rc = main(["train", config, f"teacher.path={folders[family]}",
               f"output_dir={out}", *data[family], "train.batch_size=2",
               "data.teacher_sample_steps=2", "train.mixed_precision=no", "train.report_to=none",
               "train.progress_bar=false", "eval.enabled=false", *extra])
    assert rc == 0
    pipe = load_pipeline(str(out / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    kw = ({"prompt": ["a red cat", "a blue dog"]} if family != "dit"
          else {"batch_size": 2, "class_labels": [1, 0]})
    mine = pipe(generator=torch.Generator().manual_seed(0), output_type="np", **kw).images
    res = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out / "pipeline"), str(tmp_path / "p.npy")],
                         cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    family_of = {"DDPMScheduler": "vp", "DDIMScheduler": "vp", "FlowMatchEulerDiscreteScheduler": "flow"}
    assert family_of[res.stdout.strip()] == Teacher.from_pretrained(folders[family]).schedule.kind
    plain = np.load(tmp_path / "p.npy")
    assert plain.shape == (2, 16, 16, 3) and np.isfinite(plain).all() and plain.std() > 0.01
    np.testing.assert_array_equal(mine, plain)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_stock_pipeline_runs_a_one_step_flow_student(folders, data, family, tmp_path):
    """A one-step SIM student of a flow teacher is evaluated at s = 1 on pure noise, so the family's stock
    pipeline at one Euler step (x0 = z - v) gives its images: StableDiffusion3Pipeline without CFG,
    FluxPipeline with the student's embedded guidance."""
    from distill import load_pipeline

    out = tmp_path / "run"
    assert main(["train", f"configs/sim_{family}.yaml", f"teacher.path={folders[family]}",
                 f"output_dir={out}", *data[family], "train.batch_size=2", "train.max_steps=2",
                 "train.mixed_precision=no", "train.report_to=none", "train.progress_bar=false",
                 "eval.enabled=false"]) == 0
    ours = load_pipeline(str(out / "pipeline"))
    ours.set_progress_bar_config(disable=True)
    prompts = ["a red cat", "a blue dog"]
    mine = ours(prompt=prompts, generator=torch.Generator().manual_seed(0), output_type="pt").images
    parts = {k: v for k, v in ours.components.items() if k != "unet"}
    if family == "sd3":
        stock = diffusers.StableDiffusion3Pipeline(**{k: parts[k] for k in (
            "transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
            "text_encoder_3", "tokenizer_3", "scheduler")})
        kw = {"guidance_scale": 1.0}
    else:
        stock = diffusers.FluxPipeline(**{k: parts[k] for k in (
            "transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")})
        kw = {"height": 16, "width": 16}
    stock.set_progress_bar_config(disable=True)
    theirs = stock(prompt=prompts, num_inference_steps=1, generator=torch.Generator().manual_seed(0),
                   output_type="pt", **kw).images
    assert mine.shape == theirs.shape == (2, 3, 16, 16) and theirs.std() > 0.01
    assert (mine - theirs).abs().max() <= 1 / 255


def test_fid_generates_from_a_stock_dit_teacher_with_balanced_labels(folders):
    """`distill fid --compare DiT_FOLDER`'s teacher rows: the stock DiTPipeline at its default guidance,
    labels 0, 1, 2, ... (the pipeline has no batch_size), batch b seeded with seed + b."""
    from distill.eval.fid import generate, to_uint8

    pipe = diffusers.DiTPipeline.from_pretrained(folders["dit"])
    x = generate(pipe, 3, batch_size=3, seed=5, steps=2)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(class_labels=[0, 1, 2], num_inference_steps=2, generator=torch.Generator().manual_seed(5),
               output_type="pt").images
    assert torch.equal(x, to_uint8(ref))
    assert torch.equal(x, to_uint8(_ours(folders["dit"], 3, 2, 5, 4.0, class_labels=[0, 1, 2])))


@pytest.mark.parametrize("family,method", [("sd3", "sim"), ("flux", "sim"),
                                           pytest.param("sd3", "progressive", marks=pytest.mark.slow)])
def test_a_lora_student_of_sd3_or_flux_loads_into_the_teachers_own_pipeline(folders, data, family, method,
                                                                             tmp_path):
    """student.lora_rank on a flow transformer teacher: the adapter folder loads with ``load_lora_weights``
    into the teacher's own StableDiffusion3Pipeline / FluxPipeline, and that pipeline with the scheduler and
    call arguments the folder names samples what the merged student export samples."""
    from distill import load_pipeline

    out = tmp_path / "run"
    extra = (["train.max_steps=2", "sim.lr_fake=0.01"] if method == "sim" else
             ["progressive.start_steps=2", "progressive.target_steps=1", "progressive.steps_per_round=2"])
    assert main(["train", f"configs/{method}_{family}.yaml", f"teacher.path={folders[family]}",
                 f"output_dir={out}", *data[family], "train.batch_size=2", "data.teacher_sample_steps=2",
                 "student.lora_rank=4", "optim.lr=0.01", "train.mixed_precision=no", "train.report_to=none",
                 "train.progress_bar=false", "eval.enabled=false", *extra]) == 0
    lora = out / "lora"
    info = json.loads((lora / "distill_lora.json").read_text())
    assert info["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    cls = diffusers.StableDiffusion3Pipeline if family == "sd3" else diffusers.FluxPipeline
    stock = cls.from_pretrained(folders[family])
    stock.set_progress_bar_config(disable=True)
    stock.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(lora, subfolder="scheduler")
    size = {"height": 16, "width": 16}
    prompts = ["a red cat", "a blue dog"]

    def run():
        return stock(prompt=prompts, generator=torch.Generator().manual_seed(0), output_type="pt", **size,
                     **info["call_kwargs"]).images

    before = run()
    stock.load_lora_weights(lora)
    after = run()
    student = load_pipeline(str(out / "pipeline"))
    student.set_progress_bar_config(disable=True)
    mine = student(prompt=prompts, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert (after - before).abs().max() > 1e-3
    assert (after - mine).abs().max() < 2e-5


@pytest.mark.parametrize("steps,scale,negative", [(3, 4.5, None), (4, 1.0, None), (2, 3.0, "blurry")])
def test_pixart_teacher_sampling_equals_pixart_sigma_pipeline(folders, steps, scale, negative):
    """PixArt-Sigma: T5 with its attention mask (the negative prompt's too), DPM-Solver++, learned sigma."""
    pipe = diffusers.PixArtSigmaPipeline.from_pretrained(folders["pixart"])
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red cat", "dog"]
    ref = pipe(prompt=prompts, negative_prompt=negative or "", num_inference_steps=steps,
               guidance_scale=scale, clean_caption=False, use_resolution_binning=False,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    neg = {} if negative is None else {"negative_prompts": [negative] * 2}
    ours = _ours(folders["pixart"], 2, steps, 0, scale, prompts=prompts, **neg)
    assert ref.shape == ours.shape == (2, 3, 16, 16) and ref.std() > 0.05
    assert (ours - ref).abs().max() <= 1 / 255


def test_a_guided_weight_enters_flux_dev_as_its_guidance_scale(folders):
    """FLUX.1-dev takes the guidance scale itself as input: a guided student's weight w is the scale 1 + w
    (Meng et al.'s w; diffusers' guidance_scale), per example, in one pass."""
    teacher = Teacher.from_pretrained(folders["flux"])
    teacher.set_resolution(16)
    x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    cond = teacher.condition(prompts=["a red cat", "a blue dog"])
    by_w = teacher.denoiser.x0(x, 0.6, cond, w=torch.tensor([1.0, 3.0]))
    by_scale = teacher.denoiser.x0(x, 0.6, cond, guidance_scale=torch.tensor([2.0, 4.0]))
    assert torch.equal(by_w, by_scale)
    assert (by_w[1] - teacher.denoiser.x0(x, 0.6, cond, guidance_scale=2.0)[1]).abs().max() > 1e-4


def test_a_guided_flux_dev_student_runs_in_the_stock_flux_pipeline_at_any_scale(folders, data, tmp_path):
    """configs/guided_flux.yaml: no stage one (FLUX.1-dev's guidance input is its w-conditioning), LoRA rounds
    4 -> 2 steps; the adapter in the teacher's own FluxPipeline with the folder's scheduler and arguments, at
    guidance_scale s, samples what the distill export samples at s, and s changes the images."""
    from distill import load_pipeline

    out = tmp_path / "run"
    assert main(["train", "configs/guided_flux.yaml", f"teacher.path={folders['flux']}", f"output_dir={out}",
                 *data["flux"], "train.batch_size=2", "data.teacher_sample_steps=2", "optim.lr=0.01",
                 "guided.start_steps=4", "guided.target_steps=2", "guided.steps_per_round=2",
                 "train.mixed_precision=no", "train.report_to=none", "train.progress_bar=false",
                 "eval.enabled=false"]) == 0
    history = json.loads((out / "train_history.json").read_text())
    assert [h["student_steps"] for h in history if "student_steps" in h][:1] == [2]  # no stage-one round
    info = json.loads((out / "lora" / "distill_lora.json").read_text())
    assert info["call_kwargs"]["guidance_scale"] == 3.5 and info["call_kwargs"]["num_inference_steps"] == 2
    stock = diffusers.FluxPipeline.from_pretrained(folders["flux"])
    stock.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(out / "lora",
                                                                                  subfolder="scheduler")
    stock.load_lora_weights(out / "lora")
    stock.set_progress_bar_config(disable=True)
    student = load_pipeline(str(out / "pipeline"))
    student.set_progress_bar_config(disable=True)
    prompts = ["a red cat", "a blue dog"]
    images = {}
    for s in (2.0, 4.0):
        images[s] = student(prompt=prompts, guidance_scale=s, generator=torch.Generator().manual_seed(0),
                            output_type="pt").images
        theirs = stock(prompt=prompts, height=16, width=16, generator=torch.Generator().manual_seed(0),
                       output_type="pt", **{**info["call_kwargs"], "guidance_scale": s}).images
        assert images[s].shape == (2, 3, 16, 16) and (images[s] - theirs).abs().max() < 2e-5
    assert (images[2.0] - images[4.0]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["dit", "sd3", "flux"])
def test_hybrid_sampling_with_a_transformer_base(folders, data, family, tmp_path):
    """HybridPipeline.from_pipelines(stock DiT / SD3 / FLUX.1-dev teacher pipeline, its 2-step progressive
    student): with no base step it is the student; with every step on the base it is the teacher on the
    student's grid, no CFG (DiT: distill's DDIM on the trailing grid; SD3 / FLUX: the stock pipeline given the
    grid's unshifted sigmas; FLUX.1-dev at its embedded 3.5 and at 5.0)."""
    from distill import load_pipeline
    from distill.pipelines import HybridPipeline

    out = tmp_path / "run"
    assert main(["train", f"configs/progressive_{family}.yaml", f"teacher.path={folders[family]}",
                 f"output_dir={out}", *data[family], "train.batch_size=2", "data.teacher_sample_steps=2",
                 "progressive.start_steps=4", "progressive.target_steps=2", "progressive.steps_per_round=1",
                 "train.mixed_precision=no", "train.report_to=none", "train.progress_bar=false",
                 "eval.enabled=false"]) == 0
    student = load_pipeline(str(out / "pipeline"))
    cls = {"dit": diffusers.DiTPipeline, "sd3": diffusers.StableDiffusion3Pipeline,
           "flux": diffusers.FluxPipeline}[family]
    stock = cls.from_pretrained(folders[family])
    for p in (student, stock):
        p.set_progress_bar_config(disable=True)
    hybrid = HybridPipeline.from_pipelines(stock, student)
    hybrid.set_progress_bar_config(disable=True)
    kw = {"prompt": ["a red cat", "dog"]} if family != "dit" else {"batch_size": 2, "class_labels": [1, 0]}

    def run(pipe, **more):
        return pipe(generator=torch.Generator().manual_seed(0), output_type="pt", **kw, **more).images

    only_student = run(student)
    assert (run(hybrid, num_base_steps=0) - only_student).abs().max() < 1e-5
    assert run(hybrid, num_base_steps=1).shape == only_student.shape
    if family == "sd3":
        shift = stock.scheduler.config.shift
        unshifted = [s / (shift - (shift - 1) * s) for s in student.config.sigmas]
        ref = stock(prompt=kw["prompt"], sigmas=unshifted, num_inference_steps=2, guidance_scale=1.0,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images
    elif family == "flux":  # the dynamic shift exp(mu) of the student's 8 x 8 latents (16 tokens)
        teacher = Teacher.from_pretrained(folders["flux"])
        teacher.set_resolution(16)
        shift = teacher.schedule.shift
        unshifted = [s / (shift - (shift - 1) * s) for s in student.config.sigmas]
        for scale in (5.0, 3.5):  # (3.5 last: the default, compared below)
            ref = stock(prompt=kw["prompt"], sigmas=unshifted, num_inference_steps=2, guidance_scale=scale,
                        height=16, width=16, generator=torch.Generator().manual_seed(0),
                        output_type="pt").images
            assert (run(hybrid, num_base_steps=2, base_guidance_scale=scale) - ref).abs().max() < 1e-4
    else:
        ref = _ours(folders["dit"], 2, 2, 0, None, stock=False, class_labels=[1, 0])
    base_only = run(hybrid, num_base_steps=2)
    assert (base_only - ref).abs().max() < 1e-4 and (base_only - only_student).abs().max() > 0


@pytest.mark.parametrize("folder", ["dit", "pixart", "sd3"])
def test_the_guidance_input_of_a_transformer_starts_at_the_teacher(folders, folder):
    """GuidedTransformer2DModel: zero-initialised, it equals the wrapped transformer at every w; once its last
    layer is not zero, w moves the output (it reaches every time embedding: DiT's per-block embedders)."""
    from distill import backbones
    from distill.models import GuidedTransformer2DModel

    teacher = Teacher.from_pretrained(folders[folder])
    net = teacher.stored_network()  # a student's copy, in training mode
    assert all(m.dropout_prob == 0 for m in net.modules() if type(m).__name__ == "LabelEmbedding")
    guided = GuidedTransformer2DModel.from_transformer(net, 16)
    assert all(m.dropout_prob == 0 for m in guided.modules() if type(m).__name__ == "LabelEmbedding")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = (teacher.condition(class_labels=[1, 2]) if folder == "dit"
            else teacher.condition(prompts=["a red cat", "dog"]))
    t = torch.full((2,), 500.0)
    with torch.no_grad():
        plain = backbones.call(net, x, t, cond)
        for w in (0.0, 3.0):
            assert torch.equal(backbones.call(guided, x, t, cond, w=torch.full((2,), w)), plain)
        torch.nn.init.normal_(guided.guidance_embedding[-1].weight, std=0.1)
        moved = backbones.call(guided, x, t, cond, w=torch.full((2,), 3.0))
        assert (moved - plain).abs().max() > 1e-3
        # deterministic in training mode: DiT's own 10% label dropout is off in a student's copy
        assert torch.equal(backbones.call(guided, x, t, cond, w=torch.zeros(2)),
                           backbones.call(guided, x, t, cond, w=torch.zeros(2)))


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_a_lora_student_of_dit_or_pixart_writes_a_peft_adapter(folders, data, family, tmp_path):
    """DiTPipeline and PixArtSigmaPipeline have no LoRA loader: the adapter is peft's; injected into the
    teacher's own transformer it gives the merged student's output."""
    import peft
    import safetensors.torch

    from distill import load_pipeline

    out = tmp_path / "run"
    assert main(["train", f"configs/sim_{family}.yaml", f"teacher.path={folders[family]}",
                 f"output_dir={out}", *data[family], "train.batch_size=2", "train.max_steps=2",
                 "student.lora_rank=4", "optim.lr=0.01", "sim.lr_fake=0.01", "train.mixed_precision=no",
                 "train.report_to=none", "train.progress_bar=false", "eval.enabled=false"]) == 0
    lora = out / "lora"
    config = {k: v for k, v in json.loads((lora / "adapter_config.json").read_text()).items()
              if k != "peft_type"}
    teacher = Teacher.from_pretrained(folders[family])
    net = teacher.stored_network().eval()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = (teacher.condition(class_labels=[1, 0]) if family == "dit"
            else teacher.condition(prompts=["a red cat", "dog"]))
    from distill import backbones

    with torch.no_grad():
        before = backbones.call(net, x, torch.full((2,), 999.0), cond)
        peft.inject_adapter_in_model(peft.LoraConfig(**config), net)
        peft.set_peft_model_state_dict(net, safetensors.torch.load_file(lora / "adapter_model.safetensors"))
        after = backbones.call(net, x, torch.full((2,), 999.0), cond)
        merged = load_pipeline(str(out / "pipeline"))
        student = merged.generator if family == "dit" else merged.transformer
        mine = backbones.call(student, x, torch.full((2,), 999.0), cond)
    assert (after - before).abs().max() > 1e-3
    assert (after - mine).abs().max() < 1e-4


def test_the_stock_dit_pipeline_runs_a_few_step_dit_student(folders, data, tmp_path):
    """A progressive DiT student exports DDIM on the trailing grid (set_alpha_to_one, no clipping): the stock
    DiTPipeline given the student's transformer, VAE and scheduler samples its images at its step count
    (guidance_scale=1: the student has the teacher's guidance distilled in)."""
    from distill import load_pipeline

    out = tmp_path / "run"
    assert main(["train", "configs/progressive_dit.yaml", f"teacher.path={folders['dit']}",
                 f"output_dir={out}", *data["dit"], "train.batch_size=2", "progressive.start_steps=4",
                 "progressive.target_steps=2", "progressive.steps_per_round=1", "train.mixed_precision=no",
                 "train.report_to=none", "train.progress_bar=false", "eval.enabled=false"]) == 0
    student = load_pipeline(str(out / "pipeline"))
    student.set_progress_bar_config(disable=True)
    assert student.config.timesteps == [999, 499]
    mine = student(batch_size=2, class_labels=[1, 0], generator=torch.Generator().manual_seed(0),
                   output_type="pt").images
    stock = diffusers.DiTPipeline(transformer=student.unet, vae=student.vae, scheduler=student.scheduler)
    stock.set_progress_bar_config(disable=True)
    theirs = stock(class_labels=[1, 0], num_inference_steps=2, guidance_scale=1.0,
                   generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert theirs.std() > 0.05 and (mine - theirs).abs().max() <= 1 / 255

"""Stable-Diffusion-format text-to-image teachers: Condition, prompt encoding, CFG, latents, training with
every method and loading the exports with plain diffusers (tiny random pipelines built offline)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from conftest import clip_tokenizer, make_tiny_sd, random_png_folder

from distill import Condition, load_pipeline
from distill.backbones import network_kwargs
from distill.config import ConfigError, load_config
from distill.data import load_data
from distill.pipelines import TextToImagePipeline
from distill.teachers import Teacher
from distill.trainers import trainer_class

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a red cat", "a blue dog", "a small house by the sea"]


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sdxl") / "sdxl", sdxl=True)


def _diffusers_pipe(folder):
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------- Condition
def test_condition_batching_null_and_dropout():
    g = torch.Generator().manual_seed(0)
    emb, pooled = torch.randn(4, 3, 5, generator=g), torch.randn(4, 2, generator=g)
    null = Condition(embeds=torch.zeros(1, 3, 5), pooled=-torch.ones(1, 2), time_ids=torch.ones(1, 6))
    c = Condition(embeds=emb, pooled=pooled, time_ids=torch.ones(4, 6), null=null)
    assert c.kind == "text" and len(c) == 4
    sub = c[torch.tensor([2, 0])]
    torch.testing.assert_close(sub.embeds, emb[[2, 0]])
    assert sub.null is null  # a one-row null stays shared
    pair = c.with_cfg_pair()
    assert len(pair) == 8 and pair.null is None
    torch.testing.assert_close(pair.embeds[4:], torch.zeros(4, 3, 5))
    torch.testing.assert_close(pair.pooled[4:], -torch.ones(4, 2))
    mask = torch.tensor([True, False, True, False])
    d = c.drop(mask)
    torch.testing.assert_close(d.embeds[0], torch.zeros(3, 5))
    torch.testing.assert_close(d.embeds[1], emb[1])
    torch.testing.assert_close(d.pooled[2], -torch.ones(2))
    both = Condition.cat([c, c[torch.tensor([1])]])
    assert len(both) == 5 and both.null is null
    half = c.to(dtype=torch.bfloat16)
    assert half.embeds.dtype == torch.bfloat16 and half.null.embeds.dtype == torch.bfloat16
    labels = Condition(class_labels=torch.tensor([1, 2]), null=Condition(class_labels=torch.tensor([9])))
    assert labels.to(dtype=torch.bfloat16).class_labels.dtype == torch.long  # labels are not cast
    assert labels.null_like().class_labels.tolist() == [9, 9]
    assert labels.drop(torch.tensor([False, True])).class_labels.tolist() == [1, 9]
    with pytest.raises(ValueError, match="no null condition"):
        Condition(class_labels=torch.tensor([1])).null_like()
    unet = diffusers.UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
                                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                          norm_num_groups=4, cross_attention_dim=5, attention_head_dim=4)
    assert set(network_kwargs(unet, c)) == {"encoder_hidden_states"}  # no added conditioning on an SD1.5 UNet
    assert (network_kwargs(unet, None) == {}
            and network_kwargs(unet, labels) == {"class_labels": labels.class_labels})


# ---------------------------------------------------------------------- teacher
def test_prompts_encoded_like_diffusers_and_cached(tiny_sd_folder):
    folder = tiny_sd_folder / "sd"
    teacher = Teacher.from_pretrained(str(folder))
    pipe = _diffusers_pipe(folder)
    assert teacher.is_latent and teacher.sample_shape == [4, 8, 8] and teacher.image_shape == [3, 16, 16]
    cond = teacher.condition(prompts=PROMPTS)
    ref, neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=None)
    torch.testing.assert_close(cond.embeds, ref)
    torch.testing.assert_close(cond.null_like().embeds, neg)  # the null is the encoded empty prompt
    assert cond.embeds[0].abs().sum() > 0 and not torch.allclose(cond.embeds[0], cond.embeds[1])
    calls = []
    hook = teacher.text_encoders[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    again = teacher.condition(prompts=[PROMPTS[1], "a new prompt", PROMPTS[1]])
    hook.remove()
    assert calls == [1]  # only the one unseen prompt was encoded
    torch.testing.assert_close(again.embeds[0], cond.embeds[1])
    torch.testing.assert_close(again.embeds[2], cond.embeds[1])


def test_sdxl_prompts_pooled_and_time_ids_like_diffusers(sdxl_folder):
    teacher = Teacher.from_pretrained(str(sdxl_folder))
    pipe = _diffusers_pipe(sdxl_folder)
    cond = teacher.condition(prompts=PROMPTS[:2])
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS[:2], device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=True)
    torch.testing.assert_close(cond.embeds, emb)
    torch.testing.assert_close(cond.pooled, pooled)
    null = cond.null_like()  # force_zeros_for_empty_prompt: zeros, as diffusers
    torch.testing.assert_close(null.embeds, neg) and torch.testing.assert_close(null.pooled, neg_pooled)
    assert float(null.embeds.abs().sum()) == 0.0
    ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32,
                                 pipe.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(cond.time_ids, ids.expand(2, 6))
    x = torch.randn(2, 4, 8, 8)
    out = teacher.network_output(x, torch.tensor(0.5), cond)
    ref = pipe.unet(x, torch.full((2,), 0.5 * 999), encoder_hidden_states=emb,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": ids.expand(2, 6)}).sample
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("scale", [1.0, 3.0, 7.5])
def test_text_cfg_is_uncond_plus_scale_times_difference(tiny_sd_folder, scale):
    """Closed form: with the empty prompt as null, guided = uncond + s (cond - uncond), cond and uncond
    computed independently through diffusers' own encode_prompt and the UNet."""
    folder = tiny_sd_folder / "sd"
    teacher = Teacher.from_pretrained(str(folder))
    pipe = _diffusers_pipe(folder)
    emb, neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    ts = t * 999
    c = pipe.unet(x, ts.float(), encoder_hidden_states=emb).sample
    u = pipe.unet(x, ts.float(), encoder_hidden_states=neg).sample
    assert (c - u).abs().max() > 1e-3  # the prompt matters, so the check can fail
    out = teacher.network_output(x, t, teacher.condition(prompts=PROMPTS), guidance_scale=scale)
    torch.testing.assert_close(out, u + scale * (c - u), atol=1e-5, rtol=1e-5)
    # a negative prompt replaces the empty one as the null
    negc = teacher.condition(prompts=PROMPTS, negative_prompts=["blurry"] * 3)
    neg2 = pipe.encode_prompt(["blurry"] * 3, "cpu", 1, False)[0]
    u2 = pipe.unet(x, ts.float(), encoder_hidden_states=neg2).sample
    torch.testing.assert_close(teacher.network_output(x, t, negc, guidance_scale=scale),
                               u2 + scale * (c - u2), atol=1e-5, rtol=1e-5)


def test_latents_encode_decode_use_vae_scaling(tiny_sd_folder):
    teacher = Teacher.from_pretrained(str(tiny_sd_folder / "sd"))
    vae = teacher.vae
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(teacher.decode(z), vae.decode(z / vae.config.scaling_factor).sample)
    img = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean = vae.encode(img).latent_dist.mean
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    std = vae.encode(img).latent_dist.std
    torch.testing.assert_close(teacher.encode(img, generator=g),
                               (mean + std * noise) * vae.config.scaling_factor)


def test_teacher_pipeline_equals_diffusers_stable_diffusion_ddim(tiny_sd_folder):
    """The teacher run by TextToImagePipeline (N DDIM steps, CFG) = diffusers' StableDiffusionPipeline with
    DDIMScheduler(trailing, no clipping, alpha_1 = 1)."""
    folder = tiny_sd_folder / "sd"
    sd = _diffusers_pipe(folder)
    sd.scheduler = diffusers.DDIMScheduler.from_config(sd.scheduler.config, timestep_spacing="trailing",
                                                       clip_sample=False, set_alpha_to_one=True)
    ours = TextToImagePipeline(sd.unet, sd.vae, sd.text_encoder, sd.tokenizer, sd.scheduler,
                               num_inference_steps=4)
    ours.set_progress_bar_config(disable=True)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    # step counts that divide 1000: diffusers' DDIM steps to t - 1000 // N, which for N = 3 is 333, not the
    # next trailing grid point 332 (distill steps to the grid point it evaluates next)
    for steps, scale in ((4, 5.0), (5, 1.0)):
        for kind, tol in (("latent", 1e-6), ("np", 2e-3)):  # random tiny weights: |latents| ~ 60, decoded x30
            ref = sd(PROMPTS[:2], num_inference_steps=steps, guidance_scale=scale, latents=latents,
                     output_type=kind).images
            got = ours(PROMPTS[:2], num_inference_steps=steps, guidance_scale=scale, latents=latents,
                       output_type=kind).images
            np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0,
                                       atol=tol * float(np.abs(ref).max()))
            assert np.asarray(ref).std() > 0.01
    # a negative prompt, and precomputed embeddings, as diffusers takes them
    ref = sd(PROMPTS[:2], negative_prompt=["blurry", "dark"], num_inference_steps=4, guidance_scale=4.0,
             latents=latents, output_type="latent").images
    got = ours(PROMPTS[:2], negative_prompt=["blurry", "dark"], num_inference_steps=4, guidance_scale=4.0,
               latents=latents, output_type="latent").images
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))
    emb, neg = sd.encode_prompt(PROMPTS[:2], "cpu", 1, True, negative_prompt=["blurry", "dark"])
    got = ours(prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=4, guidance_scale=4.0,
               latents=latents, output_type="latent").images
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))
    plain = ours(PROMPTS[:2], num_inference_steps=4, guidance_scale=4.0, latents=latents,
                 output_type="latent").images
    assert (plain - ref).abs().max() > 1e-3  # the negative prompt mattered


# ---------------------------------------------------------------------- data
def test_prompt_files_and_caption_columns(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\n two \nthree\n")
    assert load_data(f"prompts:{tmp_path / 'p.txt'}").prompts == ["one", "two", "three"]
    (tmp_path / "p.csv").write_text("id,caption\n1,a cat\n2,\"a dog, running\"\n")
    assert load_data(f"prompts:{tmp_path / 'p.csv'}").prompts == ["a cat", "a dog, running"]
    (tmp_path / "p.jsonl").write_text('{"text": "x", "prompt": "first"}\n{"text": "y", "prompt": "second"}\n')
    assert load_data(f"prompts:{tmp_path / 'p.jsonl'}").prompts == ["first", "second"]
    assert load_data(f"prompts:{tmp_path / 'p.jsonl'}", caption_column="text").prompts == ["x", "y"]
    (tmp_path / "bad.csv").write_text("id,title\n1,a\n")
    with pytest.raises(ValueError, match="prompt, caption or text.*caption_column"):
        load_data(f"prompts:{tmp_path / 'bad.csv'}")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_data("prompts:nope.txt")
    # an image folder with captions in metadata.jsonl
    from PIL import Image

    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 24, 3), 40 * i, dtype=np.uint8)).save(img_dir / f"{i}.png")
    (img_dir / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{i}.png", "caption": f"grey {i}"}) + "\n" for i in range(3)))
    ds = load_data(str(img_dir), resolution=16)
    item = ds[1]
    assert ds.has_prompts and item["prompt"] == "grey 1" and item["x"].shape == (3, 16, 16)


def test_text_teacher_refusals(tiny_sd_folder, tmp_path):
    prompts = f"prompts:{tiny_sd_folder / 'prompts.txt'}"
    fast = ["train.progress_bar=false", "train.report_to=none", f"output_dir={tmp_path}"]
    cfg = load_config("configs/teacher_digits.yaml", fast + [f"data.spec={prompts}"])
    with pytest.raises(ConfigError, match="text-to-image teacher is out of scope"):
        trainer_class("teacher")(cfg).train()
    cfg = load_config("configs/sim_sd15.yaml", fast + [f"teacher.path={tiny_sd_folder / 'sd'}",
                                                       "data.spec=sklearn:digits",
                                                       "train.mixed_precision=no"])
    with pytest.raises(ConfigError, match="has no prompts"):
        trainer_class("sim")(cfg).train()
    cfg = load_config("configs/sim_digits.yaml", fast + [f"data.spec={prompts}"])
    with pytest.raises(ConfigError, match="prompts only"):
        trainer_class("sim")(cfg).train()


# ---------------------------------------------------------------------- every method, exported and reloaded
METHOD_OVERRIDES = {
    "sim": ["train.max_steps=2"],
    "uni_instruct": ["train.max_steps=2"],
    "progressive": ["progressive.start_steps=2", "progressive.target_steps=1",
                    "progressive.steps_per_round=1"],
    "guided": ["guided.start_steps=2", "guided.target_steps=1", "guided.steps_per_round=1",
               "guided.stage_one_steps=1"],
}

PLAIN_LOAD = """
import json, os, sys, numpy as np, torch
from diffusers import DiffusionPipeline
index = json.load(open(os.path.join(sys.argv[1], "model_index.json")))
extra = ({"custom_pipeline": os.path.join(sys.argv[1], index["_distill_pipeline"][0] + ".py")}
         if "_distill_pipeline" in index else {})  # a stock layout: distill's pipeline as a custom pipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True, **extra)
pipe.set_progress_bar_config(disable=True)
out = pipe(prompt=["a red cat", "a blue dog"], generator=torch.Generator().manual_seed(0),
           output_type="np").images
assert "distill" not in sys.modules
np.save(sys.argv[2], out)
print(type(pipe).__name__)
"""


@pytest.mark.parametrize("method", ["sim", "uni_instruct", "progressive", "guided"])
def test_every_method_trains_on_a_text_teacher_and_exports_a_plain_diffusers_pipeline(
        tiny_sd_folder, tmp_path, method):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "distill", "train", f"configs/{method}_sd15.yaml",
           f"teacher.path={tiny_sd_folder / 'sd'}", f"data.spec=prompts:{tiny_sd_folder / 'prompts.txt'}",
           "train.batch_size=2", "data.teacher_sample_steps=2", "train.report_to=none",
           "train.progress_bar=false", f"output_dir={out}", *METHOD_OVERRIDES[method]]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    folder = out / "pipeline"
    for f in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / f).is_dir()
    assert not list(folder.rglob("*.bin")) and list((folder / "unet").glob("*.safetensors"))
    res = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(folder), str(tmp_path / "plain.npy")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("TextToImagePipeline")
    plain = np.load(tmp_path / "plain.npy")
    pipe = load_pipeline(str(folder))
    pipe.set_progress_bar_config(disable=True)
    mine = pipe(prompt=["a red cat", "a blue dog"], generator=torch.Generator().manual_seed(0),
                output_type="np").images
    assert plain.shape == (2, 16, 16, 3) and plain.std() > 0.01
    np.testing.assert_array_equal(mine, plain)  # same seed, same images, with or without distill
    # the CLI's sample grid takes prompts for a text pipeline, and says so when they are missing
    if method == "sim":
        from distill.cli import main

        assert main(["sample", str(folder), "--num-images", "4", "--prompt", "a cat", "--prompt", "a dog",
                     "--out", str(tmp_path / "grid.png")]) == 0 and (tmp_path / "grid.png").is_file()
        assert main(["sample", str(folder), "--num-images", "4", "--out", str(tmp_path / "g2.png")]) == 2
    cfg = pipe.config
    if method in ("sim", "uni_instruct"):
        assert cfg.generator_timestep == 999
    else:
        assert cfg.generator_timestep is None and cfg.num_inference_steps == 1
    # the w input is UNet2DConditionModel's time_cond_proj_dim, and it changes the output
    if method == "guided":
        assert pipe.unet.config.time_cond_proj_dim == 256 and cfg.guidance_conditioned
        a = pipe(prompt=["a red cat"], guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
        b = pipe(prompt=["a red cat"], guidance_scale=15.0, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
        assert np.abs(a - b).max() > 0


# ---------------------------------------------------------------------- FID and CLIP score for text-to-image
def _tiny_clip(folder: Path):
    import transformers

    tokenizer = clip_tokenizer(folder.parent / "clip-tok-src", 16)
    torch.manual_seed(0)
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=16, patch_size=8)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                           projection_dim=8))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 16},
                                    crop_size={"height": 16, "width": 16}).save_pretrained(
folder)
    return model


def test_fid_command_for_a_text_student_with_teacher_compare_and_clip_score(tiny_sd_folder, tmp_path):
    """`distill fid PIPELINE --prompts FILE --reference IMAGES --compare TEACHER`: the student and the SD
    teacher (at two step counts, two guidance scales) in one report; the CLIP score equals transformers' own
    CLIPModel forward (logits_per_image / logit_scale) on the same images."""

    from distill.cli import main

    out = tmp_path / "run"
    cfg = load_config("configs/sim_sd15.yaml", [f"teacher.path={tiny_sd_folder / 'sd'}", f"output_dir={out}",
                                                f"data.spec=prompts:{tiny_sd_folder / 'prompts.txt'}",
                                                "train.max_steps=1", "train.batch_size=2",
                                                "train.report_to=none", "train.progress_bar=false",
                                                "train.mixed_precision=no"])
    trainer_class("sim")(cfg).train()
    ref = random_png_folder(tmp_path / "ref", 12)
    clip_dir = tmp_path / "clip"
    clip = _tiny_clip(clip_dir)
    rc = main(["fid", str(out / "pipeline"), "--prompts", str(tiny_sd_folder / "prompts.txt"), "--reference",
               str(ref), "--compare", str(tiny_sd_folder / "sd"), "--steps", "1,2", "--guidance-scales",
               "1,3", "--num-samples", "6", "--batch-size", "3", "--metrics", "fid", "--clip-model",
               str(clip_dir), "--out", str(tmp_path / "report")])
    assert rc == 0
    report = json.loads((tmp_path / "report" / "fid_report.json").read_text())
    rows = {(r["model"], r["steps"]): r for r in report["results"]}
    assert ("model", 1) in rows  # the one-step student, once (no guidance scale for a one-step student)
    assert {("teacher-s1", 1), ("teacher-s1", 2), ("teacher-s3", 1), ("teacher-s3", 2)} <= set(rows)
    assert rows[("teacher-s3", 2)]["nfe"] == 4  # classifier-free guidance: two evaluations per step
    assert all(np.isfinite(r["fid"]) for r in report["results"])
    assert report["num_prompts"] == 4 and "CLIP" in (tmp_path / "report" / "fid_report.md").read_text()
    # CLIP score against transformers' own forward on the student's samples (sample i <-> prompt i mod 4)
    import transformers

    from distill.data import read_prompts
    from distill.eval.fid import generate

    pipe = load_pipeline(str(out / "pipeline"))
    prompts = read_prompts(str(tiny_sd_folder / "prompts.txt"))
    images = generate(pipe, 6, 3, 0, prompts=prompts)
    proc = transformers.CLIPImageProcessor.from_pretrained(clip_dir)
    tok = transformers.AutoTokenizer.from_pretrained(clip_dir)
    texts = [prompts[i % 4] for i in range(6)]
    with torch.no_grad():
        o = clip(**tok(texts, padding=True, truncation=True, return_tensors="pt"),
                 pixel_values=proc(images=list(images.permute(0, 2, 3, 1).numpy()),
                                   return_tensors="pt").pixel_values)
        expected = float((100 * (o.logits_per_image.diagonal() / clip.logit_scale.exp()).clamp_min(0)).mean())
    assert rows[("model", 1)]["clip_score"] == pytest.approx(expected, rel=1e-4)


# -------------------------------------------------------- SDXL, v-prediction, image+caption data, dtypes
def _train(args, cwd=REPO):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "distill", "train", *args, "train.report_to=none",
                          "train.progress_bar=false"], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def test_sdxl_v_prediction_teacher_trains_and_exports_both_text_encoders(tmp_path):
    teacher = make_tiny_sd(tmp_path / "sdxl_v", sdxl=True, prediction_type="v_prediction")
    (tmp_path / "p.txt").write_text("a red cat\na blue dog\n")
    _train(["configs/sim_sd15.yaml", f"teacher.path={teacher}", f"data.spec=prompts:{tmp_path / 'p.txt'}",
            "train.max_steps=2", "train.batch_size=2", f"output_dir={tmp_path / 'run'}"])
    folder = tmp_path / "run" / "pipeline"
    assert (folder / "text_encoder_2").is_dir() and (folder / "tokenizer_2").is_dir()
    res = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(folder), str(tmp_path / "plain.npy")],
                         cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    pipe = load_pipeline(str(folder))
    pipe.set_progress_bar_config(disable=True)
    assert (pipe.scheduler.config.prediction_type == "v_prediction"
            and pipe.config.force_zeros_for_empty_prompt)
    mine = pipe(prompt=["a red cat", "a blue dog"], generator=torch.Generator().manual_seed(0),
                output_type="np").images
    np.testing.assert_array_equal(mine, np.load(tmp_path / "plain.npy"))


def test_captioned_images_are_encoded_by_the_vae_and_exports_keep_the_stored_precision(
        tiny_sd_folder, tmp_path):
    """Image+caption data through a latent teacher (progressive, bf16): the exported VAE and text encoder are
    the teacher's own fp32 files, not the bf16 copies used for training."""
    from PIL import Image
    from safetensors.torch import load_file

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"noise picture {i}"}))
    (imgs / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    teacher = tiny_sd_folder / "sd"
    _train(["configs/progressive_sd15.yaml", f"teacher.path={teacher}", f"data.spec={imgs}",
            "train.batch_size=2", "progressive.start_steps=2", "progressive.target_steps=1",
            "progressive.steps_per_round=1", f"output_dir={tmp_path / 'run'}", "eval.enabled=true",
            "eval.teacher_steps=[1,2]", "eval.num_samples=4", "eval.batch_size=2", "eval.metrics=[fid]"])
    report = json.loads((tmp_path / "run" / "report" / "fid_report.json").read_text())
    rows = {(r["model"], r["steps"]): r for r in report["results"]}
    assert set(rows) == {("student", 1), ("teacher", 1), ("teacher", 2)}  # the images are the reference
    # the CFG teacher
    assert rows[("teacher", 2)]["guidance_scale"] == 7.5 and rows[("teacher", 2)]["nfe"] == 4
    folder = tmp_path / "run" / "pipeline"
    for part in ("vae", "text_encoder"):
        ours = load_file(next((folder / part).glob("*.safetensors")))
        ref = load_file(next((teacher / part).glob("*.safetensors")))
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
        assert all(v.dtype == torch.float32 for v in ours.values())
    unet = load_file(next((folder / "unet").glob("*.safetensors")))
    assert all(v.dtype == torch.float32 for v in unet.values())  # fp32 student weights


def test_bf16_training_loads_frozen_parts_in_bf16_and_the_student_in_fp32(tiny_sd_folder, tmp_path):
    from distill.engine import build_network, load_teacher

    cfg = load_config("configs/sim_sd15.yaml",
                      [f"teacher.path={tiny_sd_folder / 'sd'}", f"output_dir={tmp_path}"])
    assert cfg.train.mixed_precision == "bf16"
    teacher = load_teacher(cfg, "cpu")
    assert teacher.model.dtype == teacher.vae.dtype == teacher.text_encoders[0].dtype == torch.bfloat16
    assert teacher.condition(prompts=["a cat"]).embeds.dtype == torch.bfloat16
    student = build_network(cfg, teacher, teacher.sample_shape, 0)
    assert student.dtype == torch.float32 and all(p.requires_grad for p in student.parameters())
    x = torch.randn(2, 4, 8, 8)
    out = teacher.predict_x0(x, torch.tensor(0.5), teacher.condition(prompts=["a cat", "a dog"]),
                             guidance_scale=2.0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ---------------------------------------------------------------------- hybrid sampling with a text teacher
def test_text_hybrid_base_then_student(tiny_sd_folder, tmp_path):
    from distill import HybridPipeline, export_pipeline

    folder = tiny_sd_folder / "sd"
    sd = _diffusers_pipe(folder)
    student_unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    with torch.no_grad():  # a different network than the base, so the two are told apart
        for p in student_unet.parameters():
            p.mul_(0.9)
    sched = diffusers.DDIMScheduler.from_config(sd.scheduler.config, timestep_spacing="trailing",
                                                clip_sample=False, set_alpha_to_one=True)
    student = TextToImagePipeline(student_unet, sd.vae, sd.text_encoder, sd.tokenizer, sched,
                                  num_inference_steps=4)
    teacher = TextToImagePipeline(sd.unet, sd.vae, sd.text_encoder, sd.tokenizer, sched,
                                  num_inference_steps=4)
    hybrid = HybridPipeline.from_pipelines(sd, student, num_base_steps=1)
    for p in (student, teacher, hybrid):
        p.set_progress_bar_config(disable=True)

    def run(pipe, **kw):
        return pipe(prompt=PROMPTS[:2], generator=torch.Generator().manual_seed(0), output_type="np",
                    **kw).images

    np.testing.assert_array_equal(run(hybrid, num_base_steps=0), run(student))
    np.testing.assert_array_equal(run(hybrid, num_base_steps=4), run(teacher))
    np.testing.assert_array_equal(run(hybrid, num_base_steps=4, base_guidance_scale=3.0),
                                  run(teacher, guidance_scale=3.0))
    mixed = run(hybrid)
    assert np.abs(mixed - run(student)).max() > 1e-4 and np.abs(mixed - run(teacher)).max() > 1e-4
    traj = hybrid(prompt=PROMPTS[:2], generator=torch.Generator().manual_seed(0), output_type="np",
                  return_trajectory=True).trajectory
    assert len(traj) == 4 and traj[0].shape == (2, 16, 16, 3)
    path = export_pipeline(hybrid, tmp_path / "hybrid")
    again = load_pipeline(str(path))
    again.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(again), mixed)


@pytest.mark.parametrize("sdxl", [False, True])
def test_the_stock_sd_pipelines_load_one_and_four_step_students_without_remote_code(
        tiny_sd_folder, sdxl_folder, sdxl, tmp_path):
    """A one-step SIM student and a 4-step progressive student of an SD / SDXL teacher export a folder that
    the stock StableDiffusion(XL)Pipeline loads (no trust_remote_code) and, with the call arguments the folder
    and its model card give, samples distill's images for the same seed; distill's own pipeline loads from the
    same folder (and without distill, as a custom pipeline)."""
    teacher = sdxl_folder if sdxl else tiny_sd_folder / "sd"
    stock_cls = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
    common = [f"teacher.path={teacher}", f"data.spec=prompts:{tiny_sd_folder / 'prompts.txt'}",
              "train.batch_size=2", "data.teacher_sample_steps=2", "train.mixed_precision=no",
              "optim.lr=0.001"]
    runs = {1: ["configs/sim_sd15.yaml", "train.max_steps=2", "sim.generator_timestep=800"],
            4: ["configs/progressive_sd15.yaml", "progressive.start_steps=8", "progressive.target_steps=4",
                "progressive.steps_per_round=2"]}
    for steps, args in runs.items():
        out = tmp_path / f"run{steps}"
        _train([*args, *common, f"output_dir={out}"])
        folder = out / "pipeline"
        index = json.loads((folder / "model_index.json").read_text())
        call = index["_stock_call_kwargs"]
        assert index["_class_name"] == stock_cls.__name__
        assert call == ({"timesteps": [800], "guidance_scale": 1.0} if steps == 1
                        else {"num_inference_steps": 4, "guidance_scale": 1.0})
        card = (folder / "README.md").read_text()
        assert f"{stock_cls.__name__}.from_pretrained('PATH')" in card and "custom_pipeline=" in card
        stock = stock_cls.from_pretrained(folder)
        stock.set_progress_bar_config(disable=True)
        theirs = stock(prompt=PROMPTS[:2], generator=torch.Generator().manual_seed(0), output_type="np",
                       **call).images
        ours = load_pipeline(str(folder))
        ours.set_progress_bar_config(disable=True)
        assert type(ours).__name__ == "TextToImagePipeline"
        mine = ours(prompt=PROMPTS[:2], generator=torch.Generator().manual_seed(0), output_type="np").images
        assert theirs.shape == mine.shape and theirs.std() > 0.01
        assert np.abs(theirs - mine).max() < 1e-4, (steps, np.abs(theirs - mine).max())
        res = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(folder), str(tmp_path / "plain.npy")],
                             cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0 and res.stdout.strip().endswith("TextToImagePipeline"), res.stderr[-3000:]
        np.testing.assert_array_equal(np.load(tmp_path / "plain.npy"), ours(
            prompt=["a red cat", "a blue dog"], generator=torch.Generator().manual_seed(0),
            output_type="np").images)


def test_a_force_upcast_vae_held_in_fp16_decodes_in_fp32():
    """SDXL's VAE overflows in fp16 and asks for ``force_upcast``: held in fp16 it decodes in fp32 (exactly
    the images of its weights in fp32) and stays in fp16 afterwards; a VAE without the flag decodes in its
    own dtype."""
    import copy

    from distill.pipelines.one_step import latents_to_images

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4,
                                  force_upcast=True).eval()
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref = latents_to_images(copy.deepcopy(vae).half().float(), z)  # the fp16 weights, in fp32
        half = copy.deepcopy(vae).half()
        out = latents_to_images(half, z)
        assert out.dtype == torch.float32 and torch.equal(out, ref) and half.dtype == torch.float16
        half.register_to_config(force_upcast=False)
        low = latents_to_images(half, z)
    assert low.dtype == torch.float16 and (low.float() - ref).abs().max() > 1e-4

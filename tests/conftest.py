import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import diffusers  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

diffusers.utils.logging.disable_progress_bar()
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps one state per process and refuses a second mixed precision in it; a test that runs
    bf16 must not decide the precision of the tests after it."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def tiny_unet():
    def make(sample_size=8, in_channels=1, num_class_embeds=None, seed=0):
        torch.manual_seed(seed)
        return diffusers.UNet2DModel(
            sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
            block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            num_class_embeds=num_class_embeds)
    return make


def random_png_folder(folder, n: int, size: int = 16, seed: int = 0):
    """``n`` random RGB PNGs of ``size`` x ``size`` (a stand-in reference image set)."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def clip_tokenizer(folder, model_max_length: int):
    """A CLIPTokenizer from a vocab.json / merges.txt written here (letters and end-of-word letters; no
    merges)."""
    import json
    from pathlib import Path

    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["<|startoftext|>", "<|endoftext|>"] + list(letters) + [c + "</w>" for c in letters]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": model_max_length}))
    return transformers.CLIPTokenizer.from_pretrained(folder)


def make_tiny_sd(folder, sdxl: bool = False, prediction_type: str = "epsilon", seed: int = 0,
                 **unet_overrides):
    """A tiny random Stable-Diffusion-format pipeline folder (SD 1.5 layout, or SDXL's with two text
    encoders), built offline: UNet2DConditionModel (8x8 latents), AutoencoderKL (x2 -> 16x16 images), CLIP
    text model(s) and a CLIP tokenizer whose vocab.json / merges.txt are written here."""
    from pathlib import Path

    import transformers

    folder = Path(folder)
    tokenizer = clip_tokenizer(folder.parent / (folder.name + "-tokenizer-src"), 16)
    vocab_size = len(tokenizer)
    torch.manual_seed(seed)

    def text_config(**kw):
        return transformers.CLIPTextConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=2, num_attention_heads=2,
                                           max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                           pad_token_id=1, **kw)

    unet_kw = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                   layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   norm_num_groups=8, up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                   attention_head_dim=4)
    unet_kw.update(unet_overrides)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                  latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                                  norm_num_groups=8, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
                                  scaling_factor=0.5)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        prediction_type=prediction_type, clip_sample=False,
                                        set_alpha_to_one=False, steps_offset=1)
    if not sdxl:
        unet = diffusers.UNet2DConditionModel(cross_attention_dim=16, **unet_kw)
        pipe = diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=transformers.CLIPTextModel(
            text_config()), tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                                 feature_extractor=None,
            requires_safety_checker=False)
    else:
        unet = diffusers.UNet2DConditionModel(cross_attention_dim=32, addition_embed_type="text_time",
                                              addition_time_embed_dim=4,
                                              projection_class_embeddings_input_dim=16 + 6 * 4, **unet_kw)
        pipe = diffusers.StableDiffusionXLPipeline(
            unet=unet, vae=vae, text_encoder=transformers.CLIPTextModel(text_config()), tokenizer=tokenizer,
            text_encoder_2=transformers.CLIPTextModelWithProjection(text_config(projection_dim=16)),
            tokenizer_2=tokenizer, scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    """A saved tiny SD-1.5-format pipeline and a prompt file next to it."""
    root = tmp_path_factory.mktemp("tiny_sd")
    make_tiny_sd(root / "sd")
    (root / "prompts.txt").write_text("a red cat\na blue dog\n\na small house by the sea\na red cat\n")
    return root


def t5_tokenizer(folder):
    """A T5 tokenizer from a ``tokenizers`` Unigram model written here (letters, word-initial letters, EOS
    appended as T5's)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -1.0) for c in letters]
             + [("\u2581" + c, -1.5) for c in letters])
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = transformers.T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", extra_ids=0)
    fast.save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def tiny_latent_vae(latent_channels: int = 4, **kw):
    """AutoencoderKL, x2: 8x8 latents <-> 16x16 images."""
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                   latent_channels=latent_channels,
                                   down_block_types=("DownEncoderBlock2D",) * 2, norm_num_groups=8,
                                   up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16, **kw)


def make_tiny_dit(folder, scheduler=None, seed: int = 0, hub_class_name: bool = True):
    """A tiny random DiTPipeline folder (facebook/DiT-XL-2-256's layout): a class-conditional
    DiTTransformer2DModel over 8x8x4 latents with learned sigma (8 output channels) and 1000 classes (the
    stock pipeline's null class is 1000), an AutoencoderKL and a DDIMScheduler on DiT's linear betas.
    ``hub_class_name``: model_index names the transformer ``Transformer2DModel``, as the Hub folder does."""
    import json
    from pathlib import Path

    folder = Path(folder)
    torch.manual_seed(seed)
    net = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                          out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                          num_embeds_ada_norm=1000)
    scheduler = scheduler or diffusers.DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                                                     clip_sample=False)
    pipe = diffusers.DiTPipeline(transformer=net, vae=tiny_latent_vae(scaling_factor=0.5),
                                 scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)
    if hub_class_name:
        index = json.loads((folder / "model_index.json").read_text())
        index["transformer"] = ["diffusers", "Transformer2DModel"]
        (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def make_tiny_sd3(folder, t5: bool = True, seed: int = 0, **scheduler_kw):
    """A tiny random StableDiffusion3Pipeline folder: SD3Transformer2DModel over 8x8x4 latents, CLIP-L /
    CLIP-G stand-ins (CLIPTextModelWithProjection, width 16, projection 16), an optional T5 encoder (width
    32 = joint_attention_dim), an AutoencoderKL with SD3's shift factor and a FlowMatchEulerDiscreteScheduler
    (default shift 3.0, SD3's)."""
    from pathlib import Path

    import transformers

    folder = Path(folder)
    clip_tok = clip_tokenizer(folder.parent / (folder.name + "-tokenizer-src"), 16)
    torch.manual_seed(seed)

    def clip():
        return transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
            projection_dim=16))

    net = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4,
                                          num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                          joint_attention_dim=32, caption_projection_dim=16,
                                          pooled_projection_dim=32, pos_embed_max_size=16)
    parts = dict(transformer=net, vae=tiny_latent_vae(scaling_factor=0.5, shift_factor=0.1),
                 text_encoder=clip(), tokenizer=clip_tok, text_encoder_2=clip(), tokenizer_2=clip_tok,
                 text_encoder_3=None, tokenizer_3=None,
                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**{"shift": 3.0, **scheduler_kw}))
    if t5:
        t5_tok = t5_tokenizer(folder.parent / (folder.name + "-t5-src"))
        parts["text_encoder_3"] = transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4))
        parts["tokenizer_3"] = t5_tok
    diffusers.StableDiffusion3Pipeline(**parts).save_pretrained(folder, safe_serialization=True)
    return folder


def make_tiny_flux(folder, guidance_embeds: bool = True, seed: int = 0):
    """A tiny random FluxPipeline folder (FLUX.1-dev's layout; ``guidance_embeds=False``: FLUX.1-schnell's):
    FluxTransformer2DModel over 2x2 patches of 4-channel latents (in_channels 16), CLIP-L stand-in (pooled
    width 16 = pooled_projection_dim), T5 (width 32 = joint_attention_dim), an AutoencoderKL with a shift
    factor, and the dynamically shifted FlowMatchEulerDiscreteScheduler of FLUX.1."""
    from pathlib import Path

    import transformers

    folder = Path(folder)
    clip_tok = clip_tokenizer(folder.parent / (folder.name + "-tokenizer-src"), 16)
    t5_tok = t5_tokenizer(folder.parent / (folder.name + "-t5-src"))
    torch.manual_seed(seed)
    net = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8,
                                                           d_ff=37, num_layers=2, num_heads=4))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=4,
        max_image_seq_len=64)
    diffusers.FluxPipeline(transformer=net, vae=tiny_latent_vae(scaling_factor=0.5, shift_factor=0.1),
                           text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
                           scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
    return folder


def make_tiny_pixart(folder, seed: int = 0):
    """A tiny random PixArtSigmaPipeline folder: PixArtTransformer2DModel over 8x8x4 latents with learned
    sigma, T5 text (width 32 = caption_channels) with its attention mask, an AutoencoderKL and
    PixArt's DPMSolverMultistepScheduler."""
    from pathlib import Path

    import transformers

    folder = Path(folder)
    t5_tok = t5_tokenizer(folder.parent / (folder.name + "-t5-src"))
    torch.manual_seed(seed)
    net = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                             out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                             cross_attention_dim=16, caption_channels=32,
                                             use_additional_conditions=False)
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8,
                                                           d_ff=37, num_layers=2, num_heads=4))
    diffusers.PixArtSigmaPipeline(tokenizer=t5_tok, text_encoder=t5, vae=tiny_latent_vae(scaling_factor=0.5),
                                  transformer=net, scheduler=diffusers.DPMSolverMultistepScheduler()
                                  ).save_pretrained(folder, safe_serialization=True)
    return folder

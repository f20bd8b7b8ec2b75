import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import diffusers  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

diffusers.utils.logging.disable_progress_bar()
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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

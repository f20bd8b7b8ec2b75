"""The README's memory table: `distill estimate-memory` for SIM (configs/sim_sd15.yaml: bf16, teacher CFG,
batch 1 per GPU) on SD 1.5 and SDXL at 512 and 1024 px, and (configs/sim_dit.yaml, sim_sd3.yaml,
sim_flux.yaml at batch 1) on DiT-XL/2 (256 px), SD3.5-medium and FLUX.1-dev at 512 and 1024 px, full
networks and LoRA rank 64, with and without gradient checkpointing. The teachers' config files ship in
benchmarks/model_configs (nothing is downloaded); their parameter counts are checked against the published
figures in tests/test_memory.py.

    python benchmarks/memory_table.py
"""

import json
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from distill.config import load_config
from distill.memory import estimate

HERE = Path(__file__).parent
CLIP_L = ("clip_l_text.json", "CLIPTextModelWithProjection")
CLIP_G = ("clip_bigg_text.json", "CLIPTextModelWithProjection")
T5 = ("t5_xxl_encoder.json", "T5EncoderModel")
MODELS = {  # name: (config, network (component, class), VAE, text encoders, resolutions)
    "SD 1.5": ("sim_sd15", ("unet", "sd15_unet.json", "UNet2DConditionModel"), "vae.json",
               [("text_encoder", "clip_l_text.json", "CLIPTextModel")], (512, 1024)),
    "SDXL": ("sim_sd15", ("unet", "sdxl_unet.json", "UNet2DConditionModel"), "vae.json",
             [("text_encoder", "clip_l_text.json", "CLIPTextModel"), ("text_encoder_2", *CLIP_G)],
             (512, 1024)),
    "DiT-XL/2": ("sim_dit", ("transformer", "dit_xl2_256.json", "DiTTransformer2DModel"), "vae.json", [],
                 (256,)),
    "SD3.5-medium": ("sim_sd3", ("transformer", "sd35_medium_transformer.json", "SD3Transformer2DModel"),
                     "vae_16ch.json", [("text_encoder", *CLIP_L), ("text_encoder_2", *CLIP_G),
                                       ("text_encoder_3", *T5)], (512, 1024)),
    "FLUX.1-dev": ("sim_flux", ("transformer", "flux1_dev_transformer.json", "FluxTransformer2DModel"),
                   "vae_16ch.json", [("text_encoder", "clip_l_text.json", "CLIPTextModel"),
                                     ("text_encoder_2", *T5)], (512, 1024)),
}


def config_folder(root: Path, name: str, network, vae: str, encoders) -> Path:
    """A pipeline folder holding config files only (what estimate-memory reads)."""
    folder = root / name.replace("/", "-").replace(" ", "")
    sub, src, cls = network
    index = {sub: ["diffusers", cls], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "DDIMScheduler"]}
    for part, config in ((sub, src), ("vae", vae)):
        (folder / part).mkdir(parents=True)
        shutil.copy(HERE / "model_configs" / config, folder / part / "config.json")
    for sub, src, cls in encoders:
        (folder / sub).mkdir(parents=True)
        shutil.copy(HERE / "model_configs" / src, folder / sub / "config.json")
        index[sub] = ["transformers", cls]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def main() -> None:
    rows = ["| teacher | px | full, checkpointing | full | LoRA 64, checkpointing | LoRA 64 |",
            "|---|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, (config, network, vae, encoders, sizes) in MODELS.items():
            folder = config_folder(Path(tmp), name, network, vae, encoders)
            for px in sizes:
                cells = []
                for lora in ([], ["student.lora_rank=64"]):
                    cfg = load_config(HERE.parent / "configs" / f"{config}.yaml", [
                        f"teacher.path={folder}", f"data.resolution={px}", "train.batch_size=1",
                        "sim.gradient_checkpointing=true", *lora])
                    est = estimate(cfg)
                    for checkpointing in (True, False):  # the same passes, kept or recomputed
                        cells.append(f"{replace(est, checkpointing=checkpointing).peak / 2**30:.1f}")
                rows.append(f"| {name} | {px} | " + " | ".join(cells) + " |")
                print(rows[-1], file=sys.stderr)
    print("\n".join(rows))


if __name__ == "__main__":
    main()

"""The README's memory table: `distill estimate-memory` for SIM (configs/sim_sd15.yaml: bf16, teacher CFG,
batch 1 per GPU) on SD 1.5 and SDXL at 512 and 1024 px, full networks and LoRA rank 64, with and without
gradient checkpointing. The teachers' config files ship in benchmarks/model_configs (nothing is downloaded).

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
MODELS = {
    "SD 1.5": ("sd15_unet.json", [("text_encoder", "clip_l_text.json", "CLIPTextModel")]),
    "SDXL": ("sdxl_unet.json", [("text_encoder", "clip_l_text.json", "CLIPTextModel"),
                                ("text_encoder_2", "clip_bigg_text.json", "CLIPTextModelWithProjection")]),
}


def config_folder(root: Path, unet: str, encoders) -> Path:
    """A pipeline folder holding config files only (what estimate-memory reads)."""
    folder = root / unet.split("_")[0]
    index = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "DDIMScheduler"]}
    for sub, src in (("unet", unet), ("vae", "vae.json")):
        (folder / sub).mkdir(parents=True)
        shutil.copy(HERE / "model_configs" / src, folder / sub / "config.json")
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
        for name, (unet, encoders) in MODELS.items():
            folder = config_folder(Path(tmp), unet, encoders)
            for px in (512, 1024):
                cells = []
                for lora in ([], ["student.lora_rank=64"]):
                    cfg = load_config(HERE.parent / "configs" / "sim_sd15.yaml", [
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

"""CUDA / bf16 smoke check of every trainer, run on a GPU machine (not part of CI: CI has no GPU).

    python benchmarks/gpu_check.py OUT_DIR [--full-guided]
    python benchmarks/gpu_check.py --perf OUT_DIR [--budget SECONDS] [--work DIR] [--dry-run]
        (training-loop performance against bare network passes: see benchmarks/gpu_perf.py)

For each digits config (SIM, Uni-Instruct, progressive, guided) it runs a short training through
``accelerate launch -m distill train`` with ``train.mixed_precision=bf16`` (and SIM once more with
gradient checkpointing), then loads the exported pipeline with ``torch_dtype=torch.bfloat16`` on
CUDA and samples from it. Each run's exit status, losses, updates/s and sample statistics go to
``OUT_DIR/gpu_check.md`` (written after every run, so a timeout keeps what finished).
``--full-guided`` also runs ``configs/guided_digits.yaml`` end to end in fp32 (report included).
Then a resume check (``resume_check``): Uni-Instruct in bf16 resumed from a mid-run checkpoint on CUDA.
Last, ``sd15_step_check``: a few training iterations per method (and SIM with LoRA rank 64) on a random
SD1.5-architecture text-to-image teacher (64x64 latents, bf16, gradient checkpointing) with the time of a
whole iteration (``trainer.train_iteration()``: batch, update, EMA), peak memory
(``torch.cuda.max_memory_allocated``) and ``distill estimate-memory``'s figure for the same config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
COMMON = ["train.progress_bar=false", "train.report_to=none", "eval.enabled=false", "train.log_every=5",
          "train.checkpointing_steps=1000"]
SMOKE = {
    "sim bf16": ("configs/sim_digits.yaml", ["train.max_steps=60"]),
    "sim bf16 + gradient checkpointing": ("configs/sim_digits.yaml",
                                          ["train.max_steps=60", "sim.gradient_checkpointing=true"]),
    "uni_instruct bf16": ("configs/uni_instruct_digits.yaml", ["train.max_steps=60"]),
    "progressive bf16": ("configs/progressive_digits.yaml", ["progressive.start_steps=4",
                                                             "progressive.steps_per_round=15"]),
    "guided bf16": ("configs/guided_digits.yaml", ["guided.start_steps=4", "guided.stage_one_steps=15",
                                                   "guided.steps_per_round=15"]),
}


def sample_check(pipeline: Path) -> dict:
    import torch

    from distill import load_pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(str(pipeline), torch_dtype=torch.bfloat16).to(device)
    pipe.set_progress_bar_config(disable=True)
    kw = {"guidance_scale": 2.0} if getattr(pipe.config, "guidance_conditioned", False) else {}
    t0 = time.time()
    x = pipe(batch_size=256, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images
    if device == "cuda":
        torch.cuda.synchronize()
    net = next(m for m in pipe.components.values() if isinstance(m, torch.nn.Module))
    return {"dtype": str(next(net.parameters()).dtype), "finite": bool(torch.isfinite(x).all()),
            "mean": round(float(x.float().mean()), 4), "std": round(float(x.float().std()), 4),
            "sample_seconds": round(time.time() - t0, 3)}


def train(name: str, config: str, overrides: list[str], out: Path, log) -> dict:
    run_dir = out / "runs" / name.replace(" ", "_").replace("+", "")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision",
           "bf16" if "bf16" in name else "no", "-m", "distill", "train", config, f"output_dir={run_dir}",
           *COMMON, *overrides]
    if "bf16" in name:
        cmd.append("train.mixed_precision=bf16")
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    secs = time.time() - t0
    log.write(f"\n## {name}\n$ {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}\n")
    log.flush()
    row = {"run": name, "rc": proc.returncode, "seconds": round(secs, 1)}
    hist = run_dir / "train_history.json"
    if hist.is_file():
        h = [r for r in json.loads(hist.read_text()) if isinstance(r, dict)]
        losses = [v for r in h for k, v in r.items() if "loss" in k and isinstance(v, (int, float))]
        row.update(updates=h[-1].get("step") if h else 0,
                   updates_per_s=round((h[-1].get("step") or 0) / secs, 2)
                   if h else None, last_loss=round(losses[-1], 5) if losses else None,
                   all_losses_finite=all(v == v and abs(v) < float("inf") for v in losses))
    if proc.returncode == 0 and (run_dir / "pipeline").is_dir():
        try:
            row.update(sample_check(run_dir / "pipeline"))
        except Exception as err:  # reported, not raised: the next runs still go
            row["sample_error"] = f"{type(err).__name__}: {err}"
    return row


def resume_check(out: Path, log, steps: int = 30) -> dict:
    """Uni-Instruct (EMA + discriminator) in bf16 on CUDA: a run of ``steps`` updates with a checkpoint
    half-way, and a second run resumed from that checkpoint alone (the EMA used to crash at its first
    step after a resume on a GPU: its loaded CPU tensors met CUDA parameters). Reports the exit status and
    the largest difference of the final weights, EMA and optimizer state (CUDA kernels need not be
    bitwise deterministic; on CPU the tests require equality)."""
    import shutil

    from safetensors.torch import load_file

    half = steps // 2
    ckpt = ["train.checkpoints_total_limit=null", f"train.checkpointing_steps={half}",
            f"train.max_steps={steps}"]
    full = train("resume bf16: uninterrupted", "configs/uni_instruct_digits.yaml",
                 ckpt + ["uni_instruct.ratio_warmup_steps=5"], out, log)
    src = out / "runs" / "resume_bf16:_uninterrupted"
    dst = out / "runs" / "resume_bf16:_resumed"
    shutil.rmtree(dst, ignore_errors=True)
    if (src / "checkpoints" / f"checkpoint-{half}").is_dir():
        shutil.copytree(src / "checkpoints" / f"checkpoint-{half}",
                        dst / "checkpoints" / f"checkpoint-{half}")
    resumed = train("resume bf16: resumed", "configs/uni_instruct_digits.yaml",
                    ckpt + ["uni_instruct.ratio_warmup_steps=5", "train.resume_from_checkpoint=latest"], out,
                    log)
    row = {"run": "resume bf16 (uni_instruct, EMA + discriminator)", "rc": max(full["rc"], resumed["rc"])}
    a_dir, b_dir = src / "checkpoints" / f"checkpoint-{steps}", dst / "checkpoints" / f"checkpoint-{steps}"
    if a_dir.is_dir() and b_dir.is_dir():
        diff = 0.0
        for f in a_dir.glob("*.safetensors"):
            a, b = load_file(f), load_file(b_dir / f.name)
            diff = max([diff] + [float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel()])
        row["max_abs_diff_final_state"] = diff
        row["bitwise_equal"] = diff == 0.0
    else:
        row["error"] = "a run did not reach its final checkpoint (see gpu_check.log)"
    return row


def sd15_random_folder(folder: Path, tiny: bool = False) -> Path:
    """A Stable-Diffusion-1.5-architecture pipeline with random weights (UNet2DConditionModel 860M, the SD
    VAE, a CLIP ViT-L/14-sized text encoder, a tokenizer from a vocab written here); ``tiny``: the tests' tiny
    one."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import clip_tokenizer, make_tiny_sd

    if tiny:
        return make_tiny_sd(folder)
    import diffusers
    import torch
    import transformers

    tokenizer = clip_tokenizer(folder.parent / "sd15-tokenizer-src", 77)
    torch.manual_seed(0)
    # diffusers' defaults = SD1.5
    unet = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, sample_size=512,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
                                  scaling_factor=0.18215)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, scheduler=sched,
                                      safety_checker=None, tokenizer=tokenizer, feature_extractor=None,
                                      requires_safety_checker=False).save_pretrained(folder)
    return folder


def sd15_step_check(out: Path, batch: int = 4, steps: int = 4, tiny: bool = False) -> list[dict]:
    """Training iterations per method (configs/*_sd15.yaml: bf16, gradient checkpointing) on a random
    SD1.5-sized pipeline (64x64 latents): the median time of a whole ``trainer.train_iteration()`` after the
    first (the batch included: prompt encoding, plus the teacher's samples for prompts-only progressive /
    guided / Uni-Instruct), and peak CUDA memory."""
    import gc
    import statistics

    import torch

    from distill.config import load_config
    from distill.trainers import trainer_class

    folder = sd15_random_folder(out / "sd15_random", tiny)
    prompts = out / "sd15_prompts.txt"
    prompts.write_text("a photo of a cat\na watercolor of a lighthouse at dusk\na red car in the snow\n")
    cuda = torch.cuda.is_available()
    rows = []
    from distill.memory import estimate

    runs = [("sim", []), ("sim", ["student.lora_rank=64"]), ("uni_instruct", []), ("progressive", []),
            ("guided", [])]
    for method, extra in runs:
        label = method + (" LoRA 64" if extra else "")
        row = {"run": f"sd15 {label} ({'tiny, CPU dry run' if tiny else 'SD1.5 architecture'})",
               "batch": batch}
        try:
            cfg = load_config(f"configs/{method}_sd15.yaml", COMMON + [
                f"teacher.path={folder}", f"data.spec=prompts:{prompts}", f"train.batch_size={batch}",
                "data.teacher_sample_steps=4",
                f"output_dir={out / 'runs' / ('sd15_' + label.replace(' ', '_'))}"]
                + extra + ([] if cuda else ["train.mixed_precision=no"]))
            if method != "guided":  # distill estimate-memory's figure next to the measured peak
                row["estimate_GiB"] = round(estimate(cfg, device="cuda" if cuda else "cpu").peak / 2**30, 2)
            trainer = trainer_class(method)(cfg)
            trainer.setup()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times, logs = [], {}
            for _ in range(steps):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                logs = trainer.train_iteration()
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            row.update(step_seconds=round(statistics.median(times[1:] or times), 3),
                       first_step_seconds=round(times[0], 3),
                       peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                       finite=all(bool(torch.isfinite(torch.as_tensor(v, dtype=torch.float32)).all())
                                  for v in logs.values() if v is not None), rc=0)
            del trainer
        # noqa: BLE001 - a failed method is a row of the report, the others still run
        except Exception as err:
            row.update(rc=1, error=f"{type(err).__name__}: {err}"[:300])
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


def main() -> None:
    if "--perf" in sys.argv:  # training-loop performance (benchmarks/gpu_perf.py)
        from gpu_perf import cli

        cli([a for a in sys.argv[1:] if a != "--perf"])
        return
    out = Path(sys.argv[1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    rows = []
    head = (f"# GPU check\n\ntorch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU'}, "
            f"bf16 supported: {torch.cuda.is_available() and torch.cuda.is_bf16_supported()}\n\n")
    jobs = list(SMOKE.items())
    if os.environ.get("GPU_CHECK_ONLY"):  # e.g. GPU_CHECK_ONLY=guided: the runs whose name contains it
        jobs = [j for j in jobs if os.environ["GPU_CHECK_ONLY"] in j[0]]
    if os.environ.get("GPU_CHECK_DRY"):  # a seconds-long pass of the script itself on CPU
        dry = ["train.max_steps=2", "progressive.steps_per_round=1", "guided.steps_per_round=1",
               "guided.stage_one_steps=1", "progressive.start_steps=2", "guided.start_steps=2"]
        jobs = [(n, (c, [o for o in ov if "steps" not in o] + dry)) for n, (c, ov) in jobs]
    if "--full-guided" in sys.argv:
        jobs.append(("guided_digits fp32 full", ("configs/guided_digits.yaml", ["eval.enabled=true"])))
    with open(out / "gpu_check.log", "w") as log:
        for name, (config, overrides) in jobs:
            rows.append(train(name, config, overrides, out, log))
            write_rows(rows, out, head)
        rows.append(resume_check(out, log, 4 if os.environ.get("GPU_CHECK_DRY") else 30))
        write_rows(rows, out, head)
        for row in sd15_step_check(out, tiny=bool(os.environ.get("GPU_CHECK_DRY"))):
            rows.append(row)
            write_rows(rows, out, head)
    os.sync()


def write_rows(rows: list[dict], out: Path, head: str) -> None:
    print(json.dumps(rows[-1]), flush=True)
    (out / "gpu_check.json").write_text(json.dumps(rows, indent=1))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    table += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    (out / "gpu_check.md").write_text(head + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()

"""Training-loop performance on one GPU: each trainer's full update against the bare network passes it needs.

    python benchmarks/gpu_check.py --perf OUT_DIR [--budget SECONDS] [--work DIR] [--dry-run]

On the device (a GPU machine without diffusers / torch-fidelity and without internet; wheels in ``.whl/``):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
      --target /tmp/site .whl/*.whl \\
      && export PYTHONPATH=/tmp/site:$PYTHONPATH \\
      && PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 python3 benchmarks/gpu_check.py --perf $OUT/perf

What it measures (one H100 / H200, about 6 minutes; ``--budget`` seconds, default 330, after which the
remaining rows are skipped and marked so):

* the teacher: a random-weight ``UNet2DModel`` with google/ddpm-cifar10-32's configuration (35.7M parameters,
  epsilon prediction, linear betas) saved as a ``DDPMPipeline`` folder (seeded), and 512 random 32x32 RGB PNGs
  standing in for CIFAR-10 (when the image folder does not load, e.g. without the ``datasets`` package,
  sklearn digits at 32x32 and the same UNet with one input / output channel instead; the header says which);
* trainers teacher, sim, uni_instruct (fkl, no ratio warm-up) and progressive from the shipped CIFAR-10
  configs (the teacher trainer: ``configs/teacher_digits.yaml`` on the images with ``student.arch=unet`` and
  block_out_channels [128, 256, 256, 256], two layers per block: a teacher-training config cannot reproduce
  the CIFAR UNet's block types, so its attention sits at 4x4 instead of 16x16), bf16, batch 128 and 64, eager
  and ``train.compile=true``;
* per row: ``trainer.train_iteration()`` (batch, the method's losses, backward, clipping, optimizer steps,
  EMA) timed INTERLEAVED with a bare plain-torch step over the same networks (``benchmarks/bare_steps.py``:
  the same forward / backward passes, gradient clipping and fused AdamW steps under bf16 autocast; no
  Accelerate, EMA or logging), each call between two ``torch.cuda.synchronize()``; the median ratio of the
  pairs and its 10-90% range; model FLOPs of one update (``torch.utils.flop_counter.FlopCounterMode`` around
  one eager iteration, reused by the compiled rows), the achieved TFLOP/s and MFU against a measured 8192^3
  bf16 matmul and against the card's datasheet dense bf16 peak; the trainer's peak memory
  (``torch.cuda.max_memory_allocated`` over its own warm-up iterations);
* ``OneStepPipeline`` sampling at batch 256 against the bare generator forward, with a CUDA and a CPU
  generator (goal <= 1.05x with the device generator).

Rows go to ``OUT/perf.md`` and ``OUT/perf.json`` after every row and to stdout as one JSON line each; the
random teacher (143 MB), the images and the runs' output folders to ``--work`` (default: a temporary folder,
removed at the end), so that OUT holds the two reports alone.
``--dry-run``: the same code path on the CPU with a tiny UNet, 16x16 images, batch 4, fp32 and 3 timed pairs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from bare_steps import Bare

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# google/ddpm-cifar10-32's architecture and schedule (UNet2DModel, 35.7M parameters; shared with the tests)
_CIFAR = json.loads((ROOT / "benchmarks" / "model_configs" / "ddpm_cifar10.json").read_text())
CIFAR_UNET, CIFAR_SCHEDULER = _CIFAR["unet"], _CIFAR["scheduler"]
TINY_UNET = dict(CIFAR_UNET, sample_size=16, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
# dense bf16 tensor-core peaks from the datasheets, TFLOP/s (first match on torch.cuda.get_device_name)
DATASHEET_BF16 = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                  ("H800", 989.0), ("A100", 312.0), ("L40S", 362.0), ("B200", 2250.0)]
TRAINERS = ["teacher", "sim", "uni_instruct", "progressive"]
CONFIGS = {"teacher": "configs/teacher_digits.yaml", "sim": "configs/sim_cifar10.yaml",
           "uni_instruct": "configs/uni_instruct_cifar10.yaml",
           "progressive": "configs/progressive_cifar10.yaml"}
COLUMNS = [("trainer", "trainer"), ("batch", "batch"), ("mode", "mode"), ("compile_s", "compile s"),
           ("trainer_ms", "trainer ms/update"), ("bare_ms", "bare ms"), ("ratio", "ratio (median of pairs)"),
           ("ratio_range", "ratio 10-90%"), ("img_per_s", "img/s"), ("gflop", "GFLOP/update"),
           ("tflops", "TFLOP/s"), ("mfu_measured", "MFU (measured peak)"),
           ("mfu_datasheet", "MFU (datasheet)"), ("peak_gib", "peak GiB"), ("status", "status")]
BARE = {"teacher": "1 fwd+bwd of the student",
        "sim": "fake DSM (gen fwd no-grad, fake fwd+bwd); generator (gen fwd+bwd, fake and teacher fwd+bwd "
               "to input)",
        "uni_instruct": "as sim, plus the fake's second forward on noised data and the discriminator head",
        "progressive": "two no-grad teacher passes + one student fwd+bwd",
        "sampling": "the generator's forward on pre-drawn input (no_grad)"}


@dataclass
class Plan:
    """What one run measures: the GPU run or the CPU dry run."""

    dry_run: bool
    device: str
    unet: dict
    resolution: int
    images: int
    batches: list[int]
    warmup: int
    pairs: int
    min_pairs: int
    sample_batch: int
    mixed_precision: str
    compiled: list[tuple[str, int]]  # (trainer, batch) pairs measured with train.compile=true, in order
    teacher_channels: list[int] = field(default_factory=lambda: [128, 256, 256, 256])
    teacher_layers: int = 2

    @classmethod
    def make(cls, dry_run: bool) -> Plan:
        # compiling on a small CPU takes minutes: the compiled row only with GPU_PERF_DRY_COMPILE=1
        if dry_run:
            compiled = [("sim", 4)] if os.environ.get("GPU_PERF_DRY_COMPILE") else []
            return cls(True, "cpu", TINY_UNET, 16, 16, [4], 1, 3, 3, 8, "no", compiled, [32, 64], 1)
        order = [("sim", 128), ("sim", 64)] + [(t, b) for b in (128, 64) for t in TRAINERS if t != "sim"]
        return cls(False, "cuda", CIFAR_UNET, 32, 512, [128, 64], 3, 20, 5, 256, "bf16", order)


# ---------------------------------------------------------------------- inputs
def random_png_folder(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` random RGB PNGs of ``size`` x ``size`` (stand-ins for CIFAR-10 images)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return folder


def random_teacher(folder: Path, unet: dict, seed: int = 0) -> int:
    """A ``DDPMPipeline`` folder with a random-weight ``UNet2DModel`` of configuration ``unet`` (seeded);
    returns its number of parameters."""
    import diffusers

    torch.manual_seed(seed)
    net = diffusers.UNet2DModel(**unet)
    diffusers.DDPMPipeline(unet=net,
                           scheduler=diffusers.DDPMScheduler(**CIFAR_SCHEDULER)).save_pretrained(folder)
    return sum(p.numel() for p in net.parameters())


def make_inputs(work: Path, plan: Plan) -> dict:
    """The teacher folder and the data spec. Image folders need the ``datasets`` package; when the folder does
    not load (``datasets`` missing or broken, or ``GPU_PERF_NO_DATASETS`` set) the data is sklearn digits at
    the teacher's resolution and the teacher takes one channel (the FLOPs differ only in its first and last
    layers)."""
    from distill.data import load_data

    reason = "GPU_PERF_NO_DATASETS is set" if os.environ.get("GPU_PERF_NO_DATASETS") else None
    spec = str(work / "images")
    if reason is None:
        try:
            random_png_folder(Path(spec), plan.images, plan.resolution)
            load_data(spec, resolution=plan.resolution, channels=3)[0]
        except Exception as err:  # noqa: BLE001 - any failure: the digits stand-in below
            reason = f"the image folder does not load: {type(err).__name__}: {err}"[:300]
    unet = dict(plan.unet) if reason is None else dict(plan.unet, in_channels=1, out_channels=1)
    teacher = work / "teacher_random"
    params = random_teacher(teacher, unet)
    if reason is None:
        data = f"{plan.images} random {plan.resolution}x{plan.resolution} RGB PNGs (an image folder)"
    else:
        spec = "sklearn:digits"
        data = (f"sklearn:digits at {plan.resolution}x{plan.resolution}, 1 channel, in place of random RGB "
                f"PNGs ({reason}); the teacher UNet takes 1 channel")
    return {"teacher": str(teacher), "spec": spec, "data": data, "channels": unet["in_channels"],
            "params_m": round(params / 1e6, 2)}


def overrides(name: str, batch: int, compiled: bool, inputs: dict, work: Path, plan: Plan) -> list[str]:
    tag = f"{name}_b{batch}_{'compiled' if compiled else 'eager'}"
    common = [f"teacher.path={inputs['teacher']}", f"data.spec={inputs['spec']}",
              f"train.mixed_precision={plan.mixed_precision}", "train.report_to=none",
              "train.progress_bar=false", "eval.enabled=false", "train.checkpointing_steps=1000000",
              f"output_dir={work / 'runs' / tag}", f"train.batch_size={batch}"]
    if compiled:
        common.append("train.compile=true")
    # the image data at the teacher's shape, a CIFAR-sized UNet, the CIFAR teacher's schedule
    if name == "teacher":
        common += [f"data.resolution={plan.resolution}", f"data.channels={inputs['channels']}",
                   "student.arch=unet", f"student.block_out_channels={plan.teacher_channels}",
                   f"student.layers_per_block={plan.teacher_layers}", "student.attention=true",
                   "teacher_train.beta_schedule=linear", "teacher_train.prediction_type=epsilon",
                   "optim.lr_warmup_steps=0"]
    if name == "uni_instruct":
        common.append("uni_instruct.ratio_warmup_steps=0")
    return common


# ---------------------------------------------------------------------- timing helpers
def sync(plan: Plan) -> None:
    if plan.device == "cuda":
        torch.cuda.synchronize()


def timed(fn, plan: Plan) -> float:
    sync(plan)
    t0 = time.perf_counter()
    fn()
    sync(plan)
    return time.perf_counter() - t0


def quantiles(values: list[float]) -> tuple[float, float, float]:
    q = torch.tensor(values, dtype=torch.float64).quantile(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return tuple(float(v) for v in q)


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def matmul_peak(plan: Plan) -> float | None:
    """bf16 TFLOP/s of an 8192^3 matmul: mean of 10 after 3 warm-ups (None without CUDA)."""
    if plan.device != "cuda":
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = [timed(lambda: a @ b, plan) for _ in range(10)]
    return 2 * 8192**3 / statistics.mean(times) / 1e12


def datasheet_peak() -> tuple[str, float | None]:
    if not torch.cuda.is_available():
        return "no CUDA device", None
    name = torch.cuda.get_device_name(0)
    return name, next((v for k, v in DATASHEET_BF16 if k in name), None)


# ---------------------------------------------------------------------- rows
class Report:
    def __init__(self, out: Path, head: str):
        self.out, self.head, self.rows = out, head, []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        (self.out / "perf.json").write_text(json.dumps({"header": self.head, "rows": self.rows}, indent=1))
        lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in COLUMNS) + " |" for r in self.rows]
        notes = [f"- {r['trainer']} b{r['batch']} {r['mode']}: {r['note']}" for r in self.rows
                 if r.get("note")]
        (self.out / "perf.md").write_text(self.head + "\n".join(lines) + "\n"
                                          + ("\n" + "\n".join(notes) + "\n"
                                              if notes else ""))


def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def finish_row(row: dict, t_trainer: list[float], t_bare: list[float], flops: float | None,
               peaks: dict) -> dict:
    med_t, med_b = statistics.median(t_trainer), statistics.median(t_bare)
    lo, mid, hi = quantiles([a / b for a, b in zip(t_trainer, t_bare)])
    row.update(trainer_ms=round(med_t * 1e3, 3), bare_ms=round(med_b * 1e3, 3), ratio=round(mid, 4),
               ratio_p10=round(lo, 4), ratio_p90=round(hi, 4), ratio_range=f"{lo:.3f}-{hi:.3f}",
               img_per_s=round(row["batch"] / med_t, 1), pairs=len(t_trainer))
    if flops:
        tflops = flops / med_t / 1e12
        row.update(gflop=round(flops / 1e9, 2), tflops=round(tflops, 3),
                   mfu_measured=round(tflops / peaks["measured"], 4) if peaks.get("measured") else None,
                   mfu_datasheet=round(tflops / peaks["datasheet"], 4) if peaks.get("datasheet") else None)
    return row


def interleave(fn_a, fn_b, plan: Plan, deadline: float) -> tuple[list[float], list[float]]:
    """``plan.pairs`` interleaved timings of fn_a and fn_b (the order alternates); after ``deadline`` the
    loop stops once ``plan.min_pairs`` pairs are done."""
    ta, tb = [], []
    for i in range(plan.pairs):
        if i >= plan.min_pairs and time.perf_counter() > deadline:
            break
        first, second = ((fn_a, ta), (fn_b, tb)) if i % 2 == 0 else ((fn_b, tb), (fn_a, ta))
        for fn, acc in (first, second):
            acc.append(timed(fn, plan))
    return ta, tb


def dynamo_stats() -> dict:
    try:
        from torch._dynamo.utils import counters

        return {"graphs": int(counters["stats"].get("unique_graphs", 0)),
                "graph_breaks": int(sum(counters["graph_break"].values()))}
    except Exception:  # noqa: BLE001 - diagnostics only
        return {}


def trainer_row(name: str, batch: int, compiled: bool, inputs: dict, work: Path, plan: Plan, peaks: dict,
                flops_cache: dict, deadline: float) -> dict:
    from distill.config import load_config
    from distill.trainers import trainer_class

    row = {"trainer": name, "batch": batch, "mode": "compiled" if compiled else "eager", "compile_s": None}
    if compiled:
        torch._dynamo.reset()
    cfg = load_config(ROOT / CONFIGS[name], overrides(name, batch, compiled, inputs, work, plan))
    trainer = trainer_class(cfg.method)(cfg)
    bare = None
    try:
        t0 = time.perf_counter()
        trainer.setup()
        row["setup_s"] = round(time.perf_counter() - t0, 2)
        # hooks and optimizers before the first update: no recompilation later
        bare = Bare(trainer, plan.images)
        if plan.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        warm = [timed(trainer.train_iteration, plan) for _ in range(plan.warmup)]
        row["peak_gib"] = (round(torch.cuda.max_memory_allocated() / 2**30, 3) if plan.device == "cuda"
                           else None)
        if compiled:
            row.update(dynamo_stats())
        if not compiled:
            flops_cache[(name, batch)] = count_flops(trainer.train_iteration)
        bare_warm = [timed(bare.run, plan) for _ in range(plan.warmup)]
        t_trainer, t_bare = interleave(trainer.train_iteration, bare.run, plan, deadline)
        finish_row(row, t_trainer, t_bare, flops_cache.get((name, batch)), peaks)
        row["warmup_s"] = round(sum(warm), 3)
        row["bare_warmup_s"] = round(sum(bare_warm), 3)
        if compiled:  # the first iterations' time beyond steady state: the compilation
            row["compile_s"] = round(sum(warm) - len(warm) * row["trainer_ms"] / 1e3, 2)
            row["bare_compile_s"] = round(sum(bare_warm) - len(bare_warm) * row["bare_ms"] / 1e3, 2)
            row.update({f"{k}_after_bare": v for k, v in dynamo_stats().items()})
        row["status"] = "ok"
    finally:
        if bare is not None:
            bare.close()
        del trainer, bare
        free(plan)
    return row


def sampling_rows(inputs: dict, plan: Plan, peaks: dict, deadline: float) -> list[dict]:
    """OneStepPipeline at batch ``plan.sample_batch`` vs the bare generator forward, device and CPU
    generator."""
    import diffusers

    from distill import OneStepPipeline

    folder = Path(inputs["teacher"])
    dtype = torch.bfloat16 if plan.mixed_precision == "bf16" else torch.float32
    net = diffusers.UNet2DModel.from_pretrained(folder / "unet", torch_dtype=dtype).to(plan.device).eval()
    pipe = OneStepPipeline(net, diffusers.DDPMScheduler.from_pretrained(folder / "scheduler"),
                           generator_timestep=625)
    pipe.set_progress_bar_config(disable=True)
    b = plan.sample_batch
    x = torch.randn(b, *pipe.config.sample_shape, device=plan.device, dtype=dtype)
    ts = torch.full((b,), 625, device=plan.device)

    @torch.no_grad()
    def bare():
        return net(x, ts).sample

    flops = count_flops(bare)
    rows = []
    for label, gen in (("cuda" if plan.device == "cuda" else "device", torch.Generator(device=plan.device)),
                       ("CPU", torch.Generator())):
        row = {"trainer": f"OneStepPipeline ({label} generator)", "batch": b, "mode": "eager",
               "compile_s": None}
        gen.manual_seed(0)

        def call(gen=gen):
            return pipe(batch_size=b, generator=gen, output_type="pt").images

        if plan.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(plan.warmup):
            timed(call, plan), timed(bare, plan)
        t_pipe, t_bare = interleave(call, bare, plan, deadline)
        finish_row(row, t_pipe, t_bare, flops, peaks)
        row["peak_gib"] = (round(torch.cuda.max_memory_allocated() / 2**30, 3) if plan.device == "cuda"
                           else None)
        row["status"] = "ok" + (" (goal <= 1.05)" if label != "CPU" else "")
        rows.append(row)
    return rows


OLD_SRC = ROOT / ".gpu_baseline"  # the package before the GPU-loop change: `git archive 058bbe3 distill`


def old_loop_rows(report, inputs: dict, work: Path, plan: Plan, deadline: float) -> None:
    """SIM's update with the loop of the commit before the GPU-loop change (``.gpu_baseline/distill``, run in
    a subprocess by ``gpu_perf_old_loop.py``), at each batch size: "today's eager" measured in this run."""
    import subprocess

    if not (OLD_SRC / "distill").is_dir() or "sim" not in TRAINERS:
        return
    for b in plan.batches:
        row = {"trainer": "sim (loop before the change)", "batch": b, "mode": "eager", "compile_s": None}
        if time.perf_counter() > deadline:
            report.add({**row, "status": "skipped (time budget)"})
            continue
        ov = overrides("sim", b, False, inputs, work, plan)
        ov = [o.replace("_eager", "_old") if o.startswith("output_dir=") else o for o in ov]
        cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_perf_old_loop.py"), str(OLD_SRC),
               str(ROOT / CONFIGS["sim"]), str(plan.pairs), str(plan.warmup), *ov]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            report.add({**row, "status": "error", "note": proc.stderr.strip().splitlines()[-1][:300]
                        if proc.stderr.strip() else f"exit {proc.returncode}"})
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        row.update(trainer_ms=round(res["ms_median"], 3), img_per_s=round(b / res["ms_median"] * 1e3, 1),
                   status="ok (separate process, not interleaved)")
        report.add(row)


def speedups(report) -> None:
    """Compiled and eager SIM img/s against the loop before the change, per batch size (goal: compiled
    >= 1.5x)."""
    by = {(r.get("trainer"), r.get("batch"), r.get("mode")): r for r in report.rows}
    for (name, b, mode), r in list(by.items()):
        old = by.get(("sim (loop before the change)", b, "eager"))
        if name == "sim" and old and old.get("img_per_s") and r.get("img_per_s"):
            report.add({"trainer": f"sim {mode} / loop before the change", "batch": b, "mode": mode,
                        "img_per_s": r["img_per_s"], "ratio": round(r["img_per_s"] / old["img_per_s"], 3),
                        "status": "img/s ratio" + (" (goal >= 1.5)" if mode == "compiled" else "")})


def free(plan: Plan) -> None:
    gc.collect()
    if plan.device == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------- main
def main(out: Path, dry_run: bool, budget: float = 330.0, work: Path | None = None) -> list[dict]:
    """Measure, writing ``out/perf.md`` and ``out/perf.json``; the teacher folder, the images and the runs'
    output folders go to ``work`` (default: a temporary folder, removed at the end; it holds a 143 MB teacher,
    which the device machine's ``$OUT`` should not)."""
    start = time.perf_counter()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if work is None:
        with tempfile.TemporaryDirectory(prefix="gpu_perf_") as tmp:
            return main(out, dry_run, budget - (time.perf_counter() - start), Path(tmp))
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    plan = Plan.make(dry_run)
    # GPU_PERF_ONLY=sim,teacher / GPU_PERF_BATCHES=128: a subset of the rows (a second, shorter device call)
    only = set(os.environ.get("GPU_PERF_ONLY", ",".join([*TRAINERS, "sampling"])).split(","))
    if os.environ.get("GPU_PERF_BATCHES"):
        plan.batches = [int(b) for b in os.environ["GPU_PERF_BATCHES"].split(",")]
    if dry_run:  # one thread: a busy small CPU (a test suite alongside) makes two spinning threads crawl
        torch.set_num_threads(1)
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_perf: no CUDA device; use --dry-run for the CPU pass of the script.")
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # noqa: BLE001 - no datasets: make_inputs falls back to in-memory digits
        pass
    inputs = make_inputs(work, plan)
    card, datasheet = datasheet_peak()
    measured = matmul_peak(plan)
    free(plan)
    peaks = {"measured": measured, "datasheet": datasheet}
    print(f"gpu_perf: {card}; measured bf16 matmul peak {fmt(measured)} TFLOP/s, datasheet {fmt(datasheet)} "
          f"TFLOP/s; data: {inputs['data']}", flush=True)
    head = (f"# Training-loop performance{' (CPU dry run)' if dry_run else ''}\n\n{card}; torch "
            f"{torch.__version__}, CUDA {torch.version.cuda}, diffusers {diffusers.__version__}; measured "
            f"bf16 matmul peak (8192^3): {fmt(measured)} TFLOP/s; datasheet dense bf16 peak: "
            f"{fmt(datasheet)} TFLOP/s.\n\n- teacher: random-weight UNet2DModel with "
            f"google/ddpm-cifar10-32's config ({inputs['params_m']}M "
            f"parameters){' (tiny variant for the dry run)' if dry_run else ''}; data: {inputs['data']}; "
            f"precision: {plan.mixed_precision}.\n- trainer `teacher`: configs/teacher_digits.yaml with "
            f"student.arch=unet, block_out_channels {plan.teacher_channels}, layers_per_block "
            f"{plan.teacher_layers} (a teacher-training config cannot rebuild the CIFAR UNet's block types: "
            "attention at the lowest resolution, 8 norm groups); the others: "
            "configs/{sim,uni_instruct,progressive}_cifar10.yaml (uni_instruct.ratio_warmup_steps=0; "
            "progressive from its first round: an iteration costs the same at any round).\n"
            "- trainer ms/update: "
            "`trainer.train_iteration()` (batch, losses, backward, clipping, optimizer steps, EMA); bare "
            "ms: the same network passes in plain torch (bf16 autocast, clipping, fused AdamW; no "
            "Accelerate / EMA / logging), timed interleaved with it, each call between two device "
            f"synchronisations. {plan.pairs} pairs after {plan.warmup} warm-up iteration(s); ratio = trainer "
            "/ bare per pair.\n- bare passes: "
            + "; ".join(f"{k}: {v}" for k, v in BARE.items()) + ".\n- GFLOP/update: FlopCounterMode around "
            "one eager iteration (compiled rows reuse it); MFU = achieved TFLOP/s / peak. compile s: the "
            "warm-up iterations' time beyond steady state. peak GiB: max_memory_allocated over the "
            "trainer's warm-up iterations (sampling: over the timed calls).\n- sampling rows: trainer ms = "
            f"one `OneStepPipeline` call at batch {plan.sample_batch} (output_type='pt', the images copied "
            "to the host), bare ms = the generator's forward alone; the goal is <= 1.05 with the device "
            f"generator.\n- rows are skipped once {budget:.0f} s have passed since the start (or when the "
            "last row of the same kind would not fit).\n\n")
    report = Report(out, head)
    deadline = start + budget

    # kind -> seconds of its last row (a row that would end well past the deadline is skipped)
    last: dict = {}

    def section(jobs):
        for kind, name, batch in jobs:
            now = time.perf_counter()
            if now > deadline or now + 0.75 * last.get(kind, 0.0) > deadline:
                rows = [{"trainer": name, "batch": batch, "mode": kind, "status": "skipped (time budget)"}]
            elif kind == "sampling":
                try:
                    rows = sampling_rows(inputs, plan, peaks, deadline)
                except Exception as err:  # noqa: BLE001 - a failed row is reported, the others still run
                    rows = [{"trainer": "OneStepPipeline", "batch": plan.sample_batch, "mode": "eager",
                             "status": "error", "note": f"{type(err).__name__}: {err}"[:400]}]
                free(plan)
            else:
                try:
                    rows = [trainer_row(name, batch, kind == "compiled", inputs, work, plan, peaks,
                                        flops_cache, deadline)]
                except Exception as err:  # noqa: BLE001
                    rows = [{"trainer": name, "batch": batch, "mode": kind, "status": "error",
                             "note": f"{type(err).__name__}: {err}"[:400]}]
                    free(plan)
            if not rows[0]["status"].startswith("skipped"):
                last[kind] = time.perf_counter() - now
            for r in rows:
                r["row_s"] = round(time.perf_counter() - now, 2)
                r["elapsed_s"] = round(time.perf_counter() - start, 2)
                report.add(r)

    flops_cache: dict = {}
    section([("eager", t, b) for b in plan.batches for t in TRAINERS if t in only])
    old_loop_rows(report, inputs, work, plan, deadline)
    if "sampling" in only:
        section([("sampling", "OneStepPipeline", plan.sample_batch)])
    section([("compiled", t, b) for t, b in plan.compiled if t in only and b in plan.batches])
    speedups(report)
    print(f"gpu_perf: {len(report.rows)} rows in {time.perf_counter() - start:.1f} s -> {out / 'perf.md'}",
          flush=True)
    return report.rows


def cli(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="gpu_check.py --perf", description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--dry-run", action="store_true", help="CPU pass with a tiny UNet (seconds)")
    p.add_argument("--budget", type=float, default=330.0,
                   help="seconds; later rows are skipped (default 330)")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the random teacher, the images and the runs (default: a temporary one)")
    args = p.parse_args(argv)
    main(args.out, args.dry_run, args.budget, args.work)


if __name__ == "__main__":
    cli(sys.argv[1:])

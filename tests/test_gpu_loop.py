"""The training loop as a GPU needs it, checked on the CPU: no host synchronisation inside an update and one
per log line, the foreach EMA equal to diffusers' reference, device-resident data equal to per-step decoding,
fused AdamW's on-device skip of a non-finite update, and torch.compile equal to eager."""

import contextlib

import diffusers
import pytest
import torch
from conftest import random_png_folder
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from distill.config import load_config
from distill.ema import ForeachEMA
from distill.trainers import trainer_class

FAST = ["train.progress_bar=false", "train.report_to=none", "eval.enabled=false",
        "train.checkpointing_steps=1000"]

# every way a tensor's value reaches the host (a device synchronisation on a GPU)
SYNCS = [(torch.Tensor, name)
         for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")]


@contextlib.contextmanager
def counting_syncs():
    calls = []
    saved = [(owner, name, getattr(owner, name)) for owner, name in SYNCS]
    saved.append((torch.cuda, "synchronize", torch.cuda.synchronize))

    def wrap(name, fn):
        def counted(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return counted

    for owner, name, fn in saved:
        setattr(owner, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


SYNC_CASES = {
    "sim": ("configs/sim_gaussians8.yaml", ["sim.init_denoiser_steps=2", "train.batch_size=64"]),
    "uni_instruct": ("configs/uni_instruct_gaussians8.yaml",
                     ["uni_instruct.init_denoiser_steps=2", "uni_instruct.ratio_warmup_steps=0",
                      "train.batch_size=64"]),
    "teacher": ("configs/teacher_gaussians8.yaml", ["train.batch_size=64"]),
    "progressive": ("configs/progressive_gaussians8.yaml",
                    ["progressive.init_denoiser_steps=2", "progressive.steps_per_round=100",
                     "train.batch_size=64"]),
    "guided": ("configs/guided_gaussians8.yaml",
               ["guided.init_denoiser_steps=2", "guided.stage_one_steps=100", "train.batch_size=64"]),
    "msd": ("configs/msd_gaussians8.yaml", ["msd.num_students=2", "train.batch_size=64"]),
    "mar": ("configs/mar_digits.yaml",
            ["train.batch_size=8", "mar.depth=1", "mar.width=32", "mar.head_width=32"]),
}


@pytest.mark.parametrize("method", list(SYNC_CASES))
def test_updates_never_synchronise_and_a_log_line_synchronises_once(tmp_path, method):
    config, extra = SYNC_CASES[method]
    cfg = load_config(config,
                      FAST + extra + [f"output_dir={tmp_path}", "train.log_every=5", "train.max_steps=200"])
    trainer = trainer_class(cfg.method)(cfg)
    trainer.setup()
    trainer.train_iteration()  # first use: constants (t*, nulls, grids) reach the device once
    with counting_syncs() as calls:
        for _ in range(10):
            trainer.train_iteration()
    # MAR reads its masking ratio from the host generator (a CPU value also on a GPU run: no device wait)
    allowed = ["__float__"] * 10 if method == "mar" else []
    assert calls == allowed, f"{method}: host synchronisations inside updates: {sorted(set(calls))}"
    logs = trainer.train_iteration()
    with counting_syncs() as calls:
        state = trainer._synchronize(logs)
    assert calls == ["tolist"], calls  # logs, counters and the non-finite state in one read
    assert (state["bad_run"] == 0 and state["logs"]
            and all(isinstance(v, float) for v in state["logs"].values()))


def test_the_loop_reads_the_device_once_per_log_line(tmp_path, monkeypatch):
    cfg = load_config("configs/sim_gaussians8.yaml",
                      FAST + [f"output_dir={tmp_path}", "train.max_steps=30", "train.log_every=10",
                              "sim.init_denoiser_steps=2"])
    trainer = trainer_class("sim")(cfg)
    reads = []
    real = trainer._synchronize
    monkeypatch.setattr(trainer, "_synchronize", lambda logs: reads.append(trainer.step) or real(logs))
    trainer.train()
    assert reads == [10, 20, 30]
    assert [h["step"] for h in trainer.history] == [10, 20, 30]


def test_foreach_ema_equals_diffusers_reference_ema():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300, 7)) for _ in range(3)]
    # frozen: copied, as diffusers does
    params.append(torch.nn.Parameter(torch.randn(5), requires_grad=False))
    ref, ours = EMAModel(params, decay=0.999, foreach=False), ForeachEMA(params, decay=0.999)
    for _ in range(40):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        ref.step(params)
        ours.step(params)
    assert ours.optimization_step == ref.optimization_step == 40
    for a, b in zip(ours.shadow_params, ref.shadow_params):
        assert torch.equal(a, b)
    assert ours.state_dict().keys() == ref.state_dict().keys()


def _teacher_run(tmp_path, name, images, *extra):
    cfg = load_config("configs/teacher_digits.yaml", FAST + [
        f"output_dir={tmp_path / name}", f"data.spec={images}", "data.resolution=16", "data.channels=3",
        "train.max_steps=3", "train.batch_size=4", "student.block_out_channels=[8,16]", *extra])
    trainer = trainer_class("teacher")(cfg)
    trainer.setup()
    return trainer


def test_images_cached_on_the_device_give_the_run_of_per_step_decoding(tmp_path):
    images = random_png_folder(tmp_path / "images", 12, size=16)
    cached = _teacher_run(tmp_path, "cached", images)
    streamed = _teacher_run(tmp_path, "streamed", images, "data.device_cache_gib=0")
    assert cached.data.x.dtype == torch.uint8 and not hasattr(streamed.data, "x")
    for i in range(len(streamed.data)):  # the bytes give back the decoded floats exactly
        assert torch.equal(cached.data[i]["x"], streamed.data[i]["x"])
    for trainer in (cached, streamed):
        trainer.train()
    a = load_file(tmp_path / "cached" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "streamed" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fused_adamw_skips_a_non_finite_update_on_the_device(tmp_path):
    cfg = load_config("configs/sim_gaussians8.yaml",
                      FAST + [f"output_dir={tmp_path}", "sim.init_denoiser_steps=2"])
    trainer = trainer_class("sim")(cfg)
    trainer.setup()
    opt = trainer.optimizers["student"]
    assert getattr(opt, "optimizer", opt).defaults["fused"]
    trainer.train_iteration()
    net = trainer.unwrap("student")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    moments = {k: v.clone() for k, v in getattr(opt, "optimizer", opt).state[next(net.parameters())].items()}
    hook = next(net.parameters()).register_hook(lambda g: g * float("nan"))
    with counting_syncs() as calls:
        trainer.train_iteration()
    hook.remove()
    assert calls == []
    # weights, moments, step count kept
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    state = getattr(opt, "optimizer", opt).state[next(net.parameters())]
    assert all(torch.equal(moments[k], state[k]) for k in moments)
    assert trainer._synchronize(None)["bad_run"] == 1
    trainer.train_iteration()  # a finite step moves the weights again and ends the run of bad steps
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert trainer._synchronize(None)["bad_run"] == 0


@pytest.mark.slow
def test_compiled_training_gives_the_eager_student(tmp_path):
    """train.compile=true (torch.compile, inductor on the CPU) trains the toy SIM config to the same
    student."""
    weights = {}
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        cfg = load_config("configs/sim_gaussians8.yaml",
                          FAST + [f"output_dir={out}", "train.max_steps=20", "sim.init_denoiser_steps=5",
                                  f"train.compile={str(compiled).lower()}"])
        trainer = trainer_class("sim")(cfg)
        trainer.train()
        assert (trainer.compile_seconds is not None) == compiled
        weights[compiled] = load_file(out / "pipeline" / "generator" / "diffusion_pytorch_model.safetensors")
        pipe = diffusers.DiffusionPipeline.from_pretrained(out / "pipeline", trust_remote_code=True)
        assert pipe(batch_size=4, output_type="np").images.shape == (4, 2)
    for k, ref in weights[False].items():
        rel = (weights[True][k] - ref).norm() / ref.norm()
        assert rel < 1e-3, (k, float(rel))


def test_a_checkpoint_of_a_non_fused_optimizer_resumes_with_fused_adamw(tmp_path):
    """A checkpoint's optimizer param groups carry the saving run's implementation flags (written before
    fused AdamW, or by a sharded run with the foreach one); loading them used to leave a foreach AdamW that
    refuses the on-device ``found_inf`` skip at the first step. The resumed run uses fused AdamW and goes
    on."""
    import json

    from distill.checkpoint import latest_checkpoint

    common = FAST + [f"output_dir={tmp_path}", "sim.init_denoiser_steps=2", "train.checkpointing_steps=2"]
    trainer_class("sim")(load_config("configs/sim_gaussians8.yaml", common + ["train.max_steps=2"])).train()
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    for f in ckpt.glob("optim_*.json"):  # as a checkpoint written with the foreach AdamW
        state = json.loads(f.read_text())
        for group in state["param_groups"]:
            group.update(fused=None, foreach=True)
        f.write_text(json.dumps(state))
    cfg = load_config("configs/sim_gaussians8.yaml", common + ["train.max_steps=4",
                                                                "train.resume_from_checkpoint=latest"])
    resumed = trainer_class("sim")(cfg)
    resumed.train()
    assert resumed.step == 4
    for opt in resumed.optimizers.values():
        assert all(g["fused"] and not g["foreach"] for g in getattr(opt, "optimizer", opt).param_groups)

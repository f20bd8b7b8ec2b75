"""Sharded training (train.fsdp: PyTorch FSDP2 over gloo on CPU, 2 processes): the same weights as unsharded
data parallel, checkpoints in the unsharded format that resume at another process count, sharded or not,
after the sharded run was killed."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from distill.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent
COMMON = ["train.batch_size=8", "train.report_to=none", "train.progress_bar=false", "eval.enabled=false",
          "train.checkpointing_steps=2"]
ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# Adam's first updates are lr * g / |g|: a float reduction-order difference can move a weight by a small part
# of lr = 1e-4; 1e-5 is a tenth of one update
TOL = 1e-5


def command(config, out, processes, *extra):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
              str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "distill"]
    return (launch if processes > 1 else [sys.executable, "-m", "distill"]) + [
        "train", config, f"output_dir={out}", *COMMON, *extra]


def run(config, out, processes, *extra):
    res = subprocess.run(command(config, out, processes, *extra), cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def kill_every_process_of(launch, marker: str) -> None:
    """SIGKILL the launcher and its workers (torchrun starts the workers in sessions of their own, so the
    launcher's process group does not reach them): every process whose command line names ``marker``."""
    os.killpg(launch.pid, signal.SIGKILL)
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit()
                    and marker in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def start(config, out, processes, *extra):
    """The run in its own process group (so that a kill reaches every process of the launch)."""
    return subprocess.Popen(command(config, out, processes, *extra), cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def max_difference(a: Path, b: Path) -> float:
    worst = 0.0
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*.safetensors"))
    for f in files:
        x, y = load_file(a / f), load_file(b / f)
        assert x.keys() == y.keys(), f
        worst = max([worst] + [(x[k].float() - y[k].float()).abs().max().item() for k in x])
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/sim_digits.yaml", "configs/uni_instruct_digits.yaml"])
def test_fsdp_matches_data_parallel_and_resumes_at_another_process_count(tmp_path, config):
    # steps 1-2 on 2 processes (sharded / unsharded), then steps 3-4 on 1 process from the step-2 checkpoint;
    # the sharded run is killed (SIGKILL, no chance to write anything) once its step-2 checkpoint exists
    killed = start(config, tmp_path / "fsdp", 2, "train.max_steps=100000", "train.fsdp=true",
                   "train.checkpoints_total_limit=null")
    step2 = Path("checkpoints") / "checkpoint-2"
    deadline = time.time() + 300
    while not (tmp_path / "fsdp" / step2 / "trainer_state.json").is_file() and time.time() < deadline:
        assert killed.poll() is None, killed.communicate()[1][-3000:]
        time.sleep(0.2)
    kill_every_process_of(killed, str(tmp_path / "fsdp"))
    out, _ = killed.communicate()
    assert "sharding: FSDP2 over 2 process(es)" in out
    run(config, tmp_path / "ddp", 2, "train.max_steps=2")
    # model, optimizer and EMA files: the unsharded format, with the same values
    assert max_difference(tmp_path / "ddp" / step2, tmp_path / "fsdp" / step2) < TOL
    for name in ("fsdp", "ddp"):
        run(config, tmp_path / name, 1, "train.max_steps=4",
            f"train.resume_from_checkpoint={tmp_path / name / step2}")
    assert max_difference(tmp_path / "ddp" / "pipeline", tmp_path / "fsdp" / "pipeline") < TOL
    # and the other way: an unsharded checkpoint resumes sharded
    if "sim" in config:
        for name, extra in (("to_fsdp", ["train.fsdp=true"]), ("to_ddp", [])):
            run(config, tmp_path / name, 1, "train.max_steps=2")
            run(config, tmp_path / name, 2, "train.max_steps=4", *extra)
        assert max_difference(tmp_path / "to_ddp" / "pipeline", tmp_path / "to_fsdp" / "pipeline") < TOL
        a = load_file(tmp_path / "to_ddp" / "pipeline" / "generator" / "diffusion_pytorch_model.safetensors")
        b = load_file(tmp_path / "ddp" / "pipeline" / "generator" / "diffusion_pytorch_model.safetensors")
        # the process schedules differ: data differs
        assert max((a[k] - b[k]).abs().max().item() for k in a) > 0


def test_fsdp_refusals(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="train.fsdp .* supported by methods sim, uni_instruct"):
        load_config("configs/progressive_digits.yaml", ["train.fsdp=true"])
    with pytest.raises(ConfigError, match="does not support student.lora_rank"):
        load_config("configs/sim_digits.yaml", ["train.fsdp=true", "student.lora_rank=4"])
    with pytest.raises(ConfigError, match="does not support train.gradient_accumulation_steps"):
        load_config("configs/sim_digits.yaml", ["train.fsdp=true", "train.gradient_accumulation_steps=2"])
    # an Accelerate FSDP launch turns train.fsdp on (and so is refused for a method that cannot shard)
    from distill.engine import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cfg = load_config("configs/teacher_digits.yaml", [f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="train.fsdp .* supported by methods"):
        make_accelerator(cfg)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    from distill.trainers import trainer_class

    cfg = load_config("configs/sim_digits.yaml", [f"output_dir={tmp_path / 'one'}", "train.fsdp=true",
                                                  "train.max_steps=1", "eval.enabled=false"])
    with pytest.raises(ConfigError, match="single process"):
        trainer_class("sim")(cfg).setup()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="uses DeepSpeed.*one model per engine"):
        make_accelerator(load_config("configs/sim_digits.yaml", [f"output_dir={tmp_path}"]))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_fsdp_shards_transformer_blocks_and_matches_data_parallel(tmp_path, family):
    """A tiny SD3 / FLUX.1 teacher's full SIM student, sharded block by block (transformer_blocks and FLUX's
    single_transformer_blocks) over 2 processes: the same weights after 2 updates as unsharded data
    parallel."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_tiny_flux, make_tiny_sd3

    teacher = (make_tiny_sd3 if family == "sd3" else make_tiny_flux)(tmp_path / "teacher")
    (tmp_path / "prompts.txt").write_text("a red cat\na blue dog\na small house\na green tree\n")
    extra = [f"teacher.path={teacher}", f"data.spec=prompts:{tmp_path / 'prompts.txt'}", "train.max_steps=2",
             "train.mixed_precision=no", "student.lora_rank=null", "sim.gradient_checkpointing=false",
             *(["data.resolution=16"] if family == "flux" else [])]
    out = run(f"configs/sim_{family}.yaml", tmp_path / "fsdp", 2, "train.fsdp=true", *extra)
    assert "sharding: FSDP2 over 2 process(es)" in out
    run(f"configs/sim_{family}.yaml", tmp_path / "ddp", 2, *extra)
    assert max_difference(tmp_path / "ddp" / "pipeline", tmp_path / "fsdp" / "pipeline") < TOL

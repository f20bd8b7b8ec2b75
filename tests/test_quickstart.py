"""The builtin teacher, the main job and every command of the README."""

import os
import re
import subprocess
import sys
from pathlib import Path

import diffusers
import pytest
import torch

from distill.eval.extractors import DigitsNet, make_extractor
from distill.pipelines import FewStepPipeline
from distill.teachers import ASSETS

ROOT = Path(__file__).resolve().parent.parent
TINY_TRAIN = ["train.max_steps=3", "eval.num_samples=100", "eval.teacher_steps=[1,2]", "eval.batch_size=50",
              "train.progress_bar=false"]


def test_builtin_teacher_is_a_stock_ddpm_folder_with_recognisable_digits():
    pipe = diffusers.DDPMPipeline.from_pretrained(ASSETS / "digits_teacher")
    assert isinstance(pipe.unet, diffusers.UNet2DModel)
    sampler = FewStepPipeline(pipe.unet, pipe.scheduler, num_inference_steps=50)
    sampler.set_progress_bar_config(disable=True)
    x = sampler(batch_size=200, generator=torch.Generator().manual_seed(0), output_type="pt").images
    ext, _, _ = make_extractor("digits")
    u8 = (x * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    with torch.no_grad():
        probs = ext.net(DigitsNet.preprocess(u8))[1].softmax(1)
    assert probs.max(1).values.mean() > 0.9
    assert len(set(probs.argmax(1).tolist())) == 10


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    cmds = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                cmds.append(line)
    return cmds


def _run(cmd: list[str], cwd, expect_ok=True, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "2",
           **(env or {})}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if expect_ok:
        assert res.returncode == 0, (cmd, res.stdout[-2000:], res.stderr[-3000:])
    return res


MAIN_JOB = "distill launch configs/quickstart.yaml"


def _main_job(tmp_path):
    """The README's main job with tiny overrides, and its "Use the result" Python block on the result."""
    cmds = _readme_commands()
    assert "make quickstart" in cmds and "make test" in cmds  # CI runs `make test` itself (.ci/run)
    assert MAIN_JOB in cmds
    out = tmp_path / "outputs" / "quickstart"
    res = _run(MAIN_JOB.split() + [f"output_dir={out}", *TINY_TRAIN], ROOT)
    assert "student FID" in res.stdout and (out / "pipeline" / "model_index.json").is_file()
    assert (out / "report" / "fid_report.json").is_file()
    code = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S).group(1)
    code = "import torch\n" + code.replace("outputs/quickstart", str(out))
    _run([sys.executable, "-c", code], ROOT)
    return cmds, out


def test_the_readme_main_job_runs(tmp_path):
    _main_job(tmp_path)


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path):
    """Every bash command and Python block of the README (slow: several minutes; CI runs it)."""
    cmds, out = _main_job(tmp_path)
    ran = {MAIN_JOB}
    for cmd in cmds:
        if cmd in ran or cmd.startswith("make "):
            continue
        ran.add(cmd)
        args = (cmd.replace("outputs/quickstart", str(out))
                .replace("outputs/msd_demo", str(tmp_path / "msd_demo")).split())
        args = [str(tmp_path / a)
                if a in ("grid.png", "report/", "teacher_report/", "trajectory.png", "hybrid_report/",
                         "digits_stats.npz", "stats_report/", "cifar10_report/")
                else a for a in args]
        if "--num-samples" in args:
            args[args.index("--num-samples") + 1] = "100"
        # the text-to-image FID command, on a tiny SD-format teacher and its SIM student
        if "--prompts" in args:
            args = _tiny_text_to_image_args(args, tmp_path)
        # tiny: the README's MAR block samples it
        if args[:3] == ["distill", "launch", "configs/mar_digits.yaml"]:
            _run(args
                 + ["train.max_steps=2", "mar.width=16", "mar.num_heads=2", "mar.depth=1",
                    "mar.head_width=16", "mar.head_depth=1", "train.batch_size=8",
                    f"output_dir={tmp_path / 'mar_digits'}"], ROOT)
            continue
        # 30 minutes as shipped: 3 updates here
        if args[:3] == ["distill", "launch", "configs/best_digits.yaml"]:
            _run(args
                 + ["train.max_steps=3", "optim.lr_milestones=[2]", "eval.num_samples=100",
                    "eval.teacher_steps=[1]", f"output_dir={tmp_path / 'best_digits'}"], ROOT)
            assert (tmp_path / "best_digits" / "report" / "fid_report.md").is_file()
            continue
        # the noise-family commands, shortened
        if any(a.startswith(("teacher.noise=", "teacher_train.noise=")) for a in args):
            _run(args + ["train.max_steps=3", "train.sample_every=0", "eval.enabled=false",
                         f"output_dir={tmp_path / ('family_' + str(len(ran)))}"], ROOT)
            continue
        # the CIFAR-10 protocol: no CIFAR-10 student or EDM statistics here, a one-line message
        if "cifar10-32x32.npz" in args:
            res = _run(args, ROOT, expect_ok=False)
            assert res.returncode == 2 and res.stderr.startswith("distill: error:"), res.stderr[-2000:]
            continue
        # reads the Hub teacher's config files: offline, a message
        if args[:2] == ["distill", "estimate-memory"]:
            res = _run(args, ROOT, expect_ok=False)
            assert res.returncode == 2 and "HF_HUB_OFFLINE" in res.stderr
            continue
        if "--config_file" in args:  # the FSDP launch config, on 2 CPU processes (it names 8 GPUs)
            at = args.index("--config_file") + 2
            args[at:at] = ["--num_processes", "2", "--mixed_precision", "no"]
            res = _run(args + ["train.max_steps=1", f"output_dir={tmp_path / 'fsdp'}"], ROOT, expect_ok=False,
                       env={"ACCELERATE_USE_CPU": "1"})
            assert res.returncode != 0 and "HF_HUB_OFFLINE" in res.stderr + res.stdout
            continue
        if args[:2] == ["distill", "launch"]:
            # the real-teacher example: offline it must fail fast with a message naming the fix
            res = _run(args + ["train.max_steps=1", "eval.enabled=false", f"output_dir={tmp_path / 'cifar'}"],
                       ROOT, expect_ok=False)
            assert res.returncode != 0 and "HF_HUB_OFFLINE" in res.stderr + res.stdout
            continue
        _run(args, ROOT)
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "teacher_report" / "fid_report.md").is_file()
    assert (tmp_path / "sd_report" / "fid_report.md").is_file()
    assert "FID statistics, sha256" in (tmp_path / "stats_report" / "fid_report.md").read_text()
    assert ((tmp_path / "trajectory.png").is_file()
            and "Vendi" in (tmp_path / "hybrid_report" / "fid_report.md").read_text())
    # the Python block of the hybrid-sampling section
    code = next(c for c in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
                if "HybridPipeline.from_pipelines" in c)
    _run([sys.executable, "-c",
          code.replace("outputs/quickstart", str(out)) + "\nassert len(out.trajectory) == 2"],
         ROOT)
    # the Python block of the MAR section, on the tiny run's export
    code = next(c for c in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
                if "MaskedAutoregressive" in c or "step_schedule=" in c)
    _run([sys.executable, "-c", code.replace("outputs/mar_digits", str(tmp_path / "mar_digits"))
          + "\nassert len(out.images) == 10 and out.diffusion_steps[0] == 50 and out.diffusion_steps[-1] == "
            "5"], ROOT)
    # the Python block of the LoRA section: a tiny SD-format teacher, its one-update LoRA SIM student
    code = next(c for c in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
                if "load_lora_weights" in c)
    from conftest import make_tiny_sd

    teacher = make_tiny_sd(tmp_path / "lora_sd" / "teacher")
    (tmp_path / "lora_sd" / "prompts.txt").write_text("a red cat\n")
    _run([sys.executable, "-m", "distill", "train", "configs/sim_sd15.yaml", f"teacher.path={teacher}",
          f"data.spec=prompts:{tmp_path / 'lora_sd' / 'prompts.txt'}", "train.max_steps=1",
          "train.batch_size=2", "train.mixed_precision=no", "train.report_to=none",
          "train.progress_bar=false", "student.lora_rank=4",
          f"output_dir={tmp_path / 'lora_sd' / 'run'}"], ROOT)
    code = code.replace("runwayml/stable-diffusion-v1-5", str(teacher)).replace(
        "outputs/sim_sd15/lora", str(tmp_path / "lora_sd" / "run" / "lora"))
    _run([sys.executable, "-c", code + "\nassert image.size == (16, 16)"], ROOT)
    # the Python block of "Use the student without distill", on the tiny SD student of the FID command
    code = next(c for c in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
                if "StableDiffusionPipeline.from_pretrained(path)" in c)
    student = tmp_path / "sd" / "student" / "pipeline"
    checks = ("\nimport numpy as np, sys"
              "\nassert np.abs(np.asarray(image, float) - np.asarray(same, float)).max() <= 1"
              "\nassert type(ours).__name__ == 'TextToImagePipeline' and 'distill' not in sys.modules")
    code = code.replace("outputs/sim_sd15/pipeline", str(student)).replace(
        '"my_student"', repr(str(tmp_path / "my_student")))
    _run([sys.executable, "-c", code + checks], tmp_path)
    assert (tmp_path / "my_student" / "text_to_image.py").is_file()
    # the Python block of the multi-student section, on the demo run's export
    code = next(c for c in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
                if "MultiStudentPipeline" in c)
    _run([sys.executable, "-c", code.replace("outputs/msd_demo", str(tmp_path / "msd_demo"))
          + "\nassert x.shape == (4, 2) and len(pipe.students) == 4"], ROOT)


def _tiny_text_to_image_args(args: list[str], tmp_path) -> list[str]:
    """The README's SD commands with the Hub teacher, the prompt file, the student and the reference images
    replaced by tiny offline stand-ins (a random SD-format pipeline, a one-update SIM student, random
    PNGs)."""
    from conftest import make_tiny_sd, random_png_folder

    root = tmp_path / "sd"
    teacher = make_tiny_sd(root / "teacher")
    prompts = root / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    refs = random_png_folder(root / "refs", 8)
    student = root / "student"
    _run([sys.executable, "-m", "distill", "train", "configs/sim_sd15.yaml", f"teacher.path={teacher}",
          f"data.spec=prompts:{prompts}", "train.max_steps=1", "train.batch_size=2",
          "train.mixed_precision=no", "train.report_to=none", "train.progress_bar=false",
          f"output_dir={student}"], ROOT)
    swap = {"outputs/sim_sd15/pipeline": str(student / "pipeline"), "prompts.txt": str(prompts),
            "coco_val_images/": str(refs), "runwayml/stable-diffusion-v1-5": str(teacher),
            "sd_report/": str(tmp_path / "sd_report")}
    args = [swap.get(a, a) for a in args]
    args[args.index("--num-samples") + 1] = "4"
    return args


@pytest.mark.slow
def test_full_quickstart_student_beats_teacher_4_steps(tmp_path):
    res = _run([sys.executable, "-m", "distill", "quickstart", f"output_dir={tmp_path}",
                "train.progress_bar=false"],
               ROOT)
    import json

    report = json.loads((tmp_path / "report" / "fid_report.json").read_text())
    fid = {(r["model"], r["steps"]): r["fid"] for r in report["results"]}
    assert fid[("student", 1)] < fid[("teacher", 4)], (fid, res.stdout[-1000:])

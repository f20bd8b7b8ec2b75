"""The bad-input catalogue: user mistakes end in one line that names the bad value and the fix, exit code 2,
no traceback. One table, run in-process through the command-line entry point (`distill ...`); the
materials it needs (damaged teacher folders, a finished run, a checkpoint of another method) are built
once per session in a temporary folder OUT."""

import shutil
from pathlib import Path

import pytest

from distill.cli import main
from distill.errors import ConfigError
from distill.teachers import ASSETS

COND = str(ASSETS / "digits_teacher_cond")
DIGITS = str(ASSETS / "digits_teacher")
SIM = "configs/sim_digits.yaml"
TOY = "configs/sim_gaussians8.yaml"
RUN = ["train.max_steps=2", "train.progress_bar=false", "train.report_to=none"]
TOY_RUN = [*RUN, "sim.init_denoiser_steps=2", "train.checkpointing_steps=1", "output_dir=OUT/toyrun"]
CKPT = "OUT/toyrun/checkpoints/checkpoint-2"

CASES = [
    # (name, argv (OUT is the materials folder), message)
    # --- configs and overrides
    ("config file missing", ["train", "configs/nope.yaml"], "Config file 'configs/nope.yaml' not found"),
    ("unknown key", ["train", SIM, "train.max_step=2"], "Unknown config key 'train.max_step'"),
    ("override without a value", ["train", SIM, "train.max_steps"], "must look like key.sub=value"),
    ("not an integer", ["train", SIM, "train.max_steps=abc"],
     "train.max_steps: expected an integer, got 'abc'"),
    ("not a choice", ["train", SIM, "train.mixed_precision=fp32"], "'fp32' is not allowed; choose one of"),
    ("fp16", ["train", SIM, "train.mixed_precision=fp16"], "train.mixed_precision: 'fp16' is refused"),
    ("impossible value", ["train", SIM, "train.max_steps=0"], "train.max_steps: 0 is impossible"),
    ("msd batch not a multiple", ["train", "configs/msd_gaussians8.yaml", "train.batch_size=30"],
     "train.batch_size=30 is not a multiple of msd.num_students=4"),
    ("msd partition file not given", ["train", "configs/msd_gaussians8.yaml", "msd.partition=file"],
     "msd.partition: 'file' needs msd.partition_file"),
    ("guidance scale in a guided run", ["train", "configs/guided_digits.yaml", "teacher.guidance_scale=2"],
     "guided distillation samples its own guidance scales"),
    ("output_dir is a file", ["train", TOY, "output_dir=OUT/afile"],
     "output_dir='OUT/afile' is a file, not a folder"),
    # --- teachers
    ("builtin teacher typo", ["train", SIM, "teacher.path=builtin:digit", "output_dir=OUT/run"],
     "No builtin teacher 'builtin:digit': the builtin teachers are builtin:digits, builtin:digits-cond"),
    ("Hub id offline", ["train", SIM, "teacher.path=google/ddpm-cifar10-32", "output_dir=OUT/run"],
     "HF_HUB_OFFLINE is set: unset it"),
    ("local path typo that looks like a Hub id",
     ["train", SIM, "teacher.path=teachers/digitz", "output_dir=OUT/run"],
     "'teachers/digitz' is not a local folder (nothing at"),
    ("absolute path typo", ["train", SIM, "teacher.path=OUT/nothere", "output_dir=OUT/run"],
     "No pipeline folder at 'OUT/nothere'"),
    ("truncated model_index.json", ["train", SIM, "teacher.path=OUT/bad_index", "output_dir=OUT/run"],
     "model_index.json' is not valid JSON"),
    ("corrupt safetensors", ["train", SIM, "teacher.path=OUT/bad_weights", "output_dir=OUT/run"],
     "Could not load the teacher's unet from 'OUT/bad_weights'"),
    ("a folder that is no pipeline", ["train", SIM, "teacher.path=OUT/not_a_pipeline", "output_dir=OUT/run"],
     "has no model_index.json: it is not a diffusers pipeline folder"),
    ("guidance on an unconditional teacher", ["train", SIM, "teacher.guidance_scale=3", "output_dir=OUT/run"],
     "teacher.guidance_scale=3.0 needs a class-conditional teacher"),
    ("copy of a teacher without weights", ["train", TOY, "student.arch=copy", "output_dir=OUT/run"],
     "student.arch: 'copy' needs a teacher with weights"),
    # --- data
    ("data channels do not match the teacher", ["train", SIM, "data.channels=3", "output_dir=OUT/run"],
     "data.channels=3 does not match the teacher: 'builtin:digits' makes 1x8x8 images"),
    ("data resolution does not match the teacher", ["train", SIM, "data.resolution=16", "output_dir=OUT/run"],
     "data.resolution=16 does not match the teacher"),
    ("data of another shape", ["train", SIM, "data.spec=toy:gaussians8", "output_dir=OUT/run"],
     "data.spec='toy:gaussians8' gives samples of shape 2, but the teacher 'builtin:digits' takes 1x8x8"),
    ("data folder missing", ["train", SIM, "data.spec=OUT/nodata", "output_dir=OUT/run"],
     "Data folder 'OUT/nodata' not found"),
    ("Hub data offline", ["train", SIM, "data.spec=uoft-cs/cifar10", "output_dir=OUT/run"],
     "Could not load the Hub dataset 'uoft-cs/cifar10'"),
    ("unknown sklearn data", ["train", SIM, "data.spec=sklearn:iris", "output_dir=OUT/run"],
     "Unknown sklearn data 'sklearn:iris'"),
    ("unknown toy data", ["train", TOY, "data.spec=toy:moons", "output_dir=OUT/run"],
     "Unknown toy data 'toy:moons'"),
    ("prompt file missing", ["train", SIM, "data.spec=prompts:OUT/none.txt", "output_dir=OUT/run"],
     "Prompt file 'OUT/none.txt' not found"),
    ("label dropout without labels", ["teacher", "configs/teacher_gaussians8.yaml", "data.spec=toy:swissroll",
                                      "teacher_train.label_dropout=0.1", "output_dir=OUT/run"],
     "teacher_train.label_dropout=0.1 needs labelled data"),
    # --- evaluation at start-up
    ("Inception weights missing",
     ["train", SIM, "eval.feature_extractor=inception-v3-compat", "output_dir=OUT/run"],
     "Inception weights not found at"),
    # --- runs, checkpoints, resume
    ("resume of another method", ["train", "configs/uni_instruct_gaussians8.yaml", *RUN,
                                  f"train.resume_from_checkpoint={CKPT}", "output_dir=OUT/run"],
     "belongs to another run (saved -> this config): method: 'sim' -> 'uni_instruct'"),
    ("resume with another teacher", ["train", TOY, *RUN, "teacher.path=analytic:gaussians25",
                                     f"train.resume_from_checkpoint={CKPT}", "output_dir=OUT/run"],
     "teacher.path: 'analytic:gaussians8' -> 'analytic:gaussians25'"),
    ("resume from a folder that is no checkpoint",
     ["train", TOY, *RUN, "train.resume_from_checkpoint=OUT/nothere", "output_dir=OUT/run"],
     "train.resume_from_checkpoint='OUT/nothere' is not a checkpoint folder"),
    ("new run into a finished run's folder", ["train", TOY, *TOY_RUN, "optim.lr=0.001"],
     "holds another finished run"),
    # --- sampling and FID
    ("class label out of range",
     ["sample", COND, "--class-labels", "12,3,-1", "--num-images", "4", "--steps", "1", "--out", "OUT/g.png"],
     "class_labels [-1, 12] are out of range: they must lie in [0, 10] (10 = null class)"),
    ("class labels not integers", ["sample", COND, "--class-labels", "a", "--out", "OUT/g.png"],
     "--class-labels 'a': give integers separated by commas"),
    ("guidance scale on an unconditional model",
     ["sample", DIGITS, "--guidance-scale", "3", "--out", "OUT/g.png"],
     "--guidance-scale 3.0: a DDPMPipeline takes no guidance scale (an unconditional or one-step model)"),
    ("sample zero images", ["sample", DIGITS, "--num-images", "0", "--out", "OUT/g.png"],
     "'0' is not a positive integer"),
    ("sample from a missing folder", ["sample", "OUT/nothere", "--out", "OUT/g.png"],
     "No pipeline folder at 'OUT/nothere'"),
    ("trajectory of a non-hybrid pipeline", ["sample", DIGITS, "--trajectory", "--out", "OUT/g.png"],
     "--trajectory / --num-base-steps need a hybrid pipeline folder"),
    ("fid with zero samples",
     ["fid", DIGITS, "--reference", "sklearn:digits", "--num-samples", "0", "--out", "OUT/r"],
     "'0' is not a positive integer"),
    ("fid at zero steps", ["fid", DIGITS, "--reference", "sklearn:digits", "--steps", "0", "--out", "OUT/r"],
     "'0': give step counts >= 1"),
    ("fid guidance on an unconditional model",
     ["fid", DIGITS, "--reference", "sklearn:digits", "--guidance-scales", "2", "--num-samples", "10",
      "--out", "OUT/r"],
     "--guidance-scales"),
    ("fid of 2-D samples",
     ["fid", "OUT/toyrun/pipeline", "--reference", "toy:gaussians8", "--num-samples", "10", "--out", "OUT/r"],
     "FID needs image data"),
    ("fid at steps of a pipeline that takes none",
     ["fid", "OUT/mar", "--reference", "sklearn:digits", "--steps", "4",
       "--num-samples", "10", "--out", "OUT/r"],
     "steps=4: a MaskedAutoregressivePipeline takes no num_inference_steps"),
    ("fid with an unknown metric", ["fid", DIGITS, "--reference", "sklearn:digits", "--metrics", "fid,lpips",
                                    "--num-samples", "10", "--out", "OUT/r"],
     "Unknown metrics ['lpips']"),
]


@pytest.fixture(scope="module")
def materials(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    (out / "afile").write_text("not a folder")
    (out / "not_a_pipeline").mkdir()
    shutil.copytree(DIGITS, out / "bad_index")
    text = (out / "bad_index" / "model_index.json").read_text()
    (out / "bad_index" / "model_index.json").write_text(text[: len(text) // 2])
    shutil.copytree(DIGITS, out / "bad_weights")
    weights = out / "bad_weights" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    # a finished run: 2 steps
    assert main(["train", TOY, *[a.replace("OUT", str(out)) for a in TOY_RUN]]) == 0
    import diffusers

    from distill import MaskedAutoregressiveModel, MaskedAutoregressivePipeline, export_pipeline

    mar = MaskedAutoregressiveModel(sample_size=8, patch_size=2, width=16, depth=1, num_heads=2,
                                    head_width=16, head_depth=1)
    export_pipeline(MaskedAutoregressivePipeline(mar,
                                                 diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")),
                    out / "mar")
    return out


@pytest.mark.parametrize("name, argv, message", CASES, ids=[c[0] for c in CASES])
def test_user_mistake_gives_one_clear_line(name, argv, message, materials, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no Inception weights there
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)  # the repository: configs/ paths
    try:
        rc = main([a.replace("OUT", str(materials)) for a in argv])
    except SystemExit as exit_:  # argparse's own errors
        rc = exit_.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message.replace("OUT", str(materials)) in err, err
    assert "Traceback" not in err and err.count("error:") == 1, err


def test_catalogue_size(capsys):
    with capsys.disabled():
        print(f"\nbad-input catalogue: {len(CASES)} user mistakes, each one line naming the value and the "
              "fix")
    assert len(CASES) >= 40


def test_readme_troubleshooting_messages_are_the_asserted_ones():
    import re

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    shown = re.findall(r"^\| `(.+?)` \|", section, flags=re.M)
    asserted = [m for _, _, m in CASES]
    assert len(shown) >= 7
    for message in shown:
        assert any(message.replace("...", "OUT/afile") in a or message in a for a in asserted), message


@pytest.mark.slow
@pytest.mark.parametrize("argv, message", [
    (["train.max_step=2"], "Unknown config key 'train.max_step'"),  # checked before any process starts
    (["teacher.path=builtin:digit"], "No builtin teacher 'builtin:digit'"),  # raised in the launched process
])
def test_distill_launch_ends_in_the_message_and_the_exit_code(argv, message, tmp_path):
    """`distill launch` (accelerate launch -m distill train): no Accelerate traceback after distill's line."""
    import os
    import subprocess

    res = subprocess.run(["distill", "launch", "--num_processes", "1", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", SIM,
                          f"output_dir={tmp_path / 'run'}", *argv],
                         cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                         timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2, res.stderr[-3000:]
    assert (message in res.stderr and "Traceback" not in res.stderr
            and res.stderr.count("error:") == 1), res.stderr


def test_a_library_version_or_api_mismatch_is_named_not_called_a_damaged_file(monkeypatch):
    """The shipped teacher under a diffusers whose from_pretrained does not take distill's call: one line
    naming the package and its installed version; with an installed version outside setup.cfg's range, the
    package, that version and the range needed."""
    from importlib import metadata

    import diffusers

    from distill.teachers import Teacher

    def old_api(*args, **kwargs):
        raise TypeError("__init__() got an unexpected keyword argument 'dtype'")

    monkeypatch.setattr(diffusers.UNet2DModel, "from_pretrained", old_api)
    with pytest.raises(ConfigError) as err:
        Teacher.from_pretrained("builtin:digits")
    msg = str(err.value)
    assert f"diffusers {diffusers.__version__}" in msg and "damaged" not in msg and "\n" not in msg
    needed = next(r for r in metadata.requires("distill") if r.startswith("diffusers"))
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.1.0" if name == "diffusers" else real(name))
    with pytest.raises(ConfigError) as err:
        Teacher.from_pretrained("builtin:digits")
    assert f"diffusers 0.1.0 is installed, distill needs {needed.replace(' ', '')}" in str(err.value)

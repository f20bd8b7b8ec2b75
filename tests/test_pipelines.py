"""Pipelines: samplers against diffusers, the export contract, loading without distill."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

import distill
from distill import FewStepPipeline, MLPDenoiser, OneStepPipeline, export_pipeline, load_pipeline


def _ddim(pred="epsilon"):
    return diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=pred,
                                   timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_few_step_equals_diffusers_ddim_loop(tiny_unet, pred):
    unet = tiny_unet()
    sched = _ddim(pred)
    pipe = FewStepPipeline(unet, sched, num_inference_steps=4)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sched.set_timesteps(4)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    torch.testing.assert_close(out, (x / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=1e-5)


def test_few_step_uses_stored_grid_and_stochastic_is_seeded(tiny_unet):
    pipe = FewStepPipeline(tiny_unet(), _ddim("v_prediction"), num_inference_steps=2, timesteps=[999, 600])
    pipe.set_progress_bar_config(disable=True)
    assert pipe.grid() == [999, 600]
    assert pipe.grid(4) == [999, 749, 499, 249]
    a = pipe(batch_size=2, generator=torch.Generator().manual_seed(1), output_type="pt",
             stochastic=True).images
    b = pipe(batch_size=2, generator=torch.Generator().manual_seed(1), output_type="pt",
             stochastic=True).images
    c = pipe(batch_size=2, generator=torch.Generator().manual_seed(1), output_type="pt").images
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-4
    with pytest.raises(ValueError, match="descending"):
        pipe(timesteps=[100, 500])


def test_one_step_math_and_labels():
    torch.manual_seed(0)
    net = MLPDenoiser(data_dim=2, hidden=16, num_layers=1, time_embed_dim=8, num_class_embeds=4)
    sched = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
    pipe = OneStepPipeline(net, sched, generator_timestep=600, num_classes=3)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=5, generator=torch.Generator().manual_seed(0), output_type="pt").images
    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    ac = sched.alphas_cumprod[600]
    x_in = (1 - ac).sqrt() * z
    eps = net(x_in, torch.full((5,), 600), class_labels=torch.tensor([0, 1, 2, 0, 1])).sample
    torch.testing.assert_close(out, (x_in - (1 - ac).sqrt() * eps) / ac.sqrt())
    assert out.shape == (5, 2) and isinstance(pipe(batch_size=2, output_type="np").images, np.ndarray)
    with pytest.raises(ValueError, match=r"class_labels \[7\] are out of range: they must lie in \[0, 3\]"):
        pipe(batch_size=2, class_labels=[0, 7])
    with pytest.raises(ValueError, match="exactly 1 step"):
        pipe(num_inference_steps=2)


def _fresh_python(code: str, tmp_path) -> str:
    """Run code in a fresh interpreter, with a clean HF modules cache, never importing distill."""
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin",
           "DIFFUSERS_VERBOSITY": "error"}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.parametrize("kind", ["one_step_unet", "one_step_mlp", "few_step"])
def test_export_loads_in_plain_diffusers_with_identical_images(tmp_path, tiny_unet, kind):
    if kind == "one_step_unet":
        pipe = OneStepPipeline(tiny_unet(), _ddim(), generator_timestep=500)
    elif kind == "one_step_mlp":
        torch.manual_seed(1)
        pipe = OneStepPipeline(MLPDenoiser(data_dim=2, hidden=16, num_layers=1, time_embed_dim=8),
                               diffusers.DDPMScheduler(prediction_type="sample"), generator_timestep=999)
    else:
        pipe = FewStepPipeline(tiny_unet(), _ddim("v_prediction"), num_inference_steps=2,
                               timesteps=[999, 400])
    pipe.set_progress_bar_config(disable=True)
    path = export_pipeline(pipe, tmp_path / "pipe", {"method": "test"})
    assert not list(path.rglob("*.bin")) and list(path.rglob("*.safetensors"))
    index = json.loads((path / "model_index.json").read_text())
    assert isinstance(index["_class_name"], list) and (path / f"{index['_class_name'][0]}.py").is_file()
    ref = pipe(batch_size=3, generator=torch.Generator().manual_seed(7), output_type="np").images
    np.save(tmp_path / "ref.npy", ref)
    out = _fresh_python(f"""
        import sys, numpy as np, torch, diffusers
        diffusers.utils.logging.disable_progress_bar()
        pipe = diffusers.DiffusionPipeline.from_pretrained({str(path)!r}, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        img = pipe(batch_size=3, generator=torch.Generator().manual_seed(7), output_type="np").images
        assert not any(m.startswith("distill") for m in sys.modules), "distill was imported"
        ref = np.load({str(tmp_path / 'ref.npy')!r})
        print("MAXDIFF", float(np.abs(img - ref).max()), type(pipe).__name__)
    """, tmp_path)
    line = [ln for ln in out.splitlines() if ln.startswith("MAXDIFF")][0]
    assert float(line.split()[1]) == 0.0, out
    for loaded in (load_pipeline(str(path)), type(pipe).from_pretrained(path)):
        loaded.set_progress_bar_config(disable=True)
        again = loaded(batch_size=3, generator=torch.Generator().manual_seed(7), output_type="np").images
        np.testing.assert_array_equal(again, ref)


def test_export_is_atomic_and_card_written(tmp_path, tiny_unet):
    pipe = OneStepPipeline(tiny_unet(), _ddim())
    export_pipeline(pipe, tmp_path / "p", {"method": "sim", "teacher": "google/ddpm-cifar10-32"})
    export_pipeline(pipe, tmp_path / "p", {"method": "sim2"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]
    card = (tmp_path / "p" / "README.md").read_text()
    assert "library_name: diffusers" in card and "sim2" in card


def test_load_pipeline_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        distill.load_pipeline(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        distill.load_pipeline(str(tmp_path / "empty"))


def test_pil_output_for_grayscale(tiny_unet):
    pipe = OneStepPipeline(tiny_unet(), _ddim())
    pipe.set_progress_bar_config(disable=True)
    imgs = pipe(batch_size=2, generator=torch.Generator().manual_seed(0)).images
    assert len(imgs) == 2 and imgs[0].size == (8, 8) and imgs[0].mode == "RGB"
    tup = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="np", return_dict=False)
    assert isinstance(tup, tuple) and tup[0].shape == (2, 8, 8, 1)


def test_save_pretrained_and_push_to_hub_of_loaded_and_composed_pipelines_stay_self_contained(
        tmp_path, tiny_unet, monkeypatch):
    """diffusers' own save_pretrained of a loaded distill pipeline, and of a hybrid composed in memory
    (HybridPipeline.from_pipelines, a distill model class as a component), writes what export_pipeline writes:
    the folders load in a Python without distill (trust_remote_code) with the same images; push_to_hub uploads
    that folder with the export's model card."""
    from distill.models import GaussianMixtureTeacher

    student = FewStepPipeline(tiny_unet(), _ddim("v_prediction"), num_inference_steps=2, timesteps=[999, 400])
    export_pipeline(student, tmp_path / "export",
                    {"method": "progressive", "teacher": "google/ddpm-cifar10-32"})
    loaded = load_pipeline(str(tmp_path / "export"))
    loaded.save_pretrained(tmp_path / "resaved")
    gmm = GaussianMixtureTeacher([[-1.0, 0.5], [1.5, -0.5]], [0.3, 0.2])
    base = FewStepPipeline(gmm, diffusers.DDPMScheduler(), num_inference_steps=4, sample_shape=[2])
    one = OneStepPipeline(GaussianMixtureTeacher([[0.0, 1.0], [1.0, 0.0]], [0.1, 0.1]),
                          diffusers.DDPMScheduler(), generator_timestep=625, sample_shape=[2])
    hybrid = distill.HybridPipeline.from_pipelines(base, one, num_base_steps=1)
    hybrid.save_pretrained(tmp_path / "hybrid")
    index = json.loads((tmp_path / "hybrid" / "model_index.json").read_text())
    assert index["_class_name"] == ["hybrid", "HybridPipeline"] and index["base_unet"][0] == "distill_gmm"
    assert (tmp_path / "hybrid" / "base_unet" / "distill_gmm.py").is_file()
    refs = {}
    for name, pipe in (("resaved", loaded), ("hybrid", hybrid)):
        pipe.set_progress_bar_config(disable=True)
        refs[name] = pipe(batch_size=3, generator=torch.Generator().manual_seed(7), output_type="np").images
        np.save(tmp_path / f"{name}.npy", refs[name])
    out = _fresh_python(f"""
        import sys, numpy as np, torch, diffusers
        diffusers.utils.logging.disable_progress_bar()
        for name in ("resaved", "hybrid"):
            pipe = diffusers.DiffusionPipeline.from_pretrained({str(tmp_path)!r} + "/" + name,
                                                               trust_remote_code=True)
            pipe.set_progress_bar_config(disable=True)
            img = pipe(batch_size=3, generator=torch.Generator().manual_seed(7), output_type="np").images
            ref = np.load({str(tmp_path)!r} + "/" + name + ".npy")
            print("MAXDIFF", name, float(np.abs(img - ref).max()), type(pipe).__name__)
            pipe.save_pretrained({str(tmp_path)!r} + "/" + name + "_again")  # no distill here either
        assert not any(m.startswith("distill") for m in sys.modules), "distill was imported"
    """, tmp_path)
    lines = [ln.split() for ln in out.splitlines() if ln.startswith("MAXDIFF")]
    assert [(ln[1], float(ln[2]), ln[3]) for ln in lines] == [("resaved", 0.0, "FewStepPipeline"),
                                                              ("hybrid", 0.0, "HybridPipeline")]
    again = load_pipeline(str(tmp_path / "hybrid_again"))  # saved by the plain-diffusers copy of the code
    again.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(again(batch_size=3, generator=torch.Generator().manual_seed(7),
                                        output_type="np").images, refs["hybrid"])
    # push_to_hub: the Hub calls replaced by recorders; the uploaded folder is the self-contained one
    import huggingface_hub

    uploaded = {}

    def upload(self, folder, repo_id, **kw):
        folder = Path(folder)
        uploaded.update(files=sorted(str(p.relative_to(folder)) for p in folder.rglob("*")), repo=repo_id,
                        card=(folder / "README.md").read_text())

    monkeypatch.setattr(huggingface_hub, "create_repo",
                        lambda repo_id, **kw: type("R", (), {"repo_id": repo_id})())
    monkeypatch.setattr(type(loaded), "_upload_folder", upload)
    loaded.push_to_hub("me/student")
    assert uploaded["repo"] == "me/student" and "few_step.py" in uploaded["files"]
    assert "progressive" in uploaded["card"] and "base_model: google/ddpm-cifar10-32" in uploaded["card"]

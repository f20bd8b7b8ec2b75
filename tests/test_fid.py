"""FID evaluation: closed forms, agreement with torch-fidelity, caching, the digits extractor."""

import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image
from scipy import linalg
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from distill.cli import main
from distill.data import digits
from distill.eval.extractors import DIGITS_NAME, DIGITS_WEIGHTS, digits_accuracy, make_extractor
from distill.eval.fid import (
    compute_metrics,
    extract_features,
    metrics_from_features,
    reference_features,
    to_uint8,
)


class TableExtractor(FeatureExtractorBase):
    """Returns given features: image i (index encoded in its first pixels) -> table[i]."""

    def __init__(self, table):
        super().__init__("table", ["feat"])
        self.table = table

    @staticmethod
    def get_provided_features_list():
        return ("feat",)

    def forward(self, x):
        idx = x[:, 0, 0, 0].long() * 256 + x[:, 1, 0, 0].long()
        return (self.table[idx],)


def save_image_folder(images_u8, folder):
    """uint8 (B, 3, H, W) images as PNGs 000000.png, 000001.png, ... in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images_u8.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(img).save(folder / f"{i:06d}.png")


def _index_images(n):
    i = torch.arange(n)
    img = torch.zeros(n, 3, 2, 2, dtype=torch.uint8)
    img[:, 0, 0, 0], img[:, 1, 0, 0] = (i // 256).to(torch.uint8), (i % 256).to(torch.uint8)
    return img


def test_fid_of_gaussian_features_equals_closed_form():
    g = torch.Generator().manual_seed(0)
    d, n = 8, 6000
    m1, m2 = torch.zeros(d), torch.linspace(-0.5, 0.5, d)
    s1, s2 = torch.linspace(0.5, 1.5, d), torch.linspace(1.0, 2.0, d)
    f1 = (m1 + s1.sqrt() * torch.randn(n, d, generator=g)).double()
    f2 = (m2 + s2.sqrt() * torch.randn(n, d, generator=g)).double()
    table = torch.cat([f1, f2]).float()
    ext = TableExtractor(table)
    imgs = _index_images(2 * n)
    a = extract_features(imgs[:n], ext, 500, verbose=False)
    b = extract_features(imgs[n:], ext, 500, verbose=False)
    fid = metrics_from_features(a, b, ("fid",), "feat")["fid"]
    # closed form on the sample statistics (scipy sqrtm), to 1e-6 relative
    x1, x2 = a["feat"].double().numpy(), b["feat"].double().numpy()
    mu1, mu2 = x1.mean(0), x2.mean(0)
    c1, c2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    exact = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    assert fid == pytest.approx(exact, rel=1e-5)
    # and the population closed form within sampling error
    pop = float(((m1 - m2) ** 2).sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum())
    assert fid == pytest.approx(pop, abs=0.05)
    # a set against itself: 0 up to rounding
    assert abs(metrics_from_features(a, a, ("fid",), "feat")["fid"]) < 1e-6  # reported unclamped


def _noised_digits(sigma, seed):
    x = (digits(8).x / 2 + 0.5)
    g = torch.Generator().manual_seed(seed)
    return to_uint8((x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1))


def test_distill_fid_equals_torch_fidelity_on_same_pngs(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    a, b = _noised_digits(0.1, 1)[:600], _noised_digits(0.0, 2)[600:1200]
    save_image_folder(a, tmp_path / "a")
    save_image_folder(b, tmp_path / "b")
    ours = compute_metrics(str(tmp_path / "a"), str(tmp_path / "b"), metrics=("fid", "kid", "isc"),
                           feature_extractor="digits")
    # the report's own names for the extractor, its layer and weights reproduce it in torch-fidelity
    assert (ours["torch_fidelity_feature_extractor"], ours["feature_layer_fid"]) == (DIGITS_NAME, "feat64")
    ref = torch_fidelity.calculate_metrics(input1=str(tmp_path / "a"), input2=str(tmp_path / "b"), cuda=False,
                                           fid=True, kid=True, isc=True, kid_subset_size=600,
                                           feature_extractor=ours["torch_fidelity_feature_extractor"],
                                           feature_layer_fid=ours["feature_layer_fid"],
                                           feature_extractor_weights_path=ours["feature_extractor_weights"],
                                           cache=False, verbose=False, save_cpu_ram=True,
                                           samples_find_ext="png")
    assert abs(ours["fid"] - ref["frechet_inception_distance"]) < 1e-6
    assert ours["kid"] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-6, abs=1e-6)
    assert ours["isc"] == pytest.approx(ref["inception_score_mean"], rel=1e-6, abs=1e-6)
    assert ours["feature_extractor"] == "digits" and ours["num_samples"] == 600


def test_reference_cache_is_keyed_by_data_and_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    ext, name, w = make_extractor("digits")
    data = _noised_digits(0.0, 0)[:300]
    f1, i1 = reference_features(data, ext, name, w)
    f2, i2 = reference_features(data, ext, name, w)
    assert not i1["reference_cached"] and i2["reference_cached"]
    assert torch.equal(f1["feat64"], f2["feat64"])
    _, i3 = reference_features(_noised_digits(0.0, 0)[:299], ext, name, w)  # other data
    assert not i3["reference_cached"]
    # other weights under the same name: a fresh computation, different features
    from safetensors.torch import load_file, save_file

    sd = load_file(str(DIGITS_WEIGHTS))
    sd = {k: v * 1.01 for k, v in sd.items()}
    save_file(sd, str(tmp_path / "w2.safetensors"))
    ext2, name2, w2 = make_extractor("digits", str(tmp_path / "w2.safetensors"))
    f4, i4 = reference_features(data, ext2, name2, w2)
    assert not i4["reference_cached"] and not torch.equal(f4["feat64"], f1["feat64"])


def test_digits_extractor_accuracy_and_noise_monotonic(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    assert digits_accuracy() >= 0.97
    ref = _noised_digits(0.0, 0)
    fids = [compute_metrics(_noised_digits(s, 3), ref, ("fid",))["fid"] for s in (0.0, 0.05, 0.1, 0.2, 0.4)]
    assert abs(fids[0]) < 1e-6  # the set against itself, unclamped
    assert all(x < y for x, y in zip(fids, fids[1:])), fids


def test_inception_without_weights_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError,
                       match="weights-inception-2015-12-05-6726825d.pth.*feature-extractor-weights"):
        make_extractor("inception-v3-compat")


def test_fid_cli_on_image_folder_writes_report(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    save_image_folder(_noised_digits(0.05, 5)[:400], tmp_path / "imgs")
    assert main(["fid", str(tmp_path / "imgs"), "--reference", "sklearn:digits", "--num-samples", "400",
                 "--resolution", "8", "--out", str(tmp_path / "rep")]) == 0
    import json

    rep = json.loads((tmp_path / "rep" / "fid_report.json").read_text())
    for key in ("feature_extractor", "feature_extractor_sha256", "torch_fidelity_version", "reference",
                "seed", "torch_fidelity_feature_extractor", "feature_layer_fid", "feature_extractor_weights"):
        assert key in rep
    assert "feature_layer_fid='feat64'" in (tmp_path / "rep" / "fid_report.md").read_text()
    r = rep["results"][0]
    assert r["model"] == "images" and r["fid"] > 0 and r["num_samples"] == 400
    assert (tmp_path / "rep" / "fid_report.md").read_text().count("|") > 10
    assert Image.open(tmp_path / "rep" / "samples_images-0step.png").size[0] > 0


def test_readme_torch_fidelity_reproduction_snippet_runs(tmp_path, monkeypatch):
    """The README's FID-protocol snippet: a report's names reproduce its FID in torch-fidelity."""
    import re
    import textwrap
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "calculate_metrics" in b)
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    save_image_folder(_noised_digits(0.1, 1)[:300], tmp_path / "samples")
    save_image_folder(_noised_digits(0.0, 2)[300:600], tmp_path / "reference")
    exec(textwrap.dedent(block), {})


@pytest.mark.parametrize("argv, message", [
    (["fid", "X", "--reference", "sklearn:digits", "--steps", "0"], "'0': give step counts >= 1"),
    (["fid", "X", "--reference", "sklearn:digits", "--steps", "1,two"], "'1,two': give step counts >= 1"),
    (["fid", "X", "--reference", "sklearn:digits", "--num-samples", "0"], "'0' is not a positive integer"),
    (["sample", "X", "--out", "g.png", "--num-images", "0"], "'0' is not a positive integer"),
    (["sample", "X", "--out", "g.png", "--steps", "-2"], "'-2' is not a positive integer"),
])
def test_cli_refuses_zero_counts_with_a_message(argv, message, capsys):
    """`--steps 0` used to sample at 50 steps and report NFE 0; zero sample / image counts crashed later."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_fid_refuses_guidance_scales_for_an_unconditional_model(tmp_path, capsys):
    """--guidance-scales on an unconditional pipeline used to be ignored silently."""
    from distill.teachers import ASSETS

    rc = main(["fid", str(ASSETS / "digits_teacher"), "--reference", "sklearn:digits", "--num-samples", "10",
               "--guidance-scales", "1,3", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "--guidance-scales 1,3: no model here takes a guidance scale" in err
    assert not (tmp_path / "r").exists()


def test_fid_against_precomputed_statistics_equals_fid_against_the_images(tmp_path, monkeypatch, capsys):
    """`distill fid-stats` writes mu / sigma; `distill fid --reference FILE.npz` with it, and with the same
    mu / sigma re-saved in EDM's layout (mu, sigma) and ADM's (arr_0 next to them), gives the FID against the
    image folder itself (torch-fidelity's statistics both ways); the report names the file and its hash."""
    import hashlib
    import json

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    save_image_folder(_noised_digits(0.0, 1)[:500], tmp_path / "ref")
    save_image_folder(_noised_digits(0.1, 2)[:300], tmp_path / "gen")
    assert main(["fid-stats", str(tmp_path / "ref"), "--out", str(tmp_path / "stats.npz")]) == 0
    assert "500 images" in capsys.readouterr().out
    with np.load(tmp_path / "stats.npz", allow_pickle=False) as f:
        mu, sigma = f["mu"], f["sigma"]
        assert str(f["feature_extractor"]) == "digits" and int(f["num_images"]) == 500
    assert mu.shape == (64,) and sigma.shape == (64, 64)
    np.savez(tmp_path / "edm.npz", mu=mu, sigma=sigma)
    np.savez(tmp_path / "adm.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=mu, sigma=sigma)
    direct = compute_metrics(str(tmp_path / "gen"), str(tmp_path / "ref"), ("fid",))["fid"]
    assert direct > 1.0
    for name in ("stats", "edm", "adm"):
        out = tmp_path / f"rep_{name}"
        assert main(["fid", str(tmp_path / "gen"), "--reference", str(tmp_path / f"{name}.npz"),
                     "--out", str(out)]) == 0
        rep = json.loads((out / "fid_report.json").read_text())
        assert rep["results"][0]["fid"] == pytest.approx(direct, rel=1e-4)
        sha = hashlib.sha256((tmp_path / f"{name}.npz").read_bytes()).hexdigest()
        assert rep["reference_stats_sha256"] == sha and sha[:12] in (out / "fid_report.md").read_text()
    capsys.readouterr()
    # a statistics file gives FID only; a file of another extractor's dimension is named with the fix
    assert main(["fid", str(tmp_path / "gen"), "--reference", str(tmp_path / "edm.npz"), "--metrics",
                 "fid,kid", "--out", str(tmp_path / "x")]) == 2
    assert "pass --metrics fid" in capsys.readouterr().err
    np.savez(tmp_path / "inception.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    assert main(["fid", str(tmp_path / "gen"), "--reference", str(tmp_path / "inception.npz"),
                 "--out", str(tmp_path / "y")]) == 2
    assert "dimension 2048" in capsys.readouterr().err

"""Data specs."""

import math

import pytest
import torch
from PIL import Image

from distill.data import as_tensor, load_data, toy_mixture


def test_gaussians8_matches_spec():
    ds = load_data("toy:gaussians8", num_samples=8000, seed=0)
    x, y = as_tensor(ds)
    assert ds.num_classes == 8 and ds.sample_shape == [2] and x.shape == (8000, 2)
    for k in range(8):
        mk = torch.tensor([2 * math.cos(2 * math.pi * k / 8), 2 * math.sin(2 * math.pi * k / 8)])
        xs = x[y == k]
        assert (xs.mean(0) - mk).abs().max() < 0.02 and abs(xs.std(0).mean() - 0.1) < 0.01
    again, _ = as_tensor(load_data("toy:gaussians8", num_samples=8000, seed=0))
    assert torch.equal(x, again)


def test_gaussians25_and_swissroll():
    assert len(toy_mixture("gaussians25")["means"]) == 25
    ds = load_data("toy:gaussians25", num_samples=100)
    assert ds.num_classes == 25
    sr = load_data("toy:swissroll", num_samples=500)
    assert sr.num_classes == 0 and as_tensor(sr)[0].abs().max() < 3


def test_digits_resolution_and_range():
    ds = load_data("sklearn:digits", resolution=16)
    x, y = as_tensor(ds)
    assert x.shape == (1797, 1, 16, 16) and ds.num_classes == 10
    assert x.min() >= -1 and x.max() <= 1 and set(y.tolist()) == set(range(10))


def test_imagefolder_with_labels(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (12, 10), (200 if cls == "cat" else 10, 0, 0)).save(tmp_path / cls / f"{i}.png")
    ds = load_data(str(tmp_path), resolution=8)
    item = ds[0]
    assert item["x"].shape == (3, 8, 8) and ds.num_classes == 2 and len(ds) == 6
    assert -1 <= item["x"].min() and item["x"].max() <= 1


def test_typo_path_and_offline_hub_errors():
    with pytest.raises(FileNotFoundError, match="Data folder './no_such_dir' not found"):
        load_data("./no_such_dir")
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE"):
        load_data("uoft-cs/cifar10")
    with pytest.raises(ValueError, match="Unknown toy"):
        load_data("toy:moons")


def test_a_damaged_image_in_a_data_folder_is_skipped_with_a_warning(tmp_path):
    from conftest import random_png_folder

    folder = random_png_folder(tmp_path / "imgs", 5, size=12)
    (folder / "002_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    ds = load_data(str(folder), resolution=8)
    with pytest.warns(UserWarning, match="cannot be read.*skipped"):
        items = [ds[i] for i in range(len(ds))]
    assert len(items) == 6 and all(it["x"].shape == (3, 8, 8) for it in items)
    assert len(ds.damaged) == 1


def test_an_fid_reference_folder_of_mixed_sizes_is_resized_like_training_data(tmp_path):
    import numpy as np
    from PIL import Image

    from distill.eval.fid import reference_images

    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(16, 16), (20, 12), (16, 16), (9, 30)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    x = reference_images(str(tmp_path), resolution=8)
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.uint8
    assert reference_images(str(tmp_path)).shape == (4, 3, 16, 16)  # default: the most common size
    # a square image of the target size is kept as is; others are centre-cropped then resized (bicubic)
    same = np.asarray(Image.open(tmp_path / "0.png").convert("RGB"))
    assert np.array_equal(reference_images(str(tmp_path))[0].permute(1, 2, 0).numpy(), same)

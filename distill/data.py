"""Data specs shared by training and FID references.

A spec is a string:

* ``toy:gaussians8``  8 equal isotropic Gaussians, means 2 (cos 2 pi k/8, sin 2 pi k/8), std 0.1, label k
* ``toy:gaussians25`` 25 Gaussians on the grid {-2,-1,0,1,2}^2, std 0.1, label = grid index
* ``toy:swissroll``   2-D swiss roll (scaled to about [-2, 2]), no labels
* ``sklearn:digits``  the 1,797 8x8 sklearn digits, resized to ``resolution`` (default 16), labels 0-9
* ``prompts:FILE``     prompts only (text-to-image teachers): a text file with one prompt per line, or a
                       .csv / .jsonl file with a ``prompt``, ``caption`` or ``text`` column
* a local folder       an ``imagefolder`` (class sub-folders become labels; a ``metadata.jsonl`` /
                       ``metadata.csv`` with a caption column gives prompts)
* ``owner/name``       a Hugging Face dataset (image column auto-detected, label column optional, caption
                       column auto-detected among ``prompt``, ``caption``, ``text`` or set by
                       ``caption_column``)

Every dataset yields ``{"x": float tensor in [-1, 1] (images CxHxW, toys (2,)), "label": int}``
(label -1 when the data has none), plus ``"prompt"`` when it has captions (prompt data has no
``"x"``), and exposes ``sample_shape``, ``num_classes`` and ``has_images`` / ``has_prompts``.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import ConfigError

TOY_SPECS = ("toy:gaussians8", "toy:gaussians25", "toy:swissroll")
CAPTION_COLUMNS = ("prompt", "caption", "text")


class TensorData(Dataset):
    """In-memory data set of samples x (N, ...) and integer labels (N,)."""

    has_images, has_prompts = True, False

    def __init__(self, x: torch.Tensor, labels: torch.Tensor | None, num_classes: int, spec: str):
        self.x = x.float()
        self.labels = labels.long() if labels is not None else torch.full((len(x),), -1, dtype=torch.long)
        self.num_classes = num_classes
        self.spec = spec

    @property
    def sample_shape(self) -> list[int]:
        return list(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "label": self.labels[i]}


def toy_mixture(name: str) -> dict:
    """Means, stds and component classes of the Gaussian-mixture toys (for the exact teacher)."""
    if name == "gaussians8":
        ang = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
        means = 2 * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    elif name == "gaussians25":
        g = torch.arange(-2, 3, dtype=torch.float64)
        means = torch.cartesian_prod(g, g)
    else:
        raise ConfigError(f"No mixture for toy {name!r}; mixtures exist for gaussians8 and gaussians25.")
    k = len(means)
    return {"means": means.tolist(), "stds": [0.1] * k, "component_classes": list(range(k))}


def _toy(name: str, n: int, seed: int) -> TensorData:
    gen = torch.Generator().manual_seed(seed)
    if name in ("gaussians8", "gaussians25"):
        mix = toy_mixture(name)
        means = torch.tensor(mix["means"], dtype=torch.float32)
        labels = torch.randint(len(means), (n,), generator=gen)
        x = means[labels] + 0.1 * torch.randn(n, 2, generator=gen)
        return TensorData(x, labels, len(means), f"toy:{name}")
    if name == "swissroll":
        u = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=gen))
        x = (torch.stack([u * torch.cos(u), u * torch.sin(u)], 1) / 7.0
             + 0.05 * torch.randn(n, 2, generator=gen))
        return TensorData(x, None, 0, "toy:swissroll")
    raise ConfigError(f"Unknown toy data {('toy:' + name)!r}; choose one of {', '.join(TOY_SPECS)}.")


def _resize(x: torch.Tensor, resolution: int | None) -> torch.Tensor:
    if resolution is None or x.shape[-1] == resolution:
        return x
    return torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear",
                                           align_corners=False)


def digits(resolution: int = 16) -> TensorData:
    """sklearn's 8x8 digits in [-1, 1], bilinearly resized to ``resolution`` (1 channel)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1
    return TensorData(_resize(x, resolution).clamp(-1, 1), torch.tensor(d.target), 10, "sklearn:digits")


def square(img, resolution: int):
    """A PIL image centre-cropped to a square and resized (bicubic) to ``resolution``: training images and
    FID reference images alike."""
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img if img.size == (resolution, resolution) else img.resize((resolution, resolution), resample=3)


class ImageData(Dataset):
    """A Hugging Face / imagefolder data set, decoded and resized on access."""

    has_images = True

    def __init__(self, ds, image_col: str, label_col: str | None, resolution: int, channels: int, spec: str,
                 caption_col: str | None = None):
        self.ds, self.image_col, self.label_col = ds, image_col, label_col
        self.resolution, self.channels, self.spec = resolution, channels, spec
        self.num_classes = ds.features[label_col].num_classes if label_col else 0
        self.caption_col = caption_col
        self.has_prompts = caption_col is not None
        self.damaged: set[int] = set()

    @property
    def sample_shape(self) -> list[int]:
        return [self.channels, self.resolution, self.resolution]

    def __len__(self) -> int:
        return len(self.ds)

    def all_labels(self) -> torch.Tensor:
        """Every row's label (-1 without a label column), read from the column without decoding images."""
        if not self.label_col:
            return torch.full((len(self),), -1, dtype=torch.long)
        return torch.as_tensor(self.ds[self.label_col], dtype=torch.long)

    @property
    def prompts(self) -> list[str] | None:
        """Every row's caption (None without a caption column), read from the column."""
        if not self.caption_col:
            return None
        if not hasattr(self, "_prompts"):
            self._prompts = [str(p or "") for p in self.ds[self.caption_col]]
        return self._prompts

    def __getitem__(self, i):
        i = int(i)
        for k in [(i + j) % len(self) for j in range(min(len(self), 100))]:
            try:  # decoding happens here (datasets decodes lazily)
                row = self.ds[k]
                img = square(row[self.image_col].convert("RGB" if self.channels == 3 else "L"),
                             self.resolution)
                break
            except (OSError, SyntaxError, ValueError) as err:  # PIL: unreadable / truncated image files
                if k not in self.damaged:
                    self.damaged.add(k)
                    warnings.warn(f"{self.spec}: image {k} cannot be read ({type(err).__name__}: {err}); it "
                                  "is skipped (the next readable image takes its place).", stacklevel=2)
        else:
            raise ValueError(f"{self.spec}: none of the 100 images from {i} on can be read; check the data.")
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()) / 127.5 - 1
        x = arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1)
        label = int(row[self.label_col]) if self.label_col else -1
        item = {"x": x, "label": torch.tensor(label)}
        if self.caption_col:
            item["prompt"] = str(row[self.caption_col] or "")
        return item


class PromptData(Dataset):
    """Prompts only (``prompts:FILE``): text-to-image distillation that needs no images."""

    has_images, has_prompts, num_classes, sample_shape = False, True, 0, None

    def __init__(self, prompts: list[str], spec: str):
        self.prompts, self.spec = prompts, spec

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i):
        return {"prompt": self.prompts[int(i)], "label": torch.tensor(-1)}

    def all_labels(self) -> torch.Tensor:
        return torch.full((len(self),), -1, dtype=torch.long)


class CachedImages(Dataset):
    """An image data set decoded once into one uint8 tensor (N, C, H, W) (see :func:`cache_images`)."""

    has_images = True

    def __init__(self, x: torch.Tensor, labels: torch.Tensor, num_classes: int, spec: str,
                 prompts: list[str] | None):
        self.x, self.labels, self.num_classes, self.spec, self.prompts = x, labels, num_classes, spec, prompts
        self.has_prompts = prompts is not None

    @property
    def sample_shape(self) -> list[int]:
        return list(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        i = int(i)
        item = {"x": self.x[i].float() / 127.5 - 1, "label": self.labels[i]}
        if self.prompts is not None:
            item["prompt"] = self.prompts[i]
        return item


class _StepRows(torch.utils.data.Sampler):
    """The rows of each (step, micro-step) batch, in training order, for a DataLoader's ``batch_sampler``."""

    def __init__(self, keys: list[tuple[int, int]], rows_of):
        self.keys, self.rows_of = keys, rows_of

    def __iter__(self):
        for key in self.keys:
            yield self.rows_of(*key).tolist()

    def __len__(self) -> int:
        return len(self.keys)


def _stack_images(items: list[dict]) -> torch.Tensor:
    return torch.stack([it["x"] for it in items])


class StreamedImages:
    """Images of the coming batches decoded ahead in DataLoader workers (pinned memory, prefetch) for data
    sets too large to cache. ``rows_of(step, micro)`` gives a batch's rows (a CPU tensor, seeded per step, so
    the stream can start at any step: a resumed run reads the batches of an uninterrupted one). ``images(step,
    micro)`` returns that batch; asked out of order, it restarts the stream there."""

    def __init__(self, data: Dataset, rows_of, micro_steps: int, last_step: int, num_workers: int,
                 pin_memory: bool):
        self.data, self.rows_of, self.micro, self.last = data, rows_of, micro_steps, last_step
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.next_key, self.batches = None, None

    def images(self, step: int, micro: int) -> torch.Tensor:
        if (step, micro) != self.next_key:
            keys = [(s, m) for s in range(step, max(self.last, step + 1)) for m in range(self.micro)][micro:]
            loader = torch.utils.data.DataLoader(
                self.data, batch_sampler=_StepRows(keys, self.rows_of), num_workers=self.num_workers,
                pin_memory=self.pin_memory, collate_fn=_stack_images,
                prefetch_factor=2 if self.num_workers else None)
            self.batches = iter(loader)
        self.next_key = (step, micro + 1) if micro + 1 < self.micro else (step + 1, 0)
        return next(self.batches)


def cache_images(ds: Dataset, max_gib: float) -> CachedImages | None:
    """``ds`` decoded once into a uint8 tensor when it is an :class:`ImageData` of at most ``max_gib`` GiB
    (a training run then indexes it on the device instead of decoding images every step); else None.
    Decoding ``ImageData[i]`` maps bytes b to b / 127.5 - 1, so the bytes give back exactly those floats."""
    if not isinstance(ds, ImageData) or max_gib <= 0:
        return None
    n, shape = len(ds), ds.sample_shape
    if n * math.prod(shape) > max_gib * 2**30:
        return None
    from tqdm.auto import tqdm

    x = torch.empty((n, *shape), dtype=torch.uint8)
    for i in tqdm(range(n), desc=f"decoding {ds.spec} once", disable=n < 2000):
        x[i] = ((ds[i]["x"] + 1) * 127.5).round().to(torch.uint8)
    return CachedImages(x, ds.all_labels(), ds.num_classes, ds.spec, ds.prompts)


def read_prompts(path: str, column: str | None = None) -> list[str]:
    """Prompts of a .txt (one per line, blank lines skipped), .csv or .jsonl file (column ``column`` or the
    first of prompt / caption / text)."""
    import csv
    import json

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"Prompt file {path!r} not found (resolved to {str(p.resolve())!r}); "
                                "data.spec prompts:FILE needs a .txt file with one prompt per line, or a "
                                ".csv / .jsonl file.")
    if p.suffix.lower() in (".csv", ".jsonl"):
        if p.suffix.lower() == ".csv":
            with p.open(newline="") as f:
                rows = list(csv.DictReader(f))
        else:
            rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        keys = list(rows[0]) if rows else []
        col = column or next((c for c in CAPTION_COLUMNS if c in keys), None)
        if col is None or col not in keys:
            wanted = repr(column) if column else "prompt, caption or text"
            raise ConfigError(f"{path!r} has no {wanted} column (columns: {keys}); set data.caption_column.")
        prompts = [str(r[col]) for r in rows]
    else:
        prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"Prompt file {path!r} holds no prompts.")
    return prompts


def _hf_images(spec: str, resolution: int | None, channels: int, split: str,
               caption_column: str | None = None) -> ImageData:
    import datasets

    path = Path(spec).expanduser()
    looks_local = spec.startswith((".", "/", "~")) or path.exists() or spec.count("/") != 1
    if looks_local:
        if not path.is_dir():
            raise FileNotFoundError(
                f"Data folder {spec!r} not found (resolved to {str(path.resolve())!r}). Pass an existing "
                f"image folder, a Hub dataset id 'owner/name', or one of: {', '.join(TOY_SPECS)}, "
                "sklearn:digits.")
        ds = datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
    else:
        try:
            ds = datasets.load_dataset(spec, split=split)
        except (ConnectionError, OSError) as err:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get(
                "HF_DATASETS_OFFLINE", "0") not in ("", "0")
            raise ConnectionError(
                f"Could not load the Hub dataset {spec!r}: {err}. "
                + ("HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set; unset it to download, " if offline else "")
                + "or point data.spec at a local image folder.") from err
    image_cols = [k for k, f in ds.features.items() if isinstance(f, datasets.Image)]
    if not image_cols:
        raise ConfigError(f"Data set {spec!r} has no image column (columns: {list(ds.features)}).")
    label_cols = [k for k, f in ds.features.items() if isinstance(f, datasets.ClassLabel)]
    text_cols = [k for k, f in ds.features.items() if getattr(f, "dtype", None) == "string"]
    if caption_column is not None and caption_column not in text_cols:
        raise ConfigError(f"data.caption_column={caption_column!r} is not a text column of {spec!r} "
                         f"(text columns: {text_cols}).")
    caption = caption_column or next((c for c in CAPTION_COLUMNS if c in text_cols), None)
    res = resolution or ds[0][image_cols[0]].size[0]
    return ImageData(ds, image_cols[0], label_cols[0] if label_cols else None, res, channels, spec, caption)


def load_data(spec: str, resolution: int | None = None, num_samples: int = 20000, seed: int = 0,
              channels: int = 3, split: str = "train", caption_column: str | None = None) -> Dataset:
    """Build the data set named by ``spec`` (see the module docstring)."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"data spec must be a non-empty string, got {spec!r}.")
    if spec.startswith("prompts:"):
        return PromptData(read_prompts(spec[len("prompts:"):], caption_column), spec)
    if spec.startswith("toy:"):
        return _toy(spec[4:], num_samples, seed)
    if spec == "sklearn:digits":
        return digits(resolution or 16)
    if spec.startswith("sklearn:"):
        raise ConfigError(f"Unknown sklearn data {spec!r}; only sklearn:digits is provided.")
    return _hf_images(spec, resolution, channels, split, caption_column)


def as_tensor(ds: Dataset, max_items: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All (or the first max_items) samples and labels of a data set as two tensors."""
    if isinstance(ds, TensorData):
        n = len(ds) if max_items is None else min(max_items, len(ds))
        return ds.x[:n], ds.labels[:n]
    n = len(ds) if max_items is None else min(max_items, len(ds))
    items = [ds[i] for i in range(n)]
    return torch.stack([it["x"] for it in items]), torch.stack([torch.as_tensor(it["label"]) for it in items])

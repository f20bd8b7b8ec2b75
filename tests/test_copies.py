"""The standalone pipeline files keep marked copies of training-side math (``# Copied from distill.X.Y``
directly above the copied ``def``, as diffusers marks its copies): every copy must equal its original, and
training code must not import math from distill/pipelines/."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

import distill

ROOT = Path(distill.__file__).parent
MARKER = re.compile(r"^(\s*)# Copied from (\S+)(.*)$")
COPY_DIRS = ("pipelines", "models")
# pipeline classes the training side may import to build exports
ALLOWED_PIPELINE_IMPORTS = {"FewStepPipeline", "HybridPipeline", "MaskedAutoregressivePipeline",
                            "MultiStudentPipeline", "OneStepPipeline", "TextToImagePipeline"}


def _copy_files() -> list[Path]:
    return sorted(p for d in COPY_DIRS if (ROOT / d).is_dir() for p in (ROOT / d).rglob("*.py"))


def _copied_block(path: Path, marker_line: int) -> tuple[str, str]:
    """(name, source text) of the top-level def / class on the line after the marker at ``marker_line``
    (1-based); fails when the marker is not directly above a definition."""
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            if start == marker_line + 1:
                return node.name, "".join(lines[start - 1:node.end_lineno])
    raise AssertionError(f"{path.relative_to(ROOT.parent)}:{marker_line}: the '# Copied from' marker is not "
                         "directly above a top-level def or class.")


def _markers() -> list[tuple[Path, int, str]]:
    found = []
    for path in _copy_files():
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            m = MARKER.match(line)
            if m:
                assert not m.group(1) and not m.group(3).strip(), (
                    f"{path}:{i}: expected exactly '# Copied from distill.<module>.<name>' at column 0, got "
                    f"{line!r}")
                found.append((path, i, m.group(2)))
    return found


MARKERS = _markers()


def _resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    assert module.startswith("distill.") and not module.startswith("distill.pipelines"), (
        f"'{dotted}': a copy must come from a training-side module of distill, not from a pipeline.")
    return getattr(importlib.import_module(module), name)


def test_markers_found():
    targets = {t for _, _, t in MARKERS}
    for expected in ("distill.sampling.ddim_step", "distill.sampling.sample_ddim",
                     "distill.sampling.sample_meng_stochastic", "distill.sampling.trailing_timesteps",
                     "distill.sampling.vp_grid", "distill.text_encoding.encode_prompt",
                     "distill.text_encoding.sdxl_time_ids", "distill.text_encoding.latents_to_images",
                     "distill.text_encoding.guidance_embedding", "distill.partition.nearest_centroid",
                     "distill.partition.prompt_feature", "distill.denoiser.classifier_free_guidance"):
        assert expected in targets, f"no '# Copied from {expected}' marker under distill/pipelines/"


@pytest.mark.parametrize("path,line,target", MARKERS,
                         ids=[f"{p.parent.name}/{p.name}:{t}" for p, _, t in MARKERS])
def test_copy_matches_original(path, line, target):
    name, copy = _copied_block(path, line)
    assert name == target.rpartition(".")[2], f"{path.name}:{line}: marker names {target} above def {name}"
    original = inspect.getsource(_resolve(target))
    assert copy == original, (f"{path.relative_to(ROOT.parent)}:{line + 1} differs from {target}; edit the "
                              "original and copy it over (byte-identical).")


def test_training_code_imports_no_math_from_pipelines():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "pipelines":
            continue
        package = ["distill", *rel.parts[:-1]]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names = [a.name for a in node.names]
            if module == "distill":  # from . import pipelines
                if "pipelines" in names:
                    continue
            if not module.startswith("distill.pipelines"):
                continue
            bad += [f"{rel}:{node.lineno}: {module}.{n}" for n in names if n not in ALLOWED_PIPELINE_IMPORTS]
    assert not bad, "training code imports math from distill/pipelines/ (use the training-side module):\n" + (
        "\n".join(bad))


def test_copies_compute_the_same():
    from distill import partition, sampling, text_encoding
    from distill.pipelines import multi_student, samplers, text_to_image

    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    a, s = torch.rand(4, 1, 1, 1, generator=g) * 0.9 + 0.05, torch.rand(4, 1, 1, 1, generator=g) * 0.9 + 0.05
    assert torch.equal(sampling.ddim_step(x, d, a, s, 0.9, 0.3), samplers.ddim_step(x, d, a, s, 0.9, 0.3))

    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    times = sampling.vp_grid(ac, sampling.trailing_timesteps(4))
    assert torch.equal(times, samplers.vp_grid(ac, samplers.trailing_timesteps(4)))

    def model_fn(x_t, i, t):
        return torch.tanh(x_t) * (1 + 0.01 * t)

    for ours, theirs in ((sampling.sample_ddim, samplers.sample_ddim),
                         (sampling.sample_meng_stochastic, samplers.sample_meng_stochastic)):
        out = [f(model_fn, x, times, generator=torch.Generator().manual_seed(1)) for f in (ours, theirs)]
        assert torch.equal(*out)

    w = torch.rand(5, generator=g) * 7
    assert torch.equal(text_encoding.guidance_embedding(w, 33), text_to_image.guidance_embedding(w, 33))
    embeds, pooled = torch.randn(6, 7, 16, generator=g), torch.randn(6, 16, generator=g)
    for p in (None, pooled):
        assert torch.equal(partition.prompt_feature(embeds, p), multi_student.prompt_feature(embeds, p))
    feats, cents = partition.prompt_feature(embeds), torch.randn(3, 16, generator=g)
    assert torch.equal(partition.nearest_centroid(feats, cents), multi_student.nearest_centroid(feats, cents))

"""FID (Heusel et al. 2017), KID (Binkowski et al. 2018), IS (Salimans et al. 2016) and precision/recall
(Kynkaanniemi et al. 2019) through torch-fidelity.

distill feeds torch-fidelity; the metric arithmetic is torch-fidelity's own
(``fid_features_to_statistics`` / ``fid_statistics_to_metric``, ``kid_features_to_metric``,
``prc_features_to_metric``, ``isc_features_to_metric``), applied to features that its own
``get_featuresdict_from_dataset`` extracts. What distill adds:

* sources: a pipeline (generated in seeded batches, sharded over Accelerate processes and gathered,
  class labels balanced over classes), a folder of images, or a tensor; images are quantised to
  uint8 exactly as saved PNGs are (``round(255 x)``), grayscale repeated to RGB;
* references: a data spec (same syntax as training data), a saved feature file, or FID statistics (an .npz
  of mu and sigma: ``distill fid-stats``, EDM's or ADM's reference files; FID only);
* a reference cache keyed by a hash of the reference pixels, the extractor and its weights
  (torch-fidelity keys its cache by name only), stored as safetensors;
* ``cuda`` only when CUDA exists; KID subset size capped by the sample counts. FID is torch-fidelity's
  value as computed (not clamped: a set against itself gives a rounding-level number such as 5e-15);
* results (and so the reports of ``distill.eval.evaluate``) name the extractor as torch-fidelity knows it
  (``torch_fidelity_feature_extractor``, ``feature_layer_fid``, ``feature_extractor_weights``), so
  ``torch_fidelity.calculate_metrics(input1, input2, fid=True, feature_extractor=..., feature_layer_fid=...,
  feature_extractor_weights_path=...)`` on the same PNGs reproduces the report's FID (after
  ``import distill.eval.extractors``, which registers ``distill-digits`` with torch-fidelity).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..errors import ConfigError
from .extractors import fid_layer, file_sha256, make_extractor


def fidelity_version() -> str:
    import torch_fidelity

    return getattr(torch_fidelity, "__version__", "unknown")


class _UInt8Images(Dataset):
    """torch-fidelity input: a Dataset of bare uint8 CHW tensors."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def to_uint8(x: torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Float images (B, C, H, W) in value_range -> uint8 RGB, as a PNG of them would hold."""
    if x.dtype == torch.uint8:
        out = x
    else:
        lo, hi = value_range
        x01 = ((x.float() - lo) / (hi - lo)).clamp(0, 1)
        out = (x01 * 255).round().to(torch.uint8)
    if out.ndim != 4:
        raise ConfigError(f"FID needs image data (B, C, H, W); got samples of shape {tuple(out.shape)}. For "
                          "2-D toy data use the toy metrics (distill.eval.toy).")
    if out.shape[1] == 1:
        out = out.repeat(1, 3, 1, 1)
    return out.contiguous()


def load_image_folder(folder, resolution: int | None = None) -> torch.Tensor:
    """All PNG/JPG files of a folder (sorted by name) as uint8 RGB (B, 3, H, W). Images of another size than
    ``resolution`` (default: the most common size; non-square images included) are centre-cropped and resized
    like training data; unreadable files are skipped with a warning."""
    import warnings
    from collections import Counter

    from PIL import Image

    from ..data import square

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise FileNotFoundError(f"No PNG/JPG images in {str(folder)!r}.")
    images = []
    for f in files:
        try:
            images.append(Image.open(f).convert("RGB"))
        except (OSError, SyntaxError, ValueError) as err:
            warnings.warn(f"{f}: cannot be read ({type(err).__name__}: {err}); skipped.", stacklevel=2)
    if not images:
        raise FileNotFoundError(f"None of the {len(files)} images in {str(folder)!r} can be read.")
    sizes = Counter(img.size for img in images)
    res = resolution or min(sizes.most_common(1)[0][0])
    if len(sizes) > 1 or resolution:
        images = [square(img, res) for img in images]
    return torch.from_numpy(np.stack([np.asarray(img) for img in images])).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------- generation
def is_one_step(pipe) -> bool:
    return (type(pipe).__name__ == "OneStepPipeline"
            or getattr(getattr(pipe, "config", None), "generator_timestep", None) is not None)


def is_text_pipeline(pipe) -> bool:
    return getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "tokenizer", None) is not None


def pipeline_nfe(pipe, steps: int | None, num_base_steps: int | None = None,
                 num_base_substeps: int | None = None, **_call_kwargs) -> int:
    if type(pipe).__name__ == "HybridPipeline":  # base rows + student rows of one chain
        k = pipe.config.num_base_steps if num_base_steps is None else num_base_steps
        return len(pipe.schedule(k, steps, num_base_substeps)[0])
    if is_one_step(pipe):
        return 1
    if steps is not None:
        return int(steps)
    cfg = pipe.config
    if getattr(cfg, "timesteps", None):
        return len(cfg.timesteps)
    return int(getattr(cfg, "num_inference_steps", 1))


@torch.no_grad()
def generate(pipe, num_samples: int, batch_size: int = 250, seed: int = 0, steps: int | None = None,
             desc: str = "generating", prompts: list[str] | None = None, **call_kwargs) -> torch.Tensor:
    """uint8 samples of a pipeline. Batch b uses seed + b, so results do not depend on how many
    Accelerate processes share the work (batches are dealt round-robin and gathered). Text-to-image
    pipelines take sample i's prompt from ``prompts[i % len(prompts)]``."""
    from accelerate import PartialState

    state = PartialState()
    pipe.set_progress_bar_config(disable=True)
    num_classes = int(getattr(pipe.config, "num_classes", 0) or 0)
    stock_dit = type(pipe).__name__ == "DiTPipeline"  # the stock class-conditional pipeline: labels only
    if stock_dit:
        num_classes = int(pipe.transformer.config.num_embeds_ada_norm)
    n_batches = math.ceil(num_samples / batch_size)
    mine = list(range(state.process_index, n_batches, state.num_processes))
    kwargs = dict(call_kwargs)
    if steps is not None and not is_one_step(pipe):
        import inspect

        if "num_inference_steps" not in inspect.signature(pipe.__call__).parameters:
            raise ConfigError(f"steps={steps}: a {type(pipe).__name__} takes no num_inference_steps; drop "
                              "--steps (eval.teacher_steps) for it.")
        kwargs["num_inference_steps"] = steps
    text = is_text_pipeline(pipe)
    if text and not prompts:
        raise ConfigError("A text-to-image pipeline needs prompts for FID: pass --prompts FILE (distill "
                         "fid) or prompts=[...].")
    out = {}
    for b in tqdm(mine, desc=desc, disable=not state.is_main_process, leave=False):
        n = min(batch_size, num_samples - b * batch_size)
        if num_classes:
            kwargs["class_labels"] = torch.arange(b * batch_size, b * batch_size + n) % num_classes
        gen = torch.Generator().manual_seed(seed + b)
        if text:
            batch_prompts = [prompts[i % len(prompts)] for i in range(b * batch_size, b * batch_size + n)]
            x = pipe(prompt=batch_prompts, generator=gen, output_type="pt", **kwargs).images
        elif stock_dit:
            x = pipe(generator=gen, output_type="pt", **kwargs).images
        else:
            x = pipe(batch_size=n, generator=gen, output_type="pt", **kwargs).images
        if not isinstance(x, torch.Tensor):  # stock DDPMPipeline: "pt" gives a NHWC array in [0, 1]
            x = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)
        out[b] = to_uint8(x)
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        merged = {}
        for part in gather_object([out]):
            merged.update(part)
        out = merged
    return torch.cat([out[b] for b in range(n_batches)])


# ---------------------------------------------------------------------- features and metrics
def extract_features(images_u8: torch.Tensor, extractor, batch_size: int = 250, verbose: bool = True) -> dict:
    from torch_fidelity.utils import get_featuresdict_from_dataset

    return get_featuresdict_from_dataset(_UInt8Images(images_u8), extractor, batch_size, False, True, verbose)


def metrics_from_features(gen: dict, ref: dict, metrics, fid_layer: str, seed: int = 0) -> dict:
    """torch-fidelity's metric functions on feature dicts (gen = input1, ref = input2)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    out = {}
    f1, f2 = gen[fid_layer], ref[fid_layer]
    if "fid" in metrics:
        fid = fid_statistics_to_metric(fid_features_to_statistics(f1), fid_features_to_statistics(f2), False)
        out["fid"] = fid["frechet_inception_distance"]
    if "kid" in metrics:
        size = min(1000, len(f1), len(f2))
        kid = kid_features_to_metric(f1, f2, kid_subset_size=size, verbose=False)  # torch-fidelity rng_seed
        out["kid"] = kid["kernel_inception_distance_mean"]
        out["kid_std"] = kid["kernel_inception_distance_std"]
    if "prc" in metrics:
        prc = prc_features_to_metric(f1, f2, save_cpu_ram=True, verbose=False)
        out.update(precision=prc["precision"], recall=prc["recall"], f_score=prc["f_score"])
    if "isc" in metrics and "logits_unbiased" in gen:
        isc = isc_features_to_metric(gen["logits_unbiased"])
        out["isc"], out["isc_std"] = isc["inception_score_mean"], isc["inception_score_std"]
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill")) / "fid_refs"


def reference_images(reference: str, resolution: int | None = None) -> torch.Tensor:
    """uint8 images of a data spec or image folder."""
    from ..data import as_tensor, load_data

    ref = Path(reference)
    if ref.is_dir() and not any(ref.glob("*/")) and any(ref.glob("*.png")):
        return load_image_folder(ref, resolution)
    ds = load_data(reference, resolution=resolution,
                   channels=3 if not reference.startswith("sklearn:") else 1)
    x, _ = as_tensor(ds)
    if x.ndim != 4:
        raise ConfigError(f"FID needs image data; {reference!r} has samples of shape {tuple(x.shape[1:])}. "
                         "Use the toy metrics (distill.eval.toy) for 2-D data.")
    return to_uint8(x, (-1.0, 1.0))


def reference_features(reference, extractor, ext_name: str, weights_path, resolution: int | None = None,
                       batch_size: int = 250, use_cache: bool = True) -> tuple[dict, dict]:
    """Features of the reference (cached) and a description for the report."""
    from safetensors.torch import load_file, save_file

    if (isinstance(reference, (str, Path)) and str(reference).endswith(".safetensors")
            and Path(reference).is_file()):
        return load_file(str(reference)), {"reference": str(reference), "reference_file": True}
    images = (reference if isinstance(reference, torch.Tensor)
              else reference_images(str(reference), resolution))
    images = to_uint8(images)
    key = hashlib.sha256(images.numpy().tobytes()).hexdigest()[:20]
    wsha = file_sha256(weights_path)[:20]
    path = cache_dir() / f"ref-{key}-{ext_name}-{wsha}.safetensors"
    info = {"reference": str(reference) if not isinstance(reference, torch.Tensor) else "tensor",
            "reference_num_images": len(images), "reference_sha256": key,
            "reference_resolution": images.shape[-1]}
    if use_cache and path.is_file():
        return load_file(str(path)), {**info, "reference_cached": True}
    feats = extract_features(images, extractor, batch_size)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        save_file({k: v.contiguous() for k, v in feats.items()}, str(tmp))
        os.replace(tmp, path)
    return feats, {**info, "reference_cached": False}


def is_stats_file(reference) -> bool:
    return isinstance(reference, (str, Path)) and str(reference).endswith(".npz")


def fid_stats(reference, feature_extractor: str = "digits", feature_extractor_weights: str | None = None,
              resolution: int | None = None, batch_size: int = 250) -> dict:
    """mu and sigma (Heusel et al. 2017, eq. 2's Gaussian of the extractor's features; torch-fidelity's
    ``fid_features_to_statistics``) of a reference data spec or image folder, with what made them: the
    extractor, its layer and weights hash, the images' hash and count."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    extractor, ext_name, weights = make_extractor(feature_extractor, feature_extractor_weights)
    layer = fid_layer(feature_extractor)
    images = to_uint8(reference_images(str(reference), resolution))
    stats = fid_features_to_statistics(extract_features(images, extractor, batch_size)[layer])
    return {"mu": stats["mu"], "sigma": stats["sigma"], "feature_extractor": feature_extractor,
            "torch_fidelity_feature_extractor": ext_name, "feature_layer_fid": layer,
            "feature_extractor_sha256": file_sha256(weights),
            "data_sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest(), "num_images": len(images),
            "data": str(reference)}


def save_fid_stats(stats: dict, path) -> Path:
    """An .npz of mu, sigma (EDM's and ADM's key names) and the text fields as 0-d string arrays
    (no pickles), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.npz")
    np.savez(tmp, **{k: np.asarray(v) for k, v in stats.items()})
    os.replace(tmp, path)
    return path


def load_fid_stats(path) -> tuple[dict, dict]:
    """(mu / sigma, description) of a statistics file: distill's ``fid-stats`` output, EDM's reference
    statistics (``mu``, ``sigma``) or ADM's reference batch (``mu``, ``sigma`` next to ``arr_0``); read with
    ``allow_pickle=False``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--reference {str(path)!r}: no such statistics file; write one with `distill "
                          "fid-stats DATA --out FILE.npz` or pass a data spec.")
    with np.load(path, allow_pickle=False) as f:
        if "mu" not in f or "sigma" not in f:
            raise ConfigError(f"{str(path)!r} holds {sorted(f.files)}, not FID statistics: it needs 'mu' and "
                              "'sigma' (distill fid-stats, EDM's and ADM's reference files have them).")
        stats = {"mu": f["mu"], "sigma": f["sigma"]}
        info = {k: f[k].item() for k in ("feature_extractor", "feature_layer_fid", "data", "num_images",
                                          "data_sha256") if k in f}
    d = stats["mu"].shape
    if len(d) != 1 or stats["sigma"].shape != (d[0], d[0]):
        raise ConfigError(f"{str(path)!r}: mu has shape {stats['mu'].shape} and sigma "
                          f"{stats['sigma'].shape}; FID statistics are a vector and its square covariance.")
    return stats, {"reference": str(path), "reference_stats_sha256": file_sha256(path),
                   "reference_num_images": info.get("num_images"),
                   "reference_stats_extractor": info.get("feature_extractor"),
                   **({"reference_data": info["data"]} if "data" in info else {})}


def compute_metrics(source, reference, metrics=("fid",), num_samples: int = 1000,
                    feature_extractor: str = "digits", feature_extractor_weights: str | None = None,
                    batch_size: int = 250, seed: int = 0, steps: int | None = None,
                    resolution: int | None = None, use_cache: bool = True, return_images: bool = False,
                    prompts: list[str] | None = None, clip_model: str | None = None, diversity: bool = False,
                    **pipeline_kwargs) -> dict:
    """Metrics of ``source`` (pipeline, pipeline/image folder, or tensor) against ``reference``.

    Returns a dict with the metrics and ``num_samples``, ``nfe``, ``seconds``, ``samples_per_second``,
    ``feature_extractor``, ``feature_extractor_sha256``, ``torch_fidelity_version``, the extractor as
    torch-fidelity names it (``torch_fidelity_feature_extractor``, ``feature_layer_fid``,
    ``feature_extractor_weights``) and the reference info. With ``prompts`` (text-to-image) and
    ``clip_model`` (a local CLIP folder), also ``clip_score`` (see :func:`clip_score`). With ``diversity``,
    the mean pairwise cosine distance and the Vendi score of the extractor's features per condition (class
    i mod C, prompt i mod n, or all samples of an unconditional model), averaged (``distill.eval.diversity``).
    """
    metrics = tuple(metrics)
    unknown = set(metrics) - {"fid", "kid", "prc", "isc"}
    if unknown:
        raise ConfigError(f"Unknown metrics {sorted(unknown)}; choose from fid, kid, prc, isc.")
    extractor, ext_name, weights = make_extractor(feature_extractor, feature_extractor_weights)
    layer = fid_layer(feature_extractor)
    start = time.time()
    nfe = None
    if isinstance(source, (str, Path)):
        src = Path(source)
        if (src / "model_index.json").is_file():
            from ..export import load_pipeline

            source = teacher_as_sampler(load_pipeline(str(src)))
        else:
            source = load_image_folder(src)
    if isinstance(source, torch.Tensor):
        images = to_uint8(source)
    else:
        images = generate(source, num_samples, batch_size, seed, steps, prompts=prompts, **pipeline_kwargs)
        nfe = pipeline_nfe(source, steps, **pipeline_kwargs)
        gs, cfg = pipeline_kwargs.get("guidance_scale"), getattr(source, "config", None)
        if gs is not None and float(gs) != 1.0 and not getattr(cfg, "guidance_conditioned", False):
            nfe *= 2  # classifier-free guidance: conditional and unconditional evaluation per step
    gen_seconds = time.time() - start
    gen_feats = extract_features(images, extractor, batch_size)
    if is_stats_file(reference):  # precomputed mu / sigma: FID only
        from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

        if set(metrics) != {"fid"}:
            raise ConfigError(f"--reference {reference}: a statistics file holds mu and sigma only, which "
                              f"give FID but not {', '.join(sorted(set(metrics) - {'fid'}))}; pass "
                              "--metrics fid, or a data spec as the reference.")
        ref_stats, ref_info = load_fid_stats(reference)
        stored = ref_info.get("reference_stats_extractor")
        gen_stats = fid_features_to_statistics(gen_feats[layer])
        if stored not in (None, feature_extractor) or gen_stats["mu"].shape != ref_stats["mu"].shape:
            raise ConfigError(f"{reference} holds statistics of {stored or 'unknown'} features of "
                              f"dimension {ref_stats['mu'].shape[0]}; --feature-extractor "
                              f"{feature_extractor} gives {gen_stats['mu'].shape[0]}. Use the extractor the "
                              "statistics were made with (EDM's and ADM's files: inception-v3-compat).")
        ref_stats = {k: v.astype(gen_stats[k].dtype) for k, v in ref_stats.items()}  # torch-fidelity's dtype
        result = {"fid": fid_statistics_to_metric(gen_stats, ref_stats, False)["frechet_inception_distance"]}
    else:
        ref_feats, ref_info = reference_features(reference, extractor, ext_name, weights,
                                                 resolution or images.shape[-1], batch_size, use_cache)
        result = metrics_from_features(gen_feats, ref_feats, metrics, layer, seed)
    if diversity:
        from .diversity import diversity_by_condition

        n_cls = int(getattr(getattr(source, "config", None), "num_classes", 0) or 0)
        n_groups = len(prompts) if prompts else (n_cls or 1)
        div = diversity_by_condition(gen_feats[layer], [i % n_groups for i in range(len(images))])
        result.update(diversity_pairwise=div["pairwise_distance"], vendi=div["vendi"],
                      diversity_conditions=len(div["per_condition"]),
                      diversity_per_condition=div["per_condition"])
    if clip_model and prompts:
        result["clip_score"] = clip_score(images, [prompts[i % len(prompts)] for i in range(len(images))],
                                          clip_model)
        result["clip_model"] = str(clip_model)
    seconds = time.time() - start
    result.update(num_samples=len(images), nfe=nfe, seconds=round(seconds, 3),
                  generation_seconds=round(gen_seconds, 3),
                  samples_per_second=round(len(images) / max(seconds, 1e-9), 2),
                  feature_extractor=feature_extractor, torch_fidelity_feature_extractor=ext_name,
                  feature_layer_fid=layer, feature_extractor_weights=str(Path(weights).resolve()),
                  feature_extractor_sha256=file_sha256(weights),
                  torch_fidelity_version=fidelity_version(), seed=seed, **ref_info)
    if return_images:
        result["images"] = images
    return result


@torch.no_grad()
def clip_score(images_u8: torch.Tensor, prompts: list[str], clip_model: str, batch_size: int = 64) -> float:
    """CLIP score (Hessel et al. 2021, as torchmetrics' CLIPScore): 100 * mean max(cos(image, text), 0) with
    the CLIP model in the local folder ``clip_model`` (CLIPModel weights, tokenizer and image processor;
    nothing is downloaded: pass e.g. a saved openai/clip-vit-base-patch32 folder)."""
    import transformers

    folder = Path(clip_model)
    if not folder.is_dir():
        raise FileNotFoundError(f"CLIP model folder {clip_model!r} not found; a CLIP score needs a local "
                                "CLIPModel folder (model, tokenizer and image processor files), e.g. a "
                                "saved openai/clip-vit-base-patch32.")
    model = transformers.CLIPModel.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    proc = transformers.CLIPImageProcessor.from_pretrained(folder)
    scores = []
    for i in range(0, len(images_u8), batch_size):
        imgs = list(images_u8[i:i + batch_size].permute(0, 2, 3, 1).numpy())
        pix = proc(images=imgs, return_tensors="pt").pixel_values
        ids = tok(prompts[i:i + batch_size], padding=True, truncation=True, return_tensors="pt")
        img_emb = model.get_image_features(pixel_values=pix)
        txt_emb = model.get_text_features(**ids)
        img_emb = getattr(img_emb, "pooler_output", img_emb)
        txt_emb = getattr(txt_emb, "pooler_output", txt_emb)
        cos = torch.nn.functional.cosine_similarity(img_emb, txt_emb, dim=-1)
        scores.append(100 * cos.clamp_min(0))
    return float(torch.cat(scores).mean())


def teacher_as_sampler(pipe):
    """A stock DDPMPipeline teacher is evaluated with its family's deterministic sampler through distill's
    FewStepPipeline: diffusers' DDIM (trailing) on a VP table, the EDM / flow Euler sampler on the scheduler's
    own grid of an EDM / flow-matching one (the stock DDPMPipeline loop would skip EDM's input scaling); a
    stock Stable-Diffusion(-XL) pipeline likewise, through distill's TextToImagePipeline (CFG with
    guidance_scale)."""
    import diffusers

    from ..pipelines import FewStepPipeline, TextToImagePipeline
    from ..teacher_folder import infer_classes

    if type(pipe).__name__ not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "DDPMPipeline"):
        return pipe
    vp = hasattr(pipe.scheduler, "alphas_cumprod")
    # VP: diffusers' DDIM with the teacher's own set_alpha_to_one, at every step count
    sched = pipe.scheduler if not vp else diffusers.DDIMScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing", clip_sample=False)
    if type(pipe).__name__ == "DDPMPipeline":
        # a class-conditional UNet's class count must be stated (it may or may not have a null class): in
        # its folder's model_index.json, which DDPMPipeline itself ignores
        index = Path(str(getattr(pipe, "name_or_path", None) or "")) / "model_index.json"
        stated = json.loads(index.read_text()).get("num_classes") if index.is_file() else None
        classes = infer_classes(pipe.unet, stated, "the DDPMPipeline")
        return FewStepPipeline(pipe.unet, sched, num_inference_steps=50, num_classes=classes)
    return TextToImagePipeline(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, sched,
                               text_encoder_2=getattr(pipe, "text_encoder_2", None),
                               tokenizer_2=getattr(pipe, "tokenizer_2", None), num_inference_steps=50,
                               force_zeros_for_empty_prompt=bool(
                                   getattr(pipe.config, "force_zeros_for_empty_prompt", False)))

"""Reading a teacher's diffusers folder: its latent parts (VAE, text encoders, tokenizers), its network's
class, sample shape, class count and image token count, and a clear error for a damaged component."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import diffusers

from . import backbones
from .errors import ConfigError
from .models import EXPORT_NAMES, GaussianMixtureTeacher


def load_latent_parts(folder: Path, index: dict, device, dtype) -> dict:
    """VAE and the text encoder(s) and tokenizer(s) of a latent teacher's folder, frozen, in ``dtype``
    (None: as stored): Stable Diffusion (one CLIP encoder), SDXL (two), SD3 (two CLIP encoders and an
    optional T5, ``text_encoder_3``); a class-conditional DiT folder has a VAE and no text encoder."""
    import transformers

    text = "text_encoder" in index and index["text_encoder"][0] is not None
    missing = [k for k in ("vae", "tokenizer")
               if (k == "vae" or text) and (k not in index or index[k][0] is None)]
    if missing:
        raise ConfigError(f"Teacher folder {str(folder)!r} looks like a latent pipeline but has no "
                          f"{missing}; a Stable-Diffusion-format folder has unet (or transformer), vae, "
                          "text_encoder, tokenizer and scheduler, a DiT folder transformer, vae and "
                          "scheduler.")
    kw = {} if dtype is None else {"dtype": dtype}
    vae = getattr(diffusers, index["vae"][1]).from_pretrained(folder / "vae", **kw).to(device)
    encs, toks = [], []
    for suffix in ("", "_2", "_3"):
        enc_spec, tok_spec = index.get(f"text_encoder{suffix}"), index.get(f"tokenizer{suffix}")
        if not enc_spec or enc_spec[0] is None:
            continue
        encs.append(getattr(transformers, enc_spec[1]).from_pretrained(folder / f"text_encoder{suffix}", **kw)
                    .to(device).eval().requires_grad_(False))
        toks.append(getattr(transformers, tok_spec[1]).from_pretrained(folder / f"tokenizer{suffix}"))
    force_zeros = bool(index.get("force_zeros_for_empty_prompt", False))
    return {"vae": vae.eval().requires_grad_(False), "text_encoders": encs, "tokenizers": toks,
            "force_zeros_for_empty_prompt": force_zeros}


def version_mismatches() -> list[str]:
    """'package installed X, distill needs SPEC' for each of distill's declared dependencies whose installed
    version is outside its range (setup.cfg's ``install_requires``)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    out = []
    try:
        requires = metadata.requires("distill") or []
    except metadata.PackageNotFoundError:  # a source tree that is not installed
        return out
    for line in requires:
        req = Requirement(line)
        if req.marker is not None or not req.specifier:
            continue
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            continue
        if not req.specifier.contains(have, prereleases=True):
            out.append(f"{req.name} {have} is installed, distill needs {req.name}{req.specifier}")
    return out


@contextmanager
def damaged(folder: Path, part: str):
    """A component that fails to load is named with its folder, and the cause with it: an installed library
    outside distill's declared range, or one whose API does not take the call (a TypeError / AttributeError /
    ImportError from inside diffusers or transformers: named with the installed versions), else a damaged
    file (truncated safetensors, bad config.json)."""
    try:
        yield
    except (ConfigError, FileNotFoundError):
        raise
    except Exception as err:  # safetensors, json, diffusers / transformers loading errors
        import transformers

        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        what = (f"Could not load the teacher's {part} from {str(folder)!r} "
                f"({type(err).__name__}: {first[:300]})")
        wrong = version_mismatches()
        if wrong:
            raise ConfigError(f"{what}: {'; '.join(wrong)}. Install the versions it needs (pip install -e . "
                              "or pip install -U the package).") from err
        if isinstance(err, (TypeError, AttributeError, ImportError)):
            raise ConfigError(f"{what}: the installed diffusers {diffusers.__version__} / transformers "
                              f"{transformers.__version__} do not take this call; distill is tested with the "
                              "versions setup.cfg names (pip install -U diffusers transformers).") from err
        raise ConfigError(f"{what}: a file there is damaged or incomplete; download or export the folder "
                          "again.") from err


def component_class(spec):
    """The class a ``model_index.json`` entry ``[library, class name]`` names (diffusers' or distill's)."""
    lib, name = spec
    if lib in ("diffusers",):
        return getattr(diffusers, name)
    for module, export_name in EXPORT_NAMES.items():
        if lib == export_name or lib == module.__name__:
            return getattr(module, name)
    raise ConfigError(f"Teacher network class {spec} is neither a diffusers class nor a distill model.")


def infer_shape(model) -> list[int]:
    cfg = model.config
    if isinstance(model, GaussianMixtureTeacher):
        return list(model.sample_shape)
    if backbones.latent_shape(model) is not None:
        return backbones.latent_shape(model)
    if hasattr(cfg, "data_dim"):
        return list(cfg.sample_shape) if getattr(cfg, "sample_shape", None) else [cfg.data_dim]
    raise ConfigError(f"Cannot infer the sample shape of {type(model).__name__}; pass sample_shape.")


def infer_classes(model, stated: int | None = None, source: str = "the teacher") -> int:
    """Classes of a class-conditional network. DiT's ``num_embeds_ada_norm`` (``ada_norm_zero``) counts the
    classes (its table has one row more, the null class ``num_classes``). A UNet's ``num_class_embeds`` may
    or may not count a null class, so its class count must be ``stated`` (a distill folder's
    ``model_index.json`` ``num_classes``, or ``teacher.num_classes``) and be ``num_class_embeds - 1``: label
    ``num_classes`` is the null class of classifier-free guidance, as distill trains conditional teachers."""
    if isinstance(model, GaussianMixtureTeacher):
        return model.num_classes
    cfg = model.config
    if getattr(cfg, "norm_type", None) == "ada_norm_zero" and getattr(cfg, "num_embeds_ada_norm", None):
        return int(cfg.num_embeds_ada_norm)
    n = getattr(cfg, "num_class_embeds", None)
    if not n:
        return 0
    if stated is None:
        raise ConfigError(f"{source}'s UNet has num_class_embeds={n} and nothing says how many of them "
                          f"are classes ({n - 1} and a null class for classifier-free guidance, or {n} "
                          f"without one). Set teacher.num_classes: {n - 1} in the config (or "
                          f"\"num_classes\": {n - 1} in the folder's model_index.json) when label {n - 1} is "
                          "the null class.")
    if int(stated) != n - 1:
        raise ConfigError(f"num_classes={stated} does not fit {source}'s UNet (num_class_embeds={n}): "
                          f"distill needs the null class as the last label, so num_classes must be {n - 1}; "
                          "a UNet without a null class row is not supported as a class-conditional teacher.")
    return int(stated)


def image_tokens(model, shape=None) -> int | None:
    """The image token count of a patch transformer on latents of ``shape`` (default: its own size) (None
    for other networks): what a dynamically shifted flow schedule's mu depends on, as diffusers' SD3 and FLUX
    pipelines count it."""
    cfg = getattr(model, "config", None)
    shape = shape or backbones.latent_shape(model)
    if not getattr(cfg, "patch_size", None) or shape is None:
        return None
    patch = backbones.token_patch(model)
    return (shape[1] // patch) * (shape[2] // patch)

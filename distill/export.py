"""Writing and reading self-contained pipeline folders.

``export_pipeline`` writes a diffusers folder whose ``model_index.json`` names
``[module, Class]`` for the pipeline (source file at the root) and ``[distill_<file>, Class]`` for each
distill model (source file inside its component folder). Such a folder loads

* with ``distill.load_pipeline(path)`` or ``OneStepPipeline.from_pretrained(path)`` where distill is
  installed, and
* with ``diffusers.DiffusionPipeline.from_pretrained(path, trust_remote_code=True)`` in a Python that
  never imported distill (the Hub layout; ``push_to_hub`` needs nothing more).

Weights are safetensors only. The folder is written next to its destination and renamed into
place, so an interrupted export never leaves a half-written pipeline behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import diffusers

from . import pipelines as _pipelines
from .errors import ConfigError


def model_card(info: dict, load: list[str] | None = None, index: dict | None = None,
               text: bool | None = None) -> str:
    """A Hub model card: YAML metadata (``library_name: diffusers``, the ``pipeline_tag``, the teacher as
    ``base_model``, tags), a table of what made the model, how to load it (``load``: the lines of the Python
    example; else from the folder's ``index``: the stock pipeline with its call arguments where one runs the
    student, and distill's own pipeline with and without distill), the FID report and the training config."""
    import yaml

    index = index or {}
    text = any(k in index for k in ("text_encoder", "tokenizer")) if text is None else text
    tags = (["diffusers", "distill", "diffusion-distillation"]
            + ([info["method"]] if info.get("method") else [])
            + ([f"{info['steps_to_sample']}-step"] if isinstance(info.get("steps_to_sample"), int) else []))
    lines = ["---", "library_name: diffusers",
             f"pipeline_tag: {'text-to-image' if text else 'unconditional-image-generation'}", "tags:"]
    lines += [f"- {t}" for t in tags]
    if info.get("teacher") and not os.path.isdir(str(info["teacher"])) and "/" in str(info["teacher"]):
        lines.append(f"base_model: {info['teacher']}")
    lines += ["---", "", f"# {info.get('title', 'distill student')}", "",
              "Made with [distill](https://github.com/) (diffusion distillation on diffusers).", "",
              "| field | value |", "|---|---|"]
    for key, value in info.items():
        if key in ("title", "fid_report_md", "config"):
            continue
        lines.append(f"| {key} | {json.dumps(value) if isinstance(value, (dict, list)) else value} |")
    if load is not None:
        lines += ["", "## Load", "", "```python", *load, "```", ""]
    else:
        prompt = "'a photo of a cat'" if text else ""
        if "_stock_call_kwargs" in index:
            args = ", ".join(f"{k}={v!r}" for k, v in index["_stock_call_kwargs"].items())
            lines += ["", "## Use with diffusers' own pipeline", "",
                      f"The student runs in the stock `{index['_class_name']}` with the arguments below (its "
                      "steps, no classifier-free guidance); no `trust_remote_code` needed.", "", "```python",
                      f"from diffusers import {index['_class_name']}",
                      f"pipe = {index['_class_name']}.from_pretrained('PATH')",
                      f"image = pipe({prompt + ', ' if prompt else ''}{args}).images[0]", "```"]
        module = (index.get("_distill_pipeline") or index.get("_class_name") or ["pipeline"])[0]
        custom = (f", custom_pipeline='PATH/{module}.py'" if "_distill_pipeline" in index else "")
        lines += ["", "## Use with distill's pipeline", "",
                  "The richer way in (guided students' `guidance_scale`, multi-student routing, hybrids):",
                  "",
                  "```python", "import distill", "pipe = distill.load_pipeline('PATH')",
                  "# or, without distill installed:", "from diffusers import DiffusionPipeline",
                  f"pipe = DiffusionPipeline.from_pretrained('PATH'{custom}, trust_remote_code=True)",
                  f"image = pipe({prompt}).images[0]", "```", ""]
    if info.get("fid_report_md"):
        lines += ["## FID report", "", info["fid_report_md"], ""]
    if info.get("config"):
        config = yaml.safe_dump(info["config"], sort_keys=False).rstrip()
        lines += ["## Training config", "", "```yaml", config, "```", ""]
    return "\n".join(lines)


def export_pipeline(pipe, path, card: dict | None = None) -> Path:
    """Save ``pipe`` as a self-contained diffusers folder at ``path`` (replacing what is there)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)  # distill's pipelines: sources included
    card_text = model_card(card or {}, index=json.loads((tmp / "model_index.json").read_text()))
    (tmp / "README.md").write_text(card_text)
    pipe._distill_card = card_text  # a later save_pretrained / push_to_hub of this object keeps it
    for pickled in list(tmp.rglob("*.bin")) + list(tmp.rglob("*.pt")) + list(tmp.rglob("*.pkl")):
        raise RuntimeError(f"export wrote a pickle file {pickled}; only safetensors are allowed.")
    if path.exists():
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(path)
    return path


def resolve_pretrained(path_or_id: str) -> Path:
    """A local folder, or a Hub id downloaded to the cache; a clear error when neither works."""
    p = Path(str(path_or_id)).expanduser()
    if p.is_dir():
        return p
    looks_local = (str(path_or_id).startswith((".", "/", "~"))
                   or os.sep in str(path_or_id).strip("/").split("/", 1)[-1])
    if p.exists() or looks_local or str(path_or_id).count("/") != 1:
        raise FileNotFoundError(
            f"No pipeline folder at {str(p)!r} (resolved to {str(p.resolve())!r}). Pass an existing local "
            "folder that holds model_index.json, or a Hub id of the form 'owner/name'.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_id)))
    except Exception as err:  # offline, unknown repo, no network
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        first = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else ""
        raise OSError(
            f"{str(path_or_id)!r} is not a local folder (nothing at {str(p.resolve())!r}) and could not be "
            f"fetched as a Hugging Face Hub id ({type(err).__name__}: {first[:200]}). If you meant a local "
            "folder, check the path; for the Hub, "
            + ("HF_HUB_OFFLINE is set: unset it, or " if offline else "check the network and the id, or ")
            + "download the folder elsewhere and pass its local path.") from None


def read_model_index(folder: Path) -> dict:
    """``model_index.json`` of a pipeline folder; a missing or damaged file is named in the error."""
    index_file = Path(folder) / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no model_index.json: it is not a diffusers "
                                "pipeline folder.")
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{str(index_file)!r} is not valid JSON ({err}): the folder is damaged or was "
                          "copied incompletely; download or export it again.") from None
    if not isinstance(index, dict):
        raise ConfigError(f"{str(index_file)!r} holds {type(index).__name__}, not a JSON object: the folder "
                          "is damaged; download or export it again.")
    return index


def load_pipeline(path_or_id: str, **kwargs):
    """Load any folder exported by distill (or a stock diffusers pipeline folder)."""
    folder = resolve_pretrained(path_or_id)
    index_file = folder / "model_index.json"
    index = read_model_index(folder)
    name = index.get("_distill_pipeline", index.get("_class_name"))  # a stock layout names distill's aside
    name = name[1] if isinstance(name, list) else name
    cls = getattr(_pipelines, name, None) or getattr(diffusers, name, None)
    if cls is None:
        raise ConfigError(f"Unknown pipeline class {name!r} in {index_file}; distill knows "
                          f"{', '.join(_pipelines.__all__)} and the diffusers pipelines.")
    return cls.from_pretrained(folder, **kwargs)


LORA_FILE = "pytorch_lora_weights.safetensors"


def export_lora_adapter(state_dict: dict, lora_config: dict, folder, scheduler, call_kwargs: dict, info: dict,
                        pipeline: str | None) -> Path:
    """An adapter folder for the teacher's own pipeline (LCM-LoRA style).

    ``pipeline``: the teacher's stock pipeline class (StableDiffusionPipeline, StableDiffusionXLPipeline,
    StableDiffusion3Pipeline, FluxPipeline, DiTPipeline, PixArtSigmaPipeline); the adapter is written in
    diffusers' LoRA format (``pipe.load_lora_weights(folder)``; DiT and PixArt have no LoRA loader: peft's).
    None: a pixel ``UNet2DModel`` teacher; the adapter is written in peft's format (``adapter_config.json``
    + ``adapter_model.safetensors``). Either way ``scheduler/`` holds
    the scheduler the student samples with, ``distill_lora.json`` the call arguments, ``README.md`` both.
    The folder is written next to its destination and renamed into place.
    """
    import safetensors.torch

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if pipeline is None or not hasattr(getattr(diffusers, pipeline), "load_lora_weights"):  # DiT, PixArt
        safetensors.torch.save_file(state_dict, tmp / "adapter_model.safetensors")
        (tmp / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **lora_config}, indent=2))
        load = ["import json, peft, safetensors.torch", "unet = ...  # the teacher's network",
                "peft.inject_adapter_in_model(peft.LoraConfig(**{k: v for k, v in "
                "json.load(open('PATH/adapter_config.json')).items() if k != 'peft_type'}), unet)",
                "peft.set_peft_model_state_dict(unet, "
                "safetensors.torch.load_file('PATH/adapter_model.safetensors'))"]
    else:
        unets = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
        part = "unet" if pipeline in unets else "transformer"
        getattr(diffusers, pipeline).save_lora_weights(
            tmp, weight_name=LORA_FILE, safe_serialization=True,
            **{f"{part}_lora_layers": state_dict, f"{part}_lora_adapter_metadata": dict(lora_config)})
        args = ", ".join(f"{k}={v!r}" for k, v in call_kwargs.items())
        load = [f"from diffusers import DiffusionPipeline, {type(scheduler).__name__}",
                f"pipe = DiffusionPipeline.from_pretrained({info.get('teacher', 'TEACHER')!r})",
                "pipe.load_lora_weights('PATH')",
                f"pipe.scheduler = {type(scheduler).__name__}.from_pretrained('PATH', subfolder='scheduler')",
                f"image = pipe(prompt, {args}).images[0]"]
    scheduler.save_pretrained(tmp / "scheduler")
    (tmp / "distill_lora.json").write_text(json.dumps({"call_kwargs": call_kwargs, "lora": lora_config,
                                                       "scheduler": type(scheduler).__name__},
                                                      indent=2) + "\n")
    text = pipeline not in (None, "DiTPipeline", "DDPMPipeline")
    (tmp / "README.md").write_text(model_card({"title": f"distill {info.get('method', '')} LoRA adapter",
                                               **info, "scheduler": type(scheduler).__name__,
                                               "call": call_kwargs}, load, text=text))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder

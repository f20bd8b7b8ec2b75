"""One-step generator pipeline.

STANDALONE FILE: imports torch, numpy and diffusers only. It is copied to the root of every exported
one-step folder, so ``DiffusionPipeline.from_pretrained(path, trust_remote_code=True)`` works in a
Python that never imported distill.

The generator is a denoiser evaluated once, at a fixed training index ``generator_timestep`` (t*),
on pure noise scaled as the forward process would: ``x_in = sigma(t*) z``; its output, read in the
scheduler's ``prediction_type``, is the sample. This is the generator parameterisation of SiD-LSG
and Diff-Instruct/SIM on diffusers teachers.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


# Copied from distill.denoiser.classifier_free_guidance
def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale) -> torch.Tensor:
    """Ho & Salimans 2022, eq. 6, in diffusers' convention: out_uncond + s (out_cond - out_uncond), for
    outputs of one parameterisation at the same (x_t, t); ``scale``: a number or a tensor broadcastable to
    them."""
    return uncond + scale * (cond - uncond)


# Copied from distill.text_encoding.latents_to_images
def latents_to_images(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode of model-space latents (undoing scaling_factor, shift_factor, latents_mean/std) ->
    [-1, 1]. A VAE held in fp16 whose config asks for ``force_upcast`` (SDXL's, which overflows in fp16)
    decodes in fp32, as diffusers' pipelines do, and goes back to fp16."""
    cfg = vae.config
    upcast = vae.dtype == torch.float16 and getattr(cfg, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    z = latents.to(vae.dtype)
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        mean = torch.tensor(cfg.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
        z = z * std / cfg.scaling_factor + mean
    else:
        z = z / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
    images = vae.decode(z).sample
    if upcast:
        vae.to(torch.float16)
    return images


# Copied from distill.backbones.forward
def forward(net, x: torch.Tensor, timestep: torch.Tensor, **kwargs) -> torch.Tensor:
    """``net``'s prediction at (x, timestep): the time input second, or by keyword where ``forward`` names
    it later (SD3's and PixArt's second input is the text condition), and of a learned-variance output (2C
    channels) the first C. FLUX.1: the latents in 2x2 patches with their position ids, the time / 1000, the
    output unpacked."""
    inner = getattr(net, "module", net)  # DistributedDataParallel
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    inner = getattr(inner, "shared_base", inner)  # a LoRA view of a shared base
    inner = getattr(inner, "wrapped_network", inner)  # a guidance-input wrapper
    if any(c.__name__ == "FluxTransformer2DModel" for c in type(inner).__mro__):  # (FSDP2: a subclass)
        b, c, h, w = x.shape
        tokens = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, 4 * c)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=x.dtype)
        img_ids[..., 1] += torch.arange(h // 2, device=x.device, dtype=x.dtype)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x.device, dtype=x.dtype)[None, :]
        txt = kwargs["encoder_hidden_states"]
        txt_ids = torch.zeros(txt.shape[1], 3, device=x.device, dtype=x.dtype)
        out = net(hidden_states=tokens, timestep=timestep.to(x.dtype) / 1000, img_ids=img_ids.reshape(-1, 3),
                  txt_ids=txt_ids, **kwargs).sample
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
    names = list(inspect.signature(inner.forward).parameters)
    if "timestep" in names and names.index("timestep") != 1:
        out = net(x, timestep=timestep, **kwargs).sample
    else:
        out = net(x, timestep, **kwargs).sample
    return out[:, : x.shape[1]] if out.ndim == x.ndim and out.shape[1] == 2 * x.shape[1] else out


def x0_from_output(output: torch.Tensor, x_t: torch.Tensor, alpha: float, sigma: float, prediction_type: str):
    """Network output -> clean-sample prediction at coefficients (alpha, sigma)."""
    if prediction_type == "epsilon":
        return (x_t - sigma * output) / alpha
    if prediction_type == "sample":
        return output
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * output
    if prediction_type == "flow":  # the velocity eps - x0 on x_t = alpha x0 + sigma eps, alpha = 1 - sigma
        return (x_t - sigma * output) / (alpha + sigma)
    raise ValueError(f"Unsupported prediction_type {prediction_type!r} (epsilon, sample, v_prediction, "
                     "flow).")


def one_step_input(scheduler, config, z: torch.Tensor):
    """A one-step generator at t* on sigma(t*) z: (x_in = sigma(t*) z, the network's input, its time input,
    ``to_x0(network output)``). VP tables give alpha and sigma at the index ``config.generator_timestep``;
    EDM and flow schedulers use the ``generator_sigma`` / ``generator_time`` that training wrote, EDM with
    its scheduler's preconditioning (Karras et al. 2022, Table 1), flow with alpha = 1 - sigma and the
    velocity."""
    edm = hasattr(scheduler, "precondition_outputs")
    if config.get("generator_sigma") is None:
        t = config.generator_timestep
        ac = scheduler.alphas_cumprod[t].item()
        alpha, sigma = ac**0.5, (1 - ac) ** 0.5
    else:
        t, sigma = config.generator_time, config.generator_sigma
        alpha = 1.0 if edm else 1.0 - sigma
    x_in = sigma * z
    pred = config.get("prediction_type") or scheduler.config.get("prediction_type", "flow")

    def to_x0(out: torch.Tensor) -> torch.Tensor:
        if edm and pred != "sample":
            return scheduler.precondition_outputs(x_in, out, sigma)
        # with invert_sigmas a flow network's velocity is x0 - eps
        inverted = pred == "flow" and scheduler.config.get("invert_sigmas")
        if pred == "v_prediction" and config.get("generator_sigma") is not None:  # v = alpha eps - sigma x0
            return (alpha * x_in - sigma * out) / (alpha * alpha + sigma * sigma)
        return x0_from_output(-out if inverted else out, x_in, alpha, sigma, pred)

    return x_in, scheduler.precondition_inputs(x_in, sigma) if edm else x_in, t, to_x0


def noise_family(scheduler) -> str:
    """'edm' (a scheduler with EDM's ``precondition_*`` functions), 'flow' (flow matching, x_t = (1 - s) x0
    + s eps) or 'vp' (a DDPM-style ``alphas_cumprod`` table)."""
    if hasattr(scheduler, "precondition_outputs"):
        return "edm"
    if "FlowMatch" in type(scheduler).__name__:
        return "flow"
    if hasattr(scheduler, "alphas_cumprod"):
        return "vp"
    raise ValueError(f"{type(scheduler).__name__} is neither a VP (alphas_cumprod), an EDM nor a "
                     "flow-matching scheduler.")


def family_alpha_sigma(family: str, alpha_bar: float) -> tuple[float, float]:
    """(alpha, sigma) of a family at the variance-preserving noise level alpha_bar = alpha^2 / (alpha^2 +
    sigma^2), i.e. at equal log-SNR: vp (sqrt(abar), sqrt(1 - abar)); edm (1, sqrt((1 - abar) / abar));
    flow (1 - s, s) with s = sqrt(1 - abar) / (sqrt(abar) + sqrt(1 - abar))."""
    if family == "vp":
        return alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    if family == "edm":
        return 1.0, ((1 - alpha_bar) / alpha_bar) ** 0.5
    s = (1 - alpha_bar) ** 0.5 / (alpha_bar**0.5 + (1 - alpha_bar) ** 0.5)
    return 1.0 - s, s


def family_timestep(scheduler, sigma: float) -> float:
    """The time input of an EDM or flow network at noise level sigma: EDM's c_noise = ln(sigma) / 4, flow's
    sigma T ((1 - sigma) T with ``invert_sigmas``)."""
    if noise_family(scheduler) == "edm":
        return float(scheduler.precondition_noise(torch.tensor([float(sigma)], dtype=torch.float64))[0])
    T = scheduler.config.num_train_timesteps
    return float((1 - sigma if scheduler.config.get("invert_sigmas") else sigma) * T)


def family_rows(scheduler, sigmas) -> torch.Tensor:
    """The sampler rows (network time input, alpha_bar) of an EDM or flow grid of noise levels ``sigmas``
    (noisiest first; for flow the sigma of x_t = (1 - s) x0 + s eps, shift included): the samplers of
    ``samplers.py`` then run on the variance-preserving coordinates x_vp = x_t / sqrt(alpha^2 + sigma^2),
    where DDIM is EDM's and the flow's Euler step."""
    family = noise_family(scheduler)
    rows = []
    for s in (float(v) for v in sigmas):
        a = 1.0 if family == "edm" else 1.0 - s
        rows.append([family_timestep(scheduler, s), a * a / (a * a + s * s)])
    out = torch.tensor(rows, dtype=torch.float64)
    if (out[1:, 1] <= out[:-1, 1]).any():
        raise ValueError(f"sigmas must be strictly descending, got {[float(v) for v in sigmas]}.")
    return out


def scheduler_sigmas(scheduler, num_inference_steps: int) -> list[float]:
    """The noise levels of an EDM or flow scheduler's own ``num_inference_steps``-step grid (its shift and
    final sigma; without the final 0), as x_t's sigma."""
    if scheduler.config.get("use_dynamic_shifting"):
        raise ValueError(f"{type(scheduler).__name__} shifts dynamically (use_dynamic_shifting=true): its "
                         "grid depends on the image size; pass sigmas=.")
    sched = type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(num_inference_steps)
    sigmas = sched.sigmas[:num_inference_steps].double()
    if noise_family(scheduler) == "flow" and scheduler.config.get("invert_sigmas"):
        sigmas = 1 - sigmas
    return sigmas.tolist()


def family_x0(scheduler, call, x_vp: torch.Tensor, alpha_bar: float, prediction_type: str) -> torch.Tensor:
    """Clean-sample prediction of an EDM or flow network at a sampler row: x_t = sqrt(alpha^2 + sigma^2)
    x_vp, the network called as ``call(network input)`` (EDM: c_in x_t) and its output read in
    ``prediction_type`` (EDM: the scheduler's ``precondition_outputs``; flow: the velocity)."""
    family = noise_family(scheduler)
    alpha, sigma = family_alpha_sigma(family, alpha_bar)
    x_t = x_vp * (alpha * alpha + sigma * sigma) ** 0.5
    if family == "edm":
        out = call(scheduler.precondition_inputs(x_t, sigma))
        return out if prediction_type == "sample" else scheduler.precondition_outputs(x_t, out, sigma)
    out = call(x_t)
    if prediction_type == "flow" and scheduler.config.get("invert_sigmas"):
        out = -out
    if prediction_type == "v_prediction":  # v = alpha eps - sigma x0 = scale v_vp, read on x_vp
        scale = (alpha * alpha + sigma * sigma) ** 0.5
        return x0_from_output(out / scale, x_vp, alpha / scale, sigma / scale, prediction_type)
    return x0_from_output(out, x_t, alpha, sigma, prediction_type)


def decode_output(vae, x: torch.Tensor, output_type: str):
    """Samples in model space -> the output: latents as they are (``output_type="latent"``), else decoded
    by ``vae`` when there is one and mapped by :func:`to_output`."""
    if output_type == "latent":
        return x
    return to_output(latents_to_images(vae, x).float() if vae is not None else x, output_type)


def to_output(x: torch.Tensor, output_type: str):
    """Samples in model space -> pil / np / pt. Images are mapped from [-1, 1]; vectors are returned as is."""
    if output_type not in ("pil", "np", "pt"):
        raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}.")
    if x.ndim == 2:  # low-dimensional data: the samples themselves
        return x.float().cpu() if output_type == "pt" else x.float().cpu().numpy()
    x = (x.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return x.cpu()
    arr = x.cpu().permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return arr
    if arr.shape[-1] == 1:
        from PIL import Image

        return [Image.fromarray((a[..., 0] * 255).round().astype(np.uint8), mode="L").convert("RGB")
                for a in arr]
    return DiffusionPipeline.numpy_to_pil(arr)


def device_dtype(pipe, net):
    """Execution device and dtype of ``net`` without diffusers' per-call walk over every module
    (measurable at small batches); with accelerate offload hooks, diffusers' own resolution."""
    if hasattr(net, "_hf_hook"):
        return pipe._execution_device, net.dtype
    t = next(net.parameters(), None)
    t = t if t is not None else next(net.buffers())
    return t.device, t.dtype


def default_labels(batch_size: int, num_classes: int, class_labels, device):
    """Class labels as a tensor; None on an unconditional model, balanced 0..C-1 when not given."""
    if not num_classes:
        if class_labels is not None:
            raise ValueError("This pipeline is unconditional: do not pass class_labels.")
        return None
    if class_labels is None:
        return torch.arange(batch_size, device=device) % num_classes
    labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
    if labels.numel() == 1:
        labels = labels.expand(batch_size)
    if labels.numel() != batch_size:
        raise ValueError(f"class_labels has {labels.numel()} entries for batch_size={batch_size}.")
    if (labels < 0).any() or (labels > num_classes).any():
        bad = sorted({int(v) for v in labels[(labels < 0) | (labels > num_classes)].tolist()})
        raise ValueError(f"class_labels {bad} are out of range: they must lie in [0, {num_classes}] "
                         f"({num_classes} = null class).")
    return labels


class ExportedPipelineMixin:
    """Lets ``ThisPipeline.from_pretrained(folder)`` load a self-contained export directly.

    An exported ``model_index.json`` names the pipeline as ``[module, Class]`` (the remote-code
    layout), which diffusers would otherwise route through ``trust_remote_code``. When the concrete
    class is already in hand, the stored name is reduced to the class name.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Components whose library is already imported (distill's ``distill_*`` aliases) are
        loaded from that module instead of from the folder's copy of its source."""
        import json
        import os
        import sys

        folder = str(pretrained_model_name_or_path)
        index = os.path.join(folder, "model_index.json")
        if os.path.isfile(index):
            with open(index) as f:
                specs = json.load(f)
            for name, spec in specs.items():
                if (name.startswith("_") or name in kwargs or not isinstance(spec, list) or len(spec) != 2
                        or spec[0] in ("diffusers", "transformers") or spec[0] not in sys.modules):
                    continue
                component = getattr(sys.modules[spec[0]], spec[1]).from_pretrained(os.path.join(folder, name))
                dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
                kwargs[name] = component.to(dtype) if isinstance(dtype, torch.dtype) else component
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        card = os.path.join(folder, "README.md")
        if os.path.isfile(card):  # the model card travels on with save_pretrained / push_to_hub
            with open(card) as f:
                pipe._distill_card = f.read()
        return pipe

    @classmethod
    def load_config(cls, *args, **kwargs):
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        cls._own_config(config)
        if isinstance(config.get("_class_name"), list):
            config["_class_name"] = config["_class_name"][-1]
        return out

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """(diffusers reads a custom pipeline's folder config with DiffusionPipeline's ``load_config``.)"""
        return super().extract_init_dict(cls._own_config(dict(config_dict)), **kwargs)

    @classmethod
    def _own_config(cls, config: dict) -> dict:
        """A stock-pipeline layout (``save_pretrained`` of a student the stock pipeline runs) read as this
        class's: its class and config from the private keys, the stock pipeline's own entries dropped."""
        if "_distill_pipeline" in config:
            config["_class_name"] = config.pop("_distill_pipeline")
            config.update(config.pop("_distill_config", {}))
            params = inspect.signature(cls.__init__).parameters
            for key in [k for k in config if not k.startswith("_") and k not in params]:
                config.pop(key)  # safety checker, feature extractor, ...
        return config

    def save_pretrained(self, save_directory, safe_serialization: bool = True, push_to_hub: bool = False,
                        **kwargs):
        """diffusers' ``save_pretrained`` (safetensors), then the folder made self-contained, as distill's
        exports are: this pipeline's source files at the root (``model_index.json`` names ``[module,
        Class]``), each component of a non-library class with its source in its folder (``[distill_<file>,
        Class]``), and the model card it was exported or loaded with (else a short one); so a loaded, modified
        or composed pipeline loads again with ``trust_remote_code=True`` where distill is not installed. A
        student the stock pipeline runs (``stock_layout``) is written in that pipeline's layout.
        ``push_to_hub=True`` then uploads that folder (``push_to_hub``'s keyword arguments)."""
        import json
        import os
        import shutil

        hub = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "private", "token", "create_pr")
               if k in kwargs}
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, **kwargs)
        index_file = os.path.join(save_directory, "model_index.json")
        with open(index_file) as f:
            index = json.load(f)
        files = _source_files(type(self))
        for path in files:
            shutil.copy(path, os.path.join(save_directory, os.path.basename(path)))
        index["_class_name"] = [os.path.splitext(os.path.basename(files[0]))[0], type(self).__name__]
        for name, component in self.components.items():
            top = type(component).__module__.split(".")[0]
            if component is None or top in ("diffusers", "transformers", "torch", "builtins"):
                continue
            main, *siblings = _source_files(type(component))
            stem = os.path.splitext(os.path.basename(main))[0]
            lib = stem if stem.startswith("distill_") else "distill_" + stem
            shutil.copy(main, os.path.join(save_directory, name, lib + ".py"))
            for path in siblings:  # relative imports keep their file names (diffusers copies them along)
                shutil.copy(path, os.path.join(save_directory, name, os.path.basename(path)))
            index[name] = [lib, type(component).__name__]
        layout = self.stock_layout() if hasattr(self, "stock_layout") else None
        if layout is not None:  # the folder is the stock pipeline's, distill's class and config kept aside
            index = _stock_index(self, index, *layout, save_directory)
        with open(index_file, "w") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        card = getattr(self, "_distill_card", None) or (
            f"---\nlibrary_name: diffusers\ntags:\n- diffusers\n- distill\n---\n\n# {type(self).__name__}\n\n"
            "```python\nfrom diffusers import DiffusionPipeline\n"
            "pipe = DiffusionPipeline.from_pretrained('PATH', trust_remote_code=True)\n```\n")
        with open(os.path.join(save_directory, "README.md"), "w") as f:
            f.write(card)
        if push_to_hub:
            self.push_to_hub(hub.pop("repo_id", os.path.basename(os.path.normpath(save_directory))),
                             safe_serialization=safe_serialization, **hub)

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, create_pr: bool = False, safe_serialization: bool = True,
                    variant: str | None = None):
        """Upload the folder ``save_pretrained`` writes (sources and model card included) to the Hub repo
        ``repo_id`` (created if needed)."""
        import tempfile

        from huggingface_hub import create_repo

        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, safe_serialization=safe_serialization, variant=variant)
            return self._upload_folder(tmp, repo_id, token=token, commit_message=commit_message,
                                       create_pr=create_pr)


def _stock_index(pipe, index: dict, name: str, scheduler, call_kwargs: dict, folder) -> dict:
    """``model_index.json`` of the stock pipeline ``name`` (its components, the scheduler that samples the
    student's steps, no safety checker) with distill's class and config under private keys (which diffusers
    ignores; distill's ``load_config`` restores them) and the call arguments the model card gives."""
    import os

    import diffusers

    scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    params = inspect.signature(getattr(diffusers, name).__init__).parameters
    out = {"_class_name": name, "_diffusers_version": index["_diffusers_version"],
           "_distill_pipeline": index["_class_name"], "_stock_call_kwargs": call_kwargs,
           "scheduler": ["diffusers", type(scheduler).__name__]}
    for key, spec in index.items():
        if isinstance(spec, list) and len(spec) == 2 and key != "scheduler" and not key.startswith("_"):
            if key in params and spec[0] is not None:
                out[key] = spec
    out.update({k: [None, None] for k in params if k not in out and k != "self"
                and params[k].default is inspect.Parameter.empty})
    out.update({k: [None, None] for k in ("feature_extractor", "image_encoder") if k in params})
    if "requires_safety_checker" in params:
        out["requires_safety_checker"] = False
    if "force_zeros_for_empty_prompt" in params:
        out["force_zeros_for_empty_prompt"] = pipe.config.force_zeros_for_empty_prompt
    out["_distill_config"] = {k: v for k, v in index.items() if not k.startswith("_") and not (
        isinstance(v, list) and len(v) == 2 and (v[0] is None or isinstance(v[0], str))
        and (v[1] is None or isinstance(v[1], str)))}
    return out


def _source_files(cls) -> list[str]:
    """The file that defines ``cls`` and, recursively, the sibling files it imports relatively
    (``from .x import``): what a folder needs to load ``cls`` as remote code."""
    import os
    import re

    todo, files = [inspect.getfile(cls)], []
    while todo:
        path = todo.pop()
        if path in files:
            continue
        files.append(path)
        with open(path) as f:
            text = f.read()
        for rel in re.findall(r"^\s*from\s+\.(\w+)\s+import", text, flags=re.MULTILINE):
            todo.append(os.path.join(os.path.dirname(path), rel + ".py"))
    return files


class OneStepPipeline(ExportedPipelineMixin, DiffusionPipeline):
    """Sample with one network evaluation.

    Args:
        generator: the one-step network (``UNet2DModel``, distill's MLP, ...).
        scheduler: the teacher family's diffusers scheduler: a VP one (``alphas_cumprod``,
            ``prediction_type``), an EDM one (its ``precondition_*`` functions) or a flow-matching one
            (the velocity eps - x0).
        generator_timestep: training index t* at which the generator is evaluated.
        generator_sigma, generator_time: on EDM and flow schedulers, the noise level sigma(t*) of the
            generator's input sigma(t*) z and its network time input at t* (None on VP tables, which give
            both from ``generator_timestep``).
        prediction_type: the generator's output on EDM and flow schedulers when it is not the scheduler's
            own ("sample": x0 itself); None: the scheduler's (flow: the velocity).
        sample_shape: shape of one sample, e.g. [1, 16, 16] or [2].
        num_classes: number of classes of a class-conditional generator (0 = unconditional).
        vae: the teacher's ``AutoencoderKL`` when the generator works in its latent space (DiT students):
            samples are decoded with its scaling (and shift) factors; ``output_type="latent"`` skips it.
    """

    model_cpu_offload_seq = "generator->vae"
    _optional_components = ["vae"]

    def __init__(self, generator, scheduler, generator_timestep: int = 999, sample_shape: list | None = None,
                 num_classes: int = 0, generator_sigma: float | None = None,
                 generator_time: float | None = None, prediction_type: str | None = None, vae=None):
        super().__init__()
        self.register_modules(generator=generator, scheduler=scheduler, vae=vae)
        if sample_shape is None:
            cfg = generator.config
            sample_shape = ([cfg.in_channels, cfg.sample_size, cfg.sample_size] if hasattr(cfg, "in_channels")
                            else [cfg.data_dim])
        self.register_to_config(generator_timestep=int(generator_timestep), sample_shape=list(sample_shape),
                                num_classes=int(num_classes), generator_sigma=generator_sigma,
                                generator_time=generator_time, prediction_type=prediction_type)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: torch.Generator | list | None = None,
                 class_labels=None, latents: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, num_inference_steps: int = 1):
        if num_inference_steps != 1:
            raise ValueError("OneStepPipeline samples in exactly 1 step, got "
                             f"num_inference_steps={num_inference_steps}.")
        device, dtype = device_dtype(self, self.generator)
        shape = (batch_size, *self.config.sample_shape)
        z = latents.to(device, dtype) if latents is not None else randn_tensor(shape, generator=generator,
                                                                                device=device, dtype=dtype)
        labels = default_labels(batch_size, self.config.num_classes, class_labels, device)
        x_in, net_in, t, to_x0 = one_step_input(self.scheduler, self.config, z)
        for _ in self.progress_bar(range(1)):
            kwargs = {"class_labels": labels} if labels is not None else {}
            out = forward(self.generator, net_in, torch.full((batch_size,), t, device=device), **kwargs)
        x0 = to_x0(out)
        images = decode_output(self.vae, x0, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

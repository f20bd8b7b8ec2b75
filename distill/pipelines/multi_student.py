"""Multi-student one-step pipeline (MSD, Song et al. 2024, "Multi-Student Diffusion Distillation for Better
One-Step Generators"): K one-step students, each condition routed to exactly one of them.

STANDALONE FILE: imports torch, diffusers and the sibling ``one_step.py`` / ``text_to_image.py`` /
``samplers.py`` only (exported folders carry them).

``routing`` (in the pipeline config) is one of
* ``{"kind": "classes", "student_of_class": [s_0, ..., s_{C-1}]}``: class c goes to student s_c
  (the paper's ImageNet split is consecutive blocks of classes);
* ``{"kind": "prompt_clusters", "centroids": [[...], ...]}``: a prompt goes to the nearest centroid of
  :func:`prompt_feature` (the split of the text-encoder's embedding space used for text-to-image), in fp32
  on the prompt embeddings as given (or as the text encoder returns them), before any cast to the
  students' dtype.

Every student is the denoiser evaluated once at training index ``generator_timestep`` on sigma(t*) z
(SiD-LSG / Diff-Instruct generator parameterisation). Noise is drawn for the whole batch in the caller's
order before routing, so a seed gives the same sample for a condition whatever else is in the batch.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .one_step import (
    ExportedPipelineMixin,
    decode_output,
    default_labels,
    device_dtype,
    forward,
    one_step_input,
)
from .samplers import sample_ddim  # noqa: F401  (text_to_image's import; diffusers copies direct imports only)
from .text_to_image import encode_for, sdxl_time_ids, unet_text_kwargs


# Copied from distill.partition.prompt_feature
def prompt_feature(embeds: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
    """The routing feature of encoded prompts: the pooled embedding when the teacher has one (SDXL), else the
    token-mean of the text encoder's hidden states; L2-normalised, float32."""
    f = pooled if pooled is not None else embeds.float().mean(dim=1)
    return torch.nn.functional.normalize(f.float(), dim=-1)


# Copied from distill.partition.nearest_centroid
def nearest_centroid(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return torch.cdist(features.float(), centroids.to(features.device, torch.float32)).argmin(dim=1)


class MultiStudentPipeline(ExportedPipelineMixin, DiffusionPipeline):
    """Sample K routed one-step students: ``pipe(class_labels=...)`` or ``pipe(prompt=...)``.

    Args:
        students: a ``StudentBank`` of K generators.
        scheduler: the teacher family's scheduler (a VP table with the students' ``prediction_type``, or the
            teacher's EDM / flow-matching scheduler).
        vae, text_encoder, tokenizer (text_encoder_2, tokenizer_2): a latent text-to-image teacher's parts.
        generator_timestep: training index t* at which the students are evaluated.
        sample_shape: shape of one sample in model space (pixel space, or latents).
        num_classes: classes of a class-conditional teacher (0 for text).
        routing: the routing table (module docstring).
        generator_sigma, generator_time, prediction_type: on EDM and flow schedulers, as
            ``OneStepPipeline``'s.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->students->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                            "text_encoder_3", "tokenizer_3"]

    def __init__(self, students, scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                 tokenizer_2=None, generator_timestep: int = 625, sample_shape: list | None = None,
                 num_classes: int = 0, routing: dict | None = None, generator_sigma: float | None = None,
                 generator_time: float | None = None, prediction_type: str | None = None, text_encoder_3=None,
                 tokenizer_3=None):
        super().__init__()
        self.register_modules(students=students, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                              text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
        routing = dict(routing or {})
        kind = routing.get("kind")
        if kind == "classes":
            table = [int(s) for s in routing["student_of_class"]]
            if len(table) != num_classes or not all(0 <= s < len(students) for s in table):
                raise ValueError(f"routing.student_of_class must give each of the {num_classes} classes a "
                                 f"student in [0, {len(students)}); got {table}.")
            routing["student_of_class"] = table
        elif kind == "prompt_clusters":
            if len(routing["centroids"]) != len(students):
                raise ValueError(f"routing has {len(routing['centroids'])} centroids for {len(students)} "
                                 "students.")
        else:
            raise ValueError(f"routing.kind must be 'classes' or 'prompt_clusters', got {kind!r}.")
        self.register_to_config(generator_timestep=int(generator_timestep), num_classes=int(num_classes),
                                sample_shape=list(sample_shape) if sample_shape is not None else None,
                                routing=routing, generator_sigma=generator_sigma,
                                generator_time=generator_time, prediction_type=prediction_type)

    @property
    def num_students(self) -> int:
        return len(self.students)

    def _encoders(self):
        toks = [t for t in (self.tokenizer, self.tokenizer_2, self.tokenizer_3) if t is not None]
        encs = [e for e in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if e is not None]
        return toks, encs

    def route(self, class_labels: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
              pooled_prompt_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The student index of each sample (a LongTensor)."""
        routing = self.config.routing
        if routing["kind"] == "classes":
            if class_labels is None:
                raise ValueError("This pipeline routes by class: pass class_labels.")
            labels = torch.as_tensor(class_labels).long().reshape(-1)
            if (labels < 0).any() or (labels >= self.config.num_classes).any():
                raise ValueError(f"class_labels must lie in [0, {self.config.num_classes}): each class has "
                                 "one student; the null class has none.")
            return torch.tensor(routing["student_of_class"], device=labels.device)[labels]
        if prompt_embeds is None:
            raise ValueError("This pipeline routes by prompt: pass prompt=... or prompt_embeds=...")
        feats = prompt_feature(prompt_embeds, pooled_prompt_embeds)
        centroids = torch.tensor(routing["centroids"])
        if feats.shape[-1] != centroids.shape[-1]:
            raise ValueError(f"The prompts' routing feature has width {feats.shape[-1]} but the routing "
                             f"table has centroids of width {centroids.shape[-1]}: a teacher with pooled "
                             "text embeddings (SDXL) routes by them, so pass pooled_prompt_embeds with "
                             "prompt_embeds (or pass prompt=...).")
        return nearest_centroid(feats, centroids)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, batch_size: int | None = None,
                 class_labels=None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | list | None = None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, pooled_prompt_embeds: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, num_inference_steps: int = 1):
        if num_inference_steps != 1:
            raise ValueError(f"MultiStudentPipeline samples in exactly 1 step, got num_inference_steps="
                             f"{num_inference_steps}.")
        text = self.config.routing["kind"] == "prompt_clusters"
        device, dtype = device_dtype(self, self.students)
        kwargs, mask = {}, None
        if text:
            if prompt_embeds is None:
                if prompt is None:
                    raise ValueError("Pass prompt=... (a string or a list of strings) or prompt_embeds=...")
                prompt = [prompt] if isinstance(prompt, str) else list(prompt)
                prompt_embeds, pooled_prompt_embeds, mask = encode_for(self.students.students[0],
                                                                       *self._encoders(), prompt, device)
                if mask is not None:  # PixArt's T5 attention mask
                    mask = mask.repeat_interleave(num_images_per_prompt, 0)
            embeds, pooled = (None if v is None else v.to(device).repeat_interleave(num_images_per_prompt, 0)
                              for v in (prompt_embeds, pooled_prompt_embeds))
            n = embeds.shape[0]
            # routed in fp32 on the embeddings as given, before the students' dtype rounds them
            routes = self.route(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
            embeds, pooled = (None if v is None else v.to(dtype) for v in (embeds, pooled))
            unet = self.students.students[0]
            sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
            size = self.config.sample_shape[-1] * 2 ** (len(self.vae.config.block_out_channels) - 1)
            time_ids = sdxl_time_ids(size, size, n, device).to(dtype) if sdxl else None
            kwargs = unet_text_kwargs(unet, embeds, pooled, time_ids, mask)
            if getattr(unet.config, "guidance_embeds", False):  # FLUX.1-dev: trained at FluxPipeline's 3.5
                kwargs["guidance"] = torch.full((n,), 3.5, device=device)
            shape = (n, *self.config.sample_shape)
        else:
            if prompt is not None:
                raise ValueError("This pipeline is class-conditional: pass class_labels, not prompt.")
            n = (batch_size
                 or (len(torch.as_tensor(class_labels).reshape(-1)) if class_labels is not None else 1))
            labels = default_labels(n, self.config.num_classes, class_labels, device)
            routes = self.route(class_labels=labels)
            kwargs = {"class_labels": labels}
            shape = (n, *self.config.sample_shape)
        z = latents.to(device, dtype) if latents is not None else randn_tensor(shape, generator=generator,
                                                                                device=device, dtype=dtype)
        x_in, net_in, t, to_x0 = one_step_input(self.scheduler, self.config, z)
        out = torch.empty_like(x_in)
        for k in self.progress_bar(range(self.num_students)):
            rows = (routes == k).nonzero().flatten()
            if len(rows):
                sub = {key: _rows(v, rows) for key, v in kwargs.items()}
                out[rows] = forward(self.students.students[k], net_in[rows],
                                    torch.full((len(rows),), t, device=device), **sub).to(out.dtype)
        x0 = to_x0(out)
        images = decode_output(self.vae, x0, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def _rows(value, rows):
    """``value`` (a tensor, a dict of tensors or None) restricted to ``rows``."""
    if isinstance(value, dict):
        return {k: _rows(v, rows) for k, v in value.items()}
    return value[rows] if isinstance(value, torch.Tensor) else value

"""Evaluation reports: which pipelines to evaluate, at which step counts and guidance scales, and the report.

Each (model, step count, guidance scale) row is :func:`distill.eval.fid.compute_metrics` of that pipeline's
samples against one reference: FID (Heusel et al. 2017), KID (Binkowski et al. 2018) and precision/recall
(Kynkaanniemi et al. 2019). A class-conditional or text-to-image pipeline sampled with classifier-free
guidance (Ho & Salimans 2022) costs two network evaluations per step; a guidance-conditioned student takes
the scale as an input and costs one (Meng et al. 2023).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from .fid import (
    compute_metrics,
    is_one_step,
    is_stats_file,
    is_text_pipeline,
    load_image_folder,
    pipeline_nfe,
    teacher_as_sampler,
)
from .report import write_report


def evaluate_models(models: dict, reference, steps: dict, out_dir, num_samples: int = 1000,
                    feature_extractor: str = "digits", feature_extractor_weights: str | None = None,
                    metrics=("fid", "kid", "prc"), batch_size: int = 250, seed: int = 0,
                    meta: dict | None = None, call_kwargs: dict | None = None, resolution: int | None = None,
                    prompts: list[str] | None = None, clip_model: str | None = None, diversity: bool = False):
    """Evaluate several pipelines at several step counts and write the report folder.

    ``models``: name -> pipeline; ``steps``: name -> list of step counts (None = the pipeline's own);
    ``call_kwargs``: name -> extra pipeline arguments (e.g. ``guidance_scale``, reported as a column).
    A name ``model@tag`` is reported as ``model`` (several entries of one model).
    """
    results, grids = [], {}
    for name, pipe in models.items():
        extra = (call_kwargs or {}).get(name, {})
        for k in steps.get(name) or [None]:
            r = compute_metrics(pipe, reference, metrics, num_samples, feature_extractor,
                                feature_extractor_weights, batch_size, seed,
                                steps=k if hasattr(pipe, "config") else None, resolution=resolution,
                                return_images=True, prompts=prompts, clip_model=clip_model,
                                diversity=diversity, **extra)
            images = r.pop("images")
            model = name.split("@")[0]
            n_steps = pipeline_nfe(pipe, k, **extra) if hasattr(pipe, "config") else r["nfe"]
            grids[f"{model}-{n_steps or 0}step"] = images[:64]
            results.append({"model": model, "steps": n_steps, **{k2: v for k2, v in extra.items()
                                                                   if k2 == "guidance_scale"}, **r})
    common = ("feature_extractor", "torch_fidelity_feature_extractor", "feature_layer_fid",
              "feature_extractor_weights", "feature_extractor_sha256", "torch_fidelity_version", "reference",
              "seed", "reference_num_images", "reference_sha256", "reference_resolution", "clip_model",
              "reference_stats_sha256", "reference_data")
    report = {k: results[0].get(k) for k in common}
    report.update(meta or {})
    report["results"] = [{k: v for k, v in r.items() if k not in common and k != "reference_cached"}
                         for r in results]
    return write_report(report, grids, out_dir)


def with_guidance_scales(models: dict, steps: dict, scales) -> tuple[dict, dict, dict]:
    """Each guidance-able model (guidance-conditioned student, or class-conditional pipeline run with
    classifier-free guidance) once per guidance scale, reported as model ``name-s<scale>``."""
    if not scales:
        return models, steps, {}
    out_models, out_steps, kwargs = {}, {}, {}
    for name, pipe in models.items():
        cfg = getattr(pipe, "config", None)
        guidable = bool(getattr(cfg, "guidance_conditioned", False) or getattr(cfg, "num_classes", 0)
                        or (is_text_pipeline(pipe) and not is_one_step(pipe)))
        model, _, tag = name.partition("@")
        for s in (scales if guidable else [None]):
            key = name if s is None else f"{model}-s{s:g}" + (f"@{tag}" if tag else "")
            out_models[key], out_steps[key] = pipe, steps.get(name)
            if s is not None:
                kwargs[key] = {"guidance_scale": float(s)}
    return out_models, out_steps, kwargs


def report_after_training(cfg, teacher, data, pipeline_path) -> dict:
    """The ``eval:`` section of the config ``cfg``: the student exported to ``pipeline_path`` (and
    ``teacher``, the trainer's loaded teacher or None, at eval.teacher_steps) -> the report in
    ``cfg.output_dir``/report. ``data`` (the training data set) gives a text-to-image run its prompts."""
    from ..export import load_pipeline
    from ..pipelines import FewStepPipeline

    ev = cfg.eval
    student = load_pipeline(str(pipeline_path))
    models, steps = {"student": student}, {"student": [None]}
    rounds = sorted((Path(cfg.output_dir) / "rounds").glob("steps-*"),
                    key=lambda p: int(p.name.split("-")[1]))
    for folder in rounds:  # progressive: every round's student at its own step count
        if int(folder.name.split("-")[1]) != pipeline_nfe(student, None):
            models[f"student@{folder.name}"] = load_pipeline(str(folder))  # reported as model "student"
            steps[f"student@{folder.name}"] = [None]
    prompts = None
    if teacher is not None and teacher.is_text:  # text-to-image: the training prompts, a reference of images
        prompts = (list(data.prompts) if hasattr(data, "prompts")
                   else [data[i]["prompt"] for i in range(min(len(data), ev.num_samples))])
        if ev.reference is None and not data.has_images:
            raise ConfigError(f"eval.enabled with prompts-only data ({cfg.data.spec!r}) needs "
                              "eval.reference: an image folder or data set to compare with (e.g. COCO "
                              "validation images).")
    if ev.teacher_steps and teacher is not None:
        if teacher.is_text:
            import diffusers

            from ..pipelines import TextToImagePipeline

            sched = teacher.scheduler
            if teacher.schedule.kind == "vp":
                sched = diffusers.DDIMScheduler.from_config(sched.config, timestep_spacing="trailing",
                                                            clip_sample=False)
            models["teacher"] = TextToImagePipeline(
                **{"unet": None, teacher.network_name: teacher.weights}, scheduler=sched,
                num_inference_steps=50,
                force_zeros_for_empty_prompt=teacher.force_zeros_for_empty_prompt, **teacher.export_size,
                **teacher.frozen_components(reload=False))
        elif teacher.schedule.kind == "vp":
            import diffusers

            # diffusers' DDIM with the teacher's own set_alpha_to_one, at every step count
            ddim = diffusers.DDIMScheduler.from_config(teacher.scheduler.config, timestep_spacing="trailing",
                                                       clip_sample=False)
            models["teacher"] = FewStepPipeline(teacher.weights, ddim, num_inference_steps=50,
                                                sample_shape=teacher.sample_shape,
                                                num_classes=teacher.num_classes,
                                                **teacher.frozen_components(reload=False))
        else:  # a flow teacher with its own Euler loop; others are not evaluated yet
            import diffusers

            try:
                models["teacher"] = teacher_as_sampler(diffusers.DDPMPipeline(unet=teacher.weights,
                                                                              scheduler=teacher.scheduler))
            except ConfigError as err:
                print(f"eval: the report has no teacher rows: {err}")
        if "teacher" in models:
            steps["teacher"] = list(ev.teacher_steps)
    models, steps, kwargs = with_guidance_scales(models, steps, ev.guidance_scales)
    if "teacher" in models and cfg.teacher.guidance_scale is not None and not ev.guidance_scales:
        # the teacher the student was distilled from
        kwargs["teacher"] = {"guidance_scale": cfg.teacher.guidance_scale}
    out = Path(cfg.output_dir) / "report"
    report = evaluate_models(models, ev.reference or cfg.data.spec, steps, out, ev.num_samples,
                             ev.feature_extractor, ev.feature_extractor_weights, tuple(ev.metrics),
                             ev.batch_size, ev.seed,
                             meta={"method": cfg.method, "teacher": cfg.teacher.path,
                                   "student_pipeline": str(pipeline_path)}, call_kwargs=kwargs,
                             prompts=prompts)
    card = Path(pipeline_path) / "README.md"
    if card.is_file():
        card.write_text(card.read_text() + "\n## FID report\n\n" + (out / "fid_report.md").read_text())
    return report


def fid_command(args) -> int:
    """``distill fid SOURCE --reference SPEC ...``"""
    from ..export import load_pipeline

    chosen = args.metrics or ("fid" if is_stats_file(args.reference) else "fid,kid,prc")
    metrics = tuple(m.strip() for m in chosen.split(",") if m.strip())
    steps = list(args.steps) if args.steps else [None]
    src = Path(args.source)
    if not src.is_dir():
        raise ConfigError(f"{args.source!r} does not exist: pass a pipeline folder (an export's pipeline/) "
                          "or a folder of PNG images to evaluate.")
    if (src / "model_index.json").is_file():
        models = {"model": teacher_as_sampler(load_pipeline(str(src)))}
        step_map = {"model": steps}
    else:
        models = {"images": load_image_folder(src)}
        step_map = {"images": [None]}
    if args.compare:
        models["teacher"] = teacher_as_sampler(load_pipeline(args.compare))
        step_map["teacher"] = [s for s in steps if s is not None] or [50]
    scales = ([float(s) for s in args.guidance_scales.split(",")] if getattr(args, "guidance_scales", None)
              else [])
    models, step_map, kwargs = with_guidance_scales(models, step_map, scales)
    if scales and not kwargs:
        raise ConfigError(f"--guidance-scales {args.guidance_scales}: no model here takes a guidance scale "
                          f"({args.source} is unconditional or one-step). Drop --guidance-scales, or "
                          "evaluate a class-conditional / text-to-image pipeline or a guidance-conditioned "
                          "student.")
    prompts = None
    if getattr(args, "prompts", None):
        from ..data import read_prompts

        prompts = read_prompts(args.prompts)
    meta = {"source": str(src)}
    if prompts:
        meta.update(prompts=str(args.prompts), num_prompts=len(prompts))
    if getattr(args, "clip_model", None):
        meta["clip_score"] = ("100 * mean max(cos(CLIP image, CLIP text), 0) with the CLIP model at "
                              f"{args.clip_model} (not the reference CLIP unless that folder holds it)")
    report = evaluate_models(models, args.reference, step_map, args.out, args.num_samples,
                             args.feature_extractor, args.feature_extractor_weights, metrics, args.batch_size,
                             args.seed, meta=meta, call_kwargs=kwargs, resolution=args.resolution,
                             prompts=prompts, clip_model=getattr(args, "clip_model", None),
                             diversity=getattr(args, "diversity", False))
    print((Path(args.out) / "fid_report.md").read_text())
    print(json.dumps({"report": str(Path(args.out) / "fid_report.json"), "results": len(report["results"])}))
    return 0

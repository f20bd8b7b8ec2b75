"""Command line: ``distill train | teacher | sample | fid | quickstart`` (also ``python -m distill``).

Training commands run unchanged under ``accelerate launch -m distill train CONFIG ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import ConfigError, Interrupted, TrainingDiverged

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _config_path(path: str) -> str:
    p = Path(path)
    if (not p.is_file() and not p.is_absolute() and (REPO_CONFIGS / p.name).is_file()
            and p.parent == Path("configs")):
        return str(REPO_CONFIGS / p.name)
    return path


def cmd_train(args, force_method: str | None = None) -> int:
    from .config import load_config

    overrides = list(args.overrides)
    if force_method:
        overrides.append(f"method={force_method}")
    cfg = load_config(_config_path(args.config), overrides)
    if args.dry_run:
        print(cfg.to_yaml())
        return 0
    if cfg.eval.enabled:  # missing extractor weights fail now, not after training
        from .eval.extractors import extractor_weights

        try:
            extractor_weights(cfg.eval.feature_extractor, cfg.eval.feature_extractor_weights)
        except FileNotFoundError as err:
            raise ConfigError(f"{err} (eval.enabled=true: the FID report after training needs them; "
                              "eval.enabled=false trains without the report).") from None
    from .trainers import trainer_class

    trainer = trainer_class(cfg.method)(cfg, overwrite=args.overwrite)
    path = trainer.train()
    if cfg.eval.enabled and trainer.accelerator.is_main_process and not trainer.already_finished:
        from .eval.evaluate import report_after_training

        report = report_after_training(trainer.config, trainer.teacher, trainer.data, path)
        print(headline(report, cfg.output_dir))
    return 0


def headline(report: dict, output_dir: str) -> str:
    """The closing lines of a run: where everything is, student vs teacher FID, speed-up (one block
    per guidance scale when the report has several)."""
    rows = report["results"]
    out = Path(output_dir)
    lines = ["", "=" * 72, f"pipeline: {out / 'pipeline'}", f"report:   {out / 'report' / 'fid_report.md'}",
             f"samples:  {out / 'samples'}"]
    for gs in dict.fromkeys(r.get("guidance_scale") for r in rows):
        group = [r for r in rows if r.get("guidance_scale") == gs]
        tag = "" if gs is None else f" (guidance_scale {gs:g})"
        student = next((r for r in group if r["model"].split("-s")[0] == "student"), None)
        teacher = sorted((r for r in group if r["model"].split("-s")[0] == "teacher"),
                         key=lambda r: r["steps"])
        if student:
            lines.append(f"student FID{tag} ({report['feature_extractor']} extractor, "
                         f"{student['num_samples']} samples): {student['fid']:.3g} at "
                         f"{student['steps']} step")
        if teacher:
            lines.append(f"teacher FID{tag}: " + ", ".join(f"{r['fid']:.3g} @ {r['steps']}" for r in teacher))
            best = teacher[-1]
            if student and student.get("samples_per_second"):
                speed = best["generation_seconds"] / max(student["generation_seconds"], 1e-9)
                lines.append(f"speed-up vs teacher at {best['steps']} steps: {speed:.1f}x (generation time)")
    lines.append("=" * 72)
    return "\n".join(lines)


def _call(pipe, **kwargs):
    """A pipeline call whose argument checks (ValueError, the diffusers convention) become a one-line
    error."""
    try:
        return pipe(**kwargs)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _class_labels(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--class-labels {text!r}: give integers separated by commas, e.g. 0,1,2."
                          ) from None


# Stock teacher layouts that ``distill sample`` runs with distill's own teacher sampler (the scheduler stepped
# as the stock pipeline steps it), at the stock pipeline's default steps and guidance.
TEACHER_LAYOUTS = ("DiTPipeline", "PixArtSigmaPipeline", "StableDiffusion3Pipeline", "FluxPipeline")


def _sample_teacher(args, folder, layout: str):
    """Images in [0, 1] of a stock teacher folder through :meth:`distill.Teacher.sample_stock`: the images of
    the stock ``layout`` pipeline at the same steps, seed, labels / prompts and guidance scale."""
    import inspect

    import diffusers
    import torch

    from . import backbones
    from .teachers import Teacher

    defaults = inspect.signature(getattr(diffusers, layout).__call__).parameters
    steps = args.steps or defaults["num_inference_steps"].default
    teacher = Teacher.from_pretrained(folder)
    if args.resolution is not None:
        teacher.set_resolution(args.resolution)
    scale = args.guidance_scale
    if scale is None and (layout != "FluxPipeline" or backbones.embeds_guidance(teacher.model)):
        scale = defaults["guidance_scale"].default  # FLUX.1-schnell takes none: its stock call is unguided
    if args.true_cfg_scale is not None:
        if not backbones.embeds_guidance(teacher.model):
            raise ConfigError(f"--true-cfg-scale {args.true_cfg_scale}: {args.pipeline} has no embedded "
                              f"guidance input (FLUX.1-dev has); use --guidance-scale {args.true_cfg_scale}.")
        teacher.denoiser.true_cfg_scale = args.true_cfg_scale
    if teacher.is_text:
        if not args.prompt:
            raise ConfigError(f"{args.pipeline} is a text-to-image teacher ({layout}): pass --prompt TEXT "
                              "(repeatable).")
        neg = None if args.negative_prompt is None else [args.negative_prompt] * args.num_images
        cond = teacher.condition(prompts=(args.prompt * args.num_images)[: args.num_images],
                                 negative_prompts=neg)
    else:
        if args.negative_prompt is not None:
            raise ConfigError(f"--negative-prompt: {args.pipeline} is class-conditional ({layout}); drop it.")
        labels = _class_labels(args.class_labels) if args.class_labels else list(range(teacher.num_classes))
        cond = teacher.condition(class_labels=(labels * args.num_images)[: args.num_images])
    x = teacher.sample(args.num_images, steps, torch.Generator().manual_seed(args.seed), cond,
                       guidance_scale=scale, stock=True)
    return (teacher.decode(x).float() / 2 + 0.5).clamp(0, 1), steps, scale


def cmd_sample(args) -> int:
    import torch

    from .eval.report import save_grid
    from .export import load_pipeline, read_model_index, resolve_pretrained

    folder = resolve_pretrained(args.pipeline)
    layout = read_model_index(folder).get("_class_name")
    if layout in TEACHER_LAYOUTS:
        x, steps, scale = _sample_teacher(args, folder, layout)
        out = save_grid(x, args.out)
        print(f"Wrote {args.num_images} samples of the {layout} teacher ({steps} steps, guidance scale "
              f"{scale}) to {out}")
        return 0
    if args.true_cfg_scale is not None:
        raise ConfigError(f"--true-cfg-scale is for FLUX.1-dev teacher folders; {args.pipeline} is a "
                          f"{layout}: drop it (--guidance-scale guides few-step students).")
    pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {}
    params = __import__("inspect").signature(pipe.__call__).parameters
    if args.negative_prompt is not None:
        if "negative_prompt" not in params:
            raise ConfigError(f"--negative-prompt: a {type(pipe).__name__} takes no negative prompt; drop "
                              "--negative-prompt.")
        kwargs["negative_prompt"] = [args.negative_prompt] * args.num_images
    if args.steps is not None:
        kwargs["num_inference_steps"] = args.steps
    if args.class_labels:
        kwargs["class_labels"] = (_class_labels(args.class_labels) * args.num_images)[: args.num_images]
    if args.guidance_scale is not None:
        if "guidance_scale" not in params:
            raise ConfigError(f"--guidance-scale {args.guidance_scale}: a {type(pipe).__name__} takes no "
                              "guidance scale (an unconditional or one-step model); drop --guidance-scale.")
        kwargs["guidance_scale"] = args.guidance_scale
    gen = torch.Generator().manual_seed(args.seed)
    if args.num_base_steps is not None or args.trajectory:
        if type(pipe).__name__ != "HybridPipeline":
            print("distill: error: --trajectory / --num-base-steps need a hybrid pipeline folder (made by "
                  f"`distill hybrid BASE STUDENT --out DIR`); {args.pipeline} holds a {type(pipe).__name__}.",
                  file=sys.stderr)
            return 2
        if args.num_base_steps is not None:
            kwargs["num_base_steps"] = args.num_base_steps
    if args.trajectory:
        traj = _call(pipe, batch_size=args.num_images, generator=gen, output_type="pt",
                     return_trajectory=True, **kwargs).trajectory
        x = torch.stack(traj, 1)  # (samples, steps, C, H, W): one row per sample
        out = save_grid(x.flatten(0, 1), args.out, nrow=len(traj))
        print(f"Wrote the {len(traj)}-step trajectories of {args.num_images} samples to {out}")
        return 0
    # text-to-image: the prompts, repeated to fill the grid
    if getattr(pipe, "text_encoder", None) is not None:
        if not args.prompt:
            print("distill: error: this is a text-to-image pipeline: pass --prompt TEXT (repeatable).",
                  file=sys.stderr)
            return 2
        prompts = (args.prompt * args.num_images)[: args.num_images]
        x = _call(pipe, prompt=prompts, generator=gen, output_type="pt", **kwargs).images
    else:
        x = _call(pipe, batch_size=args.num_images, generator=gen, output_type="pt", **kwargs).images
    out = save_grid(x, args.out)
    print(f"Wrote {args.num_images} samples to {out}")
    return 0


def cmd_hybrid(args) -> int:
    from .eval.fid import teacher_as_sampler
    from .export import export_pipeline, load_pipeline
    from .pipelines import HybridPipeline

    base = teacher_as_sampler(load_pipeline(args.base))
    student = load_pipeline(args.student)
    try:
        hybrid = HybridPipeline.from_pipelines(base, student, num_base_steps=args.num_base_steps,
                                               num_base_substeps=args.num_base_substeps,
                                               student_sampler=args.student_sampler)
        # a step count the student's grid cannot take fails here, not at sampling
        hybrid.schedule(args.num_base_steps)
    except ValueError as err:
        print(f"distill: error: {err}", file=sys.stderr)
        return 2
    keys = ("base", "student", "num_base_steps", "num_base_substeps", "student_sampler")
    path = export_pipeline(hybrid, args.out, {"title": "distill hybrid base/student sampler",
                                              "method": "hybrid", **{k: getattr(args, k) for k in keys}})
    print(f"Hybrid pipeline ({args.num_base_steps} base step(s), then the student) written to {path}")
    return 0


def cmd_fid(args) -> int:
    from .eval.evaluate import fid_command

    return fid_command(args)


def cmd_fid_stats(args) -> int:
    from .eval.fid import fid_stats, save_fid_stats

    if not args.out.endswith(".npz"):
        raise ConfigError(f"--out {args.out}: FID statistics are written as .npz; use a name ending in .npz.")
    stats = fid_stats(args.data, args.feature_extractor, args.feature_extractor_weights, args.resolution,
                      args.batch_size)
    path = save_fid_stats(stats, args.out)
    print(f"Wrote mu / sigma ({stats['mu'].shape[0]} features of {args.feature_extractor}, "
          f"{stats['num_images']} images, data sha256 {stats['data_sha256'][:12]}) to {path}")
    return 0


def cmd_estimate_memory(args) -> int:
    """Memory of one training step of a config, per network (reads the teacher's config files only)."""
    from .config import load_config
    from .memory import estimate, estimate_json

    cfg = load_config(args.config, args.overrides)
    est = estimate(cfg, device=args.device)
    print(estimate_json(est) if args.json
          else f"{cfg.method} with {cfg.teacher.path} ({args.device}):\n{est.table()}")
    return 0


def cmd_launch(args) -> int:
    """``distill launch [ACCELERATE LAUNCH OPTIONS] CONFIG [OVERRIDES] [--overwrite]``: ``accelerate launch -m
    distill train ...`` whose failures end in the child's one-line message and exit code.

    The config is read and checked here first, so a wrong value fails before any process starts. Then
    Accelerate's own launcher runs in this process; the error it raises when a child fails (a second
    traceback under ``accelerate launch``) becomes the child's exit code. The config is the first argument
    ending in ``.yaml`` / ``.yml`` that is not the value of ``--config_file``; the arguments before it are
    Accelerate's.
    """
    rest = list(args.rest)
    file_options = ("--config_file", "--config-file", "--deepspeed_config_file", "--deepspeed-config-file")
    at = next((i for i, a in enumerate(rest) if a.endswith((".yaml", ".yml")) and not a.startswith("-")
               and not (i and rest[i - 1] in file_options)), None)
    if at is None:
        raise ConfigError("distill launch needs a config: distill launch [accelerate launch options] "
                          "CONFIG.yaml [key=value ...], e.g. distill launch --multi_gpu --num_processes 8 "
                          "configs/sim_cifar10.yaml")
    accel, train_args = rest[:at], [_config_path(rest[at]), *rest[at + 1:]]
    from .config import load_config

    load_config(train_args[0], [a for a in train_args[1:] if not a.startswith("--")])
    import subprocess

    from accelerate.commands.launch import launch_command, launch_command_parser

    launch_args = launch_command_parser().parse_args([*accel, "-m", "distill", "train", *train_args])
    try:
        launch_command(launch_args)
    except subprocess.CalledProcessError as err:  # single process: the child already printed its message
        return err.returncode
    except Exception as err:  # torchrun's ChildFailedError (several processes)
        failures = getattr(err, "failures", None)
        if not failures:
            raise
        first = failures[min(failures)]
        print(f"distill: process {first.local_rank} failed with exit code {first.exitcode} (its message is "
              "above).", file=sys.stderr)
        return first.exitcode if first.exitcode > 0 else 1
    return 0


def cmd_quickstart(args) -> int:
    args.config = str(REPO_CONFIGS / "quickstart.yaml") if (REPO_CONFIGS / "quickstart.yaml").is_file() else \
        "configs/quickstart.yaml"
    return cmd_train(args)


def _positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer (use 1 or more)")
    return n


def _step_counts(value: str) -> list[int]:
    """argparse type: comma-separated step counts >= 1."""
    try:
        steps = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: give step counts >= 1 separated by commas, e.g. 1,2,4")
    return steps


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill", description="Distil a diffusion teacher into a one-/few-step "
                                "diffusers pipeline and measure its FID.")
    sub = p.add_subparsers(dest="command", required=True)

    def train_like(name, help_text):
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("config", help="YAML config (see configs/)")
        sp.add_argument("overrides", nargs="*",
                        help="dotted overrides, e.g. train.max_steps=200 optim.lr=1e-4")
        sp.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
        sp.add_argument("--overwrite", action="store_true",
                        help="replace another run found in output_dir (without it such a folder is refused; "
                        "the same config continues its run)")
        return sp

    train_like("train",
               "Train (distil) with a config; run under `accelerate launch -m distill train` to scale.")
    train_like("teacher", "Train a teacher by denoising score matching (method=teacher).")
    la = sub.add_parser("launch", add_help=False,
                        help="accelerate launch -m distill train, with one-line errors: distill launch "
                        "[ACCELERATE LAUNCH OPTIONS] CONFIG [key=value ...] [--overwrite]")
    la.add_argument("rest", nargs=argparse.REMAINDER)
    q = sub.add_parser("quickstart", help="The main job: configs/quickstart.yaml (digits teacher -> one-step "
                       "student -> FID report).")
    q.add_argument("overrides", nargs="*", help="dotted overrides")
    q.add_argument("--dry-run", action="store_true")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an earlier quickstart run with other settings")

    s = sub.add_parser("sample", help="Sample a grid from a pipeline folder.")
    s.add_argument("pipeline", help="pipeline folder (or Hub id)")
    s.add_argument("--num-images", type=_positive_int, default=64)
    s.add_argument("--out", required=True, help="PNG file to write")
    s.add_argument("--steps", type=_positive_int, default=None,
                   help="num_inference_steps (few-step pipelines)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--class-labels", default=None, help="comma-separated labels, repeated to fill the grid")
    s.add_argument("--guidance-scale", type=float, default=None)
    s.add_argument("--negative-prompt", default=None,
                   help="text teacher folders: the prompt classifier-free guidance pushes away from")
    s.add_argument("--true-cfg-scale", type=float, default=None,
                   help="FLUX.1-dev teacher folders: two-pass CFG on top of the embedded guidance scale "
                   "(FluxPipeline's true_cfg_scale)")
    s.add_argument("--resolution", type=int, default=None,
                   help="SD3 / FLUX.1 teacher folders: image height and width (default: the stock "
                   "pipeline's)")
    s.add_argument("--trajectory", action="store_true", help="hybrid pipelines: a grid of every step's clean "
                   "prediction (rows = samples, columns = steps)")
    s.add_argument("--num-base-steps", type=int, default=None, help="hybrid pipelines: base-model steps")
    s.add_argument("--prompt", action="append", default=None,
                   help="text-to-image pipelines: a prompt (repeat the option for several; they are cycled "
                   "to fill the grid)")

    h = sub.add_parser("hybrid",
                       help="Combine a base (teacher) pipeline and a distilled student into a hybrid "
                       "sampler: the base takes the first steps (Gandikota & Bau 2025).")
    h.add_argument("base", help="the base pipeline folder (a teacher: DDPMPipeline or FewStepPipeline)")
    h.add_argument("student", help="the distilled student's pipeline folder")
    h.add_argument("--num-base-steps", type=int, default=1)
    h.add_argument("--num-base-substeps", type=int, default=1,
                   help="DDIM steps of the base within each of its grid intervals (1: the paper's setting)")
    h.add_argument("--student-sampler", choices=("ddim", "stochastic"), default="ddim",
                   help="stochastic: fresh noise at every step (LCMScheduler, the paper's DMD2 setting)")
    h.add_argument("--out", required=True, help="folder for the exported hybrid pipeline")

    m = sub.add_parser("estimate-memory",
                       help="Memory of one training step of a config: parameters, optimizer state, EMA and "
                       "saved activations per network (GiB); nothing is trained or downloaded but the "
                       "teacher's config files.")
    m.add_argument("config", help="YAML config (see configs/)")
    m.add_argument("overrides", nargs="*",
                   help="dotted overrides, e.g. student.lora_rank=64 train.batch_size=4")
    m.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda adds the fused AdamW step's temporary (default: cuda)")
    m.add_argument("--json", action="store_true", help="print JSON (bytes) instead of the table")

    f = sub.add_parser("fid", help="FID/KID/precision-recall report of a pipeline or image folder.")
    f.add_argument("source", help="pipeline folder or image folder")
    f.add_argument("--reference", required=True,
                   help="data spec (e.g. sklearn:digits), a saved feature file, or FID statistics (.npz: "
                   "distill fid-stats, EDM's or ADM's reference files; FID only)")
    f.add_argument("--num-samples", type=_positive_int, default=2000)
    f.add_argument("--steps", type=_step_counts, default=None, help="comma-separated step counts, e.g. 1,2,4")
    f.add_argument("--compare", default=None, help="a teacher pipeline folder to evaluate at the same steps")
    f.add_argument("--guidance-scales", default=None,
                   help="comma-separated guidance scales (diffusers convention, 1 = none) for "
                        "guidance-conditioned students and class-conditional pipelines (classifier-free "
                        "guidance)")
    f.add_argument("--feature-extractor", default="digits", choices=["digits", "inception-v3-compat"])
    f.add_argument("--feature-extractor-weights", default=None)
    f.add_argument("--metrics", default=None,
                   help="comma-separated: fid, kid, prc, isc (default fid,kid,prc; a statistics file: fid)")
    f.add_argument("--batch-size", type=int, default=250)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--resolution", type=int, default=None,
                   help="reference resolution (default: the source's)")
    f.add_argument("--prompts", default=None,
                   help="text-to-image pipelines: a prompt file (.txt one per line, .csv / .jsonl with a "
                   "prompt, caption or text column); sample i uses prompt i mod n")
    f.add_argument("--diversity", action="store_true",
                   help="also report sample diversity per condition (mean pairwise cosine distance and "
                   "Vendi score of the extractor's features)")
    f.add_argument("--clip-model", default=None, help="a local CLIP model folder: also report the CLIP score "
                   "(nothing is downloaded)")
    f.add_argument("--out", required=True, help="report folder")

    st = sub.add_parser("fid-stats", help="FID reference statistics (mu, sigma) of a data spec or image "
                        "folder, as an .npz for `distill fid --reference`.")
    st.add_argument("data", help="data spec (e.g. sklearn:digits, an image folder, a datasets id)")
    st.add_argument("--feature-extractor", default="digits", choices=["digits", "inception-v3-compat"])
    st.add_argument("--feature-extractor-weights", default=None)
    st.add_argument("--resolution", type=int, default=None, help="resize the images to this size first")
    st.add_argument("--batch-size", type=int, default=250)
    st.add_argument("--out", required=True, help=".npz file to write")
    return p


COMMANDS = {"train": cmd_train, "launch": cmd_launch,
            "teacher": lambda a: cmd_train(a, force_method="teacher"), "quickstart": cmd_quickstart,
            "sample": cmd_sample, "fid": cmd_fid, "fid-stats": cmd_fid_stats, "hybrid": cmd_hybrid,
            "estimate-memory": cmd_estimate_memory}
# what a user's input causes (a bad value, a missing or damaged file, no network): one line, exit 2. Anything
# else is a bug in distill and keeps its traceback. DISTILL_DEBUG=1 shows the traceback of these too.
USER_ERRORS = (ConfigError, OSError)


def _error(message: str, code: int) -> int:
    print(f"distill: error: {str(message).strip() or '(no message)'}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 2 a user error (one line on stderr); 1 training diverged; 128 + N stopped by
    signal N (130 Ctrl-C, 143 SIGTERM) after writing a checkpoint."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    # Accelerate's options pass through as is
    if argv[:1] == ["launch"] and argv[1:2] not in (["-h"], ["--help"]):
        args = argparse.Namespace(command="launch", rest=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    debug = os.environ.get("DISTILL_DEBUG", "") not in ("", "0")
    try:
        return COMMANDS[args.command](args)
    except Interrupted as err:
        print(f"distill: stopped by {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print("distill: interrupted (Ctrl-C) before training started; nothing was trained.", file=sys.stderr)
        return 130
    except TrainingDiverged as err:
        if debug:
            raise
        return _error(str(err), 1)
    except USER_ERRORS as err:
        if debug:
            raise
        return _error(str(err), 2)


if __name__ == "__main__":
    sys.exit(main())

"""distill benchmarks: every figure is a ratio measured side by side in the same run.

    python benchmarks/run.py [--only sampling,training,fid,quality,progressive,guided,uni_instruct_digits,hybrid,msd,
                                      msd_digits,disa,beat_teacher]
                             [--quick]
    python benchmarks/gpu_check.py OUT   (on a GPU machine: bf16/CUDA smoke run of every trainer)

Prints Markdown tables and writes them, with the machine description, to benchmarks/results.md.
These are not tests: nothing here asserts; goals are printed next to the measured values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import diffusers  # noqa: E402

diffusers.utils.logging.disable_progress_bar()


def timeit(fn, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() over `repeat` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def paired_times(fn_a, fn_b, pairs: int, warmup: int = 2):
    """Interleaved timing of two functions: (median a, median b, per-pair ratios a/b). Alternating the
    calls exposes both to the same machine state, so the ratio's spread shows the noise."""
    for _ in range(warmup):
        fn_a(), fn_b()
    ta, tb = [], []
    for i in range(pairs):
        for fn, acc in ((fn_a, ta), (fn_b, tb)) if i % 2 == 0 else ((fn_b, tb), (fn_a, ta)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return med(ta), med(tb), [a / b for a, b in zip(ta, tb)]


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- (a) sampling
def bench_sampling(quick: bool) -> str:
    from distill import FewStepPipeline, OneStepPipeline
    from distill.teachers import Teacher

    teacher = Teacher.from_pretrained("builtin:digits")
    pipe_t = FewStepPipeline(teacher.model, teacher.scheduler, num_inference_steps=50)
    pipe_s = OneStepPipeline(teacher.model, teacher.scheduler, generator_timestep=625)
    for p in (pipe_t, pipe_s):
        p.set_progress_bar_config(disable=True)
    b = 64
    reps = 3 if quick else 5
    x = torch.randn(b, 1, 8, 8)
    ts = torch.full((b,), 625)

    def bare_forward():
        with torch.no_grad():
            return teacher.model(x, ts).sample

    one, bare, ratios = paired_times(lambda: pipe_s(batch_size=b, output_type="pt"), bare_forward,
                                     10 if quick else 30)
    rows = [["student (1 step)", 1, b / one, 1.0]]
    for n in (1, 2, 4, 8, 16, 50):
        t = timeit(lambda n=n: pipe_t(batch_size=b, num_inference_steps=n, output_type="pt"), reps if n < 16 else 2)
        rows.append([f"teacher DDIM {n}", n, b / t, t / one])
    out = "### (a) Sampling, batch 64 (digits, 8x8)\n\n" + table(
        ["sampler", "NFE", "samples/s", "time / student time"], rows)
    q = torch.tensor(ratios).quantile(torch.tensor([0.1, 0.5, 0.9])).tolist()
    out += (f"\n\nPipeline overhead: OneStepPipeline call / bare network forward, {len(ratios)} interleaved pairs: "
            f"median **{q[1]:.3f}**, 10-90% range {q[0]:.3f}-{q[2]:.3f} (goal <= 1.05; medians {one * 1e3:.2f} ms vs "
            f"{bare * 1e3:.2f} ms). A range that reaches below 1 is timing noise of that size.\n")
    return out


# ---------------------------------------------------------------------- (b) training overhead
def _bare_teacher_loop(net, opt, x, k, target):
    out = net(x, k).sample
    loss = torch.nn.functional.mse_loss(out, target)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _trainer_iteration(trainer):
    """One full trainer iteration (batch, train_step, EMA) as the loop runs it."""
    trainer.step = 1000  # past any warm-up
    return trainer.train_iteration


class _BareParts:
    """What the bare-torch SIM and Uni-Instruct steps share: the discrete VP table, the generator at
    t* = 625 (v-prediction, as the digits configs) and the fake network's DSM loss on its samples."""

    def __init__(self, trainer):
        self.ac = trainer.teacher.scheduler.alphas_cumprod
        self.b = trainer.config.train.batch_size
        self.shape = (self.b, *trainer.teacher.sample_shape)
        self.a_star, self.s_star = self.ac[625].sqrt(), (1 - self.ac[625]).sqrt()

    @staticmethod
    def x0_of(out, x, a, s):  # v-prediction
        return a * x - s * out

    def draw_t(self):
        k = torch.randint(20, 980, (self.b,))
        return k, self.ac[k].sqrt().view(-1, 1, 1, 1), (1 - self.ac[k]).sqrt().view(-1, 1, 1, 1)

    def generate(self, gen):
        z = self.s_star * torch.randn(self.shape)
        return self.x0_of(gen(z, torch.full((self.b,), 625)).sample, z, self.a_star, self.s_star)

    def fake_dsm(self, gen, fake, k, a, s):
        with torch.no_grad():
            xg = self.generate(gen)
        eps = torch.randn(self.shape)
        return (fake(a * xg + s * eps, k).sample - (a * eps - s * xg)).pow(2).mean()


def _bare_sim_step(trainer):
    """The SIM iteration written as plain torch on the same networks: fake DSM update, then the
    generator update through the inputs of the frozen teacher and fake networks. No Accelerate,
    no EMA, no logging: the denominator of the overhead ratio."""
    teacher = trainer.teacher.model
    gen, fake = trainer.unwrap("student"), trainer.unwrap("fake")
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-7, betas=(0.0, 0.999))
    opt_f = torch.optim.Adam(fake.parameters(), lr=1e-7, betas=(0.0, 0.999))
    bp = _BareParts(trainer)

    def run():
        k, a, s = bp.draw_t()
        loss_f = bp.fake_dsm(gen, fake, k, a, s)
        opt_f.zero_grad()
        loss_f.backward()
        opt_f.step()
        x0 = bp.generate(gen)
        xt = a * x0 + s * torch.randn(bp.shape)
        fake.requires_grad_(False)
        d_fake = bp.x0_of(fake(xt, k).sample, xt, a, s)
        fake.requires_grad_(True)
        d_real = bp.x0_of(teacher(xt, k).sample, xt, a, s)
        d = (d_real - d_fake).flatten(1)
        g = d / torch.sqrt(d.pow(2).mean(1, keepdim=True) + 0.01)
        loss_g = (g * (d_fake - x0).flatten(1)).mean()
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()

    return run


def _bare_uni_instruct_step(trainer):
    """The Uni-Instruct (forward KL, after the warm-up) iteration as plain torch on the same networks:
    fake DSM + discriminator BCE on noised generated and real data (the fake network runs on both),
    then the generator update on the f-weighted surrogate with the density ratio from the
    discriminator head on the fake network's mid-block features. No Accelerate, EMA or logging."""
    teacher = trainer.teacher.model
    gen, fake, disc = trainer.unwrap("student"), trainer.unwrap("fake"), trainer.unwrap("disc")
    feats = {}
    fake.mid_block.register_forward_hook(lambda _m, _i, out: feats.__setitem__("f", out))
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-7, betas=(0.0, 0.999))
    opt_f = torch.optim.Adam(list(fake.parameters()) + list(disc.parameters()), lr=1e-7, betas=(0.0, 0.999))
    bp = _BareParts(trainer)
    real = trainer.data.x
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def run():
        k, a, s = bp.draw_t()
        loss_f = bp.fake_dsm(gen, fake, k, a, s)
        logit_fake = disc(feats["f"])
        xr = real[torch.randint(len(real), (bp.b,))]
        fake(a * xr + s * torch.randn(bp.shape), k)
        logit_real = disc(feats["f"])
        loss_f = loss_f + bce(logit_real, torch.ones_like(logit_real)) + bce(logit_fake, torch.zeros_like(logit_fake))
        opt_f.zero_grad()
        loss_f.backward()
        opt_f.step()
        x0 = bp.generate(gen)
        xt = a * x0 + s * torch.randn(bp.shape)
        fake.requires_grad_(False)
        disc.requires_grad_(False)
        d_fake = bp.x0_of(fake(xt, k).sample, xt, a, s)
        r = disc(feats["f"]).detach().clamp(-5, 5).exp()
        fake.requires_grad_(True)
        disc.requires_grad_(True)
        d_real = bp.x0_of(teacher(xt, k).sample, xt, a, s)
        d, kk = (d_real - d_fake).flatten(1), (d_fake - x0).flatten(1)
        c = (a / (s * s)).flatten()
        dk = (d * kk).mean(1)
        kappa = 2 * r * dk  # forward KL: h = r, h' = 1, h'' = 0
        loss_g = (r * dk + (c / 2) * kappa.detach() * (d.detach() * xt.flatten(1)).sum(1)).mean() / r.mean()
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()

    return run


def bench_training(quick: bool) -> str:
    from distill.config import load_config
    from distill.trainers import trainer_class

    rows = []
    steps = 8 if quick else 20  # interleaved pairs
    with tempfile.TemporaryDirectory() as tmp:
        specs = [
            ("teacher", "configs/teacher_digits.yaml", 1, []),
            ("sim", "configs/sim_digits.yaml", None, []),
            ("uni_instruct (fkl)", "configs/uni_instruct_digits.yaml", None, ["uni_instruct.ratio_warmup_steps=0"]),
        ]
        for name, cfg_path, _, extra in specs:
            cfg = load_config(HERE.parent / cfg_path, [f"output_dir={tmp}/{name.split()[0]}", "train.progress_bar=false",
                                                       "train.report_to=none", "train.checkpointing_steps=100000",
                                                       *extra])
            trainer = trainer_class(cfg.method)(cfg)
            trainer.setup()

            # the network passes the method needs, in a bare loop of the same networks, interleaved with the trainer
            b = cfg.train.batch_size
            if cfg.method == "teacher":
                net = trainer.unwrap("student")
                x = torch.randn(b, *trainer.data.sample_shape)
                opt = torch.optim.AdamW(net.parameters(), lr=1e-6)
                passes = "1 fwd+bwd"
                bare_fn = partial(_bare_teacher_loop, net, opt, x, torch.randint(0, 1000, (b,)), torch.randn_like(x))
            elif cfg.method == "sim":
                passes, bare_fn = "bare torch SIM step (same passes)", _bare_sim_step(trainer)
            else:
                passes, bare_fn = "bare torch Uni-Instruct fkl step (same passes)", _bare_uni_instruct_step(trainer)
            t_trainer, bare, ratios = paired_times(_trainer_iteration(trainer), bare_fn, steps)
            q = torch.tensor(ratios).quantile(torch.tensor([0.1, 0.5, 0.9])).tolist()
            rows.append([name, b, passes, t_trainer * 1e3, bare * 1e3, q[1], f"{q[0]:.3f}-{q[2]:.3f}"])
    return "### (b) Training: per-iteration time / time of the network passes it needs (goal <= 1.10 for the " \
           "teacher loop, <= 1.15 for the distillation trainers)\n\n" + table(
               ["trainer", "batch", "network passes", "trainer ms/it", "bare passes ms", "median ratio of "
                "interleaved pairs", "10-90% range"], rows) + "\n"


# ---------------------------------------------------------------------- (c) quality (toy)
def bench_quality(quick: bool) -> str:
    from distill import load_pipeline
    from distill.config import load_config
    from distill.eval.toy import toy_report
    from distill.teachers import analytic_teacher
    from distill.trainers import trainer_class

    teacher = analytic_teacher("gaussians8")
    ref, _ = teacher.model.sample_data(8000, generator=torch.Generator().manual_seed(1))
    rows = []
    floor = toy_report(teacher.model.sample_data(8000, generator=torch.Generator().manual_seed(2))[0], teacher.model,
                       ref)
    rows.append(["exact samples, another seed (noise floor)", "-", floor["swd"], f"{floor['modes']}/8", floor["nll"],
                 floor["nll_true_samples"], "-"])
    for n in (1, 2, 4, 8, 16):
        x = teacher.sample(8000, num_steps=n, generator=torch.Generator().manual_seed(0))
        r = toy_report(x, teacher.model, ref)
        rows.append([f"teacher DDIM {n} steps", n, r["swd"], f"{r['modes']}/8", r["nll"], r["nll_true_samples"], "-"])
    runs = [("SIM (pseudo-Huber)", "configs/sim_gaussians8.yaml", [])]
    for f in ("rkl", "fkl", "jeffreys"):
        runs.append((f"Uni-Instruct {f}", "configs/uni_instruct_gaussians8.yaml", [f"uni_instruct.divergence={f}"]))
    if quick:
        runs = runs[:1]
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg_path, extra in runs:
            cfg = load_config(HERE.parent / cfg_path, [f"output_dir={tmp}/{len(rows)}", "train.progress_bar=false",
                                                       "train.report_to=none", *extra])
            t0 = time.time()
            path = trainer_class(cfg.method)(cfg).train()
            secs = time.time() - t0
            pipe = load_pipeline(str(path))
            pipe.set_progress_bar_config(disable=True)
            x = pipe(batch_size=8000, generator=torch.Generator().manual_seed(0), output_type="pt").images
            r = toy_report(x, teacher.model, ref)
            rows.append([name, 1, r["swd"], f"{r['modes']}/8", r["nll"], r["nll_true_samples"], f"{secs:.0f}"])
    return (f"### (c) Quality on toy:gaussians8 (exact teacher; 8,000 samples; SWD noise floor {floor['swd']:.3g}, "
            "measured in this run: two independent sets of exact samples)\n\n" +
            table(["model", "steps", "sliced W2", "modes", "NLL of samples", "NLL of true samples", "train s"],
                  rows) + "\n")


# ---------------------------------------------------------------------- (g) Uni-Instruct on digits
def bench_uni_instruct_digits(quick: bool) -> str:
    """configs/uni_instruct_digits.yaml end to end: its FID report (student and teacher in one run)."""
    import json

    from distill.config import load_config
    from distill.eval.fid import report_after_training
    from distill.trainers import trainer_class

    rows = []
    runs = [("fkl", [])]  # the config's default; other f by adding ("rkl", ["uni_instruct.divergence=rkl"]) here
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in runs:
            cfg = load_config(HERE.parent / "configs/uni_instruct_digits.yaml",
                              [f"output_dir={tmp}/{name}", "train.progress_bar=false", "train.report_to=none",
                               "eval.enabled=false", *extra])
            t0 = time.time()
            trainer = trainer_class(cfg.method)(cfg)
            path = trainer.train()
            secs = time.time() - t0
            cfg.eval.enabled = True
            report_after_training(trainer, path)
            rep = json.loads((Path(tmp) / name / "report" / "fid_report.json").read_text())
            for r in rep["results"]:
                label = f"Uni-Instruct {name} student" if r["model"] == "student" else f"teacher DDIM {r['steps']}"
                rows.append([label, r["steps"], r["fid"], r["num_samples"], f"{secs:.0f}" if r["model"] == "student"
                             else "-"])
    return ("### (g) Uni-Instruct on digits (`configs/uni_instruct_digits.yaml`, 2,000 updates, batch 32; FID with "
            "the digits extractor against sklearn digits, teacher measured in the same run)\n\n"
            + table(["model", "steps", "FID (digits)", "samples", "train s"], rows) + "\n")


# ---------------------------------------------------------------------- (e) progressive (toy)
def bench_progressive(quick: bool) -> str:
    from distill import load_pipeline
    from distill.config import load_config
    from distill.eval.toy import toy_report
    from distill.teachers import analytic_teacher
    from distill.trainers import trainer_class

    teacher = analytic_teacher("gaussians8")
    ref, _ = teacher.model.sample_data(8000, generator=torch.Generator().manual_seed(1))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(HERE.parent / "configs/progressive_gaussians8.yaml",
                          [f"output_dir={tmp}", "train.progress_bar=false", "train.report_to=none",
                           "progressive.start_steps=16"])
        t0 = time.time()
        trainer_class("progressive")(cfg).train()
        secs = time.time() - t0
        for n in (8, 4, 2, 1):
            pipe = load_pipeline(f"{tmp}/rounds/steps-{n}")
            pipe.set_progress_bar_config(disable=True)
            x = pipe(batch_size=8000, generator=torch.Generator().manual_seed(0), output_type="pt").images
            s = toy_report(x, teacher.model, ref)
            d = toy_report(teacher.sample(8000, num_steps=n, generator=torch.Generator().manual_seed(0)),
                           teacher.model, ref)
            rows.append([n, s["swd"], f"{s['modes']}/8", d["swd"], f"{d['modes']}/8", d["swd"] / s["swd"]])
    return (f"### (e) Progressive distillation on toy:gaussians8 (16 -> 1 steps, {secs:.0f} s of training; "
            "goal: student closer to the truth than teacher DDIM at every step count)\n\n"
            + table(["steps", "student SWD", "student modes", "teacher DDIM SWD", "DDIM modes",
                     "DDIM SWD / student SWD"], rows) + "\n")


# ---------------------------------------------------------------------- (f) guided (toy)
def bench_guided(quick: bool) -> str:
    from distill import load_pipeline
    from distill.config import load_config
    from distill.eval.toy import sliced_wasserstein
    from distill.teachers import analytic_teacher
    from distill.trainers import trainer_class

    n = 4000 if quick else 8000
    teacher = analytic_teacher("gaussians8", conditional=True)
    labels = torch.arange(n) % 8
    means = teacher.model.mix_means.float()

    def on_class(x):  # share of samples whose nearest mode is their own class
        return float((torch.cdist(x.float(), means).argmin(1) == labels).float().mean())

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(HERE.parent / "configs/guided_gaussians8.yaml",
                          [f"output_dir={tmp}", "train.progress_bar=false", "train.report_to=none"])
        t0 = time.time()
        trainer_class("guided")(cfg).train()
        secs = time.time() - t0
        cond = teacher.condition(class_labels=labels)
        for s in (1.0, 2.5, 4.0):
            ref = teacher.sample(n, 256, torch.Generator().manual_seed(1), cond, guidance_scale=s)
            floor = teacher.sample(n, 256, torch.Generator().manual_seed(2), cond, guidance_scale=s)
            for k in (4, 2, 1):
                pipe = load_pipeline(f"{tmp}/rounds/steps-{k}")
                pipe.set_progress_bar_config(disable=True)
                x = pipe(batch_size=n, generator=torch.Generator().manual_seed(0), class_labels=labels,
                         guidance_scale=s, output_type="pt").images
                xs = pipe(batch_size=n, generator=torch.Generator().manual_seed(0), class_labels=labels,
                          guidance_scale=s, stochastic=True, output_type="pt").images
                d = teacher.sample(n, k, torch.Generator().manual_seed(0), cond, guidance_scale=s)
                rows.append([s, k, sliced_wasserstein(x, ref), sliced_wasserstein(xs, ref), sliced_wasserstein(d, ref),
                             sliced_wasserstein(floor, ref), on_class(x), on_class(ref)])
    return (f"### (f) Guided distillation on the class-conditional toy:gaussians8 ({secs:.0f} s of training: stage "
            "one + 16 -> 1 steps, guidance_scale in [1, 4]; distances to 256-step CFG-teacher samples at the same "
            f"guidance_scale, {n} class-balanced samples; goal: the student tracks the CFG teacher at every scale)\n\n"
            + table(["guidance_scale", "steps", "student SWD to CFG teacher", "student, stochastic sampler",
                     "teacher DDIM (same steps) SWD",
                     "noise floor (256-step, other seed)", "student on-class share", "teacher on-class share"],
                    rows) + "\n")


# ---------------------------------------------------------------------- (d) FID evaluation
def bench_fid(quick: bool) -> str:
    from distill import OneStepPipeline
    from distill.eval.fid import compute_metrics
    from distill.teachers import Teacher

    n = 1000 if quick else 2000
    teacher = Teacher.from_pretrained("builtin:digits")
    pipe = OneStepPipeline(teacher.model, teacher.scheduler, generator_timestep=625)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["DISTILL_CACHE"] = cache
        t0 = time.time()
        first = compute_metrics(pipe, "sklearn:digits", ("fid",), n, batch_size=500)
        t1 = time.time() - t0
        t0 = time.time()
        second = compute_metrics(pipe, "sklearn:digits", ("fid",), n, batch_size=500)
        t2 = time.time() - t0
        # the reference part alone, cold vs cached
        from distill.eval.extractors import make_extractor
        from distill.eval.fid import reference_features

        ext, name, w = make_extractor("digits")
        os.environ["DISTILL_CACHE"] = cache + "/cold"
        t0 = time.time()
        reference_features("sklearn:digits", ext, name, w, 8)
        cold = time.time() - t0
        t0 = time.time()
        reference_features("sklearn:digits", ext, name, w, 8)
        warm = time.time() - t0
    rows = [["first evaluation", n, t1, n / t1, first["fid"]], ["second (cached reference)", n, t2, n / t2,
                                                                second["fid"]]]
    return (f"### (d) FID evaluation throughput ({n} one-step samples, digits extractor)\n\n"
            + table(["run", "samples", "seconds", "images/s (generation + features)", "FID"], rows)
            + f"\n\nReference features: cold {cold:.3f} s, cached {warm:.4f} s -> **{cold / max(warm, 1e-9):.0f}x**; "
              f"whole evaluation speed-up {t1 / t2:.2f}x (goal >= 5x for the reference part; the whole "
              "evaluation is bounded by generating the new samples).\n")


# ---------------------------------------------------------------------- (h) hybrid sampling (digits)
def bench_hybrid(quick: bool) -> str:
    """Gandikota & Bau 2025 at our scale: a 4-step progressive student of the class-conditional digits
    teacher, the teacher alone, and hybrids whose first 1 or 2 steps are the teacher's."""
    from distill import HybridPipeline, load_pipeline
    from distill.config import load_config
    from distill.eval.fid import compute_metrics, teacher_as_sampler
    from distill.teachers import ASSETS
    from distill.trainers import trainer_class

    n = 500 if quick else 1000
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(HERE.parent / "configs/progressive_digits.yaml", [
            f"output_dir={tmp}", "teacher.path=builtin:digits-cond", "progressive.start_steps=16",
            "progressive.target_steps=4", "eval.enabled=false", "train.progress_bar=false", "train.report_to=none"])
        t0 = time.time()
        trainer_class("progressive")(cfg).train()
        secs = time.time() - t0
        student = load_pipeline(f"{tmp}/pipeline")
        teacher = teacher_as_sampler(load_pipeline(str(ASSETS / "digits_teacher_cond")))
        hybrid = HybridPipeline.from_pipelines(teacher, student)
        runs = [("teacher (DDIM)", teacher, 50, {}), ("teacher (DDIM)", teacher, 4, {}), ("student", student, None, {}),
                ("hybrid: 1 base + 3 student", hybrid, None, {"num_base_steps": 1}),
                ("hybrid: 2 base + 2 student", hybrid, None, {"num_base_steps": 2}),
                ("hybrid: 1 base interval in 4 DDIM steps + 3 student", hybrid, None,
                 {"num_base_steps": 1, "num_base_substeps": 4})]
        results = []
        for name, pipe, steps, kw in runs:
            pipe.set_progress_bar_config(disable=True)
            results.append((name, compute_metrics(pipe, "sklearn:digits", ("fid",), n, "digits", steps=steps,
                                                  diversity=True, **kw)))
    ref = results[0][1]
    stu = results[2][1]
    rows = []
    for name, r in results:
        per = [v["vendi"] for v in r["diversity_per_condition"].values()]
        speed = r["num_samples"] / r["generation_seconds"]
        rows.append([name, r["nfe"], r["fid"], r["diversity_pairwise"], r["vendi"], f"{min(per):.3g}-{max(per):.3g}",
                     r["diversity_pairwise"] / ref["diversity_pairwise"], r["vendi"] / ref["vendi"], speed,
                     speed / (stu["num_samples"] / stu["generation_seconds"])])
    return (f"### (h) Hybrid sampling on the class-conditional digits teacher (4-step progressive student, "
            f"{secs:.0f} s of training; {n} samples, 10 classes; diversity per class with the digits extractor's "
            "features, averaged; goal (Gandikota & Bau 2025): hybrid diversity >= 0.95x the 50-step teacher's, "
            "FID no worse than the student's, speed within 2x of the student's)\n\n"
            + table(["sampler", "NFE", "FID (digits)", "pairwise cos distance", "Vendi", "Vendi per class (min-max)",
                     "distance / teacher-50", "Vendi / teacher-50", "images/s", "speed / student"], rows) + "\n")


# ---------------------------------------------------------------------- (i) multi-student distillation
def _per_class_toy(pipe, teacher, n: int) -> dict:
    """Per class c of toy:gaussians8: sliced W2 to exact samples of N(mu_c, std^2) and the share of samples
    within 3 std of mu_c (on-class); means and worst class."""
    from distill.eval.toy import sliced_wasserstein

    means = teacher.model.mix_means.cpu().double()
    std = float(teacher.model.mix_variances.sqrt().mean())
    g = torch.Generator().manual_seed(1)
    sw, on = [], []
    for c in range(len(means)):
        x = pipe(class_labels=[c] * n, generator=torch.Generator().manual_seed(100 + c), output_type="pt").images
        ref = means[c] + std * torch.randn(n, 2, generator=g, dtype=torch.float64)
        sw.append(sliced_wasserstein(x.double(), ref))
        on.append(float(((x.double() - means[c]).norm(dim=1) < 3 * std).double().mean()))
    return {"swd": sum(sw) / len(sw), "swd_worst": max(sw), "on": sum(on) / len(on), "on_worst": min(on)}


def bench_msd(quick: bool) -> str:
    """Song et al. 2024 at our scale: K = 4 students vs K = 1 of the same size (same per-sample inference cost,
    same updates, same total batch) on the class-conditional toy:gaussians8, per class; and small students
    with teacher score matching (TSM) vs none at the same number of updates."""
    from distill import load_pipeline
    from distill.config import load_config
    from distill.teachers import analytic_teacher
    from distill.trainers import trainer_class

    teacher = analytic_teacher("gaussians8", conditional=True)
    n = 500 if quick else 2000
    steps = 300 if quick else MSD_TOY_STEPS
    runs = [(f"K = 1, hidden {w}", [f"student.hidden={w}", "msd.num_students=1"]) for w in MSD_TOY_WIDTHS] + \
           [(f"K = 4, hidden {w}", [f"student.hidden={w}", "msd.num_students=4"]) for w in MSD_TOY_WIDTHS]
    w = MSD_TOY_WIDTHS[0]
    runs += [(f"K = 4, hidden {w}, no TSM", [f"student.hidden={w}", "msd.num_students=4", "msd.tsm_steps=0"]),
             (f"K = 4, hidden {w}, no TSM (+{MSD_TSM} DM updates instead)",
              [f"student.hidden={w}", "msd.num_students=4", "msd.tsm_steps=0", f"train.max_steps={steps + MSD_TSM}"])]
    class Exact:  # the noise floor: exact class samples of another seed, through the same metric
        def __call__(self, class_labels, generator, output_type):
            c = class_labels[0]
            x = teacher.model.mix_means[c].cpu() + teacher.model.mix_variances[c].sqrt().cpu() * torch.randn(
                len(class_labels), 2, generator=generator)
            return type("Out", (), {"images": x})

    r = _per_class_toy(Exact(), teacher, n)
    rows = [["exact samples, another seed (noise floor)", "-", "-", "-", r["swd"], r["swd_worst"], r["on"],
             r["on_worst"], "-"]]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(runs):
            cfg = load_config(HERE.parent / "configs/msd_gaussians8.yaml", [
                f"output_dir={tmp}/{i}", "train.progress_bar=false", "train.report_to=none", f"train.max_steps={steps}",
                f"msd.tsm_steps={MSD_TSM}", f"train.batch_size={MSD_TOY_BATCH}", *extra])
            t0 = time.time()
            path = trainer_class("msd")(cfg).train()
            secs = time.time() - t0
            pipe = load_pipeline(str(path))
            pipe.set_progress_bar_config(disable=True)
            r = _per_class_toy(pipe, teacher, n)
            params = sum(p.numel() for p in pipe.students.students[0].parameters())
            rows.append([name, cfg.train.max_steps, cfg.msd.tsm_steps, params, r["swd"], r["swd_worst"], r["on"],
                         r["on_worst"], f"{secs:.0f}"])
    return (f"### (i) Multi-student distillation on the class-conditional toy:gaussians8 (DMD per student, batch "
            f"{MSD_TOY_BATCH} split evenly among the students, {n} samples per class against exact samples of that "
            "class; goal (Song et al. 2024): K = 4 beats K = 1 at the same per-sample cost, and TSM beats no TSM)\n\n"
            + table(["students", "updates", "TSM steps", "params per student", "sliced W2 per class (mean)",
                     "sliced W2 (worst class)", "on-class share (mean)", "on-class (worst)", "train s"], rows) + "\n")


MSD_TOY_STEPS, MSD_TOY_BATCH, MSD_TSM, MSD_TOY_WIDTHS = 1000, 256, 300, (32, 128)


def bench_msd_digits(quick: bool) -> str:
    """K = 4 students (copies of the class-conditional digits teacher, consecutive classes) vs K = 1, same
    updates and batch, FID with the digits extractor; the teacher at 1 and 50 DDIM steps in the same run."""
    from distill import load_pipeline
    from distill.config import load_config
    from distill.eval.fid import compute_metrics, teacher_as_sampler
    from distill.teachers import ASSETS
    from distill.trainers import trainer_class

    n = 500 if quick else 1000
    steps = 50 if quick else MSD_DIGITS_STEPS
    rows = []
    teacher = teacher_as_sampler(load_pipeline(str(ASSETS / "digits_teacher_cond")))
    teacher.set_progress_bar_config(disable=True)
    for k in (1, 50):
        r = compute_metrics(teacher, "sklearn:digits", ("fid",), n, "digits", steps=k)
        rows.append([f"teacher DDIM {k}", k, "-", r["fid"], "-"])
    with tempfile.TemporaryDirectory() as tmp:
        for k in (1, 4):
            cfg = load_config(HERE.parent / "configs/msd_digits.yaml", [
                f"output_dir={tmp}/{k}", "train.progress_bar=false", "train.report_to=none", "eval.enabled=false",
                f"train.max_steps={steps}", f"msd.num_students={k}"])
            t0 = time.time()
            path = trainer_class("msd")(cfg).train()
            secs = time.time() - t0
            pipe = load_pipeline(str(path))
            pipe.set_progress_bar_config(disable=True)
            r = compute_metrics(pipe, "sklearn:digits", ("fid",), n, "digits")
            rows.append([f"K = {k} student{'s' if k > 1 else ''}", 1, steps, r["fid"], f"{secs:.0f}"])
    return (f"### (j) Multi-student distillation on the class-conditional digits teacher (`configs/msd_digits.yaml`, "
            f"students = copies of the teacher, DMD, batch 32 split evenly, {steps} updates; {n} samples, FID with "
            "the digits extractor; goal (Song et al. 2024): K = 4 beats K = 1)\n\n"
            + table(["model", "steps", "updates", "FID (digits)", "train s"], rows) + "\n")


MSD_DIGITS_STEPS = 300
MAR_STEPS = 3000  # configs/mar_digits.yaml


def bench_disa(quick: bool) -> str:
    """DiSA step annealing on the MAR digits model (configs/mar_digits.yaml, trained here): MAR's sampler at a
    constant 50 head steps vs linear / cosine / two-stage 50 -> 5 and a constant 5; wall time, time inside
    the diffusion head, head evaluations and FID (digits extractor), all in one run."""
    from distill import load_pipeline
    from distill.config import load_config
    from distill.eval.fid import compute_metrics
    from distill.trainers import trainer_class

    n = 500 if quick else 1000
    path = os.environ.get("DISTILL_MAR_PIPELINE")  # an already trained export (skips the training)
    secs = None
    with tempfile.TemporaryDirectory() as tmp:
        if not path:
            cfg = load_config(HERE.parent / "configs/mar_digits.yaml", [
                f"output_dir={tmp}/mar", "train.progress_bar=false", "train.report_to=none"]
                + (["train.max_steps=300"] if quick else []))
            t0 = time.time()
            path = str(trainer_class("mar")(cfg).train())
            secs = time.time() - t0
        pipe = load_pipeline(path)
        pipe.set_progress_bar_config(disable=True)
        head = pipe.mar.head
        spent = [0.0]
        inner = head.forward

        def timed(*a, **kw):
            t = time.perf_counter()
            out = inner(*a, **kw)
            spent[0] += time.perf_counter() - t
            return out

        head.forward = timed
        settings = [("constant 50 (MAR's sampler)", None, 50, 50), ("constant 50, other seeds (FID spread)", None, 50, 50),
                    ("linear 50 -> 5", "linear", 50, 5),
                    ("cosine 50 -> 5", "cosine", 50, 5), ("two-stage 50 -> 5", "two-stage", 50, 5),
                    ("linear 25 -> 3", "linear", 25, 3), ("constant 5", "constant", 50, 5)]
        rows, base = [], None
        for name, schedule, upper, lower in settings:
            spent[0] = 0.0
            t0 = time.time()
            r = compute_metrics(pipe, "sklearn:digits", ("fid",), n, "digits", num_iter=16, step_schedule=schedule,
                                diffusion_steps=upper, min_diffusion_steps=lower, guidance_scale=1.5,
                                seed=1000 if "other seeds" in name else 0)
            wall = time.time() - t0
            calls = pipe(batch_size=1, num_iter=16, step_schedule=schedule, diffusion_steps=upper,
                         min_diffusion_steps=lower).head_evaluations
            base = base or (spent[0], wall, r["fid"])
            rows.append([name, calls, f"{spent[0]:.1f}", f"{base[0] / spent[0]:.2f}x", f"{wall:.1f}",
                         f"{base[1] / wall:.2f}x", r["fid"], f"{100 * (r['fid'] / base[2] - 1):+.0f}%"])
        grid = HERE.parent / "docs" / "mar_digits_cosine.png"
        if not quick:
            from distill.eval.report import save_grid

            x = pipe(batch_size=100, class_labels=[i // 10 for i in range(100)], num_iter=16, step_schedule="cosine",
                     diffusion_steps=50, min_diffusion_steps=5, guidance_scale=1.5,
                     generator=torch.Generator().manual_seed(0), output_type="pt").images
            save_grid(x, grid, nrow=10)
    if secs is None:  # a given export: its training time from its run.json
        from datetime import datetime

        run = json.loads((Path(path).parent / "run.json").read_text())
        secs = (datetime.fromisoformat(run["ended"]) - datetime.fromisoformat(run["started"])).total_seconds()
    trained = f"{300 if quick else MAR_STEPS} updates trained in {secs:.0f} s on this machine"
    return (f"### (k) DiSA step annealing on a MAR digits model (`configs/mar_digits.yaml`, {trained}; 16 AR "
            f"iterations, CFG 1.5, temperature 1; {n} samples, FID with the digits extractor against the 1,797 "
            "digits at 16x16; head evaluations per image batch; goal: >= 3x less head time with FID within 10% of "
            "constant 50)\n\n"
            + table(["head schedule", "head evaluations", "head s", "head speed-up", "wall s", "wall speed-up",
                     "FID (digits)", "FID vs constant 50"], rows)
            + (f"\n\nSamples (cosine 50 -> 5, one row per class): `docs/{grid.name}`.\n" if not quick else "\n"))


# ---------------------------------------------------------------------- (l) one step vs the 50-step teacher
BEAT_SEEDS = (0, 1, 2)
BEAT_TEACHER_STEPS = 50
# (idea, config, overrides, updates); each row is trained once per seed in BEAT_SEEDS (train.seed = eval seed)
BEAT_IDEAS = [
    ("quickstart: SIM, pseudo-Huber, t_min 0.02", "configs/quickstart.yaml", [], 400),
    ("best: Uni-Instruct rkl, t_min 0.05, lr x0.3 after 2,000, EMA 0.998", "configs/best_digits.yaml", [], 4000),
]
# the best digits recipe on the toy mixture: its 1,500 updates decayed after 1,000 (two thirds, as on digits)
BEAT_TOY = ("configs/uni_instruct_gaussians8.yaml", ["uni_instruct.divergence=rkl", "uni_instruct.t_min=0.05",
                                                     "optim.lr_milestones=[1000]", "optim.lr_gamma=0.3",
                                                     "train.ema_decay=0.998"])


def _jobs(commands: list[tuple[str, list[str]]], logs: str, parallel: int) -> dict[str, float]:
    """Run ``distill`` subcommands ``(name, argv)`` as subprocesses, ``parallel`` at a time with one thread each,
    logging to ``logs/NAME.log``; seconds per job by name. A failing job stops the section with its log's tail."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    pending, running, secs = list(commands), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            name, argv = pending.pop(0)
            log = Path(logs) / f"{name}.log"
            with open(log, "w") as f:
                proc = subprocess.Popen([sys.executable, "-m", "distill", *argv], cwd=HERE.parent, env=env, stdout=f,
                                        stderr=subprocess.STDOUT)
            running[name] = (proc, time.time(), log)
        time.sleep(0.5)
        for name, (proc, t0, log) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode:
                raise RuntimeError(f"job {name} failed (exit {proc.returncode}):\n{log.read_text()[-2000:]}")
            secs[name] = time.time() - t0
    return secs


def _spread(values: list[float]) -> str:
    t = torch.tensor(values, dtype=torch.float64)
    per = " / ".join(f"{v:.3f}" for v in values)
    return f"{t.mean():.3f} +- {t.std():.3f} ({per})" if len(values) > 1 else f"{values[0]:.3f}"


def bench_beat_teacher(quick: bool) -> str:
    """Each idea of BEAT_IDEAS trained once per seed (two runs side by side, one thread each), its one-step
    student's FID at 1,000 and 5,000 samples (eval seed = training seed), and the builtin teacher's 50-step DDIM
    FID at the same sizes and seeds, measured in this run; then the last idea's overrides on the exact toy
    mixture: sliced W2 to exact samples vs the exact teacher's 50-step DDIM, with the floor of two exact sets."""
    from distill import load_pipeline
    from distill.config import load_config
    from distill.eval.toy import toy_report
    from distill.teachers import ASSETS, analytic_teacher
    from distill.trainers import trainer_class

    seeds = BEAT_SEEDS[:1] if quick else BEAT_SEEDS
    sizes = (1000,) if quick else (1000, 5000)
    ideas = [(i, c, o, 20 if quick else n) for i, c, o, n in BEAT_IDEAS]
    with tempfile.TemporaryDirectory() as tmp:
        def fid_job(name, src, n, s, *extra):
            return (name, ["fid", src, "--reference", "sklearn:digits", "--num-samples", str(n), "--seed", str(s),
                           "--metrics", "fid", *extra, "--out", f"{tmp}/{name}"])

        trainings = sorted(((updates, k, s) for k, (*_, updates) in enumerate(ideas) for s in seeds), reverse=True)
        jobs = [(f"run{k}-{s}", ["train", ideas[k][1], *ideas[k][2], f"train.max_steps={updates}", f"train.seed={s}",
                                 "eval.enabled=false", "train.progress_bar=false", "train.report_to=none",
                                 f"output_dir={tmp}/run{k}-{s}"]) for updates, k, s in trainings]
        # longest trainings first; the teacher's evaluations fill the second core meanwhile
        jobs += [fid_job(f"teacher-{n}-{s}", str(ASSETS / "digits_teacher"), n, s, "--steps", str(BEAT_TEACHER_STEPS))
                 for s in seeds for n in sizes]
        secs = _jobs(jobs, tmp, parallel=2)
        _jobs([fid_job(f"run{k}-{s}-{n}", f"{tmp}/run{k}-{s}/pipeline", n, s) for k in range(len(ideas)) for s in seeds
               for n in sizes], tmp, parallel=2)

        def fid(name):
            return json.loads((Path(tmp) / name / "fid_report.json").read_text())["results"][0]["fid"]

        rows = [[f"teacher, DDIM {BEAT_TEACHER_STEPS} steps", "-", "-",
                 *[_spread([fid(f"teacher-{n}-{s}") for s in seeds]) for n in sizes], "-", len(seeds)]]
        for k, (idea, cfg, extra, updates) in enumerate(ideas):
            rows.append([idea, f"`{' '.join([cfg, *extra])}`", updates,
                         *[_spread([fid(f"run{k}-{s}-{n}") for s in seeds]) for n in sizes],
                         f"{sum(secs[f'run{k}-{s}'] for s in seeds) / len(seeds):.0f}", len(seeds)])

        teacher = analytic_teacher("gaussians8")
        ref, _ = teacher.model.sample_data(8000, generator=torch.Generator().manual_seed(1))
        floor = toy_report(teacher.model.sample_data(8000, generator=torch.Generator().manual_seed(2))[0],
                           teacher.model, ref)["swd"]
        ddim = [toy_report(teacher.sample(8000, num_steps=BEAT_TEACHER_STEPS, generator=torch.Generator().manual_seed(s)),
                           teacher.model, ref)["swd"] for s in seeds]
        toy_cfg, toy_extra = BEAT_TOY
        swd, toy_secs = [], []
        for s in seeds:
            cfg = load_config(HERE.parent / toy_cfg, [*toy_extra, f"train.seed={s}", f"output_dir={tmp}/toy{s}",
                                                      "train.progress_bar=false", "train.report_to=none",
                                                      *(["train.max_steps=20"] if quick else [])])
            t0 = time.time()
            pipe = load_pipeline(str(trainer_class(cfg.method)(cfg).train()))
            toy_secs.append(time.time() - t0)
            pipe.set_progress_bar_config(disable=True)
            x = pipe(batch_size=8000, generator=torch.Generator().manual_seed(s), output_type="pt").images
            swd.append(toy_report(x, teacher.model, ref)["swd"])
    toy_rows = [["exact samples, another seed (floor)", "-", f"{floor:.4f}", "-"],
                [f"exact teacher, DDIM {BEAT_TEACHER_STEPS} steps", BEAT_TEACHER_STEPS, _spread(ddim), "-"],
                [f"one-step student: `{' '.join([toy_cfg, *toy_extra])}`", 1, _spread(swd),
                 f"{sum(toy_secs) / len(toy_secs):.0f}"]]
    size_cols = [f"FID {n // 1000}k (mean +- sd over seeds)" for n in sizes]
    return ("### (l) One step vs the teacher's 50 steps on digits (builtin teacher; FID with the digits extractor "
            "against the 1,797 sklearn digits, eval seed = training seed; two trainings side by side, one thread "
            "each; goal: a one-step student below the teacher's 50-step FID at 5,000 samples on 3 seeds)\n\n"
            + table(["idea", "command", "updates", *size_cols, "train s", "seeds"], rows)
            + "\n\nThe same recipe on the exact toy mixture (8,000 samples, sliced W2 to exact samples; goal: below the "
              "exact teacher's 50-step DDIM, whose distance to the truth is the sampling floor plus its own error)\n\n"
            + table(["model", "steps", "sliced W2 (mean +- sd over seeds)", "train s"], toy_rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="sampling,training,fid,quality,progressive,guided,uni_instruct_digits,hybrid,msd,"
                    "msd_digits,disa,beat_teacher")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    parts = [p.strip() for p in args.only.split(",")]
    out = ["# distill benchmark results", "",
           f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
           f"(threads {torch.get_num_threads()}), CUDA {'yes' if torch.cuda.is_available() else 'no'}. "
           f"Date: {time.strftime('%Y-%m-%d')}. Command: `python benchmarks/run.py{' --quick' if args.quick else ''}`.", ""]
    funcs = {"sampling": bench_sampling, "training": bench_training, "fid": bench_fid, "quality": bench_quality,
             "progressive": bench_progressive, "guided": bench_guided, "uni_instruct_digits": bench_uni_instruct_digits,
             "hybrid": bench_hybrid, "msd": bench_msd, "msd_digits": bench_msd_digits, "disa": bench_disa,
             "beat_teacher": bench_beat_teacher}
    sections = HERE / "results"
    sections.mkdir(exist_ok=True)
    for p in parts:
        t0 = time.time()
        section = funcs[p](args.quick)
        print(section, flush=True)
        (sections / f"{p}.md").write_text(f"{section}\n_({p}: {time.time() - t0:.0f} s, {time.strftime('%Y-%m-%d %H:%M')}, "
                                          f"`python benchmarks/run.py --only {p}`)_\n")
    for name in funcs:  # results.md = every section measured so far, in a fixed order
        if (sections / f"{name}.md").is_file():
            out += [(sections / f"{name}.md").read_text(), ""]
    (HERE / "results.md").write_text("\n".join(out))
    print(f"written to {HERE / 'results.md'}")


if __name__ == "__main__":
    main()

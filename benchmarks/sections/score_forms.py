"""(p) The score methods' forms against their reference code, over seeds: Uni-Instruct's exact gradient
against the public code's estimator, and SiD's per-sample normaliser.

* Uni-Instruct, forward KL, at ``t_min`` 0.02 and 0.2: ``gradient: exact`` (the expanded divergence's
  gradient) against ``gradient: reference`` (the public code's estimator: the SiD core weighted by h(sg(r))),
  both with r = exp(logit) of the discriminator. On the exact toy mixture
  (``configs/uni_instruct_gaussians8.yaml``, sliced W2 to exact samples) and on digits
  (``configs/uni_instruct_digits.yaml`` cut to ``DIGITS_UPDATES`` updates, its SIM warm-up cut to 100,
  FID with the digits extractor, 1,000 samples).
* SiD's normaliser: the quickstart's SIM (400 updates) with ``sim.sample_weight`` none (distill's default)
  against sid (SiD's code divides each sample's loss by sg(mean|x0 - D_p|)).

Every row over ``SEEDS`` (training seed = evaluation seed), the trainings two at a time, one thread each.
``SCORE_FORMS_DIR=DIR`` keeps the runs in DIR and skips those already finished there (a stopped section loses
nothing); ``SCORE_FORMS_EVALUATE_ONLY=1`` trains nothing more and reports the finished runs (the seeds
column says how many).
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
from harness import QUIET, flag, gaussians8_truth, mean_sd, open_pipeline, run_jobs, spread, table

from distill.eval.toy import toy_report

SEEDS = (0, 1, 2)
T_MINS = (0.02, 0.2)
DIGITS_UPDATES = 400  # after a 100-update SIM warm-up (the config's 200 shortened with it)
# name: (overrides, where, t_min values). The public code's ratio estimate (uni_instruct.ratio_estimator=
# reference) is not a row: -L / (1 - L) needs L >> 1 (values per sample times a BCE), and with the toy's 2
# values per sample L crosses 1 and r diverges
FORMS = {"exact": (["uni_instruct.gradient=exact"], ("toy", "digits"), T_MINS),
         "reference": (["uni_instruct.gradient=reference"], ("toy", "digits"), T_MINS)}
SID = {"none": [], "sid": ["sim.sample_weight=sid"]}


def bench_score_forms(quick: bool) -> str:
    seeds = SEEDS[:1] if quick else SEEDS
    short = ["train.max_steps=20", "uni_instruct.init_denoiser_steps=5", "uni_instruct.ratio_warmup_steps=10"]
    keep = os.environ.get("SCORE_FORMS_DIR")
    with (nullcontext(keep) if keep else tempfile.TemporaryDirectory()) as tmp:
        jobs, names = [], {}
        for k, (form, (extra, places, t_mins)) in enumerate(FORMS.items()):
            for t_min in t_mins:
                for s in seeds:
                    for where, cfg, steps in (("toy", "configs/uni_instruct_gaussians8.yaml", []),
                                              ("digits", "configs/uni_instruct_digits.yaml",
                                               [f"train.max_steps={DIGITS_UPDATES}",
                                                "uni_instruct.ratio_warmup_steps=100"])):
                        if where not in places:
                            continue
                        name = f"{where}-{k}-{t_min}-{s}"
                        names.setdefault((where, form, t_min), []).append((name, s))
                        jobs.append((name, ["train", cfg, *steps, *extra, f"uni_instruct.t_min={t_min}",
                                            f"train.seed={s}", "eval.enabled=false", *QUIET,
                                            *(short if quick else []), f"output_dir={tmp}/{name}"]))
        for weight, extra in SID.items():
            for s in seeds:
                name = f"sid-{weight}-{s}"
                names.setdefault(("sid", weight), []).append((name, s))
                jobs.append((name, ["train", "configs/quickstart.yaml", *extra, f"train.seed={s}",
                                    "eval.enabled=false", *QUIET, *(["train.max_steps=20"] if quick else []),
                                    f"output_dir={tmp}/{name}"]))
        Path(tmp).mkdir(parents=True, exist_ok=True)

        def finished(name):
            return (Path(tmp) / name / "pipeline" / "model_index.json").is_file()

        if not flag("SCORE_FORMS_EVALUATE_ONLY"):
            # digits first (the costlier comparison), each seed of every form before the next seed
            jobs.sort(key=lambda job: (not job[0].startswith("digits"), job[0].rsplit("-", 1)[1]))
            run_jobs([job for job in jobs if not finished(job[0])], tmp, parallel=2)
        names = {key: [(n, s) for n, s in runs if finished(n)] for key, runs in names.items()}
        fids = [(name, ["fid", f"{tmp}/{name}/pipeline", "--reference", "sklearn:digits", "--num-samples",
                        "1000", "--seed", str(s), "--metrics", "fid", "--out", f"{tmp}/{name}/report"])
                for key, runs in names.items() if key[0] != "toy" for name, s in runs
                if not (Path(tmp) / name / "report" / "fid_report.json").is_file()]
        run_jobs([(f"fid-{n}", argv) for n, argv in fids], tmp, parallel=2)

        def fid(name):
            report = json.loads((Path(tmp) / name / "report" / "fid_report.json").read_text())
            return report["results"][0]["fid"]

        teacher, ref = gaussians8_truth()

        def swd(name, s):
            pipe = open_pipeline(Path(tmp) / name / "pipeline")
            x = pipe(batch_size=8000, generator=torch.Generator().manual_seed(s), output_type="pt").images
            return toy_report(x, teacher.model, ref)["swd"]

        def cell(values):
            return f"{spread(values)} [{len(values)}]" if values else "-"

        verdicts = []

        def verdict(what, a, b, va, vb):
            """Which of a, b has the lower mean, and whether the gap exceeds the sum of the two seed sds."""
            if len(va) < 2 or len(vb) < 2:
                return
            (ma, sa), (mb, sb) = (mean_sd(v) for v in (va, vb))
            lo, hi = (a, b) if ma < mb else (b, a)
            clear = abs(ma - mb) > sa + sb
            verdicts.append(f"- {what}: `{lo}` lower than `{hi}` ({min(ma, mb):.3f} vs {max(ma, mb):.3f}; "
                            + ("the gap exceeds the two seed sds together)" if clear else
                               "within the seeds' spread)"))

        rows, measured = [], {}
        for t_min in T_MINS:
            for form, (extra, _, t_mins) in FORMS.items():
                if t_min not in t_mins:
                    continue
                toy = [swd(n, s) for n, s in names.get(("toy", form, t_min), [])]
                dig = [fid(n) for n, _ in names.get(("digits", form, t_min), [])]
                rows.append([form, t_min, f"`{' '.join(extra)}`", cell(toy), cell(dig)])
                measured[(form, t_min)] = (toy, dig)
            for i, where in enumerate(("toy", "digits")):
                verdict(f"{where}, t_min {t_min}", "exact", "reference", measured[("exact", t_min)][i],
                        measured[("reference", t_min)][i])
        sid = {weight: [fid(n) for n, _ in names[("sid", weight)]] for weight in SID}
        sid_rows = [[weight, f"`{' '.join(extra) or '(config)'}`", cell(sid[weight])]
                    for weight, extra in SID.items()]
        verdict("SiD's normaliser on the quickstart", "none", "sid", sid["none"], sid["sid"])
    return ("### (p) Uni-Instruct's exact gradient against the public code's estimator (forward KL; toy: "
            "`configs/uni_instruct_gaussians8.yaml`, 1,500 updates, sliced W2 to 8,000 exact samples; "
            "digits: "
            f"`configs/uni_instruct_digits.yaml` cut to {DIGITS_UPDATES} updates after a 100-update "
            "warm-up, FID with the digits "
            "extractor at 1,000 samples; mean +- sd over seeds "
            f"{', '.join(map(str, seeds))}, training seed = evaluation seed)\n\n"
            + table(["gradient", "t_min", "overrides", "toy sliced W2 [seeds]", "digits FID [seeds]"], rows)
            + "\n\nSiD's per-sample normaliser sg(mean|x0 - D_p|) on the quickstart (SIM pseudo-Huber, 400 "
              "updates; FID at 1,000 samples, same seeds)\n\n"
            + table(["sim.sample_weight", "overrides", "digits FID [seeds]"], sid_rows)
            + "\n\nLower is better in every column; rows with fewer than two seeds get no verdict. The "
              "shipped defaults are `uni_instruct.gradient: exact` and `sim.sample_weight: none`.\n\n"
            + "\n".join(verdicts) + "\n")

"""Reports: sample grids, FID JSON + Markdown, FID-vs-steps plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch


def save_grid(x: torch.Tensor, path, nrow: int | None = None, title: str | None = None) -> Path:
    """Save samples as a PNG: images (B, C, H, W) in [0, 1] as a grid, 2-D points as a scatter plot."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.as_tensor(x).detach().float().cpu()
    if x.ndim == 2:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
        ax.scatter(x[:, 0], x[:, 1], s=3, alpha=0.6)
        ax.set_aspect("equal")
        if title:
            ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path
    from PIL import Image

    b, c, h, w = x.shape
    nrow = nrow or int(math.ceil(math.sqrt(b)))
    ncol = int(math.ceil(b / nrow))
    grid = torch.ones(c, ncol * (h + 2) + 2, nrow * (w + 2) + 2)
    for i in range(b):
        r, q = divmod(i, nrow)
        grid[:, 2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + q * (w + 2): 2 + q * (w + 2) + w] = x[i]
    arr = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    if c == 1:
        arr = np.repeat(arr, 3, axis=2)
    scale = max(1, 256 // max(arr.shape[:2]))
    img = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), resample=0)
    img.save(path)
    return path


def write_json(obj, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
    return path


def markdown_table(report: dict) -> str:
    """The results of a report as a Markdown table."""
    cols = [("model", "model"), ("guidance_scale", "guidance"), ("steps", "steps"), ("nfe", "NFE"),
            ("fid", "FID"), ("kid", "KID"), ("precision", "precision"), ("recall", "recall"), ("isc", "IS"),
            ("clip_score", "CLIP score"), ("diversity_pairwise", "diversity (cos)"), ("vendi", "Vendi"),
            ("num_samples", "samples"), ("seconds", "seconds"), ("samples_per_second", "samples/s")]
    rows = report["results"]
    cols = [(k, h) for k, h in cols if any(r.get(k) is not None for r in rows)]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for k, _ in cols:
            v = r.get(k)
            cells.append("" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(report: dict, grids: dict, out_dir) -> dict:
    """fid_report.json + fid_report.md + one sample grid per model/steps + FID-vs-steps plot."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(report, out / "fid_report.json")
    head = ["# FID report", "",
            f"- feature extractor: `{report.get('feature_extractor')}` (sha256 "
            f"{str(report.get('feature_extractor_sha256'))[:12]}…)"
            + (" — NOT comparable with Inception FIDs" if report.get("feature_extractor") == "digits"
               else ""),
            f"- reference: `{report.get('reference')}` ({report.get('reference_num_images')} images)"
            + (f", FID statistics, sha256 {report['reference_stats_sha256'][:12]}…"
               if report.get("reference_stats_sha256") else ""),
            f"- torch-fidelity {report.get('torch_fidelity_version')}, seed {report.get('seed')}; the same "
            "FID from torch-fidelity on the same PNGs: `torch_fidelity.calculate_metrics(input1=..., "
            f"input2=..., fid=True, feature_extractor='{report.get('torch_fidelity_feature_extractor')}', "
            f"feature_layer_fid='{report.get('feature_layer_fid')}', "
            f"feature_extractor_weights_path='{report.get('feature_extractor_weights')}')`"
            + (" after `import distill.eval.extractors`" if report.get("feature_extractor") == "digits"
               else "")]
    if report.get("prompts"):
        head.append(f"- prompts: `{report['prompts']}` ({report.get('num_prompts')} prompts, sample i uses "
                    "prompt i mod n)")
    if report.get("clip_score"):
        head.append(f"- CLIP score: {report['clip_score']}")
    head += ["", ""]
    md = "\n".join(head) + markdown_table(report) + "\n"
    for name, imgs in grids.items():
        save_grid(torch.as_tensor(imgs).float() / 255.0, out / f"samples_{name}.png")
        md += f"\n![{name}](samples_{name}.png)"
    by_model: dict = {}
    for r in report["results"]:
        if r.get("fid") is not None and r.get("steps"):
            by_model.setdefault(r["model"], []).append((r["steps"], r["fid"]))
    if any(len(v) > 1 for v in by_model.values()) or (len(by_model) > 1):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
        for name, pts in by_model.items():
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("steps (NFE)")
        ax.set_ylabel(f"FID ({report.get('feature_extractor')})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "fid_vs_steps.png")
        plt.close(fig)
        md += "\n\n![FID vs steps](fid_vs_steps.png)\n"
    (out / "fid_report.md").write_text(md + "\n")
    return report

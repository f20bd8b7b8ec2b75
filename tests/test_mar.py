"""DiSA step annealing (Zhao et al. 2025) and the masked-autoregressive generator (Li et al. 2024): the
schedules against the reference formulas, the head's respacing against ADM's space_timesteps, MAR's
masking and sampling bookkeeping, training, export and a plain-diffusers load."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from distill.cli import main
from distill.models import MaskedAutoregressiveModel
from distill.pipelines import MaskedAutoregressivePipeline
from distill.pipelines.annealing import annealed_steps, head_timesteps, step_schedule
from distill.pipelines.mar import unknown_after


def _reference(k, K, hi, lo, shape):
    """DiffLoss.sample of MAR_DiSA, restated: an index into the pre-built list [lo, ..., hi]."""
    upper_step, n = K - 1, hi - lo + 1
    if shape == "linear":
        idx = int((upper_step - k) / upper_step * (n - 1))
    elif shape == "cosine":
        idx = int((math.cos(math.pi * k / upper_step) + 1) / 2 * (n - 1))
    elif shape == "two-stage":
        idx = n - 1 if k < upper_step / 2 else 0
    else:
        idx = 0
    return list(range(lo, hi + 1))[idx]


@pytest.mark.parametrize("shape", ["linear", "cosine", "two-stage", "constant"])
@pytest.mark.parametrize("K, hi, lo", [(64, 50, 5), (16, 50, 5), (7, 25, 3), (2, 100, 1), (64, 25, 25)])
def test_schedules_are_the_reference_formulas(shape, K, hi, lo, capsys):
    ours = step_schedule(K, hi, lo, shape)
    assert ours == [_reference(k, K, hi, lo, shape) for k in range(K)]
    with capsys.disabled():
        print(f"\n{shape:9s} K={K:2d} {hi}->{lo}: {ours[:8]}{' ...' if K > 8 else ''}")


def test_schedule_values_printed_next_to_their_formula(capsys):
    rows = [  # (value, formula evaluated by hand)
        (annealed_steps(32, 64, 50, 5, "linear"), 5 + int(31 / 63 * 45), 27),  # T_lo + int((K-1-k)/(K-1) D)
        (annealed_steps(32, 64, 50, 5, "cosine"), 5 + int((math.cos(math.pi * 32 / 63) + 1) / 2 * 45), 26),
        (annealed_steps(31, 64, 50, 5, "two-stage"), 50, 50),  # k < (K-1)/2 = 31.5
        (annealed_steps(32, 64, 50, 5, "two-stage"), 5, 5),
        (annealed_steps(0, 64, 50, 5, "linear"), 50, 50), (annealed_steps(63, 64, 50, 5, "linear"), 5, 5),
        (annealed_steps(63, 64, 50, 5, "cosine"), 5, 5), (annealed_steps(10, 64, 50, 5, "constant"), 5, 5),
    ]
    with capsys.disabled():
        for value, formula, hand in rows:
            print(f"\nT_k = {value}   formula: {formula}   by hand: {hand}")
    assert all(value == formula == hand for value, formula, hand in rows)


def test_one_iteration_and_callables_and_bad_values():
    # K = 1 divides by zero in the reference; the single iteration is the first (p = 0)
    assert [step_schedule(1, 50, 5, s) for s in ("linear", "cosine", "two-stage", "constant")] == [
        [50], [50], [50], [5]]
    assert step_schedule(4, 50, 5, lambda k, K, hi, lo: hi - 10 * k) == [50, 40, 30, 20]
    with pytest.raises(ValueError, match="step_schedule 'exp' is not one of"):
        step_schedule(4, 50, 5, "exp")
    with pytest.raises(ValueError, match="1 <= lower <= upper"):
        step_schedule(4, 5, 50, "linear")
    with pytest.raises(ValueError, match="gave 0 diffusion steps"):
        step_schedule(2, 50, 5, lambda *a: 0)


def _space_timesteps(num_timesteps, count):
    """ADM's space_timesteps for one section, restated (accumulated stride, Python round)."""
    frac_stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    cur, taken = 0.0, []
    for _ in range(count):
        taken.append(round(cur))
        cur += frac_stride
    return set(taken)


@pytest.mark.parametrize("n", [2, 5, 7, 25, 48, 50, 100, 333])
def test_head_respacing_is_adm_spacing_clipped_at_950(n):
    expected = sorted({min(s, 950) for s in _space_timesteps(1000, n)}, reverse=True)
    assert head_timesteps(n) == expected and head_timesteps(n)[0] == 950 and head_timesteps(n)[-1] == 0
    assert len(head_timesteps(50)) == 48  # 958, 979 and 999 merge into 950
    assert head_timesteps(1) == [950]


@pytest.mark.parametrize("K, L", [(16, 64), (64, 64), (1, 64), (5, 16), (64, 256)])
def test_masking_generates_every_token_once(K, L):
    unknown, made = L, []
    for k in range(K):
        left = unknown_after(k, K, L, unknown)
        made.append(unknown - left)
        unknown = left
    assert unknown == 0 and sum(made) == L and min(made) >= 1


def _tiny(num_classes=3, seed=0):
    torch.manual_seed(seed)
    model = MaskedAutoregressiveModel(sample_size=4, in_channels=1, patch_size=2, width=16, depth=1,
                                      num_heads=2, num_classes=num_classes, head_width=16, head_depth=1)
    import diffusers

    sched = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    return MaskedAutoregressivePipeline(model, sched)


def test_tokens_round_trip_and_masked_tokens_are_invisible():
    model = _tiny().mar
    x = torch.randn(3, 1, 4, 4)
    tokens = model.patchify(x)
    assert tokens.shape == (3, 4, 4) and torch.equal(model.unpatchify(tokens), x)
    assert torch.equal(tokens[:, 1], x[:, 0, 0:2, 2:4].reshape(3, 4))  # raster order, 2x2 patches
    mask = torch.tensor([[True, False, True, False]] * 3)
    labels = torch.tensor([0, 1, 2])
    other = tokens.clone()
    other[mask] = torch.randn_like(other[mask])
    torch.testing.assert_close(model.encode(tokens, mask, labels), model.encode(other, mask, labels))
    changed = tokens.clone()
    changed[:, 1] += 1.0  # a known token does change z
    assert not torch.allclose(model.encode(tokens, mask, labels), model.encode(changed, mask, labels))


@pytest.mark.parametrize("schedule", [None, "linear", "cosine", "two-stage", "constant"])
def test_pipeline_counts_head_evaluations_per_schedule(schedule):
    pipe = _tiny()
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, num_iter=3, step_schedule=schedule, diffusion_steps=20, min_diffusion_steps=4,
               generator=torch.Generator().manual_seed(0), output_type="np", guidance_scale=2.0)
    expected = [20] * 3 if schedule is None else step_schedule(3, 20, 4, schedule)
    assert out.diffusion_steps == expected
    assert out.head_evaluations == sum(len(head_timesteps(t)) for t in expected)
    assert out.images.shape == (2, 4, 4, 1) and np.isfinite(out.images).all()
    again = pipe(batch_size=2, num_iter=3, step_schedule=schedule, diffusion_steps=20, min_diffusion_steps=4,
                 generator=torch.Generator().manual_seed(0), output_type="np", guidance_scale=2.0)
    np.testing.assert_array_equal(out.images, again.images)


def test_pipeline_refuses_bad_arguments():
    pipe = _tiny(num_classes=0)
    with pytest.raises(ValueError, match="num_iter=9: this model has 4 tokens"):
        pipe(num_iter=9)
    with pytest.raises(ValueError, match="guidance_scale=3.0: this model is unconditional"):
        pipe(num_iter=2, guidance_scale=3.0)


PLAIN = """
import sys, numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
out = pipe(batch_size=4, class_labels=[0, 1, 2, 3], num_iter=4, step_schedule="cosine", diffusion_steps=10,
           min_diffusion_steps=3, generator=torch.Generator().manual_seed(1), output_type="np")
assert "distill" not in sys.modules
np.save(sys.argv[2], out.images)
print(type(pipe).__name__, out.head_evaluations)
"""


def test_trains_exports_and_loads_in_plain_diffusers(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "configs/mar_digits.yaml", "train.max_steps=2", "train.batch_size=8",
                 "mar.width=16", "mar.num_heads=2", "mar.depth=1", "mar.head_width=16", "mar.head_depth=1",
                 "train.report_to=none", "train.progress_bar=false", "mar.num_iter=4",
                 "mar.diffusion_steps=4", f"output_dir={out}"]) == 0
    res = subprocess.run([sys.executable, "-c", PLAIN, str(out / "pipeline"), str(tmp_path / "a.npy")],
                         cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    name, evaluations = res.stdout.split()
    steps = step_schedule(4, 10, 3, "cosine")
    assert (name == "MaskedAutoregressivePipeline"
            and int(evaluations) == sum(len(head_timesteps(t)) for t in steps))
    import distill

    pipe = distill.load_pipeline(str(out / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    ours = pipe(batch_size=4, class_labels=[0, 1, 2, 3], num_iter=4, step_schedule="cosine",
                diffusion_steps=10, min_diffusion_steps=3, generator=torch.Generator().manual_seed(1),
                output_type="np").images
    np.testing.assert_array_equal(ours, np.load(tmp_path / "a.npy"))
    assert ours.shape == (4, 16, 16, 1)

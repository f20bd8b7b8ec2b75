"""DiSA step annealing (Zhao et al. 2025) and the masked-autoregressive generator (Li et al. 2024): the
schedules against the reference formulas, the head's respacing against ADM's space_timesteps, MAR's
masking and sampling bookkeeping, training, export and a plain-diffusers load."""

import math
import os
import subprocess
import sys
import types

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


def _tiny(num_classes=3, seed=0, learn_sigma=False, in_channels=1):
    torch.manual_seed(seed)
    model = MaskedAutoregressiveModel(sample_size=4, in_channels=in_channels, patch_size=2, width=16, depth=1,
                                      num_heads=2, num_classes=num_classes, head_width=16, head_depth=1,
                                      learn_sigma=learn_sigma)
    import diffusers

    sched = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    return MaskedAutoregressivePipeline(model, sched)


def _trained_looking(pipe, seed=0):
    """Random (not zero-initialised) output layers, so the head's eps and v_raw depend on x_t, t and z."""
    g = torch.Generator().manual_seed(seed)
    for layer in (pipe.mar.head.out, pipe.mar.head.ada[1]):
        layer.weight.data = torch.randn(layer.weight.shape, generator=g) * 0.1
        layer.bias.data = torch.randn(layer.bias.shape, generator=g) * 0.1
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_patchify_is_the_raster_index_formula_and_unpatchify_its_inverse():
    model = _tiny(in_channels=2).mar  # 4x4 images of 2 channels, 2x2 patches: 4 tokens of 8 values
    x = torch.randn(3, 2, 4, 4)
    tokens = model.patchify(x)
    assert tokens.shape == (3, 4, 8)
    p, n = 2, 2  # patch side, patches per row
    for b, c, h, w in np.ndindex(3, 2, 4, 4):
        # token (h // p) n + w // p in raster order; inside it channel-major, then the patch's rows
        assert tokens[b, (h // p) * n + w // p, c * p * p + (h % p) * p + w % p] == x[b, c, h, w]
    assert torch.equal(model.unpatchify(tokens), x)


def test_masked_tokens_are_invisible():
    model = _tiny().mar
    tokens = model.patchify(torch.randn(3, 1, 4, 4))
    mask = torch.tensor([[True, False, True, False]] * 3)
    labels = torch.tensor([0, 1, 2])
    other = tokens.clone()
    other[mask] = torch.randn_like(other[mask])
    torch.testing.assert_close(model.encode(tokens, mask, labels), model.encode(other, mask, labels))
    changed = tokens.clone()
    changed[:, 1] += 1.0  # a known token does change z
    assert not torch.allclose(model.encode(tokens, mask, labels), model.encode(changed, mask, labels))


def _record_head(pipe):
    """Wrap the head: the list of timestep tensors it was called with (one entry per evaluation)."""
    calls, inner = [], pipe.mar.head.forward

    def recorded(x_t, timestep, z):
        calls.append(timestep)
        return inner(x_t, timestep, z)

    pipe.mar.head.forward = recorded
    return calls


# head evaluations of 3 AR iterations, 50 -> 4 head steps, by hand: ADM's spacing of n steps takes
# round(j 999 / (n - 1)); DiSA clips at 950, so 50 steps keep 48 indices (961, 979, 999 -> 950) and 27 steps
# keep 26 (j = 25, 26: 961, 999 -> 950); 4 steps keep 4. Cosine / linear: [50, 4 + int(23.0) = 27, 4];
# two-stage: [50, 4, 4] (k = 1 is not < (K - 1) / 2 = 1); constant: [4, 4, 4]; MAR's sampler (None):
# 50 unclipped indices at every iteration.
@pytest.mark.parametrize("schedule, steps, evaluations", [
    (None, [50, 50, 50], 150), ("linear", [50, 27, 4], 48 + 26 + 4), ("cosine", [50, 27, 4], 48 + 26 + 4),
    ("two-stage", [50, 4, 4], 48 + 4 + 4), ("constant", [4, 4, 4], 12)])
def test_pipeline_head_evaluations_are_the_schedules_sum(schedule, steps, evaluations):
    pipe = _trained_looking(_tiny(learn_sigma=True))
    calls = _record_head(pipe)
    out = pipe(batch_size=2, num_iter=3, step_schedule=schedule, diffusion_steps=50, min_diffusion_steps=4,
               generator=torch.Generator().manual_seed(0), output_type="np", guidance_scale=2.0)
    assert out.diffusion_steps == steps and out.head_evaluations == evaluations == len(calls)
    again = pipe(batch_size=2, num_iter=3, step_schedule=schedule, diffusion_steps=50, min_diffusion_steps=4,
                 generator=torch.Generator().manual_seed(0), output_type="np", guidance_scale=2.0)
    np.testing.assert_array_equal(out.images, again.images)


def test_mar_sampler_uses_the_full_respaced_range_and_disa_clips_at_950():
    pipe = _trained_looking(_tiny())
    calls = _record_head(pipe)
    pipe(batch_size=1, num_iter=2, diffusion_steps=10, generator=torch.Generator().manual_seed(0))
    assert max(float(t.max()) for t in calls) == 999  # MAR's sampler (step_schedule=None): no clipping
    calls.clear()
    pipe(batch_size=1, num_iter=2, step_schedule="cosine", diffusion_steps=10, min_diffusion_steps=3,
         generator=torch.Generator().manual_seed(0))
    assert max(float(t.max()) for t in calls) == 950  # DiSA's sampler clips at 950


def test_guidance_scale_of_each_iteration_is_mars_linear_schedule(monkeypatch):
    import distill.pipelines.mar as mar_pipeline

    scales, inner = [], mar_pipeline.classifier_free_guidance
    monkeypatch.setattr(mar_pipeline, "classifier_free_guidance",
                        lambda c, u, s: scales.append(s) or inner(c, u, s))
    pipe = _trained_looking(_tiny())
    pipe(batch_size=1, num_iter=3, diffusion_steps=2, guidance_scale=2.0,
         generator=torch.Generator().manual_seed(0))
    # L = 4 tokens; mask_len after iteration k: floor(4 cos(pi/6)) = 3, floor(4 cos(pi/3)) = 2, then at
    # least 1 (MAR's sample_tokens); s_k = 1 + (s - 1)(L - mask_len) / L
    assert sorted(set(scales)) == [1.25, 1.5, 1.75] and scales[-1] == 1.75


def test_orders_are_drawn_on_the_generators_device(monkeypatch):
    """No CUDA here: this proves that the pipeline asks for its draws on the generator's device (a CUDA
    generator with a CPU draw raises in torch), not that a CUDA run works."""
    requested, inner = [], torch.rand

    def rand(*size, generator=None, device=None, **kw):
        requested.append((generator.device if generator is not None else None, device))
        return inner(*size, generator=generator, device=device, **kw)

    monkeypatch.setattr(torch, "rand", rand)
    _trained_looking(_tiny())(batch_size=2, num_iter=2, diffusion_steps=2,
                              generator=torch.Generator().manual_seed(0))
    assert requested and all(gen is not None and dev is not None and torch.device(dev) == gen
                             for gen, dev in requested)
    requested.clear()
    from distill.pipelines.mar import random_orders

    cuda = types.SimpleNamespace(device=torch.device("cuda"))
    monkeypatch.setattr(torch, "rand", lambda *size, generator=None, device=None: requested.append(device)
                        or inner(*size))
    assert random_orders(2, 5, cuda, torch.device("cpu")).device.type == "cpu"
    assert requested == [torch.device("cuda")]


def _reference_mar_sample(model, labels, num_iter, schedule, hi, lo, cfg, temperature, generator):
    """MAR's ``sample_tokens`` (LTH14/mar, models/mar.py) with DiSA's ``DiffLoss.sample`` and ADM's
    ``p_sample_loop`` on a SpacedDiffusion (learned range, clip_denoised=False), restated in float64 numpy
    coefficients. Random draws in the pipeline's order: the orders, then per iteration the start noise and
    one draw per step above t = 0 for the conditional half only (the reference also draws noise for the
    null-class half and at t = 0, and discards both)."""
    def alpha_bar(t):  # ADM's "cosine" schedule (betas_for_alpha_bar, max_beta 0.999)
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    ac = np.cumprod([1 - min(1 - alpha_bar((i + 1) / 1000) / alpha_bar(i / 1000), 0.999)
                     for i in range(1000)])
    bsz, length, dim = len(labels), model.seq_len, model.token_dim
    orders = torch.argsort(torch.rand(bsz, length, generator=generator), dim=1)
    mask, tokens = torch.ones(bsz, length), torch.zeros(bsz, length, dim)
    null = torch.full((bsz,), model.config.num_classes)
    for step in range(num_iter):
        z = model.encode(tokens, mask.bool(), labels)
        z_null = model.encode(tokens, mask.bool(), null)
        mask_len = np.floor(length * np.cos(math.pi / 2.0 * (step + 1) / num_iter))
        mask_len = int(max(1, min(mask[0].sum().item() - 1, mask_len)))
        mask_next = torch.zeros(bsz, length).scatter(1, orders[:, :mask_len], 1.0)
        to_pred = mask.bool() if step >= num_iter - 1 else mask.bool() ^ mask_next.bool()
        mask = mask_next
        cfg_iter = 1 + (cfg - 1) * (length - mask_len) / length
        n_steps = hi if schedule is None else _reference(step, num_iter, hi, lo, schedule)
        kept = sorted(_space_timesteps(1000, n_steps))
        kept = sorted({min(t, 950) for t in kept}) if schedule is not None else kept  # DiSA: clip_timesteps
        betas, last = [], 1.0
        for i in range(1000):  # SpacedDiffusion.__init__
            if i in kept:
                betas.append(1 - ac[i] / last)
                last = ac[i]
        betas = np.array(betas)
        acs = np.cumprod(1 - betas)
        acs_prev = np.append(1.0, acs[:-1])
        post_var = betas * (1 - acs_prev) / (1 - acs)
        log_clipped = np.log(np.append(post_var[1], post_var[1:]))
        coef1 = betas * np.sqrt(acs_prev) / (1 - acs)
        coef2 = (1 - acs_prev) * np.sqrt(1 - betas) / (1 - acs)
        n = int(to_pred.sum())
        cond = torch.cat([z[to_pred], z_null[to_pred]])
        x = torch.randn(n, dim, generator=generator)
        for j in reversed(range(len(kept))):
            out = model(torch.cat([x, x]), torch.full((2 * n,), kept[j]), cond)  # forward_with_cfg
            eps_c, eps_u, v_raw = out[:n, :dim], out[n:, :dim], out[:n, dim:]
            eps = eps_u + cfg_iter * (eps_c - eps_u)
            x0 = math.sqrt(1 / acs[j]) * x - math.sqrt(1 / acs[j] - 1) * eps
            mean = float(coef1[j]) * x0 + float(coef2[j]) * x
            if j == 0:
                x = mean
                break
            frac = (v_raw + 1) / 2
            log_var = frac * math.log(betas[j]) + (1 - frac) * float(log_clipped[j])
            x = mean + torch.exp(0.5 * log_var) * torch.randn(n, dim, generator=generator) * temperature
        tokens[to_pred] = x
    return model.unpatchify(tokens)


@pytest.mark.parametrize("schedule, hi, lo", [(None, 12, 12), ("cosine", 12, 3), ("two-stage", 9, 2)])
def test_pipeline_equals_mars_and_disas_reference_loop(schedule, hi, lo):
    pipe = _trained_looking(_tiny(learn_sigma=True), seed=3)
    made, unpatchify = [], pipe.mar.unpatchify
    pipe.mar.unpatchify = lambda tokens: made.append(tokens.clone()) or unpatchify(tokens)  # before clamping
    labels = torch.tensor([0, 2, 1])
    pipe(batch_size=3, class_labels=labels, num_iter=3, step_schedule=schedule, diffusion_steps=hi,
         min_diffusion_steps=lo, guidance_scale=2.5, temperature=0.8,
         generator=torch.Generator().manual_seed(7), output_type="pt")
    with torch.no_grad():
        ref = _reference_mar_sample(pipe.mar, labels, 3, schedule, hi, lo, 2.5, 0.8,
                                    torch.Generator().manual_seed(7))
    torch.testing.assert_close(pipe.mar.unpatchify(made[0]), ref, rtol=1e-4, atol=1e-4)


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

"""SIM and Uni-Instruct trainers end to end on the exact Gaussian-mixture teacher."""

import pytest
import torch

from distill import load_pipeline
from distill.config import load_config
from distill.eval.toy import toy_report
from distill.objectives.score import SIMLoss
from distill.teachers import analytic_teacher
from distill.trainers import trainer_class

FAST = ["train.progress_bar=false", "train.report_to=none", "train.checkpointing_steps=1000"]


def _run(config, tmp_path, *overrides):
    cfg = load_config(config, FAST + [f"output_dir={tmp_path}", *overrides])
    trainer = trainer_class(cfg.method)(cfg)
    path = trainer.train()
    return trainer, path


def _toy_metrics(path):
    pipe = load_pipeline(str(path))
    pipe.set_progress_bar_config(disable=True)
    teacher = analytic_teacher("gaussians8")
    ref, _ = teacher.model.sample_data(8000, generator=torch.Generator().manual_seed(1))
    x = pipe(batch_size=8000, generator=torch.Generator().manual_seed(0), output_type="pt").images
    ddim4 = teacher.sample(8000, num_steps=4, generator=torch.Generator().manual_seed(0))
    return toy_report(x, teacher.model, ref), toy_report(ddim4, teacher.model, ref)


def test_trainer_generator_equals_exported_pipeline(tmp_path):
    trainer, path = _run("configs/sim_gaussians8.yaml", tmp_path, "train.max_steps=3",
                         "sim.init_denoiser_steps=5")
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    with trainer.ema_weights():
        ours = trainer.generate(trainer.unwrap("student"), z, None)
    pipe = load_pipeline(str(path))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=16, latents=z, output_type="pt").images
    torch.testing.assert_close(out, ours, atol=1e-5, rtol=1e-5)
    card = (path / "README.md").read_text()
    assert "pseudo_huber" in card and "generator_timestep" in card


@pytest.mark.parametrize("divergence", ["fkl", "di", "dmd", "rkl"])
def test_uni_instruct_runs_each_branch_with_its_loss_and_schedule(tmp_path, divergence):
    """Each branch trains with its own surrogate on its own schedule: forward KL uses the SIM-L2 warm-up
    (rkl, fixed) before ratio_warmup_steps and the h(r)-weighted loss with a discriminator after; DMD takes
    DMD2's 5 fake-score updates per generator update, the others 1; the generator's weights move."""
    from distill.objectives.score import DiffInstructLoss, UniInstructLoss

    cfg = load_config("configs/uni_instruct_gaussians8.yaml", FAST + [
        f"output_dir={tmp_path}", "train.max_steps=6", "uni_instruct.init_denoiser_steps=5",
        f"uni_instruct.divergence={divergence}", "uni_instruct.ratio_warmup_steps=2", "train.log_every=1"])
    trainer = trainer_class(cfg.method)(cfg)
    used, calls = [], {"fake": 0, "generator": 0}
    pick, fake_step, gen_step = trainer.generator_loss, trainer.fake_step, trainer.generator_step

    def generator_loss(step):
        loss = pick(step)
        used.append((step, type(loss).__name__, getattr(loss, "divergence", None)))
        return loss

    before = {}

    def count(name, fn):
        def wrapped(*args, **kwargs):
            if name == "generator" and not before:  # the weights the generator's updates start from
                before.update({k: v.clone() for k, v in trainer.unwrap("student").state_dict().items()})
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    trainer.generator_loss = generator_loss
    trainer.fake_step, trainer.generator_step = count("fake", fake_step), count("generator", gen_step)
    path = trainer.train()
    if divergence == "fkl":
        assert [u[1:] for u in used if u[0] < 2] == [("UniInstructLoss", "rkl")] * 2
        assert {u[1:] for u in used if u[0] >= 2} == {("UniInstructLoss", "fkl")}
        assert trainer.generator_loss(5) is trainer.loss and trainer.loss.sampling == "full"
    elif divergence in ("di", "dmd"):
        assert {u[1] for u in used} == {"DiffInstructLoss"}
        assert isinstance(trainer.loss, DiffInstructLoss) and trainer.loss.normalize == (divergence == "dmd")
    elif divergence == "rkl":
        assert isinstance(trainer.loss, UniInstructLoss) and trainer.loss.divergence == "rkl"
    assert calls["fake"] == (5 if divergence == "dmd" else 1) * calls["generator"] > 0
    assert ("disc_loss" in trainer.history[-1]) == (divergence == "fkl")
    after = trainer.unwrap("student").state_dict()
    assert max((after[k] - before[k]).abs().max() for k in before) > 0
    assert (path / "model_index.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("config,overrides", [
    ("configs/sim_gaussians8.yaml", []),
    ("configs/uni_instruct_gaussians8.yaml", ["uni_instruct.divergence=fkl"]),
    ("configs/uni_instruct_gaussians8.yaml", ["uni_instruct.divergence=rkl"]),
    ("configs/uni_instruct_gaussians8.yaml", ["uni_instruct.divergence=jeffreys"]),
])
def test_one_step_student_beats_teacher_4_step_ddim(tmp_path, config, overrides):
    _, path = _run(config, tmp_path, *overrides)
    student, ddim4 = _toy_metrics(path)
    assert student["modes"] == 8, student
    assert student["swd"] <= ddim4["swd"], (student, ddim4)


@pytest.mark.parametrize("method", ["sim", "uni_instruct"])
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, method):
    """Checkpointed networks recompute their forward in the backward pass; the fake network must
    stay frozen through the generator's backward (a requires_grad toggle between forward and
    backward made the recomputation differ: torch CheckpointError). The parameter gradients of one
    iteration (fake score, discriminator, generator) are compared before any optimizer step: a
    comparison of weights after Adam(0, 0.999) steps, close to lr * sign(g), would miss a wrong scale."""
    grads = {}
    for gc in (False, True):
        trainer = _setup(f"configs/{method}_digits.yaml", tmp_path / str(gc), "train.batch_size=4",
                         "eval.enabled=false", f"{method}.gradient_checkpointing={gc}",
                         f"{method}.ratio_warmup_steps=0" if method == "uni_instruct" else "train.seed=0")
        got = grads[gc] = {}

        def capture(name, _t=trainer, _got=got):
            _got[name] = {k: p.grad.clone() for k,
                          p in _t.unwrap(name).named_parameters() if p.grad is not None}
            _t.optimizers[name].zero_grad(set_to_none=True)

        trainer.apply_gradients = capture
        trainer.rng = trainer.step_generator(0, 0)
        trainer.run_objective(trainer.objective(trainer._batch(), 0))
    assert set(grads[False]) == set(grads[True]) >= {"student", "fake"}
    for name, ref in grads[False].items():
        assert ref.keys() == grads[True][name].keys() and ref
        for k, g in ref.items():
            torch.testing.assert_close(grads[True][name][k], g, atol=1e-6, rtol=1e-4, msg=f"{name}.{k}")


@pytest.mark.slow
def test_gradient_checkpointing_under_bf16_autocast(tmp_path):
    """bf16 autocast + checkpointing through the command line (Accelerate's state is per process);
    CPU autocast here, the CUDA path is in benchmarks/gpu_check.py."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "distill", "train", "configs/uni_instruct_digits.yaml",
           f"output_dir={tmp_path}", *FAST, "train.max_steps=2", "train.batch_size=4", "eval.enabled=false",
           "train.log_every=1", "uni_instruct.gradient_checkpointing=true", "train.mixed_precision=bf16"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    history = json.loads((tmp_path / "train_history.json").read_text())
    assert history and all(torch.isfinite(torch.tensor(r["gen_loss"])) for r in history if "gen_loss" in r)


def _setup(config, tmp_path, *overrides):
    cfg = load_config(config, FAST + [f"output_dir={tmp_path}", *overrides])
    trainer = trainer_class(cfg.method)(cfg)
    trainer.setup()
    return trainer


def test_uni_instruct_warmup_is_pure_sim_l2_then_the_f_loss(tmp_path):
    """Before ratio_warmup_steps an f-divergence run trains on SIM-L2 (= SiD alpha 1), not SiD(0.5)."""
    trainer = _setup("configs/uni_instruct_gaussians8.yaml", tmp_path, "uni_instruct.ratio_warmup_steps=3",
                     "uni_instruct.sampling=full", "uni_instruct.init_denoiser_steps=0")
    g = torch.Generator().manual_seed(0)
    x0, x_t, d_real, d_fake = (torch.randn(64, 2, generator=g) for _ in range(4))
    coef, ones = torch.full((64,), 2.0), torch.ones(64)
    sim_l2 = SIMLoss(distance="l2")(x0, x_t, d_real, d_fake)
    sid_half = SIMLoss(distance="l2", sid_alpha=0.5)(x0, x_t, d_real, d_fake)
    warm = trainer.generator_loss(2)(x0, x_t, d_real, d_fake, coef, ones)
    torch.testing.assert_close(warm, sim_l2)
    assert not torch.allclose(warm, sid_half)
    assert trainer.generator_loss(3) is trainer.loss and trainer.loss.divergence == "fkl"


def test_dmd_defaults_to_five_fake_updates_per_generator_update(tmp_path):
    counts = {}
    for divergence, extra in (("dmd", []), ("di", []),
                              ("dmd", ["uni_instruct.fake_steps_per_generator_step=2"])):
        trainer = _setup("configs/uni_instruct_gaussians8.yaml", tmp_path / divergence,
                         f"uni_instruct.divergence={divergence}", "uni_instruct.init_denoiser_steps=0",
                         "train.batch_size=16", *extra)
        calls = []
        inner = trainer.fake_step
        trainer.fake_step = lambda *a, _inner=inner, _calls=calls: _calls.append(1) or _inner(*a)
        trainer.rng = trainer.step_generator(0, 0)
        trainer.run_objective(trainer.objective(trainer._batch(), 0))
        counts[(divergence, bool(extra))] = len(calls)
    assert counts == {("dmd", False): 5, ("di", False): 1, ("dmd", True): 2}


def test_f_weights_change_the_update_after_the_warmup_and_the_ratio_moves(tmp_path):
    """fkl with a 2-step warm-up vs fkl kept in warm-up: bitwise the same generator for 2 steps (same
    noise streams, the same SIM-L2 loss), different after the f-weights switch on."""
    def student(tag, warmup, steps):
        trainer, _ = _run("configs/uni_instruct_gaussians8.yaml", tmp_path / f"{tag}{steps}",
                          f"train.max_steps={steps}", "uni_instruct.init_denoiser_steps=5",
                          "train.batch_size=128", f"uni_instruct.ratio_warmup_steps={warmup}",
                          "train.log_every=1")
        return trainer.unwrap("student").state_dict(), trainer.history

    for steps, same in ((2, True), (5, False)):
        a, hist = student("f", 2, steps)
        b, _ = student("sim", 1000, steps)
        assert all(torch.equal(a[k], b[k]) for k in a) == same, steps
    log_r = torch.tensor([h["log_ratio_mean"] for h in hist])
    assert log_r.max() - log_r.min() > 1e-3, log_r

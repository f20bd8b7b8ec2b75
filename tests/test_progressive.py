"""Progressive distillation: the closed-form target, the round plan, exports per round."""

import json

import pytest
import torch

from distill import load_pipeline
from distill.config import load_config
from distill.eval.toy import toy_report
from distill.objectives.progressive import progressive_target
from distill.teachers import analytic_teacher
from distill.trainers import trainer_class
from distill.trainers.rounds import round_plan


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_x_tilde_makes_one_student_step_land_on_two_teacher_steps(pred):
    teacher = analytic_teacher("gaussians8", prediction_type=pred)
    sched = teacher.schedule
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 2, generator=g, dtype=torch.float64)
    for k0, k1, k2 in [(999, 749, 499), (499, 374, 249), (600, 550, 500)]:
        t, t1, t2 = (torch.full((64,), k / 999, dtype=torch.float64) for k in (k0, k1, k2))
        x_t = (sched.alpha(t)[:, None] * torch.randn(64, 2, generator=g, dtype=torch.float64)
               + sched.sigma(t)[:, None] * z)

        def x0(zz, tt):
            return teacher.predict_x0(zz, tt)

        z1 = sched.ddim_step(x_t, x0(x_t, t), t, t1)
        z2 = sched.ddim_step(z1, x0(z1, t1), t1, t2)
        target = progressive_target(sched, x0, x_t, t, t1, t2)
        student = sched.ddim_step(x_t, target, t, t2)
        torch.testing.assert_close(student, z2, atol=1e-5, rtol=1e-5)
    # last interval: the target is the teacher's second x-prediction
    t, t1 = torch.full((4,), 249 / 999, dtype=torch.float64), torch.full((4,), 124 / 999, dtype=torch.float64)
    nan = torch.full((4,), float("nan"), dtype=torch.float64)
    x_t = torch.randn(4, 2, generator=g, dtype=torch.float64)
    z1 = sched.ddim_step(x_t, teacher.predict_x0(x_t, t), t, t1)
    torch.testing.assert_close(progressive_target(sched, teacher.predict_x0, x_t, t, t1, nan),
                               teacher.predict_x0(z1, t1))


def test_round_plan_doubles_the_last_two_rounds():
    assert round_plan(16, 1, 100, 2.0) == [(8, 100), (4, 100), (2, 200), (1, 200)]
    assert round_plan(8, 2, 10, 2.0) == [(4, 10), (2, 20)]


def test_rounds_export_students_that_sample_with_their_stored_steps(tmp_path):
    cfg = load_config("configs/progressive_gaussians8.yaml", [
        f"output_dir={tmp_path}", "progressive.start_steps=4", "progressive.steps_per_round=4",
        "progressive.init_denoiser_steps=20", "train.progress_bar=false", "train.report_to=none",
        "train.checkpointing_steps=100"])
    trainer = trainer_class("progressive")(cfg)
    final = trainer.train()
    assert trainer.max_steps == trainer.step == 8 + 8  # rounds 4->2 and 2->1, both doubled
    for n, grid in ((2, [999, 499]), (1, [999])):
        folder = tmp_path / "rounds" / f"steps-{n}"
        index = json.loads((folder / "model_index.json").read_text())
        assert index["num_inference_steps"] == n and index["timesteps"] == grid
        pipe = load_pipeline(str(folder))
        pipe.set_progress_bar_config(disable=True)
        assert pipe.grid() == grid
        assert pipe(batch_size=3, output_type="np").images.shape == (3, 2)
    assert json.loads((final / "model_index.json").read_text())["num_inference_steps"] == 1


@pytest.mark.parametrize("round_ema", [False, True])
def test_round_exports_are_the_next_rounds_teacher_with_and_without_the_round_ema(tmp_path, round_ema):
    """progressive.round_ema: the EMA of the round's student (train.ema_decay), restarted each round, ends the
    round: the round's export, the next round's frozen teacher and the EMA's shadow are the same weights;
    without it the student's last weights are (no EMA tracked)."""
    from diffusers.models.modeling_utils import load_state_dict

    cfg = load_config("configs/progressive_gaussians8.yaml", [
        f"output_dir={tmp_path}", "progressive.start_steps=4", "progressive.steps_per_round=4",
        "progressive.init_denoiser_steps=20", "train.progress_bar=false", "train.report_to=none",
        "train.checkpointing_steps=100", f"progressive.round_ema={round_ema}", "train.ema_decay=0.5"])
    trainer = trainer_class("progressive")(cfg)
    seen = {}
    start = trainer._start_round

    def start_round(r):
        if r == 1:
            student = trainer.unwrap("student")
            seen["last"] = {k: v.clone() for k, v in student.state_dict().items()}
            if "student" in trainer.emas:
                names = [k for k, _ in student.named_parameters()]
                seen["ema"] = dict(zip(names, (p.clone() for p in trainer.emas["student"].shadow_params)))
        start(r)
        if r == 1:
            seen["teacher"] = {k: v.clone() for k, v in trainer.unwrap("round_teacher").state_dict().items()}

    trainer._start_round = start_round
    trainer.train()
    assert ("student" in trainer.emas) == round_ema
    folder = tmp_path / "rounds" / "steps-2" / "unet"
    exported = load_state_dict(str(folder / "diffusion_pytorch_model.safetensors"))
    ended = seen["ema"] if round_ema else seen["last"]
    for k, v in ended.items():
        torch.testing.assert_close(exported[k], v, rtol=0, atol=0)
        torch.testing.assert_close(seen["teacher"][k], v, rtol=0, atol=0)
    if round_ema:  # the EMA's weights are not the last update's
        assert max((seen["ema"][k] - seen["last"][k]).abs().max() for k in seen["ema"]) > 1e-6


@pytest.mark.slow
def test_progressive_students_beat_ddim_at_every_step_count(tmp_path):
    cfg = load_config("configs/progressive_gaussians8.yaml", [
        f"output_dir={tmp_path}", "progressive.start_steps=16", "train.progress_bar=false",
        "train.report_to=none"])
    trainer_class("progressive")(cfg).train()
    teacher = analytic_teacher("gaussians8")
    ref, _ = teacher.model.sample_data(8000, generator=torch.Generator().manual_seed(1))
    for n in (8, 4, 2, 1):
        pipe = load_pipeline(str(tmp_path / "rounds" / f"steps-{n}"))
        pipe.set_progress_bar_config(disable=True)
        x = pipe(batch_size=8000, generator=torch.Generator().manual_seed(0), output_type="pt").images
        student = toy_report(x, teacher.model, ref)
        ddim = toy_report(teacher.sample(8000, num_steps=n, generator=torch.Generator().manual_seed(0)),
                          teacher.model, ref)
        assert student["swd"] < ddim["swd"], (n, student, ddim)
    assert student["modes"] == 8

"""Multi-student distillation (MSD, Song et al. 2024): partitions, routing in the exported pipeline (every
condition to exactly one student, mixed batches in order, identical after save / reload, with and without
distill), the trainer's per-student batches and networks, teacher score matching, and the text path on a
tiny Stable-Diffusion-format teacher."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

from distill import load_pipeline
from distill.config import ConfigError, load_config
from distill.data import read_prompts
from distill.export import export_pipeline
from distill.models import MLPDenoiser, StudentBank
from distill.partition import class_partition, kmeans
from distill.pipelines import MultiStudentPipeline
from distill.pipelines.one_step import x0_from_output
from distill.trainers import trainer_class

REPO = Path(__file__).resolve().parent.parent
FAST = ["train.progress_bar=false", "train.report_to=none"]


# ---------------------------------------------------------------------- partitions
def test_class_partitions():
    blocks = class_partition("blocks", 1000, 4)  # the paper's ImageNet split: 250 consecutive classes each
    assert blocks == [c // 250 for c in range(1000)]
    assert class_partition("blocks", 10, 3) == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    rnd = class_partition("random", 10, 3, seed=1)
    assert sorted(np.bincount(rnd).tolist()) == [3, 3, 4] and rnd != class_partition("blocks", 10, 3)
    assert rnd == class_partition("random", 10, 3, seed=1) != class_partition("random", 10, 3, seed=2)
    with pytest.raises(ConfigError, match="more than the teacher's 3 classes"):
        class_partition("blocks", 3, 4)


def test_partition_file_is_checked(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps([1, 0, 1]))
    assert class_partition("file", 3, 2, file=str(f)) == [1, 0, 1]
    f.write_text(json.dumps([1, 0, 2]))
    with pytest.raises(ConfigError, match=r"3 integers in \[0, 2\)"):
        class_partition("file", 3, 2, file=str(f))
    with pytest.raises(ConfigError, match="does not exist"):
        class_partition("file", 3, 2, file=str(tmp_path / "nope.json"))


@pytest.mark.parametrize("dim", [2, 7])
def test_kmeans_finds_separated_clusters(dim):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, dim, generator=g) * 10
    x = torch.cat([c + 0.1 * torch.randn(200, dim, generator=g) for c in centers])
    found = kmeans(x, 3, seed=0)
    d = torch.cdist(found, centers)
    assert sorted(d.argmin(1).tolist()) == [0, 1, 2] and d.min(1).values.max() < 0.05


# ---------------------------------------------------------------------- the pipeline
def _bank(k=3, num_classes=5, seed=0):
    nets = []
    for j in range(k):
        torch.manual_seed(seed + j)
        nets.append(MLPDenoiser(data_dim=2, hidden=16, num_layers=2, num_class_embeds=num_classes + 1))
    return nets, StudentBank.from_students(nets)


def _pipe(table=(2, 0, 1, 0, 2), t_star=700):
    nets, bank = _bank(num_classes=len(table))
    sched = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample")
    pipe = MultiStudentPipeline(bank, sched, generator_timestep=t_star, sample_shape=[2],
                                num_classes=len(table),
                                routing={"kind": "classes", "student_of_class": list(table)})
    pipe.set_progress_bar_config(disable=True)
    return nets, pipe


def test_every_condition_goes_to_its_one_student_and_mixed_batches_come_back_in_order():
    table = [2, 0, 1, 0, 2]
    nets, pipe = _pipe(table)
    labels = torch.tensor([4, 1, 0, 3, 2, 2, 1, 0])
    assert pipe.route(class_labels=labels).tolist() == [table[c] for c in labels]
    z = torch.randn(len(labels), 2, generator=torch.Generator().manual_seed(3))
    out = pipe(class_labels=labels, latents=z, output_type="pt").images
    ac = pipe.scheduler.alphas_cumprod[700].item()
    for i, c in enumerate(labels.tolist()):  # row i is student table[c] at t* on sigma z_i, and no other
        x_in = (1 - ac) ** 0.5 * z[i:i + 1]
        with torch.no_grad():
            want = {k: x0_from_output(net(x_in, torch.tensor([700]), class_labels=labels[i:i + 1]).sample,
                                      x_in, ac**0.5, (1 - ac) ** 0.5, "sample") for k, net in enumerate(nets)}
        assert torch.allclose(out[i], want[table[c]][0], atol=1e-6)
        assert all(not torch.allclose(out[i], want[k][0], atol=1e-3) for k in want if k != table[c])
        alone = pipe(class_labels=labels[i:i + 1], latents=z[i:i + 1], output_type="pt").images
        assert torch.allclose(alone[0], out[i], atol=1e-6)  # a sample does not depend on its batch-mates
    with pytest.raises(ValueError, match="null class has none"):
        pipe(class_labels=[5])
    with pytest.raises(ValueError, match="routes by class"):
        pipe.route()


def test_bad_routing_tables_are_refused():
    _, bank = _bank(k=2, num_classes=3)
    sched = diffusers.DDPMScheduler()
    with pytest.raises(ValueError, match="each of the 3 classes a student"):
        MultiStudentPipeline(bank, sched, sample_shape=[2], num_classes=3,
                             routing={"kind": "classes", "student_of_class": [0, 2, 1]})
    with pytest.raises(ValueError, match="routing.kind"):
        MultiStudentPipeline(bank, sched, sample_shape=[2], num_classes=3, routing={"kind": "hash"})


def test_prompt_routing_with_embeddings_of_another_width_names_what_to_pass():
    """An SDXL-class multi-student pipeline routes by the pooled embedding; prompt_embeds alone (whose token
    mean has another width) gets a message naming the widths and the fix, not torch.cdist's error."""
    _, bank = _bank(k=2, num_classes=3)
    pipe = MultiStudentPipeline(bank, diffusers.DDPMScheduler(), sample_shape=[2],
                                routing={"kind": "prompt_clusters", "centroids": [[1.0] * 4, [-1.0] * 4]})
    pooled = torch.tensor([[1.0] * 4, [-2.0] * 4])
    assert pipe.route(prompt_embeds=torch.randn(2, 5, 6), pooled_prompt_embeds=pooled).tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"width 6.*centroids of width 4.*pooled_prompt_embeds"):
        pipe.route(prompt_embeds=torch.randn(2, 5, 6))


PLAIN_LOAD = """
import sys, numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
kw = dict(prompt=["a red cat", "a blue dog", "a small house by the sea"]) if sys.argv[3] == "text" else dict(
    class_labels=[4, 1, 0, 3, 2, 2])
out = pipe(generator=torch.Generator().manual_seed(0), output_type="np", **kw).images
assert "distill" not in sys.modules
np.save(sys.argv[2], out)
print(type(pipe).__name__, type(pipe.students).__name__, len(pipe.students))
"""


def _plain_load(folder, tmp_path, kind):
    res = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(folder), str(tmp_path / "plain.npy"), kind],
                         cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip(), np.load(tmp_path / "plain.npy")


def test_saved_and_reloaded_pipeline_routes_and_samples_identically(tmp_path):
    _, pipe = _pipe()
    labels = [4, 1, 0, 3, 2, 2]
    before = pipe(class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="np").images
    folder = export_pipeline(pipe, tmp_path / "msd")
    assert ((folder / "students" / "distill_student_bank.py").is_file()
            and (folder / "students" / "mlp.py").is_file())
    again = load_pipeline(str(folder))
    again.set_progress_bar_config(disable=True)
    assert again.config.routing == pipe.config.routing
    after = again(class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="np").images
    np.testing.assert_array_equal(before, after)
    said, plain = _plain_load(folder, tmp_path, "classes")  # a Python that never imported distill
    assert said == "MultiStudentPipeline StudentBank 3"
    np.testing.assert_array_equal(before, plain)


# ---------------------------------------------------------------------- the trainer
def _toy_cfg(tmp_path, *extra):
    return load_config("configs/msd_gaussians8.yaml", FAST + [f"output_dir={tmp_path}", "train.max_steps=2",
                                                              "msd.tsm_steps=3", "train.batch_size=32",
                                                              *extra])


def test_each_student_trains_on_its_own_classes_and_only_there(tmp_path):
    cfg = _toy_cfg(tmp_path, "msd.num_students=4", "msd.partition=random")
    trainer = trainer_class("msd")(cfg)
    trainer.setup()
    table = trainer.routing["student_of_class"]
    labels = trainer.data.labels
    for j, rows in enumerate(trainer.parts):  # the parts cover the data, one student per row
        assert all(table[c] == j for c in labels[rows].tolist())
    assert sum(len(p) for p in trainer.parts) == len(labels)
    seen = []
    orig = trainer.generator_step

    def spy(g, cond, b, batch, step, **kw):
        seen.append((g.generator, g.fake, sorted(set(cond.class_labels.tolist())), b))
        return orig(g, cond, b, batch, step, **kw)

    trainer.generator_step = spy
    before = {n: [p.detach().clone() for p in trainer.unwrap(n).parameters()] for n in trainer.modules}
    trainer.train()
    assert len(seen) == 8 and all(b == 8 for *_, b in seen)
    for name, fake, classes, _ in seen:  # 8 rows of the student's own classes, against its own fake score
        j = int(name.split("_")[1])
        assert fake == f"fake_{j}" and classes and all(table[c] == j for c in classes)
    assert sorted(trainer.modules) == sorted([f"student_{j}" for j in range(4)]
                                             + [f"fake_{j}" for j in range(4)])
    for n, ps in before.items():  # every network moved
        assert any(not torch.equal(a, b) for a, b in zip(ps, trainer.unwrap(n).parameters())), n
    pipe = load_pipeline(str(tmp_path / "pipeline"))
    assert pipe.config.routing == trainer.routing and len(pipe.students) == 4
    with trainer.ema_weights():  # the export holds each student's EMA weights, in order
        for j in range(4):
            for a, b in zip(pipe.students.students[j].parameters(),
                            trainer.unwrap(f"student_{j}").parameters()):
                assert torch.equal(a, b)


def test_shared_fake_score_is_one_network_trained_on_every_students_samples(tmp_path):
    cfg = _toy_cfg(tmp_path, "msd.num_students=2", "msd.shared_fake=true")
    trainer = trainer_class("msd")(cfg)
    calls = []
    trainer.setup()
    orig = trainer.fake_inputs
    trainer.fake_inputs = lambda g, cond, b: calls.append((g.generator, b)) or orig(g, cond, b)
    trainer.train()
    assert sorted(trainer.modules) == ["fake", "student_0", "student_1"]
    assert calls == [("student_0", 16), ("student_1", 16)] * 2


def test_regression_pairs_are_teacher_ode_samples_of_every_condition(tmp_path):
    """DMD's paired set: y is the teacher's DDIM sample from x_T = z at the pair's class, the pairs span every
    student's classes (MSD: not filtered by partition), and the regression term enters each student's
    update."""
    cfg = _toy_cfg(tmp_path, "msd.num_students=4", "msd.regression_weight=0.5", "msd.regression_pairs=300",
                   "data.teacher_sample_steps=4")
    trainer = trainer_class("msd")(cfg)
    trainer.setup()
    rows, z, y = trainer.pairs
    t = trainer.teacher
    labels = trainer.data.labels[rows]
    assert set(labels.tolist()) == set(range(8))  # every class, hence every student's part
    want = t.sample(5, 4, cond=t.condition(class_labels=labels[:5]), noise=z[:5])
    assert torch.allclose(y[:5], want, atol=1e-5)
    other = t.sample(5, 4, cond=t.condition(class_labels=(labels[:5] + 4) % 8), noise=z[:5])
    assert (y[:5] - other).abs().max() > 0.5  # the class matters: the pairs hold their own class's sample
    g = trainer.groups[0]
    trainer.rng = torch.Generator().manual_seed(0)
    reg = trainer.regression_loss(g, 16)
    trainer.rng = torch.Generator().manual_seed(0)
    idx = torch.randint(len(z), (16,), generator=trainer.rng)
    x0 = trainer.generate(trainer.modules[g.generator], z[idx], trainer.rows_condition(rows[idx]))
    assert torch.allclose(reg, 0.5 * (x0 - y[idx]).pow(2).mean())
    trainer.train()
    assert all(h["extra_loss"] > 0 for h in trainer.history)


def test_teacher_score_matching_fits_a_small_student_to_the_teacher_on_its_part(tmp_path):
    """TSM: after fitting, student j predicts the teacher's x0 far better on its own classes than a fresh
    network."""
    cfg = _toy_cfg(tmp_path, "msd.num_students=2", "msd.tsm_steps=150", "student.hidden=32")
    trainer = trainer_class("msd")(cfg)
    trainer.setup()
    t = trainer.teacher
    fresh = trainer_class("msd")(_toy_cfg(tmp_path / "b", "msd.num_students=2", "msd.tsm_steps=0",
                                          "student.hidden=32"))
    fresh.setup()
    g = torch.Generator().manual_seed(5)
    for j in range(2):
        rows = trainer.parts[j][:512]
        x0, y = trainer.data.x[rows], trainer.data.labels[rows]
        tt = torch.full((len(x0),), 0.5, dtype=torch.float64)
        x_t = t.schedule.add_noise(x0, torch.randn(x0.shape, generator=g), tt)
        cond = t.condition(class_labels=y)
        want = t.predict_x0(x_t, tt, cond)
        errs = [(tr.as_denoiser(tr.unwrap(f"student_{j}")).x0(x_t, tt, cond) - want).pow(2).mean().item()
                for tr in (trainer, fresh)]
        assert errs[0] < 0.1 * errs[1], errs


def test_fake_scores_are_fitted_to_the_unguided_teacher(tmp_path):
    """TSM with a guided teacher: each student fits the guided teacher it distils, each fake score (per
    student or shared) the unguided one, so the first DM gradient D_fake - D_real is the guidance, not 0."""
    g = torch.Generator().manual_seed(5)
    for shared in ("false", "true"):
        cfg = _toy_cfg(tmp_path / shared, "msd.num_students=2", "msd.tsm_steps=150", "student.hidden=32",
                       "teacher.guidance_scale=3.0", f"msd.shared_fake={shared}")
        trainer = trainer_class("msd")(cfg)
        trainer.setup()
        t = trainer.teacher
        rows = trainer.parts[0][:512]
        x0, y = trainer.data.x[rows], trainer.data.labels[rows]
        tt = torch.full((len(x0),), 0.5, dtype=torch.float64)
        x_t = t.schedule.add_noise(x0, torch.randn(x0.shape, generator=g), tt)
        cond = t.condition(class_labels=y)
        guided, plain = t.predict_x0(x_t, tt, cond), t.predict_x0(x_t, tt, cond, guidance_scale=1.0)
        assert (guided - plain).pow(2).mean() > 0.05  # the guidance is visible at this noise level
        for name, near, far in (("student_0", guided, plain), (trainer.groups[0].fake, plain, guided)):
            out = trainer.as_denoiser(trainer.unwrap(name)).x0(x_t, tt, cond)
            err_near, err_far = (out - near).pow(2).mean().item(), (out - far).pow(2).mean().item()
            assert err_near < 0.5 * err_far, (shared, name, err_near, err_far)


# ---------------------------------------------------------------------- the ADM stage
A = 5.0  # hand-made "real data" of the tiny batch: +A for student 0's rows, -A for student 1's


def _adm_trainer(tmp_path, *extra):
    cfg = _toy_cfg(tmp_path, "msd.num_students=2", "msd.gan_weight=0.5", "msd.t_min=0.0", "msd.t_max=0.0001",
                   "msd.fake_steps_per_generator_step=1", "train.batch_size=8", *extra)
    trainer = trainer_class("msd")(cfg)
    trainer.setup()
    t = trainer.teacher
    labels = torch.arange(8)  # blocks: classes 0-3 are student 0's, 4-7 student 1's
    x = torch.tensor([[A, A]] * 4 + [[-A, -A]] * 4)
    return trainer, {"x": x, "cond": t.condition(class_labels=labels), "label": labels, "size": 8}


@pytest.mark.parametrize("shared", ["false", "true"])
def test_adm_discriminator_bce_sees_only_real_samples_of_each_students_part(tmp_path, shared):
    """A tiny partitioned batch (t ~ 0, so a noised real sample is the sample): each head's real input is the
    real rows of its own student's classes only, row by row with their conditions, and the logged BCE is
    softplus(-D(real)) + softplus(D(fake)) of the logits the heads gave."""
    trainer, batch = _adm_trainer(tmp_path, f"msd.shared_fake={shared}")
    seen, orig = [], trainer.fake_and_logit

    def spy(fake, head, name, x_t, t, cond):
        pred, logit = orig(fake, head, name, x_t, t, cond)
        seen.append((name, x_t.detach().clone(), cond.class_labels.clone(), logit.detach().clone()))
        return pred, logit

    trainer.fake_and_logit = spy
    trainer.rng = torch.Generator().manual_seed(0)
    logs = trainer.run_objective(trainer.objective(batch, 0))
    fake_calls = seen[:-2]  # the last two: the two generators' GAN terms
    reals = [s for s in fake_calls if (s[1].abs() - A).abs().max() < 0.1]
    assert len(reals) == len(fake_calls) // 2 == (2 if shared == "false" else 1)
    for name, x_t, labels, _ in reals:
        sign = torch.where(labels < 4, 1.0, -1.0)  # student 0: +A, student 1: -A
        assert torch.allclose(x_t, A * sign[:, None].expand(-1, 2), atol=0.1)
        if shared == "false":  # student j's head: only rows of its classes
            j = int(name.split("_")[1])
            assert len(labels) == 4 and all((c < 4) == (j == 0) for c in labels.tolist())
    bce = [torch.nn.functional.softplus(-real[3]).mean() + torch.nn.functional.softplus(fake[3]).mean()
           for fake, real in zip(fake_calls[0::2], fake_calls[1::2])]
    assert torch.allclose(logs["disc_loss"], sum(bce) / len(bce), atol=1e-6)


def test_adm_generator_gan_term_gradient_is_that_of_softplus_of_minus_logit(tmp_path):
    """The ADM generator update minus the DM update of the same draws is gan_weight x the gradient of
    mean softplus(-D(x_t)) at the student's own noised samples, D through the frozen fake score and head."""
    trainer, batch = _adm_trainer(tmp_path)
    g, cond = trainer.groups[0], batch["cond"][:4]
    params = list(trainer.unwrap(g.generator).parameters())

    def grads(step_fn):
        trainer.rng = torch.Generator().manual_seed(1)
        update = next(step_fn)
        return torch.autograd.grad(update.loss, params, allow_unused=True)

    adm = grads(trainer.generator_step(g, cond, 4, batch, 0))
    dm = grads(super(type(trainer), trainer).generator_step(g, cond, 4, batch, 0))
    trainer.rng = torch.Generator().manual_seed(1)  # the draws of generator_terms: z, t, eps
    z = trainer.randn(4, *trainer.teacher.sample_shape)
    x0 = trainer.generate(trainer.unwrap(g.generator), z, cond)
    t = trainer.sample_t(4)
    x_t = trainer.teacher.schedule.add_noise(x0, trainer.randn(*x0.shape), t)
    trainer.as_denoiser(trainer.unwrap(g.fake)).output(x_t, t, cond)
    logit = trainer.unwrap(g.disc)(trainer._features.pop(g.fake))
    gan = torch.autograd.grad(torch.nn.functional.softplus(-logit).mean(), params, allow_unused=True)
    assert any(v is not None and v.abs().max() > 1e-6 for v in gan)
    for a, d, v in zip(adm, dm, gan):
        want = d if v is None else (v * 0.5 if d is None else d + 0.5 * v)
        torch.testing.assert_close(a, want, atol=1e-6, rtol=1e-5)


def test_dm_to_adm_continuation_starts_from_the_dm_weights(tmp_path):
    """msd.adm_start_step = N: the first ADM update starts from exactly the networks a DM-only run has after N
    updates (bitwise), the heads untouched until then; from there the heads train and the GAN term is on."""
    n = 3
    dm = trainer_class("msd")(_toy_cfg(tmp_path / "dm", "msd.num_students=2", f"train.max_steps={n}"))
    dm.train()
    adm = trainer_class("msd")(_toy_cfg(tmp_path / "adm", "msd.num_students=2", f"train.max_steps={n + 1}",
                                        "msd.gan_weight=0.5", f"msd.adm_start_step={n}", "train.log_every=1"))
    adm.setup()
    heads = {name: [p.detach().clone() for p in adm.unwrap(name).parameters()]
             for name in ("disc_0", "disc_1")}
    at_start, orig = {}, adm.objective

    def spy(batch, step):
        if step == n:
            at_start.update({name: [p.detach().clone() for p in adm.unwrap(name).parameters()]
                             for name in adm.modules})
        return (yield from orig(batch, step))

    adm.objective = spy
    adm.train()
    for name in dm.modules:  # students and fake scores: the DM run's, bit for bit
        assert all(torch.equal(a, b) for a, b in zip(at_start[name], dm.unwrap(name).parameters())), name
    for name, before in heads.items():
        assert all(torch.equal(a, b) for a, b in zip(before, at_start[name]))  # untouched in the DM stage
        assert any(not torch.equal(a, b) for a, b in zip(before, adm.unwrap(name).parameters()))
    assert [("gan_loss" in h, "disc_loss" in h) for h in adm.history] == [(False, False)] * n + [(True, True)]


def test_msd_refusals(tmp_path):
    with pytest.raises(ConfigError, match="not a multiple of msd.num_students=4"):
        _toy_cfg(tmp_path, "train.batch_size=30")
    with pytest.raises(ConfigError, match="needs msd.partition_file"):
        _toy_cfg(tmp_path, "msd.partition=file")
    cfg = _toy_cfg(tmp_path, "teacher.conditional=false")
    with pytest.raises(ConfigError, match="unconditional"):
        trainer_class("msd")(cfg).setup()
    cfg = _toy_cfg(tmp_path, "msd.partition=prompt_clusters")
    with pytest.raises(ConfigError, match="text teachers"):
        trainer_class("msd")(cfg).setup()


# ---------------------------------------------------------------------- text-to-image
def test_text_teacher_prompt_clusters_train_export_and_route(tiny_sd_folder, tmp_path):
    """configs/msd_sd15.yaml on the tiny SD-format teacher, 2 steps, K = 2: the prompt clusters route every
    training prompt to the student it trained, and the export loads with plain diffusers, sampling the
    same."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "distill", "train", "configs/msd_sd15.yaml",
           f"teacher.path={tiny_sd_folder / 'sd'}", f"data.spec=prompts:{tiny_sd_folder / 'prompts.txt'}",
           "train.batch_size=2", "train.max_steps=2", "msd.num_students=2", "train.mixed_precision=no", *FAST,
           f"output_dir={out}"]
    res = subprocess.run(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    folder = out / "pipeline"
    pipe = load_pipeline(str(folder))
    pipe.set_progress_bar_config(disable=True)
    routing = pipe.config.routing
    assert routing["kind"] == "prompt_clusters" and len(routing["centroids"]) == 2
    from distill.pipelines.multi_student import prompt_feature
    from distill.pipelines.text_to_image import encode_prompt

    # the centroids are k-means of the training prompts' features as the exported pipeline computes them
    distinct = sorted(set(read_prompts(tiny_sd_folder / "prompts.txt")))
    with torch.no_grad():
        feats = prompt_feature(encode_prompt([pipe.tokenizer], [pipe.text_encoder], distinct, "cpu")[0])
    assert torch.allclose(torch.tensor(routing["centroids"]), kmeans(feats, 2, seed=0), atol=1e-5)
    prompts = ["a red cat", "a blue dog", "a small house by the sea"]
    with torch.no_grad():
        embeds = encode_prompt([pipe.tokenizer], [pipe.text_encoder], prompts, "cpu")[0]
    # each prompt goes to the centroid nearest to its unit-length token mean, distances computed here by hand
    cents = torch.tensor(routing["centroids"])
    feats = embeds.mean(dim=1) / embeds.mean(dim=1).norm(dim=-1, keepdim=True)
    want = [min(range(2), key=lambda j: float((f - cents[j]).pow(2).sum())) for f in feats]
    assert pipe.route(prompt_embeds=embeds).tolist() == want
    seen = []
    for k, student in enumerate(pipe.students.students):  # and __call__ runs that student on it, no other
        student.register_forward_hook(lambda m, i, o, k=k: seen.append((k, len(i[0]))))
    mine = pipe(prompt=prompts, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert mine.shape == (3, 16, 16, 3) and mine.std() > 0.01
    assert sorted(seen) == sorted((k, want.count(k)) for k in set(want))
    said, plain = _plain_load(folder, tmp_path, "text")
    assert said == "MultiStudentPipeline StudentBank 2"
    np.testing.assert_array_equal(mine, plain)


def test_prompt_centroids_are_fp32_whatever_precision_the_run_holds_the_teacher_in(tiny_sd_folder, tmp_path):
    """A bf16 run encodes its training prompts in bf16; the centroids still come from the fp32 features of the
    text encoder the export ships, the same as an fp32 run's, bit for bit."""
    cents = {}
    for mp in ("no", "bf16"):
        cfg = load_config("configs/msd_sd15.yaml", FAST + [
            f"teacher.path={tiny_sd_folder / 'sd'}", f"data.spec=prompts:{tiny_sd_folder / 'prompts.txt'}",
            "train.batch_size=2", "msd.num_students=2", f"train.mixed_precision={mp}",
            f"output_dir={tmp_path / mp}"])
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)  # this test runs two mixed precisions
        trainer = trainer_class("msd")(cfg)
        trainer.setup()
        cents[mp] = torch.tensor(trainer.routing["centroids"])
        c = trainer.teacher.condition(prompts=["a red cat"])
        assert c.embeds.dtype == (torch.bfloat16 if mp == "bf16" else torch.float32)
    assert torch.equal(cents["no"], cents["bf16"])


def test_a_bf16_pipeline_routes_prompt_embeddings_in_fp32(tiny_sd_folder):
    """Prompt embeddings near the boundary between two centroids, where bf16 rounding moves them across: a
    bf16 pipeline sends each to the student of its nearest centroid in fp32 (computed here by hand), as the
    fp32 pipeline does."""
    sd = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_folder / "sd")
    width = sd.text_encoder.config.hidden_size
    g = torch.Generator().manual_seed(0)
    c = torch.nn.functional.normalize(torch.randn(2, width, generator=g), dim=-1)
    mid = torch.nn.functional.normalize(c.sum(0), dim=-1)
    cands = mid + 3e-3 * torch.randn(4000, width, generator=g)  # one token each: the feature is the embedding
    fp32 = torch.cdist(torch.nn.functional.normalize(cands, dim=-1), c).argmin(1)  # the nearest, by hand
    rounded = torch.cdist(torch.nn.functional.normalize(cands.bfloat16().float(), dim=-1), c).argmin(1)
    flip = (fp32 != rounded).nonzero().flatten()[:4]
    assert len(flip) == 4  # embeddings whose bf16 rounding changes their nearest centroid
    embeds = torch.cat([cands[flip], cands[:4]])[:, None, :]
    routes = {}
    for dtype in (torch.float32, torch.bfloat16):
        bank = StudentBank.from_students([sd.unet, copy.deepcopy(sd.unet)])
        pipe = MultiStudentPipeline(bank, sd.scheduler, vae=sd.vae, sample_shape=[4, 8, 8],
                                    routing={"kind": "prompt_clusters", "centroids": c.tolist()})
        pipe.to(dtype=dtype).set_progress_bar_config(disable=True)

        def spy(route=pipe.route, dtype=dtype, **kw):
            routes[dtype] = route(**kw).tolist()
            return torch.tensor(routes[dtype])

        pipe.route = spy
        pipe(prompt_embeds=embeds, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert routes[torch.bfloat16] == routes[torch.float32] == torch.cat([fp32[flip], fp32[:4]]).tolist()

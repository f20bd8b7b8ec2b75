"""Multi-student distillation (MSD, Song et al. 2024): partitions, routing in the exported pipeline (every
condition to exactly one student, mixed batches in order, identical after save / reload, with and without
distill), the trainer's per-student batches and networks, teacher score matching, and the text path on a
tiny Stable-Diffusion-format teacher."""

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
from distill.pipelines import MultiStudentPipeline
from distill.pipelines.one_step import x0_from_output
from distill.trainers import trainer_class
from distill.trainers.multi_student import class_partition, kmeans

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
    from distill.pipelines.multi_student import nearest_centroid, prompt_feature
    from distill.pipelines.text_to_image import encode_prompt

    # the centroids are k-means of the training prompts' features as the exported pipeline computes them
    distinct = sorted(set(read_prompts(tiny_sd_folder / "prompts.txt")))
    with torch.no_grad():
        feats = prompt_feature(encode_prompt([pipe.tokenizer], [pipe.text_encoder], distinct, "cpu")[0])
    assert torch.allclose(torch.tensor(routing["centroids"]), kmeans(feats, 2, seed=0), atol=1e-5)
    prompts = ["a red cat", "a blue dog", "a small house by the sea"]
    with torch.no_grad():
        embeds = encode_prompt([pipe.tokenizer], [pipe.text_encoder], prompts, "cpu")[0]
    routes = pipe.route(prompt_embeds=embeds)
    assert routes.tolist() == nearest_centroid(prompt_feature(embeds),
                                               torch.tensor(routing["centroids"])).tolist()
    mine = pipe(prompt=prompts, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert mine.shape == (3, 16, 16, 3) and mine.std() > 0.01
    said, plain = _plain_load(folder, tmp_path, "text")
    assert said == "MultiStudentPipeline StudentBank 2"
    np.testing.assert_array_equal(mine, plain)

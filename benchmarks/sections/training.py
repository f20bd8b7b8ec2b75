"""(b) Training overhead: the time of one full trainer update against the network passes it needs.

For the digits teacher loop, SIM and Uni-Instruct (forward KL, ratio warm-up off), each trainer's
``train_iteration()`` (batch, noise, train step, EMA) is timed in interleaved pairs against the same passes
written as plain torch on the same networks (no Accelerate, no EMA, no logging). Goal: median ratio
<= 1.10 for the teacher loop and <= 1.15 for the distillation trainers.
"""

from __future__ import annotations

import tempfile
from functools import partial

import torch
from harness import deciles, load, paired_times, table

from distill.trainers import trainer_class


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
        loss_f = (loss_f + bce(logit_real, torch.ones_like(logit_real))
                  + bce(logit_fake, torch.zeros_like(logit_fake)))
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
    rows = []
    steps = 8 if quick else 20  # interleaved pairs
    with tempfile.TemporaryDirectory() as tmp:
        specs = [
            ("teacher", "configs/teacher_digits.yaml", []),
            ("sim", "configs/sim_digits.yaml", []),
            ("uni_instruct (fkl)", "configs/uni_instruct_digits.yaml", ["uni_instruct.ratio_warmup_steps=0"]),
        ]
        for name, cfg_path, extra in specs:
            cfg = load(cfg_path, f"{tmp}/{name.split()[0]}", "train.checkpointing_steps=100000", *extra)
            trainer = trainer_class(cfg.method)(cfg)
            trainer.setup()

            # the network passes the method needs, in a bare loop of the same networks, interleaved with
            # the trainer
            b = cfg.train.batch_size
            if cfg.method == "teacher":
                net = trainer.unwrap("student")
                x = torch.randn(b, *trainer.data.sample_shape)
                opt = torch.optim.AdamW(net.parameters(), lr=1e-6)
                passes = "1 fwd+bwd"
                bare_fn = partial(_bare_teacher_loop, net, opt, x, torch.randint(0, 1000, (b,)),
                                  torch.randn_like(x))
            elif cfg.method == "sim":
                passes, bare_fn = "bare torch SIM step (same passes)", _bare_sim_step(trainer)
            else:
                passes = "bare torch Uni-Instruct fkl step (same passes)"
                bare_fn = _bare_uni_instruct_step(trainer)
            t_trainer, bare, ratios = paired_times(_trainer_iteration(trainer), bare_fn, steps)
            q = deciles(ratios)
            rows.append([name, b, passes, t_trainer * 1e3, bare * 1e3, q[1], f"{q[0]:.3f}-{q[2]:.3f}"])
    return ("### (b) Training: per-iteration time / time of the network passes it needs (goal <= 1.10 for "
            "the teacher loop, <= 1.15 for the distillation trainers)\n\n"
            + table(["trainer", "batch", "network passes", "trainer ms/it", "bare passes ms",
                     "median ratio of interleaved pairs", "10-90% range"], rows) + "\n")

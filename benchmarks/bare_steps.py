"""Bare training passes: one update of a distill trainer written as plain torch on the trainer's own networks.

The denominator of the training-overhead ratios (``benchmarks/sections/training.py`` on the CPU,
``benchmarks/gpu_perf.py`` on a GPU): the same forward / backward passes, gradient clipping and AdamW steps as
``trainer.train_iteration()``, without Accelerate, EMA or logging. The losses follow the methods: the
epsilon-prediction loss for the teacher (Ho et al. 2020), SIM's pseudo-Huber generator loss (Luo et al. 2024),
Uni-Instruct's forward-KL expansion with the discriminator's density ratio (Wang et al. 2025), and for
progressive distillation two no-grad teacher passes (a DDIM step between them) per student pass, weighted by
the truncated SNR max(alpha^2 / sigma^2, 1) (Salimans & Ho 2022).
"""

from __future__ import annotations

import torch


class Bare:
    """The network passes of one update in plain torch on the trainer's own networks: bf16 autocast, gradient
    clipping, fused AdamW (on CUDA), device-side random draws; no Accelerate, no EMA, no logging. Timesteps
    are passed as the trainers pass them (float training indices; integer ones for the teacher trainer), so
    compiled networks reuse the trainer's graphs where they can."""

    def __init__(self, trainer, max_images: int | None = None):
        """Bare passes of ``trainer`` (after its ``setup()``), on its device and, under
        ``train.mixed_precision=bf16``, bf16 autocast; real batches are drawn from the first ``max_images``
        (all when None) of its data."""
        from distill.data import as_tensor

        cfg = trainer.config
        name = cfg.method
        self.dev = torch.device(trainer.device)
        self.b = cfg.train.batch_size
        self.amp = torch.autocast(self.dev.type, dtype=torch.bfloat16,
                                  enabled=cfg.train.mixed_precision == "bf16")
        sched = trainer.scheduler if name == "teacher" else trainer.teacher.scheduler
        self.ac = sched.alphas_cumprod.to(self.dev, torch.float32)
        self.T = len(self.ac)
        self.pred = sched.config.prediction_type
        data = trainer.data
        x = data.x[:max_images] if hasattr(data, "x") else as_tensor(data, max_images)[0]
        self.real = (x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()).to(self.dev)
        self.shape = (self.b, *self.real.shape[1:])
        self.hooks = []
        self.run = getattr(self, f"_{name}")(trainer)

    def adamw(self, net, cfg):
        o = cfg.optim
        return torch.optim.AdamW(net.parameters(), lr=1e-7, betas=tuple(o.betas), eps=o.eps,
                                 weight_decay=o.weight_decay, fused=self.dev.type == "cuda")

    @staticmethod
    def update(net, opt, loss) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def coef(self, k):
        a = self.ac[k].sqrt().view(-1, 1, 1, 1)
        return a, (1 - self.ac[k]).sqrt().view(-1, 1, 1, 1)

    def x0_of(self, out, x, a, s):
        if self.pred == "epsilon":
            return (x - s * out) / a
        if self.pred == "v_prediction":
            return a * x - s * out
        return out

    def batch(self):
        return self.real[torch.randint(len(self.real), (self.b,), device=self.dev)]

    def draw_k(self, lo: float, hi: float):
        k = torch.randint(int(lo * (self.T - 1)), int(hi * (self.T - 1)) + 1, (self.b,), device=self.dev)
        return k, *self.coef(k)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()

    # ------------------------------------------------------------------ per method
    def _teacher(self, trainer):
        net = trainer.unwrap("student")
        opt = self.adamw(net, trainer.config)

        def run():
            x0 = self.batch()
            k = torch.randint(0, self.T, (self.b,), device=self.dev)
            a, s = self.coef(k)
            eps = torch.randn_like(x0)
            with self.amp:
                out = net(a * x0 + s * eps, k).sample
            self.update(net, opt, torch.nn.functional.mse_loss(out.float(), eps))

        return run

    def _one_step_parts(self, trainer, sec):
        self.teacher = trainer.teacher.model
        self.tdtype = next(self.teacher.parameters()).dtype  # bf16 under train.mixed_precision=bf16
        self.gen, self.fake = trainer.unwrap("student"), trainer.unwrap("fake")
        self.opt_g, self.opt_f = self.adamw(self.gen, trainer.config), self.adamw(self.fake, trainer.config)
        k_star = sec.generator_timestep
        self.a_star, self.s_star = self.ac[k_star].sqrt(), (1 - self.ac[k_star]).sqrt()
        self.ts_star = torch.full((self.b,), float(k_star), device=self.dev)
        self.t_range = (sec.t_min, sec.t_max)
        self.huber_c = getattr(sec, "huber_c", 1.0)

    def generate(self):
        x_in = self.s_star * torch.randn(self.shape, device=self.dev)
        with self.amp:
            out = self.gen(x_in, self.ts_star).sample.float()
        return self.x0_of(out, x_in, self.a_star, self.s_star)

    def fake_dsm(self, k, a, s):
        with torch.no_grad():
            xg = self.generate()
        eps = torch.randn(self.shape, device=self.dev)
        with self.amp:
            pred = self.fake(a * xg + s * eps, k.float()).sample
        target = eps if self.pred == "epsilon" else (a * eps - s * xg if self.pred == "v_prediction" else xg)
        return (pred.float() - target).pow(2).mean()

    def generator_terms(self, k, a, s):
        x0 = self.generate()
        xt = a * x0 + s * torch.randn(self.shape, device=self.dev)
        with self.amp:
            d_fake = self.x0_of(self.fake(xt, k.float()).sample.float(), xt, a, s)
            d_real = self.x0_of(self.teacher(xt.to(self.tdtype), k.float()).sample.float(), xt, a, s)
        return x0, xt, d_real, d_fake

    def _sim(self, trainer):
        self._one_step_parts(trainer, trainer.config.sim)

        def run():
            k, a, s = self.draw_k(*self.t_range)
            self.update(self.fake, self.opt_f, self.fake_dsm(k, a, s))
            self.fake.requires_grad_(False)
            x0, _, d_real, d_fake = self.generator_terms(k, a, s)
            d, kk = (d_real - d_fake).flatten(1), (d_fake - x0).flatten(1)
            g = d / (d.shape[1] * torch.sqrt(d.pow(2).mean(1, keepdim=True) + self.huber_c**2))
            self.update(self.gen, self.opt_g, (g * kk).sum(1).mean())
            self.fake.requires_grad_(True)

        return run

    def _uni_instruct(self, trainer):
        self._one_step_parts(trainer, trainer.config.uni_instruct)
        disc = trainer.unwrap("disc")
        feats = {}
        self.hooks.append(self.fake.mid_block.register_forward_hook(
            lambda _m, _i, o: feats.__setitem__("f", o)))
        params = list(self.fake.parameters()) + list(disc.parameters())
        o = trainer.config.optim
        opt_f = torch.optim.AdamW(params, lr=1e-7, betas=tuple(o.betas), eps=o.eps,
                                  fused=self.dev.type == "cuda")
        bce = torch.nn.functional.binary_cross_entropy_with_logits

        def run():
            k, a, s = self.draw_k(*self.t_range)
            loss_f = self.fake_dsm(k, a, s)
            with self.amp:
                logit_fake = disc(feats.pop("f")).float()
                self.fake(a * self.batch() + s * torch.randn(self.shape, device=self.dev), k.float())
                logit_real = disc(feats.pop("f")).float()
            loss_f = (loss_f + bce(logit_real, torch.ones_like(logit_real))
                      + bce(logit_fake, torch.zeros_like(logit_fake)))
            loss_f.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt_f.step()
            opt_f.zero_grad(set_to_none=True)
            self.fake.requires_grad_(False)
            disc.requires_grad_(False)
            x0, xt, d_real, d_fake = self.generator_terms(k, a, s)
            with self.amp:
                r = disc(feats.pop("f")).float().detach().clamp(-5, 5).exp()
            d, kk = (d_real - d_fake).flatten(1), (d_fake - x0).flatten(1)
            c = (a / (s * s)).flatten()
            dk = (d * kk).mean(1)
            kappa = 2 * r * dk  # forward KL, full sampling: h = r, h' = 1, h'' = 0
            loss_g = (r * dk
                      + (c / 2) * kappa.detach() * (d.detach() * xt.flatten(1)).sum(1)).mean() / r.mean()
            self.update(self.gen, self.opt_g, loss_g)
            self.fake.requires_grad_(True)
            disc.requires_grad_(True)

        return run

    def _progressive(self, trainer):
        teacher, net = trainer.teacher.model, trainer.unwrap("student")
        opt = self.adamw(net, trainer.config)
        tdtype = next(teacher.parameters()).dtype

        def run():
            x0 = self.batch()
            k = torch.randint(2, self.T, (self.b,), device=self.dev)
            k1 = k - 1
            a, s = self.coef(k)
            a1, s1 = self.coef(k1)
            z = a * x0 + s * torch.randn_like(x0)
            with torch.no_grad(), self.amp:
                x1 = self.x0_of(teacher(z.to(tdtype), k.float()).sample.float(), z, a, s)
                z1 = a1 * x1 + s1 * (z - a * x1) / s  # DDIM step
                target = self.x0_of(teacher(z1.to(tdtype), k1.float()).sample.float(), z1, a1, s1)
            with self.amp:
                pred = self.x0_of(net(z, k.float()).sample.float(), z, a, s)
            w = (a * a / (s * s)).clamp_min(1.0).flatten()
            self.update(net, opt, (w * (pred - target).pow(2).flatten(1).mean(1)).mean())

        return run

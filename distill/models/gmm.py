"""Exact denoiser of a Gaussian mixture under a discrete VP, an EDM or a flow-matching schedule.

STANDALONE FILE: imports torch and diffusers only (it travels inside exported pipeline folders).

For data ``x0 ~ sum_k pi_k N(mu_k, diag(v_k))`` the diffused marginal stays a mixture,
``p_t = sum_k pi_k N(a mu_k, a^2 v_k + s^2)``, and the posterior mean is

    E[x0 | x_t] = sum_k gamma_k(x_t) (mu_k + a v_k / (a^2 v_k + s^2) (x_t - a mu_k)),

with gamma_k the posterior responsibilities. ``GaussianMixtureTeacher.forward`` returns that
prediction in the scheduler's parameterisation, so it can stand wherever a ``UNet2DModel`` stands:

* ``noise="vp"``: a DDPMScheduler table, time = training index, output epsilon, sample or v_prediction
  (a stock ``DDPMPipeline`` runs it);
* ``noise="edm"``: an EDMEulerScheduler (x_t = x0 + sigma eps), input c_in x_t, time c_noise = ln(sigma) / 4,
  output F with x0 = c_skip x_t + c_out F (Karras et al. 2022, Table 1; c_out negated for v_prediction);
* ``noise="flow"``: a FlowMatchEulerDiscreteScheduler (x_t = (1 - s) x0 + s eps), time s T, output the
  velocity eps - x0 (Liu et al. 2022; Esser et al. 2024).
"""

from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput


class GaussianMixtureTeacher(ModelMixin, ConfigMixin):
    """Exact epsilon / x0 / v prediction of a (optionally class-conditional) Gaussian mixture.

    Args:
        means: K x D component means.
        stds: K (isotropic) or K x D (diagonal) component standard deviations.
        weights: K mixture weights (normalised here), default uniform.
        component_classes: optional K class labels; a class label selects its components, and the
            null label ``num_classes`` (or no label) gives the marginal mixture (for CFG).
        sample_shape: shape of one sample, e.g. [2] or [1, 8, 8] (prod must be D).
        num_train_timesteps, beta_schedule, beta_start, beta_end, prediction_type: the VP schedule.
        noise: the family its input and output are written in: vp, edm or flow.
        sigma_data: EDM's data scale of the preconditioning (edm).
    """

    @register_to_config
    def __init__(self, means: list, stds: list, weights: list | None = None,
                 component_classes: list | None = None, sample_shape: list | None = None,
                 num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2",
                 beta_start: float = 0.0001, beta_end: float = 0.02, prediction_type: str = "epsilon",
                 noise: str = "vp", sigma_data: float = 0.5):
        super().__init__()
        if noise not in ("vp", "edm", "flow"):
            raise ValueError(f"noise must be 'vp', 'edm' or 'flow', got {noise!r}.")
        allowed = {"vp": ("epsilon", "sample", "v_prediction"), "edm": ("epsilon", "v_prediction"),
                   "flow": ("flow",)}[noise]
        if prediction_type not in allowed:
            raise ValueError(f"prediction_type {prediction_type!r} is not one of {allowed} on {noise!r}.")
        mu = torch.as_tensor(means, dtype=torch.float64)
        if mu.ndim != 2:
            raise ValueError(f"means must be K x D, got shape {tuple(mu.shape)}.")
        k, d = mu.shape
        sd = torch.as_tensor(stds, dtype=torch.float64)
        var = (sd**2).reshape(k, -1).expand(k, d).clone()
        w = (torch.ones(k, dtype=torch.float64) if weights is None
             else torch.as_tensor(weights, dtype=torch.float64))
        if (var <= 0).any() or (w < 0).any() or w.sum() <= 0:
            raise ValueError("stds must be positive and weights non-negative with a positive sum.")
        cls = torch.full((k,), -1, dtype=torch.long) if component_classes is None else torch.as_tensor(
            component_classes, dtype=torch.long)
        self.num_classes = int(cls.max()) + 1 if component_classes is not None else 0
        shape = list(sample_shape) if sample_shape is not None else [d]
        if math.prod(shape) != d:
            raise ValueError(f"sample_shape {shape} does not hold D={d} values.")
        self.sample_shape = shape
        # lets stock image pipelines (DDPMPipeline) size their noise
        if len(shape) == 3 and shape[1] == shape[2]:
            self.register_to_config(in_channels=shape[0], sample_size=shape[1])
        sched = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                              beta_start=beta_start, beta_end=beta_end)
        ac = sched.alphas_cumprod.to(torch.float64)
        self.register_buffer("mix_means", mu, persistent=False)
        self.register_buffer("mix_variances", var, persistent=False)
        self.register_buffer("log_weights", torch.log(w / w.sum()), persistent=False)
        self.register_buffer("mix_classes", cls, persistent=False)
        self.register_buffer("logsnr_table", torch.log(ac.clamp_min(1e-20) / (1 - ac).clamp_min(1e-20)),
                             persistent=False)
        # A parameter-free module still needs one tensor so that diffusers can save and place it.
        self.register_buffer("_anchor", torch.zeros(1))

    # ---------------------------------------------------------------- schedule
    def alpha_sigma(self, timestep: torch.Tensor):
        """Coefficients at the network's time input: vp: a (fractional) training index, log-SNR linearly
        interpolated between indices; edm: c_noise = ln(sigma) / 4; flow: s T."""
        timestep = timestep.to(torch.float64)
        if self.config.noise == "edm":
            return torch.ones_like(timestep), torch.exp(4 * timestep)
        if self.config.noise == "flow":
            s = timestep / self.config.num_train_timesteps
            return 1 - s, s
        n = self.logsnr_table.numel()
        pos = timestep.to(torch.float64).clamp(0, n - 1)
        lo = pos.floor().long().clamp(0, n - 2)
        frac = pos - lo
        lam = self.logsnr_table[lo] * (1 - frac) + self.logsnr_table[lo + 1] * frac
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()

    # ---------------------------------------------------------------- mixture algebra
    def _component_logits(self, class_labels: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        logw = self.log_weights.to(device).expand(batch, -1)
        if class_labels is None or self.num_classes == 0:
            return logw
        labels = torch.as_tensor(class_labels, device=device).long().reshape(-1).expand(batch)
        keep = (self.mix_classes.to(device)[None] == labels[:, None]) | (labels[:, None] >= self.num_classes)
        logw = torch.where(keep, logw, torch.full_like(logw, -math.inf))
        return logw - torch.logsumexp(logw, dim=1, keepdim=True)

    def _posterior(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, class_labels):
        """Responsibilities gamma (B, K) and per-component log-densities of the noised mixture."""
        mu, var = self.mix_means.to(x.device), self.mix_variances.to(x.device)
        a, s = a.reshape(-1, 1, 1), s.reshape(-1, 1, 1)
        tot = a * a * var[None] + s * s  # (B, K, D)
        diff = x[:, None, :] - a * mu[None]
        logn = -0.5 * ((diff * diff) / tot + torch.log(2 * math.pi * tot)).sum(-1)
        logits = self._component_logits(class_labels, x.shape[0], x.device) + logn
        return logits, tot, diff

    def posterior_mean(self, x_t: torch.Tensor, timestep, class_labels=None) -> torch.Tensor:
        """E[x0 | x_t] in float64 for a (B, D) batch."""
        x = x_t.reshape(x_t.shape[0], -1).to(torch.float64)
        ts = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(x.shape[0])
        a, s = self.alpha_sigma(ts)
        logits, tot, diff = self._posterior(x, a, s, class_labels)
        gamma = torch.softmax(logits, dim=1)
        mu, var = self.mix_means.to(x.device), self.mix_variances.to(x.device)
        cond = mu[None] + a.reshape(-1, 1, 1) * var[None] / tot * diff
        return (gamma[..., None] * cond).sum(1)

    def log_prob(self, x: torch.Tensor, timestep=0.0, class_labels=None) -> torch.Tensor:
        """log p_t(x) of the noised mixture at a training index (0 = the clean data, up to beta_0)."""
        x = x.reshape(x.shape[0], -1).to(torch.float64)
        ts = torch.as_tensor(timestep, device=x.device, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        a, s = self.alpha_sigma(ts)
        logits, _, _ = self._posterior(x, a, s, class_labels)
        return torch.logsumexp(logits, dim=1)

    def clean_log_prob(self, x: torch.Tensor, class_labels=None) -> torch.Tensor:
        """log p_0(x) of the mixture itself (no noise at all)."""
        x = x.reshape(x.shape[0], -1).to(torch.float64)
        one, zero = torch.ones(x.shape[0], dtype=torch.float64), torch.zeros(x.shape[0], dtype=torch.float64)
        logits, _, _ = self._posterior(x, one, zero, class_labels)
        return torch.logsumexp(logits, dim=1)

    def sample_data(self, n: int, generator: torch.Generator | None = None, class_labels=None):
        """Exact samples of the clean mixture; returns (x0 of shape (n, *sample_shape), component index)."""
        logits = self._component_logits(class_labels, n, "cpu")
        comp = torch.multinomial(logits.exp().float(), 1, generator=generator).squeeze(1)
        noise = torch.randn(n, self.mix_means.shape[1], generator=generator, dtype=torch.float64)
        x = self.mix_means.cpu()[comp] + self.mix_variances.cpu()[comp].sqrt() * noise
        return x.float().reshape(n, *self.sample_shape), comp

    # ---------------------------------------------------------------- network interface
    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                return_dict: bool = True):
        b = sample.shape[0]
        ts = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)
        a, s = self.alpha_sigma(ts)
        a, s = a[:, None], s[:, None]
        x = sample.reshape(b, -1).to(torch.float64)
        noise, pred, sd = self.config.noise, self.config.prediction_type, self.config.sigma_data
        if noise == "edm":  # the input is c_in x_t
            x = x * torch.sqrt(s * s + sd * sd)
        x0 = self.posterior_mean(x, ts, class_labels)
        if noise == "edm":
            c_skip, c_out = sd * sd / (s * s + sd * sd), s * sd / torch.sqrt(s * s + sd * sd)
            out = (x0 - c_skip * x) / (-c_out if pred == "v_prediction" else c_out)
        elif noise == "flow":
            out = (x - a * x0) / s.clamp_min(1e-12) - x0
        elif pred == "epsilon":
            out = (x - a * x0) / s
        elif pred == "sample":
            out = x0
        else:
            out = a * (x - a * x0) / s - s * x0
        out = out.to(sample.dtype).reshape(sample.shape)
        if not return_dict:
            return (out,)
        return UNet2DOutput(sample=out)

    # ---------------------------------------------------------------- builders
    @classmethod
    def fit(cls, data: torch.Tensor, bandwidth: float = 0.05, labels: torch.Tensor | None = None,
            max_components: int | None = None, seed: int = 0, **schedule):
        """Smoothed empirical distribution of ``data``: one isotropic component of std ``bandwidth``
        per sample, so the teacher is the exact optimal denoiser of that smoothed set."""
        x = torch.as_tensor(data, dtype=torch.float32)
        n = x.shape[0]
        idx = torch.arange(n)
        if max_components is not None and n > max_components:
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_components]
        flat = x[idx].reshape(len(idx), -1)
        comp_cls = None if labels is None else torch.as_tensor(labels)[idx].long().tolist()
        return cls(means=flat.tolist(), stds=[bandwidth] * len(idx), component_classes=comp_cls,
                   sample_shape=list(x.shape[1:]), **schedule)

"""One continuous view of time for every diffusers noise schedule.

Every trainer in distill works with continuous time ``t in [0, 1]`` and

    x_t = alpha(t) * x0 + sigma(t) * eps,          eps ~ N(0, I)

(Kingma et al. 2021, "Variational Diffusion Models", eq. 1; Salimans & Ho 2022, sec. 2).
:class:`NoiseSchedule` builds this view from a diffusers scheduler config:

* ``"vp"``   discrete variance-preserving tables (DDPM / DDIM ``alphas_cumprod`` with linear,
  scaled_linear or squaredcos_cap_v2 betas). ``t = k / (T - 1)`` is exactly training index ``k``;
  between indices the log-SNR is interpolated linearly, so the view is continuous and monotone.
* ``"edm"``  variance-exploding Karras sigmas (EDM, Karras et al. 2022, eq. 5): alpha = 1,
  sigma(t) = (s_min^(1/rho) + t (s_max^(1/rho) - s_min^(1/rho)))^rho.
* ``"flow"`` rectified flow (Liu et al. 2022; SD3): alpha = 1 - s, sigma = s with the shifted
  sigma s(t) = shift t / (1 + (shift - 1) t).

Conversions among the network parameterisations (``epsilon``, ``sample`` (x0), ``v_prediction``,
``flow`` velocity eps - x0) and the score go through x0 and eps, which is exact for all of them.
A DDIM step (Song et al. 2021, eq. 12 with eta = 0) between any two times is a pure function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow")


def expand_like(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample coefficient of shape (B,) or () over a batch x of shape (B, ...)."""
    c = torch.as_tensor(c, device=x.device)
    if c.ndim == 0:
        return c.to(x.dtype)
    return c.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


@dataclass
class NoiseSchedule:
    """Continuous-time schedule ``x_t = alpha(t) x0 + sigma(t) eps``.

    Build it with :meth:`from_scheduler` (any diffusers scheduler or its config) or
    :meth:`vp_from_betas`; all arithmetic on the table is done in float64.
    """

    kind: str
    prediction_type: str = "epsilon"
    alphas_cumprod: torch.Tensor | None = None  # vp
    sigma_min: float = 0.002  # edm
    sigma_max: float = 80.0  # edm
    rho: float = 7.0  # edm
    shift: float = 1.0  # flow
    num_train_timesteps: int = 1000

    def __post_init__(self):
        if self.kind not in ("vp", "edm", "flow"):
            raise ValueError(f"NoiseSchedule kind {self.kind!r} is not one of 'vp', 'edm', 'flow'.")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}."
            )
        if self.kind == "vp":
            if self.alphas_cumprod is None:
                raise ValueError("A 'vp' NoiseSchedule needs alphas_cumprod.")
            ac = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64).cpu()
            self.alphas_cumprod = ac
            self.num_train_timesteps = len(ac)
            # log-SNR table, clipped so that a zero-terminal-SNR schedule stays finite.
            self._logsnr = torch.log(ac.clamp_min(1e-20) / (1 - ac).clamp_min(1e-20))
            self._tables = {self._logsnr.device: self._logsnr}  # the log-SNR table per device, copied once

    def _logsnr_on(self, device) -> torch.Tensor:
        table = self._tables.get(device)
        if table is None:
            table = self._tables[device] = self._logsnr.to(device)
        return table

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_scheduler(cls, scheduler) -> NoiseSchedule:
        """Read a diffusers scheduler (or its ``config`` / a plain dict)."""
        import diffusers

        config = dict(getattr(scheduler, "config", scheduler))
        name = config.get("_class_name", type(scheduler).__name__)
        pred = config.get("prediction_type", "epsilon")
        if "FlowMatch" in name:
            return cls(kind="flow", prediction_type="flow", shift=float(config.get("shift", 1.0)),
                       num_train_timesteps=int(config.get("num_train_timesteps", 1000)))
        if name.startswith("EDM"):
            return cls(kind="edm", prediction_type=pred, sigma_min=float(config.get("sigma_min", 0.002)),
                       sigma_max=float(config.get("sigma_max", 80.0)), rho=float(config.get("rho", 7.0)))
        if hasattr(scheduler, "alphas_cumprod"):
            ac = scheduler.alphas_cumprod
        else:  # rebuild the table exactly as diffusers does
            ac = diffusers.DDPMScheduler.from_config(config).alphas_cumprod
        return cls(kind="vp", prediction_type=pred, alphas_cumprod=ac)

    @classmethod
    def vp_from_betas(cls, beta_schedule: str = "squaredcos_cap_v2", num_train_timesteps: int = 1000,
                      prediction_type: str = "epsilon", **kwargs) -> NoiseSchedule:
        import diffusers

        sched = diffusers.DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                        prediction_type=prediction_type, **kwargs)
        return cls.from_scheduler(sched)

    # ------------------------------------------------------------------ coefficients
    def _t(self, t, like: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        if like is not None:
            t = t.to(like.device)
        return t

    def logsnr(self, t) -> torch.Tensor:
        """log(alpha^2 / sigma^2) at continuous time t (float64)."""
        t = self._t(t)
        if self.kind == "vp":
            table = self._logsnr_on(t.device)
            pos = t.clamp(0, 1) * (self.num_train_timesteps - 1)
            lo = pos.floor().long().clamp(0, self.num_train_timesteps - 2)
            frac = pos - lo
            return table[lo] * (1 - frac) + table[lo + 1] * frac
        a, s = self._alpha_sigma(t)
        return 2 * (torch.log(a) - torch.log(s))

    def _alpha_sigma(self, t: torch.Tensor):
        if self.kind == "vp":
            lam = self.logsnr(t)
            return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
        if self.kind == "edm":
            lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
            return torch.ones_like(t), (lo + t * (hi - lo)) ** self.rho
        s = self.shift * t / (1 + (self.shift - 1) * t)
        return 1 - s, s

    def alpha(self, t) -> torch.Tensor:
        return self._alpha_sigma(self._t(t))[0]

    def sigma(self, t) -> torch.Tensor:
        return self._alpha_sigma(self._t(t))[1]

    def alpha_sigma(self, t, like: torch.Tensor | None = None):
        """(alpha, sigma) as float64 tensors on ``like``'s device."""
        a, s = self._alpha_sigma(self._t(t))
        if like is not None:
            a, s = a.to(like.device), s.to(like.device)
        return a, s

    def timestep(self, t) -> torch.Tensor:
        """The value a diffusers network of this schedule expects as ``timestep`` at time t.

        vp: the (fractional) training index t (T - 1); edm: c_noise = ln(sigma) / 4 (EDM, Table 1);
        flow: sigma * num_train_timesteps (diffusers' FlowMatchEulerDiscreteScheduler).
        """
        t = self._t(t)
        if self.kind == "vp":
            return (t * (self.num_train_timesteps - 1)).float()
        if self.kind == "edm":
            return (0.25 * torch.log(self.sigma(t))).float()
        return (self.sigma(t) * self.num_train_timesteps).float()

    def t_from_timestep(self, timestep) -> torch.Tensor:
        """Inverse of :meth:`timestep` for vp tables: training index k -> t = k / (T - 1)."""
        if self.kind != "vp":
            raise NotImplementedError("t_from_timestep is defined for discrete vp schedules only.")
        return torch.as_tensor(timestep, dtype=torch.float64) / (self.num_train_timesteps - 1)

    def snr(self, t) -> torch.Tensor:
        return torch.exp(self.logsnr(t))

    # ------------------------------------------------------------------ noising
    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        a, s = self.alpha_sigma(t, x0)
        return expand_like(a, x0) * x0 + expand_like(s, x0) * eps

    # ------------------------------------------------------------------ conversions
    def to_x0_eps(self, output: torch.Tensor, x_t: torch.Tensor, t, prediction_type: str | None = None):
        """Network output of the given parameterisation -> (x0, eps), exactly."""
        pred = prediction_type or self.prediction_type
        a, s = self.alpha_sigma(t, x_t)
        a, s = expand_like(a, x_t), expand_like(s, x_t)
        if pred == "epsilon":
            eps = output
            x0 = (x_t - s * eps) / a
        elif pred == "sample":
            x0 = output
            eps = (x_t - a * x0) / s
        elif pred == "v_prediction":  # v = a eps - s x0, with a^2 + s^2 = 1 on vp
            norm = a * a + s * s
            x0 = (a * x_t - s * output) / norm
            eps = (s * x_t + a * output) / norm
        elif pred == "flow":  # u = eps - x0 and x_t = a x0 + s eps
            x0 = (x_t - s * output) / (a + s)
            eps = output + x0
        else:
            raise ValueError(f"prediction_type {pred!r} is not one of {PREDICTION_TYPES}.")
        return x0, eps

    def from_x0_eps(self, x0: torch.Tensor, eps: torch.Tensor, t, prediction_type: str | None = None):
        """(x0, eps) -> the output a network of the given parameterisation should produce."""
        pred = prediction_type or self.prediction_type
        a, s = self.alpha_sigma(t, x0)
        a, s = expand_like(a, x0), expand_like(s, x0)
        if pred == "epsilon":
            return eps
        if pred == "sample":
            return x0
        if pred == "v_prediction":
            return a * eps - s * x0
        if pred == "flow":
            return eps - x0
        raise ValueError(f"prediction_type {pred!r} is not one of {PREDICTION_TYPES}.")

    def convert(self, output: torch.Tensor, x_t: torch.Tensor, t, src: str, dst: str) -> torch.Tensor:
        """Convert a network output between parameterisations at (x_t, t)."""
        if src == dst:
            return output
        x0, eps = self.to_x0_eps(output, x_t, t, src)
        return self.from_x0_eps(x0, eps, t, dst)

    def score_from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """grad log p_t(x_t) = (alpha x0_hat - x_t) / sigma^2 (Tweedie)."""
        a, s = self.alpha_sigma(t, x_t)
        a, s = expand_like(a, x_t), expand_like(s, x_t)
        return (a * x0 - x_t) / (s * s)

    # ------------------------------------------------------------------ sampling
    def ddim_step(self, x_t: torch.Tensor, x0: torch.Tensor, t, s) -> torch.Tensor:
        """Deterministic DDIM (Song et al. 2021, eq. 12, eta = 0) from time t to time s < t.

        ``s = None`` means the end of sampling: the clean prediction x0 is returned, which is what
        diffusers' DDIM does on its last step with ``set_alpha_to_one=True``.
        """
        from .sampling import ddim_step

        if s is None:
            return x0
        a_t, s_t = self.alpha_sigma(t, x_t)
        a_s, s_s = self.alpha_sigma(s, x_t)
        return ddim_step(x_t, x0, expand_like(a_t, x_t), expand_like(s_t, x_t), expand_like(a_s, x_t),
                         expand_like(s_s, x_t))


__all__ = ["NoiseSchedule", "PREDICTION_TYPES", "expand_like"]

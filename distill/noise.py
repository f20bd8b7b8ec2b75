"""One continuous view of time for every diffusers noise schedule.

Every trainer in distill works with continuous time ``t in [0, 1]`` and

    x_t = alpha(t) * x0 + sigma(t) * eps,          eps ~ N(0, I)

(Kingma et al. 2021, "Variational Diffusion Models", eq. 1; Salimans & Ho 2022, sec. 2).
:class:`NoiseSchedule` builds this view from a diffusers scheduler config:

* ``"vp"``   discrete variance-preserving tables (DDPM / DDIM ``alphas_cumprod`` with linear,
  scaled_linear or squaredcos_cap_v2 betas). ``t = k / (T - 1)`` is exactly training index ``k``;
  between indices the log-SNR is interpolated linearly, so the view is continuous and monotone.
* ``"edm"``  variance-exploding Karras sigmas (EDM, Karras et al. 2022, eq. 5): alpha = 1,
  sigma(t) = (s_min^(1/rho) + t (s_max^(1/rho) - s_min^(1/rho)))^rho (or log-linear for diffusers'
  ``sigma_schedule="exponential"``). The network sees c_in(sigma) x_t at time c_noise = ln(sigma) / 4 and
  its output F gives D = c_skip x_t + c_out F (Karras et al. 2022, Table 1; c_out negated for
  diffusers' ``v_prediction``).
* ``"flow"`` rectified flow (Liu et al. 2022; Esser et al. 2024, eq. 3): alpha = 1 - s, sigma = s with the
  shifted sigma s(t) = shift t / (1 + (shift - 1) t) (Esser et al. 2024, sec. 5.3.2); a dynamic shift
  (FLUX.1) is the static shift e^mu with mu linear in the image token count. The network's time is
  s T and its output the velocity eps - x0 (with ``invert_sigmas``: time (1 - s) T, velocity x0 - eps).

Continuous time t in [0, 1] also has an index view, ``k = t (T - 1)``: on vp tables exactly the training
index, on edm and flow distill's name for the same point of time (999: the noisiest).

Conversions among the network parameterisations (``epsilon``, ``sample`` (x0), ``v_prediction``,
``flow`` velocity eps - x0) and the score go through x0 and eps, which is exact for all of them.
A DDIM step (Song et al. 2021, eq. 12 with eta = 0) between any two times is a pure function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow")


def flow_shift_mu(image_seq_len: int, config) -> float:
    """mu of a dynamically shifted flow schedule, linear in the image token count between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), as diffusers' ``calculate_shift``."""
    x0, x1 = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    y0, y1 = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (y1 - y0) / (x1 - x0)
    return image_seq_len * m + (y0 - m * x0)


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
    sigma_data: float = 0.5  # edm
    sigma_schedule: str = "karras"  # edm: karras (rho) or exponential (log-linear)
    shift: float = 1.0  # flow (a dynamic shift resolved to its static e^mu)
    invert_sigmas: bool = False  # flow
    num_train_timesteps: int = 1000
    scheduler_config: dict | None = None  # the diffusers scheduler's config, for its own sampling grids

    def __post_init__(self):
        if self.kind not in ("vp", "edm", "flow"):
            raise ValueError(f"NoiseSchedule kind {self.kind!r} is not one of 'vp', 'edm', 'flow'.")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}."
            )
        if self.kind == "edm" and self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"An 'edm' NoiseSchedule predicts 'epsilon' or 'v_prediction' (the EDM "
                             f"preconditioning of diffusers' EDM schedulers), got {self.prediction_type!r}.")
        if self.kind == "flow" and self.prediction_type != "flow":
            raise ValueError(f"A 'flow' NoiseSchedule predicts the velocity ('flow'), got "
                             f"{self.prediction_type!r}.")
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
    def from_scheduler(cls, scheduler, image_seq_len: int | None = None) -> NoiseSchedule:
        """Read a diffusers scheduler (or its ``config`` / a plain dict). ``image_seq_len``: the image token
        count that sets a dynamically shifted flow schedule's mu (diffusers' ``calculate_shift``)."""
        import diffusers

        config = dict(getattr(scheduler, "config", scheduler))
        name = config.get("_class_name", type(scheduler).__name__)
        pred = config.get("prediction_type", "epsilon")
        T = int(config.get("num_train_timesteps", 1000))
        if "FlowMatch" in name:
            for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
                if config.get(key):
                    raise ValueError(f"{name} with {key}=true: only the shifted linear flow grid is "
                                     "supported (set it to false in the scheduler config).")
            shift, mu = float(config.get("shift", 1.0)), None
            if config.get("use_dynamic_shifting"):
                if image_seq_len is None:
                    raise ValueError(f"{name} shifts dynamically (use_dynamic_shifting=true): its shift "
                                     "depends on the image token count; pass image_seq_len.")
                mu = flow_shift_mu(image_seq_len, config)
                shift = math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu
            return cls(kind="flow", prediction_type="flow", shift=shift,
                       invert_sigmas=bool(config.get("invert_sigmas", False)), num_train_timesteps=T,
                       scheduler_config={**config, "_class_name": name, "mu": mu})
        if name.startswith("EDM"):
            return cls(kind="edm", prediction_type=pred, sigma_min=float(config.get("sigma_min", 0.002)),
                       sigma_max=float(config.get("sigma_max", 80.0)), rho=float(config.get("rho", 7.0)),
                       sigma_data=float(config.get("sigma_data", 0.5)),
                       sigma_schedule=config.get("sigma_schedule", "karras"), num_train_timesteps=T,
                       scheduler_config={**config, "_class_name": name})
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
            if self.sigma_schedule == "exponential":
                lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
                return torch.ones_like(t), torch.exp(lo + t * (hi - lo))
            lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
            return torch.ones_like(t), (lo + t * (hi - lo)) ** self.rho
        s = self.shift * t / (1 + (self.shift - 1) * t)
        return 1 - s, s

    def t_from_sigma(self, sigma) -> torch.Tensor:
        """Inverse of sigma(t) on edm and flow schedules (float64)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if self.kind == "flow":  # s = k t / (1 + (k - 1) t)  <=>  t = s / (k - (k - 1) s)
            return sigma / (self.shift - (self.shift - 1) * sigma)
        if self.kind == "edm":
            if self.sigma_schedule == "exponential":
                lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
                return (torch.log(sigma) - lo) / (hi - lo)
            lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
            return (sigma ** (1 / self.rho) - lo) / (hi - lo)
        raise NotImplementedError("t_from_sigma is defined for edm and flow schedules.")

    def t_from_logsnr(self, logsnr) -> torch.Tensor:
        """Inverse of :meth:`logsnr` (float64). vp: the inverse of the table's piecewise-linear log-SNR (which
        decreases with the index), 0 above the table's first value and 1 below its last; edm: the time of
        sigma = e^(-logsnr / 2) (alpha = 1), outside [0, 1] for a sigma outside [sigma_min, sigma_max]; flow:
        the time of s = sigmoid(-logsnr / 2) (s / (1 - s) = e^(-logsnr / 2))."""
        lam = torch.as_tensor(logsnr, dtype=torch.float64)
        if self.kind == "vp":
            table = self._logsnr_on(lam.device)
            hi = torch.searchsorted(-table, -lam).clamp(1, self.num_train_timesteps - 1)
            lo = hi - 1
            frac = ((table[lo] - lam) / (table[lo] - table[hi])).clamp(0, 1)
            return (lo + frac) / (self.num_train_timesteps - 1)
        return self.t_from_sigma(torch.exp(-lam / 2) if self.kind == "edm" else torch.sigmoid(-lam / 2))

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
        flow: sigma * num_train_timesteps (diffusers' FlowMatchEulerDiscreteScheduler; (1 - sigma) T with
        ``invert_sigmas``).
        """
        t = self._t(t)
        if self.kind == "vp":
            return (t * (self.num_train_timesteps - 1)).float()
        if self.kind == "edm":
            return (0.25 * torch.log(self.sigma(t))).float()
        s = self.sigma(t)
        return ((1 - s if self.invert_sigmas else s) * self.num_train_timesteps).float()

    def t_from_timestep(self, timestep) -> torch.Tensor:
        """Index k -> t = k / (T - 1): on vp tables the inverse of :meth:`timestep` (the training index);
        on edm and flow the same index view of continuous time (999 -> t = 1, the noisiest)."""
        return torch.as_tensor(timestep, dtype=torch.float64) / (self.num_train_timesteps - 1)

    def scale_input(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """What the network is given at (x_t, t): c_in(sigma) x_t = x_t / sqrt(sigma^2 + sigma_data^2) on
        edm (Karras et al. 2022, Table 1), x_t itself on vp and flow."""
        if self.kind != "edm":
            return x_t
        s = self.sigma(self._t(t, x_t))
        return x_t * expand_like(1 / torch.sqrt(s * s + self.sigma_data**2), x_t)

    def _edm_skip_out(self, s: torch.Tensor, pred: str):
        """EDM's c_skip and c_out at sigma s (Karras et al. 2022, Table 1), c_out negated for diffusers'
        ``v_prediction`` (EDMEulerScheduler.precondition_outputs)."""
        sd2 = self.sigma_data**2
        c_out = s * self.sigma_data / torch.sqrt(s * s + sd2)
        return sd2 / (s * s + sd2), (-c_out if pred == "v_prediction" else c_out)

    def sampling_times(self, num_steps: int) -> torch.Tensor:
        """The continuous times of the family's stock N-step grid, noisiest first (float64): vp: diffusers'
        trailing index spacing; edm and flow: the sigmas of the teacher's own diffusers scheduler after
        ``set_timesteps(num_steps)`` (its shift, terminal stretch and final sigma), without the final 0."""
        if self.kind == "vp":
            from .sampling import trailing_timesteps

            return self.t_from_timestep(torch.tensor(trailing_timesteps(num_steps, self.num_train_timesteps)))
        import diffusers

        config = dict(self.scheduler_config or {})
        name = config.pop("_class_name", "FlowMatchEulerDiscreteScheduler" if self.kind == "flow"
                          else "EDMEulerScheduler")
        mu = config.pop("mu", None)
        sched = getattr(diffusers, name).from_config(config)
        kwargs = {"mu": mu} if self.kind == "flow" and config.get("use_dynamic_shifting") else {}
        sched.set_timesteps(num_steps, **kwargs)
        sigmas = sched.sigmas[:num_steps].to(torch.float64)
        if self.kind == "flow" and self.invert_sigmas:
            sigmas = 1 - sigmas
        return self.t_from_sigma(sigmas).clamp(0, 1)

    def vp_equivalent(self, t):
        """(alpha_bar, scale) with x_t = scale * x_vp: the variance-preserving state at the same log-SNR,
        alpha_bar = alpha^2 / (alpha^2 + sigma^2), scale = sqrt(alpha^2 + sigma^2). A deterministic sampler
        run on these coordinates is the family's own (DDIM is invariant to the scale of x)."""
        a, s = self.alpha_sigma(t)
        norm = a * a + s * s
        return a * a / norm, torch.sqrt(norm)

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
        if self.kind == "edm" and pred != "sample":
            c_skip, c_out = self._edm_skip_out(s, pred)
            x0 = expand_like(c_skip, x_t) * x_t + expand_like(c_out, x_t) * output
            return x0, (x_t - x0) / expand_like(s, x_t)
        a, s = expand_like(a, x_t), expand_like(s, x_t)
        if pred == "flow" and self.invert_sigmas:
            output = -output
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
        if self.kind == "edm" and pred != "sample":
            c_skip, c_out = self._edm_skip_out(s, pred)
            x_t = x0 + expand_like(s, x0) * eps
            return (x0 - expand_like(c_skip, x0) * x_t) / expand_like(c_out, x0)
        a, s = expand_like(a, x0), expand_like(s, x0)
        if pred == "flow":
            return x0 - eps if self.invert_sigmas else eps - x0
        if pred == "epsilon":
            return eps
        if pred == "sample":
            return x0
        if pred == "v_prediction":
            return a * eps - s * x0
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


__all__ = ["NoiseSchedule", "PREDICTION_TYPES", "expand_like", "flow_shift_mu"]

"""A network read as a denoiser at continuous time: the one place a network output is converted or guided.

A :class:`Denoiser` binds a network to its :class:`~distill.noise.NoiseSchedule`, its prediction type
(epsilon, sample or v, Salimans & Ho 2022, sec. 4; EDM's preconditioned F; the flow velocity), its input
scaling (EDM's c_in), the backbone's call convention
(:func:`distill.backbones.call`) and, for a guided teacher, its classifier-free guidance scale
(Ho & Salimans 2022, eq. 6, in diffusers' convention)

    out = out_uncond + s (out_cond - out_uncond)            (Ho & Salimans' w = s - 1)

with the unconditional half evaluated on the condition's null (null class, or the empty / negative
prompt), in one batched pass of both halves. Guidance mixes the raw outputs: every parameterisation is
affine in the output at fixed (x_t, t), so the result is the same in epsilon, x0 or v. A network that takes
the guidance weight as an input (guided distillation, Meng et al. 2023) gets it as ``w``. A
guidance-distilled network (FLUX.1-dev) takes the scale itself as an input: one pass with ``guidance=scale``
(FluxPipeline's 3.5 when none is bound), no unconditional half unless a ``true_cfg_scale`` is bound
(FluxPipeline's option: both halves at the embedded scale, then the CFG formula above with that scale).

The frozen teacher, the fake score, the one-step generator, the round teacher and every student of a
trainer are Denoisers; a trained network changes (Accelerate's wrapper, sharding, EMA weights), so a
trainer keeps the Denoiser without it and evaluates ``denoiser.on(network)``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch

from . import backbones
from .conditioning import Condition
from .noise import NoiseSchedule


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale) -> torch.Tensor:
    """Ho & Salimans 2022, eq. 6, in diffusers' convention: out_uncond + s (out_cond - out_uncond), for
    outputs of one parameterisation at the same (x_t, t); ``scale``: a number or a tensor broadcastable to
    them."""
    return uncond + scale * (cond - uncond)


class Denoiser:
    """Args:
        network: the denoiser network (None: set later with :meth:`on`).
        schedule: its noise schedule.
        prediction_type: what the network outputs (default: the schedule's).
        guidance_scale: the classifier-free guidance scale bound to this denoiser (None: unguided); a call
            may pass its own (a number or one per example).
        prepare: ``(x_t, cond) -> (network input, cond)``: the frozen teacher casts its input to its dtype
            and fills a missing condition with its null.
        autocast: the mixed-precision context of a trained network's passes (Accelerate's ``autocast``).
    """

    def __init__(self, network, schedule: NoiseSchedule, prediction_type: str | None = None,
                 guidance_scale=None, prepare: Callable | None = None,
                 autocast: Callable = contextlib.nullcontext, true_cfg_scale: float | None = None):
        self.network = network
        self.schedule = schedule
        self.prediction_type = prediction_type or schedule.prediction_type
        self.guidance_scale = guidance_scale
        self.true_cfg_scale = true_cfg_scale
        self.prepare = prepare
        self.autocast = autocast

    def on(self, network) -> Denoiser:
        """This denoiser evaluating ``network`` (a trained network as the trainer holds it now)."""
        out = copy.copy(self)
        out.network = network
        return out

    def output(self, x_t: torch.Tensor, t, cond: Condition | None = None, guidance_scale=None,
               w: torch.Tensor | None = None, timestep: torch.Tensor | None = None) -> torch.Tensor:
        """The raw network output at continuous time ``t`` (a number or one per example), classifier-free
        guided by ``guidance_scale`` (default: the bound one). ``w``: the guidance weight of a network that
        takes one as input. ``timestep``: the network's time input when the caller has it already."""
        b = x_t.shape[0]
        if timestep is None:
            tt = torch.as_tensor(t, dtype=torch.float64, device=x_t.device)
            timestep = self.schedule.timestep(tt.expand(b) if tt.ndim == 0 else tt).to(x_t.device)
        x_in = self.schedule.scale_input(x_t, t)  # EDM's c_in; x_t itself on vp and flow
        x_in, cond = self.prepare(x_in, cond) if self.prepare is not None else (x_in, cond)
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        if backbones.embeds_guidance(self.network):  # FLUX.1-dev: the scale is an input, one pass
            if w is not None:  # a guided student's weight w: the input is the scale 1 + w
                g = 1.0 + w
            else:
                g = backbones.default_embedded_guidance() if scale is None else scale
            g = torch.as_tensor(g, dtype=torch.float32, device=x_t.device).expand(b)
            true = self.true_cfg_scale
            if true is None or true == 1.0 or cond is None or cond.kind == "none":
                with self.autocast():
                    return backbones.call(self.network, x_in, timestep, cond, guidance=g)
            # FluxPipeline's true_cfg_scale: both passes at the embedded scale, then CFG against the null
            with self.autocast():
                out = backbones.call(self.network, torch.cat([x_in, x_in]), torch.cat([timestep, timestep]),
                                     cond.with_cfg_pair(), guidance=torch.cat([g, g]))
            c, u = out.chunk(2)
            return classifier_free_guidance(c, u, true)
        guided = scale is not None and cond is not None and cond.kind != "none" and (
            torch.as_tensor(scale).numel() > 1 or float(scale) != 1.0)
        with self.autocast():
            if not guided:
                return backbones.call(self.network, x_in, timestep, cond, w)
            w2 = None if w is None else torch.cat([w, w])
            out = backbones.call(self.network, torch.cat([x_in, x_in]), torch.cat([timestep, timestep]),
                                 cond.with_cfg_pair(), w2)
        c, u = out.chunk(2)
        s = torch.as_tensor(scale, device=x_t.device, dtype=out.dtype)
        return classifier_free_guidance(c, u, s.reshape(-1, *([1] * (x_t.ndim - 1))) if s.ndim else s)

    def x0(self, x_t: torch.Tensor, t, cond: Condition | None = None, **kwargs) -> torch.Tensor:
        """The clean-sample prediction (``output``'s arguments)."""
        out = self.output(x_t, t, cond, **kwargs).to(x_t.dtype)
        return self.schedule.to_x0_eps(out, x_t, t, self.prediction_type)[0].to(x_t.dtype)

    def score(self, x_t: torch.Tensor, t, cond: Condition | None = None, **kwargs) -> torch.Tensor:
        """grad log p_t(x_t) from the clean-sample prediction (Tweedie's formula)."""
        x0 = self.x0(x_t, t, cond, **kwargs)
        return self.schedule.score_from_x0(x0, x_t, t).to(x_t.dtype)


__all__ = ["Denoiser", "classifier_free_guidance"]

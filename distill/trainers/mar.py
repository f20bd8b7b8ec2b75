"""MaskedAutoregressiveTrainer: a small MAR generator trained on the data (``method: mar``).

Li et al. 2024, "Autoregressive Image Generation without Vector Quantization", sec. 3 (MAR). Each
step, per image:

1. cut it into tokens (patches) and draw a random generation order;
2. mask the first ceil(r L) tokens of the order, with one masking ratio r per batch drawn from
   normal(1, 0.25) truncated to [``mar.mask_ratio_min``, 1] (MAR's schedule);
3. replace the label by the null class with probability ``mar.label_dropout`` (classifier-free guidance);
4. the transformer turns the known tokens into a conditioning vector z_i per token, and the diffusion
   head is trained on the masked tokens only, each repeated ``mar.diffusion_batch_mul`` times with its
   own (t, eps):  L = E || eps - eps_theta(sqrt(abar_t) x_i + sqrt(1 - abar_t) eps, t, z_i) ||^2
   (MAR eq. 2; t uniform over 1,000 indices of the cosine schedule, as MAR). With ``mar.learn_sigma``
   (default, as MAR's and DiSA's reference heads) the head also learns its variance with the hybrid loss
   L_simple + lambda L_vlb of Nichol & Dhariwal 2021 (eq. 15-16, lambda = 0.001), and the export samples
   with that learned-range variance; ``false`` trains eps only and samples with the fixed posterior
   variance.

The export is a :class:`~distill.pipelines.MaskedAutoregressivePipeline`; sample it with DiSA step
annealing (``pipe(step_schedule="cosine", diffusion_steps=50, min_diffusion_steps=5)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import diffusers
import torch

from ..engine import DistillationTrainer, Update
from ..errors import ConfigError, require
from ..models import MaskedAutoregressiveModel
from ..objectives.mar import diffusion_head_loss
from ..pipelines import MaskedAutoregressivePipeline

if TYPE_CHECKING:
    from ..config import Config


@dataclass
class MARConfig:
    """Masked-autoregressive generator (Li et al. 2024) trained on the data (no teacher); sampled with DiSA
    step annealing (Zhao et al. 2025). Model shape: ``distill.models.MaskedAutoregressiveModel``."""

    patch_size: int = 2
    width: int = 128
    depth: int = 4
    num_heads: int = 4
    head_width: int = 128
    head_depth: int = 3
    mask_ratio_min: float = 0.7  # masking ratio ~ normal(1, 0.25) truncated to [mask_ratio_min, 1] (MAR)
    label_dropout: float = 0.1  # null class for classifier-free guidance (MAR: 0.1)
    diffusion_batch_mul: int = 4  # head samples (t, noise) per token per step (MAR: 4)
    learn_sigma: bool = True  # head variance learned, hybrid loss (MAR / DiSA reference); false: eps only
    num_iter: int = 16  # sampling defaults written into the exported pipeline's card and sample grids
    diffusion_steps: int = 50

    def validate(self, cfg: Config) -> None:
        require([(0 < self.mask_ratio_min <= 1, "mar.mask_ratio_min", self.mask_ratio_min,
                   "a number in (0, 1]"),
                  (0 <= self.label_dropout < 1, "mar.label_dropout", self.label_dropout,
                   "a number in [0, 1)"),
                  (self.diffusion_batch_mul >= 1, "mar.diffusion_batch_mul", self.diffusion_batch_mul,
                   "an integer >= 1"),
                  (self.width % self.num_heads == 0, "mar.width/num_heads", (self.width, self.num_heads),
                   "a width divisible by num_heads")])



class MaskedAutoregressiveTrainer(DistillationTrainer):
    method = "mar"
    uses_teacher = False
    needs_clean_samples = True

    def check_data(self) -> None:
        shape = self.data.sample_shape
        if not getattr(self.data, "has_images", True) or shape is None or len(shape) != 3:
            raise ConfigError(f"method: mar needs image data (C, H, W); data.spec={self.config.data.spec!r} "
                              f"has samples of shape {shape}.")
        if shape[-1] % self.config.mar.patch_size:
            raise ConfigError(f"mar.patch_size={self.config.mar.patch_size} does not divide the data's "
                              f"resolution {shape[-1]}; use a divisor (e.g. 2) or another data.resolution.")

    def build(self) -> None:
        m, (c, _, s) = self.config.mar, self.data.sample_shape
        self.scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                                 prediction_type="epsilon")
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)
        self.num_classes = self.data.num_classes
        net = MaskedAutoregressiveModel(sample_size=s, in_channels=c, patch_size=m.patch_size, width=m.width,
                                        depth=m.depth, num_heads=m.num_heads, num_classes=self.num_classes,
                                        head_width=m.head_width, head_depth=m.head_depth,
                                        learn_sigma=m.learn_sigma)
        self.add("mar", net, lr=self.config.optim.lr, ema=True)

    def mask_ratio(self) -> float:
        """normal(1, 0.25) truncated to [mask_ratio_min, 1], by inverting its CDF on a uniform draw."""
        lo = (self.config.mar.mask_ratio_min - 1.0) / 0.25
        phi = torch.special.ndtr(torch.tensor([lo, 0.0], dtype=torch.float64))
        # a host value: no device synchronisation
        u = torch.rand(1, generator=self.host_rng, dtype=torch.float64)
        return float(1.0 + 0.25 * torch.special.ndtri(phi[0] + u * (phi[1] - phi[0])))

    def objective(self, batch: dict, step: int):
        """MAR's diffusion-head loss (Li et al. 2024, eq. 2; with ``learn_sigma`` Nichol & Dhariwal's hybrid
        loss, eq. 16) on the masked tokens of a random order."""
        m, net = self.config.mar, self.modules["mar"]
        model = self.unwrap("mar")
        tokens = model.patchify(batch["x"])
        b, length, _ = tokens.shape
        order = torch.argsort(self.rand(b, length), dim=1)  # the generation order of each image's tokens
        rank = torch.argsort(order, dim=1)
        n = math.ceil(length * self.mask_ratio())
        mask = rank < n
        # the masked positions of each row in raster order (= tokens[mask], without a data-dependent shape)
        where = order[:, :n].sort(dim=1).values
        labels = batch["label"] if self.num_classes else None
        if labels is not None:
            labels = torch.where(self.rand(b) < m.label_dropout, torch.full_like(labels, self.num_classes),
                                 labels)
        with self.accelerator.autocast():
            z = model.encode(tokens, mask, labels)
            target = _rows(tokens, where).repeat(m.diffusion_batch_mul, 1)
            cond = _rows(z, where).repeat(m.diffusion_batch_mul, 1)
            per_token = diffusion_head_loss(net, target, cond, self.alphas_cumprod, self.rng,
                                            learn_sigma=m.learn_sigma)
        loss = self.finite_mean(per_token)
        norms = yield Update(loss, "mar")
        return {"loss": loss.detach(), "grad_norm": norms["mar"], "mask_ratio": n / length}

    def export(self, for_samples: bool = False):
        return MaskedAutoregressivePipeline(self.unwrap("mar"), self.scheduler)

    def sample_kwargs(self) -> dict:
        return {"num_iter": self.config.mar.num_iter, "diffusion_steps": self.config.mar.diffusion_steps}

    def card_info(self) -> dict:
        return {"method": "mar (masked autoregressive, diffusion head)", "data": self.config.data.spec,
                "num_classes": self.num_classes, "learn_sigma": self.config.mar.learn_sigma,
                "sampling": "pipe(num_iter=16, step_schedule='cosine', diffusion_steps=50, "
                "min_diffusion_steps=5) for DiSA step annealing; step_schedule=None, diffusion_steps=100 for "
                "MAR's own sampler"}


def _rows(x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """x[b, where[b, j]] for every row b, flattened to (B * n, D): the gathered tokens, row by row."""
    return x.gather(1, where[..., None].expand(-1, -1, x.shape[-1])).reshape(-1, x.shape[-1])

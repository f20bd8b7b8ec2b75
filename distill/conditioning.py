"""One conditioning type for every teacher, trainer and loss.

A :class:`Condition` is what a denoiser is conditioned on, for a batch:

* nothing (unconditional teachers): every field is None;
* class labels (``class_labels``, shape (B,)), with the null class ``num_classes`` as null condition;
* text: ``embeds`` (B, L, D), the text encoder's hidden states (``encoder_hidden_states``), plus for
  SDXL-class teachers ``pooled`` (B, D') (``text_embeds``) and ``time_ids`` (B, 6)
  (original size, crop corner, target size), for PixArt-class teachers the T5 tokens' attention ``mask``
  (B, L); the null condition is the encoded empty (or negative)
  prompt, or zeros where the teacher says so (SDXL's ``force_zeros_for_empty_prompt``).

It carries its own null condition (``null``, batch 1 or B) so classifier-free guidance
(Ho & Salimans 2022, eq. 6) and condition dropout for CFG training need nothing else.
How the fields become a network's keyword arguments is the backbone's business
(:func:`distill.backbones.network_kwargs`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

_TENSORS = ("class_labels", "embeds", "pooled", "time_ids", "mask")


@dataclass
class Condition:
    """A batch of conditions (see the module docstring). All fields optional; ``null`` is the CFG null."""

    class_labels: torch.Tensor | None = None
    embeds: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # the text tokens' attention mask (B, L) of a T5-conditioned teacher
    null: Condition | None = None

    # ------------------------------------------------------------------ what it is
    @property
    def kind(self) -> str:
        if self.embeds is not None:
            return "text"
        if self.class_labels is not None:
            return "class"
        return "none"

    def __len__(self) -> int:
        for name in _TENSORS:
            v = getattr(self, name)
            if v is not None:
                return v.shape[0]
        return 0

    def map(self, fn, null: bool = True) -> Condition:
        """``fn`` applied to every tensor held (and to the null condition's, unless ``null`` is False)."""
        out = {n: (fn(getattr(self, n)) if getattr(self, n) is not None else None) for n in _TENSORS}
        nul = self.null.map(fn) if (null and self.null is not None) else self.null
        return Condition(**out, null=nul)

    # ------------------------------------------------------------------ batching
    def to(self, device=None, dtype: torch.dtype | None = None) -> Condition:
        """Moved to ``device``; floating tensors (embeddings) cast to ``dtype`` when given."""

        def move(v):
            v = v.to(device) if device is not None else v
            return v.to(dtype) if (dtype is not None and v.is_floating_point()) else v

        return self.map(move)

    def __getitem__(self, idx) -> Condition:
        """Rows ``idx`` (the null is indexed too when it is per-sample, kept when it has one row)."""
        out = {n: (getattr(self, n)[idx] if getattr(self, n) is not None else None) for n in _TENSORS}
        nul = self.null
        if nul is not None and len(nul) == len(self) and len(self) > 1:
            nul = nul[idx]
        return Condition(**out, null=nul)

    def expand(self, batch: int) -> Condition:
        """A one-row condition repeated to ``batch`` rows (a ``batch``-row one is returned as is)."""
        n = len(self)
        if n == batch or self.kind == "none":
            return self
        if n != 1:
            raise ValueError(f"Cannot expand a condition of {n} rows to {batch} rows.")
        return self.map(lambda v: v.expand(batch, *v.shape[1:]), null=False)

    @staticmethod
    def cat(conds: list[Condition]) -> Condition:
        """Concatenate batches (their nulls too when every one has a per-sample null)."""
        first = conds[0]
        out = {}
        for n in _TENSORS:
            vals = [getattr(c, n) for c in conds]
            if any(v is None for v in vals) and not all(v is None for v in vals):
                raise ValueError(f"Cannot concatenate conditions where only some have {n!r}.")
            out[n] = None if vals[0] is None else torch.cat(vals)
        nulls = [c.null for c in conds]
        null = first.null
        if all(x is not None for x in nulls) and any(len(x) > 1 for x in nulls):
            null = Condition.cat([x.expand(len(c)) for x, c in zip(nulls, conds)])
        return Condition(**out, null=null)

    # ------------------------------------------------------------------ classifier-free guidance
    def null_like(self) -> Condition:
        """The null condition with this batch's size."""
        if self.kind == "none":
            return self
        if self.null is None:
            raise ValueError("This condition has no null condition, so it cannot be guided or dropped out; "
                             "build it with Teacher.condition(...), which attaches the teacher's null.")
        return replace(self.null.expand(len(self)), null=self.null)

    def with_cfg_pair(self) -> Condition:
        """[cond; null] stacked along the batch: one network call evaluates both halves."""
        return Condition.cat([replace(self, null=None), replace(self.null_like(), null=None)])

    def drop(self, mask: torch.Tensor) -> Condition:
        """Rows where ``mask`` is True replaced by the null condition (condition dropout, Ho & Salimans
        2022 sec. 3.2, for training a model that can be guided)."""
        if self.kind == "none":
            return self
        null = self.null_like()
        out = {}
        for n in _TENSORS:
            v, u = getattr(self, n), getattr(null, n)
            if v is None:
                out[n] = None
                continue
            m = mask.to(v.device).reshape(-1, *([1] * (v.ndim - 1)))
            out[n] = torch.where(m, u.to(v.dtype), v)
        return Condition(**out, null=self.null)


def as_condition(cond) -> Condition | None:
    """``cond`` when it is a Condition or None; a clear error for the old label-tensor argument."""
    if cond is None or isinstance(cond, Condition):
        return cond
    raise TypeError(f"Expected a distill.Condition (or None), got {type(cond).__name__}. Class labels go in "
                    "as teacher.condition(class_labels=labels), prompts as teacher.condition(prompts=[...]).")


__all__ = ["Condition", "as_condition"]

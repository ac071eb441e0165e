"""``TverskyLoss``: the nn.Module face of ``tversky_loss``."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .functional import options_loss
from .options import TverskyOptions, with_option_signature


class TverskyLoss(nn.Module):
    """Fused Tversky loss as a module; every option as in :func:`fasttversky.tversky_loss`.

    ``TverskyLoss(alpha, beta, gamma=0.75, ...)`` or ``TverskyLoss(options=opts)``: the
    options are checked here, at construction (per-class lengths against C at the first
    forward, when C is known), and kept in ``self.options``.

    ``forward(logits, target)``: logits (B, C, *spatial) float, target an integer label
    map (B, *spatial) / (B, 1, *spatial) or a float (B, C, *spatial) soft target.
    alpha weighs false positives, beta false negatives (paper's best: 0.3, 0.7).
    ``ce_weight > 0`` adds that multiple of the cross-entropy in the same fused pass.
    """

    @with_option_signature
    def __init__(self, *args, options: TverskyOptions | None = None, **kwargs):
        super().__init__()
        self.options = TverskyOptions.of(args, kwargs, options)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return options_loss(logits, target, self.options)

    def extra_repr(self) -> str:
        """alpha, beta, and every other option that differs from its default."""
        default = TverskyOptions()
        shown = [
            f"{f.name}={getattr(self.options, f.name)!r}"
            for f in dataclasses.fields(TverskyOptions)
            if f.name in ("alpha", "beta")
            or getattr(self.options, f.name) != getattr(default, f.name)
        ]
        return ", ".join(shown)

"""One call for "Tversky + weighted cross-entropy" used by the compat adapters.

TODO(compound): until ``tversky_loss(..., ce_weight=, ce_class_weights=)`` lands on main,
the cross-entropy term is computed here by ``F.cross_entropy`` / BCE-with-logits (a
second pass); afterwards this forwards to the fused single pass.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ..functional import tversky_loss

_HAS_CE = "ce_weight" in inspect.signature(tversky_loss).parameters


def tversky_ce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    beta: float,
    *,
    ce_weight: float,
    ce_class_weights: torch.Tensor | None = None,
    activation: str,
    ignore_index: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """``tversky_loss(...) + ce_weight * CE`` (softmax: ``F.cross_entropy`` with
    ``weight=ce_class_weights`` and ``ignore_index``; sigmoid: BCE-with-logits mean)."""
    if _HAS_CE:
        return tversky_loss(
            logits,
            target,
            alpha,
            beta,
            activation=activation,
            ignore_index=ignore_index,
            ce_weight=ce_weight,
            ce_class_weights=ce_class_weights,
            **kwargs,
        )
    tv = tversky_loss(
        logits, target, alpha, beta, activation=activation, ignore_index=ignore_index, **kwargs
    )
    if ce_weight == 0:
        return tv
    if activation == "softmax":
        labels = target[:, 0] if target.dim() == logits.dim() else target
        ce = F.cross_entropy(
            logits,
            labels.long(),
            weight=ce_class_weights,
            ignore_index=-100 if ignore_index is None else ignore_index,
        )
    else:
        t = target if target.is_floating_point() else target.to(logits.dtype)
        ce = F.binary_cross_entropy_with_logits(logits, t.reshape(logits.shape))
    return tv + ce_weight * ce

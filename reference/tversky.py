"""The Tversky loss written as plainly as possible: the oracle every backend must match.

Explicit one-hot, explicit activation, the three sums of the paper, the formula, and
autograd for gradients. Run it in float64 (``.double()`` the inputs) to get the
numbers the kernels are compared against. No fusion, no tricks, no shared code with
the package.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _per_class(value, C: int, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, (int, float)):
        return torch.full((C,), float(value), dtype=like.dtype, device=like.device)
    return torch.as_tensor(list(value), dtype=like.dtype, device=like.device)


def reference_tversky_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float | Sequence[float] = 0.3,
    beta: float | Sequence[float] = 0.7,
    *,
    activation: str = "softmax",
    include_background: bool = True,
    batch: bool = False,
    reduction: str = "mean",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    gamma: float = 1.0,
    ignore_index: int | None = None,
    class_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Reference Tversky loss; same meaning of every argument as ``fasttversky.tversky_loss``.

    logits: (B, C, *spatial) float. target: integer label map (B, *spatial) or
    (B, 1, *spatial), or float (B, C, *spatial) soft/one-hot target.
    """
    B, C = logits.shape[:2]
    x = logits

    # 1. probabilities
    if activation == "softmax":
        p = torch.softmax(x, dim=1)
    elif activation == "sigmoid":
        p = torch.sigmoid(x)
    elif activation == "none":
        p = x
    else:
        raise ValueError(activation)

    # 2. ground truth as an explicit one-hot (B, C, *spatial) and the voxel mask
    if target.is_floating_point():
        g = target.to(p.dtype)
        mask = torch.ones_like(p[:, :1])
    else:
        labels = target.long()
        if labels.dim() == x.dim():
            labels = labels[:, 0]
        if ignore_index is not None:
            keep = labels != ignore_index
            labels = torch.where(keep, labels, torch.zeros_like(labels))
        else:
            keep = torch.ones_like(labels, dtype=torch.bool)
        if C == 1:
            g = (labels == 1).unsqueeze(1).to(p.dtype)
        else:
            g = F.one_hot(labels, C).movedim(-1, 1).to(p.dtype)
        mask = keep.unsqueeze(1).to(p.dtype)

    p = p * mask
    g = g * mask

    # 3. the three sums of the paper
    dims = list(range(2, x.dim()))
    if batch:
        dims = [0] + dims
    tp = (p * g).sum(dims)
    fp = (p * (1 - g)).sum(dims)
    fn = ((1 - p) * g).sum(dims)

    # 4. the index and the loss
    a = _per_class(alpha, C, p)
    b = _per_class(beta, C, p)
    t = (tp + smooth_nr) / (tp + a * fp + b * fn + smooth_dr)
    if gamma == 1.0:
        terms = 1 - t
    else:
        terms = (1 - t).clamp_min(1e-12) ** gamma

    w = (
        _per_class(class_weights, C, p)
        if class_weights is not None
        else torch.ones(C, dtype=p.dtype, device=p.device)
    )
    if not include_background and C > 1:
        terms = terms[..., 1:]
        w = w[1:]
    weighted = terms * w

    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    if reduction == "mean":
        n = 1 if batch else B
        return weighted.sum() / (w.sum() * n)
    raise ValueError(reduction)

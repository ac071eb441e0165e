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
    gamma: float | Sequence[float] = 1.0,
    generalized: str | None = None,
    ignore_index: int | None = None,
    class_weights: Sequence[float] | None = None,
    ce_weight: float = 0.0,
    ce_class_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Reference Tversky loss; same meaning of every argument as ``fasttversky.tversky_loss``.

    logits: (B, C, *spatial) float. target: integer label map (B, *spatial) or
    (B, 1, *spatial), or float (B, C, *spatial) soft/one-hot target. With
    ``ce_weight > 0`` the result is the Tversky loss + ``ce_weight`` ×
    :func:`reference_cross_entropy`.
    """
    if ce_weight:
        if reduction == "none":
            raise ValueError("reduction='none' is not defined with ce_weight > 0")
        tv = reference_tversky_loss(
            logits,
            target,
            alpha,
            beta,
            activation=activation,
            include_background=include_background,
            batch=batch,
            reduction=reduction,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            gamma=gamma,
            generalized=generalized,
            ignore_index=ignore_index,
            class_weights=class_weights,
        )
        ce = reference_cross_entropy(
            logits,
            target,
            activation=activation,
            ignore_index=ignore_index,
            class_weights=ce_class_weights,
        )
        return tv + ce_weight * ce
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
    g_exp = _per_class(gamma, C, p)
    w = (
        _per_class(class_weights, C, p)
        if class_weights is not None
        else torch.ones(C, dtype=p.dtype, device=p.device)
    )
    if not include_background and C > 1:
        tp, fp, fn, a, b, g_exp, w = (v[..., 1:] for v in (tp, fp, fn, a, b, g_exp, w))
    if generalized is not None:
        # Generalized Tversky: weighted sums over the classes first, one ratio per sample.
        count = (tp + fn).detach()
        gw = {"square": 1 / count**2, "simple": 1 / count, "uniform": torch.ones_like(count)}[
            generalized
        ]
        absent = torch.isinf(gw)
        gw = gw.masked_fill(absent, 0.0)
        gw = gw + absent * gw.max(-1, keepdim=True).values
        t = ((gw * tp).sum(-1, keepdim=True) + smooth_nr) / (
            (gw * (tp + a * fp + b * fn)).sum(-1, keepdim=True) + smooth_dr
        )
        g_exp, w = g_exp[..., :1], w[..., :1]
    else:
        t = (tp + smooth_nr) / (tp + a * fp + b * fn + smooth_dr)
    # max(1 - T, 0) ** gamma for every gamma (fasttversky's stated semantics; 1 - T < 0
    # only when smooth_nr > smooth_dr). Plain pow: its gradient at exactly 0 is not used.
    terms = torch.clamp(1 - t, min=0) ** g_exp
    weighted = terms * w

    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    if reduction == "mean":
        n = 1 if batch else B
        return weighted.sum() / (w.sum() * n)
    raise ValueError(reduction)


def reference_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    activation: str = "softmax",
    ignore_index: int | None = None,
    class_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """The cross-entropy term of the compound loss, from torch's own functions.

    softmax: ``F.cross_entropy(logits, labels, weight=class_weights,
    ignore_index=ignore_index)`` (weighted mean Σ w_y·(−log p_y) / Σ w_y over the
    non-ignored voxels), except that it is 0 instead of NaN when no voxel counts.
    sigmoid: ``F.binary_cross_entropy_with_logits`` against the one-hot of the labels
    (label == 1 for C = 1), per-channel ``weight = class_weights``, mean over the
    C × (non-ignored voxels) elements. Integer label maps only.
    """
    B, C = logits.shape[:2]
    labels = target.long()
    if labels.dim() == logits.dim():
        labels = labels[:, 0]
    if activation == "softmax":
        w = None if class_weights is None else _per_class(class_weights, C, logits)
        ii = -100 if ignore_index is None else ignore_index
        kept = labels != ii
        wsum = (w[labels.clamp(0, C - 1)] * kept).sum() if w is not None else kept.sum()
        if wsum == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(logits, labels, weight=w, ignore_index=ii)
    if activation == "sigmoid":
        keep = torch.ones_like(labels, dtype=torch.bool)
        if ignore_index is not None:
            keep = labels != ignore_index
        safe = torch.where(keep, labels, torch.zeros_like(labels))
        if C == 1:
            g = (safe == 1).unsqueeze(1).to(logits.dtype)
        else:
            g = F.one_hot(safe, C).movedim(-1, 1).to(logits.dtype)
        shape = (1, C) + (1,) * (logits.dim() - 2)
        w = keep.unsqueeze(1).to(logits.dtype)
        if class_weights is not None:
            w = w * _per_class(class_weights, C, logits).view(shape)
        n = keep.sum() * C
        if n == 0:
            return logits.sum() * 0.0
        bce = F.binary_cross_entropy_with_logits(logits, g, weight=w, reduction="sum")
        return bce / n
    raise ValueError(f"no cross-entropy for activation={activation!r}")

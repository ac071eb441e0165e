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
    ce_label_smoothing: float = 0.0,
    ce_focal_gamma: float | None = None,
    ce_focal_alpha: float | None = None,
    regions: Sequence | None = None,
    num_labels: int | None = None,
) -> torch.Tensor:
    """Reference Tversky loss; same meaning of every argument as ``fasttversky.tversky_loss``.

    logits: (B, C, *spatial) float. target: a label map (B, *spatial) or (B, 1, *spatial),
    integer or float holding whole numbers ((B, 1, *spatial) is a soft target when C = 1
    without regions), or a float (B, C, *spatial) soft/one-hot target. ``regions``: the
    channel r's target is ``label in regions[r]`` (``num_labels`` only bounds the labels,
    which the reference does not check). With ``ce_weight > 0`` the result is the
    Tversky loss + ``ce_weight`` × :func:`reference_cross_entropy`.
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
            regions=regions,
        )
        ce = reference_cross_entropy(
            logits,
            target,
            activation=activation,
            ignore_index=ignore_index,
            class_weights=ce_class_weights,
            label_smoothing=ce_label_smoothing,
            focal_gamma=ce_focal_gamma,
            focal_alpha=ce_focal_alpha,
            regions=regions,
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
    g, mask, _ = reference_target(logits, target, ignore_index=ignore_index, regions=regions)
    g, mask = g.to(p.dtype), mask.to(p.dtype)

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


def _is_label_map(logits: torch.Tensor, target: torch.Tensor, regions) -> bool:
    if not target.is_floating_point() or target.dim() == logits.dim() - 1:
        return True
    return target.shape[1] == 1 and (logits.shape[1] > 1 or regions is not None)


def reference_target(logits, target, *, ignore_index=None, regions=None):
    """(g (B, C, *spatial), mask (B, 1, *spatial), labels or None), float64, spelt out:
    the one-hot of a label map (label == 1 for C = 1), the region one-hot (channel r:
    label in regions[r]), or the soft target itself; mask is 0 on ignored voxels, where
    g is 0 too."""
    C = logits.shape[1]
    if not _is_label_map(logits, target, regions):
        g = target.double()
        return g, torch.ones_like(g[:, :1]), None
    labels = target.double()
    if labels.dim() == logits.dim():
        labels = labels[:, 0]
    labels = labels.long()
    keep = torch.ones_like(labels, dtype=torch.bool)
    if ignore_index is not None:
        keep = labels != ignore_index
    if regions is not None:
        channels = []
        for region in regions:
            members = region if isinstance(region, (tuple, list)) else (region,)
            inside = torch.zeros_like(keep)
            for label in members:
                inside = inside | (labels == label)
            channels.append(inside)
        g = torch.stack(channels, 1).double()
    elif C == 1:
        g = (labels == 1).unsqueeze(1).double()
    else:
        safe = torch.where(keep, labels, torch.zeros_like(labels))
        g = F.one_hot(safe, C).movedim(-1, 1).double()
    mask = keep.unsqueeze(1).double()
    return g * mask, mask, torch.where(keep, labels, torch.full_like(labels, -100))


def reference_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    activation: str = "softmax",
    ignore_index: int | None = None,
    class_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    focal_gamma: float | None = None,
    focal_alpha: float | None = None,
    regions: Sequence | None = None,
) -> torch.Tensor:
    """The cross-entropy term of the compound loss, from torch's own functions.

    softmax: ``F.cross_entropy(logits, labels, weight=class_weights,
    ignore_index=ignore_index, label_smoothing=label_smoothing)`` (weighted mean
    Σ w_y·(−log p_y) / Σ w_y over the non-ignored voxels), except that it is 0 instead
    of NaN when no voxel counts; with a soft target, ``F.cross_entropy(logits, soft,
    weight=..., label_smoothing=...)``. sigmoid: ``F.binary_cross_entropy_with_logits``
    against the one-hot of the labels (label == 1 for C = 1; the region one-hot with
    ``regions``; the soft target), per-channel ``weight = class_weights``, mean over the
    C × (non-ignored voxels) elements. With ``focal_gamma``: :func:`reference_focal`.
    """
    if focal_gamma is not None:
        return reference_focal(
            logits, target, focal_gamma, focal_alpha, activation=activation,
            ignore_index=ignore_index, class_weights=class_weights,
            label_smoothing=label_smoothing, regions=regions,
        )  # fmt: skip
    C = logits.shape[1]
    g, mask, labels = reference_target(logits, target, ignore_index=ignore_index, regions=regions)
    g, mask = g.to(logits.dtype), mask.to(logits.dtype)
    if activation == "softmax":
        w = None if class_weights is None else _per_class(class_weights, C, logits)
        if labels is None:  # a soft target: torch's probabilities form
            return F.cross_entropy(logits, g, weight=w, label_smoothing=label_smoothing)
        kept = labels != -100
        wsum = (w[labels.clamp(0, C - 1)] * kept).sum() if w is not None else kept.sum()
        if wsum == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(
            logits, labels, weight=w, ignore_index=-100, label_smoothing=label_smoothing
        )
    if activation == "sigmoid":
        shape = (1, C) + (1,) * (logits.dim() - 2)
        w = mask.expand_as(logits)
        if class_weights is not None:
            w = w * _per_class(class_weights, C, logits).view(shape)
        n = mask.sum() * C
        if n == 0:
            return logits.sum() * 0.0
        bce = F.binary_cross_entropy_with_logits(logits, g, weight=w, reduction="sum")
        return bce / n
    raise ValueError(f"no cross-entropy for activation={activation!r}")


def reference_focal(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float,
    alpha: float | None = None,
    *,
    activation: str = "softmax",
    ignore_index: int | None = None,
    class_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    regions: Sequence | None = None,
) -> torch.Tensor:
    """MONAI's ``FocalLoss(gamma, alpha, weight=class_weights, use_softmax=(activation ==
    "softmax"), reduction="mean")`` on the one-hot / soft / region target, written out:
    softmax ``−(1 − p_c)^γ·q_c·log p_c`` (class 0 times 1 − α, the others α; q smoothed
    as ``(1 − ε) q + ε / C``), sigmoid ``exp(γ·logsigmoid(−x·(2q − 1)))·BCE(x, q)``
    times ``α q + (1 − α)(1 − q)``; times the class weight, summed over the non-ignored
    voxels and divided by C × their number."""
    C = logits.shape[1]
    g, mask, _ = reference_target(logits, target, ignore_index=ignore_index, regions=regions)
    g, mask = g.to(logits.dtype), mask.to(logits.dtype)
    shape = (1, C) + (1,) * (logits.dim() - 2)
    if activation == "softmax":
        q = ((1 - label_smoothing) * g + label_smoothing / C) * mask
        logp = logits.log_softmax(1)
        loss = -((1 - logp.exp()) ** gamma) * logp * q
        if alpha is not None:
            fac = torch.tensor([1 - alpha] + [alpha] * (C - 1), dtype=logits.dtype)
            loss = loss * fac.view(shape)
    elif activation == "sigmoid":
        bce = logits - logits * g - F.logsigmoid(logits)
        loss = torch.exp(gamma * F.logsigmoid(-logits * (2 * g - 1))) * bce
        if alpha is not None:
            loss = loss * (alpha * g + (1 - alpha) * (1 - g))
        loss = loss * mask
    else:
        raise ValueError(f"no focal loss for activation={activation!r}")
    if class_weights is not None:
        loss = loss * _per_class(class_weights, C, logits).view(shape)
    n = mask.sum() * C
    if n == 0:
        return logits.sum() * 0.0
    return loss.sum() / n

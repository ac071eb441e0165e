"""nnU-Net 2.8's ``DC_and_CE_loss.forward``, ``DC_and_BCE_loss.forward`` and its soft
Dice, step by step, in plain torch, and ``Tversky_and_CE_loss`` / ``Tversky_and_BCE_loss``
in plain torch: the losses' slower path (NaN in, NaN out; nnU-Net's errors). Each
function takes the loss module for its options."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dc_and_ce_forward(loss, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """nnU-Net 2.8's ``DC_and_CE_loss.forward``."""
    if loss.ignore_label is not None:
        assert target.shape[1] == 1, (
            "ignore label is not implemented for one hot encoded target variables (DC_and_CE_loss)"
        )
        mask = target != loss.ignore_label
        target_dice = torch.where(mask, target, 0)
        num_fg = mask.sum()
    else:
        target_dice = target
        mask = None
    if loss.weight_dice == 0:
        dc_loss = 0
    elif loss.dc is not None:
        dc_loss = loss.dc(x, target_dice, loss_mask=mask)
    else:
        dc_loss = soft_dice(loss, x, target_dice, mask)
    if loss.weight_ce != 0 and (loss.ignore_label is None or num_fg > 0):
        t = target[:, 0]
        if t.ndim == x.ndim:  # RobustCrossEntropyLoss drops a remaining channel dim
            t = t[:, 0]
        ce_loss = loss.ce(x, t.long())
    else:
        ce_loss = 0
    return loss.weight_ce * ce_loss + loss.weight_dice * dc_loss


def _onehot_sum_gt(loss, x, y, loss_mask):
    """nnU-Net's no-grad part: the one-hot target (background dropped) and Σ g."""
    axes = tuple(range(2, x.ndim))
    with torch.no_grad():
        if x.ndim != y.ndim:
            y = y.view((y.shape[0], 1, *y.shape[1:]))
        if x.shape == y.shape:
            y_onehot = y.to(torch.float32)
        else:
            y_onehot = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
            y_onehot.scatter_(1, y.long(), 1)
        if not loss.do_bg:
            y_onehot = y_onehot[:, 1:]
        m = 1 if loss_mask is None else loss_mask
        sum_gt = (y_onehot * m).sum(axes, dtype=torch.float32)
    return y_onehot, sum_gt


def soft_dice(loss, x, y, loss_mask, nonlin=None):
    """nnU-Net's ``MemoryEfficientSoftDiceLoss.forward`` (no DDP gather), or with
    ``clip_tp`` its ``SoftDiceLoss`` (same value otherwise); ``nonlin`` its
    ``apply_nonlin`` (softmax over dim 1 by default)."""
    x = torch.softmax(x, 1) if nonlin is None else nonlin(x)
    axes = tuple(range(2, x.ndim))
    y_onehot, sum_gt = _onehot_sum_gt(loss, x, y, loss_mask)
    if not loss.do_bg:
        x = x[:, 1:]
    m = 1 if loss_mask is None else loss_mask
    intersect = (x * y_onehot * m).sum(axes, dtype=torch.float32)
    sum_pred = (x * m).sum(axes, dtype=torch.float32)
    if loss.batch_dice:
        intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
    clip_tp = loss.soft_dice_kwargs.get("clip_tp")
    if clip_tp is not None:
        fp_fn = sum_pred + sum_gt - 2 * intersect
        intersect = torch.clip(intersect, min=clip_tp)
        dc = (2 * intersect + loss.smooth) / torch.clip(2 * intersect + fp_fn + loss.smooth, 1e-8)
    else:
        denom = (sum_gt + sum_pred + float(loss.smooth)).clamp_min(1e-8)
        dc = (2 * intersect + loss.smooth) / denom
    return -dc.mean()


def tversky_and_ce_forward(loss, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``Tversky_and_CE_loss`` in plain torch."""
    keep = None if loss.ignore_label is None else labels != loss.ignore_label
    lab = labels if keep is None else torch.where(keep, labels, 0)
    p = torch.softmax(x, 1)
    g = torch.zeros_like(p).scatter_(1, lab.long(), 1)
    if keep is not None:
        p, g = p * keep, g * keep
    if not loss.do_bg:
        p, g = p[:, 1:], g[:, 1:]
    axes = tuple(range(2, x.ndim))
    if loss.batch_dice:
        axes = (0, *axes)
    tp = (p * g).sum(axes)
    fp, fn = p.sum(axes) - tp, g.sum(axes) - tp
    t = (tp + loss.smooth) / (tp + loss.alpha * fp + loss.beta * fn + loss.smooth)
    out = loss.weight_tversky * (1 - t).mean()
    if loss.weight_ce != 0 and (keep is None or bool(keep.any())):
        ii = -100 if loss.ignore_label is None else loss.ignore_label
        out = out + loss.weight_ce * F.cross_entropy(x, labels[:, 0].long(), ignore_index=ii)
    return out.to(torch.promote_types(x.dtype, torch.float32))


def dc_and_bce_forward(loss, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """nnU-Net 2.8's ``DC_and_BCE_loss.forward`` on its region target (B, R[+1], ...)."""
    if loss.use_ignore_label:
        mask = ~target[:, -1:] if target.dtype == torch.bool else (1 - target[:, -1:]).bool()
        target_regions = target[:, :-1]
    else:
        target_regions, mask = target, None
    if loss.dc is not None:
        dc_loss = loss.dc(x, target_regions, loss_mask=mask)
    else:
        dc_loss = soft_dice(loss, x, target_regions, mask, nonlin=torch.sigmoid)
    target_regions = target_regions.float()
    if mask is not None:
        ce = loss.ce(x, target_regions)  # reduction="none", as nnU-Net sets it
        ce_loss = (ce * mask).sum() / torch.clip(mask.sum(), min=1e-8)
    else:
        ce_loss = loss.ce(x, target_regions)
    return loss.weight_ce * ce_loss + loss.weight_dice * dc_loss


def tversky_and_bce_forward(loss, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``Tversky_and_BCE_loss`` in plain torch, on the region target (B, R[+1], ...)
    (with an ignore label, its last channel marks the ignored voxels)."""
    if loss.ignore_label is not None:
        keep, g = ~target[:, -1:].bool(), target[:, :-1].float()
    else:
        keep, g = torch.ones_like(target[:, :1], dtype=torch.bool), target.float()
    p = torch.sigmoid(x) * keep
    g = g * keep
    if not loss.do_bg and x.shape[1] > 1:
        p, g = p[:, 1:], g[:, 1:]
    axes = tuple(range(2, x.ndim))
    if loss.batch_dice:
        axes = (0, *axes)
    tp = (p * g).sum(axes)
    fp, fn = p.sum(axes) - tp, g.sum(axes) - tp
    t = (tp + loss.smooth) / (tp + loss.alpha * fp + loss.beta * fn + loss.smooth)
    out = loss.weight_tversky * (1 - t).clamp_min(0).mean()
    if loss.weight_ce != 0:
        bce = F.binary_cross_entropy_with_logits(
            x, target[:, : x.shape[1]].float(), reduction="none"
        )
        kept = keep.sum() * x.shape[1]
        bce = (bce * keep).sum() / kept.clamp_min(1)
        out = out + loss.weight_ce * bce
    return out.to(torch.promote_types(x.dtype, torch.float32))

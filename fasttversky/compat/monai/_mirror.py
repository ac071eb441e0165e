"""MONAI 1.6's ``TverskyLoss`` and ``DiceCELoss`` forwards, step by step, in plain torch.

The slower path of both drop-ins: whatever the fused kernels do not compute exactly as
MONAI does runs here, with MONAI's warnings, errors and NaNs. Each function takes the
drop-in module (``loss``) for its options, named as MONAI names them.
"""

from __future__ import annotations

import warnings

import torch
import torch.linalg as LA

SINGLE_CHANNEL = "single channel prediction, `{}` ignored."


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``monai.networks.one_hot(labels, num_classes)`` with dim=1: float32 scatter.

    Same shape rule (dim 1 must be 1, fewer dims are padded at the end) and the same
    error for labels outside [0, num_classes) (scatter's index check).
    """
    if labels.ndim < 2:
        labels = torch.reshape(labels, list(labels.shape) + [1] * (2 - labels.ndim))
    sh = list(labels.shape)
    if sh[1] != 1:
        raise AssertionError("labels should have a channel with length equal to one.")
    sh[1] = num_classes
    out = torch.zeros(size=sh, dtype=torch.float, device=labels.device)
    return out.scatter_(dim=1, index=labels.long(), value=1)


def ignore_mask(y: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``monai.metrics.utils.create_ignore_mask``: (B, 1, *spatial), 1 = keep.

    A label map (1 channel) is compared with ``ignore_index``; a one-hot target masks
    voxels whose ignored channel is set, or, for a sentinel value outside [0, C), voxels
    whose channels are all zero.
    """
    if y.shape[1] == 1:
        return (y != ignore_index).float()
    num_classes = y.shape[1]
    if 0 <= ignore_index < num_classes:
        return 1.0 - y[:, ignore_index : ignore_index + 1]
    return (y.sum(dim=1, keepdim=True) > 0).float()


def tp_fp_fn(p, g, reduce_axis, soft_label):
    """``monai.losses.utils.compute_tp_fp_fn(p, g, axis, ord=1, soft_label, decoupled=False)``.

    A bool ``g`` raises as in MONAI (``1 - g`` / ``vector_norm`` of a bool tensor).
    """
    if not soft_label:
        tp = torch.sum(p * g, dim=reduce_axis)
        fp = torch.sum(p * (1 - g), dim=reduce_axis)
        fn = torch.sum((1 - p) * g, dim=reduce_axis)
        return tp, fp, fn
    # Soft-label formulation (Wang et al. 2023): tp = (|p| + |g| - |p - g|) / 2.
    if not g.is_floating_point() and g.dtype != torch.bool:
        # MONAI raises here (vector_norm of an integer mask); a hard mask has one meaning.
        g = g.to(p.dtype)
    pred_o = LA.vector_norm(p, ord=1, dim=reduce_axis)
    ground_o = LA.vector_norm(g, ord=1, dim=reduce_axis)
    difference = LA.vector_norm(p - g, ord=1, dim=reduce_axis)
    tp = (pred_o + ground_o - difference) / 2
    return tp, pred_o - tp, ground_o - tp


def _warn(warn: bool, name: str) -> None:
    if warn:
        warnings.warn(SINGLE_CHANNEL.format(name), stacklevel=4)


def activation(loss, input, warn: bool) -> torch.Tensor:
    """MONAI's activation step, as its TverskyLoss and DiceLoss both run it: sigmoid,
    softmax over C > 1 channels (its warning for C = 1), then ``other_act``."""
    if loss.sigmoid:
        input = torch.sigmoid(input)
    if loss.softmax:
        if input.shape[1] == 1:
            _warn(warn, "softmax=True")
        else:
            input = torch.softmax(input, 1)
    if loss.other_act is not None:
        input = loss.other_act(input)
    return input


def drop_background(loss, input, target, n_pred_ch: int, warn: bool):
    """MONAI's ``include_background=False`` step (its warning for C = 1)."""
    if not loss.include_background:
        if n_pred_ch == 1:
            _warn(warn, "include_background=False")
        else:
            input, target = input[:, 1:], target[:, 1:]
    return input, target


def _reduce_axis(loss, ndim: int) -> list[int]:
    axes = list(range(2, ndim))
    return [0, *axes] if loss.batch else axes


def tversky_forward(loss, input, target, warn: bool = True) -> torch.Tensor:
    """MONAI 1.6's ``TverskyLoss.forward``."""
    n_pred_ch = input.shape[1]
    input = activation(loss, input, warn)
    original_target = target
    ii = loss.ignore_index
    if loss.to_onehot_y:
        if n_pred_ch == 1:
            _warn(warn, "to_onehot_y=True")
        else:
            if ii is not None and (ii < 0 or ii >= n_pred_ch):
                # a sentinel label becomes class 0 before one-hot; the mask removes it
                target = torch.where(target == ii, torch.zeros_like(target), target)
            target = one_hot(target, n_pred_ch)
    if ii is not None:
        mask = ignore_mask(original_target, ii)
        input, target = input * mask, target * mask
    input, target = drop_background(loss, input, target, n_pred_ch, warn)
    if target.shape != input.shape:
        raise AssertionError(
            f"ground truth has differing shape ({target.shape}) from input ({input.shape})"
        )
    tp, fp, fn = tp_fp_fn(input, target, _reduce_axis(loss, input.ndim), loss.soft_label)
    fp *= loss.alpha
    fn *= loss.beta
    score = 1.0 - (tp + loss.smooth_nr) / (tp + fp + fn + loss.smooth_dr)
    if loss.reduction == "sum":
        return torch.sum(score)
    if loss.reduction == "none":
        return score
    if loss.reduction == "mean":
        return torch.mean(score)
    raise ValueError(
        f'Unsupported reduction: {loss.reduction}, available options are ["mean", "sum", "none"].'
    )


def dice_ce_forward(loss, input, target, warn: bool = True) -> torch.Tensor:
    """MONAI 1.6's ``DiceCELoss.forward``."""
    if input.dim() != target.dim():
        raise ValueError(
            "the number of dimensions for input and target should be the same, "
            f"got shape {input.shape} (nb dims: {len(input.shape)}) and {target.shape} "
            f"(nb dims: {len(target.shape)}). if target is not one-hot encoded, please "
            "provide a tensor with shape B1H[WD]."
        )
    if target.shape[1] != 1 and target.shape[1] != input.shape[1]:
        raise ValueError(
            "number of channels for target is neither 1 (without one-hot encoding) nor "
            f"the same as input, got shape {input.shape} and {target.shape}."
        )
    dice = dice_forward(loss, input, target, warn)
    if input.shape[1] != 1:
        t = target
        if input.shape[1] != target.shape[1] and target.shape[1] == 1:
            t = torch.squeeze(target, dim=1).long()
        elif not torch.is_floating_point(target):
            t = target.to(dtype=input.dtype)
        ce = loss.cross_entropy(input, t)
    else:
        t = target if torch.is_floating_point(target) else target.to(dtype=input.dtype)
        ce = loss.binary_cross_entropy(input, t)
    return loss.lambda_dice * dice + loss.lambda_ce * ce


def _dice_sums(loss, input, target):
    reduce_axis = _reduce_axis(loss, input.ndim)
    if not loss.squared_pred:
        tp = torch.sum(input * target, dim=reduce_axis)
        return tp, torch.sum(input, dim=reduce_axis) - tp, torch.sum(target, dim=reduce_axis) - tp
    # MONAI's L2 form: |p|², |g|², |p - g|²
    pred_o = LA.vector_norm(input, ord=2, dim=reduce_axis) ** 2
    ground_o = LA.vector_norm(target, ord=2, dim=reduce_axis) ** 2
    difference = LA.vector_norm(input - target, ord=2, dim=reduce_axis) ** 2
    tp = (pred_o + ground_o - difference) / 2
    return tp, pred_o - tp, ground_o - tp


def _dice_weight(loss, num_of_classes: int):
    """MONAI's DiceLoss class weight (without the background when it is left out)."""
    w = loss.weight
    if w is not None and not loss.include_background:
        w = w[1:]
    if w is None or num_of_classes == 1:
        return None
    if w.ndim == 0:
        w = torch.as_tensor([w] * num_of_classes)
    elif w.shape[0] != num_of_classes:
        raise ValueError(
            "The length of the `weight` sequence should be the same as the number of "
            "classes. If `include_background=False`, the weight should not include the "
            "background category class 0."
        )
    if w.min() < 0:
        raise ValueError("the value/values of the `weight` should be no less than 0.")
    return w


def dice_forward(loss, input, target, warn):
    """MONAI 1.6's ``DiceLoss.forward`` (no ignore_index: DiceCELoss passes none)."""
    n_pred_ch = input.shape[1]
    input = activation(loss, input, warn)
    if loss.to_onehot_y:
        if n_pred_ch == 1:
            _warn(warn, "to_onehot_y=True")
        else:
            target = one_hot(target, n_pred_ch)
    input, target = drop_background(loss, input, target, n_pred_ch, warn)
    if target.shape != input.shape:
        raise AssertionError(
            f"ground truth has different shape ({target.shape}) from input ({input.shape})"
        )
    tp, fp, fn = _dice_sums(loss, input, target)
    if not loss.jaccard:
        fp = fp * 0.5
        fn = fn * 0.5
    f = 1 - (2 * tp + loss.smooth_nr) / (2 * (tp + fp + fn) + loss.smooth_dr)
    w = _dice_weight(loss, target.shape[1])
    if w is not None:
        f = f * w.to(f)
    return torch.mean(f) if loss.reduction == "mean" else torch.sum(f)

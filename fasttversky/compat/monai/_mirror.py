"""MONAI 1.6's ``TverskyLoss``, ``DiceLoss``, ``GeneralizedDiceLoss`` and ``DiceCELoss``
forwards, step by step, in plain torch.

The slower path of the drop-ins: whatever the fused kernels do not compute exactly as
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


def _onehot_target(loss, target, n_pred_ch: int, ii, warn: bool):
    """MONAI's ``to_onehot_y`` step (its warning for C = 1); with an ``ignore_index``
    outside [0, C) that sentinel becomes class 0 first (the ignore mask removes it)."""
    if not loss.to_onehot_y:
        return target
    if n_pred_ch == 1:
        _warn(warn, "to_onehot_y=True")
        return target
    if ii is not None and (ii < 0 or ii >= n_pred_ch):
        target = torch.where(target == ii, torch.zeros_like(target), target)
    return one_hot(target, n_pred_ch)


def _reduce_axis(loss, ndim: int) -> list[int]:
    axes = list(range(2, ndim))
    return [0, *axes] if loss.batch else axes


def tversky_forward(loss, input, target, warn: bool = True) -> torch.Tensor:
    """MONAI 1.6's ``TverskyLoss.forward``."""
    n_pred_ch = input.shape[1]
    input = activation(loss, input, warn)
    original_target = target
    ii = loss.ignore_index
    target = _onehot_target(loss, target, n_pred_ch, ii, warn)
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
    """``compute_tp_fp_fn(input, target, axis, ord, soft_label, decoupled=True)`` as
    MONAI's DiceLoss calls it: ord 2 for ``squared_pred``."""
    reduce_axis = _reduce_axis(loss, input.ndim)
    ord = 2 if loss.squared_pred else 1
    if ord == 1 and not getattr(loss, "soft_label", False):
        tp = torch.sum(input * target, dim=reduce_axis)
        return tp, torch.sum(input, dim=reduce_axis) - tp, torch.sum(target, dim=reduce_axis) - tp
    # MONAI's norm form: |p|^ord, |g|^ord, |p - g|^ord
    pred_o = LA.vector_norm(input, ord=ord, dim=reduce_axis) ** ord
    ground_o = LA.vector_norm(target, ord=ord, dim=reduce_axis) ** ord
    difference = LA.vector_norm(input - target, ord=ord, dim=reduce_axis) ** ord
    tp = (pred_o + ground_o - difference) / 2
    return tp, pred_o - tp, ground_o - tp


def _dice_weight(loss, num_of_classes: int):
    """DiceCELoss's Dice class weight: its ``weight`` without the background when left out."""
    w = loss.weight
    if w is not None and not loss.include_background:
        w = w[1:]
    return class_weight(w, num_of_classes)


def class_weight(w, num_of_classes: int):
    """MONAI's DiceLoss ``class_weight`` check and expansion (None for one channel)."""
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


def reduce_like_dice(f: torch.Tensor, reduction: str, ndim: int) -> torch.Tensor:
    """MONAI's DiceLoss reduction; "none" keeps a broadcastable (B, C, 1, ...) shape."""
    if reduction == "mean":
        return torch.mean(f)
    if reduction == "sum":
        return torch.sum(f)
    if reduction == "none":
        return f.view(list(f.shape[0:2]) + [1] * (ndim - 2))
    raise ValueError(
        f'Unsupported reduction: {reduction}, available options are ["mean", "sum", "none"].'
    )


def _dice_inputs(loss, input, target, ii, warn: bool, differ: str):
    """MONAI's Dice losses' first steps: activation, one-hot, background, shape check
    (``differ`` is the word of the class's own error message)."""
    n_pred_ch = input.shape[1]
    input = activation(loss, input, warn)
    target = _onehot_target(loss, target, n_pred_ch, ii, warn)
    input, target = drop_background(loss, input, target, n_pred_ch, warn)
    if target.shape != input.shape:
        raise AssertionError(
            f"ground truth has {differ} shape ({target.shape}) from input ({input.shape})"
        )
    return input, target


def dice_loss_forward(loss, input, target, warn: bool = True) -> torch.Tensor:
    """MONAI 1.6's ``DiceLoss.forward`` with every option (ignore_index, soft_label)."""
    original_target, ii = target, loss.ignore_index
    input, target = _dice_inputs(loss, input, target, ii, warn, "different")
    if ii is not None:
        mask = ignore_mask(original_target, ii)
        input, target = input * mask, target * mask
    tp, fp, fn = _dice_sums(loss, input, target)
    if not loss.jaccard:
        fp, fn = fp * 0.5, fn * 0.5
    f = 1 - (2 * tp + loss.smooth_nr) / (2 * (tp + fp + fn) + loss.smooth_dr)
    w = class_weight(loss.class_weight, target.shape[1])
    if w is not None:
        f = f * w.to(f)
    return reduce_like_dice(f, loss.reduction, input.ndim)


def generalized_dice_forward(loss, input, target, warn: bool = True) -> torch.Tensor:
    """MONAI 1.6's ``GeneralizedDiceLoss.forward``."""
    input, target = _dice_inputs(loss, input, target, None, warn, "differing")
    reduce_axis = _reduce_axis(loss, input.ndim)
    tp, fp, fn = tp_fp_fn(input, target, reduce_axis, loss.soft_label)
    denominator = 2 * (tp + 0.5 * fp + 0.5 * fn)
    ground_o = torch.sum(target, reduce_axis).float()
    w = {"simple": ground_o.reciprocal(), "square": (ground_o * ground_o).reciprocal()}.get(
        loss.w_type, torch.ones_like(ground_o)
    )
    infs = torch.isinf(w)
    w[infs] = 0.0
    w = w + infs * (torch.max(w) if loss.batch else torch.max(w, dim=1)[0].unsqueeze(dim=1))
    dim = 0 if loss.batch else 1
    numer = 2.0 * (tp * w).sum(dim, keepdim=True) + loss.smooth_nr
    denom = (denominator * w).sum(dim, keepdim=True) + loss.smooth_dr
    return reduce_like_dice(1.0 - numer / denom, loss.reduction, input.ndim)


def dice_forward(loss, input, target, warn):
    """MONAI 1.6's ``DiceLoss.forward`` (no ignore_index: DiceCELoss passes none)."""
    input, target = _dice_inputs(loss, input, target, None, warn, "different")
    tp, fp, fn = _dice_sums(loss, input, target)
    if not loss.jaccard:
        fp = fp * 0.5
        fn = fn * 0.5
    f = 1 - (2 * tp + loss.smooth_nr) / (2 * (tp + fp + fn) + loss.smooth_dr)
    w = _dice_weight(loss, target.shape[1])
    if w is not None:
        f = f * w.to(f)
    return torch.mean(f) if loss.reduction == "mean" else torch.sum(f)

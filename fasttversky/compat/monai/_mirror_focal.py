"""MONAI 1.6's ``FocalLoss`` and ``DiceFocalLoss`` forwards, step by step, in plain torch.

The slower path of the focal drop-ins (their warnings, errors and NaNs included), with
one deliberate difference: MONAI casts the focal term's inputs to float32
(``input.float()``); here they are cast to ``promote_types(dtype, float32)``, so a
float64 call keeps float64 precision, as the fused path does. The result is then cast to
the dtype MONAI returns (float32 for ``FocalLoss``).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ._mirror import SINGLE_CHANNEL, dice_loss_forward, ignore_mask, one_hot

SCALAR_ALPHA_IGNORED = "`include_background=False`, scalar `alpha` ignored when using softmax."


def _warn(warn: bool, message: str) -> None:
    if warn:
        warnings.warn(message, stacklevel=4)


def _alpha_tensor(alpha, x: torch.Tensor) -> torch.Tensor:
    if isinstance(alpha, torch.Tensor):
        return alpha.to(device=x.device, dtype=x.dtype)
    return torch.tensor(alpha, device=x.device, dtype=x.dtype)


def _alpha_length(alpha_t, C: int) -> None:
    if alpha_t.shape[0] != C:
        raise ValueError(
            f"The length of alpha ({alpha_t.shape[0]}) must match the number of classes ({C})."
        )


def softmax_focal(x, t, gamma, alpha) -> torch.Tensor:
    """``monai.losses.focal_loss.softmax_focal_loss``: -α_c (1 - p)^γ log p · t."""
    ls = x.log_softmax(1)
    loss = -(1 - ls.exp()).pow(gamma) * ls * t
    if alpha is None:
        return loss
    alpha_t = _alpha_tensor(alpha, x)
    if alpha_t.ndim == 0:  # (1 - α) for the background, α for the other classes
        a = alpha_t.item()
        fac = torch.tensor([1 - a] + [a] * (t.shape[1] - 1)).to(loss)
    else:
        _alpha_length(alpha_t, t.shape[1])
        fac = alpha_t
    return fac.view([-1] + [1] * len(t.shape[2:])) * loss


def sigmoid_focal(x, t, gamma, alpha) -> torch.Tensor:
    """``monai.losses.focal_loss.sigmoid_focal_loss``: BCE · σ(-x(2t - 1))^γ · α-factor."""
    loss = x - x * t - F.logsigmoid(x)
    loss = (F.logsigmoid(-x * (t * 2 - 1)) * gamma).exp() * loss
    if alpha is None:
        return loss
    alpha_t = _alpha_tensor(alpha, x)
    if alpha_t.ndim == 0:
        fac = t * alpha_t + (1 - t) * (1 - alpha_t)
    else:  # per class, on the positives only
        _alpha_length(alpha_t, t.shape[1])
        alpha_t = alpha_t.view([-1] + [1] * len(t.shape[2:]))
        fac = torch.where(t == 1, alpha_t, torch.ones_like(alpha_t))
    return fac * loss


def _class_weighted(loss: torch.Tensor, class_weight) -> torch.Tensor:
    """FocalLoss's ``class_weight`` step: its checks (and errors), then the product."""
    if class_weight is None:
        return loss
    cw = torch.as_tensor(class_weight, device=loss.device, dtype=loss.dtype)
    C = loss.shape[1]
    if cw.ndim > 0:
        if C == 1:
            raise ValueError("Per-class class_weight is not supported for single-channel outputs.")
        if cw.numel() != C:
            raise ValueError(
                f"The number of class_weight ({cw.numel()}) must match the number of "
                f"output channels ({C})."
            )
        if (cw < 0).any():
            raise ValueError("class_weight values must be non-negative.")
        return loss * cw.view([1, C] + [1] * (loss.ndim - 2))
    if cw < 0:
        raise ValueError("class_weight values must be non-negative.")
    return loss * cw


def _reduce(loss, mask, reduction: str, ndim: int) -> torch.Tensor:
    spatial = list(range(2, ndim))
    if reduction == "sum":  # MONAI: the mean over space, summed over batch and classes
        if mask is not None:
            eps = torch.finfo(mask.dtype).eps
            loss = loss.sum(dim=spatial, keepdim=True) / mask.sum(dim=spatial, keepdim=True).clamp(
                min=eps
            )
        else:
            loss = loss.mean(dim=spatial)
        return loss.sum()
    if reduction == "mean":
        if mask is not None:
            return loss.sum() / mask.sum().clamp(min=torch.finfo(mask.dtype).eps)
        return loss.mean()
    if reduction == "none":
        return loss
    raise ValueError(
        f'Unsupported reduction: {reduction}, available options are ["mean", "sum", "none"].'
    )


def _focal_inputs(loss, input, target, warn: bool):
    """FocalLoss's one-hot, background and ignore-mask steps (its warnings and errors)."""
    n_pred_ch, ii = input.shape[1], loss.ignore_index
    original_target = target
    if loss.to_onehot_y:
        if n_pred_ch == 1:
            _warn(warn, SINGLE_CHANNEL.format("to_onehot_y=True"))
        else:
            if ii is not None and (ii < 0 or ii >= n_pred_ch):
                target = torch.where(target == ii, torch.zeros_like(target), target)
            target = one_hot(target, n_pred_ch)
    if not loss.include_background:
        if n_pred_ch == 1:
            _warn(warn, SINGLE_CHANNEL.format("include_background=False"))
        else:
            target, input = target[:, 1:], input[:, 1:]
    mask = None if ii is None else ignore_mask(original_target, ii)
    if target.shape != input.shape:
        raise ValueError(
            f"ground truth has different shape ({target.shape}) from input ({input.shape})"
        )
    if mask is not None:
        input, target = input * mask, target * mask
    return input, target, mask


def focal_forward(loss, input, target, warn: bool = True, cast: bool = True) -> torch.Tensor:
    """MONAI 1.6's ``FocalLoss.forward`` (computed in at least float32, see the module doc;
    ``cast``: the result in MONAI's float32, else in the dtype it was computed in)."""
    input, target, mask = _focal_inputs(loss, input, target, warn)
    dt = torch.promote_types(input.dtype, torch.float32)
    x, t = input.to(dt), target.to(dt)
    alpha = loss.alpha
    if loss.use_softmax:
        if not loss.include_background and isinstance(alpha, (float, int)):
            alpha = None
            _warn(warn, SCALAR_ALPHA_IGNORED)
        out = softmax_focal(x, t, loss.gamma, alpha)
    else:
        out = sigmoid_focal(x, t, loss.gamma, alpha)
    if mask is not None:
        out = out * mask
    out = _class_weighted(out, loss.class_weight)
    out = _reduce(out, mask, loss.reduction, t.ndim)
    # MONAI's float32 result, promoted by its ignore mask (float64 from a float64 one-hot)
    monai_dtype = torch.float32 if mask is None else torch.promote_types(mask.dtype, torch.float32)
    return out.to(monai_dtype) if cast else out


def dice_focal_forward(loss, input, target, warn: bool = True) -> torch.Tensor:
    """MONAI 1.6's ``DiceFocalLoss.forward``: its checks, one-hot step, then its DiceLoss
    and FocalLoss (``loss.dice``/``loss.focal`` hold their options) on the same target."""
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
    if loss.to_onehot_y:
        if input.shape[1] == 1:
            _warn(warn, SINGLE_CHANNEL.format("to_onehot_y=True"))
        else:
            target = one_hot(target, input.shape[1])
    dice = dice_loss_forward(loss.dice, input, target, warn)
    focal = focal_forward(loss.focal, input, target, warn, cast=False)
    return loss.lambda_dice * dice + loss.lambda_focal * focal

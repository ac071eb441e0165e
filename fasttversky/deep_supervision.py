"""Deep supervision: the weighted sum of the (compound) loss over several output scales.

nnU-Net-style: the network returns logits at several resolutions (highest first); each
scale is compared with the label map brought to its size by nearest-neighbour selection
(nnU-Net v2's ``DownsampleSegForDSTransform`` resizes the label map with
``F.interpolate(mode="nearest-exact")``; here the same voxels are picked by index, on
the integer labels, so no float copy and no one-hot is made), and the per-scale losses
are summed with weights 1/2^i, the lowest scale's set to 0, normalised to sum 1.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from .errors import InvalidInputError, InvalidInputTypeError
from .functional import is_float_label_map, options_loss
from .options import TverskyOptions


def default_weights(n_scales: int) -> list[float]:
    """nnU-Net's deep-supervision weights: 1/2^i, lowest scale 0, normalised to sum 1."""
    if n_scales < 1:
        raise InvalidInputError(f"n_scales must be >= 1, got {n_scales}")
    if n_scales == 1:
        return [1.0]
    w = [1.0 / 2**i for i in range(n_scales)]
    w[-1] = 0.0
    total = sum(w)
    return [v / total for v in w]


def _nearest_exact_index(size_in: int, size_out: int, device) -> torch.Tensor:
    # F.interpolate(mode="nearest-exact") maps output voxel i to input voxel
    # floor((i + 0.5) * scale), scale = in / out in float32, clamped to the last one.
    scale = torch.tensor(size_in / size_out, dtype=torch.float32)
    i = torch.arange(size_out, dtype=torch.float32)
    idx = torch.floor((i + 0.5) * scale).to(torch.int64).clamp_max(size_in - 1)
    return idx.to(device)


def downsample_labels(target: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """A label map (B, *S) or (B, 1, *S) (integer or float) resized to (B, *spatial) by nearest
    selection, voxel for voxel as ``F.interpolate(target.float(), spatial,
    mode="nearest-exact")`` (nnU-Net v2), keeping the dtype. Returns ``target`` itself
    when the size already matches."""
    if target.dim() == len(spatial) + 2:
        target = target[:, 0]
    if tuple(target.shape[1:]) == tuple(spatial):
        return target
    out = target
    for d, size_out in enumerate(spatial):
        size_in = out.shape[1 + d]
        if size_in != size_out:
            out = out.index_select(1 + d, _nearest_exact_index(size_in, size_out, out.device))
    return out


def deep_supervision_loss(
    logits_list: Sequence[torch.Tensor],
    target: torch.Tensor | Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    options: TverskyOptions | None = None,
    **loss_kwargs,
) -> torch.Tensor:
    """Σ_i weights[i] · tversky_loss(logits_list[i], target_i, **loss_kwargs).

    Args:
        logits_list: logits (B, C, *spatial_i) at each scale, highest resolution first.
        target: the full-resolution label map (B, *spatial_0) or (B, 1, *spatial_0),
            integer or float — its spatial size must be the first scale's — resized to
            each scale by nearest selection (see :func:`downsample_labels`); or one
            target per scale (label maps or float soft targets), used as given.
        weights: one non-negative weight per scale, not all zero; default
            :func:`default_weights` (nnU-Net's). Scales of weight 0 are not computed.
        options, loss_kwargs: the loss's options, as for :func:`fasttversky.tversky_loss`
            (alpha, beta, ce_weight, ignore_index, backend, ...), the same at every scale.

    Returns:
        The weighted sum (a scalar, or the weighted sum of the per-scale "none"
        reductions when every scale has the same number of kept classes).
    """
    opts = TverskyOptions.of((), loss_kwargs, options)
    logits_list, weights = _checked_scales(logits_list, weights)
    targets = _per_scale_targets(target, logits_list, opts)
    total = None
    for x, t, w in zip(logits_list, targets, weights, strict=True):
        if w == 0.0:
            continue  # as nnU-Net's DeepSupervisionWrapper: no work for a zero weight
        if t is None:
            t = downsample_labels(target, x.shape[2:])
        term = w * options_loss(x, t, opts)
        total = term if total is None else total + term
    return total


def _checked_scales(logits_list, weights) -> tuple[list[torch.Tensor], list[float]]:
    if isinstance(logits_list, torch.Tensor) or not isinstance(logits_list, Sequence):
        raise InvalidInputTypeError(
            "logits_list must be a list or tuple of logits tensors, one per scale"
        )
    n = len(logits_list)
    if n == 0:
        raise InvalidInputError("logits_list is empty")
    for i, x in enumerate(logits_list):
        if not isinstance(x, torch.Tensor):
            raise InvalidInputTypeError(f"logits_list[{i}] must be a torch.Tensor, got {type(x)}")
    if weights is None:
        weights = default_weights(n)
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise InvalidInputTypeError(f"weights must be a sequence of numbers, got {weights!r}")
    if any(isinstance(w, bool) or not isinstance(w, numbers.Real) for w in weights):
        raise InvalidInputTypeError(f"weights must be real numbers, got {list(weights)}")
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise InvalidInputError(
            f"weights has {len(weights)} entries but logits_list has {n} scales"
        )
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise InvalidInputError(f"weights must be finite, >= 0 and not all zero, got {weights}")
    return list(logits_list), weights


def _per_scale_targets(target, logits_list, opts: TverskyOptions) -> list:
    """One target per scale, or None where the full-resolution label map (integer, or
    float shaped as a label map: see ``tversky_loss``) is resized."""
    n = len(logits_list)
    if not isinstance(target, torch.Tensor):
        targets = list(target)
        if len(targets) != n:
            raise InvalidInputError(f"target has {len(targets)} scales but logits_list has {n}")
        return targets
    if target.is_floating_point() and not is_float_label_map(target, logits_list[0], opts):
        raise InvalidInputError(
            "a single float target cannot be resized without interpolating "
            "probabilities; pass an integer label map or one target per scale"
        )
    first = logits_list[0]
    spatial = tuple(first.shape[2:])
    lead = (first.shape[0],) if target.dim() == first.dim() - 1 else (first.shape[0], 1)
    if tuple(target.shape) != (*lead, *spatial):
        raise InvalidInputError(
            f"target of shape {tuple(target.shape)} does not match the first scale's logits "
            f"{tuple(first.shape)}: a full-resolution label map (B, *spatial) or "
            f"(B, 1, *spatial) must have the first scale's spatial size {spatial}"
        )
    return [None] * n

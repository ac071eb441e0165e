"""What both drop-in families (MONAI, nnU-Net) share: the one call into the fused loss,
the slow-path warning, label conversion and argument checks.

Private to ``fasttversky.compat``; it imports only the core's public API.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

import fasttversky
from fasttversky.errors import InvalidInputTypeError

LABEL_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)


class SlowPathWarning(UserWarning):
    """A drop-in computed the original's result in plain torch, the slower path.

    ``compat.monai``: for every option or input that cannot be fused, once per loss
    instance and reason (see that package's docstring). ``compat.nnunet``: where the
    kernels refused the inputs' values (NaN logits, labels out of range), or the values
    are ones the original's own pipeline never produces."""


class Fallback(NamedTuple):
    """Why a call takes the original's computation instead of the fused kernels.

    ``explain`` reports every fallback. ``warn`` (``compat.nnunet``'s policy): its
    ``forward`` also says so with a :class:`SlowPathWarning`, for values the original's
    own pipeline never produces (nnU-Net's loader gives integer labels) -- a slower path
    the user would not expect; its other fallbacks follow from options and inputs the
    drop-in's docstring lists. ``compat.monai`` ignores ``warn``: it announces every
    fallback that returns a result, once per instance and reason.
    """

    reason: str
    warn: bool = False


# ------------------------------------------------------------------------------------
# the fused loss
# ------------------------------------------------------------------------------------
def loss_options(
    num_classes: int, *, clamp_terms: bool = False, **options
) -> fasttversky.TverskyOptions:
    """The fused loss's options for a call on ``num_classes`` classes, checked now (before
    any work), so that an option the plan let through by mistake raises instead of
    passing for a refusal of the inputs.

    By default with the originals' unclamped ``1 - T`` (``clamp_terms=False``): MONAI and
    nnU-Net sum ``1 - T`` (or ``-dc``) as it comes out, even below 0.
    """
    opts = fasttversky.TverskyOptions(clamp_terms=clamp_terms, **options)
    opts.validate(num_classes)
    return opts


def fused_loss(
    logits: torch.Tensor, target: torch.Tensor, options: fasttversky.TverskyOptions
) -> torch.Tensor:
    """``fasttversky.tversky_loss(logits, target, options=options)``."""
    return fasttversky.tversky_loss(logits, target, options=options)


def run_or_fall_back(
    fused: Callable[[], torch.Tensor],
    original: Callable[[], torch.Tensor],
    who: str,
    slow_path: Callable[[Exception, Callable[[], torch.Tensor]], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``fused()``, or, when the kernels refuse the inputs while running, ``original()``
    (the original's value or its error) with a :class:`SlowPathWarning` before it; or,
    where given, ``slow_path(refusal, original)``, which computes and announces it in its
    own way (``compat.monai``: once per instance and kind of refusal, after the result).

    The plan has checked the options, shapes and dtypes before this call, so what the
    kernels refuse here lies in the values: non-finite logits
    (``NonFiniteInputError``), labels outside [0, C) or a soft target outside [0, 1]
    (``InvalidInputError``), which the originals compute with or raise on in their own
    way; or a backend that cannot run these inputs. A wrong type cannot be a value:
    that is a bug here and raises.
    """
    try:
        return fused()
    except (fasttversky.InvalidInputError, fasttversky.BackendUnavailableError) as exc:
        if isinstance(exc, TypeError):
            raise
        refusal = exc
    if slow_path is not None:
        return slow_path(refusal, original)
    warnings.warn(
        f"{who}: {refused_reason(refusal)}; computing the original's result with the "
        "slower torch path.",
        SlowPathWarning,
        stacklevel=3,
    )
    return original()


def refused_reason(refusal: Exception) -> str:
    """The reason a SlowPathWarning gives for inputs the kernels refused while running."""
    return f"the fused kernels refused these inputs ({refusal})"


def retry_float_labels(
    run: Callable[[torch.Tensor | None], torch.Tensor],
    float_labels: torch.Tensor | None,
    need_integral: bool,
    quiet_original: Callable[[], torch.Tensor],
    backend: str,
) -> Callable[[], torch.Tensor]:
    """``fused()`` for :func:`run_or_fall_back`: ``run(None)`` runs the planned call.

    With ``float_labels`` (the float label map that call hands the kernels as it is, no
    conversion pass): when the kernels refuse it -- a label that is not an integer, which
    the originals' ``.long()`` truncates, or a backend that reads no float label maps --
    the labels are truncated to integers (:func:`float_labels_to_int`) and ``run(labels)``
    runs once more. Non-integral labels with ``need_integral`` (an ignore label that only
    unrounded values can match) give ``quiet_original()``: a documented fallback, which
    that function announces or not (no :class:`SlowPathWarning` from here). Any other
    refusal repeats on the second run and reaches the caller.
    With ``backend="auto"`` the labels are converted first where a backend that takes
    integer labels on this device reads no float ones (:func:`float_labels_keep_backend`).
    """

    def fused() -> torch.Tensor:
        if float_labels is None:
            return run(None)
        if backend != "auto" or float_labels_keep_backend(float_labels.device.type):
            try:
                return run(None)
            except (fasttversky.InvalidInputError, fasttversky.BackendUnavailableError) as exc:
                if isinstance(exc, TypeError):
                    raise
        labels = float_labels_to_int(float_labels, need_integral)
        if labels is None:
            return quiet_original()
        return run(labels)

    return fused


@functools.cache
def float_labels_keep_backend(device_type: str) -> bool:
    """Whether every backend that runs an integer label map on this device also reads
    float ones (probed once per device type on a tiny input, through the public API).

    Where one does not, ``backend="auto"`` would send a float label map to another,
    possibly much slower backend (the torch fallback), so the drop-ins convert the
    labels first: one cheap pass instead.
    """
    x = torch.zeros((1, 2, 2), device=device_type)
    ints = torch.zeros((1, 2), dtype=torch.uint8, device=device_type)
    refused = (fasttversky.InvalidInputError, fasttversky.BackendUnavailableError)
    for name, why in fasttversky.available_backends(device_type).items():
        if why is not None:
            continue
        try:
            fasttversky.tversky_loss(x, ints, backend=name)
        except refused:
            continue
        try:
            fasttversky.tversky_loss(x, ints.float(), backend=name)
        except refused:
            return False
    return True


def warn_fallback(plan: Fallback, who: str) -> None:
    if plan.warn:
        warnings.warn(
            f"{who}: {plan.reason}; computing the original's result with the slower torch path.",
            SlowPathWarning,
            stacklevel=3,
        )


# ------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------
def plain(t):
    """A MONAI MetaTensor as a plain tensor (an autograd-tracked alias, no copy).

    MetaTensor's ``__torch_function__`` would wrap the custom ops' outputs; the loss
    needs none of its metadata.
    """
    if type(t).__name__ == "MetaTensor" and hasattr(t, "as_tensor"):
        return t.as_tensor()
    return t


def float_labels_to_int(labels: torch.Tensor, need_integral: bool) -> torch.Tensor | None:
    """Float label map -> integer labels, truncated toward zero like ``.long()``.

    ``labels``: (B, 1, *spatial) float. Returns uint8 when every value is in [0, 255]
    (1 byte per voxel instead of 8), else int64; ``None`` when ``need_integral`` and a
    value is not an integer (then an unrounded comparison with an ignore label cannot
    be reproduced by a label map). Costs one reduction pass and one conversion.
    """
    # TODO(perf): two host syncs on CUDA (aminmax, integrality); label maps are small.
    if need_integral and bool((labels != labels.trunc()).any()):
        return None
    lo, hi = torch.aminmax(labels)
    if bool(lo >= 0) and bool(hi <= 255):  # NaN fails both and takes the int64 path
        return labels.to(torch.uint8)
    return labels.long()


def ce_weight_problem(weight: torch.Tensor, logits: torch.Tensor) -> str | None:
    """Why a cross-entropy class weight cannot be fused with these logits, or None.

    torch's cross-entropy (both originals') raises for a weight whose dtype is not the
    logits' and computes with negative, non-finite or all-zero weights, where the fused
    loss refuses them: those calls take the original's computation.
    """
    C = logits.shape[1]
    if weight.dim() != 1 or weight.shape[0] != C or weight.dtype != logits.dtype:
        return f"CE weight of shape {tuple(weight.shape)} and dtype {weight.dtype} for C={C}"
    vals = weight.tolist()  # TODO(perf): one host sync on CUDA; C values
    if not all(math.isfinite(v) and v >= 0 for v in vals) or not any(vals):
        return "a negative, non-finite or all-zero CE weight"
    return None


def weighted_ce_is_nan(labels: torch.Tensor, weight: torch.Tensor, ignore=None) -> bool:
    """True when torch's cross-entropy with class ``weight`` is 0/0 = NaN on ``labels``:
    some voxel's label is not ``ignore``, and none of those has a class of non-zero weight.

    That NaN is the originals' value where the fused CE, a mean over nothing, is 0.
    Labels outside [0, C) are the kernels' to refuse; only a zero weight needs the scan.
    """
    vals = weight.tolist()
    if all(vals):
        return False  # every voxel that is not ignored counts
    counted = [c for c, w in enumerate(vals) if w != 0 and c != ignore]
    # TODO(perf): one pass over the label map and a host sync, only for a zero weight.
    lab = labels.long()  # no uint8 wrap-around in the comparisons below
    ids = torch.tensor(counted, dtype=torch.int64, device=labels.device)
    if bool(torch.isin(lab, ids).any()):
        return False
    return ignore is None or bool((lab != ignore).any())


# ------------------------------------------------------------------------------------
# argument checks (the constructors call them on every argument they store): a wrong
# type is an InvalidInputTypeError (a TypeError, as MONAI's own checks raise, and a
# fasttversky.InvalidInputError), a value out of range a fasttversky.InvalidInputError
# ------------------------------------------------------------------------------------
def check_flag(name: str, value) -> bool:
    """A bool (or 0/1, numpy's bool); anything else is a TypeError naming ``name``."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise InvalidInputTypeError(f"{name} must be a bool, got {value!r}")


def check_real(name: str, value, *, tensor_ok: bool = False):
    """A real number (not a bool or str), or with ``tensor_ok`` a tensor; returned as given."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return value
    if tensor_ok and isinstance(value, torch.Tensor) and value.dtype != torch.bool:
        return value
    kind = "a real number or a tensor" if tensor_ok else "a real number"
    raise InvalidInputTypeError(f"{name} must be {kind}, got {value!r}")


def check_scalar(name: str, value) -> float:
    """A real number or a one-element tensor, as a float (MONAI's ``float(smooth_nr)``)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return float(check_real(name, value))


def check_index(name: str, value) -> int | None:
    """None or an integer (not a bool): a label to ignore."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    raise InvalidInputTypeError(f"{name} must be an int or None, got {value!r}")


def check_backend(value) -> str:
    """ "auto" or one of fasttversky's backends (the fused path's)."""
    names = ("auto", *fasttversky.BACKENDS)
    if not isinstance(value, str) or value not in names:
        raise fasttversky.InvalidInputError(f"backend must be one of {names}, got {value!r}")
    return value


def check_weight(name: str, value) -> torch.Tensor | None:
    """None or a tensor (what torch's losses register as a buffer)."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    kind = type(value).__name__
    raise InvalidInputTypeError(f"{name} must be a torch.Tensor or None, got {kind}")


def nonneg_real(v) -> bool:
    """A finite real number >= 0 (what the kernels take for a scalar option)."""
    return (
        isinstance(v, numbers.Real)
        and not isinstance(v, bool)
        and math.isfinite(float(v))
        and float(v) >= 0
    )

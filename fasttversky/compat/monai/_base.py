"""What the MONAI drop-ins share: the activation, one-hot, background, batch and
smoothing options, checked and stored once, and the one way they announce the slower
path (:func:`slow_path`)."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable

import torch
from torch.nn.modules.loss import _Loss

import fasttversky
from fasttversky.errors import InvalidInputTypeError

from .. import _common
from ._mirror import SINGLE_CHANNEL

# The reason a float label map with an ignore_index takes MONAI's computation: MONAI
# compares the unrounded values with ignore_index, which a label map cannot reproduce.
NON_INTEGER_LABELS = "non-integer float labels with ignore_index"

# Frames a SlowPathWarning is not attributed to: the drop-ins' and torch's Module call.
_INTERNAL_DIRS = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
    os.path.dirname(os.path.abspath(torch.nn.modules.module.__file__)) + os.sep,
)


def slow_path(
    loss, reason: str, compute: Callable[[], torch.Tensor], key: str | None = None
) -> torch.Tensor:
    """``compute()`` (MONAI's forward in plain torch) and, the first time the drop-in
    instance ``loss`` computes it for ``key`` (default: ``reason``), one
    :class:`SlowPathWarning` naming the class and ``reason`` (``explain()``'s text).

    Once per instance and reason: a training loop hears it on its first step, a new
    reason (another target dtype, say) is heard again. The warning follows a result:
    where the fallback only mirrors MONAI raising (shapes, dtypes or options MONAI
    rejects), MONAI's error comes alone. A warning the filters turn into an error is
    not marked as given, so it raises on every such call.
    """
    out = compute()
    given = loss.__dict__.setdefault("_slow_path_reasons", set())
    key = reason if key is None else key
    if key not in given:
        warnings.warn(
            f"{loss._who}: {reason}; computing MONAI's result with the slower torch path.",
            _common.SlowPathWarning,
            stacklevel=_caller_level(),
        )
        given.add(key)
    return out


def refused(loss) -> Callable[[Exception, Callable[[], torch.Tensor]], torch.Tensor]:
    """``_common.run_or_fall_back``'s ``slow_path`` for ``loss``: inputs the kernels
    refused while running, announced once per kind of refusal (the error's type), since
    its text holds counts that change from batch to batch (NaN logits in a diverging
    run would otherwise warn on every step)."""

    def announce(refusal: Exception, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        reason = _common.refused_reason(refusal)
        return slow_path(loss, reason, compute, key=f"refused: {type(refusal).__name__}")

    return announce


def _caller_level() -> int:
    """The ``stacklevel`` (for the caller of this function's caller) of the first frame
    outside the drop-ins and torch's ``Module.__call__``: the user's line."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


class MonaiLoss(_Loss):
    """Base of the MONAI drop-ins: MONAI's shared constructor arguments and warnings."""

    def _store_shared(
        self,
        *,
        include_background,
        to_onehot_y,
        sigmoid,
        softmax,
        other_act: Callable | None,
        smooth_nr,
        smooth_dr,
        batch,
        backend,
    ) -> None:
        """Check and store the options both MONAI constructors take, raising MONAI's
        errors (and a TypeError naming the argument for a value of the wrong type)."""
        if other_act is not None and not callable(other_act):
            raise InvalidInputTypeError(
                f"other_act must be None or callable but is {type(other_act).__name__}."
            )
        self.include_background = _common.check_flag("include_background", include_background)
        self.to_onehot_y = _common.check_flag("to_onehot_y", to_onehot_y)
        self.sigmoid = _common.check_flag("sigmoid", sigmoid)
        self.softmax = _common.check_flag("softmax", softmax)
        if int(self.sigmoid) + int(self.softmax) + int(other_act is not None) > 1:
            raise fasttversky.InvalidInputError(
                "Incompatible values: more than 1 of "
                "[sigmoid=True, softmax=True, other_act is not None]."
            )
        self.other_act = other_act
        self.smooth_nr = _common.check_scalar("smooth_nr", smooth_nr)
        self.smooth_dr = _common.check_scalar("smooth_dr", smooth_dr)
        self.batch = _common.check_flag("batch", batch)
        self.backend = _common.check_backend(backend)

    def _single_channel_warnings(self, n_pred_ch: int) -> None:
        """MONAI's warnings for one channel (text, order and category), on the fused path."""
        if n_pred_ch != 1:
            return
        if self.softmax:
            warnings.warn(SINGLE_CHANNEL.format("softmax=True"), stacklevel=3)
        if self.to_onehot_y:
            warnings.warn(SINGLE_CHANNEL.format("to_onehot_y=True"), stacklevel=3)
        if not self.include_background:
            warnings.warn(SINGLE_CHANNEL.format("include_background=False"), stacklevel=3)


def tensor_problem(input, target) -> str | None:
    """Why these tensors cannot reach the kernels whatever the options, or None."""
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        return "input and target must both be tensors"
    if not 3 <= input.dim() <= 5:
        return f"input has {input.dim() - 2} spatial dims; the kernels take 1-3"
    if input.numel() == 0 or target.numel() == 0:
        return "empty tensors"
    if not input.is_floating_point():
        return f"input dtype {input.dtype} is not floating point"
    if target.requires_grad:
        return "target requires grad; the fused path has no gradient w.r.t. the target"
    return None

"""``TverskyLoss`` with MONAI's constructor, defaults and values (see the package docstring)."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import NamedTuple

import torch

import fasttversky

from .. import _common
from .._common import Fallback
from . import _mirror
from ._base import NON_INTEGER_LABELS, MonaiLoss, refused, slow_path, tensor_problem

_REDUCTIONS = ("none", "mean", "sum")


class _FusedCall(NamedTuple):
    """Everything the fused path needs for one call."""

    input: torch.Tensor  # (B, C, *spatial) logits, or probabilities after other_act
    target: torch.Tensor  # label map (B, 1, *spatial) or float (B, C, *spatial)
    options: fasttversky.TverskyOptions  # checked for this call's C
    out_dtype: torch.dtype  # the dtype MONAI's result would have
    float_labels: bool  # target is a float label map the kernels read as it is


class TverskyLoss(MonaiLoss):
    """Tversky loss (Salehi et al. 2017) with ``monai.losses.TverskyLoss``'s interface.

    Same constructor, defaults and values as MONAI 1.6 (alpha weighs false positives,
    beta false negatives; both default to 0.5, i.e. the Dice loss), computed by the
    fused kernels where MONAI's semantics allow and by a MONAI-equivalent torch path
    otherwise (see ``fasttversky.compat.monai``'s docstring for which is which).

    ``forward(input, target)``:

    * ``input``: (B, C, *spatial) float, 1-3 spatial dims: logits (with ``sigmoid``,
      ``softmax`` or ``other_act``) or probabilities.
    * ``target``: with ``to_onehot_y=True`` a (B, 1, *spatial) label map (integer or
      float dtype); otherwise a (B, C, *spatial) one-hot / soft target (float, integer
      or, with an ``ignore_index``, bool: like MONAI, a bool target without one raises).
    * returns a scalar, or (B, C') / (C',) with ``reduction="none"`` (C' = classes kept),
      in the dtype MONAI would return.

    Args (MONAI's, in MONAI's order):
        include_background, to_onehot_y, sigmoid, softmax, other_act, alpha, beta,
        reduction, smooth_nr, smooth_dr, batch, soft_label, ignore_index: as in
        ``monai.losses.TverskyLoss``. Flags must be bools, alpha/beta/smoothing real
        numbers (alpha/beta may be tensors, as MONAI multiplies by them), ignore_index
        an int or None: anything else is a TypeError naming the argument.
        backend: fasttversky's backend for the fused path ("auto", "cpu", "torch",
            "triton", "cuda"); keyword-only and not in MONAI.
    """

    _who = "fasttversky.compat.monai.TverskyLoss"

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        alpha: float = 0.5,
        beta: float = 0.5,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        soft_label: bool = False,
        ignore_index: int | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        # MONAI accepts its LossReduction StrEnum or a str and stores the plain value.
        red = getattr(reduction, "value", reduction)
        if red not in _REDUCTIONS:
            raise fasttversky.InvalidInputError(f"{reduction!r} is not a valid LossReduction")
        super().__init__(reduction=red)
        self._store_shared(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            sigmoid=sigmoid,
            softmax=softmax,
            other_act=other_act,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
            backend=backend,
        )
        self.alpha = _common.check_real("alpha", alpha, tensor_ok=True)
        self.beta = _common.check_real("beta", beta, tensor_ok=True)
        self.soft_label = _common.check_flag("soft_label", soft_label)
        self.ignore_index = _common.check_index("ignore_index", ignore_index)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, target = _common.plain(input), _common.plain(target)
        plan = self._plan(input, target)
        if isinstance(plan, Fallback):
            return slow_path(
                self, plan.reason, lambda: _mirror.tversky_forward(self, input, target)
            )
        self._single_channel_warnings(input.shape[1])

        def run(labels):
            t = plan.target if labels is None else labels
            return _common.fused_loss(plan.input, t, plan.options).to(plan.out_dtype)

        original = lambda: _mirror.tversky_forward(self, input, target, warn=False)  # noqa: E731
        return run_fused(self, plan, run, original)

    def explain(self, input: torch.Tensor, target: torch.Tensor) -> str:
        """Which path ``forward(input, target)`` takes: ``"fused: ..."`` or ``"fallback: <why>"``.

        Data-dependent refusals (NaN, out-of-range targets) are only found while the
        kernels run and are not predicted here. Runs ``other_act`` if one is set.
        """
        plan = self._plan(_common.plain(input), _common.plain(target), scan=True)
        if isinstance(plan, Fallback):
            return f"fallback: {plan.reason}"
        o = plan.options
        return (
            f"fused: activation={o.activation!r}, target {tuple(plan.target.shape)} "
            f"{plan.target.dtype}, ignore_index={o.ignore_index}, backend={self.backend!r}"
        )

    # ----------------------------------------------------------------------------------
    def _plan(self, input, target, scan: bool = False) -> _FusedCall | Fallback:
        """The fused call equivalent to MONAI's forward on these inputs, or why there is none.

        Decided from metadata only, except for ``other_act``, which is applied here. A float
        label map goes to the kernels as it is; ``scan`` (``explain``) first checks its
        values the way the forward's retry would (``retry_float_labels``).
        """
        why = tensor_problem(input, target) or self._option_problem()
        if why is not None:
            return Fallback(why)
        C = input.shape[1]
        activation = "sigmoid" if self.sigmoid else "softmax" if self.softmax and C > 1 else "none"
        if self.soft_label and activation == "none":
            # |p| != p for negative inputs, and d|p - g|/dp = 0 at p == g.
            return Fallback(
                "soft_label=True without sigmoid/softmax (MONAI's L1 form needs p in (0, 1))"
            )
        x = input if self.other_act is None else self.other_act(input)
        if not isinstance(x, torch.Tensor) or x.shape != input.shape:
            return Fallback("other_act changed the input's shape")
        if not x.is_floating_point():
            return Fallback(f"other_act returned {x.dtype}")
        ii = None if self.ignore_index is None else operator.index(self.ignore_index)
        if self.to_onehot_y and C > 1:
            tgt = _label_map(target, x, ii, scan)
        elif C == 1:
            tgt = _mask(target, x, ii, self.soft_label)
        else:
            tgt = _onehot(target, x, ii, self.soft_label)
        if isinstance(tgt, Fallback):
            return tgt
        tgt, target_dtype = tgt
        # MONAI's result dtype: p * g promotes; its label-map ignore mask is float32.
        out_dtype = torch.promote_types(x.dtype, target_dtype)
        if ii is not None:
            out_dtype = torch.promote_types(out_dtype, torch.float32)
        float_labels = self.to_onehot_y and C > 1 and tgt.is_floating_point()
        return _FusedCall(x, tgt, self._options(C, activation, ii), out_dtype, float_labels)

    def _option_problem(self) -> str | None:
        if self.reduction not in _REDUCTIONS:
            return f"reduction {self.reduction!r} (MONAI raises)"
        for name in ("alpha", "beta", "smooth_nr", "smooth_dr"):
            if not _common.nonneg_real(getattr(self, name)):
                return f"{name}={getattr(self, name)!r}; the kernels take finite reals >= 0"
        ii = self.ignore_index
        if ii is not None and not hasattr(ii, "__index__"):
            return f"ignore_index={ii!r} is not an integer"
        return None

    def _options(self, C: int, activation: str, ignore_index: int | None):
        return _common.loss_options(
            C,
            alpha=float(self.alpha),
            beta=float(self.beta),
            activation=activation,
            include_background=self.include_background,
            batch=self.batch,
            reduction=self.reduction,
            smooth_nr=self.smooth_nr,
            smooth_dr=self.smooth_dr,
            ignore_index=ignore_index,
            backend=self.backend,
        )


# --------------------------------------------------------------------------------------
# the target as the kernels take it: (tensor, the dtype MONAI's target has) or why not
# --------------------------------------------------------------------------------------
def run_fused(loss, plan: _FusedCall, run, original) -> torch.Tensor:
    """``run(None)`` (the planned call), or MONAI's computation ``original()`` through
    :func:`slow_path` where the kernels refuse the inputs. A float label map they refuse
    is truncated like MONAI's ``one_hot`` (``.long()``) and run again, except where
    ``ignore_index`` compares the unrounded values (``_common.retry_float_labels``)."""
    labels = plan.target if plan.float_labels else None
    need_integral = plan.options.ignore_index is not None
    non_integer = lambda: slow_path(loss, NON_INTEGER_LABELS, original)  # noqa: E731
    backend = plan.options.backend
    fused = _common.retry_float_labels(run, labels, need_integral, non_integer, backend)
    return _common.run_or_fall_back(fused, original, loss._who, refused(loss))


def _label_map(target, x, ii, scan: bool):
    """``to_onehot_y=True`` with C > 1: a (B, 1, *spatial) label map MONAI one-hot encodes
    (a float one as it is, or with ``scan`` as the forward's retry would convert it)."""
    B, _, *spatial = x.shape
    if tuple(target.shape) != (B, 1, *spatial):
        return Fallback(
            f"label map of shape {tuple(target.shape)} (MONAI's one_hot wants (B, 1, *spatial))"
        )
    if target.is_floating_point() and not scan:
        labels = target
    elif target.is_floating_point():
        # Truncation equals MONAI's one_hot; with ignore_index MONAI also compares the
        # unrounded value, which a label map reproduces only for integers.
        labels = _common.float_labels_to_int(target, need_integral=ii is not None)
        if labels is None:
            return Fallback(NON_INTEGER_LABELS)
    elif target.dtype in _common.LABEL_DTYPES:
        labels = target
    else:
        return Fallback(f"label dtype {target.dtype}")
    return labels, torch.float32  # MONAI's one_hot is float32


def _mask(target, x, ii, soft_label):
    """C = 1: a (B, 1, *spatial) mask. Integer masks are label maps for the kernels
    (g = label == 1; labels outside {0, 1, ignore_index} are refused while running,
    sending the call to the mirror); float masks are soft targets."""
    if tuple(target.shape) != tuple(x.shape):
        return Fallback(f"target shape {tuple(target.shape)} != input shape (MONAI raises)")
    if target.dtype == torch.bool and ii is None:
        return Fallback("bool target (MONAI's 1 - target raises)")
    tgt = target
    if target.is_floating_point():
        if soft_label:
            return Fallback("soft_label=True with a float target (may be soft)")
        if ii is not None:
            tgt = _common.float_labels_to_int(target, need_integral=True)
            if tgt is None:
                return Fallback("non-integer float mask with ignore_index")
    elif target.dtype not in _common.LABEL_DTYPES:
        return Fallback(f"target dtype {target.dtype}")
    # with an ignore_index MONAI's mask turns a bool target into float32
    return tgt, torch.float32 if target.dtype == torch.bool else target.dtype


def _onehot(target, x, ii, soft_label):
    """C > 1 without to_onehot_y: a (B, C, *spatial) one-hot or soft target."""
    if tuple(target.shape) != tuple(x.shape):
        return Fallback(f"target shape {tuple(target.shape)} != input shape (MONAI raises)")
    if ii is not None:
        return Fallback("ignore_index with a one-hot target (MONAI masks from its channels)")
    if target.dtype == torch.bool:
        return Fallback("bool target (MONAI's 1 - target raises)")
    if target.is_floating_point():
        if soft_label:
            return Fallback("soft_label=True with a float target (may be soft)")
        return target, target.dtype
    if target.dtype in _common.LABEL_DTYPES:
        # 0/1 is exact in every float dtype; out-of-range values are refused by the
        # kernels while running and go to the mirror.
        return target.to(x.dtype), target.dtype
    return Fallback(f"target dtype {target.dtype}")

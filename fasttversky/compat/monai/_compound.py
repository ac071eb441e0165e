"""A MONAI compound loss (Dice + cross-entropy or focal term) as one or two fused calls.

MONAI's compound losses add a Dice term, computed on the activated input, and a
cross-entropy-family term, computed on the raw logits. When both see the same
probabilities (softmax Dice + softmax CE, sigmoid Dice + sigmoid BCE/focal), one fused
pass computes both. When they do not (MONAI's DiceFocalLoss always uses a *sigmoid*
focal term, whatever the Dice activation; DiceCELoss's softmax CE next to a sigmoid or
un-activated Dice), each term gets its own fused pass: still no one-hot and nothing
voxel-sized but the gradient, at about twice the cost of one pass.

The kernels' loss with ``reduction="sum"`` is ``S = Σ_{b,c} w_c f_bc + ce_weight · K``
(f the Tversky terms of the kept classes, K the kernels' CE-family mean). Each term of
MONAI's loss is a constant multiple of one of these two parts, so each call carries a
``scale`` and the CE part a ``ce_weight`` such that ``Σ scale · S`` is MONAI's value.

A call that needs only the CE-family term still computes the Tversky sums; it gets the
*null* Tversky term: alpha = beta = 0 and smooth_nr = smooth_dr = 1 make
``T = (TP + 1) / (TP + 0·FP + 0·FN + 1)`` exactly 1 in floating point, so the term
``1 - T`` is exactly 0 with exactly zero gradient (the kernels refuse all-zero class
weights, which would say the same).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

import fasttversky

from .. import _common
from .._common import Fallback
from ._base import NON_INTEGER_LABELS, refused, slow_path

_NULL_TVERSKY = dict(alpha=0.0, beta=0.0, smooth_nr=1.0, smooth_dr=1.0)


class DiceTerm(NamedTuple):
    """MONAI's Dice term = ``scale · Σ_{b,c} w_c f_bc`` over the kept classes."""

    input: torch.Tensor  # logits (activation applied in the kernels) or probabilities
    activation: str  # "softmax", "sigmoid" or "none"
    scale: float
    options: dict  # alpha, beta, smoothing, include_background, batch, class_weights


class CeTerm(NamedTuple):
    """MONAI's CE-family term = ``scale · K``, K the kernels' CE-family mean."""

    input: torch.Tensor  # raw logits
    activation: str  # "softmax" or "sigmoid"
    scale: float
    options: dict  # ce_class_weights, ce_label_smoothing, ce_focal_gamma, ce_focal_alpha


class KernelCall(NamedTuple):
    input: torch.Tensor
    options: fasttversky.TverskyOptions
    scale: float


class FusedPlan(NamedTuple):
    """The fused calls equal to MONAI's forward on one target."""

    calls: tuple[KernelCall, ...]
    target: torch.Tensor  # label map (B, 1, *spatial) or soft target (B, C, *spatial)
    out_dtype: torch.dtype  # the dtype MONAI's result would have
    float_labels: bool  # target is a float label map, read by the kernels as it is
    need_integral: bool = False  # an ignore label: non-integer float labels take MONAI's path


def dice_term(loss, input, lam: float, kept_weights) -> DiceTerm | None | Fallback:
    """``lam`` × MONAI's DiceLoss on ``input`` (options read from ``loss``: activation,
    background, batch, jaccard, smoothing, reduction "mean" or "sum") with the class
    weights ``kept_weights`` of the kept classes (or None), as a :class:`DiceTerm`; None
    when the term is 0 (``lam`` 0, or every weight 0)."""
    # MONAI: Dice = reduce_{b,c}(w_c · f_bc), f = 1 - (2TP + snr)/(2(TP + k FP + k FN) + sdr),
    # k = 1/2 (1 for jaccard): the Tversky term with alpha = beta = k and halved smoothing.
    B, C = input.shape[:2]
    n_kept = C - 1 if (not loss.include_background and C > 1) else C
    if lam == 0 or (kept_weights is not None and not any(kept_weights)):
        return None
    scale = float(lam)
    if loss.reduction == "mean":
        scale /= (1 if loss.batch else B) * n_kept
    k = 1.0 if loss.jaccard else 0.5
    weights = None
    if kept_weights is not None:  # the kernels take C weights; the background's is unused
        weights = (1.0,) * (C - n_kept) + tuple(kept_weights)
    options = dict(
        alpha=k,
        beta=k,
        include_background=loss.include_background,
        batch=loss.batch,
        smooth_nr=loss.smooth_nr / 2,
        smooth_dr=loss.smooth_dr / 2,
        class_weights=weights,
    )
    if loss.other_act is not None:
        x = loss.other_act(input)
        if not isinstance(x, torch.Tensor) or x.shape != input.shape or not x.is_floating_point():
            return Fallback("other_act changed the input's shape or dtype")
        return DiceTerm(x, "none", scale, options)
    act = "sigmoid" if loss.sigmoid else "softmax" if loss.softmax and C > 1 else "none"
    return DiceTerm(input, act, scale, options)


def kernel_calls(C: int, dice: DiceTerm | None, ce: CeTerm | None, backend: str):
    """The fused calls computing ``dice + ce`` (either may be None, not both)."""

    def options(**kw):
        return _common.loss_options(C, reduction="sum", backend=backend, **kw)

    if dice is not None and ce is not None and _shared_pass(dice, ce):
        opts = options(
            activation=dice.activation,
            ce_weight=ce.scale / dice.scale,
            **dice.options,
            **ce.options,
        )
        return (KernelCall(dice.input, opts, dice.scale),)
    calls = []
    if dice is not None:
        calls.append(
            KernelCall(dice.input, options(activation=dice.activation, **dice.options), dice.scale)
        )
    if ce is not None:
        opts = options(activation=ce.activation, ce_weight=ce.scale, **_NULL_TVERSKY, **ce.options)
        calls.append(KernelCall(ce.input, opts, 1.0))
    return tuple(calls)


def _shared_pass(dice: DiceTerm, ce: CeTerm) -> bool:
    return dice.activation == ce.activation and dice.input is ce.input


def run(plan: FusedPlan, target: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ scale · fused_loss(...)`` over the plan's calls, in MONAI's dtype."""
    t = plan.target if target is None else target
    total = None
    for call in plan.calls:
        value = call.scale * _common.fused_loss(call.input, t, call.options)
        total = value if total is None else total + value
    return total.to(plan.out_dtype)


def run_or_fall_back(plan: FusedPlan, original: Callable[[], torch.Tensor], loss) -> torch.Tensor:
    """``run(plan)``, or MONAI's computation ``original()`` through ``slow_path(loss, ...)``
    when the kernels refuse the inputs; a float label map they refuse is first truncated
    to integers like MONAI's ``one_hot`` (``.long()``) and run again, except where an
    ignore label compares the unrounded values (see ``_common.retry_float_labels``)."""
    labels = plan.target if plan.float_labels else None
    backend = plan.calls[0].options.backend
    non_integer = lambda: slow_path(loss, NON_INTEGER_LABELS, original)  # noqa: E731
    fused = _common.retry_float_labels(
        lambda t: run(plan, t), labels, plan.need_integral, non_integer, backend
    )
    return _common.run_or_fall_back(fused, original, loss._who, refused(loss))

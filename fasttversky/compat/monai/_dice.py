"""``DiceLoss`` and ``GeneralizedDiceLoss`` with MONAI's constructors, defaults and values.

Both are Tversky losses in disguise, so they reuse ``TverskyLoss``'s plan (activation,
targets, ignore_index, soft_label: which calls can be fused) and differ in three places:
MONAI's Dice ratio ``(2·TP + s_nr) / (2·TP + FP + FN + s_dr)`` is the Tversky index with
alpha = beta = 1/2 (1 for ``jaccard``) and half of each smoothing constant; the
generalized one weighs the classes inside the ratio (``TverskyOptions.generalized``);
and the class ``weight``, the reduction and the "none" shape are MONAI's DiceLoss's,
applied to the fused per-class terms.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fasttversky.errors import InvalidInputTypeError

from .. import _common
from .._common import Fallback
from . import _mirror
from ._base import slow_path
from ._tversky import TverskyLoss, run_fused

_W_TYPES = ("square", "simple", "uniform")


class _DiceBase(TverskyLoss):
    """The fused call is ``tversky_loss(..., reduction="none")``; MONAI's own reduction,
    weights and result shape are applied to its terms (``_finish``)."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, target = _common.plain(input), _common.plain(target)
        plan = self._plan(input, target)
        if isinstance(plan, Fallback):
            return slow_path(self, plan.reason, lambda: self._mirror(input, target))
        self._single_channel_warnings(input.shape[1])

        def run(labels):
            t = plan.target if labels is None else labels
            terms = _common.fused_loss(plan.input, t, plan.options)
            return self._finish(terms.to(plan.out_dtype), input.ndim)

        original = lambda: self._mirror(input, target, False)  # noqa: E731
        return run_fused(self, plan, run, original)

    def _options(self, C: int, activation: str, ignore_index: int | None):
        return _common.loss_options(C, **self._fused_options(activation, ignore_index))

    def _shared_options(self, activation: str, ignore_index: int | None) -> dict:
        return dict(
            activation=activation,
            include_background=self.include_background,
            batch=self.batch,
            reduction="none",
            smooth_nr=self.smooth_nr / 2,  # MONAI's 2·TP + s is 2·(TP + s/2)
            smooth_dr=self.smooth_dr / 2,
            ignore_index=ignore_index,
            backend=self.backend,
        )


class DiceLoss(_DiceBase):
    """Dice loss with ``monai.losses.DiceLoss``'s interface (MONAI 1.6).

    Fused under the same conditions as :class:`TverskyLoss` (its docstring lists them),
    with alpha = beta = 1/2 (1 for ``jaccard``); ``squared_pred=True`` (sums of p², not
    of p) runs MONAI's computation in plain torch, said once per instance with a
    :class:`SlowPathWarning` like every fallback (see the package docstring).
    ``weight`` multiplies each class's term before MONAI's mean over batch and classes,
    exactly as MONAI does (it is not a normalised weighted mean). ``backend``
    (keyword-only, not MONAI's) picks fasttversky's backend.
    """

    _who = "fasttversky.compat.monai.DiceLoss"

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight=None,
        soft_label: bool = False,
        ignore_index: int | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        jaccard = _common.check_flag("jaccard", jaccard)
        half = 1.0 if jaccard else 0.5
        super().__init__(
            include_background, to_onehot_y, sigmoid, softmax, other_act, half, half,
            reduction, smooth_nr, smooth_dr, batch, soft_label, ignore_index, backend=backend,
        )  # fmt: skip
        self.squared_pred = _common.check_flag("squared_pred", squared_pred)
        self.jaccard = jaccard
        self.register_buffer("class_weight", _class_weight(weight))

    def _option_problem(self) -> str | None:
        if self.squared_pred:
            return "squared_pred=True (sums of p², not of p)"
        return super()._option_problem()

    def _fused_options(self, activation, ignore_index) -> dict:
        return dict(
            alpha=self.alpha, beta=self.beta, **self._shared_options(activation, ignore_index)
        )

    def _finish(self, terms: torch.Tensor, ndim: int) -> torch.Tensor:
        w = _mirror.class_weight(self.class_weight, terms.shape[-1])
        if w is not None:
            terms = terms * w.to(terms)
        return _mirror.reduce_like_dice(terms, self.reduction, ndim)

    def _mirror(self, input, target, warn: bool = True) -> torch.Tensor:
        return _mirror.dice_loss_forward(self, input, target, warn)


class GeneralizedDiceLoss(_DiceBase):
    """Generalized Dice loss (Sudre et al. 2017) with ``monai.losses.GeneralizedDiceLoss``'s
    interface (MONAI 1.6): fused like :class:`DiceLoss`, the class weights 1/G², 1/G or 1
    (``w_type``) computed from the label counts the fused pass already has, with MONAI's
    rule for a class absent from a sample (it takes the largest weight of the present
    ones). Its fallbacks are :class:`TverskyLoss`'s, announced in the same way.
    ``backend`` (keyword-only, not MONAI's) picks fasttversky's backend.
    """

    _who = "fasttversky.compat.monai.GeneralizedDiceLoss"

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        w_type: str = "square",
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        soft_label: bool = False,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            include_background, to_onehot_y, sigmoid, softmax, other_act, 0.5, 0.5,
            reduction, smooth_nr, smooth_dr, batch, soft_label, None, backend=backend,
        )  # fmt: skip
        w_type = getattr(w_type, "value", w_type)  # MONAI's Weight StrEnum or a str
        if w_type not in _W_TYPES:
            raise ValueError(
                f"Unsupported weight type: {w_type}, available options are {_W_TYPES}."
            )
        self.w_type = w_type

    def _fused_options(self, activation, ignore_index) -> dict:
        shared = self._shared_options(activation, ignore_index)
        return dict(alpha=0.5, beta=0.5, generalized=self.w_type, **shared)

    def _finish(self, terms: torch.Tensor, ndim: int) -> torch.Tensor:
        return _mirror.reduce_like_dice(terms, self.reduction, ndim)

    def _mirror(self, input, target, warn: bool = True) -> torch.Tensor:
        return _mirror.generalized_dice_forward(self, input, target, warn)


def _class_weight(weight) -> torch.Tensor | None:
    """MONAI's ``torch.as_tensor(weight)`` for a number, a sequence or a tensor."""
    if weight is None or isinstance(weight, torch.Tensor):
        return weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float, list, tuple)):
        raise InvalidInputTypeError(
            f"weight must be a number, a sequence or a tensor, got {weight!r}"
        )
    return torch.as_tensor(weight)

"""``DiceCELoss`` with MONAI's constructor, defaults and values, fused where MONAI's two
terms are functions of the same probabilities."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

import fasttversky

from .. import _common
from .._common import Fallback
from . import _mirror
from ._base import MonaiLoss, tensor_problem

_WHO = "fasttversky.compat.monai.DiceCELoss"
_INT_LABELS = (torch.uint8, torch.int16, torch.int32, torch.int64)


class _FusedCall(NamedTuple):
    labels: torch.Tensor  # (B, 1, *spatial) integer label map (a {0, 1} mask for sigmoid)
    options: fasttversky.TverskyOptions  # Tversky sums with reduction "sum" + CE
    scale: float  # the loss is scale * fused_loss(...)
    out_dtype: torch.dtype  # the dtype MONAI's result would have


class DiceCELoss(MonaiLoss):
    """Dice + cross-entropy with ``monai.losses.DiceCELoss``'s interface (MONAI 1.6).

    ``lambda_dice * Dice + lambda_ce * CE`` where, as in MONAI, the Dice term follows
    ``include_background``, ``to_onehot_y``, the activation, ``squared_pred``/``jaccard``,
    ``batch``, the smoothing and ``weight`` (without the background when it is left
    out), and CE is ``nn.CrossEntropyLoss(weight, reduction, label_smoothing)`` on the raw
    logits for C > 1 channels or ``nn.BCEWithLogitsLoss(pos_weight=weight)`` for C = 1.

    **Fused** (one pass over logits and labels forward, one backward, the CE inside the
    Tversky kernels' pass) when the two terms see the same probabilities:

    * ``softmax=True``, C >= 2, ``to_onehot_y=True`` and a (B, 1, *spatial) label map
      (integer, or float truncated like MONAI's ``.long()``); ``weight`` None or C
      finite non-negative values (not all 0) of the input's dtype, with reduction "mean";
    * ``softmax=True``, C >= 2, ``to_onehot_y=False`` and an exactly one-hot
      (B, C, *spatial) target (float/integer/bool; turned into a label map after two
      checking passes), no ``weight``;
    * ``sigmoid=True``, C = 1 and a (B, 1, *spatial) {0, 1} mask (integer or float), no
      ``weight`` (MONAI passes it to BCE as ``pos_weight``);
    * and ``squared_pred=False``, ``other_act=None``, ``label_smoothing=0``,
      ``lambda_dice > 0``. The Dice term is the Tversky index with alpha = beta = 1/2
      (1 for ``jaccard``) and half of each smoothing constant.

    **MONAI-equivalent slower path** (plain torch, MONAI's forward step by step, its
    errors and NaNs included) otherwise -- notably MONAI's default ``softmax=False``
    (Dice on the raw input, CE on it as logits: two different functions of the input),
    soft targets, ``sigmoid=True`` with C > 1 (MONAI's CE is then a softmax CE), a
    ``weight`` whose dtype is not the input's (torch's CE raises), a ``weight`` whose
    non-zero classes label no voxel (MONAI's weighted CE is then 0/0 = NaN; one scan of
    the labels when a weight is 0) -- and, with a :class:`SlowPathWarning`, whenever the
    kernels refuse the inputs while running (NaN, labels out of range).
    ``explain(input, target)`` says which path a call takes.

    ``forward(input, target)``: input (B, C, *spatial) float, 1-3 spatial dims; target
    (B, 1, *spatial) or (B, C, *spatial). Returns a scalar in MONAI's dtype.
    ``backend`` (keyword-only, not MONAI's) picks fasttversky's backend. Flags must be
    bools, the lambdas, smoothing and ``label_smoothing`` real numbers and ``weight`` a
    tensor or None: anything else is a TypeError naming the argument; a negative lambda
    or a ``label_smoothing`` outside [0, 1] is a ValueError.
    """

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
        weight: torch.Tensor | None = None,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        label_smoothing: float = 0.0,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        red = getattr(reduction, "value", reduction)
        if red not in ("mean", "sum"):
            raise fasttversky.InvalidInputError(
                f"Unsupported option '{reduction}', available options are ['mean', 'sum']."
            )
        self.reduction = red
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
        self.squared_pred = _common.check_flag("squared_pred", squared_pred)
        self.jaccard = _common.check_flag("jaccard", jaccard)
        self._store_ce(weight, label_smoothing, lambda_dice, lambda_ce)

    def _store_ce(self, weight, label_smoothing, lambda_dice, lambda_ce) -> None:
        """The cross-entropy options, checked; MONAI's CE modules under MONAI's names
        (their ``weight`` buffers move with ``.to()``)."""
        weight = _common.check_weight("weight", weight)
        self.label_smoothing = _common.check_real("label_smoothing", label_smoothing)
        if not 0.0 <= label_smoothing <= 1.0:  # torch's CE raises this at the first forward
            raise fasttversky.InvalidInputError(
                f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}"
            )
        red = self.reduction
        self.cross_entropy = torch.nn.CrossEntropyLoss(
            weight=weight, reduction=red, label_smoothing=label_smoothing
        )
        self.binary_cross_entropy = torch.nn.BCEWithLogitsLoss(pos_weight=weight, reduction=red)
        for name, lam in (("lambda_dice", lambda_dice), ("lambda_ce", lambda_ce)):
            if _common.check_real(name, lam) < 0.0:
                raise fasttversky.InvalidInputError(f"{name} should be no less than 0.0.")
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce

    @property
    def weight(self) -> torch.Tensor | None:
        return self.cross_entropy.weight

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, target = _common.plain(input), _common.plain(target)
        plan = self._plan(input, target)
        if isinstance(plan, Fallback):
            _common.warn_fallback(plan, _WHO)
            return _mirror.dice_ce_forward(self, input, target)
        self._single_channel_warnings(input.shape[1])  # C = 1 is fused for sigmoid only
        return _common.run_or_fall_back(
            lambda: self._fused(input, plan),
            lambda: _mirror.dice_ce_forward(self, input, target, warn=False),
            _WHO,
        )

    def explain(self, input: torch.Tensor, target: torch.Tensor) -> str:
        """``"fused: ..."`` or ``"fallback: <why>"`` for ``forward(input, target)``
        (data-dependent refusals such as NaN are only found while the kernels run)."""
        plan = self._plan(_common.plain(input), _common.plain(target))
        if isinstance(plan, Fallback):
            return f"fallback: {plan.reason}"
        return f"fused: activation={plan.options.activation!r}, labels {plan.labels.dtype}"

    # ----------------------------------------------------------------------------------
    def _plan(self, input, target) -> _FusedCall | Fallback:
        """The fused call equal to MONAI's forward on these inputs, or why there is none."""
        why = tensor_problem(input, target) or self._option_problem()
        if why is not None:
            return Fallback(why)
        C = input.shape[1]
        if self.softmax and C > 1 and not self.to_onehot_y and target.shape == input.shape:
            plan = self._onehot_plan(input, target)
        elif tuple(target.shape) != (input.shape[0], 1, *input.shape[2:]):
            shape = tuple(target.shape)
            return Fallback(f"target of shape {shape} is not a (B, 1, *spatial) label map")
        elif self.softmax and C > 1:
            plan = self._label_map_plan(input, target)
        elif self.sigmoid and C == 1:
            plan = self._mask_plan(input, target)
        else:
            return Fallback(
                "activation: the fused path needs softmax=True with C >= 2 or sigmoid=True with "
                "C = 1 (otherwise MONAI's Dice and CE see different functions of the input)"
            )
        if isinstance(plan, Fallback):
            return plan
        labels, activation, out_dtype = plan
        return self._fused_call(input, labels, activation, out_dtype)

    def _option_problem(self) -> str | None:
        if self.other_act is not None:
            return "other_act (MONAI's CE sees the raw logits, the Dice the activated input)"
        if self.squared_pred:
            return "squared_pred=True (sums of squares are not the kernels' sums)"
        if self.label_smoothing != 0:
            return f"label_smoothing={self.label_smoothing}"
        if not (_common.nonneg_real(self.lambda_dice) and self.lambda_dice > 0):
            return f"lambda_dice={self.lambda_dice!r} (the Dice term carries the CE)"
        if not _common.nonneg_real(self.lambda_ce):
            return f"lambda_ce={self.lambda_ce!r}"
        if not (_common.nonneg_real(self.smooth_nr) and _common.nonneg_real(self.smooth_dr)):
            return "negative or non-finite smoothing"
        return None

    def _onehot_plan(self, input, target):
        # MONAI's CE is then torch's probability-target CE, equal to the label-map CE
        # when the target is exactly one-hot and unweighted.
        if self.weight is not None:
            return Fallback("weight with a one-hot target (MONAI's CE then divides by N, not Σw)")
        labels = _common.onehot_to_labels(target)
        if labels is None:
            return Fallback("target is not exactly one-hot (soft or invalid labels)")
        tdt = target.dtype if target.is_floating_point() else input.dtype
        return labels, "softmax", torch.promote_types(input.dtype, tdt)

    def _label_map_plan(self, input, target):
        if not self.to_onehot_y:
            return Fallback("to_onehot_y=False with a label map (MONAI raises)")
        if target.is_floating_point():
            labels = _common.float_labels_to_int(target, need_integral=False)
        elif target.dtype in _INT_LABELS:
            labels = target
        else:
            return Fallback(f"label dtype {target.dtype}")
        why = self._weight_problem(input, labels)
        if why is not None:
            return Fallback(why)
        return labels, "softmax", torch.promote_types(input.dtype, torch.float32)

    def _weight_problem(self, input, labels) -> str | None:
        w = self.weight
        if w is None:
            return None
        if self.reduction == "sum":
            return "weight with reduction='sum' (CE's sum of weights needs a histogram)"
        why = _common.ce_weight_problem(w, input)
        if why is not None:
            return why
        if not self.include_background and input.shape[1] > 2 and not bool(w[1:].any()):
            return "the Dice weights of the kept classes are all 0"
        if _common.weighted_ce_is_nan(labels, w):
            return "no voxel's class has a non-zero weight (MONAI's CE is 0/0 = NaN)"
        return None

    def _mask_plan(self, input, target):
        if self.weight is not None:
            return Fallback("weight with sigmoid (MONAI's BCE pos_weight)")
        if target.is_floating_point():
            labels = _common.float_labels_to_int(target, need_integral=True)
            if labels is None:
                return Fallback("soft (non-integer) float mask")
            return labels, "sigmoid", torch.promote_types(input.dtype, target.dtype)
        if target.dtype in _common.LABEL_DTYPES:
            return target, "sigmoid", input.dtype
        return Fallback(f"target dtype {target.dtype}")

    def _fused_call(self, x, labels, activation, out_dtype) -> _FusedCall:
        # MONAI: Dice = reduce_{b,c}(w_c · f_bc), f = 1 - (2TP + snr)/(2(TP + k FP + k FN) + sdr),
        # k = 1/2 (1 for jaccard): the Tversky term with alpha = beta = k and halved smoothing.
        # The fused loss with reduction="sum" gives S = Σ w_c f_bc + ce_weight · CE_mean, so
        #   mean: λd S / (B' C') + λce CE_mean   -> scale λd/(B'C'), ce_weight λce B'C'/λd
        #   sum:  λd S + λce N CE_mean           -> scale λd,        ce_weight λce N/λd
        # (CE's sum over N voxels is N times its mean when unweighted.)
        B, C = x.shape[:2]
        k = 1.0 if self.jaccard else 0.5
        n_kept = C - 1 if (not self.include_background and C > 1) else C
        w = self.weight
        if self.reduction == "mean":
            scale = self.lambda_dice / ((1 if self.batch else B) * n_kept)
        else:
            scale = self.lambda_dice * 1.0
        ce_mult = 1.0 if self.reduction == "mean" else float(labels.numel())
        options = _common.loss_options(
            C,
            alpha=k,
            beta=k,
            activation=activation,
            include_background=self.include_background,
            batch=self.batch,
            reduction="sum",
            smooth_nr=self.smooth_nr / 2,
            smooth_dr=self.smooth_dr / 2,
            class_weights=w if n_kept != 1 else None,  # MONAI skips weights for one class
            ce_weight=self.lambda_ce * ce_mult / scale,
            ce_class_weights=w if activation == "softmax" else None,
            backend=self.backend,
        )
        return _FusedCall(labels, options, scale, out_dtype)

    def _fused(self, x, plan: _FusedCall) -> torch.Tensor:
        return (plan.scale * _common.fused_loss(x, plan.labels, plan.options)).to(plan.out_dtype)

"""``DiceCELoss`` with MONAI's constructor, defaults and values, fused: one pass when
MONAI's two terms see the same probabilities, one pass per term otherwise."""

from __future__ import annotations

from collections.abc import Callable

import torch

import fasttversky

from .. import _common
from .._common import Fallback
from . import _compound, _mirror
from ._base import MonaiLoss, slow_path, tensor_problem
from ._compound import CeTerm, DiceTerm, FusedPlan


class DiceCELoss(MonaiLoss):
    """Dice + cross-entropy with ``monai.losses.DiceCELoss``'s interface (MONAI 1.6).

    ``lambda_dice * Dice + lambda_ce * CE`` where, as in MONAI, the Dice term follows
    ``include_background``, ``to_onehot_y``, the activation, ``squared_pred``/``jaccard``,
    ``batch``, the smoothing and ``weight`` (without the background when it is left
    out), and CE is ``nn.CrossEntropyLoss(weight, reduction, label_smoothing)`` on the raw
    logits for C > 1 channels or ``nn.BCEWithLogitsLoss(pos_weight=weight)`` for C = 1.

    **Fused** (no one-hot, nothing voxel-sized saved; see ``_compound``): one pass for
    both terms when they see the same probabilities (``softmax=True`` with C >= 2,
    ``sigmoid=True`` with C = 1), one pass per term otherwise (MONAI's default
    ``softmax=False``: Dice on the raw input, CE on it as logits; ``sigmoid=True`` with
    C > 1, whose CE MONAI computes with a softmax; ``other_act``), for these targets:

    * ``to_onehot_y=True`` (C >= 2) and a (B, 1, *spatial) label map of an integer,
      bool or float dtype (read by the kernels as it is; non-integer float labels are
      truncated like MONAI's ``.long()``);
    * ``to_onehot_y=False`` and a (B, C, *spatial) one-hot or soft target in [0, 1]
      (float, or integer converted to the input's dtype): the CE is torch's
      probability-target cross-entropy, label smoothing and ``weight`` included;
    * C = 1: a (B, 1, *spatial) {0, 1} integer mask or a float mask in [0, 1];

    with ``label_smoothing`` in [0, 1], ``weight`` None or C finite non-negative values
    (not all 0) of the input's dtype, and the lambdas >= 0 (a zero lambda drops its term).

    **MONAI-equivalent slower path** (plain torch, MONAI's forward step by step, its
    errors and NaNs included) otherwise: ``squared_pred=True``; ``weight`` with a label
    map and reduction "sum" (the CE sum needs a class histogram), with C = 1 (MONAI's
    BCE ``pos_weight``), of another dtype than the input (torch's CE raises for a label
    map), or whose non-zero classes label no voxel (MONAI's weighted CE is then 0/0 =
    NaN; one scan of the labels when a weight is 0); shapes MONAI rejects; and whatever
    the kernels refuse while running (NaN, labels out of range, a soft target outside
    [0, 1]). Each reason is announced once per instance with a :class:`SlowPathWarning`
    (none where MONAI raises; see the package docstring); ``explain(input, target)``
    says which path a call takes.

    ``forward(input, target)``: input (B, C, *spatial) float, 1-3 spatial dims; target
    (B, 1, *spatial) or (B, C, *spatial). Returns a scalar in MONAI's dtype.
    ``backend`` (keyword-only, not MONAI's) picks fasttversky's backend. Flags must be
    bools, the lambdas, smoothing and ``label_smoothing`` real numbers and ``weight`` a
    tensor or None: anything else is a TypeError naming the argument; a negative lambda
    or a ``label_smoothing`` outside [0, 1] is a ValueError.
    """

    _who = "fasttversky.compat.monai.DiceCELoss"

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
            return slow_path(
                self, plan.reason, lambda: _mirror.dice_ce_forward(self, input, target)
            )
        self._single_channel_warnings(input.shape[1])
        return _compound.run_or_fall_back(
            plan, lambda: _mirror.dice_ce_forward(self, input, target, warn=False), self
        )

    def explain(self, input: torch.Tensor, target: torch.Tensor) -> str:
        """``"fused: ..."`` or ``"fallback: <why>"`` for ``forward(input, target)``
        (data-dependent refusals such as NaN are only found while the kernels run)."""
        plan = self._plan(_common.plain(input), _common.plain(target))
        if isinstance(plan, Fallback):
            return f"fallback: {plan.reason}"
        passes = ", ".join(c.options.activation for c in plan.calls)
        return f"fused: {len(plan.calls)} pass(es) ({passes}), target {plan.target.dtype}"

    # ----------------------------------------------------------------------------------
    def _plan(self, input, target) -> FusedPlan | Fallback:
        """The fused calls equal to MONAI's forward on these inputs, or why there are none."""
        why = tensor_problem(input, target) or self._option_problem()
        if why is not None:
            return Fallback(why)
        tgt = self._target(input, target)
        if isinstance(tgt, Fallback):
            return tgt
        kernel_target, dice_dtype, float_labels = tgt
        ce = self._ce_term(input, kernel_target)
        if isinstance(ce, Fallback):
            return ce
        dice = self._dice_term(input)
        if isinstance(dice, Fallback):
            return dice
        if dice is None and ce is None:
            return Fallback("both terms are 0 (zero lambdas or weights)")
        calls = _compound.kernel_calls(input.shape[1], dice, ce, self.backend)
        # MONAI's dtype: its Dice's (activated input x target) promoted with its CE's
        out_dtype = torch.promote_types(dice_dtype, input.dtype)
        if dice is not None:
            out_dtype = torch.promote_types(out_dtype, dice.input.dtype)
        return FusedPlan(calls, kernel_target, out_dtype, float_labels)

    def _option_problem(self) -> str | None:
        if self.squared_pred:
            return "squared_pred=True (sums of squares are not the kernels' sums)"
        for name in ("lambda_dice", "lambda_ce", "smooth_nr", "smooth_dr"):
            if not _common.nonneg_real(getattr(self, name)):
                return f"{name}={getattr(self, name)!r}; the kernels take finite reals >= 0"
        return None

    def _target(self, input, target):
        """(the kernels' target, the dtype of MONAI's Dice target, float label map?)."""
        B, C, *spatial = input.shape
        if input.dim() != target.dim():
            return Fallback("input and target have different numbers of dims (MONAI raises)")
        if C > 1 and self.to_onehot_y:
            if tuple(target.shape) != (B, 1, *spatial):
                return Fallback(
                    f"target of shape {tuple(target.shape)} is not a (B, 1, *spatial) label map"
                )
            if target.is_floating_point():
                return target, torch.float32, True  # MONAI's one_hot is float32
            if target.dtype in _common.LABEL_DTYPES:
                return target, torch.float32, False
            return Fallback(f"label dtype {target.dtype}")
        if tuple(target.shape) != tuple(input.shape):
            return Fallback(f"target shape {tuple(target.shape)} != input shape (MONAI raises)")
        if target.is_floating_point():
            return target, target.dtype, False
        if target.dtype == torch.bool or target.dtype not in _common.LABEL_DTYPES:
            return Fallback(f"target dtype {target.dtype}")
        if C == 1:  # a {0, 1} integer mask is a label map for the kernels
            return target, input.dtype, False
        return target.to(input.dtype), input.dtype, False  # MONAI's CE does the same

    def _dice_term(self, input) -> DiceTerm | None | Fallback:
        """MONAI's Dice term; its weight is DiceCELoss's, without the background when that
        is left out, and none for one kept class (MONAI's DiceLoss skips it then)."""
        C = input.shape[1]
        n_kept = C - 1 if (not self.include_background and C > 1) else C
        w = self.weight
        kept = None if w is None or n_kept == 1 else [float(v) for v in w[C - n_kept :].tolist()]
        return _compound.dice_term(self, input, self.lambda_dice, kept)

    def _ce_term(self, input, kernel_target) -> CeTerm | None | Fallback:
        """MONAI's CE term: ``CrossEntropyLoss`` for C > 1, ``BCEWithLogitsLoss`` for C = 1."""
        C = input.shape[1]
        if self.lambda_ce == 0:
            return None
        w = self.weight
        label_map = C > 1 and kernel_target.shape[1] == 1
        voxels = input.numel() // C
        scale = float(self.lambda_ce) * (1.0 if self.reduction == "mean" else voxels)
        if C == 1:
            if w is not None:
                return Fallback("weight with one channel (MONAI's BCE pos_weight)")
            return CeTerm(input, "sigmoid", scale, {})
        options = {}
        if self.label_smoothing:
            options["ce_label_smoothing"] = float(self.label_smoothing)
        if w is not None:
            why = self._weight_problem(input, kernel_target, label_map)
            if why is not None:
                return Fallback(why)
            options["ce_class_weights"] = w
        return CeTerm(input, "softmax", scale, options)

    def _weight_problem(self, input, kernel_target, label_map: bool) -> str | None:
        w = self.weight
        if label_map and self.reduction == "sum":
            return "weight with a label map and reduction='sum' (the CE sum needs a histogram)"
        why = _common.ce_weight_problem(w, input)
        if why is not None:
            return why
        if label_map and _common.weighted_ce_is_nan(kernel_target, w):
            return "no voxel's class has a non-zero weight (MONAI's CE is 0/0 = NaN)"
        return None

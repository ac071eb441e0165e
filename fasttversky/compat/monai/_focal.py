"""``FocalLoss`` and ``DiceFocalLoss`` with MONAI's constructors, defaults and values,
computed by the fused kernels' focal term (see ``_compound`` for how the terms become
fused calls)."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Sequence

import torch
from torch.nn.modules.loss import _Loss

import fasttversky

from .. import _common
from .._common import Fallback
from . import _compound, _mirror, _mirror_focal
from ._base import slow_path, tensor_problem
from ._compound import CeTerm, FusedPlan
from ._dice import DiceLoss
from ._mirror import SINGLE_CHANNEL

_REDUCTIONS = ("none", "mean", "sum")


def _reduction(reduction) -> str:
    red = getattr(reduction, "value", reduction)  # MONAI's LossReduction or a str
    if red not in _REDUCTIONS:
        raise fasttversky.InvalidInputError(f"{reduction!r} is not a valid LossReduction")
    return red


def _as_tensor(name: str, value) -> torch.Tensor | None:
    """MONAI's ``torch.as_tensor(value)`` for a number, a sequence or a tensor."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, (numbers.Real, Sequence)):
        raise fasttversky.errors.InvalidInputTypeError(
            f"{name} must be a number, a sequence or a tensor, got {value!r}"
        )
    return torch.as_tensor(value)


class FocalLoss(_Loss):
    """Focal loss (Lin et al. 2017) with ``monai.losses.FocalLoss``'s interface (MONAI 1.6).

    **Fused** (the kernels' focal term: one pass, no one-hot, no voxel-sized temporary
    but the gradient) for sigmoid (``use_softmax=False``) and softmax with the
    background included, with ``to_onehot_y=True`` and a (B, 1, *spatial) label map
    (integer, bool or float, read as it is) or a (B, C, *spatial) one-hot/soft target in
    [0, 1]; any ``gamma`` >= 0; ``alpha`` None, a number in [0, 1], or (softmax) one
    value per class; ``weight`` None, a number or one value per kept class; reductions
    "mean" and "sum".

    **MONAI's computation in plain torch** for: softmax without the background (MONAI's
    softmax then runs over the remaining channels only), reduction "none" (a voxel-sized
    result), ``ignore_index`` with a one-hot/soft target or reduction "sum" (fused with a
    label map and "mean"), a per-class ``alpha`` with sigmoid, a negative ``gamma``,
    ``use_softmax`` with one channel, shapes or weights MONAI rejects, and whatever the
    kernels refuse while running (NaN, labels out of range). Each reason is announced
    once per instance with a :class:`SlowPathWarning` (none where MONAI raises; see the
    package docstring).

    MONAI computes the focal term in float32 whatever the input's dtype; this class
    computes in the input's precision (float64 stays float64) and returns MONAI's
    float32. ``backend`` (keyword-only, not MONAI's) picks fasttversky's backend.
    """

    _who = "fasttversky.compat.monai.FocalLoss"

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | None = None,
        weight: Sequence[float] | float | int | torch.Tensor | None = None,
        reduction: str = "mean",
        use_softmax: bool = False,
        ignore_index: int | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__(reduction=_reduction(reduction))
        self.include_background = _common.check_flag("include_background", include_background)
        self.to_onehot_y = _common.check_flag("to_onehot_y", to_onehot_y)
        self.gamma = _common.check_real("gamma", gamma)
        if alpha is None or isinstance(alpha, (float, int)) and not isinstance(alpha, bool):
            self.alpha = None if alpha is None else float(alpha)
        else:
            self.alpha = _as_tensor("alpha", alpha)
        self.register_buffer("class_weight", _as_tensor("weight", weight))
        self.use_softmax = _common.check_flag("use_softmax", use_softmax)
        self.ignore_index = _common.check_index("ignore_index", ignore_index)
        self.backend = _common.check_backend(backend)

    @property
    def weight(self):
        return self.class_weight

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, target = _common.plain(input), _common.plain(target)
        plan = self._plan(input, target)
        if isinstance(plan, Fallback):
            return slow_path(
                self, plan.reason, lambda: _mirror_focal.focal_forward(self, input, target)
            )
        if input.shape[1] == 1:
            _focal_warnings(self, warn_onehot=self.to_onehot_y)
        return _compound.run_or_fall_back(
            plan, lambda: _mirror_focal.focal_forward(self, input, target, False), self
        )

    def explain(self, input: torch.Tensor, target: torch.Tensor) -> str:
        """``"fused: ..."`` or ``"fallback: <why>"`` for ``forward(input, target)``."""
        return _explain(self._plan(_common.plain(input), _common.plain(target)))

    def _plan(self, input, target) -> FusedPlan | Fallback:
        why = tensor_problem(input, target)
        if why is not None:
            return Fallback(why)
        tgt = kernel_target(input, target, self.to_onehot_y)
        if isinstance(tgt, Fallback):
            return tgt
        label_map = tgt[2] or not tgt[0].is_floating_point()
        term = focal_term(self, input, 1.0, label_map)
        if isinstance(term, Fallback):
            return term
        if term is None:
            return Fallback("every class weight is 0")
        calls = _compound.kernel_calls(input.shape[1], None, term, self.backend)
        return FusedPlan(calls, tgt[0], torch.float32, tgt[2], self.ignore_index is not None)


def _focal_warnings(focal, warn_onehot: bool) -> None:
    """MONAI's single-channel warnings of its FocalLoss, on the fused path."""
    if warn_onehot:
        warnings.warn(SINGLE_CHANNEL.format("to_onehot_y=True"), stacklevel=3)
    if not focal.include_background:
        warnings.warn(SINGLE_CHANNEL.format("include_background=False"), stacklevel=3)


def _explain(plan) -> str:
    if isinstance(plan, Fallback):
        return f"fallback: {plan.reason}"
    passes = ", ".join(c.options.activation for c in plan.calls)
    return f"fused: {len(plan.calls)} pass(es) ({passes}), target {plan.target.dtype}"


def kernel_target(input, target, to_onehot_y: bool):
    """(the kernels' target, the dtype of MONAI's target after its one-hot step, float
    label map?) for MONAI's focal losses, or why there is none (then MONAI's own checks
    raise or compute)."""
    B, C, *spatial = input.shape
    if C > 1 and to_onehot_y:
        if tuple(target.shape) != (B, 1, *spatial):
            return Fallback(f"label map of shape {tuple(target.shape)}")
        if target.is_floating_point():
            return target, torch.float32, True  # MONAI's one_hot is float32
        if target.dtype in _common.LABEL_DTYPES:
            return target, torch.float32, False
        return Fallback(f"label dtype {target.dtype}")
    if tuple(target.shape) != tuple(input.shape):
        return Fallback(f"target shape {tuple(target.shape)} != input shape (MONAI raises)")
    if target.is_floating_point():
        return target, target.dtype, False
    if target.dtype not in _common.LABEL_DTYPES:
        return Fallback(f"target dtype {target.dtype}")
    if C == 1:  # a {0, 1} mask is a label map for the kernels
        return target, input.dtype, False
    return target.to(input.dtype), input.dtype, False


def _kept_weights(focal, n_kept: int) -> list[float] | Fallback:
    """MONAI's FocalLoss ``class_weight`` for the kept classes (its checks: a fallback
    where they raise, so that MONAI's computation raises MONAI's error)."""
    cw = focal.class_weight
    if cw is None:
        return [1.0] * n_kept
    if cw.ndim == 0:
        values = [float(cw)] * n_kept
    elif n_kept == 1 or cw.numel() != n_kept:
        return Fallback(f"weight of {cw.numel()} values for {n_kept} channels (MONAI raises)")
    else:
        values = [float(v) for v in cw.flatten().tolist()]
    if not all(_common.nonneg_real(v) for v in values):
        return Fallback("a negative or non-finite weight (MONAI raises or gives NaN)")
    return values


def _alpha(focal, softmax: bool, n_kept: int):
    """(per-class factors folded into the class weights, the kernels' ce_focal_alpha)."""
    a = focal.alpha
    if a is None:
        return [1.0] * n_kept, None
    if isinstance(a, float):
        if not 0.0 <= a <= 1.0:
            return Fallback(f"alpha={a} outside [0, 1]")
        if not softmax:  # the kernels weigh positives by alpha, negatives by 1 - alpha
            return [1.0] * n_kept, a
        # (1 - alpha) for the background, alpha for the others, as MONAI builds them: float32
        return torch.tensor([1 - a] + [a] * (n_kept - 1)).tolist(), None
    if not softmax:
        return Fallback("a per-class alpha with sigmoid (alpha on positives only)")
    if a.ndim != 1 or a.numel() != n_kept:
        return Fallback(f"alpha of shape {tuple(a.shape)} for {n_kept} channels (MONAI raises)")
    values = [float(v) for v in a.tolist()]
    if not all(_common.nonneg_real(v) for v in values):
        return Fallback("a negative or non-finite alpha")
    return values, None


def focal_term(focal, input, lam: float, label_map: bool) -> CeTerm | None | Fallback:
    """``lam`` × MONAI's ``FocalLoss(...)(input, target)`` as the kernels' focal term, or
    None when it is 0 (every weight 0); ``label_map``: the kernels' target is one."""
    B, C = input.shape[:2]
    softmax = focal.use_softmax
    if focal.reduction == "none":
        return Fallback("reduction='none' (a voxel-sized result)")
    ii = focal.ignore_index
    if ii is not None and (not label_map or focal.reduction != "mean"):
        return Fallback("ignore_index with a one-hot/soft target or reduction='sum'")
    if softmax and C == 1:
        return Fallback("use_softmax with one channel")
    if softmax and not focal.include_background:
        return Fallback(
            "softmax focal without the background (MONAI's softmax then runs "
            "over the remaining channels)"
        )
    if not _common.nonneg_real(focal.gamma):
        return Fallback(f"gamma={focal.gamma!r}")
    n_kept = C - 1 if not focal.include_background and C > 1 else C
    weights, alpha = _kept_weights(focal, n_kept), _alpha(focal, softmax, n_kept)
    for problem in (weights, alpha):
        if isinstance(problem, Fallback):
            return problem
    factors, ce_alpha = alpha
    kept = [w * f for w, f in zip(weights, factors, strict=True)]
    if not any(kept) or lam == 0:
        return None
    # The kernels' focal mean runs over C × the non-ignored voxels (B·C·N); MONAI's over
    # B·C'·N ("mean"), N ("sum": a mean over space, summed over batch and classes), or,
    # with an ignore_index, the non-ignored voxels without the C.
    ce_weights = [0.0] * (C - n_kept) + kept
    if ii is not None:
        scale = lam * C
    else:
        scale = lam * (C / n_kept if focal.reduction == "mean" else B * C)
    options = dict(ce_focal_gamma=float(focal.gamma), ce_focal_alpha=ce_alpha, ignore_index=ii)
    if any(w != 1.0 for w in ce_weights):
        options["ce_class_weights"] = tuple(ce_weights)
    return CeTerm(input, "softmax" if softmax else "sigmoid", scale, options)


class DiceFocalLoss(_Loss):
    """Dice + focal loss with ``monai.losses.DiceFocalLoss``'s interface (MONAI 1.6).

    ``lambda_dice * DiceLoss + lambda_focal * FocalLoss`` as MONAI builds them: the Dice
    term follows the activation (``sigmoid``, ``softmax``, ``other_act``), ``jaccard``,
    ``batch`` and the smoothing; the focal term is MONAI's *sigmoid* focal loss on the raw
    logits whatever the Dice activation (MONAI passes no ``use_softmax``); both share
    ``include_background``, ``weight``, ``reduction`` and the one-hot target.

    **Fused**: one pass for both terms with ``sigmoid=True``, one pass per term otherwise
    (softmax or no activation for the Dice, sigmoid for the focal term; see
    ``_compound``), for ``to_onehot_y=True`` with a (B, 1, *spatial) label map (integer,
    bool or float, read as it is; MONAI's ``.long()`` truncation of non-integer floats
    kept) or a (B, C, *spatial) one-hot/soft target in [0, 1]; with or without the
    background, ``batch``, ``jaccard``, ``weight`` (a number or one per kept class),
    ``gamma`` >= 0, ``alpha`` in [0, 1], reductions "mean" and "sum".

    **MONAI's computation in plain torch**: reduction "none" (a voxel-sized result),
    ``squared_pred``, a per-class ``alpha``, a negative ``gamma`` or smoothing, shapes or
    weights MONAI rejects, and whatever the kernels refuse while running (NaN logits,
    labels out of range); each reason announced once per instance with a
    :class:`SlowPathWarning` (none where MONAI raises; see the package docstring).

    The focal term is computed in the input's precision where MONAI rounds it to
    float32. ``backend`` (keyword-only, not MONAI's) picks fasttversky's backend.
    """

    _who = "fasttversky.compat.monai.DiceFocalLoss"

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
        gamma: float = 2.0,
        weight: Sequence[float] | float | int | torch.Tensor | None = None,
        lambda_dice: float = 1.0,
        lambda_focal: float = 1.0,
        alpha: float | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.dice = DiceLoss(
            include_background, False, sigmoid, softmax, other_act, squared_pred, jaccard,
            reduction, smooth_nr, smooth_dr, batch, weight, backend=backend,
        )  # fmt: skip
        self.focal = FocalLoss(
            include_background, False, gamma, alpha, weight, reduction, backend=backend
        )
        for name, lam in (("lambda_dice", lambda_dice), ("lambda_focal", lambda_focal)):
            if _common.check_real(name, lam) < 0.0:
                raise fasttversky.InvalidInputError(f"{name} should be no less than 0.0.")
        self.lambda_dice = lambda_dice
        self.lambda_focal = lambda_focal
        self.to_onehot_y = _common.check_flag("to_onehot_y", to_onehot_y)
        self.backend = self.dice.backend

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, target = _common.plain(input), _common.plain(target)
        plan = self._plan(input, target)
        if isinstance(plan, Fallback):
            mirror = lambda: _mirror_focal.dice_focal_forward(self, input, target)  # noqa: E731
            return slow_path(self, plan.reason, mirror)
        if input.shape[1] == 1:  # MONAI's warnings: its own, its DiceLoss's, its FocalLoss's
            if self.to_onehot_y:
                warnings.warn(SINGLE_CHANNEL.format("to_onehot_y=True"), stacklevel=2)
            self.dice._single_channel_warnings(1)
            _focal_warnings(self.focal, warn_onehot=False)
        return _compound.run_or_fall_back(
            plan, lambda: _mirror_focal.dice_focal_forward(self, input, target, False), self
        )

    def explain(self, input: torch.Tensor, target: torch.Tensor) -> str:
        """``"fused: ..."`` or ``"fallback: <why>"`` for ``forward(input, target)``."""
        return _explain(self._plan(_common.plain(input), _common.plain(target)))

    def _plan(self, input, target) -> FusedPlan | Fallback:
        why = tensor_problem(input, target)
        if why is not None:
            return Fallback(why)
        if input.dim() != target.dim() or target.shape[1] not in (1, input.shape[1]):
            return Fallback(f"target of shape {tuple(target.shape)} (MONAI raises)")
        tgt = kernel_target(input, target, self.to_onehot_y)
        if isinstance(tgt, Fallback):
            return tgt
        dice = self._dice_term(input)
        focal = focal_term(self.focal, input, self.lambda_focal, False)
        for term in (dice, focal):
            if isinstance(term, Fallback):
                return term
        if dice is None and focal is None:
            return Fallback("both terms are 0 (zero lambdas or weights)")
        calls = _compound.kernel_calls(input.shape[1], dice, focal, self.backend)
        dice_dtype = torch.promote_types(tgt[1], input.dtype if dice is None else dice.input.dtype)
        return FusedPlan(calls, tgt[0], torch.promote_types(dice_dtype, torch.float32), tgt[2])

    def _dice_term(self, input):
        """MONAI's DiceLoss term (its ``weight`` checks: a fallback where they raise)."""
        why = self.dice._option_problem()
        if why is not None:
            return Fallback(why)
        C = input.shape[1]
        n_kept = C - 1 if (not self.dice.include_background and C > 1) else C
        try:
            w = _mirror.class_weight(self.dice.class_weight, n_kept)
        except ValueError as exc:
            return Fallback(f"weight: {exc} (MONAI raises)")
        kept = None if w is None else [float(v) for v in w.tolist()]
        return _compound.dice_term(self.dice, input, self.lambda_dice, kept)

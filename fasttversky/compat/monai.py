"""``TverskyLoss`` and ``DiceCELoss`` with the constructors, defaults and values of MONAI's.

``DiceCELoss`` (Dice + cross-entropy, ``monai.losses.DiceCELoss``) runs both terms in one
fused pass when MONAI's options make them functions of the same probabilities; its
docstring lists which. What follows describes ``TverskyLoss``.

Migrating is one import line::

    # from monai.losses import TverskyLoss
    from fasttversky.compat.monai import TverskyLoss

    loss = TverskyLoss(softmax=True, to_onehot_y=True)(logits, labels)

MONAI is never imported: every piece of MONAI behaviour this class reproduces is
re-implemented below (and checked against MONAI 1.6 in tests/test_compat_monai.py).

Two paths
---------
**Fused** (``fasttversky.tversky_loss``, one pass forward, one pass backward, no one-hot
in memory) whenever MONAI's semantics equal the kernels':

* activation ``sigmoid=True``, ``softmax=True`` (C >= 2) or none (probabilities given);
  ``other_act`` is applied first (like MONAI, materialising its output) and the fused
  loss runs on the result with no activation;
* ``to_onehot_y=True`` with a (B, 1, *spatial) label map of any integer dtype, or float
  labels (MONAI's float ``MetaTensor`` label maps): these are truncated like MONAI's
  ``one_hot`` (``.long()``) into uint8 when they fit, else int64 -- one cheap pass,
  never a one-hot;
* ``to_onehot_y=False`` with a float (B, C, *spatial) target in [0, 1] (one-hot or
  soft), an integer/bool one-hot (converted to the logits' dtype), or for C = 1 a
  (B, 1, *spatial) mask;
* ``ignore_index`` whenever MONAI derives its mask from a label map: always with
  ``to_onehot_y=True``, and for C = 1 (float labels must then be integer-valued);
* ``soft_label=True`` when the target is hard (label map or integer one-hot) and an
  activation is applied: MONAI's L1 formulation then equals the product form, values
  and -- through sigmoid/softmax -- gradients;
* include_background, batch, every reduction, alpha/beta/smooth >= 0.

**MONAI-equivalent slower path** (plain torch, a line-by-line mirror of MONAI's
forward, including its errors) for everything else:

* ``soft_label=True`` with a float target (may be soft: MONAI uses |p|, |g|, |p-g|) or
  with no activation (|p| != p for negative inputs);
* ``ignore_index`` with a one-hot target of C > 1 channels (MONAI masks voxels where the
  ignored channel is set, or where all channels are zero for a sentinel value), or with
  non-integer float labels (MONAI compares the unrounded value with ``ignore_index``);
* negative or non-scalar alpha/beta, negative smoothing, a target that requires grad,
  fewer than 1 or more than 3 spatial dims, empty tensors, shapes MONAI would reject;
* any input the fused kernels refuse while running (non-finite logits, a soft target
  outside [0, 1], labels outside [0, C)): the mirror then returns what MONAI returns
  (NaN) or raises MONAI's error, and a :class:`SlowPathWarning` says so.

``TverskyLoss.explain(input, target)`` says which path a call takes and why.

Differences that remain
-----------------------
* Half-precision inputs: MONAI rounds the probabilities to bf16/fp16 and sums in that
  dtype when the target is half too; the fused path computes in fp32 and sums in fp64,
  then casts to MONAI's result dtype. Values agree to the half dtype's rounding.
* MONAI raises for ``soft_label=True`` with an integer target it did not one-hot
  encode itself (``linalg.vector_norm`` of an integer tensor); this class computes the
  loss of that hard mask instead.
* A MONAI ``MetaTensor`` input gives a plain ``torch.Tensor`` loss, not a MetaTensor.
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.linalg as LA
from torch.nn.modules.loss import _Loss

from .._dispatch import BackendUnavailableError
from ..functional import _tversky_loss

_REDUCTIONS = ("none", "mean", "sum")


class SlowPathWarning(UserWarning):
    """The fused kernels refused these inputs; the MONAI-equivalent torch path ran."""


class _FusedCall(NamedTuple):
    """Everything the fused path needs for one call."""

    input: torch.Tensor  # (B, C, *spatial) logits, or probabilities after other_act
    target: torch.Tensor  # label map (B, 1, *spatial) or float (B, C, *spatial)
    activation: str  # "softmax" | "sigmoid" | "none"
    ignore_index: int | None
    out_dtype: torch.dtype  # the dtype MONAI's result would have


def _plain(t):
    """A MONAI MetaTensor as a plain tensor (an autograd-tracked alias, no copy).

    MetaTensor's ``__torch_function__`` would wrap the custom ops' outputs; the loss
    needs none of its metadata.
    """
    if type(t).__name__ == "MetaTensor" and hasattr(t, "as_tensor"):
        return t.as_tensor()
    return t


def _nonneg_real(v) -> bool:
    return (
        isinstance(v, numbers.Real)
        and not isinstance(v, bool)
        and math.isfinite(float(v))
        and float(v) >= 0
    )


def _float_labels_to_int(labels: torch.Tensor, need_integral: bool) -> torch.Tensor | None:
    """Float label map -> integer labels, truncated toward zero like MONAI's ``.long()``.

    ``labels``: (B, 1, *spatial) float. Returns uint8 when every value is in [0, 255]
    (1 byte per voxel instead of 8), else int64; ``None`` when ``need_integral`` and a
    value is not an integer (then MONAI's unrounded comparison with ``ignore_index``
    cannot be reproduced by a label map). Costs one reduction pass and one conversion.
    """
    # TODO(perf): two host syncs on CUDA (aminmax, integrality); label maps are small.
    if need_integral and bool((labels != labels.trunc()).any()):
        return None
    lo, hi = torch.aminmax(labels)
    if bool(lo >= 0) and bool(hi <= 255):  # NaN fails both and takes the int64 path
        return labels.to(torch.uint8)
    return labels.long()


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``monai.networks.one_hot(labels, num_classes)`` with dim=1: float32 scatter.

    Same shape rule (dim 1 must be 1, fewer dims are padded at the end) and the same
    error for labels outside [0, num_classes) (scatter's index check).
    """
    if labels.ndim < 2:
        labels = torch.reshape(labels, list(labels.shape) + [1] * (2 - labels.ndim))
    sh = list(labels.shape)
    if sh[1] != 1:
        raise AssertionError("labels should have a channel with length equal to one.")
    sh[1] = num_classes
    out = torch.zeros(size=sh, dtype=torch.float, device=labels.device)
    return out.scatter_(dim=1, index=labels.long(), value=1)


def _onehot_to_labels(target: torch.Tensor) -> torch.Tensor | None:
    """An exactly one-hot (B, C, *spatial) target as a (B, 1, *spatial) label map.

    Returns uint8 labels (int64 for C > 256), or ``None`` when a value is not 0/1 or a
    voxel does not have exactly one 1 (soft labels, NaN, empty voxels).
    """
    # TODO(perf): three passes over the one-hot target (two checks, argmax) and two host
    # syncs; the label map it gives is C times smaller than the target.
    t = target.to(torch.uint8) if target.dtype == torch.bool else target
    if not bool(((t == 0) | (t == 1)).all()) or not bool((t.sum(1) == 1).all()):
        return None
    labels = t.argmax(1, keepdim=True)
    return labels.to(torch.uint8) if target.shape[1] <= 256 else labels


def _ignore_mask(y: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``monai.metrics.utils.create_ignore_mask``: (B, 1, *spatial), 1 = keep.

    A label map (1 channel) is compared with ``ignore_index``; a one-hot target masks
    voxels whose ignored channel is set, or, for a sentinel value outside [0, C), voxels
    whose channels are all zero.
    """
    if y.shape[1] == 1:
        return (y != ignore_index).float()
    num_classes = y.shape[1]
    if 0 <= ignore_index < num_classes:
        return 1.0 - y[:, ignore_index : ignore_index + 1]
    return (y.sum(dim=1, keepdim=True) > 0).float()


def _tp_fp_fn(p, g, reduce_axis, soft_label):
    """``monai.losses.utils.compute_tp_fp_fn(p, g, axis, ord=1, soft_label, decoupled=False)``."""
    if not soft_label:
        tp = torch.sum(p * g, dim=reduce_axis)
        fp = torch.sum(p * (1 - g), dim=reduce_axis)
        fn = torch.sum((1 - p) * g, dim=reduce_axis)
        return tp, fp, fn
    # Soft-label formulation (Wang et al. 2023): tp = (|p| + |g| - |p - g|) / 2.
    if not g.is_floating_point():
        # MONAI raises here (vector_norm of an integer mask); a hard mask has one meaning.
        g = g.to(p.dtype)
    pred_o = LA.vector_norm(p, ord=1, dim=reduce_axis)
    ground_o = LA.vector_norm(g, ord=1, dim=reduce_axis)
    difference = LA.vector_norm(p - g, ord=1, dim=reduce_axis)
    tp = (pred_o + ground_o - difference) / 2
    return tp, pred_o - tp, ground_o - tp


def _monai_activation(loss, input, warn: bool, stacklevel: int) -> torch.Tensor:
    """MONAI's activation step, as its TverskyLoss and DiceLoss both run it: sigmoid,
    softmax over C > 1 channels (its warning for C = 1), then ``other_act``."""
    if loss.sigmoid:
        input = torch.sigmoid(input)
    if loss.softmax:
        if input.shape[1] == 1:
            if warn:
                warnings.warn(
                    "single channel prediction, `softmax=True` ignored.", stacklevel=stacklevel + 1
                )
        else:
            input = torch.softmax(input, 1)
    if loss.other_act is not None:
        input = loss.other_act(input)
    return input


def _monai_drop_background(loss, input, target, n_pred_ch: int, warn: bool, stacklevel: int):
    """MONAI's ``include_background=False`` step (its warning for C = 1)."""
    if not loss.include_background:
        if n_pred_ch == 1:
            if warn:
                warnings.warn(
                    "single channel prediction, `include_background=False` ignored.",
                    stacklevel=stacklevel + 1,
                )
        else:
            input, target = input[:, 1:], target[:, 1:]
    return input, target


class TverskyLoss(_Loss):
    """Tversky loss (Salehi et al. 2017) with ``monai.losses.TverskyLoss``'s interface.

    Same constructor, defaults and values as MONAI 1.6 (alpha weighs false positives,
    beta false negatives; both default to 0.5, i.e. the Dice loss), computed by the
    fused kernels where MONAI's semantics allow and by a MONAI-equivalent torch path
    otherwise (see the module docstring for which is which).

    ``forward(input, target)``:

    * ``input``: (B, C, *spatial) float, 1-3 spatial dims: logits (with ``sigmoid``,
      ``softmax`` or ``other_act``) or probabilities.
    * ``target``: with ``to_onehot_y=True`` a (B, 1, *spatial) label map (integer or
      float dtype); otherwise a (B, C, *spatial) one-hot / soft target (float, integer
      or bool).
    * returns a scalar, or (B, C') / (C',) with ``reduction="none"`` (C' = classes kept),
      in the dtype MONAI would return.

    Args (MONAI's, in MONAI's order):
        include_background, to_onehot_y, sigmoid, softmax, other_act, alpha, beta,
        reduction, smooth_nr, smooth_dr, batch, soft_label, ignore_index: as in
        ``monai.losses.TverskyLoss``.
        backend: fasttversky's backend for the fused path ("auto", "cpu", "torch",
            "triton", "cuda"); keyword-only and not in MONAI.
    """

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
            raise ValueError(f"{reduction!r} is not a valid LossReduction")
        super().__init__(reduction=red)
        if other_act is not None and not callable(other_act):
            raise TypeError(
                f"other_act must be None or callable but is {type(other_act).__name__}."
            )
        if int(sigmoid) + int(softmax) + int(other_act is not None) > 1:
            raise ValueError(
                "Incompatible values: more than 1 of [sigmoid=True, softmax=True, other_act is not None]."
            )
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.sigmoid = sigmoid
        self.softmax = softmax
        self.other_act = other_act
        self.alpha = alpha
        self.beta = beta
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        self.batch = batch
        self.soft_label = soft_label
        self.ignore_index = ignore_index
        self.backend = backend

    # ----------------------------------------------------------------------------------
    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, target = _plain(input), _plain(target)
        plan = self._plan(input, target)
        if isinstance(plan, str):
            return self._monai_forward(input, target)
        self._single_channel_warnings(input.shape[1])
        try:
            loss = _tversky_loss(
                plan.input,
                plan.target,
                float(self.alpha),
                float(self.beta),
                clamp_terms=False,  # MONAI's unclamped 1 - T
                activation=plan.activation,
                include_background=self.include_background,
                batch=self.batch,
                reduction=self.reduction,
                smooth_nr=self.smooth_nr,
                smooth_dr=self.smooth_dr,
                ignore_index=plan.ignore_index,
                backend=self.backend,
            )
        except (ValueError, TypeError, BackendUnavailableError) as exc:
            # Data the kernels refuse (non-finite logits, targets outside [0, 1], labels
            # outside [0, C)) is only seen while they run. MONAI does not refuse it: the
            # mirror returns MONAI's value (NaN, out-of-range arithmetic) or its error.
            warnings.warn(
                f"fasttversky.compat.monai.TverskyLoss: the fused path refused these inputs "
                f"({exc}); computing MONAI's result with the slower torch path.",
                SlowPathWarning,
                stacklevel=2,
            )
            return self._monai_forward(input, target, warn=False)
        return loss.to(plan.out_dtype)

    def explain(self, input: torch.Tensor, target: torch.Tensor) -> str:
        """Which path ``forward(input, target)`` takes: ``"fused: ..."`` or ``"fallback: <why>"``.

        Data-dependent refusals (NaN, out-of-range targets) are only found while the
        kernels run and are not predicted here. Runs ``other_act`` if one is set.
        """
        plan = self._plan(_plain(input), _plain(target))
        if isinstance(plan, str):
            return f"fallback: {plan}"
        return (
            f"fused: activation={plan.activation!r}, target {tuple(plan.target.shape)} "
            f"{plan.target.dtype}, ignore_index={plan.ignore_index}, backend={self.backend!r}"
        )

    # ----------------------------------------------------------------------------------
    def _single_channel_warnings(self, n_pred_ch: int) -> None:
        # MONAI's three warnings, same text, same order, same category (UserWarning).
        if n_pred_ch != 1:
            return
        if self.softmax:
            warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=3)
        if self.to_onehot_y:
            warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=3)
        if not self.include_background:
            warnings.warn(
                "single channel prediction, `include_background=False` ignored.", stacklevel=3
            )

    def _plan(self, input, target) -> _FusedCall | str:
        """The fused call equivalent to MONAI's forward on these inputs, or why there is none.

        Decided from metadata only, except for float label maps (one min/max pass, plus an
        integrality pass with ``ignore_index``) and ``other_act``, which is applied here.
        """
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
        if self.reduction not in _REDUCTIONS:
            return f"reduction {self.reduction!r} (MONAI raises)"
        for name in ("alpha", "beta", "smooth_nr", "smooth_dr"):
            if not _nonneg_real(getattr(self, name)):
                return f"{name}={getattr(self, name)!r}; the kernels take finite reals >= 0"
        ii = self.ignore_index
        if ii is not None:
            try:
                ii = operator.index(ii)
            except TypeError:
                return f"ignore_index={ii!r} is not an integer"

        B, C = input.shape[:2]
        spatial = tuple(input.shape[2:])
        if self.sigmoid:
            activation = "sigmoid"
        elif self.softmax and C > 1:
            activation = "softmax"
        else:
            activation = "none"
        if self.soft_label and activation == "none":
            # |p| != p for negative inputs, and d|p - g|/dp = 0 at p == g.
            return "soft_label=True without sigmoid/softmax (MONAI's L1 form needs p in (0, 1))"

        x = input
        if self.other_act is not None:
            x = self.other_act(input)
            if not isinstance(x, torch.Tensor) or x.shape != input.shape:
                return "other_act changed the input's shape"
            if not x.is_floating_point():
                return f"other_act returned {x.dtype}"

        onehot = self.to_onehot_y and C > 1
        if onehot:
            if tuple(target.shape) != (B, 1, *spatial):
                return f"label map of shape {tuple(target.shape)} (MONAI's one_hot wants (B, 1, *spatial))"
            if target.is_floating_point():
                # Truncation equals MONAI's one_hot; with ignore_index MONAI also compares
                # the unrounded value, which a label map reproduces only for integers.
                labels = _float_labels_to_int(target, need_integral=ii is not None)
                if labels is None:
                    return "non-integer float labels with ignore_index"
            elif target.dtype in (torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool):
                labels = target
            else:
                return f"label dtype {target.dtype}"
            tgt, target_dtype = labels, torch.float32  # MONAI's one_hot is float32
        else:
            if tuple(target.shape) != tuple(input.shape):
                return f"target shape {tuple(target.shape)} != input shape (MONAI raises)"
            if C == 1:
                # A (B, 1, *spatial) mask. Integer masks are label maps for the kernels
                # (g = label == 1, and labels outside {0, 1, ignore_index} are refused,
                # sending the call to the mirror); float masks are soft targets.
                tgt = target
                if target.is_floating_point():
                    if self.soft_label:
                        return "soft_label=True with a float target (may be soft)"
                    if ii is not None:
                        tgt = _float_labels_to_int(target, need_integral=True)
                        if tgt is None:
                            return "non-integer float mask with ignore_index"
                elif target.dtype not in (
                    torch.uint8,
                    torch.int16,
                    torch.int32,
                    torch.int64,
                    torch.bool,
                ):
                    return f"target dtype {target.dtype}"
            else:
                if ii is not None:
                    return "ignore_index with a one-hot target (MONAI masks from its channels)"
                if target.is_floating_point():
                    if self.soft_label:
                        return "soft_label=True with a float target (may be soft)"
                    tgt = target
                elif target.dtype in (
                    torch.uint8,
                    torch.int16,
                    torch.int32,
                    torch.int64,
                    torch.bool,
                ):
                    # 0/1 is exact in every float dtype; out-of-range values are refused
                    # by the kernels and go to the mirror.
                    tgt = target.to(x.dtype)
                else:
                    return f"target dtype {target.dtype}"
            target_dtype = target.dtype

        # MONAI's result dtype: p * g promotes; its label-map ignore mask is float32.
        out_dtype = torch.promote_types(x.dtype, target_dtype)
        if ii is not None:
            out_dtype = torch.promote_types(out_dtype, torch.float32)
        return _FusedCall(x, tgt, activation, ii, out_dtype)

    def _monai_forward(self, input, target, warn: bool = True) -> torch.Tensor:
        """MONAI 1.6's ``TverskyLoss.forward``, step by step, in plain torch."""
        n_pred_ch = input.shape[1]
        input = _monai_activation(self, input, warn, stacklevel=3)

        original_target = target
        ii = self.ignore_index
        if self.to_onehot_y:
            if n_pred_ch == 1:
                if warn:
                    warnings.warn(
                        "single channel prediction, `to_onehot_y=True` ignored.", stacklevel=3
                    )
            else:
                if ii is not None and (ii < 0 or ii >= n_pred_ch):
                    # a sentinel label becomes class 0 before one-hot; the mask removes it
                    target = torch.where(target == ii, torch.zeros_like(target), target)
                target = _one_hot(target, n_pred_ch)

        if ii is not None:
            mask = _ignore_mask(original_target, ii)
            input, target = input * mask, target * mask

        input, target = _monai_drop_background(self, input, target, n_pred_ch, warn, stacklevel=3)

        if target.shape != input.shape:
            raise AssertionError(
                f"ground truth has differing shape ({target.shape}) from input ({input.shape})"
            )
        reduce_axis = list(range(2, len(input.shape)))
        if self.batch:
            reduce_axis = [0] + reduce_axis
        tp, fp, fn = _tp_fp_fn(input, target, reduce_axis, self.soft_label)
        fp *= self.alpha
        fn *= self.beta
        score = 1.0 - (tp + self.smooth_nr) / (tp + fp + fn + self.smooth_dr)
        if self.reduction == "sum":
            return torch.sum(score)
        if self.reduction == "none":
            return score
        if self.reduction == "mean":
            return torch.mean(score)
        raise ValueError(
            f'Unsupported reduction: {self.reduction}, available options are ["mean", "sum", "none"].'
        )


# ======================================================================================
# DiceCELoss
# ======================================================================================


class DiceCELoss(_Loss):
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
      non-negative values of the input's dtype (reduction "sum" needs no weight);
    * ``softmax=True``, C >= 2, ``to_onehot_y=False`` and an exactly one-hot
      (B, C, *spatial) target (float/integer/bool; turned into a label map after two
      checking passes), no ``weight``;
    * ``sigmoid=True``, C = 1 and a (B, 1, *spatial) {0, 1} mask (integer or float), no
      ``weight`` (MONAI passes it to BCE as ``pos_weight``);
    * and ``squared_pred=False``, ``other_act=None``, ``label_smoothing=0``,
      ``lambda_dice > 0``. The Dice term is the Tversky index with alpha = beta = 1/2
      (1 for ``jaccard``) and half of each smoothing constant.

    **MONAI-equivalent slower path** (plain torch, MONAI's forward step by step, its
    errors included) otherwise -- notably MONAI's default ``softmax=False`` (Dice on the
    raw input, CE on it as logits: two different functions of the input), soft
    targets, ``sigmoid=True`` with C > 1 (MONAI's CE is then a softmax CE) -- and, with a
    :class:`SlowPathWarning`, whenever the kernels refuse the inputs while running (NaN,
    labels out of range). ``explain(input, target)`` says which path a call takes.

    ``forward(input, target)``: input (B, C, *spatial) float, 1-3 spatial dims; target
    (B, 1, *spatial) or (B, C, *spatial). Returns a scalar in MONAI's dtype.
    ``backend`` (keyword-only, not MONAI's) picks fasttversky's backend.
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
            raise ValueError(
                f"Unsupported option '{reduction}', available options are ['mean', 'sum']."
            )
        self.reduction = red
        if other_act is not None and not callable(other_act):
            raise TypeError(
                f"other_act must be None or callable but is {type(other_act).__name__}."
            )
        if int(sigmoid) + int(softmax) + int(other_act is not None) > 1:
            raise ValueError(
                "Incompatible values: more than 1 of "
                "[sigmoid=True, softmax=True, other_act is not None]."
            )
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.sigmoid = sigmoid
        self.softmax = softmax
        self.other_act = other_act
        self.squared_pred = squared_pred
        self.jaccard = jaccard
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        self.batch = batch
        # MONAI's modules, same attribute names (their buffers move with .to()).
        self.cross_entropy = torch.nn.CrossEntropyLoss(
            weight=weight, reduction=red, label_smoothing=label_smoothing
        )
        self.binary_cross_entropy = torch.nn.BCEWithLogitsLoss(pos_weight=weight, reduction=red)
        if lambda_dice < 0.0:
            raise ValueError("lambda_dice should be no less than 0.0.")
        if lambda_ce < 0.0:
            raise ValueError("lambda_ce should be no less than 0.0.")
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce
        self.label_smoothing = label_smoothing
        self.backend = backend

    @property
    def weight(self) -> torch.Tensor | None:
        return self.cross_entropy.weight

    # ----------------------------------------------------------------------------------
    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, target = _plain(input), _plain(target)
        plan = self._plan(input, target)
        if isinstance(plan, str):
            return self._monai_forward(input, target)
        labels, activation, out_dtype = plan
        C = input.shape[1]
        if C == 1:  # MONAI's DiceLoss warnings for a single channel
            if self.to_onehot_y:
                warnings.warn(
                    "single channel prediction, `to_onehot_y=True` ignored.", stacklevel=2
                )
            if not self.include_background:
                warnings.warn(
                    "single channel prediction, `include_background=False` ignored.", stacklevel=2
                )
        try:
            loss = self._fused(input, labels, activation)
        except (ValueError, TypeError, BackendUnavailableError) as exc:
            warnings.warn(
                f"fasttversky.compat.monai.DiceCELoss: the fused path refused these inputs "
                f"({exc}); computing MONAI's result with the slower torch path.",
                SlowPathWarning,
                stacklevel=2,
            )
            return self._monai_forward(input, target, warn=False)
        return loss.to(out_dtype)

    def explain(self, input: torch.Tensor, target: torch.Tensor) -> str:
        """``"fused: ..."`` or ``"fallback: <why>"`` for ``forward(input, target)``
        (data-dependent refusals such as NaN are only found while the kernels run)."""
        plan = self._plan(_plain(input), _plain(target))
        if isinstance(plan, str):
            return f"fallback: {plan}"
        return f"fused: activation={plan[1]!r}, labels {plan[0].dtype}"

    # ----------------------------------------------------------------------------------
    def _plan(self, input, target):
        """(labels, activation, MONAI's result dtype) for the fused call, or why not."""
        if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
            return "input and target must both be tensors"
        if not 3 <= input.dim() <= 5 or input.numel() == 0 or target.numel() == 0:
            return f"input of shape {tuple(input.shape)} (the kernels take 1-3 spatial dims)"
        if not input.is_floating_point():
            return f"input dtype {input.dtype}"
        if target.requires_grad:
            return "target requires grad"
        if self.other_act is not None:
            return "other_act (MONAI's CE sees the raw logits, the Dice the activated input)"
        if self.squared_pred:
            return "squared_pred=True (sums of squares are not the kernels' sums)"
        if self.label_smoothing != 0:
            return f"label_smoothing={self.label_smoothing}"
        if not (_nonneg_real(self.lambda_dice) and self.lambda_dice > 0):
            return f"lambda_dice={self.lambda_dice!r} (the Dice term carries the CE)"
        if not _nonneg_real(self.lambda_ce):
            return f"lambda_ce={self.lambda_ce!r}"
        if not (_nonneg_real(self.smooth_nr) and _nonneg_real(self.smooth_dr)):
            return "negative or non-finite smoothing"
        B, C = input.shape[:2]
        spatial = tuple(input.shape[2:])
        w = self.weight
        if (
            self.softmax
            and C > 1
            and not self.to_onehot_y
            and tuple(target.shape) == tuple(input.shape)
        ):
            # A one-hot target: MONAI's CE is then torch's probability-target CE, equal to
            # the label-map CE when the target is exactly one-hot and unweighted.
            if w is not None:
                return "weight with a one-hot target (MONAI's CE then divides by N, not Σw)"
            labels = _onehot_to_labels(target)
            if labels is None:
                return "target is not exactly one-hot (soft or invalid labels)"
            tdt = target.dtype if target.is_floating_point() else input.dtype
            return labels, "softmax", torch.promote_types(input.dtype, tdt)
        if tuple(target.shape) != (B, 1, *spatial):
            return f"target of shape {tuple(target.shape)} is not a (B, 1, *spatial) label map"
        if self.softmax and C > 1:
            if not self.to_onehot_y:
                return "to_onehot_y=False with a label map (MONAI raises)"
            if w is not None:
                if w.dim() != 1 or w.shape[0] != C or w.dtype != input.dtype:
                    return f"weight of shape {tuple(w.shape)} / {w.dtype} for C={C}"
                if self.reduction == "sum":
                    return "weight with reduction='sum' (CE's sum of weights needs a histogram)"
            if target.is_floating_point():
                labels = _float_labels_to_int(target, need_integral=False)
            elif target.dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
                labels = target
            else:
                return f"label dtype {target.dtype}"
            return labels, "softmax", torch.promote_types(input.dtype, torch.float32)
        if self.sigmoid and C == 1:
            if w is not None:
                return "weight with sigmoid (MONAI's BCE pos_weight)"
            if target.is_floating_point():
                labels = _float_labels_to_int(target, need_integral=True)
                if labels is None:
                    return "soft (non-integer) float mask"
                out = torch.promote_types(input.dtype, target.dtype)
            elif target.dtype in (torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool):
                labels, out = target, input.dtype
            else:
                return f"target dtype {target.dtype}"
            return labels, "sigmoid", out
        return (
            "activation: the fused path needs softmax=True with C >= 2 or sigmoid=True with "
            "C = 1 (otherwise MONAI's Dice and CE see different functions of the input)"
        )

    def _fused(self, x, labels, activation):
        # MONAI: Dice = reduce_{b,c}(w_c · f_bc), f = 1 - (2TP + snr)/(2(TP + k FP + k FN) + sdr),
        # k = 1/2 (1 for jaccard): the Tversky term with alpha = beta = k and halved smoothing.
        # tversky_loss(reduction="sum") gives S = Σ w_c f_bc + ce_weight · CE_mean, so
        #   mean: λd S / (B' C') + λce CE_mean   -> scale λd/(B'C'), ce_weight λce B'C'/λd
        #   sum:  λd S + λce N CE_mean           -> scale λd,        ce_weight λce N/λd
        # (CE's sum over N voxels is N times its mean when unweighted.)
        B, C = x.shape[:2]
        k = 1.0 if self.jaccard else 0.5
        n_kept = C - 1 if (not self.include_background and C > 1) else C
        class_weights = None
        if self.weight is not None and n_kept != 1:  # MONAI skips weights for one class
            class_weights = self.weight
        if self.reduction == "mean":
            scale = self.lambda_dice / ((1 if self.batch else B) * n_kept)
        else:
            scale = self.lambda_dice * 1.0
        ce_mult = 1.0 if self.reduction == "mean" else float(labels.numel())
        return scale * _tversky_loss(
            x,
            labels,
            k,
            k,
            clamp_terms=False,  # MONAI's unclamped Dice term
            activation=activation,
            include_background=self.include_background,
            batch=self.batch,
            reduction="sum",
            smooth_nr=self.smooth_nr / 2,
            smooth_dr=self.smooth_dr / 2,
            class_weights=class_weights,
            ce_weight=self.lambda_ce * ce_mult / scale,
            ce_class_weights=self.weight if activation == "softmax" else None,
            backend=self.backend,
        )

    # ----------------------------------------------------------------------------------
    def _monai_forward(self, input, target, warn: bool = True) -> torch.Tensor:
        """MONAI 1.6's ``DiceCELoss.forward``, step by step, in plain torch."""
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
        dice = self._monai_dice(input, target, warn)
        if input.shape[1] != 1:
            t = target
            if input.shape[1] != target.shape[1] and target.shape[1] == 1:
                t = torch.squeeze(target, dim=1).long()
            elif not torch.is_floating_point(target):
                t = target.to(dtype=input.dtype)
            ce = self.cross_entropy(input, t)
        else:
            t = target if torch.is_floating_point(target) else target.to(dtype=input.dtype)
            ce = self.binary_cross_entropy(input, t)
        return self.lambda_dice * dice + self.lambda_ce * ce

    def _monai_dice(self, input, target, warn):
        """MONAI 1.6's ``DiceLoss.forward`` (no ignore_index: DiceCELoss passes none)."""
        n_pred_ch = input.shape[1]
        input = _monai_activation(self, input, warn, stacklevel=4)
        if self.to_onehot_y:
            if n_pred_ch == 1:
                if warn:
                    warnings.warn(
                        "single channel prediction, `to_onehot_y=True` ignored.", stacklevel=4
                    )
            else:
                target = _one_hot(target, n_pred_ch)
        input, target = _monai_drop_background(self, input, target, n_pred_ch, warn, stacklevel=4)
        if target.shape != input.shape:
            raise AssertionError(
                f"ground truth has different shape ({target.shape}) from input ({input.shape})"
            )
        reduce_axis = list(range(2, len(input.shape)))
        if self.batch:
            reduce_axis = [0] + reduce_axis
        if not self.squared_pred:
            tp = torch.sum(input * target, dim=reduce_axis)
            fp = torch.sum(input, dim=reduce_axis) - tp
            fn = torch.sum(target, dim=reduce_axis) - tp
        else:  # MONAI's L2 form: |p|², |g|², |p - g|²
            pred_o = LA.vector_norm(input, ord=2, dim=reduce_axis) ** 2
            ground_o = LA.vector_norm(target, ord=2, dim=reduce_axis) ** 2
            difference = LA.vector_norm(input - target, ord=2, dim=reduce_axis) ** 2
            tp = (pred_o + ground_o - difference) / 2
            fp, fn = pred_o - tp, ground_o - tp
        if not self.jaccard:
            fp = fp * 0.5
            fn = fn * 0.5
        f = 1 - (2 * tp + self.smooth_nr) / (2 * (tp + fp + fn) + self.smooth_dr)
        w = self.weight
        if w is not None and not self.include_background:
            w = w[1:]
        num_of_classes = target.shape[1]
        if w is not None and num_of_classes != 1:
            if w.ndim == 0:
                w = torch.as_tensor([w] * num_of_classes)
            elif w.shape[0] != num_of_classes:
                raise ValueError(
                    "The length of the `weight` sequence should be the same as the number of "
                    "classes. If `include_background=False`, the weight should not include the "
                    "background category class 0."
                )
            if w.min() < 0:
                raise ValueError("the value/values of the `weight` should be no less than 0.")
            f = f * w.to(f)
        return torch.mean(f) if self.reduction == "mean" else torch.sum(f)

"""``DC_and_CE_loss`` with nnU-Net v2's constructor and values, in one fused pass.

nnU-Net's default loss (``nnUNetTrainer._build_loss``) is::

    DC_and_CE_loss({"batch_dice": ..., "smooth": 1e-5, "do_bg": False, "ddp": ...}, {},
                   weight_ce=1, weight_dice=1, ignore_label=...,
                   dice_class=MemoryEfficientSoftDiceLoss)

i.e. ``weight_ce * CE + weight_dice * (-dc)`` with, per class c >= 1 (and per sample
unless ``batch_dice``), over the voxels whose label is not ``ignore_label``::

    dc = (2 Σ p·g + s) / max(Σ g + Σ p + s, 1e-8)        p = softmax(logits)

The soft Dice is the Tversky index with alpha = beta = 1/2 and half the smoothing
(``TP + FP/2 + FN/2 = (Σ p + Σ g) / 2``), so ``-mean(dc) = tversky_loss(...) - 1``: note
nnU-Net returns ``-dc``, not ``1 - dc``, and the 1e-8 clamp can only act when
``smooth < 1e-8``. The fused kernels compute the Tversky sums and the cross-entropy in
one pass over the logits and the integer labels (no softmax tensor, no one-hot, no mask
tensor) and the gradient in one more.

Paths
-----
Fused whenever the call means that: ``dice_class`` nnU-Net's ``MemoryEfficientSoftDiceLoss``
or ``SoftDiceLoss`` (equal values) with ``apply_nonlin`` softmax, ``smooth >= 1e-8``,
no ``clip_tp``, ``weight_dice > 0``, ``ce_kwargs`` empty or ``weight`` (class weights)
only, a (B, 1, *spatial) label map (integer, or float holding integers as nnU-Net's
data loader gives them), C >= 2, 1-3 spatial dims.

Otherwise the loss is computed like nnU-Net does, in plain torch (``_mirror``): any
other ``dice_class`` or ``ce_kwargs``, one-hot targets, ``weight_dice == 0``, a CE
``weight`` whose dtype is not the logits' (torch's CE raises, as in nnU-Net) or that is
negative or non-finite, and a ``weight`` whose non-zero classes label none of the
counted voxels (nnU-Net's weighted CE is then 0/0 = NaN; one scan of the labels, only
when a weight is 0). A :class:`~fasttversky.compat.monai.SlowPathWarning` says so when
the reason lies in the values: float labels holding non-integers (nnU-Net truncates
them; its loader never gives them), or inputs the kernels refuse while running (NaN/Inf
logits, labels outside [0, C) other than ``ignore_label``). ``explain`` tells which path
``forward`` takes, from the same plan.

Differences that remain: the fused path sums in float64 where nnU-Net sums in float32
(even for float64 logits), so values agree to float32 rounding; under DDP with
``batch_dice`` the Dice sums are all-gathered (``sync_across_ranks``) like nnU-Net's
``AllGatherGrad``.

Nothing here imports nnunetv2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

import fasttversky
from fasttversky.errors import InvalidInputTypeError

from .. import _common
from .._common import Fallback
from . import _mirror

_FUSABLE_DICE = ("MemoryEfficientSoftDiceLoss", "SoftDiceLoss")
_DICE_KEYS = {"batch_dice", "do_bg", "smooth", "ddp", "clip_tp"}
_LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)
_WHO = "fasttversky.compat.nnunet.DC_and_CE_loss"
_NON_INTEGER = Fallback("float target holding non-integer labels", warn=True)


def _softmax_dim1(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, 1)


def _is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _label_map_problem(x, y) -> str | None:
    """Why (net_output, target) is not (B, C >= 2, *spatial) logits with a
    (B, 1, *spatial) label map the kernels take, or None."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        return "net_output and target must be tensors"
    if not 3 <= x.dim() <= 5 or x.shape[1] < 2 or x.numel() == 0:
        return f"net_output of shape {tuple(x.shape)} (the kernels take (B, C>=2, 1-3 dims))"
    if not x.is_floating_point():
        return f"net_output dtype {x.dtype}"
    if tuple(y.shape) != (x.shape[0], 1, *x.shape[2:]):
        return f"target of shape {tuple(y.shape)} is not a (B, 1, *spatial) label map"
    if not (y.is_floating_point() or y.dtype in _LABEL_DTYPES):
        return f"target dtype {y.dtype}"
    if y.requires_grad:
        return "target requires grad"
    return None


def _integer_labels(y: torch.Tensor) -> torch.Tensor | None:
    """The label map as the kernels take it, or None for float labels holding non-integers.

    nnU-Net's loader gives float labels; both of its terms use ``.long()`` and its ignore
    mask compares the unrounded value, so only integral values can be fused. int8 (which
    the kernels do not read) becomes int16, the same values.
    """
    if y.is_floating_point():
        return _common.float_labels_to_int(y, need_integral=True)
    return y.to(torch.int16) if y.dtype == torch.int8 else y


def _reads_float_labels(y: torch.Tensor, backend: str) -> bool:
    """Whether the kernels ``backend`` picks for ``y``'s device read a float label map."""
    return backend != "auto" or _common.float_labels_keep_backend(y.device.type)


def _check_mapping(name: str, value) -> dict:
    if not isinstance(value, Mapping):
        raise InvalidInputTypeError(f"{name} must be a mapping (dict), got {type(value).__name__}")
    return dict(value)


class _FusedCall(NamedTuple):
    labels: torch.Tensor  # (B, 1, *spatial) label map: integer, or float read as it is
    options: fasttversky.TverskyOptions  # checked for this call's C


class _NnunetDice(nn.Module):
    """What nnU-Net's compound losses share: their soft Dice options, checked, and
    whether the fused kernels can compute that Dice."""

    def _store_dice(self, kwargs: dict, dice_class, default: str, nonlin) -> None:
        """nnU-Net's Dice options, checked; instantiates a Dice class that is not fused
        (with ``nonlin``, nnU-Net's ``apply_nonlin``). ``default``: the name of the
        class nnU-Net uses when ``dice_class`` is None."""
        if dice_class is not None and not callable(dice_class):
            raise InvalidInputTypeError(f"dice_class must be a class or None, got {dice_class!r}")
        name = default if dice_class is None else getattr(dice_class, "__name__", None)
        self.soft_dice_kwargs = kwargs
        self.dc = None
        self._dice_class_problem = None
        if name not in _FUSABLE_DICE:
            self._dice_class_problem = f"dice_class {name!r} is not nnU-Net's soft Dice"
            self.dc = dice_class(apply_nonlin=nonlin, **kwargs)
        elif set(kwargs) - _DICE_KEYS:
            unknown = sorted(set(kwargs) - _DICE_KEYS)
            raise InvalidInputTypeError(f"soft_dice_kwargs: unexpected keys {unknown}")
        key = "soft_dice_kwargs[{!r}]".format
        self.batch_dice = _common.check_flag(key("batch_dice"), kwargs.get("batch_dice", False))
        self.do_bg = _common.check_flag(key("do_bg"), kwargs.get("do_bg", True))
        self.ddp = _common.check_flag(key("ddp"), kwargs.get("ddp", True))
        self.smooth = _common.check_real(key("smooth"), kwargs.get("smooth", 1.0))
        if kwargs.get("clip_tp") is not None:
            _common.check_real(key("clip_tp"), kwargs["clip_tp"])

    def _dice_problem(self) -> str | None:
        """Why the fused kernels cannot compute this Dice, or None."""
        if self._dice_class_problem is not None:
            return self._dice_class_problem
        if self.soft_dice_kwargs.get("clip_tp") is not None:
            return "clip_tp is set"
        if not (math.isfinite(float(self.smooth)) and float(self.smooth) >= 1e-8):
            return f"smooth={self.smooth!r} (< 1e-8: nnU-Net's 1e-8 clamp can act)"
        return None

    def _sync(self) -> bool:
        """All-gather the Dice sums, as nnU-Net's AllGatherGrad under DDP with batch_dice."""
        return self.batch_dice and self.ddp and _is_distributed()


class DC_and_CE_loss(_NnunetDice):  # noqa: N801 -- nnU-Net's class name, for a drop-in import
    """Soft Dice + cross-entropy with nnU-Net v2's ``DC_and_CE_loss`` interface.

    ``forward(net_output, target)``:

    * ``net_output``: (B, C, *spatial) logits, C >= 2, float32/float16/bfloat16/float64.
    * ``target``: (B, 1, *spatial) label map (nnU-Net's float or any integer dtype).
    * returns a scalar: ``weight_ce * CE + weight_dice * (-mean dc)``, in
      ``promote(net_output.dtype, float32)`` like nnU-Net (NaN where nnU-Net's is NaN).

    Args (nnU-Net's):
        soft_dice_kwargs: ``batch_dice`` (False), ``do_bg`` (True), ``smooth`` (1.0),
            ``ddp`` (True), and ``clip_tp`` for ``SoftDiceLoss``.
        ce_kwargs: keyword arguments of ``torch.nn.CrossEntropyLoss`` (``weight`` is
            fused; anything else takes the slower path).
        weight_ce, weight_dice: weights of the two terms (real numbers).
        ignore_label: label (an int) whose voxels add to neither term.
        dice_class: nnU-Net's Dice class (by default, like nnU-Net, ``SoftDiceLoss``,
            whose value equals ``MemoryEfficientSoftDiceLoss``'s); another class is
            instantiated and used as nnU-Net would.
        backend: fasttversky's backend for the fused path; keyword-only, not nnU-Net's.

    A value of the wrong type (a flag that is not a bool, a weight that is not a real
    number, a non-integer ignore label) is a TypeError naming the argument.
    """

    def __init__(
        self,
        soft_dice_kwargs: Mapping,
        ce_kwargs: Mapping,
        weight_ce: float = 1,
        weight_dice: float = 1,
        ignore_label: int | None = None,
        dice_class=None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        soft_dice_kwargs = _check_mapping("soft_dice_kwargs", soft_dice_kwargs)
        ce_kwargs = _check_mapping("ce_kwargs", ce_kwargs)
        self.ignore_label = _common.check_index("ignore_label", ignore_label)
        fused_ce_keys = {"weight"}
        if ignore_label is not None:
            ce_kwargs["ignore_index"] = ignore_label
            fused_ce_keys.add("ignore_index")
        self.weight_dice = _common.check_real("weight_dice", weight_dice)
        self.weight_ce = _common.check_real("weight_ce", weight_ce)
        self.backend = _common.check_backend(backend)
        self.ce = nn.CrossEntropyLoss(**ce_kwargs)  # nnU-Net's RobustCrossEntropyLoss
        # an ignore_index of its own (without ignore_label) masks CE only, not the Dice
        self._unfused_ce_keys = sorted(set(ce_kwargs) - fused_ce_keys)
        self._store_dice(soft_dice_kwargs, dice_class, "SoftDiceLoss", _softmax_dim1)

    # ----------------------------------------------------------------------------------
    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        plan = self._plan(net_output, target)

        def original():
            return _mirror.dc_and_ce_forward(self, net_output, target)

        if isinstance(plan, Fallback):
            _common.warn_fallback(plan, _WHO)
            return original()

        def run(labels):
            return self._fused(net_output, plan if labels is None else plan._replace(labels=labels))

        def non_integer():
            _common.warn_fallback(_NON_INTEGER, _WHO)
            return original()

        # A float label map goes to the kernels as it is (no conversion pass): they flag a
        # value that is not an integer, and such labels take nnU-Net's computation.
        floats = plan.labels if plan.labels.is_floating_point() else None
        fused = _common.retry_float_labels(run, floats, True, non_integer, plan.options.backend)
        return _common.run_or_fall_back(fused, original, _WHO)

    def explain(self, net_output: torch.Tensor, target: torch.Tensor) -> str:
        """``"fused"`` or ``"fallback: <why>"`` for ``forward(net_output, target)``, from
        the same plan plus a scan for non-integer float labels (which ``forward`` leaves to
        the kernels); other refusals found while the kernels run, such as NaN, are not
        predicted here."""
        plan = self._plan(net_output, target)
        if not isinstance(plan, Fallback) and plan.labels.is_floating_point():
            if _integer_labels(plan.labels) is None:
                plan = _NON_INTEGER
        return f"fallback: {plan.reason}" if isinstance(plan, Fallback) else "fused"

    # ----------------------------------------------------------------------------------
    def _plan(self, x, y) -> _FusedCall | Fallback:
        """The fused call equal to nnU-Net's forward on these inputs, or why there is none."""
        why = self._option_problem() or _label_map_problem(x, y)
        if why is not None:
            return Fallback(why)
        # float labels are read by the kernels as they are (forward)
        labels = y if y.is_floating_point() else _integer_labels(y)
        why = self._ce_weight_problem(x, labels)
        if why is not None:
            return Fallback(why)
        return _FusedCall(labels, self._options(x.shape[1]))

    def _option_problem(self) -> str | None:
        if (why := self._dice_problem()) is not None:
            return why
        if self._unfused_ce_keys:
            return f"ce_kwargs {self._unfused_ce_keys}"
        if not self.weight_dice > 0:
            return f"weight_dice={self.weight_dice!r} (the Dice term carries the CE)"
        if not _common.nonneg_real(self.weight_ce):
            return f"weight_ce={self.weight_ce!r}"
        return None

    def _ce_weight_problem(self, x, labels) -> str | None:
        w = self.ce.weight
        if w is None or self.weight_ce == 0:  # nnU-Net skips CE when weight_ce == 0
            return None
        why = _common.ce_weight_problem(w, x)
        if why is not None:
            return why
        # (nnU-Net skips CE when every voxel is ignored, num_fg == 0, as the fused CE does)
        if _common.weighted_ce_is_nan(labels, w, self.ignore_label):
            return "no counted voxel's class has a non-zero CE weight (nnU-Net's CE is 0/0 = NaN)"
        return None

    def _options(self, C: int) -> fasttversky.TverskyOptions:
        # dc = (2TP + s) / (Σp + Σg + s) = (TP + s/2) / (TP + FP/2 + FN/2 + s/2)
        s = float(self.smooth) / 2
        return _common.loss_options(
            C,
            alpha=0.5,
            beta=0.5,
            ce_weight=float(self.weight_ce) / float(self.weight_dice),
            ce_class_weights=self.ce.weight if self.weight_ce != 0 else None,
            activation="softmax",
            ignore_index=self.ignore_label,
            include_background=self.do_bg,
            batch=self.batch_dice,
            reduction="mean",
            smooth_nr=s,
            smooth_dr=s,
            backend=self.backend,
            sync_across_ranks=self._sync(),
        )

    def _fused(self, x: torch.Tensor, plan: _FusedCall) -> torch.Tensor:
        # With every voxel ignored the fused CE is 0, as nnU-Net skips it (num_fg == 0).
        wd = float(self.weight_dice)
        loss = wd * _common.fused_loss(x, plan.labels, plan.options) - wd  # -dc = (1 - dc) - 1
        # nnU-Net's Dice is float32 whatever the logits' dtype; without a CE term its
        # result stays float32.
        return loss.to(torch.float32) if self.weight_ce == 0 else loss


class Tversky_and_CE_loss(nn.Module):  # noqa: N801 -- named like nnU-Net's compound losses
    """Tversky loss + cross-entropy in nnU-Net's conventions, fused (one pass each way).

    ``weight_tversky * mean(1 - T) + weight_ce * CE`` with, per class c (c >= 1 unless
    ``do_bg``) and per sample (or over the batch with ``batch_dice``), over the voxels
    whose label is not ``ignore_label``::

        T = (TP + smooth) / (TP + alpha FP + beta FN + smooth)      p = softmax(logits)

    CE is ``F.cross_entropy(..., ignore_index=ignore_label)`` and, like nnU-Net's
    ``DC_and_CE_loss``, 0 when every voxel is ignored. ``forward(net_output, target)``
    takes (B, C >= 2, *spatial) logits and a (B, 1, *spatial) label map (float holding
    integers, or integer) and returns a scalar in ``promote(net_output.dtype, float32)``.
    Inputs the kernels refuse while running (NaN/Inf logits, labels out of range) are
    computed in plain torch with a :class:`~fasttversky.compat.monai.SlowPathWarning`;
    other bad inputs raise a ValueError naming the argument.
    """

    def __init__(
        self,
        alpha: float = 0.3,
        beta: float = 0.7,
        batch_dice: bool = False,
        do_bg: bool = False,
        smooth: float = 1e-5,
        weight_ce: float = 1.0,
        weight_tversky: float = 1.0,
        ignore_label: int | None = None,
        ddp: bool = True,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, v in (
            ("alpha", alpha),
            ("beta", beta),
            ("smooth", smooth),
            ("weight_ce", weight_ce),
            ("weight_tversky", weight_tversky),
        ):
            if not _common.nonneg_real(_common.check_real(name, v)):
                raise fasttversky.InvalidInputError(f"{name} must be finite and >= 0, got {v!r}")
        if not weight_tversky > 0:
            raise fasttversky.InvalidInputError(
                "weight_tversky must be > 0 (use nn.CrossEntropyLoss for CE alone)"
            )
        self.alpha, self.beta, self.smooth = float(alpha), float(beta), float(smooth)
        self.batch_dice = _common.check_flag("batch_dice", batch_dice)
        self.do_bg = _common.check_flag("do_bg", do_bg)
        self.ddp = _common.check_flag("ddp", ddp)
        self.weight_ce, self.weight_tversky = float(weight_ce), float(weight_tversky)
        self.ignore_label = _common.check_index("ignore_label", ignore_label)
        self.backend = _common.check_backend(backend)

    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        why = _label_map_problem(net_output, target)
        if why is not None:
            raise fasttversky.InvalidInputError(f"Tversky_and_CE_loss: {why}")
        options = self._options(net_output.shape[1])
        if target.is_floating_point() and _reads_float_labels(target, options.backend):
            # nnU-Net's float label map read as it is (no conversion pass); anything the
            # kernels refuse takes the checked path below, which says why.
            try:
                return self.weight_tversky * _common.fused_loss(net_output, target, options)
            except (fasttversky.InvalidInputError, fasttversky.BackendUnavailableError) as exc:
                if isinstance(exc, TypeError):
                    raise
        labels = _integer_labels(target)
        if labels is None:
            raise fasttversky.InvalidInputError("target: float labels must hold integers")
        return _common.run_or_fall_back(
            lambda: self.weight_tversky * _common.fused_loss(net_output, labels, options),
            lambda: self._torch_forward(net_output, labels),
            "fasttversky.compat.nnunet.Tversky_and_CE_loss",
        )

    def _options(self, C: int) -> fasttversky.TverskyOptions:
        return _common.loss_options(
            C,
            clamp_terms=True,  # fasttversky's own Tversky term
            alpha=self.alpha,
            beta=self.beta,
            ce_weight=self.weight_ce / self.weight_tversky,
            activation="softmax",
            ignore_index=self.ignore_label,
            include_background=self.do_bg,
            batch=self.batch_dice,
            reduction="mean",
            smooth_nr=self.smooth,
            smooth_dr=self.smooth,
            backend=self.backend,
            sync_across_ranks=self.batch_dice and self.ddp and _is_distributed(),
        )

    def _torch_forward(self, x, labels):
        """The same loss in plain torch (NaN in, NaN out)."""
        return _mirror.tversky_and_ce_forward(self, x, labels)


__all__ = ["DC_and_CE_loss", "Tversky_and_CE_loss"]

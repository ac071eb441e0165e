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

Otherwise (any other ``dice_class`` or ``ce_kwargs``, one-hot targets, ``weight_dice == 0``)
and whenever the kernels refuse the inputs while running (NaN/Inf logits, labels outside
[0, C) other than ``ignore_label``) the loss is computed like nnU-Net does, in plain
torch (a :class:`~fasttversky.compat.monai.SlowPathWarning` says so for refusals).

Differences that remain: the fused path sums in float64 where nnU-Net sums in float32
(even for float64 logits), so values agree to float32 rounding; under DDP with
``batch_dice`` the Dice sums are all-gathered (``sync_across_ranks``) like nnU-Net's
``AllGatherGrad``.

Nothing here imports nnunetv2.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..._dispatch import BackendUnavailableError
from ...functional import _tversky_loss, tversky_loss
from ..monai import SlowPathWarning, _float_labels_to_int

_FUSABLE_DICE = ("MemoryEfficientSoftDiceLoss", "SoftDiceLoss")
_DICE_KEYS = {"batch_dice", "do_bg", "smooth", "ddp", "clip_tp"}
_LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)


def _softmax_dim1(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, 1)


def _is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class DC_and_CE_loss(nn.Module):  # noqa: N801 -- nnU-Net's class name, for a drop-in import
    """Soft Dice + cross-entropy with nnU-Net v2's ``DC_and_CE_loss`` interface.

    ``forward(net_output, target)``:

    * ``net_output``: (B, C, *spatial) logits, C >= 2, float32/float16/bfloat16/float64.
    * ``target``: (B, 1, *spatial) label map (nnU-Net's float or any integer dtype).
    * returns a scalar: ``weight_ce * CE + weight_dice * (-mean dc)``, in
      ``promote(net_output.dtype, float32)`` like nnU-Net.

    Args (nnU-Net's):
        soft_dice_kwargs: ``batch_dice`` (False), ``do_bg`` (True), ``smooth`` (1.0),
            ``ddp`` (True), and ``clip_tp`` for ``SoftDiceLoss``.
        ce_kwargs: keyword arguments of ``torch.nn.CrossEntropyLoss`` (``weight`` is
            fused; anything else takes the slower path).
        weight_ce, weight_dice: weights of the two terms.
        ignore_label: label whose voxels add to neither term (nnU-Net's ignore label).
        dice_class: nnU-Net's Dice class (by default, like nnU-Net, ``SoftDiceLoss``,
            whose value equals ``MemoryEfficientSoftDiceLoss``'s); another class is
            instantiated and used as nnU-Net would.
        backend: fasttversky's backend for the fused path; keyword-only, not nnU-Net's.
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
        soft_dice_kwargs = dict(soft_dice_kwargs)
        ce_kwargs = dict(ce_kwargs)
        if ignore_label is not None:
            ce_kwargs["ignore_index"] = ignore_label
        self.weight_dice = weight_dice
        self.weight_ce = weight_ce
        self.ignore_label = ignore_label
        self.backend = backend
        self.soft_dice_kwargs = soft_dice_kwargs
        self.ce = nn.CrossEntropyLoss(**ce_kwargs)  # nnU-Net's RobustCrossEntropyLoss
        self.batch_dice = bool(soft_dice_kwargs.get("batch_dice", False))
        self.do_bg = bool(soft_dice_kwargs.get("do_bg", True))
        self.smooth = soft_dice_kwargs.get("smooth", 1.0)
        self.ddp = bool(soft_dice_kwargs.get("ddp", True))

        name = getattr(dice_class, "__name__", None) if dice_class is not None else "SoftDiceLoss"
        self._why_slow = None
        self.dc = None
        if name not in _FUSABLE_DICE:
            self._why_slow = f"dice_class {name!r} is not nnU-Net's soft Dice"
            self.dc = dice_class(apply_nonlin=_softmax_dim1, **soft_dice_kwargs)
        elif set(soft_dice_kwargs) - _DICE_KEYS:
            raise TypeError(
                f"soft_dice_kwargs: unexpected keys {sorted(set(soft_dice_kwargs) - _DICE_KEYS)}"
            )
        elif soft_dice_kwargs.get("clip_tp") is not None:
            self._why_slow = "clip_tp is set"
        elif not (math.isfinite(float(self.smooth)) and float(self.smooth) >= 1e-8):
            self._why_slow = f"smooth={self.smooth!r} (< 1e-8: nnU-Net's 1e-8 clamp can act)"
        elif set(ce_kwargs) - {"weight", "ignore_index"}:
            self._why_slow = f"ce_kwargs {sorted(set(ce_kwargs) - {'weight', 'ignore_index'})}"
        elif not weight_dice > 0:
            self._why_slow = f"weight_dice={weight_dice!r} (the Dice term carries the CE)"
        elif not (math.isfinite(float(weight_ce)) and weight_ce >= 0):
            self._why_slow = f"weight_ce={weight_ce!r}"

    # ----------------------------------------------------------------------------------
    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        why = self._why_not_fused(net_output, target)
        if why is not None:
            return self._nnunet_forward(net_output, target)
        labels = target
        if target.is_floating_point():
            # nnU-Net's loader gives float labels; both of its terms use .long() and its
            # mask compares the unrounded value, so only integral values can be fused.
            labels = _float_labels_to_int(target, need_integral=True)
            if labels is None:
                return self._nnunet_forward(net_output, target)
        try:
            # With every voxel ignored the fused CE is 0, as nnU-Net skips it (num_fg == 0).
            loss = self._fused(net_output, labels, self.weight_ce)
        except (ValueError, TypeError, BackendUnavailableError) as exc:
            warnings.warn(
                f"fasttversky.compat.nnunet.DC_and_CE_loss: the fused path refused these "
                f"inputs ({exc}); computing nnU-Net's result with the slower torch path.",
                SlowPathWarning,
                stacklevel=2,
            )
            return self._nnunet_forward(net_output, target)
        # nnU-Net's Dice is float32 whatever the logits' dtype; without a CE term its
        # result stays float32.
        return loss.to(torch.float32) if self.weight_ce == 0 else loss

    def explain(self, net_output: torch.Tensor, target: torch.Tensor) -> str:
        """``"fused"`` or ``"fallback: <why>"`` for ``forward(net_output, target)``
        (data-dependent refusals such as NaN are only found while the kernels run)."""
        why = self._why_not_fused(net_output, target)
        return "fused" if why is None else f"fallback: {why}"

    # ----------------------------------------------------------------------------------
    def _why_not_fused(self, x, y) -> str | None:
        if self._why_slow is not None:
            return self._why_slow
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
        if y.dtype == torch.int8:
            return "int8 labels"
        if y.requires_grad:
            return "target requires grad"
        w = self.ce.weight
        if w is not None and (w.dim() != 1 or w.shape[0] != x.shape[1]):
            return f"ce weight of shape {tuple(w.shape)} for C={x.shape[1]}"
        return None

    def _fused(self, x: torch.Tensor, labels: torch.Tensor, weight_ce: float) -> torch.Tensor:
        # dc = (2TP + s) / (Σp + Σg + s) = (TP + s/2) / (TP + FP/2 + FN/2 + s/2)
        s = float(self.smooth) / 2
        wd = float(self.weight_dice)
        tv = _tversky_loss(
            x,
            labels,
            0.5,
            0.5,
            clamp_terms=False,  # nnU-Net's -dc is unclamped (1 - T may round below 0)
            ce_weight=float(weight_ce) / wd,
            ce_class_weights=self.ce.weight,
            activation="softmax",
            ignore_index=self.ignore_label,
            include_background=self.do_bg,
            batch=self.batch_dice,
            reduction="mean",
            smooth_nr=s,
            smooth_dr=s,
            backend=self.backend,
            sync_across_ranks=self.batch_dice and self.ddp and _is_distributed(),
        )
        # nnU-Net's Dice term is -dc = (1 - dc) - 1.
        return wd * tv - wd

    # ----------------------------------------------------------------------------------
    def _nnunet_forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """nnU-Net 2.8's ``DC_and_CE_loss.forward``, step by step, in plain torch."""
        if self.ignore_label is not None:
            assert target.shape[1] == 1, (
                "ignore label is not implemented for one hot encoded target variables "
                "(DC_and_CE_loss)"
            )
            mask = target != self.ignore_label
            target_dice = torch.where(mask, target, 0)
            num_fg = mask.sum()
        else:
            target_dice = target
            mask = None
        if self.weight_dice == 0:
            dc_loss = 0
        elif self.dc is not None:
            dc_loss = self.dc(x, target_dice, loss_mask=mask)
        else:
            dc_loss = self._soft_dice(x, target_dice, mask)
        if self.weight_ce != 0 and (self.ignore_label is None or num_fg > 0):
            t = target[:, 0]
            if t.ndim == x.ndim:  # RobustCrossEntropyLoss drops a remaining channel dim
                t = t[:, 0]
            ce_loss = self.ce(x, t.long())
        else:
            ce_loss = 0
        return self.weight_ce * ce_loss + self.weight_dice * dc_loss

    def _soft_dice(self, x, y, loss_mask):
        """nnU-Net's ``MemoryEfficientSoftDiceLoss.forward`` (no DDP gather), or with
        ``clip_tp`` its ``SoftDiceLoss`` (same value otherwise)."""
        x = torch.softmax(x, 1)
        axes = tuple(range(2, x.ndim))
        with torch.no_grad():
            if x.ndim != y.ndim:
                y = y.view((y.shape[0], 1, *y.shape[1:]))
            if x.shape == y.shape:
                y_onehot = y.to(torch.float32)
            else:
                y_onehot = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
                y_onehot.scatter_(1, y.long(), 1)
            if not self.do_bg:
                y_onehot = y_onehot[:, 1:]
            m = 1 if loss_mask is None else loss_mask
            sum_gt = (y_onehot * m).sum(axes, dtype=torch.float32)
        if not self.do_bg:
            x = x[:, 1:]
        m = 1 if loss_mask is None else loss_mask
        intersect = (x * y_onehot * m).sum(axes, dtype=torch.float32)
        sum_pred = (x * m).sum(axes, dtype=torch.float32)
        if self.batch_dice:
            intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
        clip_tp = self.soft_dice_kwargs.get("clip_tp")
        if clip_tp is not None:
            fp_fn = sum_pred + sum_gt - 2 * intersect
            intersect = torch.clip(intersect, min=clip_tp)
            dc = (2 * intersect + self.smooth) / torch.clip(
                2 * intersect + fp_fn + self.smooth, 1e-8
            )
        else:
            dc = (2 * intersect + self.smooth) / (sum_gt + sum_pred + float(self.smooth)).clamp_min(
                1e-8
            )
        return -dc.mean()


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
    Inputs the kernels refuse (NaN/Inf logits, labels out of range) are computed in
    plain torch with a :class:`~fasttversky.compat.monai.SlowPathWarning`.
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
        for name, v in (("alpha", alpha), ("beta", beta), ("smooth", smooth)):
            if not (math.isfinite(float(v)) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
        for name, v in (("weight_ce", weight_ce), ("weight_tversky", weight_tversky)):
            if not (math.isfinite(float(v)) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
        if not weight_tversky > 0:
            raise ValueError("weight_tversky must be > 0 (use nn.CrossEntropyLoss for CE alone)")
        self.alpha, self.beta, self.smooth = float(alpha), float(beta), float(smooth)
        self.batch_dice, self.do_bg, self.ddp = bool(batch_dice), bool(do_bg), bool(ddp)
        self.weight_ce, self.weight_tversky = float(weight_ce), float(weight_tversky)
        self.ignore_label = ignore_label
        self.backend = backend

    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = target
        if target.is_floating_point():
            labels = _float_labels_to_int(target, need_integral=True)
            if labels is None:
                raise ValueError("target: float labels must hold integers")
        try:
            loss = self._fused(net_output, labels, self.weight_ce)
        except (ValueError, TypeError, BackendUnavailableError) as exc:
            warnings.warn(
                f"fasttversky.compat.nnunet.Tversky_and_CE_loss: the fused path refused "
                f"these inputs ({exc}); computing the loss with the slower torch path.",
                SlowPathWarning,
                stacklevel=2,
            )
            return self._torch_forward(net_output, labels)
        return loss

    def _fused(self, x, labels, weight_ce):
        wt = self.weight_tversky
        tv = tversky_loss(
            x,
            labels,
            self.alpha,
            self.beta,
            ce_weight=float(weight_ce) / wt,
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
        return wt * tv

    def _torch_forward(self, x, labels):
        """The same loss in plain torch (NaN in, NaN out)."""
        keep = None if self.ignore_label is None else labels != self.ignore_label
        lab = labels if keep is None else torch.where(keep, labels, 0)
        p = torch.softmax(x, 1)
        g = torch.zeros_like(p).scatter_(1, lab.long(), 1)
        if keep is not None:
            p, g = p * keep, g * keep
        if not self.do_bg:
            p, g = p[:, 1:], g[:, 1:]
        axes = tuple(range(2, x.ndim))
        if self.batch_dice:
            axes = (0, *axes)
        tp = (p * g).sum(axes)
        fp, fn = p.sum(axes) - tp, g.sum(axes) - tp
        t = (tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth)
        loss = self.weight_tversky * (1 - t).mean()
        if self.weight_ce != 0 and (keep is None or bool(keep.any())):
            ii = -100 if self.ignore_label is None else self.ignore_label
            loss = loss + self.weight_ce * F.cross_entropy(x, labels[:, 0].long(), ignore_index=ii)
        return loss.to(torch.promote_types(x.dtype, torch.float32))


__all__ = ["DC_and_CE_loss", "Tversky_and_CE_loss"]

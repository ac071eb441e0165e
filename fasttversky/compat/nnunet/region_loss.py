"""nnU-Net's region-based loss, ``DC_and_BCE_loss``, fused, and read from the label map.

nnU-Net v2 trains region datasets (BraTS-style nested regions: whole tumour ⊇ tumour
core ⊇ enhancing) with sigmoid outputs, one per region, and (``nnUNetTrainer._build_loss``)::

    DC_and_BCE_loss({}, {"batch_dice": ..., "do_bg": True, "smooth": 1e-5, "ddp": ...},
                    use_ignore_label=<dataset has an ignore label>,
                    dice_class=MemoryEfficientSoftDiceLoss)

on the region target its data pipeline builds (``ConvertSegmentationToRegionsTransform``:
(B, R, ...) bool, region r = "label in region r", plus, with an ignore label, a last
channel True on ignored voxels). Its value is ``weight_ce * BCE + weight_dice * (-dc)``
with, per region r (and per sample unless ``batch_dice``), over the voxels not ignored::

    dc = (2 Σ p·g + s) / max(Σ g + Σ p + s, 1e-8)        p = sigmoid(logits)

and BCE the mean of ``binary_cross_entropy_with_logits`` over the B·R·N values; with
the ignore channel nnU-Net divides the masked sum by the number of kept voxels, not by
R times it (so the BCE then weighs R times more; reproduced here).

Two ways in, one value:

* nnU-Net's region target (bool or float 0/1; ignore channel last when
  ``use_ignore_label``): the kernels read it as a soft target (with the ignore channel,
  each voxel's region bits and the mask are packed into one small integer per voxel,
  looked up in a table of the 2^R bit patterns: R <= 10);
* the label map (B, 1, ...) (integer, or float holding integers as nnU-Net's loader
  gives it) with ``regions=`` (nnU-Net's ``label_manager.foreground_regions``) and
  ``ignore_label=``: region membership is looked up in the kernels, per voxel, from the
  region table; no region channel is built anywhere. With ``regions=`` a bool target is
  nnU-Net's region target, any other (B, 1, ...) target the label map.

The fused call is ``tversky_loss`` with alpha = beta = 1/2, half the smoothing, sigmoid
activation and the BCE weighted in: ``-dc = (1 - dc) - 1`` as in ``DC_and_CE_loss``.
Other Dice classes, BCE options, ``weight_dice <= 0``, ``smooth < 1e-8`` and more than
10 regions with an ignore channel compute nnU-Net's value in plain torch (``_mirror``);
inputs the kernels refuse while running (NaN logits, label values above the table) too,
with a :class:`SlowPathWarning`. Bad input (a region table naming labels that do not
exist or the ignore label, logits whose channels are not the regions, a float region
target that is not 0/1) raises a one-line error naming the argument.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

import fasttversky
from fasttversky.deep_supervision import default_weights, downsample_labels

from .. import _common
from .._common import Fallback
from . import _mirror
from ._regions import Regions, check_regions, region_masks
from .loss import Tversky_and_CE_loss, _check_mapping, _integer_labels, _is_distributed, _NnunetDice

_MAX_CODED_REGIONS = 10  # region target + ignore channel: a 2^R-entry table of bit patterns
_BCE_KEYS = {"reduction"}


class _Target(NamedTuple):
    """The target as the kernels take it, and the options that describe it."""

    tensor: torch.Tensor
    regions: Regions | None = None
    num_labels: int | None = None
    ignore_index: int | None = None


@functools.lru_cache(maxsize=16)
def _bit_pattern_regions(R: int) -> Regions:
    """Region r of the code table: every R-bit pattern with bit r set."""
    return tuple(tuple(k for k in range(2**R) if k >> r & 1) for r in range(R))


def _packed_regions(onehot: torch.Tensor) -> torch.Tensor:
    """(B, R + 1, ...) region target with the ignore channel last -> (B, 1, ...) int16:
    Σ_r 2^r·[region r], or 2^R on ignored voxels (one label per bit pattern)."""
    R = onehot.shape[1] - 1
    code = torch.zeros_like(onehot[:, :1], dtype=torch.int16)
    for r in range(R):
        code.add_(onehot[:, r : r + 1].to(torch.int16), alpha=2**r)
    return code.masked_fill_(onehot[:, R:].bool(), 2**R)


def _check_logits(x) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        what = type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype
        raise fasttversky.InvalidInputError(f"net_output must be float logits, got {what}")
    if x.dim() < 3 or x.numel() == 0:
        raise fasttversky.InvalidInputError(
            f"net_output of shape {tuple(x.shape)}: expected (B, R, *spatial), not empty"
        )


class _RegionLoss(nn.Module):
    """The region target's routes, shared by ``DC_and_BCE_loss`` and
    ``Tversky_and_BCE_loss`` (``self.regions``, ``self.ignore_label`` and
    ``self._ignore_channel`` set by the subclass)."""

    def _is_label_map(self, x, y) -> bool:
        if self.regions is None or y.dtype == torch.bool:
            return False
        spatial = tuple(x.shape[2:])
        return tuple(y.shape) in ((x.shape[0], 1, *spatial), (x.shape[0], *spatial))

    def _target(self, x: torch.Tensor, y) -> _Target | Fallback:
        """The kernels' target for (net_output, target); raises for bad input."""
        _check_logits(x)
        if not isinstance(y, torch.Tensor):
            raise fasttversky.InvalidInputError(f"target must be a tensor, got {type(y).__name__}")
        C, R = x.shape[1], None if self.regions is None else len(self.regions)
        if R is not None and C != R:
            raise fasttversky.InvalidInputError(
                f"net_output has {C} channels but regions has {R} regions"
            )
        if y.requires_grad:
            return Fallback("target requires grad")
        if self._is_label_map(x, y):
            return self._label_map_target(x, y)
        return self._region_target(x, y)

    def _label_map_target(self, x, y) -> _Target | Fallback:
        y = y if y.dim() == x.dim() else y.unsqueeze(1)
        ii = self.ignore_label
        if y.is_floating_point() and x.shape[1] > 1 and self._reads_float(y):
            # read as it is: the kernels check that each value is an integer label
            return _Target(y, self.regions, ii, ii)  # labels 0..ignore_label-1 exist
        # int8 as int16; one region: a float (B, 1, ...) target would be a soft target;
        # or a float label map converted where "auto" would send it to another backend
        labels = _integer_labels(y)
        if labels is None:
            return Fallback("float label map holding non-integer labels", warn=True)
        return _Target(labels, self.regions, ii, ii)

    def _reads_float(self, y) -> bool:
        return self.backend != "auto" or _common.float_labels_keep_backend(y.device.type)

    def _region_target(self, x, y) -> _Target | Fallback:
        C, extra = x.shape[1], int(self._ignore_channel)
        want = (x.shape[0], C + extra, *x.shape[2:])
        if tuple(y.shape) != want:
            label_map = f" or a (B, 1, {', '.join(map(str, x.shape[2:]))}) label map" * (
                self.regions is not None
            )
            raise fasttversky.InvalidInputError(
                f"target of shape {tuple(y.shape)}: expected nnU-Net's region target "
                f"{want} ({C} regions{' + the ignore channel' * extra}){label_map}"
            )
        # TODO(perf): one pass over a float target (nnU-Net's pipeline gives bool).
        if y.dtype != torch.bool and not bool(((y == 0) | (y == 1)).all()):
            raise fasttversky.InvalidInputError(
                "target: nnU-Net's region target must hold 0 or 1 (bool or float), "
                "found other values"
            )
        if not extra:
            return _Target(y if y.is_floating_point() else y.to(torch.float32))
        if C > _MAX_CODED_REGIONS:
            return Fallback(
                f"{C} regions with an ignore channel (fused up to {_MAX_CODED_REGIONS})"
            )
        return _Target(_packed_regions(y), _bit_pattern_regions(C), 2**C, 2**C)

    def _onehot(self, x, y) -> torch.Tensor:
        """nnU-Net's region target for the slower path (the label map converted)."""
        if isinstance(y, torch.Tensor) and self._is_label_map(x, y):
            y = y if y.dim() == x.dim() else y.unsqueeze(1)
            ii = self.ignore_label if self._ignore_channel else None
            return region_masks(y, self.regions, ii)
        return y

    def _options_for(self, C: int, t: _Target, **options) -> fasttversky.TverskyOptions:
        if t.regions is not None:
            options.update(regions=t.regions, num_labels=t.num_labels)
        options.update(activation="sigmoid", ignore_index=t.ignore_index)
        return _cached_options(C, tuple(sorted(options.items())))


@functools.lru_cache(maxsize=64)
def _cached_options(C: int, items: tuple) -> fasttversky.TverskyOptions:
    """Options built and checked once per distinct call: checking a region table takes
    a pass over its labels (5120 for the 2^10-pattern table of a region target with
    the ignore channel)."""
    return _common.loss_options(C, **dict(items))


class DC_and_BCE_loss(_NnunetDice, _RegionLoss):  # noqa: N801 -- nnU-Net's class name
    """Soft Dice + BCE over regions with nnU-Net v2's ``DC_and_BCE_loss`` interface.

    ``forward(net_output, target)``:

    * ``net_output``: (B, R, *spatial) logits, one channel per region.
    * ``target``: nnU-Net's region target (B, R[+1], *spatial), bool or float 0/1, the
      ignore channel last when ``use_ignore_label``; or, with ``regions=``, the
      (B, 1, *spatial) label map (integer, or float holding integers).
    * returns ``weight_ce * BCE + weight_dice * (-mean dc)``, a scalar in
      ``promote(net_output.dtype, float32)`` (float32 when ``weight_ce == 0``).

    Args (nnU-Net's): ``bce_kwargs`` (keyword arguments of ``nn.BCEWithLogitsLoss``:
    only ``reduction`` is fused), ``soft_dice_kwargs`` (``batch_dice`` (False),
    ``do_bg`` (True), ``smooth`` (1.0), ``ddp`` (True)), ``weight_ce``, ``weight_dice``,
    ``use_ignore_label`` (the target's last channel marks ignored voxels),
    ``dice_class`` (None: nnU-Net's default ``MemoryEfficientSoftDiceLoss``).
    Keyword-only, not nnU-Net's: ``regions`` (each region a label or a tuple of labels),
    ``ignore_label`` (the label value whose voxels are ignored, with
    ``use_ignore_label``; nnU-Net's is the largest label value, and no region may name
    it or a label above it), ``backend``.
    """

    def __init__(
        self,
        bce_kwargs: Mapping,
        soft_dice_kwargs: Mapping,
        weight_ce: float = 1,
        weight_dice: float = 1,
        use_ignore_label: bool = False,
        dice_class=None,
        *,
        regions: Sequence | None = None,
        ignore_label: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        bce_kwargs = _check_mapping("bce_kwargs", bce_kwargs)
        soft_dice_kwargs = _check_mapping("soft_dice_kwargs", soft_dice_kwargs)
        self.use_ignore_label = _common.check_flag("use_ignore_label", use_ignore_label)
        if self.use_ignore_label:
            bce_kwargs["reduction"] = "none"  # as nnU-Net: the masked mean is taken here
        self.weight_dice = _common.check_real("weight_dice", weight_dice)
        self.weight_ce = _common.check_real("weight_ce", weight_ce)
        self.ignore_label, self.regions = _check_region_args(
            regions, ignore_label, self.use_ignore_label
        )
        self._ignore_channel = self.use_ignore_label
        self.backend = _common.check_backend(backend)
        self.ce = nn.BCEWithLogitsLoss(**bce_kwargs)
        default_reduction = "none" if self.use_ignore_label else "mean"
        self._unfused_bce = sorted(set(bce_kwargs) - _BCE_KEYS) or (
            [] if self.ce.reduction == default_reduction else [f"reduction={self.ce.reduction!r}"]
        )
        self._store_dice(soft_dice_kwargs, dice_class, "MemoryEfficientSoftDiceLoss", torch.sigmoid)

    # ----------------------------------------------------------------------------------
    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        plan = self._plan(net_output, target)
        slow = lambda: _mirror.dc_and_bce_forward(  # noqa: E731
            self, net_output, self._onehot(net_output, target)
        )
        if isinstance(plan, Fallback):
            _common.warn_fallback(plan, _WHO_BCE)
            return slow()
        return _common.run_or_fall_back(lambda: self._fused(net_output, plan), slow, _WHO_BCE)

    def explain(self, net_output: torch.Tensor, target: torch.Tensor) -> str:
        """``"fused"`` or ``"fallback: <why>"`` for ``forward(net_output, target)``."""
        plan = self._plan(net_output, target)
        return f"fallback: {plan.reason}" if isinstance(plan, Fallback) else "fused"

    def deep_supervision_loss(self, net_outputs, target, weights=None) -> torch.Tensor:
        """``Σ_i weights[i] · self(net_outputs[i], target_i)``, nnU-Net's
        ``DeepSupervisionWrapper(self, weights)`` (default weights: nnU-Net's).

        ``target``: one target per scale (nnU-Net's pipeline gives them), or the
        full-resolution label map (with ``regions=``), brought to each scale by
        ``fasttversky.deep_supervision_loss`` (nearest selection by index, as nnU-Net's
        ``DownsampleSegForDSTransform``; no region channel at any scale).
        """
        n = len(net_outputs)
        weights = default_weights(n) if weights is None else list(weights)
        if len(weights) != n:
            raise fasttversky.InvalidInputError(
                f"weights has {len(weights)} entries for {n} scales"
            )
        if isinstance(target, torch.Tensor):
            if not self._is_label_map(net_outputs[0], target):
                raise fasttversky.InvalidInputError(
                    "target: one tensor must be the full-resolution label map (with "
                    "regions=); give region targets as a list, one per scale"
                )
            lab = target if target.dim() == net_outputs[0].dim() else target.unsqueeze(1)
            target = [downsample_labels(lab, x.shape[2:]).unsqueeze(1) for x in net_outputs]
            plan = self._plan(net_outputs[0], target[0])
            if isinstance(plan, _FusedPlan) and plan.target.tensor is target[0]:
                return _common.run_or_fall_back(
                    lambda: self._fused_scales(net_outputs, target, weights, plan.options),
                    lambda: self._scales(net_outputs, target, weights),
                    _WHO_BCE,
                )
        if len(target) != n:
            raise fasttversky.InvalidInputError(f"target has {len(target)} scales for {n}")
        return self._scales(net_outputs, target, weights)

    def _scales(self, net_outputs, targets, weights) -> torch.Tensor:
        scales = zip(weights, net_outputs, targets, strict=True)
        return sum(w * self(x, t) for w, x, t in scales if w != 0)

    def _fused_scales(self, net_outputs, targets, weights, options) -> torch.Tensor:
        wd = float(self.weight_dice)
        ds = fasttversky.deep_supervision_loss(list(net_outputs), targets, weights, options=options)
        loss = wd * ds - wd * sum(w for w in weights if w != 0)
        return loss.to(torch.float32) if self.weight_ce == 0 else loss

    # ----------------------------------------------------------------------------------
    def _plan(self, x, y) -> _FusedPlan | Fallback:
        t = self._target(x, y)
        if isinstance(t, Fallback):
            return t
        why = self._option_problem(x.shape[1])
        if why is not None:
            return Fallback(why)
        return _FusedPlan(t, self._options(x.shape[1], t))

    def _option_problem(self, C: int) -> str | None:
        if (why := self._dice_problem()) is not None:
            return why
        if self._unfused_bce:
            return f"bce_kwargs {self._unfused_bce}"
        if not self.weight_dice > 0:
            return f"weight_dice={self.weight_dice!r} (the Dice term carries the BCE)"
        if not _common.nonneg_real(self.weight_ce):
            return f"weight_ce={self.weight_ce!r}"
        if not self.do_bg and C == 1:
            return "do_bg=False with one region (nnU-Net's Dice is a mean over no region)"
        return None

    def _options(self, C: int, t: _Target) -> fasttversky.TverskyOptions:
        # dc = (2TP + s) / (Σp + Σg + s) = (TP + s/2) / (TP + FP/2 + FN/2 + s/2). BCE:
        # the kernels' mean is over C·(kept voxels); nnU-Net's masked mean over the
        # kept voxels only, C times more.
        s = float(self.smooth) / 2
        bce_scale = C if self.use_ignore_label else 1
        return self._options_for(
            C,
            t,
            alpha=0.5,
            beta=0.5,
            ce_weight=float(self.weight_ce) / float(self.weight_dice) * bce_scale,
            include_background=self.do_bg,
            batch=self.batch_dice,
            reduction="mean",
            smooth_nr=s,
            smooth_dr=s,
            backend=self.backend,
            sync_across_ranks=self._sync(),
        )

    def _fused(self, x: torch.Tensor, plan: _FusedPlan) -> torch.Tensor:
        wd = float(self.weight_dice)
        loss = wd * _common.fused_loss(x, plan.target.tensor, plan.options) - wd
        return loss.to(torch.float32) if self.weight_ce == 0 else loss


class _FusedPlan(NamedTuple):
    target: _Target
    options: fasttversky.TverskyOptions


def _check_region_args(regions, ignore_label, use_ignore_label: bool):
    """(ignore_label, regions) checked against each other and ``use_ignore_label``."""
    ignore_label = _common.check_index("ignore_label", ignore_label)
    if ignore_label is not None and not use_ignore_label:
        raise fasttversky.InvalidInputError(
            f"ignore_label={ignore_label} needs use_ignore_label=True (nnU-Net's region "
            "target then carries the ignore channel)"
        )
    if regions is None:
        return ignore_label, None
    if use_ignore_label and ignore_label is None:
        raise fasttversky.InvalidInputError(
            "ignore_label: use_ignore_label=True with regions= needs the ignore label's "
            "value to read a label map"
        )
    if ignore_label is not None and ignore_label < 1:
        raise fasttversky.InvalidInputError(
            f"ignore_label must be >= 1 with regions (nnU-Net's is the largest label), "
            f"got {ignore_label}"
        )
    return ignore_label, check_regions(regions, ignore_label)


class Tversky_and_BCE_loss(Tversky_and_CE_loss, _RegionLoss):  # noqa: N801
    """Tversky loss + BCE over regions (sigmoid), nnU-Net's conventions, fused.

    ``weight_tversky * mean(1 - T) + weight_ce * BCE`` with, per region r (r >= 1
    unless ``do_bg``; every region by default) and per sample (or over the batch with
    ``batch_dice``), over the voxels whose label is not ``ignore_label``::

        T = (TP + smooth) / (TP + alpha FP + beta FN + smooth)      p = sigmoid(logits)

    and BCE ``binary_cross_entropy_with_logits``'s mean over the regions and the voxels
    not ignored. ``forward(net_output, target)`` takes (B, R, *spatial) logits and the
    label map (B, 1, *spatial), or nnU-Net's region target (B, R[+1], *spatial) (bool
    or float 0/1; the ignore channel last when ``ignore_label`` is set). Other
    arguments as :class:`Tversky_and_CE_loss`; ``regions`` as :class:`DC_and_BCE_loss`'s.
    """

    def __init__(
        self,
        regions: Sequence,
        alpha: float = 0.3,
        beta: float = 0.7,
        batch_dice: bool = False,
        do_bg: bool = True,
        smooth: float = 1e-5,
        weight_ce: float = 1.0,
        weight_tversky: float = 1.0,
        ignore_label: int | None = None,
        ddp: bool = True,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            alpha, beta, batch_dice, do_bg, smooth, weight_ce, weight_tversky,
            ignore_label, ddp, backend=backend,
        )  # fmt: skip
        if regions is None:
            raise fasttversky.InvalidInputError("regions must be given (a region table)")
        ii = self.ignore_label
        _, self.regions = _check_region_args(regions, ii, ii is not None)
        self._ignore_channel = self.ignore_label is not None

    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = self._target(net_output, target)
        slow = lambda: _mirror.tversky_and_bce_forward(  # noqa: E731
            self, net_output, self._onehot(net_output, target)
        )
        if isinstance(t, Fallback):
            _common.warn_fallback(t, _WHO_TVERSKY)
            return slow()
        options = self._region_options(net_output.shape[1], t)
        return _common.run_or_fall_back(
            lambda: self.weight_tversky * _common.fused_loss(net_output, t.tensor, options),
            slow,
            _WHO_TVERSKY,
        )

    def _region_options(self, C: int, t: _Target) -> fasttversky.TverskyOptions:
        return self._options_for(
            C,
            t,
            clamp_terms=True,  # fasttversky's own Tversky term
            alpha=self.alpha,
            beta=self.beta,
            ce_weight=self.weight_ce / self.weight_tversky,
            include_background=self.do_bg,
            batch=self.batch_dice,
            reduction="mean",
            smooth_nr=self.smooth,
            smooth_dr=self.smooth,
            backend=self.backend,
            sync_across_ranks=self.batch_dice and self.ddp and _is_distributed(),
        )


_WHO_BCE = "fasttversky.compat.nnunet.DC_and_BCE_loss"
_WHO_TVERSKY = "fasttversky.compat.nnunet.Tversky_and_BCE_loss"

__all__ = ["DC_and_BCE_loss", "Tversky_and_BCE_loss", "region_masks"]

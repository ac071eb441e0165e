"""``tversky_loss``: input checks, the fused pass, and the (B, C) part of the loss.

The loss is computed in two stages.

1. ``tversky_stats`` (``_stats_op.py``: one fused pass of the selected backend, as an
   autograd node) reads logits and target once and returns, per sample and class,
   ``[sum_pg, sum_p, sum_g]`` in float64 (plus the cross-entropy family's per-class
   sums when ``ce_weight > 0``: plain, label-smoothed or focal CE, see ``_spec.py``). It
   is the only voxel-sized work, and saves nothing voxel-sized for backward.
2. Everything after the sums acts on (B, C) numbers and is ordinary, differentiable torch
   code (:func:`_finalize`): batch pooling, the index, gamma, class selection and
   weights, reduction, and the cross-rank all-gather for DDP. Autograd turns the
   upstream gradient into ``dL/dstats``, which the pass's backward turns into dL/dlogits.
"""

from __future__ import annotations

import torch

from ._spec import ACTIVATIONS, CE_FOCAL, CE_NONE, CE_PLAIN, KernelSpec
from ._stats_op import checks_enabled, input_error, kernel_spec, tversky_stats
from .errors import InvalidInputError, InvalidInputTypeError
from .options import TverskyOptions, with_option_signature

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_LABEL_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)


@with_option_signature
def tversky_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *args,
    options: TverskyOptions | None = None,
    **kwargs,
) -> torch.Tensor:
    r"""Fused Tversky loss (Salehi et al., 2017) from logits, optionally + cross-entropy.

    Per sample and class (or per class over the whole batch when ``batch=True``)::

        TP = Σ p·g,  FP = Σ p·(1-g),  FN = Σ (1-p)·g
        T  = (TP + smooth_nr) / (TP + alpha·FP + beta·FN + smooth_dr)
        term = max(1 - T, 0) ** gamma

    ``alpha`` weighs false positives, ``beta`` false negatives (paper's best: 0.3, 0.7:
    recall over precision, for small lesions). alpha=beta=0.5 is the Dice loss, 1 the
    Tanimoto loss; gamma=0.75 gives the focal Tversky loss.

    The options are those of :class:`fasttversky.TverskyOptions` (declared and checked
    there): give them as keywords (``alpha`` and ``beta`` also by position), or as
    ``options=TverskyOptions(...)``, whose fields any keyword given as well overrides.

    Args:
        logits: (B, C, *spatial), 1-3 spatial dims, float32/float16/bfloat16/float64,
            any strides (contiguous and channels_last_3d are read without a copy).
        target: label map (B, *spatial) or (B, 1, *spatial) of
            uint8/int16/int32/int64/bool with labels in [0, C) (in {0, 1} when C = 1;
            in [0, num_labels) with ``regions``), never expanded to one-hot; a float
            label map (float32/float16/bfloat16/float64 holding whole numbers, as MONAI
            and nnU-Net store them), shaped (B, *spatial), or (B, 1, *spatial) when
            C > 1 or with ``regions``, read as it is (no conversion copy; NaN or
            fractional labels raise); or a float soft/one-hot target in [0, 1] of the
            logits' shape (B, C, *spatial) (including (B, 1, *spatial) for C = 1 without
            ``regions``), which the cross-entropy terms take too.

    Raises:
        InvalidInputError (a ValueError): an invalid option or input, including NaN/inf
        logits (NonFiniteInputError) and labels out of range, before anything is returned.
        BackendUnavailableError: an explicitly requested backend cannot run the inputs.

    Returns:
        A scalar (or the (B, C') / (C',) terms), float32 for half-precision logits,
        else the logits' dtype. The gradient w.r.t. ``target`` is not computed.
    """
    return options_loss(logits, target, TverskyOptions.of(args, kwargs, options))


def options_loss(logits: torch.Tensor, target: torch.Tensor, opts: TverskyOptions) -> torch.Tensor:
    """The loss for checked options: :func:`tversky_loss` after its options are built."""
    logits3, target3 = _prepare(logits, target, opts)
    B, C, N = logits3.shape
    opts.validate(C)
    spec = _call_spec(logits3, target3, opts)
    defer = opts.sync_across_ranks and _distributed()
    stats, flags = tversky_stats(logits3, target3, spec, opts.backend, defer)
    if spec.with_ce:  # the CE means' voxel count travels with the sums (DDP)
        stats = torch.cat([stats, _kept_voxels(stats, target3, spec, N)], dim=-1)
    if opts.sync_across_ranks:
        stats = _gather_checked(stats, flags, spec, defer)
    loss = _finalize(stats, opts, spec.soft_target)
    return loss.to(torch.promote_types(logits.dtype, torch.float32))


def _call_spec(logits3, target3, opts: TverskyOptions) -> KernelSpec:
    """The kernels' spec of this call (the CE family's kind and terms, the regions)."""
    if opts.regions is not None and target3.dim() == 3:
        raise InvalidInputError(
            "regions read a label map target ((B, *spatial) or (B, 1, *spatial)), got a "
            "float target of the logits' shape"
        )
    ce = CE_NONE
    if opts.ce_weight > 0:
        ce = CE_PLAIN if opts.ce_focal_gamma is None else CE_FOCAL
    gamma = opts.ce_focal_gamma or 0.0
    smoothing = opts.ce_label_smoothing if ce != CE_NONE else 0.0
    act = ACTIVATIONS[opts.activation]
    masks = opts.region_masks()
    return kernel_spec(logits3, target3, act, opts.ignore_index, ce, smoothing, gamma, masks)


def _distributed() -> bool:
    from .distributed import is_distributed

    return is_distributed()


def _gather_checked(stats, flags, spec: KernelSpec, deferred: bool) -> torch.Tensor:
    """The stats of every rank (DDP). A rank with bad input still reaches the all-gather
    (or its peers would wait there until the collective times out): it sends NaN stats,
    and every rank raises once the gathered stats show them; the bad rank says why."""
    if not deferred:
        return stats
    from .distributed import gather_stats

    error = input_error(flags, spec) if checks_enabled() else None
    if error is not None:
        stats = torch.full_like(stats, float("nan"))
    gathered = gather_stats(stats)
    if error is not None:
        raise error
    if checks_enabled() and bool(torch.isnan(gathered).any()):
        raise InvalidInputError(
            "another rank's input is bad (non-finite logits or invalid targets); its own "
            "error says which"
        )
    return gathered


# --------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------
def _flatten(x: torch.Tensor, lead: int) -> torch.Tensor:
    """View (lead dims, *spatial) as (lead dims, N) without copying when strides allow."""
    shape = (*x.shape[:lead], -1)
    try:
        return x.view(shape)
    except RuntimeError:
        # TODO(perf): a spatially non-mergeable view (e.g. a strided crop) costs one copy.
        return x.reshape(shape)


def _prepare(logits, target, opts: TverskyOptions):
    """(logits (B, C, N), target (B, N) label map or (B, C, N) soft target), views where
    possible (a float label map is passed on as it is: no conversion copy)."""
    _check_logits(logits, target, opts.activation)
    B, C = logits.shape[:2]
    spatial = tuple(logits.shape[2:])
    if target.is_floating_point():
        if target.dtype not in _FLOAT_DTYPES:
            raise InvalidInputTypeError(f"float target dtype {target.dtype} is not supported")
        if not is_float_label_map(target, logits, opts):
            _check_soft_target(target, logits, opts)
            return _flatten(logits, 2), _flatten(target, 2)
    elif target.dtype not in _LABEL_DTYPES:
        raise InvalidInputTypeError(
            "label map dtype must be one of uint8, int16, int32, int64, bool (or a float "
            f"dtype); got {target.dtype}"
        )
    tshape = tuple(target.shape)
    if tshape == (B, 1, *spatial):
        target = target[:, 0]
    elif tshape != (B, *spatial):
        raise InvalidInputError(
            f"target label map must have shape (B, *spatial) = {(B, *spatial)} or "
            f"(B, 1, *spatial), got {tshape} for logits of shape {tuple(logits.shape)}"
        )
    if target.dtype == torch.bool:
        target = target.view(torch.uint8)
    return _flatten(logits, 2), _flatten(target, 1)


def _check_logits(logits, target, activation: str) -> None:
    if not isinstance(logits, torch.Tensor):
        raise InvalidInputTypeError(f"logits must be a torch.Tensor, got {type(logits)}")
    if not isinstance(target, torch.Tensor):
        raise InvalidInputTypeError(f"target must be a torch.Tensor, got {type(target)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise InvalidInputTypeError(
            f"logits dtype must be float32, float16, bfloat16 or float64, got {logits.dtype}"
        )
    if not 3 <= logits.dim() <= 5:
        raise InvalidInputError(
            "logits must have shape (B, C, *spatial) with 1-3 spatial dims, "
            f"got {tuple(logits.shape)}"
        )
    if logits.numel() == 0:
        raise InvalidInputError(f"logits is empty: shape {tuple(logits.shape)}")
    if target.device != logits.device:
        raise InvalidInputError(f"target is on {target.device} but logits are on {logits.device}")
    if activation == "softmax" and logits.shape[1] < 2:
        raise InvalidInputError(
            "activation='softmax' needs C >= 2 classes; use 'sigmoid' for C = 1"
        )


def is_float_label_map(target, logits, opts: TverskyOptions) -> bool:
    """A float target is a label map when shaped (B, *spatial), or (B, 1, *spatial) with
    C > 1 or with regions (with C = 1 and no regions that shape is the logits' own: a
    soft target)."""
    B, C = logits.shape[:2]
    spatial = tuple(logits.shape[2:])
    shape = tuple(target.shape)
    if shape == (B, *spatial):
        return True
    return shape == (B, 1, *spatial) and (C > 1 or opts.regions is not None)


def _check_soft_target(target, logits, opts: TverskyOptions) -> None:
    if tuple(target.shape) != tuple(logits.shape):
        B = logits.shape[0]
        spatial = tuple(logits.shape[2:])
        raise InvalidInputError(
            f"a float target must have the logits' shape {tuple(logits.shape)} (a soft "
            f"target) or be a label map of shape {(B, *spatial)} or {(B, 1, *spatial)}, got "
            f"{tuple(target.shape)}"
        )
    if opts.ignore_index is not None:
        raise InvalidInputError(
            "ignore_index applies to label maps, not to soft targets of the logits' shape"
        )


# --------------------------------------------------------------------------------------
# the (B, C) part
# --------------------------------------------------------------------------------------
def _focal(d: torch.Tensor, gamma) -> torch.Tensor:
    """max(d, 0) ** gamma, continuous in gamma, with a finite gradient everywhere.

    ``gamma`` is a float or a tensor of one exponent per class (the last dim of d).
    d = 1 - T is below 0 only when smooth_nr > smooth_dr and the prediction is (nearly)
    perfect, or when activation="none" gets values outside [0, 1]. Clamping makes a
    perfect class cost 0 for every gamma, instead of a negative term at gamma = 1 and a
    positive floor otherwise. Where d <= 0 the gradient
    is 0; for 0 < gamma < 1 the true derivative gamma·d**(gamma-1) grows without bound
    as d -> 0+ and is finite for every d > 0. The inner where keeps pow's backward away
    from 0**(gamma-1) = inf (whose product with a zero upstream gradient would be NaN).
    """
    if isinstance(gamma, float) and gamma == 1.0:
        return d.clamp_min(0.0)
    pos = d > 0
    return torch.where(pos, torch.where(pos, d, torch.ones_like(d)) ** gamma, torch.zeros_like(d))


def _kept_classes(opts: TverskyOptions, C: int) -> slice:
    return slice(1, None) if not opts.include_background and C > 1 else slice(None)


def _class_values(stats: torch.Tensor, opts: TverskyOptions, name: str, kept: slice):
    """Option ``name`` for the kept classes: a (C',) float64 tensor, or None."""
    values = opts.per_class(name, stats.shape[1])
    return None if values is None else stats.new_tensor(values)[kept]


def _terms(stats: torch.Tensor, opts: TverskyOptions):
    """(terms, weights): the Tversky terms (B, C') (or (C',) with ``batch``) of the kept
    classes, times ``class_weights`` (C',) when given (else weights is None); with
    ``generalized`` one term per sample, (B, 1) (or (1,))."""
    kept = _kept_classes(opts, stats.shape[1])
    spg, sp, sg = stats[:, kept, 0], stats[:, kept, 1], stats[:, kept, 2]
    if opts.batch:
        spg, sp, sg = spg.sum(0), sp.sum(0), sg.sum(0)
    a, b = _class_values(stats, opts, "alpha", kept), _class_values(stats, opts, "beta", kept)
    tp, fp, fn = spg, sp - spg, sg - spg
    num, den = tp + opts.smooth_nr, tp + a * fp + b * fn + opts.smooth_dr
    if opts.generalized is not None:
        w = _generalized_weights(sg.detach(), opts.generalized)
        num = (w * tp).sum(-1, keepdim=True) + opts.smooth_nr
        den = (w * (tp + a * fp + b * fn)).sum(-1, keepdim=True) + opts.smooth_dr
    gamma = (
        opts.gamma if isinstance(opts.gamma, float) else _class_values(stats, opts, "gamma", kept)
    )
    d = 1.0 - num / den
    terms = _focal(d, gamma) if opts.clamp_terms else d**gamma
    weights = _class_values(stats, opts, "class_weights", kept)
    return (terms if weights is None else terms * weights), weights


def _generalized_weights(counts: torch.Tensor, kind: str) -> torch.Tensor:
    """Class weights from the label counts (..., C'): 1/G², 1/G or 1; a class absent from
    a sample (G = 0) takes the largest weight of its sample's present classes (MONAI's
    rule; 0 when no class is present), over the whole batch when counts is (C',)."""
    if kind == "uniform":
        return torch.ones_like(counts)
    w = counts.reciprocal() if kind == "simple" else (counts * counts).reciprocal()
    absent = torch.isinf(w)
    w = torch.where(absent, torch.zeros_like(w), w)
    return torch.where(absent, w.amax(-1, keepdim=True), w)


def _finalize(stats: torch.Tensor, opts: TverskyOptions, soft_target: bool = False):
    """stats (B, C, 3) float64 -> the loss, differentiably.

    With ``ce_weight > 0``, stats holds after [sum_pg, sum_p, sum_g] the CE family's
    columns (3, and 4 for the sigmoid focal term, see _spec.py) and, last, each sample's
    non-ignored voxel count (the same in every class), so that all of them travel through
    the DDP all-gather.
    """
    terms, weights = _terms(stats, opts)
    if opts.reduction == "none":
        return terms
    if opts.reduction == "sum":
        loss = terms.sum()
    else:
        per_sample = weights.sum() if weights is not None else terms.shape[-1]
        loss = terms.sum() / (per_sample * (1 if opts.batch else stats.shape[0]))
    if opts.ce_weight > 0:
        loss = loss + opts.ce_weight * _cross_entropy(stats, opts, soft_target)
    return loss


def _cross_entropy(stats, opts: TverskyOptions, soft_target: bool):
    """The CE family's mean over the (whole batch's) non-ignored voxels, from the sums.

    With w_c the ce_class_weights (1 without), kept the non-ignored voxels:
    softmax, label map: Σ_{b,c} w_c col3 / Σ_{b,c} w_c sum_g — F.cross_entropy's weighted
    mean (label smoothing included), since sum_g counts the voxels labelled c. softmax,
    soft target: Σ w_c col3 / kept (F.cross_entropy with probabilities: a mean over the
    voxels). sigmoid: Σ w_c col3 / (C · kept) — binary_cross_entropy_with_logits' mean
    with a per-channel weight. Focal: Σ w_c α-weighted col3 (col4) / (C · kept), MONAI's
    FocalLoss mean. When no voxel counts, the term is 0 (F.cross_entropy gives NaN;
    nnU-Net also skips its CE then). Autograd gives coef_ce = dL/dcol3 (and dL/dcol4).
    """
    C = stats.shape[1]
    w = opts.per_class("ce_class_weights", C)
    w = stats.new_tensor(w) if w is not None else stats.new_ones(C)
    kept = stats[:, 0, -1].sum()
    if opts.ce_focal_gamma is not None:
        num, den = (_focal_sums(stats, opts) * w).sum(), C * kept
    elif opts.activation == "softmax" and not soft_target:
        num, den = (stats[..., 3] * w).sum(), (stats[..., 2] * w).sum()
    else:
        num = (stats[..., 3] * w).sum()
        den = kept if opts.activation == "softmax" else C * kept
    # den does not depend on the logits; where() keeps 0/0 (no voxel counts) at 0 with a
    # finite gradient (num is 0 then too).
    return num / torch.where(den > 0, den, torch.ones_like(den))


def _focal_sums(stats, opts: TverskyOptions) -> torch.Tensor:
    """(B, C): the focal term's per-class sums with MONAI's scalar alpha applied:
    softmax, class 0 times 1 − α and the others α; sigmoid, α·q + (1 − α)·(1 − q) per
    element, i.e. (1 − α)·col3 + (2α − 1)·col4 (col4 = Σ q·h)."""
    a = opts.ce_focal_alpha
    if a is None:
        return stats[..., 3]
    if opts.activation == "sigmoid":
        return (1 - a) * stats[..., 3] + (2 * a - 1) * stats[..., 4]
    factor = stats.new_full((stats.shape[1],), a)
    factor[0] = 1 - a
    return stats[..., 3] * factor


def _kept_voxels(stats, target3, spec: KernelSpec, N: int) -> torch.Tensor:
    """(B, C, 1) float64: each sample's number of non-ignored voxels (the CE means).

    Without ignore_index (or with a soft target) that is N. With one and C > 1 classes,
    every kept voxel has exactly one label in [0, C) (others raise), so it is Σ_c sum_g.
    For C = 1 sum_g only counts the label-1 voxels, so the label-0 ones are counted here;
    with regions sum_g counts region memberships, so the kept voxels are counted here.
    TODO(perf): those two cases cost one extra read of the label map.
    """
    B, C, _ = stats.shape
    if spec.ignore_index is None or spec.soft_target:
        kept = torch.full((B,), float(N), dtype=torch.float64, device=stats.device)
    elif spec.region_masks is not None:
        kept = (target3 != spec.ignore_index).sum(-1, dtype=torch.float64)
    elif C > 1:
        kept = stats[..., 2].detach().sum(-1)
    else:
        kept = stats[:, 0, 2].detach()
        if spec.ignore_index != 0:
            kept = kept + (target3 == 0).sum(-1, dtype=torch.float64)
    return kept.view(B, 1, 1).expand(B, C, 1)

"""``tversky_loss``: argument checks, backend dispatch and the autograd wiring.

The loss is computed in two stages.

1. ``fasttversky::tversky_stats`` (a ``torch.library`` custom op, one fused pass of the
   selected backend) reads logits and target once and returns, per sample and class,
   ``stats = [sum_pg, sum_p, sum_g]`` in float64 (plus ``sum_ce``, the per-class
   cross-entropy sum, when ``ce_weight > 0``). It is the only voxel-sized work in
   the forward, and it saves nothing voxel-sized: its backward is the elementwise
   ``fasttversky::tversky_grad`` op, which recomputes p from the logits.
2. Everything after the sums acts on (B, C) numbers and is written as ordinary,
   differentiable torch code (``_finalize``): batch pooling, the index, gamma, class
   selection and weights, reduction, and the cross-rank all-reduce for DDP. Autograd
   turns the upstream gradient into ``dL/dstats``; since
   ``d sum_pg / dp = w·g`` and ``d sum_p / dp = w``, the per-voxel gradient is
   ``dL/dp = w·(coef_a + coef_b·g)`` with ``coef_a = dL/dsum_p``,
   ``coef_b = dL/dsum_pg`` (the paper's Eq. 5 in this notation, see csrc/tversky.h).

Because stage 1 is an opaque custom op with a registered autograd formula and a fake
(meta) implementation, ``torch.compile(fullgraph=True)`` traces the whole loss without a
graph break. Eager calls run the same two implementations through a plain
autograd.Function (``_TverskyStats``), because a custom op's first call imports
torch._dynamo. The backend is chosen inside the ops (``select_backend``, from the inputs'
metadata, microseconds), so tracing never has to run the selection.
"""

from __future__ import annotations

import math
import numbers
import os
import threading
from collections.abc import Sequence

import torch

from ._dispatch import _load, check_backend_name, select_backend
from ._spec import ACTIVATIONS, KernelSpec
from .ops._base import compute_dtype

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_LABEL_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)
_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------
def _spec_from(
    C: int, soft: bool, activation: int, ignore_index: int | None, with_ce: bool = False
) -> KernelSpec:
    return KernelSpec(
        activation=activation,
        soft_target=soft,
        ignore_index=ignore_index,
        num_classes=C,
        with_ce=with_ce,
    )


def _check_inputs() -> bool:
    # TODO(perf): on CUDA, raising on non-finite logits / bad labels costs one host sync
    # per forward; FASTTVERSKY_CHECK_INPUTS=0 trades the check for a sync-free step.
    return os.environ.get("FASTTVERSKY_CHECK_INPUTS", "1") != "0"


def _input_error(flags: torch.Tensor, spec: KernelSpec, ignore_index) -> str | None:
    """The message for the kernels' input-check counts, or None when the input is fine."""
    n_nonfinite, n_bad = (int(v) for v in flags.tolist())
    if n_nonfinite:
        return f"logits contain {n_nonfinite} non-finite value(s) (NaN or inf)"
    if n_bad:
        if spec.soft_target:
            return f"target has {n_bad} value(s) outside [0, 1]"
        ii = f" other than ignore_index={ignore_index}" if ignore_index is not None else ""
        return f"target has {n_bad} label(s) outside [0, {spec.num_labels}){ii}"
    return None


# A rank whose input is bad under DDP must still reach the all-gather (or its peers wait
# there until the collective times out): it poisons its stats with NaN and keeps its
# message here, and every rank raises once the gathered stats show the poison.
_deferred = threading.local()


def _stats_impl(
    logits: torch.Tensor,
    target: torch.Tensor,
    activation: int,
    ignore_index: int | None,
    backend: str,
    defer_checks: bool = False,
    with_ce: bool = False,
) -> torch.Tensor:
    B, C, _ = logits.shape
    spec = _spec_from(C, target.is_floating_point(), activation, ignore_index, with_ce)
    impl = _load(select_backend(backend, logits, target, spec))[0]
    stats, flags = impl.forward_stats(logits, target, spec)
    if _check_inputs():
        msg = _input_error(flags, spec, ignore_index)
        if msg is not None:
            if not defer_checks:
                raise ValueError(msg)
            _deferred.msg = msg
            stats = torch.full_like(stats, float("nan"))
    return stats


_tversky_stats_op = torch.library.custom_op(
    "fasttversky::tversky_stats", _stats_impl, mutates_args=()
)


@_tversky_stats_op.register_fake
def _(logits, target, activation, ignore_index, backend, defer_checks=False, with_ce=False):
    B, C, _ = logits.shape
    return logits.new_empty((B, C, 4 if with_ce else 3), dtype=torch.float64)


def _grad_impl(
    logits: torch.Tensor,
    target: torch.Tensor,
    coef_a: torch.Tensor,
    coef_b: torch.Tensor,
    coef_ce: torch.Tensor | None,
    activation: int,
    ignore_index: int | None,
    backend: str,
) -> torch.Tensor:
    B, C, _ = logits.shape
    with_ce = coef_ce is not None
    spec = _spec_from(C, target.is_floating_point(), activation, ignore_index, with_ce)
    # Same metadata as the forward, so the same backend (see _tversky_stats_op).
    impl = _load(select_backend(backend, logits, target, spec))[0]
    if with_ce:
        return impl.backward(logits, target, coef_a, coef_b, spec, coef_ce=coef_ce)
    return impl.backward(logits, target, coef_a, coef_b, spec)


_tversky_grad_op = torch.library.custom_op("fasttversky::tversky_grad", _grad_impl, mutates_args=())


@_tversky_grad_op.register_fake
def _(logits, target, coef_a, coef_b, coef_ce, activation, ignore_index, backend):
    return torch.empty_like(logits)


def _stats_setup_context(ctx, inputs, output):
    logits, target, activation, ignore_index, backend, _, with_ce = inputs
    ctx.save_for_backward(logits, target)
    ctx.args = (activation, ignore_index, backend)
    ctx.with_ce = with_ce


def _stats_backward(ctx, grad_stats, grad_fn=None):
    logits, target = ctx.saved_tensors
    coef_dtype = compute_dtype(logits.dtype)
    # dL/dp = w * (dL/dsum_p + dL/dsum_pg * g); sum_g does not depend on the logits.
    coef_a = grad_stats[..., 1].to(coef_dtype).contiguous()
    coef_b = grad_stats[..., 0].to(coef_dtype).contiguous()
    # The cross-entropy term: dL/dsum_ce, one more (B, C) coefficient (see _spec.py).
    coef_ce = grad_stats[..., 3].to(coef_dtype).contiguous() if ctx.with_ce else None
    grad = (grad_fn or _tversky_grad_op)(logits, target, coef_a, coef_b, coef_ce, *ctx.args)
    return grad, None, None, None, None, None, None


_tversky_stats_op.register_autograd(_stats_backward, setup_context=_stats_setup_context)


class _TverskyStats(torch.autograd.Function):
    """The eager twin of ``fasttversky::tversky_stats``: same work, same backward.

    Calling a ``torch.library`` custom op imports ``torch._dynamo`` (and with it sympy,
    ~1.5 s and 150 MiB) the first time, because torch wraps the op's implementation in
    a lazily built ``dynamo.disable``. Eager calls take this plain autograd.Function
    instead; only ``torch.compile`` tracing, which has loaded dynamo anyway, uses the ops.
    """

    @staticmethod
    def forward(ctx, logits, target, activation, ignore_index, backend, defer_checks, with_ce):
        inputs = (logits, target, activation, ignore_index, backend, defer_checks, with_ce)
        _stats_setup_context(ctx, inputs, None)
        return _stats_impl(*inputs)

    @staticmethod
    def backward(ctx, grad_stats):
        return _stats_backward(ctx, grad_stats, grad_fn=_grad_impl)


def _tversky_stats(logits, target, activation, ignore_index, backend, defer_checks, with_ce):
    """stats (B, C, 3 or 4) float64 through the custom op (compiling) or its eager twin."""
    if torch.compiler.is_compiling():
        return _tversky_stats_op(
            logits, target, activation, ignore_index, backend, defer_checks, with_ce
        )
    return _TverskyStats.apply(
        logits, target, activation, ignore_index, backend, defer_checks, with_ce
    )


# --------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------
def _is_scalar(value) -> bool:
    """A plain number or a 0-d tensor (``torch.tensor(0.3)``): one value for every class."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _per_class(name: str, value, C: int) -> list[float]:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.item() if value.dim() == 0 else value.flatten().tolist()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        vals = [float(value)] * C
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        vals = [float(v) for v in value]
        if len(vals) != C:
            raise ValueError(f"{name} has {len(vals)} entries but logits have C={C} classes")
    else:
        raise TypeError(f"{name} must be a float or a sequence of C floats, got {type(value)}")
    for v in vals:
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return vals


# torch's private hook for "inside a torch.func transform"; absent -> never detected.
_peek_functorch = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)


def _in_functorch_transform() -> bool:
    return _peek_functorch is not None and _peek_functorch() is not None


def _check_ignore_index(ignore_index) -> None:
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral)
    ):
        raise TypeError(f"ignore_index must be an int or None, got {ignore_index!r}")


def _flatten(x: torch.Tensor, lead: int) -> torch.Tensor:
    """View (lead dims, *spatial) as (lead dims, N) without copying when strides allow."""
    shape = (*x.shape[:lead], -1)
    try:
        return x.view(shape)
    except RuntimeError:
        # TODO(perf): a spatially non-mergeable view (e.g. a strided crop) costs one copy.
        return x.reshape(shape)


def _prepare(logits, target, activation, ignore_index):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits)}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"logits dtype must be float32, float16, bfloat16 or float64, got {logits.dtype}"
        )
    if not 3 <= logits.dim() <= 5:
        raise ValueError(
            "logits must have shape (B, C, *spatial) with 1-3 spatial dims, "
            f"got {tuple(logits.shape)}"
        )
    if logits.numel() == 0:
        raise ValueError(f"logits is empty: shape {tuple(logits.shape)}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    B, C = logits.shape[:2]
    spatial = tuple(logits.shape[2:])
    if activation == "softmax" and C < 2:
        raise ValueError("activation='softmax' needs C >= 2 classes; use 'sigmoid' for C = 1")

    if target.is_floating_point():
        if target.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"soft target dtype {target.dtype} is not supported")
        if tuple(target.shape) != tuple(logits.shape):
            raise ValueError(
                f"a float (soft/one-hot) target must have the logits' shape {tuple(logits.shape)}, "
                f"got {tuple(target.shape)}; pass integer labels of shape (B, *spatial) instead"
            )
        if ignore_index is not None:
            raise ValueError("ignore_index applies to integer label maps, not to float targets")
        target3 = _flatten(target, 2)
    else:
        if target.dtype not in _LABEL_DTYPES:
            raise TypeError(
                "label map dtype must be one of uint8, int16, int32, int64, bool; "
                f"got {target.dtype}"
            )
        tshape = tuple(target.shape)
        if tshape == (B, 1, *spatial):
            target = target[:, 0]
        elif tshape != (B, *spatial):
            raise ValueError(
                f"target label map must have shape (B, *spatial) = {(B, *spatial)} or "
                f"(B, 1, *spatial), got {tshape} for logits of shape {tuple(logits.shape)}"
            )
        if target.dtype == torch.bool:
            target = target.view(torch.uint8)
        target3 = _flatten(target, 1)
    return _flatten(logits, 2), target3


# --------------------------------------------------------------------------------------
# the (B, C) part
# --------------------------------------------------------------------------------------
def _focal(d: torch.Tensor, gamma: float) -> torch.Tensor:
    """max(d, 0) ** gamma, continuous in gamma, with a finite gradient everywhere.

    d = 1 - T is below 0 only when smooth_nr > smooth_dr and the prediction is (nearly)
    perfect, or when activation="none" gets values outside [0, 1]. Clamping makes a
    perfect class cost 0 for every gamma, instead of a negative term at gamma = 1 and a
    positive floor otherwise. Where d <= 0 the gradient
    is 0; for 0 < gamma < 1 the true derivative gamma·d**(gamma-1) grows without bound
    as d -> 0+ and is finite for every d > 0. The inner where keeps pow's backward away
    from 0**(gamma-1) = inf (whose product with a zero upstream gradient would be NaN).
    """
    if gamma == 1.0:
        return d.clamp_min(0.0)
    pos = d > 0
    return torch.where(pos, torch.where(pos, d, torch.ones_like(d)) ** gamma, torch.zeros_like(d))


def _finalize(
    stats,
    alpha,
    beta,
    *,
    include_background,
    batch,
    reduction,
    smooth_nr,
    smooth_dr,
    gamma,
    class_weights,
    sync_across_ranks,
    ce_weight=0.0,
    ce_class_weights=None,
    activation="softmax",
    clamp_terms=True,
):
    """stats (B, C, 3) float64 -> the loss, differentiably.

    With ``ce_weight > 0``, stats is (B, C, 4) (column 3: sum_ce) for softmax, and
    (B, C, 5) for sigmoid, whose column 4 holds the sample's non-ignored voxel count
    (the same in every class), so that both travel through the DDP all-gather.
    """
    if sync_across_ranks:
        from .distributed import gather_stats, is_distributed

        if is_distributed():
            stats = gather_stats(stats)
            if _check_inputs() and bool(torch.isnan(stats).any()):
                msg, _deferred.msg = getattr(_deferred, "msg", None), None
                raise ValueError(
                    msg
                    or "another rank's input is bad (non-finite logits or invalid "
                    "targets); its own error says which"
                )
    B, C, _ = stats.shape
    ce = _cross_entropy(stats, ce_class_weights, activation) if ce_weight else None
    spg, sp, sg = stats[..., 0], stats[..., 1], stats[..., 2]
    if batch:
        spg, sp, sg = spg.sum(0), sp.sum(0), sg.sum(0)
    a = stats.new_tensor(alpha)
    b = stats.new_tensor(beta)
    tp, fp, fn = spg, sp - spg, sg - spg
    t = (tp + smooth_nr) / (tp + a * fp + b * fn + smooth_dr)
    terms = _focal(1.0 - t, gamma) if clamp_terms else (1.0 - t) ** gamma
    w = stats.new_tensor(class_weights) if class_weights is not None else None
    if not include_background and C > 1:
        terms = terms[..., 1:]
        w = w[1:] if w is not None else None
    if w is not None:
        terms = terms * w
    if reduction == "none":
        return terms
    if reduction == "sum":
        loss = terms.sum()
    else:
        n = 1 if batch else B
        denom = (w.sum() if w is not None else terms.shape[-1]) * n
        loss = terms.sum() / denom
    if ce is not None:
        loss = loss + ce_weight * ce
    return loss


def _cross_entropy(stats, ce_class_weights, activation):
    """The cross-entropy mean over the (whole batch's) non-ignored voxels, from the sums.

    softmax: Σ_{b,c} w_c sum_ce[b, c] / Σ_{b,c} w_c sum_g[b, c] — F.cross_entropy's
    weighted mean, since sum_g counts the voxels labelled c. sigmoid: Σ_{b,c} w_c
    sum_ce[b, c] / (C · Σ_b kept_b) — binary_cross_entropy_with_logits' mean with a
    per-channel weight. When no voxel counts, the term is 0 (F.cross_entropy gives NaN;
    nnU-Net also skips its CE then). Autograd gives dL/dsum_ce = coef_ce.
    """
    C = stats.shape[1]
    sum_ce = stats[..., 3]
    if activation == "softmax":
        count = stats[..., 2]
        if ce_class_weights is not None:
            w = stats.new_tensor(ce_class_weights)
            num, den = (sum_ce * w).sum(), (count * w).sum()
        else:
            num, den = sum_ce.sum(), count.sum()
    else:
        if ce_class_weights is not None:
            sum_ce = sum_ce * stats.new_tensor(ce_class_weights)
        num = sum_ce.sum()
        den = stats[:, 0, 4].sum() * C
    # den does not depend on the logits; where() keeps 0/0 (no voxel counts) at 0 with a
    # finite gradient (num is 0 then too).
    return num / torch.where(den > 0, den, torch.ones_like(den))


def _kept_voxels(stats, target3, spec: KernelSpec, N: int) -> torch.Tensor:
    """(B, C, 1) float64: each sample's number of non-ignored voxels (sigmoid CE's mean).

    Without ignore_index that is N; with one and C > 1 every kept voxel has exactly one
    label in [0, C) (others raise), so it is Σ_c sum_g. For C = 1 sum_g only counts the
    label-1 voxels, so the label-0 ones are counted here.
    TODO(perf): that case costs one extra read of the label map.
    """
    B, C, _ = stats.shape
    if spec.ignore_index is None:
        kept = torch.full((B,), float(N), dtype=torch.float64, device=stats.device)
    elif C > 1:
        kept = stats[..., 2].detach().sum(-1)
    else:
        kept = stats[:, 0, 2].detach()
        if spec.ignore_index != 0:
            kept = kept + (target3 == 0).sum(-1, dtype=torch.float64)
    return kept.view(B, 1, 1).expand(B, C, 1)


def tversky_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float | Sequence[float] = 0.3,
    beta: float | Sequence[float] = 0.7,
    *,
    activation: str = "softmax",
    include_background: bool = True,
    batch: bool = False,
    reduction: str = "mean",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    gamma: float = 1.0,
    ignore_index: int | None = None,
    class_weights: Sequence[float] | None = None,
    backend: str = "auto",
    sync_across_ranks: bool = False,
    ce_weight: float = 0.0,
    ce_class_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    r"""Fused Tversky loss (Salehi et al., 2017) from logits, optionally + cross-entropy.

    Per sample and class (or per class over the whole batch when ``batch=True``)::

        TP = Σ p·g,  FP = Σ p·(1-g),  FN = Σ (1-p)·g
        T  = (TP + smooth_nr) / (TP + alpha·FP + beta·FN + smooth_dr)
        term = max(1 - T, 0) ** gamma

    ``alpha`` weighs false positives and ``beta`` false negatives, as in the paper:
    raising ``beta`` trades precision for recall, which is what small lesions need
    (paper's best: alpha=0.3, beta=0.7). alpha=beta=0.5 is the Dice loss, alpha=beta=1
    the Tanimoto (Jaccard) loss; gamma=1 is the paper's loss, gamma=0.75 the focal
    Tversky loss.

    Args:
        logits: (B, C, *spatial), 1-3 spatial dims, float32/float16/bfloat16/float64,
            any strides (contiguous and channels_last_3d are read without a copy).
        target: integer label map (B, *spatial) or (B, 1, *spatial) of
            uint8/int16/int32/int64/bool with labels in [0, C) (in {0, 1} when C = 1),
            never expanded to one-hot; or a float (B, C, *spatial) one-hot/soft target
            in [0, 1].
        alpha, beta: >= 0, a float or one value per class.
        activation: "softmax" (C >= 2), "sigmoid" (binary C = 1 or multi-label) or
            "none" (logits already are probabilities).
        include_background: if False, class 0 adds no term (ignored when C = 1, whose
            single channel is the foreground).
        batch: pool the sums over the batch (one term per class).
        reduction: "mean" (Σ w_c·term / (Σ w_c · B), B = 1 with ``batch=True``), "sum"
            or "none", which returns the (B, C') terms (times ``class_weights`` when
            given), or (C',) with ``batch=True``; C' = classes kept.
        smooth_nr, smooth_dr: >= 0, added to numerator and denominator.
        gamma: > 0, exponent of each term. The term is ``max(1 - T, 0) ** gamma``
            for every gamma (1 - T < 0 only when smooth_nr > smooth_dr, or for
            activation="none" inputs outside [0, 1]): continuous in
            gamma, exactly 0 for a perfectly predicted class, with a finite gradient
            (0 where 1 - T <= 0). ``compat.monai`` keeps MONAI's unclamped 1 - T.
        ignore_index: label value whose voxels add nothing and get zero gradient.
        class_weights: C non-negative weights of the terms.
        backend: "auto", "cpu", "torch", "triton" or "cuda" (env FASTTVERSKY_BACKEND
            overrides "auto"). An explicit backend that cannot run raises with reasons.
        sync_across_ranks: under torch.distributed, compute the loss on the batch
            concatenated over all ranks (the per-sample sums are all-gathered, with
            autograd), so DDP's averaged gradients equal single-process training.
        ce_weight: >= 0. When > 0 the result is the Tversky loss (as above) +
            ``ce_weight`` × CE, computed in the same single pass over the volume (the
            compound loss of nnU-Net / MONAI DiceCE). CE is always ONE mean over the
            whole batch's non-ignored voxels, whatever ``batch`` says (like
            ``F.cross_entropy``), and it is added once to the "mean" or "sum" of the
            Tversky terms; ``reduction="none"`` raises. Needs an integer label map and
            activation "softmax" or "sigmoid".
            softmax: ``F.cross_entropy(logits, labels, weight=ce_class_weights,
            ignore_index=ignore_index)``, i.e. Σ w_y·(−log p_y) / Σ w_y over the
            non-ignored voxels. sigmoid: ``F.binary_cross_entropy_with_logits(logits,
            onehot, weight=ce_class_weights[c] per channel)`` where onehot is
            (label == c), or (label == 1) for C = 1, averaged over the C × non-ignored
            voxels (ignored voxels add nothing, like a zero weight, and are not counted).
            Where no voxel counts, CE is 0 rather than F.cross_entropy's NaN.
        ce_class_weights: C non-negative weights of the CE classes (torch's ``weight``),
            not all zero; independent of ``class_weights``.

    Returns:
        A scalar (or the (B, C') / (C',) terms), float32 for half-precision logits,
        else the logits' dtype. The gradient w.r.t. ``target`` is not computed.
    """
    return _tversky_loss(
        logits,
        target,
        alpha,
        beta,
        clamp_terms=True,
        activation=activation,
        include_background=include_background,
        batch=batch,
        reduction=reduction,
        smooth_nr=smooth_nr,
        smooth_dr=smooth_dr,
        gamma=gamma,
        ignore_index=ignore_index,
        class_weights=class_weights,
        backend=backend,
        sync_across_ranks=sync_across_ranks,
        ce_weight=ce_weight,
        ce_class_weights=ce_class_weights,
    )


def _tversky_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float | Sequence[float] = 0.3,
    beta: float | Sequence[float] = 0.7,
    *,
    clamp_terms: bool,
    activation: str = "softmax",
    include_background: bool = True,
    batch: bool = False,
    reduction: str = "mean",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    gamma: float = 1.0,
    ignore_index: int | None = None,
    class_weights: Sequence[float] | None = None,
    backend: str = "auto",
    sync_across_ranks: bool = False,
    ce_weight: float = 0.0,
    ce_class_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """``tversky_loss`` with a choice of term: ``clamp_terms=False`` keeps the unclamped
    ``(1 - T) ** gamma`` of MONAI (gamma = 1 there), for ``compat.monai``'s parity."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    check_backend_name(backend)
    _check_ignore_index(ignore_index)
    if not torch.compiler.is_compiling() and _in_functorch_transform():
        # The fused ops carry an autograd formula (torch.library.register_autograd), which
        # torch.func's transforms cannot use: say so instead of torch's internal message.
        raise RuntimeError(
            "fasttversky.tversky_loss does not support torch.func transforms (grad, vmap, "
            "jacrev, ...); use loss.backward() or torch.autograd.grad instead"
        )
    for name, v in (("smooth_nr", smooth_nr), ("smooth_dr", smooth_dr)):
        if not math.isfinite(float(v)) or v < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {v}")
    if not (math.isfinite(float(gamma)) and gamma > 0):
        raise ValueError(f"gamma must be finite and > 0, got {gamma}")
    ce_weight = float(ce_weight)
    if not (math.isfinite(ce_weight) and ce_weight >= 0):
        raise ValueError(f"ce_weight must be finite and >= 0, got {ce_weight}")
    logits3, target3 = _prepare(logits, target, activation, ignore_index)
    B, C, N = logits3.shape
    ce_w = None
    if ce_class_weights is not None:
        ce_w = _per_class("ce_class_weights", ce_class_weights, C)
        if sum(ce_w) <= 0:
            raise ValueError("ce_class_weights must not all be zero")
    with_ce = ce_weight > 0
    if with_ce:
        if reduction == "none":
            raise ValueError(
                "reduction='none' is not defined with ce_weight > 0 (the cross-entropy is "
                "one mean over the batch); use 'mean' or 'sum'"
            )
        if target3.is_floating_point():
            raise ValueError(
                "ce_weight > 0 needs an integer label map target, got a float target "
                "(for a one-hot target pass target.argmax(1))"
            )
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(
                f"ce_weight > 0 needs activation 'softmax' or 'sigmoid', got {activation!r}"
            )
    alpha_c = _per_class("alpha", alpha, C)
    beta_c = _per_class("beta", beta, C)
    weights = None
    if class_weights is not None:
        weights = _per_class("class_weights", class_weights, C)
        kept = weights[1:] if (not include_background and C > 1) else weights
        if sum(kept) <= 0:
            raise ValueError("class_weights of the kept classes must not all be zero")

    act = ACTIVATIONS[activation]
    spec = _spec_from(C, target3.is_floating_point(), act, ignore_index, with_ce)
    defer = False
    if sync_across_ranks:
        from .distributed import is_distributed

        defer = is_distributed()
    if with_ce:
        stats = _tversky_stats(logits3, target3, act, ignore_index, backend, defer, True)
        if activation == "sigmoid":
            stats = torch.cat([stats, _kept_voxels(stats, target3, spec, N)], dim=-1)
    else:
        stats = _tversky_stats(logits3, target3, act, ignore_index, backend, defer, False)
    loss = _finalize(
        stats,
        alpha_c,
        beta_c,
        include_background=include_background,
        batch=batch,
        reduction=reduction,
        smooth_nr=float(smooth_nr),
        smooth_dr=float(smooth_dr),
        gamma=float(gamma),
        class_weights=weights,
        sync_across_ranks=sync_across_ranks,
        ce_weight=ce_weight,
        ce_class_weights=ce_w,
        activation=activation,
        clamp_terms=clamp_terms,
    )
    out_dtype = torch.promote_types(logits.dtype, torch.float32)
    return loss.to(out_dtype)

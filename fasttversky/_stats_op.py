"""The fused pass as an autograd node: ``tversky_stats(logits, target, spec, ...)``.

``fasttversky::tversky_stats`` (a ``torch.library`` custom op, one fused pass of the
selected backend) reads logits and target once and returns ``stats`` (B, C, 3 +
spec.ce_columns) float64 (``[sum_pg, sum_p, sum_g]``, then the cross-entropy family's
columns; contract in ``_spec.py``) and the input check counts ``flags`` (2,) int64. It
saves nothing voxel-sized: its backward is the elementwise ``fasttversky::tversky_grad``
op, which recomputes p from the logits. Since ``d sum_pg / dp = w·g`` and
``d sum_p / dp = w``, the per-voxel gradient is ``dL/dp = w·(coef_a + coef_b·g)`` with
``coef_a = dL/dsum_p``, ``coef_b = dL/dsum_pg`` (the paper's Eq. 5 in this notation, see
csrc/tversky.h), plus the CE family's terms driven by ``coef_ce = dL/d col 3`` and, for
the sigmoid focal term, ``coef_ce2 = dL/d col 4``.

The op takes the call's :class:`KernelSpec` as plain arguments (activation, ignore_index,
the CE kind, label smoothing, focal gamma, the region bitmasks as an int list); whether
the target is a soft target or a float label map is read from its shape and dtype, so the
spec a backend gets is rebuilt identically in the forward and the backward.

Because the op is opaque with a registered autograd formula and a fake (meta)
implementation, ``torch.compile(fullgraph=True)`` traces the loss without a graph break.
Eager calls run the same two implementations through a plain autograd.Function
(``_TverskyStats``), because a custom op's first call imports torch._dynamo (slow,
and needless for eager use).

Second derivatives. The kernels' backward is not itself differentiable. When a graph of
the gradient is requested (``create_graph=True``, e.g. a gradient penalty), the backward
instead recomputes the sums with the torch backend's plain, differentiable ops and lets
autograd differentiate them: the same gradient, now with a graph, at the torch
backend's memory cost, paid only by those calls. ``torch.func`` transforms (vmap, grad,
jacrev) cannot enter an autograd.Function without a vmap rule, so under them the whole
pass is that plain torch computation (:func:`differentiable_stats`).
"""

from __future__ import annotations

import os

import torch

from ._dispatch import _load, select_backend
from ._spec import CE_NONE, KernelSpec
from .errors import InvalidInputError, NonFiniteInputError
from .ops._base import compute_dtype, in_functorch_transform


def checks_enabled() -> bool:
    # TODO(perf): on CUDA, raising on non-finite logits / bad labels costs one host sync
    # per forward; FASTTVERSKY_CHECK_INPUTS=0 trades the check for a sync-free step.
    return os.environ.get("FASTTVERSKY_CHECK_INPUTS", "1") != "0"


def input_error(flags: torch.Tensor, spec: KernelSpec, target=None) -> InvalidInputError | None:
    """The exception for the kernels' input-check counts, or None when the input is fine.
    Given the target, a float label map's message says which bad values it holds."""
    n_nonfinite, n_bad = (int(v) for v in flags.tolist())
    n_unreadable = None
    if n_bad and not n_nonfinite and spec.float_labels and target is not None:
        n_unreadable = _count_unreadable_labels(target)
    return _input_error(n_nonfinite, n_bad, spec, n_unreadable)


def _input_error(
    n_nonfinite: int, n_bad: int, spec: KernelSpec, n_unreadable: int | None = None
) -> InvalidInputError | None:
    """``n_unreadable``: how many of a float label map's ``n_bad`` values are NaN, inf or
    not whole numbers (None: not known, the message then names both causes)."""
    if n_nonfinite:
        return NonFiniteInputError(f"logits contain {n_nonfinite} non-finite value(s) (NaN or inf)")
    if not n_bad:
        return None
    if spec.soft_target:
        return InvalidInputError(f"target has {n_bad} value(s) outside [0, 1] (or NaN)")
    ii = spec.ignore_index
    other = f" other than ignore_index={ii}" if ii is not None else ""
    where = f"outside [0, {spec.num_labels}){other}"
    if not spec.float_labels:
        return InvalidInputError(f"target has {n_bad} label(s) {where}")
    if n_unreadable is None:
        return InvalidInputError(
            f"float label map target has {n_bad} value(s) {where}, or not integral (NaN, "
            "inf or a fraction)"
        )
    parts = []
    if n_unreadable:
        parts.append(f"{n_unreadable} value(s) that are not integral (NaN, inf or a fraction)")
    if n_bad > n_unreadable:
        parts.append(f"{n_bad - n_unreadable} label(s) {where}")
    return InvalidInputError("float label map target has " + " and ".join(parts))


def _count_unreadable_labels(target: torch.Tensor) -> int:
    """A float label map's NaN, inf and fractional values (read only to word an error)."""
    return int((~torch.isfinite(target) | (target != torch.trunc(target))).sum())


def kernel_spec(
    logits,
    target,
    activation,
    ignore_index,
    ce=CE_NONE,
    label_smoothing=0.0,
    focal_gamma=0.0,
    region_masks=None,
) -> KernelSpec:
    """The backends' spec of a call, from the flattened inputs and the op's arguments:
    a float target of the logits' rank (B, C, N) is a soft target, one of rank 2 (B, N)
    a float label map."""
    floating = target.is_floating_point()
    soft = floating and target.dim() == logits.dim()
    return KernelSpec(
        activation=activation,
        soft_target=soft,
        ignore_index=ignore_index,
        num_classes=logits.shape[1],
        ce=ce,
        label_smoothing=float(label_smoothing),
        focal_gamma=float(focal_gamma),
        float_labels=floating and not soft,
        region_masks=None if region_masks is None else tuple(int(m) for m in region_masks),
    )


def _term_args(spec: KernelSpec) -> tuple:
    """The op's arguments after ``defer_checks`` that carry the spec's terms."""
    masks = None if spec.region_masks is None else list(spec.region_masks)
    return spec.ce, spec.label_smoothing, spec.focal_gamma, masks


def _stats_impl(
    logits: torch.Tensor,
    target: torch.Tensor,
    activation: int,
    ignore_index: int | None,
    backend: str,
    defer_checks: bool = False,
    ce: int = CE_NONE,
    label_smoothing: float = 0.0,
    focal_gamma: float = 0.0,
    region_masks: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(stats, flags). Bad input raises here, unless ``defer_checks`` (DDP: every rank
    must reach the all-gather first; the loss raises after it, from the flags)."""
    spec = kernel_spec(
        logits, target, activation, ignore_index, ce, label_smoothing, focal_gamma, region_masks
    )
    impl = _load(select_backend(backend, logits, target, spec))[0]
    stats, flags = impl.forward_stats(logits, target, spec)
    if checks_enabled() and not defer_checks:
        error = input_error(flags, spec, target)
        if error is not None:
            raise error
    return stats, flags


_tversky_stats_op = torch.library.custom_op(
    "fasttversky::tversky_stats", _stats_impl, mutates_args=()
)


@_tversky_stats_op.register_fake
def _(logits, target, activation, ignore_index, backend, defer_checks=False, ce=CE_NONE, *rest):
    B, C, _ = logits.shape
    spec = kernel_spec(logits, target, activation, ignore_index, ce, *rest)
    stats = logits.new_empty((B, C, 3 + spec.ce_columns), dtype=torch.float64)
    return stats, logits.new_empty((2,), dtype=torch.int64)


def _grad_impl(
    logits: torch.Tensor,
    target: torch.Tensor,
    coef_a: torch.Tensor,
    coef_b: torch.Tensor,
    coef_ce: torch.Tensor | None,
    coef_ce2: torch.Tensor | None,
    activation: int,
    ignore_index: int | None,
    backend: str,
    ce: int = CE_NONE,
    label_smoothing: float = 0.0,
    focal_gamma: float = 0.0,
    region_masks: list[int] | None = None,
) -> torch.Tensor:
    spec = kernel_spec(
        logits, target, activation, ignore_index, ce, label_smoothing, focal_gamma, region_masks
    )
    # Same metadata as the forward, so the same backend.
    impl = _load(select_backend(backend, logits, target, spec))[0]
    if coef_ce2 is not None:  # only the sigmoid focal term has a second CE column
        return impl.backward(
            logits, target, coef_a, coef_b, spec, coef_ce=coef_ce, coef_ce2=coef_ce2
        )
    if coef_ce is not None:
        return impl.backward(logits, target, coef_a, coef_b, spec, coef_ce=coef_ce)
    return impl.backward(logits, target, coef_a, coef_b, spec)


_tversky_grad_op = torch.library.custom_op("fasttversky::tversky_grad", _grad_impl, mutates_args=())


@_tversky_grad_op.register_fake
def _(logits, target, coef_a, coef_b, coef_ce, coef_ce2, *args):
    return torch.empty_like(logits)


# The op's inputs: logits, target, activation, ignore_index, backend, defer_checks, then
# the terms (_term_args); backward returns one gradient (or None) per input.
_N_INPUTS = 10


def _setup_context(ctx, inputs, output):
    logits, target, activation, ignore_index, backend, _, *terms = inputs
    ctx.save_for_backward(logits, target)
    ctx.args = (activation, ignore_index, backend, *terms)
    ctx.set_materialize_grads(True)


def _ctx_spec(ctx, logits, target) -> KernelSpec:
    activation, ignore_index, _, *terms = ctx.args
    return kernel_spec(logits, target, activation, ignore_index, *terms)


def _differentiable_grad(logits, target, grad_stats, spec: KernelSpec):
    """dL/dlogits with a graph (create_graph=True): autograd through plain torch sums."""
    stats, _ = _load("torch")[0].forward_stats(logits, target, spec)
    (grad,) = torch.autograd.grad(stats, logits, grad_stats, create_graph=True)
    return grad


def _backward(ctx, grad_stats, grad_flags=None, grad_fn=None):
    none = (None,) * (_N_INPUTS - 1)
    if not ctx.needs_input_grad[0]:  # only a soft target requires grad: none is computed
        return (None, *none)
    logits, target = ctx.saved_tensors
    spec = _ctx_spec(ctx, logits, target)
    if torch.is_grad_enabled():  # only under create_graph=True: a gradient with a graph
        return (_differentiable_grad(logits, target, grad_stats, spec), *none)
    cdt = compute_dtype(logits.dtype)

    def coef(column):
        return grad_stats[..., column].to(cdt).contiguous()

    # dL/dp = w * (dL/dsum_p + dL/dsum_pg * g); sum_g does not depend on the logits.
    # The CE family: dL/dcol3 (and dL/dcol4 for the sigmoid focal term), see _spec.py.
    coef_ce = coef(3) if spec.ce_columns >= 1 else None
    coef_ce2 = coef(4) if spec.ce_columns == 2 else None
    activation, ignore_index, backend, *terms = ctx.args
    grad = (grad_fn or _tversky_grad_op)(
        logits, target, coef(1), coef(0), coef_ce, coef_ce2,
        activation, ignore_index, backend, *terms,
    )  # fmt: skip
    return (grad, *none)


_tversky_stats_op.register_autograd(_backward, setup_context=_setup_context)


class _TverskyStats(torch.autograd.Function):
    """The eager twin of ``fasttversky::tversky_stats``: same work, same backward."""

    @staticmethod
    def forward(ctx, *inputs):
        _setup_context(ctx, inputs, None)
        stats, flags = _stats_impl(*inputs)
        ctx.mark_non_differentiable(flags)
        return stats, flags

    @staticmethod
    def backward(ctx, grad_stats, grad_flags):
        return _backward(ctx, grad_stats, grad_fn=_grad_impl)


def differentiable_stats(logits, target, spec: KernelSpec) -> torch.Tensor:
    """stats from plain torch ops, for torch.func transforms. NaN/inf logits give NaN sums
    (vmap cannot raise on data); labels out of range raise wherever the target's values
    can be read (not when vmap maps over the target itself)."""
    torch_backend = _load("torch")[0]
    if checks_enabled():
        try:
            n_bad = _count_bad_targets(target, spec)
        except RuntimeError:  # vmap over the target: no data-dependent check possible
            n_bad = 0
        error = _input_error(0, n_bad, spec)
        if error is not None:
            raise error
    x = torch.where(torch.isfinite(logits), logits, torch.full_like(logits, float("nan")))
    return torch_backend.forward_stats(x, target, spec)[0]


def _count_bad_targets(target: torch.Tensor, spec: KernelSpec) -> int:
    """The kernels' bad-target count (flags[1]) from plain torch ops (see _spec.py)."""
    if spec.soft_target:
        return int(((target < 0) | (target > 1) | ~torch.isfinite(target)).sum())
    t = target if spec.float_labels else target.long()
    valid = (t >= 0) & (t < spec.num_labels)
    if spec.float_labels:  # NaN compares false: it is never valid, nor the ignore value
        valid &= t == torch.trunc(t)
    bad = ~valid
    if spec.ignore_index is not None:
        bad &= t != spec.ignore_index
    return int(bad.sum())


def tversky_stats(logits, target, spec: KernelSpec, backend: str, defer_checks: bool):
    """(stats (B, C, 3 + spec.ce_columns) float64, flags (2,) int64) through the custom op
    (compiling), its eager twin, or plain torch under a torch.func transform (flags then
    zero)."""
    args = (logits, target, spec.activation, spec.ignore_index, backend, defer_checks)
    args += _term_args(spec)
    if torch.compiler.is_compiling():
        return _tversky_stats_op(*args)
    if in_functorch_transform():
        stats = differentiable_stats(logits, target, spec)
        return stats, torch.zeros(2, dtype=torch.int64)
    return _TverskyStats.apply(*args)

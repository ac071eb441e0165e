"""The fused pass as an autograd node: ``tversky_stats(logits, target, ...)``.

``fasttversky::tversky_stats`` (a ``torch.library`` custom op, one fused pass of the
selected backend) reads logits and target once and returns ``stats`` (B, C, 3 or 4)
float64 (``[sum_pg, sum_p, sum_g(, sum_ce)]``, contract in ``_spec.py``) and the input
check counts ``flags`` (2,) int64. It saves nothing voxel-sized: its backward is the
elementwise ``fasttversky::tversky_grad`` op, which recomputes p from the logits. Since
``d sum_pg / dp = w·g`` and ``d sum_p / dp = w``, the per-voxel gradient is
``dL/dp = w·(coef_a + coef_b·g)`` with ``coef_a = dL/dsum_p``, ``coef_b = dL/dsum_pg``
(the paper's Eq. 5 in this notation, see csrc/tversky.h).

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
from ._spec import CE_NONE, CE_PLAIN, KernelSpec
from .errors import InvalidInputError, NonFiniteInputError
from .ops._base import compute_dtype, in_functorch_transform


def checks_enabled() -> bool:
    # TODO(perf): on CUDA, raising on non-finite logits / bad labels costs one host sync
    # per forward; FASTTVERSKY_CHECK_INPUTS=0 trades the check for a sync-free step.
    return os.environ.get("FASTTVERSKY_CHECK_INPUTS", "1") != "0"


def input_error(flags: torch.Tensor, spec: KernelSpec) -> InvalidInputError | None:
    """The exception for the kernels' input-check counts, or None when the input is fine."""
    return _input_error(*(int(v) for v in flags.tolist()), spec)


def _input_error(n_nonfinite: int, n_bad: int, spec: KernelSpec) -> InvalidInputError | None:
    if n_nonfinite:
        return NonFiniteInputError(f"logits contain {n_nonfinite} non-finite value(s) (NaN or inf)")
    if n_bad:
        if spec.soft_target:
            return InvalidInputError(f"target has {n_bad} value(s) outside [0, 1]")
        ii = spec.ignore_index
        other = f" other than ignore_index={ii}" if ii is not None else ""
        return InvalidInputError(
            f"target has {n_bad} label(s) outside [0, {spec.num_labels}){other}"
        )
    return None


def kernel_spec(logits, target, activation, ignore_index, with_ce) -> KernelSpec:
    """The backends' spec of a call, from the flattened inputs and the op's arguments."""
    return KernelSpec(
        activation=activation,
        soft_target=target.is_floating_point(),
        ignore_index=ignore_index,
        num_classes=logits.shape[1],
        ce=CE_PLAIN if with_ce else CE_NONE,
    )


def _stats_impl(
    logits: torch.Tensor,
    target: torch.Tensor,
    activation: int,
    ignore_index: int | None,
    backend: str,
    defer_checks: bool = False,
    with_ce: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(stats, flags). Bad input raises here, unless ``defer_checks`` (DDP: every rank
    must reach the all-gather first; the loss raises after it, from the flags)."""
    spec = kernel_spec(logits, target, activation, ignore_index, with_ce)
    impl = _load(select_backend(backend, logits, target, spec))[0]
    stats, flags = impl.forward_stats(logits, target, spec)
    if checks_enabled() and not defer_checks:
        error = input_error(flags, spec)
        if error is not None:
            raise error
    return stats, flags


_tversky_stats_op = torch.library.custom_op(
    "fasttversky::tversky_stats", _stats_impl, mutates_args=()
)


@_tversky_stats_op.register_fake
def _(logits, target, activation, ignore_index, backend, defer_checks=False, with_ce=False):
    B, C, _ = logits.shape
    stats = logits.new_empty((B, C, 4 if with_ce else 3), dtype=torch.float64)
    return stats, logits.new_empty((2,), dtype=torch.int64)


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
    spec = kernel_spec(logits, target, activation, ignore_index, coef_ce is not None)
    # Same metadata as the forward, so the same backend.
    impl = _load(select_backend(backend, logits, target, spec))[0]
    if coef_ce is not None:
        return impl.backward(logits, target, coef_a, coef_b, spec, coef_ce=coef_ce)
    return impl.backward(logits, target, coef_a, coef_b, spec)


_tversky_grad_op = torch.library.custom_op("fasttversky::tversky_grad", _grad_impl, mutates_args=())


@_tversky_grad_op.register_fake
def _(logits, target, coef_a, coef_b, coef_ce, activation, ignore_index, backend):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, target, activation, ignore_index, backend, _, with_ce = inputs
    ctx.save_for_backward(logits, target)
    ctx.args = (activation, ignore_index, backend)
    ctx.with_ce = with_ce
    ctx.set_materialize_grads(True)


def _differentiable_grad(logits, target, grad_stats, activation, ignore_index, with_ce):
    """dL/dlogits with a graph (create_graph=True): autograd through plain torch sums."""
    spec = kernel_spec(logits, target, activation, ignore_index, with_ce)
    stats, _ = _load("torch")[0].forward_stats(logits, target, spec)
    (grad,) = torch.autograd.grad(stats, logits, grad_stats, create_graph=True)
    return grad


def _backward(ctx, grad_stats, grad_flags=None, grad_fn=None):
    if not ctx.needs_input_grad[0]:  # only a soft target requires grad: none is computed
        return None, None, None, None, None, None, None
    logits, target = ctx.saved_tensors
    activation, ignore_index, _ = ctx.args
    if torch.is_grad_enabled():  # only under create_graph=True: a gradient with a graph
        grad = _differentiable_grad(
            logits, target, grad_stats, activation, ignore_index, ctx.with_ce
        )
        return grad, None, None, None, None, None, None
    cdt = compute_dtype(logits.dtype)
    # dL/dp = w * (dL/dsum_p + dL/dsum_pg * g); sum_g does not depend on the logits.
    coef_a = grad_stats[..., 1].to(cdt).contiguous()
    coef_b = grad_stats[..., 0].to(cdt).contiguous()
    # The cross-entropy term: dL/dsum_ce, one more (B, C) coefficient (see _spec.py).
    coef_ce = grad_stats[..., 3].to(cdt).contiguous() if ctx.with_ce else None
    grad = (grad_fn or _tversky_grad_op)(logits, target, coef_a, coef_b, coef_ce, *ctx.args)
    return grad, None, None, None, None, None, None


_tversky_stats_op.register_autograd(_backward, setup_context=_setup_context)


class _TverskyStats(torch.autograd.Function):
    """The eager twin of ``fasttversky::tversky_stats``: same work, same backward."""

    @staticmethod
    def forward(ctx, logits, target, activation, ignore_index, backend, defer_checks, with_ce):
        inputs = (logits, target, activation, ignore_index, backend, defer_checks, with_ce)
        _setup_context(ctx, inputs, None)
        stats, flags = _stats_impl(*inputs)
        ctx.mark_non_differentiable(flags)
        return stats, flags

    @staticmethod
    def backward(ctx, grad_stats, grad_flags):
        return _backward(ctx, grad_stats, grad_fn=_grad_impl)


def differentiable_stats(logits, target, activation, ignore_index, with_ce) -> torch.Tensor:
    """stats from plain torch ops, for torch.func transforms. NaN/inf logits give NaN sums
    (vmap cannot raise on data); labels out of range raise wherever the target's values
    can be read (not when vmap maps over the target itself)."""
    spec = kernel_spec(logits, target, activation, ignore_index, with_ce)
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
    if spec.soft_target:
        return int(((target < 0) | (target > 1) | ~torch.isfinite(target)).sum())
    labels = target.long()
    bad = (labels < 0) | (labels >= spec.num_labels)
    if spec.ignore_index is not None:
        bad &= labels != spec.ignore_index
    return int(bad.sum())


def tversky_stats(logits, target, activation, ignore_index, backend, defer_checks, with_ce):
    """(stats (B, C, 3 or 4) float64, flags (2,) int64) through the custom op (compiling),
    its eager twin, or plain torch under a torch.func transform (flags then zero)."""
    args = (logits, target, activation, ignore_index, backend, defer_checks, with_ce)
    if torch.compiler.is_compiling():
        return _tversky_stats_op(*args)
    if in_functorch_transform():
        stats = differentiable_stats(logits, target, activation, ignore_index, with_ce)
        return stats, torch.zeros(2, dtype=torch.int64)
    return _TverskyStats.apply(*args)

"""Triton backend: launchers for the kernels in ``_triton_math.py``.

Contract as every backend (``fasttversky/_spec.py``). Forward = one pass of
``_tversky_fwd_partials_kernel`` (per-tile partial sums, no atomics) plus one tiny
``_tversky_finalize_kernel`` (fixed-order float64 sum of the partials); backward = one
elementwise pass of ``_tversky_bwd_kernel``. The kernels live in ``_triton_math.py``,
imported lazily, so that a machine without triton gets one reason from
``unavailable()`` rather than an import error. Every term of the contract is a
compile-time switch (CE kind, label smoothing, regions; float label maps by the target's
dtype), so a call compiles only the work it needs; the region table and [eps, gamma]
reach the kernels as small cached device tensors (``_tables``).

On a machine without a GPU the same kernels run in the Triton interpreter
(``TRITON_INTERPRET=1``, set before triton is first imported) on CPU tensors; that is
how CI tests them.

Launch configuration is a fixed function of (shape, dtype, device) instead of an
autotuner: the forward's reduction order depends on the tile shape, so an autotuner
that may pick another config in another process would make results differ bitwise from
run to run. TODO(perf): tune ``_GPU_ELEMS`` / warps per architecture on an H100.
"""

from __future__ import annotations

import functools
import os

import torch

from .._spec import CE_FOCAL, KernelSpec
from ._base import (
    MAX_GRID_BATCH,
    Backend,
    compute_dtype,
    device_guard,
    kernel_coefs,
    new_grad,
)
from ._native import LazyLibrary

MAX_CLASSES = 128
_GPU_ELEMS = 2048  # (C_PAD x BLOCK_N) elements per register block on a GPU
_INTERP_ELEMS = 16384  # the interpreter runs whole blocks as numpy ops: bigger is faster

# Tests set this to (BLOCK_N, iters) to force several tiles and masked tails on tiny
# volumes; None = the heuristic below.
_TILE_OVERRIDE: tuple[int, int] | None = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _import_kernels():
    """(the ``_triton_math`` module, whether triton interprets it); raises without
    triton or with a broken install (remembered by the loader, reported by unavailable())."""
    from . import _triton_math

    # triton decides interpreter vs compiler when the kernels are decorated.
    return _triton_math, _interpreting()


_KERNELS = LazyLibrary(_import_kernels)


def _kernels():
    """The ``_triton_math`` module, or raise the (remembered) reason it cannot be imported."""
    return _KERNELS.get()[0]


def _interpreted() -> bool:
    """Whether the kernels run in the Triton interpreter (after a successful _kernels())."""
    return _KERNELS.get()[1]


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _cdtype(logits: torch.Tensor):
    import triton.language as tl

    return tl.float64 if logits.dtype == torch.float64 else tl.float32


def fwd_block_elems(with_ce: bool, float64: bool) -> int:
    """(C_PAD x BLOCK_N) elements of the forward's register block on a GPU.

    The cross-entropy accumulator and its log-sum-exp temporaries made ptxas spill at
    2048 elements (fp32 at sm_80; fp64 heavily), so the CE forward takes half (a quarter
    in fp64); bench/ptxas_report.py shows the registers of each variant.
    """
    if not with_ce:
        return _GPU_ELEMS
    return _GPU_ELEMS // (4 if float64 else 2)


def bwd_block_elems(ce: int, float64: bool) -> int:
    """(C_PAD x BLOCK_N) elements of the backward's register block on a GPU: half in
    float64 with the focal term, whose gradient made ptxas spill at the full block
    (bench/ptxas_report.py)."""
    return _GPU_ELEMS // 2 if float64 and ce == CE_FOCAL else _GPU_ELEMS


def _fwd_tiles(
    B: int, N: int, C_PAD: int, device: torch.device, elems: int = _GPU_ELEMS
) -> tuple[int, int, int]:
    """(BLOCK_N, iters, T): each program covers iters * BLOCK_N voxels, T tiles/sample."""
    if _TILE_OVERRIDE is not None:
        block_n, iters = _TILE_OVERRIDE
    elif _interpreted():
        block_n = max(16, min(_next_pow2(N), _INTERP_ELEMS // C_PAD))
        iters = 1
    else:
        block_n = max(16, elems // C_PAD)
        steps = B * _cdiv(N, block_n)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        # Enough programs to fill every SM several times over, as few tiles as that
        # allows (fewer partials to write and finalize); a function of the shape and
        # the device only, so the reduction order is reproducible.
        iters = max(1, min(64, steps // (8 * sms)))
    T = _cdiv(_cdiv(N, block_n), iters)
    return block_n, iters, T


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _meta(logits, spec: KernelSpec) -> dict:
    """The compile-time switches both kernels take (see ``_triton_math.py``)."""
    return dict(
        ACTIVATION=spec.activation,
        HAS_SOFT_TARGET=spec.soft_target,
        HAS_IGNORE_INDEX=spec.ignore_index is not None,
        BINARY_LABELS=spec.binary_labels,
        C_PAD=_c_pad(logits.shape[1]),
        CDTYPE=_cdtype(logits),
        CE=spec.ce,
        HAS_SMOOTHING=spec.with_ce and spec.label_smoothing != 0.0,
        HAS_REGIONS=spec.region_masks is not None,
    )


@functools.lru_cache(maxsize=64)
def _device_table(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor on ``device`` (the region masks, the float parameters),
    made once per (values, dtype, device) rather than copied to the device every call."""
    return torch.tensor(values, dtype=dtype, device=device)


def _tables(logits, target, spec: KernelSpec):
    """(regions, params) for a launch: the int64 region masks (the target, never read,
    without regions) and [label smoothing, focal gamma] in the compute dtype: a tensor,
    because a Python float argument would reach a float64 kernel rounded to float32."""
    dev = logits.device
    if spec.region_masks is not None:
        regions = _device_table(spec.region_masks, torch.int64, dev)
    else:
        regions = target
    values = (float(spec.label_smoothing), float(spec.focal_gamma))
    return regions, _device_table(values, compute_dtype(logits.dtype), dev)


def _c_pad(C: int) -> int:
    return max(2, _next_pow2(C))


def _launch(
    kernel, grid, logits, target, spec: KernelSpec, block_n: int, buffers, sizes=(), grad=None
):
    """One launch of the forward or backward kernel, which share their argument order:
    (logits, target, regions, params, *buffers, N, C, *sizes, logits strides, target
    strides[, grad strides], ignore_index, num_labels), then the compile-time switches."""
    _, C, N = logits.shape
    if spec.soft_target:
        target_strides = target.stride()
    else:
        target_strides = (target.stride(0), 0, target.stride(1))
    grad_strides = grad.stride() if grad is not None else ()
    ignore = spec.ignore_index if spec.ignore_index is not None else 0
    kernel[grid](
        logits,
        target,
        *_tables(logits, target, spec),
        *buffers,
        N,
        C,
        *sizes,
        *logits.stride(),
        *target_strides,
        *grad_strides,
        ignore,
        spec.num_labels,
        BLOCK_N=block_n,
        num_warps=4,
        **_meta(logits, spec),
    )


class _TritonBackend(Backend):
    name = "triton"
    max_classes = MAX_CLASSES
    class_limit_why = "(one voxel's classes must fit in one register block)"
    max_batch = MAX_GRID_BATCH
    features = frozenset({"ce", "soft_ce", "label_smoothing", "focal", "float_labels", "regions"})

    def unavailable(self):
        try:
            _kernels()
        except RuntimeError as exc:
            return f"triton could not be imported ({exc})"
        if _interpreted():
            return None
        if not torch.cuda.is_available():
            return (
                "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run "
                "the kernels in the Triton interpreter on CPU tensors)"
            )
        return None

    def input_reasons(self, logits, target, spec: KernelSpec):
        why = []
        want = "cpu" if _interpreted() else "cuda"
        if logits.device.type != want:
            if want == "cuda":
                why.append(
                    f"logits are on {logits.device}; the triton backend needs CUDA "
                    "tensors (or TRITON_INTERPRET=1 for CPU tensors)"
                )
            else:
                why.append(
                    f"logits are on {logits.device}; under TRITON_INTERPRET=1 the "
                    "triton backend runs on CPU tensors"
                )
        return why

    def forward_stats(self, logits, target, spec: KernelSpec):
        k = _kernels()
        B, C, N = logits.shape
        C_PAD = _c_pad(C)
        elems = fwd_block_elems(spec.with_ce, logits.dtype == torch.float64)
        block_n, iters, T = _fwd_tiles(B, N, C_PAD, logits.device, elems)
        part_dtype = compute_dtype(logits.dtype)
        dev = logits.device
        # Every (b, t) slot is written by exactly one program, so no zero-fill is needed.
        nstats = 3 + spec.ce_columns
        partials = torch.empty((B, T, nstats, C_PAD), dtype=part_dtype, device=dev)
        counts = torch.empty((B, T, 2), dtype=torch.int32, device=dev)
        stats = torch.empty((B, C, nstats), dtype=torch.float64, device=dev)
        flag_sums = torch.empty((B, 2), dtype=torch.int64, device=dev)
        with device_guard(logits):
            kernel = k._tversky_fwd_partials_kernel
            _launch(kernel, (T, B), logits, target, spec, block_n, (partials, counts), (T, iters))
            block_t = min(4096 if _interpreted() else 256, max(2, _next_pow2(T)))
            k._tversky_finalize_kernel[(B,)](
                partials,
                counts,
                stats,
                flag_sums,
                C,
                T,
                C_PAD=C_PAD,
                BLOCK_T=block_t,
                NCE=spec.ce_columns,
                num_warps=4,
            )
        # Integer sums are exact, so torch's reduction order cannot matter here.
        return stats, flag_sums.sum(0)

    def backward(
        self, logits, target, coef_a, coef_b, spec: KernelSpec, coef_ce=None, coef_ce2=None
    ):
        k = _kernels()
        _, C, N = logits.shape
        grad = new_grad(logits)
        C_PAD = _c_pad(C)
        if _TILE_OVERRIDE is not None:
            block_n = _TILE_OVERRIDE[0]
        elif _interpreted():
            block_n = max(16, min(_next_pow2(N), _INTERP_ELEMS // C_PAD))
        else:
            block_n = max(16, bwd_block_elems(spec.ce, logits.dtype == torch.float64) // C_PAD)
        # One (B, K, C) block of coefficients: [coef_a, coef_b] then one per CE column.
        coefs = [coef_a, coef_b, coef_ce, coef_ce2][: 2 + spec.ce_columns]
        coefs = torch.stack(kernel_coefs(logits, *coefs), dim=1)
        grid = (_cdiv(N, block_n), logits.shape[0])
        with device_guard(logits):
            kernel = k._tversky_bwd_kernel
            _launch(kernel, grid, logits, target, spec, block_n, (coefs, grad), grad=grad)
        return grad


BACKEND = _TritonBackend()

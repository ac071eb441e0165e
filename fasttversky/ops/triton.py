"""Triton backend: launchers for the kernels in ``_triton_math.py``.

Contract as every backend (``fasttversky/_spec.py``). Forward = one pass of
``_tversky_fwd_partials_kernel`` (per-tile partial sums, no atomics) plus one tiny
``_tversky_finalize_kernel`` (fixed-order float64 sum of the partials); backward = one
elementwise pass of ``_tversky_bwd_kernel``. The kernels live in ``_triton_math.py``,
imported lazily, so that a machine without triton gets one reason from
``unavailable()`` rather than an import error.

On a machine without a GPU the same kernels run in the Triton interpreter
(``TRITON_INTERPRET=1``, set before triton is first imported) on CPU tensors; that is
how CI tests them.

Launch configuration is a fixed function of (shape, dtype, device) instead of an
autotuner: the forward's reduction order depends on the tile shape, so an autotuner
that may pick another config in another process would make results differ bitwise from
run to run. TODO(perf): tune ``_GPU_ELEMS`` / warps per architecture on an H100.
"""

from __future__ import annotations

import os
import threading

import torch

from .._spec import KernelSpec
from ._base import MAX_GRID_BATCH, Backend, compute_dtype, kernel_coefs, new_grad

MAX_CLASSES = 128
_GPU_ELEMS = 2048  # (C_PAD x BLOCK_N) elements per register block on a GPU
_INTERP_ELEMS = 16384  # the interpreter runs whole blocks as numpy ops: bigger is faster

# Tests set this to (BLOCK_N, iters) to force several tiles and masked tails on tiny
# volumes; None = the heuristic below.
_TILE_OVERRIDE: tuple[int, int] | None = None

_lock = threading.Lock()
_state: dict = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels():
    """The ``_triton_math`` module, or raise the (cached) reason it cannot be imported."""
    with _lock:
        if "mod" not in _state and "error" not in _state:
            try:
                from . import _triton_math

                _state["mod"] = _triton_math
                # triton decides interpreter vs compiler when the kernels are decorated.
                _state["interpret"] = _interpreting()
            except Exception as exc:  # no triton, or a broken install
                _state["error"] = f"triton could not be imported ({type(exc).__name__}: {exc})"
        if "error" in _state:
            raise RuntimeError(_state["error"])
        return _state["mod"]


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


def _fwd_tiles(
    B: int, N: int, C_PAD: int, device: torch.device, elems: int = _GPU_ELEMS
) -> tuple[int, int, int]:
    """(BLOCK_N, iters, T): each program covers iters * BLOCK_N voxels, T tiles/sample."""
    if _TILE_OVERRIDE is not None:
        block_n, iters = _TILE_OVERRIDE
    elif _state.get("interpret"):
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


def _target_strides(target: torch.Tensor, spec: KernelSpec) -> tuple[int, int, int]:
    if spec.soft_target:
        return tuple(target.stride())
    sb, sn = target.stride()
    return sb, 0, sn


def _common(logits, target, spec: KernelSpec) -> dict:
    C = logits.shape[1]
    return dict(
        ACTIVATION=spec.activation,
        HAS_SOFT_TARGET=spec.soft_target,
        HAS_IGNORE_INDEX=spec.ignore_index is not None,
        BINARY_LABELS=spec.binary_labels,
        C_PAD=max(2, _next_pow2(C)),
        CDTYPE=_cdtype(logits),
        HAS_CE=spec.with_ce,
    )


def _device_guard(t: torch.Tensor):
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    import contextlib

    return contextlib.nullcontext()


def tversky_forward(logits: torch.Tensor, target: torch.Tensor, spec: KernelSpec):
    """stats (B, C, 3) float64 ((B, C, 4) with spec.with_ce) and flags (2,) int64
    (see ``_spec.py``)."""
    k = _kernels()
    B, C, N = logits.shape
    meta = _common(logits, target, spec)
    C_PAD = meta["C_PAD"]
    elems = fwd_block_elems(spec.with_ce, logits.dtype == torch.float64)
    block_n, iters, T = _fwd_tiles(B, N, C_PAD, logits.device, elems)
    part_dtype = compute_dtype(logits.dtype)
    dev = logits.device
    # Every (b, t) slot is written by exactly one program, so no zero-fill is needed.
    nstats = 4 if spec.with_ce else 3
    partials = torch.empty((B, T, nstats, C_PAD), dtype=part_dtype, device=dev)
    counts = torch.empty((B, T, 2), dtype=torch.int32, device=dev)
    stats = torch.empty((B, C, nstats), dtype=torch.float64, device=dev)
    flag_sums = torch.empty((B, 2), dtype=torch.int64, device=dev)
    tsb, tsc, tsn = _target_strides(target, spec)
    ignore = spec.ignore_index if spec.ignore_index is not None else 0
    with _device_guard(logits):
        k._tversky_fwd_partials_kernel[(T, B)](
            logits,
            target,
            partials,
            counts,
            N,
            C,
            T,
            iters,
            *logits.stride(),
            tsb,
            tsc,
            tsn,
            ignore,
            spec.num_labels,
            BLOCK_N=block_n,
            num_warps=4,
            **meta,
        )
        block_t = min(256 if not _state.get("interpret") else 4096, max(2, _next_pow2(T)))
        k._tversky_finalize_kernel[(B,)](
            partials,
            counts,
            stats,
            flag_sums,
            C,
            T,
            C_PAD=C_PAD,
            BLOCK_T=block_t,
            HAS_CE=spec.with_ce,
            num_warps=4,
        )
    # Integer sums are exact, so torch's reduction order cannot matter here.
    flags = flag_sums.sum(0)
    return stats, flags


def tversky_backward(logits, target, coef_a, coef_b, spec: KernelSpec, coef_ce=None):
    """dL/dlogits with the logits' shape, dtype and (when dense) strides."""
    k = _kernels()
    B, C, N = logits.shape
    grad = new_grad(logits)
    meta = _common(logits, target, spec)
    C_PAD = meta["C_PAD"]
    if _TILE_OVERRIDE is not None:
        block_n = _TILE_OVERRIDE[0]
    elif _state.get("interpret"):
        block_n = max(16, min(_next_pow2(N), _INTERP_ELEMS // C_PAD))
    else:
        block_n = max(16, _GPU_ELEMS // C_PAD)
    coef_a, coef_b, coef_ce = kernel_coefs(logits, coef_a, coef_b, coef_ce)
    tsb, tsc, tsn = _target_strides(target, spec)
    ignore = spec.ignore_index if spec.ignore_index is not None else 0
    with _device_guard(logits):
        k._tversky_bwd_kernel[(_cdiv(N, block_n), B)](
            logits,
            target,
            coef_a,
            coef_b,
            coef_ce if coef_ce is not None else coef_a,  # not read without HAS_CE
            grad,
            N,
            C,
            *logits.stride(),
            tsb,
            tsc,
            tsn,
            *grad.stride(),
            ignore,
            spec.num_labels,
            BLOCK_N=block_n,
            num_warps=4,
            **meta,
        )
    return grad


class _TritonBackend(Backend):
    name = "triton"
    max_classes = MAX_CLASSES
    class_limit_why = "(one voxel's classes must fit in one register block)"
    max_batch = MAX_GRID_BATCH
    supports_ce = True

    def unavailable(self):
        try:
            _kernels()
        except RuntimeError as exc:
            return str(exc)
        if _state["interpret"]:
            return None
        if not torch.cuda.is_available():
            return (
                "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run "
                "the kernels in the Triton interpreter on CPU tensors)"
            )
        return None

    def input_reasons(self, logits, target, spec: KernelSpec):
        why = []
        want = "cpu" if _state.get("interpret") else "cuda"
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
        return tversky_forward(logits, target, spec)

    def backward(self, logits, target, coef_a, coef_b, spec: KernelSpec, coef_ce=None):
        return tversky_backward(logits, target, coef_a, coef_b, spec, coef_ce)


BACKEND = _TritonBackend()

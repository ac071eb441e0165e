"""What the two compiled backends (cpu, cuda) share: the ctypes mirror of
csrc/tversky.h's parameter struct, filling it from tensors, the build cache folder;
and the lazy loader of every backend (a library, or triton's kernels, whose failure is
remembered as a reason, never raised at import).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from .._spec import KernelSpec

DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
    torch.uint8: 10,
    torch.int16: 11,
    torch.int32: 12,
    torch.int64: 13,
}


class TverskyParams(ctypes.Structure):
    """Mirror of ``struct TverskyParams`` in csrc/tversky.h (same order, same types).

    ``load_library`` compares ``ctypes.sizeof`` with the size each native library was
    compiled with, so a header change this mirror misses fails at load time instead of
    corrupting memory.
    """

    _fields_ = [
        ("logits_ptr", ctypes.c_void_p),
        ("logits_stride_b", ctypes.c_int64),
        ("logits_stride_c", ctypes.c_int64),
        ("logits_stride_n", ctypes.c_int64),
        ("logits_dtype", ctypes.c_int32),
        ("target_ptr", ctypes.c_void_p),
        ("target_stride_b", ctypes.c_int64),
        ("target_stride_c", ctypes.c_int64),
        ("target_stride_n", ctypes.c_int64),
        ("target_dtype", ctypes.c_int32),
        ("soft_target", ctypes.c_int32),
        ("grad_ptr", ctypes.c_void_p),
        ("grad_stride_b", ctypes.c_int64),
        ("grad_stride_c", ctypes.c_int64),
        ("grad_stride_n", ctypes.c_int64),
        ("coef_a_ptr", ctypes.c_void_p),
        ("coef_b_ptr", ctypes.c_void_p),
        ("stats_ptr", ctypes.c_void_p),
        ("flags_ptr", ctypes.c_void_p),
        ("B", ctypes.c_int64),
        ("C", ctypes.c_int64),
        ("N", ctypes.c_int64),
        ("activation", ctypes.c_int32),
        ("has_ignore_index", ctypes.c_int32),
        ("ignore_index", ctypes.c_int64),
        ("binary_labels", ctypes.c_int32),
        ("num_labels", ctypes.c_int64),
        ("num_threads", ctypes.c_int32),
        ("ce_kind", ctypes.c_int32),
        ("coef_ce_ptr", ctypes.c_void_p),
        ("coef_ce2_ptr", ctypes.c_void_p),
        ("label_smoothing", ctypes.c_double),
        ("focal_gamma", ctypes.c_double),
        ("region_masks_ptr", ctypes.c_void_p),
    ]


def load_library(path, prefix: str, what: str) -> ctypes.CDLL:
    """Load a compiled backend and check its ``<prefix>_params_size()`` against the mirror.

    ``prefix`` is ``tversky_cpu`` or ``tversky_cuda``. The entry points' argument types
    are set by the caller (they differ); this is the check every native backend shares.
    """
    dll = ctypes.CDLL(str(path))
    size_fn = getattr(dll, f"{prefix}_params_size")
    size_fn.argtypes = []
    size_fn.restype = ctypes.c_int64
    size = size_fn()
    if size != ctypes.sizeof(TverskyParams):
        raise RuntimeError(
            f"the {what} kernels were compiled with a {size}-byte TverskyParams but "
            f"fasttversky/ops/_native.py's mirror is {ctypes.sizeof(TverskyParams)} bytes: "
            "csrc/tversky.h and the mirror disagree"
        )
    return dll


def make_params(logits, target, spec: KernelSpec, num_threads: int = 1) -> TverskyParams:
    """The struct for logits (B, C, N) and target (B, N) labels or (B, C, N) soft."""
    B, C, N = logits.shape
    p = TverskyParams()
    p.logits_ptr = logits.data_ptr()
    p.logits_stride_b, p.logits_stride_c, p.logits_stride_n = logits.stride()
    p.logits_dtype = DTYPE_CODES[logits.dtype]
    p.target_ptr = target.data_ptr()
    if spec.soft_target:
        p.target_stride_b, p.target_stride_c, p.target_stride_n = target.stride()
    else:
        p.target_stride_b, p.target_stride_n = target.stride()
    p.target_dtype = DTYPE_CODES[target.dtype]
    p.soft_target = int(spec.soft_target)
    p.B, p.C, p.N = B, C, N
    p.activation = spec.activation
    p.has_ignore_index = int(spec.ignore_index is not None)
    p.ignore_index = spec.ignore_index if spec.ignore_index is not None else 0
    p.binary_labels = int(spec.binary_labels)
    p.num_labels = spec.num_labels
    p.num_threads = num_threads
    p.ce_kind = spec.ce
    p.label_smoothing = spec.label_smoothing
    p.focal_gamma = spec.focal_gamma
    # region_masks_ptr: set by the caller from a device tensor of spec.region_masks
    return p


def cache_dir() -> Path:
    """Where compiled kernels are kept (``FASTTVERSKY_CACHE``, default ~/.cache/fasttversky)."""
    root = os.environ.get("FASTTVERSKY_CACHE") or Path.home() / ".cache" / "fasttversky"
    return Path(root)


def build_cached(tag: str, key: bytes, lib_name: str, command, what: str) -> Path:
    """The shared library ``cache_dir()/<tag>-<hash of key>/<lib_name>``, built once.

    ``command(out_path) -> argv`` compiles it. The build goes to a private name and is
    then renamed, so concurrent first uses (DDP workers, parallel test processes) never
    load a half-written library.
    """
    out_dir = cache_dir() / f"{tag}-{hashlib.sha256(key).hexdigest()[:16]}"
    lib = out_dir / lib_name
    if not lib.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        cmd = command(tmp)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(
                f"building the {what} kernels failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}"
            )
        os.replace(tmp, lib)
    return lib


class LazyLibrary:
    """Build (once, on first use) and hold a compiled library, or the reason it failed.

    The one lazy loader of the backends: cpu and cuda hold their ctypes library in one,
    triton its kernel module (whose import fails without triton).
    """

    def __init__(self, build: Callable[[], ctypes.CDLL]):
        self._build = build
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._error: str | None = None

    def get(self) -> ctypes.CDLL:
        with self._lock:
            if self._lib is None and self._error is None:
                try:
                    self._lib = self._build()
                except Exception as exc:  # reported through unavailable(), never at import
                    self._error = f"{type(exc).__name__}: {exc}"
            if self._error is not None:
                raise RuntimeError(self._error)
            return self._lib

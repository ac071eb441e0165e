"""Loader for the C++ CPU kernels (csrc/cpu/tversky_cpu.cpp): build, cache, call.

The kernels include no torch headers (only csrc/tversky.h's plain parameter struct), so
they build with one g++ call and are called through ctypes; this file is the only one
that knows about both torch and the kernels. The shared library is built on first use
into a cache folder keyed by the sources' hash, the compiler flags and the CPU
(``FASTTVERSKY_CACHE``, default ``~/.cache/fasttversky``) and reused afterwards;
``-march=native`` is safe because the build happens on the machine that runs it.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import sys

import torch

from .._spec import KernelSpec
from ._base import Backend, check_kernel_code, kernel_coefs, new_grad
from ._native import (
    DTYPE_CODES,
    LazyLibrary,
    TverskyParams,
    build_cached,
    load_library,
    make_params,
)
from ._sources import csrc_dir

# -fno-trapping-math lets gcc if-convert and vectorise the tile loops (4x here); no
# -ffast-math: the non-finite check must see NaN and inf.
_FLAGS = [
    "-O3",
    "-march=native",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-std=c++20",
    "-shared",
    "-fPIC",
    "-pthread",
]
MAX_CLASSES = 32  # MAX_C in csrc/cpu/tversky_cpu.cpp (checked when the library loads)


def _cpu_identity() -> bytes:
    """What -march=native depends on. Clusters share home directories between nodes
    with different CPUs: a library built for one must not be loaded on another."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines))).encode()
    except OSError:
        import platform

        return platform.processor().encode()


def _build() -> ctypes.CDLL:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
    csrc = csrc_dir()
    sources = (csrc / "tversky.h", csrc / "cpu" / "tversky_cpu.cpp")
    key = b"".join(src.read_bytes() for src in sources)
    key += " ".join([cxx, *_FLAGS]).encode() + _cpu_identity()
    lib = build_cached(
        "cpu",
        key,
        "libtversky_cpu.so",
        lambda out: [cxx, *_FLAGS, str(sources[1]), "-o", out],
        "CPU",
    )
    dll = load_library(lib, "tversky_cpu", "CPU")
    for fn in (dll.tversky_cpu_forward, dll.tversky_cpu_backward):
        fn.argtypes = [ctypes.POINTER(TverskyParams)]
        fn.restype = ctypes.c_int
    dll.tversky_cpu_max_classes.restype = ctypes.c_int
    if dll.tversky_cpu_max_classes() != MAX_CLASSES:
        raise RuntimeError(
            f"the CPU kernels take {dll.tversky_cpu_max_classes()} classes but "
            f"fasttversky/ops/cpu.py declares MAX_CLASSES = {MAX_CLASSES}"
        )
    return dll


_LIB = LazyLibrary(_build)


def _library() -> ctypes.CDLL:
    """The loaded kernels, or raise the (remembered) reason they cannot be built."""
    return _LIB.get()


def _params(logits, target, spec: KernelSpec) -> TverskyParams:
    B, _, N = logits.shape
    # Small volumes are not worth waking threads for.
    threads = max(1, torch.get_num_threads()) if B * N >= 65536 else 1
    return make_params(logits, target, spec, threads)


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def _advise_huge_pages(t: torch.Tensor) -> None:
    """Ask Linux to back a fresh output buffer with 2 MiB pages before the kernel writes it.

    The gradient is a new, never-touched allocation: with 4 KiB pages, the first write
    to each page faults, and on the paper's volume those faults cost more than the
    backward's arithmetic and memory traffic together (measured: 50 ms -> 11 ms to fill
    a 59 MB buffer). Best effort: a no-op where THP is off or madvise is missing.
    """
    nbytes = t.numel() * t.element_size()
    if nbytes < 4 * _HUGE_PAGE or not sys.platform.startswith("linux"):
        return
    libc = _libc()
    if libc is None:
        return
    start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE  # only whole huge pages inside
    stop = (t.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if stop > start:
        libc.madvise(start, stop - start, _MADV_HUGEPAGE)


class _CpuBackend(Backend):
    name = "cpu"
    max_classes = MAX_CLASSES
    class_limit_why = "supported by the kernel"
    supports_ce = True

    def unavailable(self):
        try:
            _library()
        except RuntimeError as exc:
            return f"C++ kernels unavailable: {exc}"
        return None

    def input_reasons(self, logits, target, spec: KernelSpec):
        why = []
        if logits.device.type != "cpu":
            why.append(f"logits are on {logits.device}, the cpu backend needs CPU tensors")
        if target.dtype not in DTYPE_CODES:
            why.append(f"target dtype {target.dtype} not supported by the kernel")
        return why

    def forward_stats(self, logits, target, spec: KernelSpec):
        B, C, _ = logits.shape
        stats = torch.empty((B, C, 4 if spec.with_ce else 3), dtype=torch.float64)
        flags = torch.zeros(2, dtype=torch.int64)
        p = _params(logits, target, spec)
        p.stats_ptr = stats.data_ptr()
        p.flags_ptr = flags.data_ptr()
        check_kernel_code(_library().tversky_cpu_forward(ctypes.byref(p)), "CPU", "forward")
        return stats, flags

    def backward(self, logits, target, coef_a, coef_b, spec: KernelSpec, coef_ce=None):
        grad = new_grad(logits)
        _advise_huge_pages(grad)
        p = _params(logits, target, spec)
        p.grad_ptr = grad.data_ptr()
        p.grad_stride_b, p.grad_stride_c, p.grad_stride_n = grad.stride()
        coef_a, coef_b = kernel_coefs(logits, coef_a, coef_b)
        p.coef_a_ptr = coef_a.data_ptr()
        p.coef_b_ptr = coef_b.data_ptr()
        if coef_ce is not None:
            (coef_ce,) = kernel_coefs(logits, coef_ce)
            p.coef_ce_ptr = coef_ce.data_ptr()
        check_kernel_code(_library().tversky_cpu_backward(ctypes.byref(p)), "CPU", "backward")
        return grad


BACKEND = _CpuBackend()

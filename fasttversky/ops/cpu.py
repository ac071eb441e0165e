"""Loader for the C++ CPU kernels (csrc/cpu/tversky_cpu.cpp): pick, load, call.

The kernels include no torch headers (only csrc/tversky.h's plain parameter struct), so
they are plain shared libraries called through ctypes; this file is the only one that
knows about both torch and the kernels.

Installing the package compiles them once per instruction-set variant (setup.py,
ops/_cpu_build.py: ``_tversky_cpu_{avx512,avx2,baseline}.so`` beside this file), and
the first call loads the best variant the CPU supports, asking the baseline library
(which runs anywhere) for the CPU's features. Without an installed library, or when the
kernel sources changed since it was built (an edited checkout), the kernels are
compiled on first use for this machine (``-march=native``) into a cache folder keyed by
the sources' hash, the flags and the CPU (``FASTTVERSKY_CACHE``, default
``~/.cache/fasttversky``), with a one-line message on stderr while it builds.

``FASTTVERSKY_CPU_ISA`` = ``avx512`` | ``avx2`` | ``baseline`` forces an installed
variant, ``native`` forces the first-use build; unset or ``auto`` picks.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

import torch

from .._spec import KernelSpec
from . import _cpu_build as recipe
from ._base import Backend, check_kernel_code, kernel_coefs
from ._grad_buffers import gradient_buffer
from ._native import (
    DTYPE_CODES,
    LazyLibrary,
    TverskyParams,
    build_cached,
    load_library,
    make_params,
)
from ._sources import csrc_dir

MAX_CLASSES = 128  # MAX_C in csrc/cpu/tversky_cpu.cpp (checked when the library loads)
ISA_CHOICES = ("auto", *(v.name for v in recipe.variants()), recipe.NATIVE.name)
_HERE = Path(__file__).resolve().parent


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


def _open(path: Path) -> ctypes.CDLL:
    dll = load_library(path, "tversky_cpu", "CPU")
    for fn in (dll.tversky_cpu_forward, dll.tversky_cpu_backward):
        fn.argtypes = [ctypes.POINTER(TverskyParams)]
        fn.restype = ctypes.c_int
    for fn in (dll.tversky_cpu_build_key, dll.tversky_cpu_variant):
        fn.argtypes = []
        fn.restype = ctypes.c_char_p
    dll.tversky_cpu_has.argtypes = [ctypes.c_char_p]
    dll.tversky_cpu_has.restype = ctypes.c_int
    dll.tversky_cpu_max_classes.restype = ctypes.c_int
    if dll.tversky_cpu_max_classes() != MAX_CLASSES:
        raise RuntimeError(
            f"the CPU kernels take {dll.tversky_cpu_max_classes()} classes but "
            f"fasttversky/ops/cpu.py declares MAX_CLASSES = {MAX_CLASSES}"
        )
    return dll


def variant_name(dll: ctypes.CDLL) -> str:
    """Which build a loaded library is: avx512, avx2, baseline or native."""
    return dll.tversky_cpu_variant().decode()


def _build_native(why: str) -> ctypes.CDLL:
    """Compile the kernels for this machine into the cache (once), telling the user."""
    cxx = recipe.find_compiler()
    if cxx is None:
        raise RuntimeError(f"{why}, and no C++ compiler was found (install g++ or set CXX)")
    csrc = csrc_dir()
    variant = recipe.NATIVE
    key = (
        recipe.build_key(csrc).encode() + " ".join([cxx, *variant.flags]).encode() + _cpu_identity()
    )

    def command(out):
        # Only when it really compiles (not on a cache hit): the one visible line.
        print(
            f"fasttversky: compiling the CPU kernels for this machine ({why}; once, a few minutes)",
            file=sys.stderr,
            flush=True,
        )
        return recipe.command(cxx, csrc, variant, out)

    lib = build_cached("cpu", key, recipe.library_name(variant.name), command, "CPU")
    return _open(lib)


def _installed(name: str) -> Path | None:
    path = _HERE / recipe.library_name(name)
    return path if path.exists() else None


def _stale(dll: ctypes.CDLL) -> bool:
    """True when the kernel sources on disk differ from those the library was built
    from (an editable install whose csrc/ was edited). No sources: trust the library."""
    try:
        csrc = csrc_dir()
    except RuntimeError:
        return False
    return dll.tversky_cpu_build_key().decode() != recipe.build_key(csrc)


def _supports(probe: ctypes.CDLL, variant) -> bool:
    return all(probe.tversky_cpu_has(f.encode()) == 1 for f in variant.needs)


def _build() -> ctypes.CDLL:
    choice = (os.environ.get("FASTTVERSKY_CPU_ISA") or "auto").strip().lower()
    if choice not in ISA_CHOICES:
        raise RuntimeError(f"FASTTVERSKY_CPU_ISA={choice!r} is not one of {', '.join(ISA_CHOICES)}")
    if choice == recipe.NATIVE.name:
        return _build_native("FASTTVERSKY_CPU_ISA=native")
    base_path = _installed(recipe.BASELINE)
    if base_path is None:
        if choice != "auto":
            raise RuntimeError(
                f"FASTTVERSKY_CPU_ISA={choice}: no installed CPU kernels (pip install the package)"
            )
        return _build_native("no installed library")
    try:
        probe = _open(base_path)
    except (OSError, AttributeError, RuntimeError) as exc:  # damaged, foreign or stale
        return _build_native(f"the installed library does not load: {exc}")
    if _stale(probe):
        return _build_native("the kernel sources changed since the package was installed")
    for variant in recipe.variants():
        if choice not in ("auto", variant.name):
            continue
        if not _supports(probe, variant):
            if choice == "auto":
                continue
            raise RuntimeError(f"FASTTVERSKY_CPU_ISA={choice}: this CPU lacks {variant.name}")
        path = _installed(variant.name)
        if path is None:  # that variant failed to build at install: take the next one
            if choice == "auto":
                continue
            raise RuntimeError(f"FASTTVERSKY_CPU_ISA={choice}: {variant.name} was not built")
        return probe if variant.name == recipe.BASELINE else _open(path)
    raise AssertionError("unreachable: the baseline variant runs everywhere")


_LIB = LazyLibrary(_build)


def _library() -> ctypes.CDLL:
    """The loaded kernels, or raise the (remembered) reason they cannot be loaded."""
    return _LIB.get()


def _params(logits, target, spec: KernelSpec) -> TverskyParams:
    B, _, N = logits.shape
    # Small volumes are not worth waking threads for.
    threads = max(1, torch.get_num_threads()) if B * N >= 65536 else 1
    return make_params(logits, target, spec, threads)


@functools.lru_cache(maxsize=8)
def _region_masks(masks: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(masks, dtype=torch.int64)


def _region_table(spec: KernelSpec) -> torch.Tensor | None:
    """spec.region_masks as the CPU int64 table the kernels index by label (or None).
    Cached per table: a training run passes the same one every step."""
    return None if spec.region_masks is None else _region_masks(spec.region_masks)


class _CpuBackend(Backend):
    name = "cpu"
    max_classes = MAX_CLASSES
    class_limit_why = "supported by the kernel"
    features = frozenset({"ce", "soft_ce", "label_smoothing", "focal", "float_labels", "regions"})

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
        stats = torch.empty((B, C, 3 + spec.ce_columns), dtype=torch.float64)
        flags = torch.zeros(2, dtype=torch.int64)
        p = _params(logits, target, spec)
        masks = _region_table(spec)  # referenced until the call returns
        p.region_masks_ptr = None if masks is None else masks.data_ptr()
        p.stats_ptr = stats.data_ptr()
        p.flags_ptr = flags.data_ptr()
        check_kernel_code(_library().tversky_cpu_forward(ctypes.byref(p)), "CPU", "forward")
        return stats, flags

    def backward(
        self, logits, target, coef_a, coef_b, spec: KernelSpec, coef_ce=None, coef_ce2=None
    ):
        grad = gradient_buffer(logits)
        p = _params(logits, target, spec)
        masks = _region_table(spec)  # referenced until the call returns
        p.region_masks_ptr = None if masks is None else masks.data_ptr()
        p.grad_ptr = grad.data_ptr()
        p.grad_stride_b, p.grad_stride_c, p.grad_stride_n = grad.stride()
        # the (B, C) coefficients, each referenced until the call returns
        coefs = kernel_coefs(logits, coef_a, coef_b, coef_ce, coef_ce2)
        ptrs = [None if c is None else c.data_ptr() for c in coefs]
        p.coef_a_ptr, p.coef_b_ptr, p.coef_ce_ptr, p.coef_ce2_ptr = ptrs
        check_kernel_code(_library().tversky_cpu_backward(ctypes.byref(p)), "CPU", "backward")
        return grad


BACKEND = _CpuBackend()

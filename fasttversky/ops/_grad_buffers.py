"""Gradient buffers of the CPU backward: fresh pages made cheap, and reused across steps.

The backward writes a logits-sized gradient that autograd hands on and, in a training
step, frees before the next step's backward. A buffer that large is a fresh mapping
from the operating system each time (glibc serves allocations above its mmap threshold,
at most 32 MiB, with mmap), and every page of it is faulted in and zeroed on its first
write: with 4 KiB pages that cost more than the backward's own arithmetic and memory
traffic, with 2 MiB pages (``advise_huge_pages``) it is still about a third of the
many-class backward (bench/results/many_classes_cpu.md).

So the last buffer of each layout is kept and handed out again once no tensor refers to
it any more: its storage's use count is this module's reference alone. A gradient that
someone still holds (``x.grad`` of a leaf, a tensor saved by the next layer's backward,
a NumPy view) is never written to; a new buffer is made and kept instead.

``FASTTVERSKY_GRAD_CACHE_MB`` bounds the bytes kept (default 1024; ``0`` turns the reuse
off): a kept buffer is memory the process holds between steps, so a gradient larger
than the bound is never kept. ``release()`` drops every kept buffer.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading

import torch

from ._base import new_grad

_DEFAULT_LIMIT_MB = 1024
# Smaller gradients come from malloc's free lists, whose pages are already touched.
MIN_BYTES = 1 << 20
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14

# torch's private use count of a storage; without it (another torch) nothing is reused.
_use_count = getattr(torch._C, "_storage_Use_Count", None)
_lock = threading.Lock()
# (shape, strides, dtype) of the logits -> (storage, size, strides) of their gradient
_kept: dict[tuple, tuple[torch.UntypedStorage, tuple, tuple]] = {}


@functools.lru_cache(maxsize=1)
def limit_bytes() -> int:
    """FASTTVERSKY_GRAD_CACHE_MB in bytes, read once; a bad value is a one-line error."""
    raw = os.environ.get("FASTTVERSKY_GRAD_CACHE_MB", str(_DEFAULT_LIMIT_MB)).strip()
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not mb >= 0:  # also NaN
        raise ValueError(f"FASTTVERSKY_GRAD_CACHE_MB={raw!r} is not a number of MiB >= 0")
    return int(mb * (1 << 20))


def gradient_buffer(logits: torch.Tensor) -> torch.Tensor:
    """An uninitialised CPU gradient for ``logits`` (as ops._base.new_grad): a kept
    buffer of this layout when no tensor refers to it any more, else a fresh one,
    kept for the next step if it fits under the bound."""
    key = (tuple(logits.shape), tuple(logits.stride()), logits.dtype)
    nbytes = logits.numel() * logits.element_size()
    if _use_count is None or not MIN_BYTES <= nbytes <= limit_bytes():
        return _fresh(logits)
    with _lock:  # checking and taking are one step for concurrent backwards
        kept = _kept.get(key)
        if kept is not None and _use_count(kept[0]._cdata) == 1:
            storage, size, stride = kept
            return torch.empty(0, dtype=logits.dtype).set_(storage, 0, size, stride)
        grad = _fresh(logits)
        _kept.pop(key, None)  # one still in use stays with its user
        _kept[key] = (grad.untyped_storage(), tuple(grad.shape), tuple(grad.stride()))
        _evict(limit_bytes())
        return grad


def release() -> None:
    """Drop every kept buffer (the memory returns once no tensor refers to it)."""
    with _lock:
        _kept.clear()


def _evict(limit: int) -> None:
    """Drop the oldest kept buffers until the rest fit under ``limit`` bytes."""
    while sum(st.nbytes() for st, _, _ in _kept.values()) > limit:
        del _kept[next(iter(_kept))]


def _fresh(logits: torch.Tensor) -> torch.Tensor:
    grad = new_grad(logits)
    advise_huge_pages(grad)
    return grad


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def advise_huge_pages(t: torch.Tensor) -> None:
    """Ask Linux to back a fresh output buffer with 2 MiB pages before the kernel writes
    it: one fault and one zeroing per 2 MiB instead of per 4 KiB (measured: 50 -> 11 ms
    to fill a 59 MB buffer). Best effort: a no-op where THP is off or madvise is missing.
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

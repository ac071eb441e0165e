"""Benchmark setup: options, the device, and the memory-copy bandwidth of this run.

Options (``python -m pytest bench/bench_loss.py --benchmark-only [...]``):

* ``--quick``: every spatial dim 4x smaller (a smoke run; numbers are not the targets').
* ``--device cpu|cuda``: default cuda when available, else cpu.
* ``--providers a,b``: only these providers (names as in the test ids).

Peak extra memory (``peak_memory``): on CUDA, ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``, minus what was allocated before the call. On CPU, the
process's peak resident set: writing ``5`` to ``/proc/self/clear_refs`` resets the
kernel's high-water mark ``VmHWM`` to the current RSS, then ``VmHWM - VmRSS(before)``
after the call is the exact peak growth in touched pages -- no sampling thread to miss
a short spike, no allocator hook. It is valid because PyTorch's CPU allocator has no cache
and glibc serves large blocks with mmap and returns them with munmap, so an earlier
call's freed buffers cannot hide a new peak. glibc's threshold for that is dynamic (up
to 32 MiB), so this conftest pins it to 64 KiB with ``mallopt`` (``_pin_mmap_threshold``):
then every tensor of 64 KiB or more, at ``--quick`` sizes too, shows in RSS when touched
and leaves it when freed. Tensors of the full cases are >= 29 MB and are mmapped under
glibc's default anyway, so the pin does not change those timings.
"""

from __future__ import annotations

import gc
import re
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):  # reference/ is top-level, _cases.py sits here
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

COPY_BYTES = 256 * 2**20


def _pin_mmap_threshold(nbytes: int = 64 * 1024) -> bool:
    """glibc: serve every malloc >= ``nbytes`` with its own mmap (see the module doc)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):  # not glibc: peaks of small tensors may be undercounted
        return False


MMAP_THRESHOLD_PINNED = _pin_mmap_threshold()


def pytest_addoption(parser):
    g = parser.getgroup("fasttversky bench")
    g.addoption("--quick", action="store_true", help="4x smaller spatial dims")
    g.addoption("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.addoption("--providers", default=None, help="comma-separated provider names")


def _device(config) -> str:
    d = config.getoption("--device")
    return d or ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def device(request) -> str:
    return _device(request.config)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_copy_bandwidth(device: str, reps: int = 15) -> dict:
    """Median ``dst.copy_(src)`` of a 256 MiB float32 tensor: 2 x 256 MiB moved per copy."""
    src = torch.randn(COPY_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch dst's pages outside the timing
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    gc.collect()
    med = statistics.median(times)
    return {"bytes": 2 * COPY_BYTES, "median_s": med, "gbps": 2 * COPY_BYTES / med / 1e9}


@pytest.fixture(scope="session")
def copy_bandwidth(device) -> dict:
    return measure_copy_bandwidth(device)


# --------------------------------------------------------------------------------------
# shared by the side-by-side benchmarks (bench_compound, bench_dropins, bench_terms)
# --------------------------------------------------------------------------------------
class InputCache:
    """One case's tensors (``case.make(device, quick)``), kept only until a benchmark of
    another case asks: the big cases do not all fit in RAM at once."""

    def __init__(self):
        self._key, self._tensors = None, None

    def get(self, case, device: str, quick: bool):
        key = (case, device, quick)
        if self._key != key:
            self._key = self._tensors = None
            gc.collect()
            self._tensors, self._key = case.make(device, quick), key
        return self._tensors


def alternating(benchmark, calls: dict, device: str, reset, rounds: int, warmup_rounds: int = 1):
    """Time every ``calls[name]()`` once per round, in an order that reverses each round,
    so that a shared machine's load hits all of them alike; ``reset()`` runs untimed
    before each call (e.g. ``x.grad = None``; a dict gives each call its own). Returns
    ({name: median seconds without the warm-up rounds (all of them with
    --benchmark-disable, which runs one)}, all times)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)

    def one_round():
        order.reverse()
        for name in order:
            (reset[name] if isinstance(reset, dict) else reset)()
            sync(device)
            t0 = time.perf_counter()
            calls[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)

    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    medians = {k: statistics.median(v[warmup_rounds:] or v) for k, v in times.items()}
    return medians, times


# --------------------------------------------------------------------------------------
# peak memory
# --------------------------------------------------------------------------------------
def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) * 1024


def peak_memory(fn, device: str) -> int | None:
    """Peak bytes allocated by ``fn()`` beyond what existed before it (None if unknown).

    What ``fn`` leaves alive (e.g. ``logits.grad``) counts: it is part of the peak. The
    CPU backward's kept gradient buffers (fasttversky/ops/_grad_buffers.py) are released
    first, so that the call allocates its gradient as a first training step does.
    """
    from fasttversky.ops import _grad_buffers

    _grad_buffers.release()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _proc_status("VmRSS")
        fn()
        return _proc_status("VmHWM") - base
    except OSError:  # not Linux, or clear_refs not writable: say so, do not guess
        return None

"""Tversky loss benchmarks: fwd and fwd+bwd, every provider, the cases of bench/_cases.py.

    python -m pytest bench/bench_loss.py --benchmark-only [--quick] [--providers a,b]

(``python bench/report.py`` runs this and writes the Markdown summary.)

Each benchmark times one training-step use of the loss on a leaf ``logits`` tensor
that requires grad: ``fwd`` = the loss call, ``fwdbwd`` = the call plus ``backward()``.
``logits.grad`` is reset to None before every round (untimed), so each backward
allocates its gradient like a real step does. For the fused backends, ``bwd`` times
``backward()`` alone (the forward runs untimed in the round's setup), and
``test_grad_buffer`` times writing a gradient-sized buffer into fresh pages vs pages
already touched: together they say where a fused step's time goes. Warm-up rounds run first, so
``torch.compile``'s compilation and the CPU kernels' first-use build are not timed.

``extra_info`` of every benchmark: the bytes that must move (see _cases.py), effective
GB/s from the median, the same run's copy bandwidth and the fraction of it reached, the
copy-bandwidth floor and how many times above it the median is, the peak extra memory
of one more call (conftest.peak_memory) and, for fwd+bwd, how much of it lies beyond
the gradient buffer, and the loss value (all providers should agree).
"""

from __future__ import annotations

import gc

import pytest
import torch
from _cases import SLOW_PROVIDERS, cases, providers
from conftest import COPY_BYTES, _device, peak_memory, sync

MODES = ("fwd", "fwdbwd")
SPLIT_MODES = ("bwd",)  # fused backends only: the fwd/bwd split of a fused step


def pytest_generate_tests(metafunc):
    if not {"case", "provider", "mode"} <= set(metafunc.fixturenames):
        return
    cfg = metafunc.config
    names = list(providers(_device(cfg)))
    wanted = cfg.getoption("--providers")
    if wanted:
        names = [n for n in names if n in wanted.split(",")]
    # Grouped by case so that one case's tensors are built once (see _inputs).
    params = [
        (c, p, m)
        for c in cases(cfg.getoption("--quick"))
        for m in MODES + SPLIT_MODES
        for p in names
        if m in MODES or p.startswith("fasttversky[")
    ]
    metafunc.parametrize(
        "case,provider,mode", params, ids=[f"{c.id}-{m}-{p}" for c, p, m in params]
    )


_CURRENT: dict = {}


def _inputs(case, device):
    """The case's tensors, kept for the next benchmark of the same case only (RAM)."""
    if _CURRENT.get("key") != (case, device):
        _CURRENT.clear()
        gc.collect()
        _CURRENT["key"] = (case, device)
        _CURRENT["tensors"] = case.make(device)
    return _CURRENT["tensors"]


def test_copy_bandwidth(benchmark, device):
    """The floor's yardstick, as its own row: ``dst.copy_(src)`` of 256 MiB."""
    benchmark.group = "copy"
    src = torch.randn(COPY_BYTES // 4, device=device)
    dst = torch.empty_like(src)

    def run():
        dst.copy_(src)
        sync(device)

    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=2)
    med = benchmark.stats.stats.median
    benchmark.extra_info.update(
        provider="copy",
        device=device,
        bytes_moved=2 * COPY_BYTES,
        gbps=2 * COPY_BYTES / med / 1e9,
        threads=torch.get_num_threads(),
    )


def test_loss(benchmark, case, provider, mode, device, copy_bandwidth, request):
    benchmark.group = f"{case.id}-{mode}"
    logits, labels = _inputs(case, device)
    fn = providers(device)[provider](case)

    def reset():
        logits.grad = None

    setup = reset
    if mode == "fwd":

        def run():
            out = fn(logits, labels)
            sync(device)
            return out

    elif mode == "bwd":

        def setup():  # the round's untimed part is the forward
            logits.grad = None
            loss = fn(logits, labels)
            sync(device)
            return (loss,), {}

        def run(loss=None):
            if loss is None:  # the peak-memory call below: forward and backward
                loss = fn(logits, labels)
            loss.backward()
            sync(device)

    else:

        def run():
            fn(logits, labels).backward()
            sync(device)

    quick = request.config.getoption("--quick")
    slow = provider in SLOW_PROVIDERS
    rounds = (10 if quick else 5) if slow else (20 if quick else 15)
    warmup = 2 if provider.startswith("compile") else 1
    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1, warmup_rounds=warmup)

    med = benchmark.stats.stats.median
    moved = case.bytes_moved(mode)
    copy_bps = copy_bandwidth["gbps"] * 1e9
    reset()
    peak = peak_memory(run, device)
    reset()
    # With grad enabled, as timed: under no_grad torch.compile would build another graph.
    value = float(fn(logits, labels).detach())
    info = dict(
        provider=provider,
        case=case.id,
        shape=list(case.shape),
        dtype=str(case.dtype).removeprefix("torch."),
        labels="uint8",
        mode=mode,
        device=device,
        threads=torch.get_num_threads(),
        bytes_moved=moved,
        gbps=moved / med / 1e9,
        copy_gbps=copy_bandwidth["gbps"],
        frac_copy_bw=moved / med / copy_bps,
        floor_s=moved / copy_bps,
        x_floor=med / (moved / copy_bps),
        peak_extra_bytes=peak,
        loss=value,
    )
    if mode != "fwd" and peak is not None:
        info.update(
            grad_bytes=case.grad_bytes,
            beyond_grad_bytes=peak - case.grad_bytes,
            beyond_grad_frac=(peak - case.grad_bytes) / case.grad_bytes,
        )
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("pages", ["fresh", "touched"])
def test_grad_buffer(benchmark, pages, device, copy_bandwidth, request):
    """Write zeros into a gradient-sized buffer, newly allocated or already touched.

    ``fresh`` is what any backward that allocates its gradient pays on top of the kernel
    (first-touch page faults, then the write); ``touched`` the write alone.
    """
    case = cases(request.config.getoption("--quick"))[0]
    benchmark.group = f"{case.id}-grad-buffer"
    buf = torch.empty(case.shape, dtype=case.dtype, device=device).fill_(1)

    if pages == "fresh":

        def run():
            torch.empty(case.shape, dtype=case.dtype, device=device).fill_(0)
            sync(device)

    else:

        def run():
            buf.fill_(0)
            sync(device)

    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=2)
    med = benchmark.stats.stats.median
    benchmark.extra_info.update(
        provider=f"grad buffer ({pages} pages)",
        case=case.id,
        mode="write",
        shape=list(case.shape),
        dtype=str(case.dtype).removeprefix("torch."),
        device=device,
        bytes_moved=case.grad_bytes,
        gbps=case.grad_bytes / med / 1e9,
        copy_gbps=copy_bandwidth["gbps"],
        threads=torch.get_num_threads(),
    )


@pytest.fixture(autouse=True)
def _free_after_last_use(request):
    yield
    # Let go of the compiled graphs' and providers' temporaries between benchmarks.
    gc.collect()

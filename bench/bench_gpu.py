"""GPU loss benchmarks under pytest-benchmark: the cases and providers of gpu_report.py.

    python -m pytest bench/bench_gpu.py --benchmark-only

Skipped without CUDA. Shapes 2x2x128x224x256 and 1x4x160^3, fp32 and bf16 logits, uint8
labels; fwd and fwd+bwd; providers triton, cuda, reference, torch.compile(reference),
MONAI. Warm-up rounds run first (Triton/nvcc builds, torch.compile are not timed);
every timed call ends with ``torch.cuda.synchronize()``. ``extra_info``: bytes that
must move, GB/s from the median, this run's copy bandwidth and the fraction reached,
and the peak extra memory of one call.
"""

from __future__ import annotations

import gc

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

if torch.cuda.is_available():
    import gpu_report as R  # bench/ is on sys.path (bench/conftest.py)

    CASES = R.cases(dry=False)
    PROVIDERS = R.PROVIDERS
else:  # collected but skipped: keep ids readable
    R = None
    CASES, PROVIDERS = [], ()

_COPY: dict = {}
_INPUTS: dict = {}


def _copy_gbps() -> float:
    if "gbps" not in _COPY:
        _COPY.update(R.copy_bandwidth("cuda"))
    return _COPY["gbps"]


def _inputs(case):
    # One case's tensors at a time: the paper shape in fp32 is ~0.5 GB with its grad.
    if _INPUTS.get("id") != case.id:
        _INPUTS.clear()
        gc.collect()
        torch.cuda.empty_cache()
        _INPUTS["id"] = case.id
        _INPUTS["t"] = case.make("cuda")
    return _INPUTS["t"]


def test_copy_bandwidth(benchmark):
    src = torch.empty(128 * 2**20, device="cuda").normal_()
    dst = torch.empty_like(src)

    def run():
        dst.copy_(src)
        torch.cuda.synchronize()

    benchmark.group = "copy"
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=3)
    benchmark.extra_info["bytes"] = 2 * src.numel() * 4


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_loss(benchmark, case, mode, provider):
    try:
        fn = R.provider_fn(provider, dry=False)
    except Exception as exc:
        pytest.skip(f"{provider}: {exc}")
    logits, labels = _inputs(case)

    def run():
        logits.grad = None
        out = fn(logits, labels)
        if mode == "fwdbwd":
            out.backward()
        torch.cuda.synchronize()

    benchmark.group = f"{case.id}-{mode}"
    slow = provider in R.SLOW
    benchmark.pedantic(run, rounds=5 if slow else 30, iterations=1, warmup_rounds=2)
    med = benchmark.stats.stats.median
    nbytes = case.bytes_moved(mode)
    copy = _copy_gbps()
    benchmark.extra_info.update(
        bytes=nbytes,
        gbps=nbytes / med / 1e9,
        copy_gbps=copy,
        copy_fraction=nbytes / med / 1e9 / copy,
        peak_extra_bytes=R.peak_extra(run, "cuda"),
    )
    logits.grad = None

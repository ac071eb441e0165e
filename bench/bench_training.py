"""One training step (forward + backward + Adam), fasttversky vs the plain reference.

    python -m pytest bench/bench_training.py --benchmark-only [--quick]

* **fast**: ``fasttversky.app.models.UNet3D`` (its defaults: checkpoint="all", in-place
  ReLU, channels_last_3d on the CPU) + ``fasttversky.tversky_loss`` (backend "auto":
  the fused kernel) + Adam; **fast-contiguous**: the same with channels_last=False.
* **reference**: ``reference.unet.ReferenceUNet3D`` + ``reference_tversky_loss`` + Adam.

CPU case (the issue's): 1x3x64x112x128, base 8, 4 levels, float32 (``--quick``: every
spatial dim halved). Peak memory is measured in a fresh subprocess per variant so that
neither the other variant nor pytest's own allocations are counted: after one warm-up
step (which also creates Adam's state), ``/proc/self/clear_refs`` resets the kernel's
RSS high-water mark, one more step runs, and ``VmHWM - VmRSS(before)`` is the step's
peak growth in resident memory; glibc's mmap threshold is pinned to 64 KiB so freed
tensors leave RSS at once (see bench/conftest.py). ``extra_info`` holds that peak
(``step_peak_bytes``), the absolute peak RSS and the baseline (model, Adam state,
data, libraries), the subprocess's step time, and for "fast" the ratio to the
reference's peak.

GPU: :func:`gpu_training_report` measures the paper's full size (1x3x128x224x256,
base 32, 4 levels) on CUDA, fast in bf16 autocast against the plain fp32 reference
(which may run out of memory: caught and reported). bench/gpu_report.py calls it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # reference/ is a top-level folder
    sys.path.insert(0, str(ROOT))

CPU_CASE = dict(shape=(1, 3, 64, 112, 128), base=8, levels=4)
CPU_QUICK_CASE = dict(shape=(1, 3, 32, 56, 64), base=8, levels=4)
GPU_CASE = dict(shape=(1, 3, 128, 224, 256), base=32, levels=4)
KINDS = ("reference", "fast")
# "fast-contiguous": the same model with channels_last=False (the layout it replaced).
VARIANTS = ("reference", "fast", "fast-contiguous")


# --------------------------------------------------------------------------------------
# one step, shared by the benchmark, the memory subprocess and the GPU report
# --------------------------------------------------------------------------------------
def make_batch(shape, device="cpu"):
    """Image (B, 3, D, H, W) float32 and a ~3 % foreground uint8 label map (B, D, H, W)."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(shape, generator=g)
    label = (image[:, 2] > 1.9).to(torch.uint8)
    return image.to(device), label.to(device)


def build_step(
    kind,
    shape,
    base,
    levels,
    device="cpu",
    precision="fp32",
    checkpoint="all",
    backend="auto",
    channels_last=None,
):
    """A closure running one training step of ``kind`` on a fixed batch; returns the loss.

    precision "bf16"/"fp16" wraps the forward in autocast (fp16 would need a GradScaler
    in real training; a single benchmark step does not care). channels_last: UNet3D's
    argument (None = its default: on for float32 CPU input); ignored for the reference.
    """
    import fasttversky
    from fasttversky.app.models import UNet3D
    from reference import reference_tversky_loss
    from reference.unet import ReferenceUNet3D

    torch.manual_seed(0)
    if kind == "fast":
        model = UNet3D(3, 2, base, levels, checkpoint=checkpoint, channels_last=channels_last)
    elif kind == "reference":
        model = ReferenceUNet3D(3, 2, base, levels)
    else:
        raise ValueError(kind)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    image, label = make_batch(shape, device)
    if kind == "fast":
        image = model.prepare_input(image)  # as train() does
    autocast = (
        torch.autocast(
            torch.device(device).type,
            dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
        )
        if precision != "fp32"
        else contextlib.nullcontext()
    )

    def step():
        with autocast:
            logits = model(image)
        if kind == "fast":
            loss = fasttversky.tversky_loss(logits, label, 0.3, 0.7, backend=backend)
        else:
            loss = reference_tversky_loss(logits.float(), label, 0.3, 0.7)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# --------------------------------------------------------------------------------------
# CPU peak memory, in a subprocess
# --------------------------------------------------------------------------------------
def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) * 1024


def _pin_mmap_threshold(nbytes: int = 64 * 1024) -> bool:
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, nbytes))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _measure_here(spec: dict) -> dict:
    """Runs inside the subprocess: warm-up step, then one measured step."""
    pinned = _pin_mmap_threshold()
    step = build_step(
        spec["kind"],
        tuple(spec["shape"]),
        spec["base"],
        spec["levels"],
        precision=spec.get("precision", "fp32"),
        checkpoint=spec.get("checkpoint", "all"),
        channels_last=spec.get("channels_last"),
    )
    step()  # warm-up: Adam state, first-call allocations, kernel build
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _proc_status("VmRSS")
    t0 = time.perf_counter()
    loss = step()
    dt = time.perf_counter() - t0
    peak = _proc_status("VmHWM")
    return {
        "step_peak_bytes": peak - before,
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": before,
        "subprocess_step_s": dt,
        "loss": float(loss),
        "mmap_threshold_pinned": pinned,
    }


def measure_in_subprocess(spec: dict, timeout: float = 1800) -> dict:
    """Peak memory of one step of ``spec`` (kind, shape, base, levels, ...) in a fresh
    Python process; see the module docstring."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--measure", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------
_PEAKS: dict = {}


@pytest.mark.parametrize("variant", VARIANTS)  # reference first: the others report the ratio
def test_training_step_cpu(benchmark, variant, request):
    quick = request.config.getoption("--quick", default=False)
    case = CPU_QUICK_CASE if quick else CPU_CASE
    kind, _, layout = variant.partition("-")
    channels_last = False if layout == "contiguous" else None
    mem = measure_in_subprocess({"kind": kind, "channels_last": channels_last, **case})
    _PEAKS[variant] = mem["step_peak_bytes"]
    step = build_step(
        kind, case["shape"], case["base"], case["levels"], channels_last=channels_last
    )
    benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)
    info = benchmark.extra_info
    info.update(mem)
    info.update(
        kind=kind,
        channels_last=channels_last,
        shape=list(case["shape"]),
        base_features=case["base"],
        levels=case["levels"],
        precision="fp32",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )
    if kind != "reference" and "reference" in _PEAKS:
        info["peak_ratio_to_reference"] = mem["step_peak_bytes"] / _PEAKS["reference"]


# --------------------------------------------------------------------------------------
# GPU report
# --------------------------------------------------------------------------------------
def _cuda_measure(kind, precision, case, checkpoint="all", rounds=3) -> dict:
    res = {"kind": kind, "precision": precision}
    if kind == "fast":
        res["checkpoint"] = checkpoint
    step = None
    try:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        step = build_step(
            kind,
            case["shape"],
            case["base"],
            case["levels"],
            device="cuda",
            precision=precision,
            checkpoint=checkpoint,
        )
        step()  # warm-up (cuDNN algorithm choice, Adam state, kernel build)
        torch.cuda.synchronize()
        times = []
        for _ in range(rounds):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        # Peak over the whole life of the step, weights/Adam state/inputs included: the
        # number that must fit in the card.
        res["peak_bytes"] = torch.cuda.max_memory_allocated()
        res["peak_gib"] = res["peak_bytes"] / 2**30
        res["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        res["step_s_median"] = statistics.median(times)
        res["step_s_all"] = times
    except torch.cuda.OutOfMemoryError as exc:
        res["oom"] = True
        res["error"] = str(exc).splitlines()[0]
    finally:
        del step
        gc.collect()
        torch.cuda.empty_cache()
    return res


def gpu_training_report(case: dict | None = None, rounds: int = 3) -> dict:
    """Fast vs reference training step at the paper's full size on CUDA.

    Returns a dict: "case" (shape, base, levels), "device", "torch", "backends"
    (fasttversky.available_backends()), "target_peak_gib" (8), and "runs": a list of
    {kind, precision, [checkpoint], peak_bytes, peak_gib, peak_reserved_gib,
    step_s_median, step_s_all} or {..., oom: True, error} entries for: fast bf16
    (checkpoint "all" and "top"), fast fp32, reference fp32 (the plain oracle) and
    reference bf16 autocast (to separate precision from the other savings);
    "fast_bf16_meets_target" (bool). Without CUDA: {"skipped": reason}.
    """
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    import fasttversky

    case = dict(case or GPU_CASE)
    runs = [
        _cuda_measure("fast", "bf16", case, "all", rounds),
        _cuda_measure("fast", "bf16", case, "top", rounds),
        _cuda_measure("fast", "fp32", case, "all", rounds),
        _cuda_measure("reference", "fp32", case, rounds=rounds),
        _cuda_measure("reference", "bf16", case, rounds=rounds),
    ]
    fast = runs[0]
    return {
        "case": {"shape": list(case["shape"]), "base": case["base"], "levels": case["levels"]},
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "backends": fasttversky.available_backends(),
        "target_peak_gib": 8,
        "runs": runs,
        "fast_bf16_meets_target": bool(not fast.get("oom") and fast["peak_gib"] <= 8),
    }


def _main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--measure", help="JSON spec: run one memory measurement, print JSON")
    p.add_argument("--gpu", action="store_true", help="print gpu_training_report() as JSON")
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(_measure_here(json.loads(args.measure))))
    elif args.gpu:
        print(json.dumps(gpu_training_report(), indent=2))
    else:
        p.print_help()


if __name__ == "__main__":
    _main()

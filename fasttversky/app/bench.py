"""``fasttversky bench``: a self-contained loss benchmark that runs from an installed
package (no source tree, no pytest): median wall time of the fused Tversky loss on each
available backend against the same loss written as plain PyTorch ops, forward and
forward + backward, on one shape, written as Markdown (+ JSON to re-render it).

The full matrix (MONAI, ``torch.compile``, memory, copy bandwidth, targets) stays in
the source tree's pytest-benchmark suites: ``python bench/report.py`` (bench/).

Every provider gets the same inputs: logits (B, C, D, H, W) standard normal with
``requires_grad``, labels (B, D, H, W) uint8 with ~90 % background, α=0.3, β=0.7.
"""

from __future__ import annotations

import datetime as dt
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .config import read_json
from .errors import ConfigError, DataError

__all__ = ["SHAPES", "plain_tversky", "render", "run_benchmark"]

SHAPES = {
    "paper": (1, 2, 128, 224, 256),  # Salehi et al.'s input, two classes
    "quick": (1, 2, 32, 48, 40),  # a smoke run: seconds
}
ALPHA, BETA = 0.3, 0.7
MODES = ("fwd", "fwdbwd")


def plain_tversky(logits, labels, alpha: float = ALPHA, beta: float = BETA, smooth: float = 1e-5):
    """The Tversky loss as plain PyTorch ops (softmax, one-hot, three sums): the baseline
    a user would otherwise write. logits (B, C, *S) float, labels (B, *S) integer ->
    scalar, mean over batch and classes of 1 - T."""
    import torch

    p = torch.softmax(logits.float(), dim=1)
    g = torch.nn.functional.one_hot(labels.long(), logits.shape[1]).movedim(-1, 1).to(p.dtype)
    dims = tuple(range(2, logits.dim()))
    tp = (p * g).sum(dims)
    fp = (p * (1 - g)).sum(dims)
    fn = ((1 - p) * g).sum(dims)
    return (1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)).mean()


def _inputs(shape, device: str, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g).to(device).requires_grad_(True)
    u = torch.rand((shape[0], *shape[2:]), generator=g)
    labels = torch.where(u < 0.9, 0, 1 + (u * 1e4).long() % (shape[1] - 1)).to(torch.uint8)
    return logits, labels.to(device)


def _time(fn: Callable[[], None], sync: Callable[[], None], repeats: int, warmup: int):
    for _ in range(warmup):  # first calls compile/build and allocate: not timed
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def run_benchmark(
    shape: Sequence[int] = SHAPES["paper"],
    *,
    device: str | None = None,
    backends: Sequence[str] | None = None,
    repeats: int = 5,
    warmup: int = 2,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Time every provider -> a JSON-able dict (machine, versions, shape, per provider
    and mode the times in seconds and the median; the fused losses' largest difference
    from the plain one, as a sanity check)."""
    import torch

    import fasttversky

    shape, device, backends = _check_options(shape, device, backends, repeats, warmup)
    providers = {"plain torch": plain_tversky}
    for b in backends:
        providers[f"fused {b}"] = lambda x, y, b=b: fasttversky.tversky_loss(
            x, y, ALPHA, BETA, backend=b
        )
    results = _time_providers(providers, _inputs(shape, device), device, repeats, warmup, log)
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(device),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "fasttversky": fasttversky.__version__,
        },
        "threads": torch.get_num_threads(),
        "device": device,
        "shape": list(shape),
        "repeats": repeats,
        "results": results,
    }


def _check_options(shape, device, backends, repeats: int, warmup: int):
    """ConfigError for any option that cannot run here -> (shape, device, backends)."""
    import torch

    import fasttversky

    if repeats < 1:
        raise ConfigError("repeats", f"must be >= 1, got {repeats}")
    if warmup < 0:
        raise ConfigError("warmup", f"must be >= 0, got {warmup}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 5 or min(shape) < 1 or shape[1] < 2:
        raise ConfigError("shape", f"must be B C D H W with C >= 2, got {list(shape)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"{device} asked for but torch sees no CUDA device")
    available = fasttversky.available_backends(device=device)
    usable = [b for b, why in available.items() if why is None]
    if backends is None:
        backends = usable
    for b in backends:
        if b not in available:
            raise ConfigError("backends", f"unknown backend {b!r}; one of {', '.join(available)}")
        if b not in usable:
            raise ConfigError("backends", f"{b} cannot run here: {available[b]}")
    return shape, device, backends


def _time_providers(providers: dict, inputs, device: str, repeats, warmup, log) -> list:
    """Forward and forward + backward of every provider on the same inputs -> rows."""
    import torch

    logits, labels = inputs

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    want = float(plain_tversky(logits.detach(), labels))
    results = []
    for name, loss_fn in providers.items():
        if log:
            log(f"timing {name}")
        value = float(loss_fn(logits.detach(), labels))
        for mode in MODES:

            def step(loss_fn=loss_fn, mode=mode):
                if mode == "fwd":
                    with torch.no_grad():
                        loss_fn(logits, labels)
                else:
                    logits.grad = None
                    loss_fn(logits, labels).backward()

            times = _time(step, sync, repeats, warmup)
            results.append(
                {
                    "provider": name,
                    "mode": mode,
                    "times_s": times,
                    "median_s": statistics.median(times),
                    "loss": value,
                    "abs_diff_vs_plain": abs(value - want),
                }
            )
    return results


def _machine(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{cpu}, {os.cpu_count()} logical CPUs"


def render(report: dict) -> str:
    """The Markdown report of :func:`run_benchmark`'s dict."""
    try:
        rows = report["results"]
        shape = "×".join(map(str, report["shape"]))
        head = (
            f"# fasttversky bench\n\n{report['date']}; {report['machine']}; device "
            f"{report['device']}, {report['threads']} threads; "
            + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
            + f"\n\nTversky loss (α={ALPHA}, β={BETA}), logits {shape} float32, median of "
            f"{report['repeats']} runs after warm-up; speed-up = plain torch / provider.\n\n"
        )
        base = {r["mode"]: r["median_s"] for r in rows if r["provider"] == "plain torch"}
        lines = [
            "| provider | mode | median ms | speed-up vs plain | loss difference vs plain |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            speed = base.get(r["mode"], math.nan) / r["median_s"] if r["median_s"] else math.nan
            lines.append(
                f"| {r['provider']} | {r['mode']} | {1e3 * r['median_s']:.2f} | "
                f"{speed:.2f}× | {r['abs_diff_vs_plain']:.1e} |"
            )
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise DataError(f"not a fasttversky bench report ({type(e).__name__}: {e})") from e
    return head + "\n".join(lines) + "\n"


def load_report(path: str | Path) -> dict:
    """The JSON ``fasttversky bench --out FILE.md`` writes beside the report
    (``FILE.json``; ``--from-json``); DataError naming the file if it cannot be read."""
    return read_json(path)

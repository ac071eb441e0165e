"""Start-up cost: ``import torch`` vs ``import torch, fasttversky``, and the CLI's ``--help``.

    python -m pytest bench/bench_import.py --benchmark-only

Each round is a fresh interpreter (``subprocess``), since a module is imported once per
process. The benchmark's time is the whole process (interpreter start included, what a
user waits for); ``extra_info`` adds what the child measured itself: the median time of
its import statements (``import_s``), its peak resident set (``maxrss_mib``), and for
``torch+fasttversky`` the differences to the ``torch`` case of the same run plus
``fasttversky_after_torch_s`` / ``fasttversky_after_torch_rss_mib``: the time of the
``import fasttversky`` statement and the VmRSS growth across it in a process that has
already imported torch (immune to load swings between processes on a shared machine).
Issue 8's targets: ``import fasttversky`` adds <= 0.3 s and <= 25 MiB over
``import torch``; ``fasttversky --help`` < 1 s.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 7

_CHILD = """
import json, resource, sys, time
def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
steps = []
for name in {names!r}:
    t0 = time.perf_counter()
    __import__(name)
    steps.append({{"module": name, "s": time.perf_counter() - t0, "rss_mib": rss_mib()}})
print(json.dumps({{"steps": steps, "modules": len(sys.modules),
    "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

CASES = {
    "torch": ["torch"],
    # fasttversky's names load on first access: import what `fasttversky.tversky_loss`
    # and `fasttversky.TverskyLoss` load, so the figure is what a loss user pays.
    "torch+fasttversky": ["torch", "fasttversky", "fasttversky.functional", "fasttversky.loss"],
}
_RESULTS: dict[str, dict] = {}


def _run_child(names: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD.format(names=names)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(samples: list[dict]) -> dict:
    med = statistics.median
    info = {
        "import_s": med(sum(st["s"] for st in s["steps"]) for s in samples),
        "maxrss_mib": med(s["maxrss_mib"] for s in samples),
        "modules": samples[-1]["modules"],
    }
    if len(samples[0]["steps"]) > 1:
        # What fasttversky itself costs once torch is loaded, in the same process:
        # immune to the load swings between separate processes on a shared machine.
        info["fasttversky_after_torch_s"] = med(
            sum(st["s"] for st in s["steps"][1:]) for s in samples
        )
        info["fasttversky_after_torch_rss_mib"] = med(
            s["steps"][-1]["rss_mib"] - s["steps"][0]["rss_mib"] for s in samples
        )
    return info


@pytest.mark.parametrize("case", list(CASES))
def test_import(benchmark, case):
    samples = []
    benchmark.pedantic(
        lambda: samples.append(_run_child(CASES[case])),
        rounds=ROUNDS,
        iterations=1,
        warmup_rounds=1,
    )
    info = _summary(samples[1:])  # the warm-up round (cold page cache) is not counted
    _RESULTS[case] = info
    if case != "torch" and "torch" in _RESULTS:
        base = _RESULTS["torch"]
        info["extra_import_s"] = info["import_s"] - base["import_s"]
        info["extra_maxrss_mib"] = info["maxrss_mib"] - base["maxrss_mib"]
        info["extra_modules"] = info["modules"] - base["modules"]
    benchmark.extra_info.update(info)


def test_cli_help(benchmark):
    """``fasttversky --help`` as the console script runs it (``python -m`` form)."""
    cmd = [sys.executable, "-m", "fasttversky.app.cli", "--help"]
    benchmark.pedantic(
        lambda: subprocess.run(cmd, capture_output=True, cwd=ROOT, check=True),
        rounds=ROUNDS,
        iterations=1,
        warmup_rounds=1,
    )

"""Start-up latency of the ``fasttversky`` command line (issue 8: ``--help`` < 1 s).

    python -m pytest bench/bench_cli.py --benchmark-only

Each round starts a fresh interpreter, as a user's shell does: ``python -m
fasttversky.app.cli --help`` (what the console script runs), with ``python -c pass``
and ``python -c "import torch"`` timed beside it in the same run so the figure can be
read against the interpreter's own start and the cost a command pays once it trains.
``extra_info`` records the peak resident memory of the child (ru_maxrss, MiB).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "fasttversky --help": [sys.executable, "-m", "fasttversky.app.cli", "--help"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def _run(cmd):
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT, env=env)


@pytest.mark.parametrize("case", list(CASES))
def test_startup(benchmark, case):
    cmd = CASES[case]
    _run(cmd)  # warm the file cache: the figure is a warm start, like a second call
    benchmark.pedantic(_run, args=(cmd,), rounds=7, iterations=1)
    benchmark.extra_info["child_peak_rss_mib"] = (
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    )

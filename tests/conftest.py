"""Shared test setup.

Triton kernels must be testable on machines without a GPU: run them in the Triton
interpreter, which has to be switched on before anything imports triton.
"""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # reference/ is a top-level folder, not part of the package
    sys.path.insert(0, str(ROOT))


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = ROOT.parent / "shared" / "data" / "open_ms_data"


@pytest.fixture
def one_thread():
    """torch on one thread for the test (files opt in with ``pytestmark``): tiny convs,
    resamplings and MONAI calls are dominated by OpenMP threads waiting for each other
    on a shared 2-core machine, ~10x slower than one thread."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# .ci/run sets FASTTVERSKY_CI=1: there, tests that read the shared MS data, run the
# Triton interpreter, compile the CUDA sources with nvcc or need nnunetv2 (the [nnunet]
# extra, part of [test]) must have run, so a skip of one of them fails the session
# instead of passing silently (a user's clone without ../shared, nvcc or the extra still
# skips them, with reasons).
_REQUIRED_MARKERS = ("data", "interpreter", "nvcc", "nnunet")
_skipped_required: list[str] = []


def pytest_runtest_logreport(report):
    if os.environ.get("FASTTVERSKY_CI") != "1" or not report.skipped:
        return
    if any(m in report.keywords for m in _REQUIRED_MARKERS):
        _skipped_required.append(f"{report.nodeid}: {report.longrepr}")


def pytest_sessionfinish(session, exitstatus):
    if _skipped_required:
        print("\nFASTTVERSKY_CI=1 but these required tests were skipped:")
        for line in _skipped_required:
            print("  ", line)
        session.exitstatus = 1

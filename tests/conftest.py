"""Shared test setup.

Triton kernels must be testable on machines without a GPU: run them in the Triton
interpreter, which has to be switched on before anything imports triton.
"""

import os
import sys
from pathlib import Path

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

"""``import fasttversky`` stays light: torch and numpy, nothing a loss call does not need.

Run in a fresh interpreter, since this test process has long imported everything.
tqdm is imported by ``torch.hub`` itself when installed, so the check is on what
``import fasttversky`` adds over ``import torch``.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Heavy or application-only: torch._dynamo/_inductor (+ sympy, triton) cost ~1.5 s and
# ~150 MiB; the rest belong to the segmentation application (fasttversky.app).
FORBIDDEN = (
    "torch._dynamo",
    "torch._inductor",
    "triton",
    "sympy",
    "nibabel",
    "matplotlib",
    "scipy",
    "tqdm",
    "fasttversky.app",
)

# fasttversky's names load on first access (PEP 562): touch every public name and run
# one tiny loss (forward and backward), so that what a loss user imports is checked.
_PROBE = """
import json, sys
import torch
before = set(sys.modules)
import fasttversky
for name in fasttversky.__all__:
    getattr(fasttversky, name)
x = torch.randn(1, 2, 8, requires_grad=True)
fasttversky.tversky_loss(x, torch.zeros(1, 8, dtype=torch.long), backend="torch").backward()
fasttversky.TverskyLoss(gamma=0.75)
print(json.dumps({"added": sorted(set(sys.modules) - before), "all": sorted(sys.modules),
                  "file": fasttversky.__file__}))
"""


def _is_under(module: str, roots) -> bool:
    return any(module == r or module.startswith(r + ".") for r in roots)


@pytest.fixture(scope="module")
def imported():
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=ROOT, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_probe_imports_this_checkout(imported):
    assert Path(imported["file"]).resolve().is_relative_to(ROOT)


def test_import_adds_no_heavy_module(imported):
    added = [m for m in imported["added"] if _is_under(m, FORBIDDEN)]
    assert not added, f"import fasttversky imported {added[:10]}"
    # the library itself was loaded, not only the lazy top-level module
    assert {"fasttversky.functional", "fasttversky.loss"} <= set(imported["added"])


def test_no_compiler_stack_or_app_module_loaded_at_all(imported):
    # Not even via torch: nothing on this list may be in sys.modules after the import
    # (tqdm excepted, which torch.hub imports by itself where it is installed).
    loaded = [m for m in imported["all"] if _is_under(m, FORBIDDEN) and not _is_under(m, ("tqdm",))]
    assert not loaded, f"loaded after import fasttversky: {loaded[:10]}"

"""Where the kernel sources (the top-level csrc/ folder) are at run time.

A source checkout or editable install has csrc/ beside the package; a wheel installs
it as data files under ``<prefix>/share/fasttversky/csrc`` (pyproject's data-files),
since the kernels are compiled on first use on the machine that runs them.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path


def csrc_dir() -> Path:
    package = Path(__file__).resolve().parents[1]
    candidates = [
        package.parent / "csrc",
        Path(sysconfig.get_paths()["data"]) / "share" / "fasttversky" / "csrc",
    ]
    for root in candidates:
        if (root / "tversky.h").exists():
            return root
    raise RuntimeError(
        "fasttversky's kernel sources (csrc/) were not found in: "
        + ", ".join(str(c) for c in candidates)
    )

"""``bench/gpu_report.py --dry-run``: the GPU report's plumbing, checked on the CPU.

No GPU here, so the dry run times toy sizes (triton in the interpreter, the torch backend
standing in for cuda); what it checks is that one case of each kind (the loss matrix, the
compound Dice+CE with nnU-Net's and MONAI's losses, deep supervision over 5 scales) runs
end to end and writes a report whose rows carry no error, and that the fused rows' loss
equals the baselines' (nnU-Net's Dice term is -Dice: its value is ours - 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import TOLERANCES

ROOT = Path(__file__).resolve().parents[1]
CASES = "paper-toy-fp32,dicece-c16-toy-fp32,ds5-c2-toy-fp32"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("monai")
    pytest.importorskip("nnunetv2")
    out = tmp_path_factory.mktemp("gpu_report")
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "gpu_report.py"),
        "--dry-run",
        "--skip-tests",
        "--skip-training",
        "--out",
        str(out),
        "--cases",
        CASES,
        "--providers",
        "triton,cuda,reference",
        "--compound-providers",
        "triton,cuda,nnunet,monai",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (out / "gpu_report.md").is_file()
    return json.loads((out / "gpu_report.json").read_text())


def test_dry_run_rows_have_no_errors(report):
    assert not report["errors"], report["errors"]
    rows = report["rows"] + report["compound"]
    assert {r["case"] for r in report["compound"]} == {"dicece-c16-toy-fp32", "ds5-c2-toy-fp32"}
    bad = [r for r in rows if "error" in r and r["mode"] not in ("fwd-kernel", "bwd-kernel")]
    assert not bad, bad


def test_fused_and_baseline_losses_agree(report):
    rtol = TOLERANCES[torch.float32][0]  # fp32 cases; the providers sum in other orders
    by_case: dict[str, dict[str, float]] = {}
    for r in report["compound"]:
        by_case.setdefault(r["case"], {})[r["provider"]] = r["loss"]
    for case, losses in by_case.items():
        ours = losses["triton"]
        assert losses["cuda"] == pytest.approx(ours, rel=rtol), case
        assert losses["nnunet"] == pytest.approx(ours - 1, rel=rtol, abs=rtol), case
        if "monai" in losses:
            assert losses["monai"] == pytest.approx(ours, rel=rtol), case

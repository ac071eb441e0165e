"""bench/lesion_cpu_summary.py: grouping of trained models into arms, mean ± sd and the
bootstrap CI over seeds, and the committed summary matching the committed per-model rows."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location(
        "lesion_cpu_summary", ROOT / "bench" / "lesion_cpu_summary.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(run, seed, dsc, beta=0.7, test="patient19", **kw):
    r = {
        "run": run,
        "version": 5,
        "test_patient": test,
        "alpha": round(1 - beta, 3),
        "beta": beta,
        "ce_weight": 0,
        "transplant_contrast": "varied",
        "normalize": "zscore",
        "remap": 0,
        "seed": seed,
        "step": 1800,
        "n_true": 9,
        "n_detected": 4,
        "n_pred": 6,
        "tp": 10,
        "fp": 1000 + seed,
        "fn": 5,
    }
    for k in (
        "dsc",
        "sensitivity",
        "specificity",
        "f2",
        "apr",
        "lesion_tpr",
        "lesion_precision",
        "lesion_f1",
    ):
        r[k] = dsc
    r.update(kw)
    return r


def test_arms_group_seeds_and_summarise_them(tmp_path):
    mod = _module()
    rows = [
        _row("a0", 0, 0.70),
        _row("a1", 1, 0.74),
        _row("a2", 2, 0.71),
        _row("d0", 0, 0.60, beta=0.5),
        _row("w0", 0, 0.02, test="patient07"),
        _row("l0", 0, 0.03, test="patient07", levels=4, augment="resolution"),
    ]
    path = tmp_path / "runs.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[-1]), restval="")  # empty cells in older rows
        w.writeheader()
        w.writerows(rows)
    assert mod.main(["--runs", str(path), "--out", str(tmp_path / "s")]) == 0
    md = (tmp_path / "s.md").read_text()
    vals = np.array([70.0, 74.0, 71.0])
    mean, sd = vals.mean(), vals.std(ddof=1)
    (line,) = [x for x in md.splitlines() if "| patient19 | α=0.3, β=0.7; varied" in x]
    assert f"{mean:.1f} ± {sd:.1f} [" in line and "| 0, 1, 2 |" in line
    lo, hi = (float(x) for x in line.split("[")[1].split("]")[0].split(","))
    assert 70.0 <= lo <= mean <= hi <= 74.0  # a CI of the mean lies within the seeds
    (dice,) = [x for x in md.splitlines() if "(Dice)" in x]
    assert "| 60.0 |" in dice and "±" not in dice  # one seed: the value, no spread
    assert md.index("patient19") < md.index("| patient07")
    # rows without the levels/augment columns are the preset's (3, default): no label
    (deep,) = [x for x in md.splitlines() if "4 levels" in x]
    assert "resolution augmentation" in deep and "| 3.0 |" in deep
    assert sum("| patient07 |" in x for x in md.splitlines()) == 2
    assert (tmp_path / "s.png").stat().st_size > 10_000


def test_committed_summary_is_what_the_committed_rows_give(tmp_path):
    runs = ROOT / "bench" / "results" / "lesion_cpu_runs.csv"
    committed = ROOT / "bench" / "results" / "lesion_cpu_summary.md"
    if not runs.is_file():
        pytest.fail(f"{runs} missing")
    mod = _module()
    assert mod.main(["--runs", str(runs), "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s.md").read_text() == committed.read_text()


def test_arms_are_compared_with_the_preset_over_seeds(tmp_path):
    mod = _module()
    ref = [0.70, 0.74, 0.71]
    dice = [0.60, 0.62]
    rows = [_row(f"a{i}", i, v) for i, v in enumerate(ref)]
    rows += [_row(f"d{i}", i, v, beta=0.5) for i, v in enumerate(dice)]
    rows += [_row("b0", 0, 0.9, beta=0.9)]  # one seed: not compared
    rows += [_row(f"w{i}", i, 0.02, test="patient07") for i in range(2)]  # no reference
    path = tmp_path / "runs.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert mod.main(["--runs", str(path), "--out", str(tmp_path / "s")]) == 0
    md = (tmp_path / "s.md").read_text()
    part = md.split("## Against the preset")[1]
    (line,) = [x for x in part.splitlines() if x.startswith("| patient")]
    assert "(Dice)" in line and "| 2 vs 3 |" in line
    diff = 100 * (np.mean(dice) - np.mean(ref))
    cells = line.split(" | ")
    assert cells[3].startswith(f"{diff:+.1f} [")
    lo, hi = (float(x) for x in cells[3].split("[")[1].split("]")[0].split(","))
    assert 100 * (min(dice) - max(ref)) <= lo <= diff <= hi <= 100 * (max(dice) - min(ref))
    assert cells[3].endswith("*")  # every recombination of these seeds is below the preset's

"""bench/lesion_inference.py (issue 29, item 2: the planned measurement of mirroring,
threshold choice and seed ensembles): its --dry-run on tiny phantoms runs every arm of
both folds end to end, and its pre-written reading rules and threshold choice behave as
bench/results/lesion_cpu.md (version 8) states them."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _module():
    spec = importlib.util.spec_from_file_location(
        "lesion_inference", ROOT / "bench" / "lesion_inference.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_measures_every_arm_of_both_folds(tmp_path):
    li = _module()
    assert li.main(["--dry-run", "--out", str(tmp_path / "report")]) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    assert "dry run" in rep["note"] and set(rep["folds"]) == {"patient19", "patient07"}
    arms = [f"mirror {m}, t=0.5" for m in li.MIRRORS] + ["mirror none, t=chosen"]
    for fold in rep["folds"].values():
        assert list(fold["seeds"]) == ["0", "1", "2"]
        for r in fold["seeds"].values():
            assert list(r["arms"]) == arms and r["threshold"] in li.GRID
            assert all(r["seconds"][m] > 0 for m in li.MIRRORS)
            assert max(r["val_dsc"].values()) == r["val_dsc"][str(r["threshold"])]
            for a in r["arms"].values():
                tp, fp, fn = a["tp"], a["fp"], a["fn"]
                assert a["dsc"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert set(li.KEYS) <= set(fold["ensemble"])
    md = (tmp_path / "report.md").read_text()
    for rule in ("R1 mirror lr", "R1 mirror all", "R1 all over lr", "R2 threshold", "R3 3-seed"):
        assert f"- {rule}" in md, rule
    assert md.count("| 3 seeds as one model |") == 2


def test_runs_measured_alone_are_reused_by_the_report(tmp_path, monkeypatch):
    """--only measures (and caches) one run; the report then measures nothing and
    writes the same scores as when it measured every run itself."""
    li = _module()
    out = str(tmp_path / "report")
    measured, real = [], li.measure_run

    def counted(run, *args):
        measured.append(run.name)
        return real(run, *args)

    monkeypatch.setattr(li, "measure_run", counted)
    li.main(["--dry-run", "--out", out, "--train-missing"])  # trains and measures all six
    assert sorted(measured) == sorted(li.run_name(t, s) for t in li.FOLDS for s in li.SEEDS)
    first = json.loads((tmp_path / "report.json").read_text())
    (tmp_path / "report_work" / "runs" / "_inference" / "v64_f19_s1.json").unlink()
    measured.clear()
    assert li.main(["--dry-run", "--out", out, "--only", "v64_f19_s1"]) == 0
    assert measured == ["v64_f19_s1"]
    measured.clear()
    assert li.main(["--dry-run", "--out", out]) == 0
    again = json.loads((tmp_path / "report.json").read_text())
    assert measured == []
    for test, fold in again["folds"].items():  # v64_f19_s1's seconds were timed again
        assert fold["ensemble"] == first["folds"][test]["ensemble"]
        for seed, r in fold["seeds"].items():
            assert r["arms"] == first["folds"][test]["seeds"][seed]["arms"]
    with pytest.raises(SystemExit, match="--only: unknown run"):
        li.main(["--dry-run", "--out", out, "--only", "v64_f19_s7"])
    shutil.rmtree(tmp_path / "report_work" / "runs" / "v64_f07_s2")
    (tmp_path / "report_work" / "runs" / "_inference" / "v64_f19_s0.json").unlink()
    measured.clear()
    with pytest.raises(SystemExit, match="--only: missing run.*v64_f07_s2"):
        li.main(["--dry-run", "--out", out, "--only", "v64_f19_s0", "v64_f07_s2"])
    assert measured == []  # refused before measuring the run that exists


def test_cache_is_measured_again_for_other_weights(tmp_path):
    li = _module()
    calls = []

    def measure():
        calls.append(1)
        return {"prob_none": np.full(3, len(calls), np.float32), "target": np.ones(3), "x": 1}

    a = li.cached_run(tmp_path, "run", {"weights_sha256": "a"}, measure)
    b = li.cached_run(tmp_path, "run", {"weights_sha256": "a"}, measure)
    assert len(calls) == 1 and b["x"] == 1 and np.array_equal(a["prob_none"], b["prob_none"])
    c = li.cached_run(tmp_path, "run", {"weights_sha256": "b"}, measure)
    assert len(calls) == 2 and c["prob_none"][0] == 2


def test_threshold_choice_maximises_pooled_dsc_ties_nearest_half():
    li = _module()
    y = np.zeros((8, 8, 8), np.uint8)
    y[2:5, 2:5, 2:5] = 1
    p = np.where(y > 0, 0.72, 0.0).astype(np.float32)  # every t <= 0.70 is perfect
    p[6, 6, 6] = 0.31  # a false positive below 0.35 moves the best range to 0.35-0.70
    t, dsc = li.choose_threshold([p], [y], 0)
    assert dsc[0.3] < 1.0 and dsc[0.35] == dsc[0.7] == 1.0 and dsc[0.75] == 0.0
    assert t == 0.5
    p2 = np.where(y > 0, 0.3, 0.0).astype(np.float32)
    assert li.choose_threshold([p2], [y], 0)[0] == 0.3  # best range 0.05-0.30: nearest


def _fold(base, arm, ens=0.0):
    """A fold whose BASE DSC by seed is ``base`` and the mirror-lr arm ``arm``."""
    seeds = {}
    for s, (b, a) in enumerate(zip(base, arm, strict=True)):
        arms = {}
        for name, v in (("mirror none, t=0.5", b), ("mirror lr, t=0.5", a)):
            arms[name] = {"dsc": v, "precision": 0.5}
        for name in ("mirror all, t=0.5", "mirror none, t=chosen"):
            arms[name] = {"dsc": b, "precision": 0.5}
        seeds[str(s)] = {"arms": arms, "threshold": 0.5}
    return {"seeds": seeds, "ensemble": {"dsc": ens}}


def test_rules_adopt_only_a_consistent_gain_that_spares_patient07():
    li = _module()
    f07 = _fold([0.03, 0.03, 0.03], [0.03, 0.03, 0.03], ens=0.03)
    good = _fold([0.70, 0.72, 0.71], [0.72, 0.74, 0.725], ens=0.75)
    small = _fold([0.70, 0.72, 0.71], [0.705, 0.725, 0.715], ens=0.72)  # < 1 point
    mixed = _fold([0.70, 0.72, 0.71], [0.74, 0.71, 0.75], ens=0.715)  # one seed loses
    v = li.verdicts({"patient19": good, "patient07": f07})
    assert v[0].startswith("R1 mirror lr: passes") and v[1].startswith("R1 mirror all: fails")
    assert v[4].startswith("R3 3-seed ensemble: passes")
    for f19 in (small, mixed):
        v = li.verdicts({"patient19": f19, "patient07": f07})
        assert v[0].startswith("R1 mirror lr: fails") and v[4].startswith(
            "R3 3-seed ensemble: fails"
        )
    hurt = _fold([0.03, 0.03, 0.03], [0.02, 0.02, 0.02], ens=0.03)  # patient07 -1 point
    assert li.verdicts({"patient19": good, "patient07": hurt})[0].startswith("R1 mirror lr: fails")
    assert li.verdicts({"patient19": good, "patient07": f07})[3].startswith(
        "R2 threshold 0.5: fails"
    )

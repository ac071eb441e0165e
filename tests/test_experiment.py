"""The paper experiment (fasttversky.app.experiment) on the tiny preset: a two-setting,
two-fold sweep through the CLI, then Table 1 and Fig. 2's data checked against metrics
computed here independently (hand-counted confusion matrix, sklearn's average
precision) from each fold's saved model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from fasttversky.app.cli import main
from fasttversky.app.experiment import folds_of, setting_label, setting_slug

sklearn_metrics = pytest.importorskip("sklearn.metrics")

SETTINGS = [(0.5, 0.5), (0.3, 0.7)]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "rep"
    argv = ["reproduce", "--preset", "tiny", "--out", str(out), "--quiet", "--settings"]
    assert main(argv + [f"{a},{b}" for a, b in SETTINGS]) == 0
    return out


def _independent_probs(out, a, b, run, ce):
    """{subject: probability} of one setting from its saved fold models
    (``runs/<slug><run>_fold<k>``), and {subject: true mask}."""
    import torch

    from fasttversky.app.data import find_subjects, prepare_subject
    from fasttversky.app.pipeline import load_run, predict_prepared

    subjects = find_subjects(out / "data")
    fold = folds_of([s.name for s in subjects], 2)
    probs, targets = {}, {}
    for k in range(2):
        model, settings = load_run(out / "runs" / f"{setting_slug(a, b, ce)}{run}_fold{k}")
        assert (settings.train.alpha, settings.train.beta, settings.train.ce_weight) == (a, b, ce)
        for s in subjects:
            if fold[s.name] == k:  # predicted by the model that did not see it
                p = prepare_subject(s, settings.data.target_shape)
                with torch.no_grad():
                    probs[s.name] = predict_prepared(model, p, settings)
                targets[s.name] = p.full_mask.astype(bool)
    return probs, targets


def _independent_metrics(out, a, b, run="", ce=0.0, ensemble=()):
    """Pooled metrics of one setting recomputed from the saved fold models
    (``runs/<slug><run>_fold<k>``); with ``ensemble`` (several ``run`` suffixes), of
    the mean of those runs' probabilities (float64, rounded to float32 once)."""
    each = [_independent_probs(out, a, b, r, ce) for r in (ensemble or (run,))]
    probs, targets = each[0]
    if ensemble:
        probs = {
            n: (sum(p[n].astype(np.float64) for p, _ in each) / len(each)).astype(np.float32)
            for n in probs
        }
    prob = np.concatenate([probs[n].ravel() for n in sorted(probs)])
    true = np.concatenate([targets[n].ravel() for n in sorted(probs)])
    pred = prob >= 0.5
    tp, fp = int((pred & true).sum()), int((pred & ~true).sum())
    fn, tn = int((~pred & true).sum()), int((~pred & ~true).sum())
    P = tp / (tp + fp) if tp + fp else float("nan")
    R = tp / (tp + fn)
    per_subject = []
    for n in sorted(probs):
        pp, tt = probs[n].ravel() >= 0.5, targets[n].ravel()
        denom = 2 * (pp & tt).sum() + (pp & ~tt).sum() + (~pp & tt).sum()
        per_subject.append(2 * (pp & tt).sum() / denom if denom else 1.0)
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "dsc": 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 1.0,
        "sensitivity": R,
        "specificity": tn / (tn + fp),
        "f2": 5 * P * R / (4 * P + R) if tp else 0.0,
        "apr": sklearn_metrics.average_precision_score(true, prob),
        "dsc_mean": float(np.mean(per_subject)),
        "dsc_sd": float(np.std(per_subject)),
    }


def test_sweep_writes_table_and_figures(sweep):
    for name in ("table.md", "table.csv", "results.json", "pr_curves.npz"):
        assert (sweep / name).is_file(), name
    for name in ["pr_curves.png", "overlays.png", "loss_curves.png"] + [
        f"overlay_{setting_slug(a, b)}.png" for a, b in SETTINGS
    ]:
        assert (sweep / name).read_bytes()[:8] == PNG_MAGIC, name
    res = json.loads((sweep / "results.json").read_text())
    assert res["folds"] == 2 and len(res["subjects"]) == 4
    assert [(r["alpha"], r["beta"]) for r in res["results"]] == SETTINGS
    table = (sweep / "table.md").read_text()
    assert "α=0.5, β=0.5 (Dice)" in table and "α=0.3, β=0.7" in table
    for col in ("DSC", "Sensitivity", "Specificity", "F2", "APR", "DSC per subject"):
        assert col in table


@pytest.mark.parametrize("a, b", SETTINGS)
def test_table_matches_independent_metrics(sweep, a, b):
    want = _independent_metrics(sweep, a, b)
    rows = {
        (float(r["alpha"]), float(r["beta"])): r for r in csv.DictReader(open(sweep / "table.csv"))
    }
    row = rows[(a, b)]
    for k in ("tp", "fp", "fn", "tn"):
        assert int(row[k]) == want[k], k
    for k in ("dsc", "sensitivity", "specificity", "f2", "apr", "dsc_mean", "dsc_sd"):
        assert float(row[k]) == pytest.approx(want[k], rel=1e-9, abs=1e-12, nan_ok=True), k
    # table.md shows the same numbers in percent, two decimals.
    line = next(
        s for s in (sweep / "table.md").read_text().splitlines() if setting_label(a, b) in s
    )
    cells = [c.strip() for c in line.strip("|").split("|")]
    for k, cell in zip(("dsc", "sensitivity", "specificity", "f2", "apr"), cells[1:6], strict=True):
        assert cell == (f"{100 * want[k]:.2f}" if np.isfinite(want[k]) else "n/a"), k
    assert cells[6] == f"{100 * want['dsc_mean']:.2f} ± {100 * want['dsc_sd']:.2f}"


def test_pr_curve_data_matches_sklearn(sweep):
    """Fig. 2's saved curve of each setting ends at recall 1 and integrates to the APR
    of the table (step-wise, as average precision is defined)."""
    curves = np.load(sweep / "pr_curves.npz")
    rows = {
        (float(r["alpha"]), float(r["beta"])): r for r in csv.DictReader(open(sweep / "table.csv"))
    }
    for a, b in SETTINGS:
        p = curves[f"{setting_slug(a, b)}_precision"]
        r = curves[f"{setting_slug(a, b)}_recall"]
        assert r[-1] == pytest.approx(1.0) and np.all(np.diff(r) > 0)
        ap = float(np.sum(np.diff(np.concatenate([[0.0], r])) * p))
        assert ap == pytest.approx(float(rows[(a, b)]["apr"]), rel=1e-9)


def test_sweep_repeated_over_seeds_reports_spread_ci_and_comparison(tmp_path):
    """`reproduce --seeds 0 1`: each seed's pooled scores are those of its own fold
    models; the setting's score is their mean, with sd and a bootstrap CI in the table;
    the non-Dice setting is compared with Dice (difference of means, bootstrap CI)."""
    from fasttversky.app.lesion_metrics import compare_means, summarize

    out = tmp_path / "rep"
    argv = ["reproduce", "--preset", "tiny", "--out", str(out), "--quiet"]
    assert main(argv + ["--settings", "0.3,0.7", "0.5,0.5", "--seeds", "0", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [0, 1]
    r, dice = res["results"]
    assert [p["seed"] for p in r["per_seed"]] == [0, 1]
    assert r["per_seed"][0]["apr"] != r["per_seed"][1]["apr"]  # the seeds trained apart
    for p in r["per_seed"]:
        want = _independent_metrics(out, 0.3, 0.7, f"_seed{p['seed']}")
        for k in ("tp", "fp", "fn", "tn"):
            assert p[k] == want[k], k
        for k in ("dsc", "sensitivity", "specificity", "f2", "apr"):
            assert p[k] == pytest.approx(want[k], rel=1e-9, nan_ok=True), k
    for k in ("dsc", "apr", "lesion_f1"):
        vals = [p[k] for p in r["per_seed"]]
        assert r[k] == pytest.approx(np.mean(vals), rel=1e-12, nan_ok=True)
        want = summarize(vals)
        assert r["over_seeds"][k]["sd"] == pytest.approx(want["sd"], nan_ok=True)
        assert r["over_seeds"][k]["ci95"] == pytest.approx(list(want["ci95"]), nan_ok=True)
    # Dice is the baseline although listed second; it is not compared with itself.
    assert "vs_baseline" not in dice and r["vs_baseline"]["baseline"] == dice["label"]
    for k in ("dsc", "sensitivity", "f2", "apr"):
        want = compare_means([p[k] for p in r["per_seed"]], [p[k] for p in dice["per_seed"]])
        got = r["vs_baseline"][k]
        assert got["diff"] == pytest.approx(r[k] - dice[k], abs=1e-12, nan_ok=True)
        assert got["ci95"] == pytest.approx(list(want["ci95"]), nan_ok=True)
    table = (out / "table.md").read_text()
    assert "DSC over seeds" in table and "seeds [0, 1]" in table
    assert f"Against {dice['label']} over seeds" in table
    part = table.split("Against")[1].splitlines()
    (line,) = [x for x in part if x.startswith(f"| {setting_label(0.3, 0.7)} ")]
    d = 100 * r["vs_baseline"]["dsc"]["diff"]
    assert f"| {d:+.1f} [" in line
    # The seeds as one model: the mean of the two seeds' probabilities, scored as one seed
    # (as `predict --model SEED0_RUN SEED1_RUN` would), in results.json and table.md.
    want = _independent_metrics(out, 0.3, 0.7, ensemble=("_seed0", "_seed1"))
    e = r["ensemble"]
    for k in ("tp", "fp", "fn", "tn"):
        assert e[k] == want[k], k
    for k in ("dsc", "sensitivity", "specificity", "f2", "apr", "dsc_mean", "dsc_sd"):
        assert e[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12, nan_ok=True), k
    assert e["apr"] not in (p["apr"] for p in r["per_seed"])  # not one seed's scores
    part = table.split("Each setting's seeds as one model")[1].split("Against")[0]
    (line,) = [x for x in part.splitlines() if x.startswith(f"| {setting_label(0.3, 0.7)} ")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == f"{100 * want['dsc']:.2f}" and cells[5] == f"{100 * want['apr']:.2f}"
    assert cells[-1] == f"{100 * (e['dsc'] - r['dsc']):+.2f}"
    assert main(argv + ["--settings", "0.3,0.7", "--seeds", "1", "1"]) == 2


def test_sweep_compares_tversky_alone_with_tversky_plus_cross_entropy(tmp_path):
    """`--settings 0.3,0.7 0.3,0.7,1`: the second setting trains with ce_weight 1 (its
    saved run says so, its models differ), and its row is the metrics of its own models."""
    out = tmp_path / "rep"
    argv = ["reproduce", "--preset", "tiny", "--out", str(out), "--quiet"]
    assert main(argv + ["--settings", "0.3,0.7", "0.3,0.7,1"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [(r["alpha"], r["beta"], r["ce_weight"]) for r in res["results"]] == [
        (0.3, 0.7, 0.0),
        (0.3, 0.7, 1.0),
    ]
    assert res["results"][0]["apr"] != res["results"][1]["apr"]
    rows = list(csv.DictReader(open(out / "table.csv")))
    assert [float(r["ce_weight"]) for r in rows] == [0.0, 1.0]
    for row, ce in zip(rows, (0.0, 1.0), strict=True):
        want = _independent_metrics(out, 0.3, 0.7, ce=ce)
        for k in ("tp", "fp", "fn", "tn"):
            assert int(row[k]) == want[k], k
        assert float(row["apr"]) == pytest.approx(want["apr"], rel=1e-9)
    table = (out / "table.md").read_text()
    assert setting_label(0.3, 0.7, 1.0) == "α=0.3, β=0.7 + 1×CE" and "+ 1×CE" in table
    assert (out / f"overlay_{setting_slug(0.3, 0.7, 1.0)}.png").read_bytes()[:8] == PNG_MAGIC
    for bad in ("0.3,0.7,1,2", "0.3,0.7,-1"):
        assert main(argv + ["--settings", bad]) == 2

"""Lesion-wise metrics on random component layouts whose answers are known by
construction, pooling, and the repeated-run summary against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fasttversky.app.lesion_metrics import (
    compare_means,
    lesion_metrics,
    pool_lesion_counts,
    summarize,
)

SHAPE = (14, 14, 12)


def _layout(rng):
    """A random case: true lesions (non-touching rods on a 2-voxel grid of cells), a
    random subset of them detected (the prediction covers a random non-empty part of
    each), and false-positive rods in other cells. Returns pred, target, expectations."""
    cells = [(z, y) for z in range(0, SHAPE[0] - 1, 2) for y in range(0, SHAPE[1] - 1, 2)]
    n_true = int(rng.integers(0, 10))
    n_fp = int(rng.integers(0, 6))
    picks = rng.choice(len(cells), size=n_true + n_fp, replace=False)
    target = np.zeros(SHAPE, bool)
    pred = np.zeros(SHAPE, bool)
    detected = 0
    for i, k in enumerate(picks):
        z, y = cells[k]
        n = int(rng.integers(1, SHAPE[2] + 1))
        x0 = int(rng.integers(0, SHAPE[2] - n + 1))
        if i < n_true:
            target[z, y, x0 : x0 + n] = True
            if rng.random() < 0.6:  # detected: predict a random contiguous part of it
                m = int(rng.integers(1, n + 1))
                a = x0 + int(rng.integers(0, n - m + 1))
                pred[z, y, a : a + m] = True
                detected += 1
        else:
            pred[z, y, x0 : x0 + n] = True
    return pred, target, n_true, detected, detected + n_fp


@pytest.mark.parametrize("seed", range(20))
def test_counts_and_ratios_match_the_construction(seed):
    rng = np.random.default_rng(seed)
    pred, target, n_true, detected, n_pred = _layout(rng)
    m = lesion_metrics(pred.astype(np.uint8), target)
    assert (m["n_true"], m["n_detected"], m["n_pred"], m["n_pred_tp"]) == (
        n_true,
        detected,
        n_pred,
        detected,
    )
    assert m["n_pred_fp"] == n_pred - detected
    if n_true == 0 and n_pred == 0:
        assert m["lesion_tpr"] == m["lesion_precision"] == m["lesion_f1"] == 1.0
        return
    tpr = detected / n_true if n_true else math.nan
    prec = detected / n_pred if n_pred else math.nan
    for key, v in (("lesion_tpr", tpr), ("lesion_precision", prec)):
        assert (math.isnan(v) and math.isnan(m[key])) or m[key] == pytest.approx(v)
    if not (math.isnan(tpr) or math.isnan(prec)):
        f1 = 0.0 if tpr + prec == 0 else 2 * tpr * prec / (tpr + prec)
        assert m["lesion_f1"] == pytest.approx(f1)


def test_diagonal_neighbours_are_one_lesion_and_min_overlap_counts():
    target = np.zeros((5, 5, 5), bool)
    target[1, 1, 1] = target[2, 2, 2] = target[3, 3, 3] = True  # one 26-connected lesion
    pred = np.zeros_like(target)
    pred[2, 2, 2] = True
    m = lesion_metrics(pred, target)
    assert m["n_true"] == 1 and m["n_detected"] == 1 and m["lesion_f1"] == 1.0
    m2 = lesion_metrics(pred, target, min_overlap=2)
    assert m2["n_detected"] == 0 and m2["n_pred_tp"] == 0 and m2["lesion_f1"] == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_pooling_equals_metrics_of_the_concatenated_volumes(seed):
    rng = np.random.default_rng(100 + seed)
    cases = [_layout(rng)[:2] for _ in range(3)]
    rows = [lesion_metrics(p, t) for p, t in cases]
    # Concatenating along an axis with an empty slab between keeps components apart.
    gap = np.zeros((1, *SHAPE[1:]), bool)
    cat_p = np.concatenate(sum(([p, gap] for p, _ in cases), [])[:-1])
    cat_t = np.concatenate(sum(([t, gap] for _, t in cases), [])[:-1])
    whole = lesion_metrics(cat_p, cat_t)
    pooled = pool_lesion_counts(rows)
    for k, v in whole.items():
        assert (isinstance(v, float) and math.isnan(v) and math.isnan(pooled[k])) or pooled[k] == v


def test_bad_input():
    with pytest.raises(ValueError, match="shape"):
        lesion_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="binary"):
        lesion_metrics(np.full((2, 2, 2), 0.5), np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        lesion_metrics(np.full((2, 2, 2), np.nan), np.zeros((2, 2, 2)))


@pytest.mark.parametrize("seed", range(4))
def test_summarize_mean_sd_and_bootstrap(seed):
    rng = np.random.default_rng(seed)
    v = rng.normal(0.6, 0.1, size=int(rng.integers(3, 9)))
    s = summarize(list(v) + [float("nan")], n_boot=4000, seed=seed)
    assert s["n"] == v.size and s["n_nan"] == 1
    assert s["mean"] == pytest.approx(float(np.mean(v)))
    assert s["sd"] == pytest.approx(float(np.std(v, ddof=1)))
    lo, hi = s["ci95"]
    assert v.min() <= lo <= s["mean"] <= hi <= v.max()
    # Reference bootstrap with the same generator draws.
    r = np.random.default_rng(seed)
    means = v[r.integers(0, v.size, size=(4000, v.size))].mean(axis=1)
    assert (lo, hi) == tuple(np.percentile(means, [2.5, 97.5]))
    assert summarize(v, n_boot=4000, seed=seed) == summarize(v, n_boot=4000, seed=seed)


def test_summarize_single_run_has_no_spread():
    s = summarize([0.7])
    assert s["mean"] == 0.7 and math.isnan(s["sd"]) and all(math.isnan(c) for c in s["ci95"])


@pytest.mark.parametrize("seed", range(4))
def test_compare_means_against_a_direct_bootstrap(seed):
    rng = np.random.default_rng(100 + seed)
    a = rng.normal(0.7, 0.05, size=int(rng.integers(2, 6)))
    b = rng.normal(0.6, 0.05, size=int(rng.integers(2, 6)))
    c = compare_means(list(a) + [float("nan")], b, n_boot=3000, seed=seed)
    assert c["n"] == (a.size, b.size)
    assert c["diff"] == pytest.approx(float(a.mean() - b.mean()))
    r = np.random.default_rng(seed)  # reference: a's draws, then b's, same generator
    ma = a[r.integers(0, a.size, size=(3000, a.size))].mean(axis=1)
    mb = b[r.integers(0, b.size, size=(3000, b.size))].mean(axis=1)
    assert c["ci95"] == tuple(np.percentile(ma - mb, [2.5, 97.5]))
    lo, hi = c["ci95"]
    assert a.min() - b.max() <= lo <= c["diff"] <= hi <= a.max() - b.min()
    assert c["separated"] == (lo > 0 or hi < 0)
    flipped = compare_means(b, a, n_boot=3000, seed=seed)
    assert flipped["diff"] == pytest.approx(-c["diff"])


def test_compare_means_separation_and_single_runs():
    assert compare_means([0.80, 0.82, 0.81], [0.60, 0.61, 0.62])["separated"]
    assert not compare_means([0.70, 0.80, 0.60], [0.72, 0.62, 0.66])["separated"]
    one = compare_means([0.7], [0.6, 0.65])
    assert one["diff"] == pytest.approx(0.075) and not one["separated"]
    assert all(math.isnan(x) for x in one["ci95"])
    assert math.isnan(compare_means([float("nan")], [0.5])["diff"])

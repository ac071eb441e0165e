"""fasttversky.app.metrics against independent computations: sklearn's average precision
and PR curve, hand-counted DSC/F2/sensitivity/specificity, and the degenerate cases."""

import math

import numpy as np
import pytest
import torch

from fasttversky.app.metrics import pooled_metrics, segmentation_metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _random_case(seed: int, shape=(7, 9, 5), ties: bool = False, dtype=np.float32):
    rng = np.random.default_rng(seed)
    target = rng.random(shape) < rng.uniform(0.02, 0.4)
    target.flat[0] = True  # at least one lesion voxel
    if ties:  # few distinct scores: many ties, also between lesion and background
        prob = rng.integers(0, 6, size=shape) / 5.0
    else:
        prob = np.clip(rng.random(shape) * 0.6 + 0.4 * target, 0, 1)
    return prob.astype(dtype), target.astype(np.uint8)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("seed", range(12))
def test_apr_equals_sklearn(seed, ties):
    prob, target = _random_case(seed, ties=ties)
    got = segmentation_metrics(prob, target)["apr"]
    want = sklearn_metrics.average_precision_score(target.ravel(), prob.ravel())
    assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_apr_dtypes_and_torch_input(dtype):
    prob, target = _random_case(3, ties=False, dtype=dtype)
    want = sklearn_metrics.average_precision_score(target.ravel(), prob.ravel())
    assert segmentation_metrics(prob, target)["apr"] == pytest.approx(want, abs=1e-12)
    got_t = segmentation_metrics(torch.from_numpy(prob), torch.from_numpy(target))["apr"]
    assert got_t == pytest.approx(want, abs=1e-12)


def test_pr_curve_matches_sklearn_where_recall_changes():
    prob, target = _random_case(5, ties=True)
    _, curve = segmentation_metrics(prob, target, return_curve=True)
    p, r, t = sklearn_metrics.precision_recall_curve(target.ravel(), prob.ravel())
    # sklearn: thresholds ascending, (p, r) one longer with the (1, 0) end point.
    sk = {float(th): (pp, rr) for th, pp, rr in zip(t, p[:-1], r[:-1], strict=False)}
    for th, pp, rr in zip(curve.thresholds, curve.precision, curve.recall, strict=False):
        assert sk[float(th)] == pytest.approx((pp, rr), abs=1e-12)
    assert np.all(np.diff(curve.recall) > 0) and curve.recall[-1] == pytest.approx(1.0)


def test_pooled_equals_concatenation():
    cases = [_random_case(s, shape=(5, 6, 4 + s), ties=s % 2 == 0) for s in range(4)]
    probs = [c[0] for c in cases]
    targets = [c[1] for c in cases]
    pooled = pooled_metrics(probs, targets)
    flat_p = np.concatenate([p.ravel() for p in probs])
    flat_t = np.concatenate([t.ravel() for t in targets])
    whole = segmentation_metrics(flat_p, flat_t)
    for k in ("dsc", "sensitivity", "specificity", "f2", "apr", "tp", "fp", "fn", "tn"):
        assert pooled[k] == pytest.approx(whole[k], abs=1e-12), k
    assert pooled["apr"] == pytest.approx(
        sklearn_metrics.average_precision_score(flat_t, flat_p), abs=1e-12
    )


def test_hand_counted_case():
    # 10 voxels: target 4 lesion voxels; prediction hits 3 of them plus 2 background.
    target = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], np.uint8)
    prob = np.array([0.9, 0.8, 0.5, 0.2, 0.7, 0.6, 0.1, 0.0, 0.3, 0.4], np.float32)
    m = segmentation_metrics(prob, target)  # prob >= 0.5: voxel 2 (exactly 0.5) counts
    tp, fp, fn, tn = 3, 2, 1, 4
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (tp, fp, fn, tn)
    assert m["dsc"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))  # 6/9
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    # F2 = (1 + 4) P R / (4 P + R) with P = 3/5, R = 3/4
    P, R = 3 / 5, 3 / 4
    assert m["f2"] == pytest.approx(5 * P * R / (4 * P + R))
    # AP by hand: thresholds .9 (1/1), .8 (2/2), .7 -, .6 -, .5 (3/5), ..., .2 (4/8)
    assert m["apr"] == pytest.approx(0.25 * (1 + 1 + 3 / 5 + 4 / 8))


def test_threshold_argument():
    target = np.array([1, 0, 1, 0], np.uint8)
    prob = np.array([0.35, 0.3, 0.2, 0.1])
    assert segmentation_metrics(prob, target, threshold=0.3)["tp"] == 1
    assert segmentation_metrics(prob, target, threshold=0.15)["tp"] == 2


def test_empty_target_and_empty_prediction():
    target = np.zeros((4, 4, 4), np.uint8)
    m = segmentation_metrics(np.zeros((4, 4, 4), np.float32), target)
    assert m["dsc"] == 1.0 and m["f2"] == 1.0 and m["specificity"] == 1.0
    assert math.isnan(m["sensitivity"]) and math.isnan(m["apr"])
    prob = np.zeros((4, 4, 4), np.float32)
    prob[0, 0, 0] = 0.9  # one false positive on a lesion-free subject
    m = segmentation_metrics(prob, target)
    assert m["dsc"] == 0.0 and m["f2"] == 0.0 and m["fp"] == 1


def test_empty_prediction_with_lesions():
    target = np.zeros((3, 3, 3), np.uint8)
    target[1, 1, 1] = 1
    m = segmentation_metrics(np.full((3, 3, 3), 0.1, np.float32), target)
    assert m["dsc"] == 0.0 and m["sensitivity"] == 0.0 and m["specificity"] == 1.0
    assert m["apr"] == pytest.approx(1 / 27)  # all tied: precision = prevalence


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        segmentation_metrics(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="binary"):
        segmentation_metrics(np.zeros(3), np.array([0, 2, 1]))
    with pytest.raises(ValueError, match="non-finite"):
        segmentation_metrics(np.array([0.1, np.nan]), np.array([0, 1]))
    with pytest.raises(TypeError, match="float"):
        segmentation_metrics(np.array([0, 1]), np.array([0, 1]))

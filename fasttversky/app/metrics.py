"""Voxel-wise segmentation metrics of the paper: DSC, sensitivity, specificity, F2, APR.

Thresholded metrics use ``prob >= threshold`` (0.5 in the paper) — the same "score at
least the threshold" convention as the precision-recall curve below, so the curve's
point at t = 0.5 is exactly the thresholded result.

APR is the exact average precision over voxels, as scikit-learn defines it::

    AP = Σ_k (R_k − R_{k−1}) · P_k

over the distinct score values taken as thresholds, voxels with equal scores entering
together (ties count as one threshold). Recall changes only at scores that some lesion
voxel has, so only those thresholds contribute. We therefore

1. sort the (few) lesion-voxel scores — lesions are < 1 % of voxels — and take their
   distinct values u_1 < … < u_m,
2. sort the background scores (numpy's vectorised sort: ~0.2 s for 7 M float32) and
   count, with one ``searchsorted`` per threshold, the background voxels with score
   ≥ u_j: the false positives at threshold u_j.

Placing each unsorted background voxel among the thresholds instead would avoid the
sort but is ~10× slower (random memory access per query); histogram binning would be
fast but not exact. The result equals ``sklearn.metrics.average_precision_score`` up
to float summation order. Scores are compared in their common dtype (pooled subjects
of different float dtypes are promoted), so no threshold is rounded.

Degenerate cases (stated so that tables never show a silent 0): a ratio whose
denominator is 0 is NaN, except DSC and F2 of an empty prediction on an empty target,
which agree perfectly and get 1.0. APR of a target without lesions is NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .config import PredictConfig, field_default

# The paper's metrics (Salehi et al. 2017, Table 1): result key -> display name.
METRIC_NAMES = {
    "dsc": "DSC",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "f2": "F2",
    "apr": "APR",
}

METRIC_KEYS = ("dsc", "sensitivity", "specificity", "f2", "apr")
# The default threshold of the thresholded metrics: the run settings' (the paper's 0.5).
THRESHOLD = field_default(PredictConfig, "threshold")


def _as_numpy(x) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            if x.dtype == torch.bfloat16:  # numpy has no bfloat16
                x = x.float()
            x = x.numpy()
    except ImportError:  # pragma: no cover - torch is a base dependency
        pass
    return np.asarray(x)


def _flat_pair(prob, target) -> tuple[np.ndarray, np.ndarray]:
    p = _as_numpy(prob)
    t = _as_numpy(target)
    if p.shape != t.shape:
        raise ValueError(f"prob shape {p.shape} differs from target shape {t.shape}")
    if not np.issubdtype(p.dtype, np.floating):
        raise TypeError(f"prob must be a float array, got {p.dtype}")
    p = p.reshape(-1)
    t = t.reshape(-1)
    if t.dtype != np.bool_:
        if not np.isin(np.unique(t), (0, 1)).all():
            raise ValueError("target must be binary (values 0 and 1)")
        t = t.astype(bool)
    if not np.isfinite(p).all():
        raise ValueError("prob contains non-finite values")
    return p, t


@dataclass
class PRCurve:
    """Precision-recall curve at the distinct lesion-voxel scores, highest first.

    ``thresholds[k]`` (descending) gives ``precision[k]``, ``recall[k]`` (ascending):
    the vertices where recall changes — the points AP sums over. (sklearn also lists
    background-only thresholds, where only precision moves; AP is the same.)
    """

    precision: np.ndarray
    recall: np.ndarray
    thresholds: np.ndarray

    @property
    def average_precision(self) -> float:
        if self.recall.size == 0:
            return float("nan")
        return float(np.sum(np.diff(self.recall, prepend=0.0) * self.precision))


def _pr_from_parts(pos_scores: np.ndarray, neg_groups: Sequence[np.ndarray]) -> PRCurve:
    """PR curve from all lesion-voxel scores and background scores (in any number of
    groups, so pooling over subjects needs no concatenation of the volumes)."""
    n_pos = pos_scores.size
    if n_pos == 0:
        empty = np.zeros(0)
        return PRCurve(empty, empty, empty)
    dtype = np.result_type(pos_scores.dtype, *(g.dtype for g in neg_groups))
    u, pos_counts = np.unique(pos_scores.astype(dtype, copy=False), return_counts=True)
    fp_ge = np.zeros(u.size, np.int64)  # background voxels with score >= u[j]
    for neg in neg_groups:
        neg = np.sort(neg.astype(dtype, copy=False))
        fp_ge += neg.size - np.searchsorted(neg, u, side="left")
    tp_ge = np.cumsum(pos_counts[::-1])[::-1]  # lesion voxels with score >= u[j]
    precision = tp_ge / (tp_ge + fp_ge)
    recall = tp_ge / n_pos
    # Report highest threshold first (recall ascending), as the curve is drawn.
    return PRCurve(precision[::-1].copy(), recall[::-1].copy(), u[::-1].astype(np.float64))


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def _from_counts(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    both_empty = tp + fp + fn == 0
    return {
        "dsc": 1.0 if both_empty else _ratio(2 * tp, 2 * tp + fp + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        # F-beta with beta = 2: recall weighted 4x precision, (1+b²)TP/((1+b²)TP+b²FN+FP).
        "f2": 1.0 if both_empty else _ratio(5 * tp, 5 * tp + 4 * fn + fp),
    }


def _counts(p: np.ndarray, t: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    pred = p >= threshold
    tp = int(np.count_nonzero(pred & t))
    n_pred = int(np.count_nonzero(pred))
    n_pos = int(np.count_nonzero(t))
    fp, fn = n_pred - tp, n_pos - tp
    return tp, fp, fn, p.size - tp - fp - fn


def segmentation_metrics(prob, target, threshold: float = THRESHOLD, *, return_curve: bool = False):
    """Metrics of one foreground-probability volume against a binary mask.

    Args:
        prob: any shape, float (numpy or torch), foreground probability per voxel.
        target: same shape, binary {0, 1} (bool or integer).
        threshold: a voxel is predicted lesion when ``prob >= threshold``.
        return_curve: also return the :class:`PRCurve`.

    Returns:
        dict with ``dsc``, ``sensitivity``, ``specificity``, ``f2``, ``apr`` (floats in
        [0, 1], NaN where undefined — see the module docstring) and the counts ``tp``,
        ``fp``, ``fn``, ``tn``; with ``return_curve=True`` a tuple (dict, PRCurve).
    """
    p, t = _flat_pair(prob, target)
    tp, fp, fn, tn = _counts(p, t, threshold)
    out = _from_counts(tp, fp, fn, tn)
    curve = _pr_from_parts(p[t], [p[~t]])
    out["apr"] = curve.average_precision
    out.update(tp=tp, fp=fp, fn=fn, tn=tn)
    return (out, curve) if return_curve else out


def pooled_metrics(
    probs: Sequence, targets: Sequence, threshold: float = THRESHOLD, *, return_curve: bool = False
):
    """Metrics over all voxels of several subjects, as if their volumes were concatenated.

    Counts are summed; APR and the curve use every subject's voxels (exact, no
    concatenated copy). Same return convention as :func:`segmentation_metrics`.
    """
    if len(probs) != len(targets) or not probs:
        raise ValueError("pooled_metrics needs equally many (>= 1) probs and targets")
    pairs = [_flat_pair(p, t) for p, t in zip(probs, targets, strict=False)]
    totals = np.zeros(4, np.int64)
    for p, t in pairs:
        totals += _counts(p, t, threshold)
    out = _from_counts(*(int(v) for v in totals))
    curve = _pr_from_parts(np.concatenate([p[t] for p, t in pairs]), [p[~t] for p, t in pairs])
    out["apr"] = curve.average_precision
    out.update(tp=int(totals[0]), fp=int(totals[1]), fn=int(totals[2]), tn=int(totals[3]))
    return (out, curve) if return_curve else out

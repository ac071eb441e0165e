"""Lesion-wise detection metrics and summaries over repeated runs.

MS studies report, beside voxel DSC, how many *lesions* are found: a few large
confluent lesions dominate voxel counts, while the number of small lesions found is
what matters clinically (lesion counts define dissemination in space).

Definitions (connected components with 26-connectivity, as for 1 mm isotropic MRI):

* a true lesion is **detected** when at least ``min_overlap`` of its voxels are
  predicted lesion;
* a predicted component is a **true-positive component** when at least
  ``min_overlap`` of its voxels are true lesion, else a **false-positive component**;
* lesion TPR = detected / true lesions; lesion precision = true-positive components /
  predicted components; lesion F1 = 2·P·R / (P + R).

Ratios with a zero denominator are NaN, except that an empty prediction of an empty
target scores 1 (nothing to find, nothing wrongly found). Pooling over patients sums
the counts (each lesion weighs the same whatever patient it belongs to).

For repeated runs (seeds), :func:`summarize` gives mean ± sd and a percentile
bootstrap 95 % confidence interval of the mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "LESION_KEYS",
    "LESION_NAMES",
    "compare_means",
    "lesion_metrics",
    "pool_lesion_counts",
    "summarize",
]

# key -> column name in the tables of evaluate and reproduce
LESION_NAMES = {
    "lesion_tpr": "lesion TPR",
    "lesion_precision": "lesion precision",
    "lesion_f1": "lesion F1",
}
LESION_KEYS = tuple(LESION_NAMES)


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy import ndimage as ndi

    return ndi.label(mask, structure=np.ones((3,) * mask.ndim, bool))


def _from_counts(n_true: int, n_detected: int, n_pred: int, n_pred_tp: int) -> dict:
    if n_true == 0 and n_pred == 0:
        tpr = prec = f1 = 1.0
    else:
        tpr = n_detected / n_true if n_true else float("nan")
        prec = n_pred_tp / n_pred if n_pred else float("nan")
        if math.isnan(tpr) or math.isnan(prec):
            f1 = float("nan")
        else:
            f1 = 2 * tpr * prec / (tpr + prec) if tpr + prec > 0 else 0.0
    return {
        "lesion_tpr": tpr,
        "lesion_precision": prec,
        "lesion_f1": f1,
        "n_true": n_true,
        "n_detected": n_detected,
        "n_pred": n_pred,
        "n_pred_tp": n_pred_tp,
        "n_pred_fp": n_pred - n_pred_tp,
    }


def lesion_metrics(pred, target, min_overlap: int = 1) -> dict:
    """Lesion-wise metrics of a binary prediction against a binary target.

    Args:
        pred, target: same-shape arrays (bool or {0, 1}; numpy or torch).
        min_overlap: voxels of overlap needed to count a lesion as detected / a
            predicted component as true (>= 1).

    Returns:
        dict with ``lesion_tpr``, ``lesion_precision``, ``lesion_f1`` (floats, NaN
        where undefined, see the module docstring) and the counts ``n_true``,
        ``n_detected``, ``n_pred``, ``n_pred_tp``, ``n_pred_fp``.
    """
    p = _as_bool(pred, "pred")
    t = _as_bool(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred shape {p.shape} differs from target shape {t.shape}")
    if min_overlap < 1:
        raise ValueError(f"min_overlap must be >= 1, got {min_overlap}")
    t_lab, n_true = _components(t)
    p_lab, n_pred = _components(p)
    # Overlap voxels per component: bincount of the labels over the intersection.
    both = p & t
    hit_true = np.bincount(t_lab[both], minlength=n_true + 1)[1:]
    hit_pred = np.bincount(p_lab[both], minlength=n_pred + 1)[1:]
    return _from_counts(
        int(n_true),
        int(np.count_nonzero(hit_true >= min_overlap)),
        int(n_pred),
        int(np.count_nonzero(hit_pred >= min_overlap)),
    )


def pool_lesion_counts(rows: Sequence[dict]) -> dict:
    """Lesion metrics of several patients pooled: counts summed, ratios recomputed."""
    if not rows:
        raise ValueError("pool_lesion_counts needs at least one row")
    keys = ("n_true", "n_detected", "n_pred", "n_pred_tp")
    total = {k: int(sum(r[k] for r in rows)) for k in keys}
    return _from_counts(total["n_true"], total["n_detected"], total["n_pred"], total["n_pred_tp"])


def summarize(values: Sequence[float], n_boot: int = 10000, seed: int = 0) -> dict:
    """Mean, sample sd (ddof 1) and percentile-bootstrap 95 % CI of the mean.

    NaN values are dropped (and counted in ``n_nan``). With one value the sd and the
    CI are NaN: one run says nothing about run-to-run spread. The bootstrap resamples
    the values with replacement ``n_boot`` times (numpy Generator seeded by ``seed``,
    so the CI is reproducible).
    """
    v = np.asarray(list(values), dtype=np.float64)
    finite = v[~np.isnan(v)]
    n = finite.size
    out = {"n": int(n), "n_nan": int(v.size - n)}
    if n == 0:
        return {**out, "mean": float("nan"), "sd": float("nan"), "ci95": (float("nan"),) * 2}
    out["mean"] = float(finite.mean())
    if n < 2:
        return {**out, "sd": float("nan"), "ci95": (float("nan"), float("nan"))}
    out["sd"] = float(finite.std(ddof=1))
    rng = np.random.default_rng(seed)
    means = finite[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    out["ci95"] = (float(lo), float(hi))
    return out


def compare_means(
    a: Sequence[float], b: Sequence[float], n_boot: int = 10000, seed: int = 0
) -> dict:
    """Difference of means ``mean(a) - mean(b)`` of two independent sets of runs (e.g.
    two loss settings over their seeds) and its percentile-bootstrap 95 % CI.

    Each bootstrap draw resamples ``a`` and ``b`` separately with replacement (numpy
    Generator seeded by ``seed``; a's draws first), so the interval carries both arms'
    seed spread. NaN values are dropped. Fewer than two values in either set -> the
    CI is NaN (one run has no spread to compare against). ``separated`` is True when the
    CI excludes 0. With 2-3 runs per arm the bootstrap under-covers (it can only
    recombine the runs seen), so read a separated CI as a lead, not a test.
    """
    va, vb = (np.asarray(list(x), dtype=np.float64) for x in (a, b))
    va, vb = va[~np.isnan(va)], vb[~np.isnan(vb)]
    nan = float("nan")
    if va.size == 0 or vb.size == 0:
        return {
            "n": (int(va.size), int(vb.size)),
            "diff": nan,
            "ci95": (nan, nan),
            "separated": False,
        }
    out = {"n": (int(va.size), int(vb.size)), "diff": float(va.mean() - vb.mean())}
    if min(va.size, vb.size) < 2:
        return {**out, "ci95": (nan, nan), "separated": False}
    rng = np.random.default_rng(seed)
    ma = va[rng.integers(0, va.size, size=(n_boot, va.size))].mean(axis=1)
    mb = vb[rng.integers(0, vb.size, size=(n_boot, vb.size))].mean(axis=1)
    lo, hi = np.percentile(ma - mb, [2.5, 97.5])
    return {**out, "ci95": (float(lo), float(hi)), "separated": bool(lo > 0 or hi < 0)}


def _as_bool(x, name: str) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a base dependency
        pass
    a = np.asarray(x)
    if a.dtype == np.bool_:
        return a
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise ValueError(f"{name} contains non-finite values")
    if not np.isin(np.unique(a), (0, 1)).all():
        raise ValueError(f"{name} must be binary (values 0 and 1)")
    return a.astype(bool)

"""Segmentation metrics (fasttversky.app.metrics) on a full-size volume.

    python -m pytest bench/bench_metrics.py --benchmark-only

One MNI-sized 182×218×182 volume (7.2 M voxels, 0.5 % lesion, random scores): the
confusion counts, DSC/F2/sensitivity/specificity and the exact average precision
(a sort of the lesion scores plus a search over the background). Correctness is
tested in tests/test_metrics.py against sklearn; this file only times it (it used to
be a wall-clock assertion in that test file).
"""

from __future__ import annotations

import numpy as np

from fasttversky.app.metrics import segmentation_metrics


def test_metrics_full_volume(benchmark):
    rng = np.random.default_rng(0)
    shape = (182, 218, 182)
    target = rng.random(shape, dtype=np.float32) < 0.005
    prob = rng.random(shape, dtype=np.float32)
    m = benchmark.pedantic(segmentation_metrics, args=(prob, target), rounds=3, iterations=1)
    assert 0 < m["apr"] < 0.02  # random scores: AP ~ prevalence
    benchmark.extra_info["voxels"] = int(np.prod(shape))

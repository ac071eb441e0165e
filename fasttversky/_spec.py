"""What every backend receives: flattened views and a small, hashable spec.

Backends see

* ``logits``: (B, C, N) float32/float16/bfloat16/float64, any strides (a view of the
  user's tensor whenever its spatial dims can be merged: contiguous and
  channels_last_3d both can, so neither is copied).
* ``target``: (B, N) integer labels (uint8/int16/int32/int64; bool is viewed as uint8)
  when ``spec.soft_target`` is False, else (B, C, N) float probabilities.
* ``forward_stats`` returns ``stats`` (B, C, 3) float64 holding, per sample and class,
  ``[sum_pg, sum_p, sum_g]`` over the non-ignored voxels, and ``flags`` (2,) int64:
  ``[number of non-finite logits, number of bad targets]`` (labels outside the valid
  range other than ``ignore_index``, or soft targets outside [0, 1]).
* ``backward`` gets ``coef_a``, ``coef_b`` (B, C), float32 (float64 for float64 logits),
  and returns ``dL/dlogits`` with the logits' shape, dtype and strides, where
  ``dL/dp[b, c, n] = w[b, n] * (coef_a[b, c] + coef_b[b, c] * g[b, c, n])`` is chained
  through the activation (w = 0 on ignored voxels).

Cross-entropy term (``spec.with_ce``, label-map targets with softmax or sigmoid only):

* ``stats`` is (B, C, 4); column 3 is ``sum_ce``, per sample and class:
  softmax: ``Σ_n w_n [y_n = c] (−log p_c,n)`` (the CE of the voxels labelled c, from a
  log-sum-exp with the max the softmax already takes); sigmoid: ``Σ_n w_n BCE(x_c,n,
  g_c,n)`` with ``BCE(x, g) = max(x, 0) − x g + log1p(exp(−|x|))``.
* ``backward`` also gets ``coef_ce`` (B, C) (same dtype as ``coef_a``) = ``dL/dsum_ce``
  and adds, on non-ignored voxels, softmax: ``coef_ce[b, y_n] (p_k − [k = y_n])`` to
  every class k; sigmoid: ``coef_ce[b, c] (σ(x_c) − g_c)``. Without ``with_ce`` it gets
  ``coef_ce=None`` and must do exactly the Tversky-only work.
"""

from __future__ import annotations

from dataclasses import dataclass

ACTIVATIONS = {"softmax": 0, "sigmoid": 1, "none": 2}


@dataclass(frozen=True)
class KernelSpec:
    activation: int  # 0 softmax, 1 sigmoid, 2 none (probabilities given)
    soft_target: bool  # target is (B, C, N) float instead of (B, N) labels
    ignore_index: int | None  # label value that contributes nothing (labels only)
    num_classes: int  # C
    with_ce: bool = False  # also accumulate sum_ce (stats column 3) and its gradient

    # With C == 1 (binary sigmoid / probabilities) a label map holds {0, 1} and the
    # single channel is the foreground: g = (label == 1). Otherwise g_c = (label == c).
    @property
    def binary_labels(self) -> bool:
        return self.num_classes == 1 and not self.soft_target

    @property
    def num_labels(self) -> int:
        """Valid label values are [0, num_labels)."""
        return max(self.num_classes, 2)

"""What every backend receives: flattened views and a small, hashable spec.

Backends see

* ``logits``: (B, C, N) float32/float16/bfloat16/float64, any strides (a view of the
  user's tensor whenever its spatial dims can be merged: contiguous and
  channels_last_3d both can, so neither is copied).
* ``target``: a (B, N) label map (bool is viewed as uint8) when ``spec.soft_target`` is
  False, else (B, C, N) float probabilities (see "Targets" below).
* ``forward_stats`` returns ``stats`` (B, C, 3 + spec.ce_columns) float64 holding, per
  sample and class, ``[sum_pg, sum_p, sum_g]`` (then the CE-family columns) over the
  non-ignored voxels, and ``flags`` (2,) int64:
  ``[number of non-finite logits, number of bad targets]`` (labels outside the valid
  range other than ``ignore_index``, or soft targets outside [0, 1]).
* ``backward`` gets ``coef_a``, ``coef_b`` (B, C), float32 (float64 for float64 logits),
  and returns ``dL/dlogits`` with the logits' shape, dtype and strides, where
  ``dL/dp[b, c, n] = w[b, n] * (coef_a[b, c] + coef_b[b, c] * g[b, c, n])`` is chained
  through the activation (w = 0 on ignored voxels).

Targets (label maps and soft targets):

* A label map is (B, N); its dtype is an integer one (uint8/int16/int32/int64) or, when
  ``spec.float_labels``, a float one (float32/float16/bfloat16/float64) holding integral
  values (nnU-Net's and MONAI's label maps are float): a float label that is NaN, inf or
  not integral counts as a bad target, like one out of range.
* ``g_c`` (the target of class c at a voxel): soft target: ``target[b, c, n]``; label map
  with ``spec.region_masks`` (a tuple of ``num_labels`` int64 bitmasks, one per label
  value; sigmoid or none only; C <= 63): ``g_c = (region_masks[label] >> c) & 1``, so a
  region (a set of labels) is read from the label map without any one-hot (nnU-Net's
  region-based training); C == 1 without regions: ``label == 1``; else ``label == c``.
  Valid labels are ``[0, spec.num_labels)`` (``len(region_masks)`` with regions).

Cross-entropy family (``spec.ce`` = CE_PLAIN or CE_FOCAL; softmax or sigmoid only; label
maps, with or without regions, and soft targets). With ``w`` the voxel mask (0 on
ignored voxels), the CE target is ``q_c = (1 − ε) g_c + ε / C`` (softmax, ε =
``spec.label_smoothing``; ``q_c = g_c`` for sigmoid, where ε is always 0), masked: q = 0
where w = 0. Per sample and class, stats gets ``spec.ce_columns`` more columns:

* softmax, CE_PLAIN:  col 3 = ``Σ_n w q_c (−log p_c)``; log p from the log-sum-exp (the
  max the softmax already takes), never ``log(p)`` (p underflows to 0 where log p is
  finite); a term with q_c = 0 adds exactly 0 (even where log p_c = −inf).
* softmax, CE_FOCAL (MONAI's softmax focal loss, γ = ``spec.focal_gamma`` >= 0):
  col 3 = ``Σ_n w q_c (1 − p_c)^γ (−log p_c)``, 0^0 = 1.
* sigmoid, CE_PLAIN:  col 3 = ``Σ_n w BCE(x_c, q_c)``, ``BCE(x, q) = max(x, 0) − x q +
  log1p(exp(−|x|))``.
* sigmoid, CE_FOCAL (MONAI's sigmoid focal loss): with ``s = 2 q − 1``,
  ``m = exp(γ · logsigmoid(−x s))``, ``h = m · BCE(x, q)``: col 3 = ``Σ_n w h``,
  col 4 = ``Σ_n w q h`` (so MONAI's ``alpha`` weighting ``α q + (1 − α)(1 − q)`` is
  applied at finalize from the two columns). ``ce_columns`` is 2 here, 1 for the other
  three, 0 without CE.

``backward`` gets ``coef_ce`` = dL/dcol3 (B, C) (and ``coef_ce2`` = dL/dcol4 for sigmoid
focal, else None), same dtype as ``coef_a``, and adds on voxels with w = 1, e = coef_ce:

* softmax, CE_PLAIN:  ``dz_k += p_k Σ_c e_c q_c − e_k q_k``.
* softmax, CE_FOCAL:  ``a_c = e_c q_c (γ p_c (1 − p_c)^(γ−1) log p_c − (1 − p_c)^γ)``
  (the γ term taken as 0 where p_c = 1 or q_c = 0), ``dz_k += a_k − p_k Σ_c a_c``.
* sigmoid, CE_PLAIN:  ``dz_c += e_c (σ(x_c) − q_c)``.
* sigmoid, CE_FOCAL:  ``dz_c += (e_c + e2_c q_c) · m · (σ(x_c) − q_c − γ s σ(x_c s) BCE)``.

Without CE a backend gets ``coef_ce=None`` and must do exactly the Tversky-only work.
Which features a call needs is :meth:`KernelSpec.features`; a backend declares what it
implements in ``Backend.features`` (``ops/_base.py``), and dispatch never sends it a call
needing more.
"""

from __future__ import annotations

from dataclasses import dataclass

ACTIVATIONS = {"softmax": 0, "sigmoid": 1, "none": 2}
# spec.ce: the cross-entropy family term accumulated in the same pass (csrc/tversky.h).
CE_NONE, CE_PLAIN, CE_FOCAL = 0, 1, 2
MAX_REGIONS = 63  # one bit per region in an int64 mask


@dataclass(frozen=True)
class KernelSpec:
    activation: int  # 0 softmax, 1 sigmoid, 2 none (probabilities given)
    soft_target: bool  # target is (B, C, N) float instead of (B, N) labels
    ignore_index: int | None  # label value that contributes nothing (labels only)
    num_classes: int  # C
    ce: int = CE_NONE  # CE_PLAIN / CE_FOCAL: the CE-family columns and their gradient
    label_smoothing: float = 0.0  # ε of the softmax CE target q = (1 - ε) g + ε / C
    focal_gamma: float = 0.0  # γ of CE_FOCAL
    float_labels: bool = False  # a label map stored as floats (checked integral in-pass)
    region_masks: tuple[int, ...] | None = None  # g_c = bit c of region_masks[label]

    @property
    def with_ce(self) -> bool:
        return self.ce != CE_NONE

    @property
    def ce_columns(self) -> int:
        """Stats columns after [sum_pg, sum_p, sum_g]: 0, 1, or 2 (sigmoid focal)."""
        if self.ce == CE_NONE:
            return 0
        return 2 if self.ce == CE_FOCAL and self.activation == 1 else 1

    def features(self) -> frozenset[str]:
        """What this call needs beyond the Tversky sums over an integer label map or a
        soft target: "ce", "soft_ce", "label_smoothing", "focal", "float_labels",
        "regions" (the names backends list in ``Backend.features``)."""
        need = set()
        if self.ce != CE_NONE:
            need.add("ce")
            if self.soft_target:
                need.add("soft_ce")
        if self.label_smoothing:
            need.add("label_smoothing")
        if self.ce == CE_FOCAL:
            need.add("focal")
        if self.float_labels:
            need.add("float_labels")
        if self.region_masks is not None:
            need.add("regions")
        return frozenset(need)

    # With C == 1 (binary sigmoid / probabilities) a label map holds {0, 1} and the
    # single channel is the foreground: g = (label == 1). Otherwise g_c = (label == c).
    @property
    def binary_labels(self) -> bool:
        return self.num_classes == 1 and not self.soft_target and self.region_masks is None

    @property
    def num_labels(self) -> int:
        """Valid label values are [0, num_labels)."""
        if self.region_masks is not None:
            return len(self.region_masks)
        return max(self.num_classes, 2)

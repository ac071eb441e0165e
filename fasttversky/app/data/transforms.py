"""Intensity normalisation and crop/pad to a fixed grid, both reversible where it matters.

Arrays are channel-first ``(C, X, Y, Z)`` for images and ``(X, Y, Z)`` for masks; the
spatial axes are the NIfTI array axes (we call them D, H, W when they reach the model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def brain_mask(image: np.ndarray) -> np.ndarray:
    """(C, X, Y, Z) -> (X, Y, Z) bool: voxels non-zero in any modality.

    Skull-stripped data (the shared MS data, our phantoms) has exactly 0 outside the
    brain; the union over modalities keeps brain voxels that happen to be 0 in one.
    """
    return (image != 0).any(axis=0)


def zscore_in_brain(image: np.ndarray, brain: np.ndarray | None = None) -> np.ndarray:
    """Per-modality z-score over the brain voxels; background set to 0.

    image (C, X, Y, Z) float -> float32 of the same shape. Scanner units differ per
    modality and per scan, so mean/std are taken per channel over the brain only (the
    background would otherwise dominate both). A constant channel gets std 1.
    """
    if brain is None:
        brain = brain_mask(image)
    out = np.zeros(image.shape, dtype=np.float32)
    if not brain.any():
        return out
    for c in range(image.shape[0]):
        vals = image[c][brain].astype(np.float64)
        mean, std = vals.mean(), vals.std()
        out[c][brain] = ((vals - mean) / (std if std > 0 else 1.0)).astype(np.float32)
    return out


# Normal white matter for normalize="white-matter": brain voxels at or above this
# quantile of the reference (T1) channel. WM is T1's brightest tissue and about 40 % of an
# adult brain, so its top 35 % is nearly pure WM; MS lesions are T1-dark and stay out.
WM_QUANTILE = 0.65
# Output unit of normalize="white-matter", as a fraction of the WM median: a brain's sd
# is 0.26-0.36x its WM median on FLAIR in the shared patients, so one unit is about one
# z-score sd and the augmentation ranges (set in z-score units) keep their size.
WM_UNIT = 0.3


def white_matter_ratio(
    image: np.ndarray, brain: np.ndarray | None = None, reference: int = 0
) -> np.ndarray:
    """Per-modality intensity over its median in normal white matter, / ``WM_UNIT``.

    image (C, X, Y, Z) float, brain (X, Y, Z) bool or None (= non-zero anywhere),
    reference: the T1 channel -> float32 (C, X, Y, Z), background 0, normal WM at
    1 / WM_UNIT. Reference-tissue normalisation (the idea of WhiteStripe, Shinohara et
    al. 2014): a brain z-score depends on how much of the brain is CSF, cortex or
    lesion, so the same tissue lands on different values in different patients (one
    shared patient's cortex is 0.53 sd above its WM, the other's 0.24 sd), while its
    ratio to WM does not (1.14x vs 1.09x). Raises ValueError on non-finite intensities
    in the brain and when a channel's WM median is not positive (no meaningful ratio).
    """
    if brain is None:
        brain = brain_mask(image)
    out = np.zeros(image.shape, dtype=np.float32)
    if not brain.any():
        return out
    if not 0 <= reference < image.shape[0]:
        raise ValueError(f"reference channel {reference} not in 0..{image.shape[0] - 1}")
    channels = [image[c][brain].astype(np.float64) for c in range(image.shape[0])]
    for c, vals in enumerate(channels):  # a NaN would move the quantile and every ratio
        if not np.isfinite(vals).all():
            raise ValueError(f"channel {c}: non-finite intensities inside the brain")
    wm = channels[reference] >= np.quantile(channels[reference], WM_QUANTILE)
    for c, vals in enumerate(channels):
        median = float(np.median(vals[wm]))
        if not median > 0:
            raise ValueError(
                f"channel {c}: white-matter median is {median}, not positive; "
                "use normalize='zscore' for this data"
            )
        out[c][brain] = (vals / (median * WM_UNIT)).astype(np.float32)
    return out


def normalise_in_brain(
    image: np.ndarray, brain: np.ndarray | None = None, normalisation=("zscore", 0)
) -> np.ndarray:
    """(C, X, Y, Z) raw intensities -> float32 network input, background 0.

    normalisation: (mode, reference channel) as ``DataConfig.normalisation`` gives it;
    mode "zscore" (:func:`zscore_in_brain`, the reference is unused) or "white-matter"
    (:func:`white_matter_ratio`)."""
    mode, reference = normalisation
    if mode == "zscore":
        return zscore_in_brain(image, brain)
    if mode == "white-matter":
        return white_matter_ratio(image, brain, reference)
    raise ValueError(f"normalisation mode must be zscore or white-matter, got {mode!r}")


@dataclass(frozen=True)
class CropInfo:
    """Where a crop/pad put the original volume, so predictions can be put back.

    For each spatial axis: ``src`` slice into the original, ``dst`` slice into the
    cropped/padded array (both of equal length).
    """

    original_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    src: tuple[slice, ...]
    dst: tuple[slice, ...]


def _bbox_center(mask: np.ndarray | None, shape: Sequence[int]) -> list[float]:
    if mask is not None and mask.any():
        idx = [
            np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
            for ax in range(mask.ndim)
        ]
        return [(i[0] + i[-1] + 1) / 2 for i in idx]
    return [s / 2 for s in shape]


def crop_or_pad_info(
    shape: Sequence[int], target_shape: Sequence[int], center_mask: np.ndarray | None = None
) -> CropInfo:
    """Plan a crop/pad of ``shape`` to ``target_shape`` centred on ``center_mask``'s bbox.

    Centring on the brain's bounding box rather than the array keeps the whole brain
    when the target is tighter than the field of view (e.g. MNI 182×218×182 -> 144³).
    """
    shape = tuple(int(s) for s in shape)
    target = tuple(int(t) for t in target_shape)
    if len(shape) != len(target):
        raise ValueError(f"target shape {target} has {len(target)} dims, volume has {len(shape)}")
    center = _bbox_center(center_mask, shape)
    src, dst = [], []
    for s, t, c in zip(shape, target, center, strict=False):
        if t >= s:  # pad: original goes in the middle of the target
            off = (t - s) // 2
            src.append(slice(0, s))
            dst.append(slice(off, off + s))
        else:  # crop: a window of length t centred on c, kept inside [0, s)
            start = int(round(c - t / 2))
            start = min(max(start, 0), s - t)
            src.append(slice(start, start + t))
            dst.append(slice(0, t))
    return CropInfo(shape, target, tuple(src), tuple(dst))


def apply_crop(x: np.ndarray, info: CropInfo, fill: float = 0) -> np.ndarray:
    """Crop/pad the last len(target) axes of ``x`` per ``info``; leading axes kept."""
    lead = x.shape[: x.ndim - len(info.target_shape)]
    out = np.full(lead + info.target_shape, fill, dtype=x.dtype)
    out[(...,) + info.dst] = x[(...,) + info.src]
    return out


def undo_crop(y: np.ndarray, info: CropInfo, fill: float = 0) -> np.ndarray:
    """Inverse of :func:`apply_crop`: back onto the original grid; cropped-away voxels = fill."""
    lead = y.shape[: y.ndim - len(info.original_shape)]
    out = np.full(lead + info.original_shape, fill, dtype=y.dtype)
    out[(...,) + info.src] = y[(...,) + info.dst]
    return out


def pad_to_multiple(shape: Sequence[int], multiple: int) -> tuple[int, ...]:
    """Smallest shape >= ``shape`` divisible by ``multiple`` on every axis (U-Net pooling)."""
    return tuple(-(-int(s) // multiple) * multiple for s in shape)

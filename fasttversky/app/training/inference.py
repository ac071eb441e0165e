"""Inference, in one place: from a trained network and one volume to the probability and
the lesion mask a user can trust.

:func:`segment_volume` is the one path that ``predict``, ``evaluate``, validation and
``reproduce`` take, every choice coming from one
:class:`~fasttversky.app.config.PredictConfig`::

    prob = predict(model, image, window, overlap, weighting, mirror)   # (D, H, W)
    prob *= brain            # lesions are inside the brain; the net never learned the
                             # background of a skull-stripped volume
    prob = to_grid(prob)     # e.g. back to the file's grid (undo a crop)
    mask = lesion_mask(prob, config)   # prob >= threshold, small components removed

``evaluate`` starts from saved probabilities, so it runs the last step alone
(:func:`lesion_mask`, the same function).

Why windows for a patch-trained model: with instance norm it learned the statistics of
patch-sized neighbourhoods; run on a whole volume it normalises over the whole brain
instead (measurements: ``bench/results/lesion_cpu.md``). Gaussian weighting: see
:mod:`.predict`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..config import MIRRORS, PredictConfig

__all__ = ["lesion_mask", "lesion_probability", "remove_small_components", "segment_volume"]


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """``mask`` (any 3-D bool/0-1 array) without its 26-connected components of fewer
    than ``min_size`` voxels; returns a bool array (a copy)."""
    from scipy import ndimage as ndi

    mask = np.asarray(mask).astype(bool)
    if min_size <= 1 or not mask.any():
        return mask.copy()
    labels, n = ndi.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def lesion_mask(prob: np.ndarray, config: PredictConfig) -> np.ndarray:
    """(D, H, W) probability -> uint8 lesion mask: ``prob >= config.threshold``, then
    26-connected components below ``config.min_lesion_size`` voxels removed."""
    mask = prob >= config.threshold
    if config.min_lesion_size > 1:
        mask = remove_small_components(mask, config.min_lesion_size)
    return mask.astype(np.uint8)


def lesion_probability(
    model,
    image,
    config: PredictConfig,
    brain: np.ndarray | None = None,
    *,
    device: str | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """Foreground probability of one volume, (D, H, W) float32, 0 outside the brain.

    image: (C, D, H, W) float32 (numpy or torch), normalised as in training.
    brain: (D, H, W) bool; None = voxels non-zero in any channel of ``image``.
    """
    import torch

    from .predict import predict

    x = torch.as_tensor(np.asarray(image, dtype=np.float32))
    if x.dim() != 4:
        raise ValueError(f"image must be (C, D, H, W), got {tuple(x.shape)}")
    prob = predict(
        model,
        x,
        window=config.window,
        overlap=config.overlap,
        weighting=config.weighting,
        mirror_axes=MIRRORS[config.mirror],
        precision=precision,
        device=device,
    )
    if brain is None:
        brain = (x != 0).any(dim=0).numpy()
    return prob.cpu().numpy().astype(np.float32) * np.asarray(brain, dtype=bool)


def segment_volume(
    model,
    image,
    config: PredictConfig,
    brain: np.ndarray | None = None,
    *,
    device: str | None = None,
    precision: str = "fp32",
    to_grid: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Probability and lesion mask of one volume.

    Args:
        model: image (1, C, D, H, W) -> logits, e.g. ``UNet3D``.
        image: (C, D, H, W) float32 (numpy or torch), normalised as in training.
        config: every choice of the prediction (window, overlap, weighting, mirroring,
            threshold, minimum lesion size).
        brain: (D, H, W) bool; None = voxels non-zero in any channel of ``image``.
        device, precision: where and in which precision the network runs.
        to_grid: maps the probability to the grid the mask is wanted on before
            thresholding (``PreparedSubject.to_file_grid`` undoes a crop); None = the
            image's grid.

    Returns:
        (prob float32 in [0, 1], mask uint8 {0, 1}), both 0 outside the brain.
    """
    prob = lesion_probability(model, image, config, brain, device=device, precision=precision)
    if to_grid is not None:
        prob = to_grid(prob)
    return prob, lesion_mask(prob, config)

"""Subjects -> normalised tensors: a torch Dataset of whole volumes or random patches.

Each item is ``(image, label)``: image ``(C, D, H, W)`` float32 (z-scored per modality
inside the brain), label ``(D, H, W)`` uint8 {0, 1}. :func:`batch_iterator` stacks
items into ``(B, C, D, H, W)`` / ``(B, D, H, W)`` batches for the training loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .io import Subject, load_subject
from .transforms import (
    CropInfo,
    apply_crop,
    brain_mask,
    crop_or_pad_info,
    normalise_in_brain,
    undo_crop,
)


@dataclass
class PreparedSubject:
    """A subject ready for the network, with what is needed to map results back.

    image (C, D, H, W) float32, mask (D, H, W) uint8 or None, brain (D, H, W) bool,
    affine (4, 4) of the original file, crop (None when no target shape was asked),
    full_mask: the mask on the file's grid — evaluate against this, so lesion voxels
    that a tight crop cut away still count as missed.
    """

    name: str
    image: np.ndarray
    mask: np.ndarray | None
    brain: np.ndarray
    affine: np.ndarray
    crop: CropInfo | None
    full_mask: np.ndarray | None = None

    def to_file_grid(self, volume: np.ndarray, fill: float = 0) -> np.ndarray:
        """A (D, H, W) result on the prepared grid -> the file's grid (undo the crop)."""
        return undo_crop(volume, self.crop, fill) if self.crop is not None else volume


def prepare_subject(
    subject: Subject,
    target_shape: Sequence[int] | None = None,
    normalisation: tuple[str, int] = ("zscore", 0),
) -> PreparedSubject:
    """Load, normalise inside the brain (``normalisation``: ``DataConfig.normalisation``,
    default the brain z-score), then crop/pad to ``target_shape`` around the brain."""
    image, mask, affine = load_subject(subject)
    return prepare_arrays(subject.name, image, mask, affine, target_shape, normalisation)


def prepare_arrays(
    name: str,
    image: np.ndarray,
    mask: np.ndarray | None,
    affine: np.ndarray,
    target_shape: Sequence[int] | None = None,
    normalisation: tuple[str, int] = ("zscore", 0),
) -> PreparedSubject:
    """:func:`prepare_subject` for arrays in memory: image (C, X, Y, Z) raw intensities,
    mask (X, Y, Z) {0, 1} or None (e.g. a transplanted subject never written to disk)."""
    image = np.asarray(image, dtype=np.float32)
    if mask is not None:
        mask = np.asarray(mask, dtype=np.uint8)
    brain = brain_mask(image)
    image = normalise_in_brain(image, brain, normalisation)
    crop = None
    full_mask = mask
    if target_shape is not None:
        crop = crop_or_pad_info(image.shape[1:], target_shape, brain)
        image = apply_crop(image, crop)
        brain = apply_crop(brain, crop)
        if mask is not None:
            mask = apply_crop(mask, crop)
    return PreparedSubject(name, image, mask, brain, affine, crop, full_mask)


def _patch_start(center: np.ndarray, size: Sequence[int], shape: Sequence[int]) -> list[int]:
    return [
        int(min(max(c - p // 2, 0), max(s - p, 0)))
        for c, p, s in zip(center, size, shape, strict=False)
    ]


def extract_patch(
    image: np.ndarray, mask: np.ndarray, start: Sequence[int], size: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Patch of ``size`` at ``start``; zero-padded where it reaches outside the volume
    (``start`` may be negative)."""
    out_i = np.zeros((image.shape[0], *size), dtype=image.dtype)
    out_m = np.zeros(tuple(size), dtype=mask.dtype)
    lo = [max(int(s), 0) for s in start]
    hi = [min(int(s) + p, n) for s, p, n in zip(start, size, mask.shape, strict=False)]
    src = tuple(slice(a, max(a, b)) for a, b in zip(lo, hi, strict=False))
    dst = tuple(
        slice(a - int(s), a - int(s) + (sl.stop - sl.start))
        for a, s, sl in zip(lo, start, src, strict=False)
    )
    out_i[(slice(None),) + dst] = image[(slice(None),) + src]
    out_m[dst] = mask[src]
    return out_i, out_m


class LesionDataset(torch.utils.data.Dataset):
    """Whole volumes (``patch_size=None``) or random patches of a list of subjects.

    Args:
        subjects: from :func:`fasttversky.app.data.find_subjects`, or already
            :class:`PreparedSubject` (re-used as they are, e.g. across the runs of a
            sweep); each needs a mask.
        target_shape: crop/pad every volume to this (D, H, W) around the brain first
            (the paper: 128×224×256); None keeps the file's grid.
        patch_size: (d, h, w) random patches; None yields whole volumes.
        patches_per_subject: items per subject per epoch in patch mode.
        lesion_prob: probability that a patch is centred on a lesion voxel (else on a
            random brain voxel). Lesions are 0.01–0.7 % of voxels, so uniform patches
            would almost never show the network a lesion.
        seed: patches depend only on (seed, epoch, index), so a run is reproducible
            with any number of DataLoader workers; call :meth:`set_epoch` each epoch.
        cache: keep prepared volumes in memory (loading + normalising dominates otherwise).
        augment: an :class:`fasttversky.app.data.augment.Augmenter` for patch mode: the
            patch is cut with its margin around the same centre and augmented with a
            seed drawn from the item's generator (so items stay reproducible).
        normalisation: ``DataConfig.normalisation`` for subjects prepared here.
    """

    def __init__(
        self,
        subjects: Sequence[Subject],
        target_shape: Sequence[int] | None = None,
        patch_size: Sequence[int] | None = None,
        patches_per_subject: int = 1,
        lesion_prob: float = 0.5,
        seed: int = 0,
        cache: bool = True,
        augment=None,
        normalisation: tuple[str, int] = ("zscore", 0),
    ):
        if not subjects:
            raise ValueError("LesionDataset needs at least one subject")
        for s in subjects:
            if s.mask is None:
                raise ValueError(f"subject {s.name} has no lesion mask; training needs one")
        self.subjects = list(subjects)
        self._cache: dict[int, PreparedSubject] = {
            i: s for i, s in enumerate(self.subjects) if isinstance(s, PreparedSubject)
        }
        self.target_shape = tuple(target_shape) if target_shape is not None else None
        self.patch_size = tuple(int(p) for p in patch_size) if patch_size is not None else None
        self.patches_per_subject = int(patches_per_subject) if patch_size is not None else 1
        self.lesion_prob = float(lesion_prob)
        self.seed = int(seed)
        self.epoch = 0
        self.cache = cache
        if augment is not None and self.patch_size is None:
            raise ValueError("augment needs patch mode (a patch_size)")
        if augment is not None and tuple(augment.patch_size) != self.patch_size:
            raise ValueError(
                f"augment was built for patches {augment.patch_size}, not {self.patch_size}"
            )
        self.augment = augment
        self.normalisation = tuple(normalisation)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.subjects) * self.patches_per_subject

    def prepared(self, i: int) -> PreparedSubject:
        if i in self._cache:
            return self._cache[i]
        p = prepare_subject(self.subjects[i], self.target_shape, self.normalisation)
        if self.cache:
            self._cache[i] = p
        return p

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        p = self.prepared(index // self.patches_per_subject)
        if self.patch_size is None:
            return torch.from_numpy(p.image.copy()), torch.from_numpy(p.mask.copy())
        rng = np.random.default_rng((self.seed, self.epoch, index))
        pool = p.mask if (rng.random() < self.lesion_prob and p.mask.any()) else p.brain
        if not pool.any():
            pool = np.ones_like(p.brain)
        # Pick the k-th set voxel without materialising argwhere of the whole volume.
        flat = np.flatnonzero(pool)
        center = np.unravel_index(flat[rng.integers(len(flat))], pool.shape)
        if self.augment is not None:
            # The same patch plus a margin on every side (zero beyond the volume, like
            # the background), then rotated/zoomed/cropped to patch_size.
            start = _patch_start(np.asarray(center), self.patch_size, pool.shape)
            start = [s - m for s, m in zip(start, self.augment.margin, strict=True)]
            img, msk = extract_patch(p.image, p.mask, start, self.augment.input_size())
            return self.augment(img, msk, int(rng.integers(2**31)))
        start = _patch_start(np.asarray(center), self.patch_size, pool.shape)
        img, msk = extract_patch(p.image, p.mask, start, self.patch_size)
        return torch.from_numpy(img), torch.from_numpy(msk)


def batch_iterator(
    dataset: LesionDataset, batch_size: int = 1, seed: int = 0, epochs: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (or ``epochs``-long) shuffled batches: image (B, C, D, H, W) float32,
    label (B, D, H, W) uint8. Deterministic given ``seed``; the last short batch of an
    epoch is dropped so every step sees the same batch shape.
    """
    g = torch.Generator().manual_seed(seed)
    n = len(dataset)
    bs = min(batch_size, n)
    epoch = 0
    while epochs is None or epoch < epochs:
        dataset.set_epoch(epoch)
        order = torch.randperm(n, generator=g).tolist()
        for k in range(0, n - bs + 1, bs):
            items = [dataset[i] for i in order[k : k + bs]]
            yield torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items])
        epoch += 1


class RandomBatches:
    """Callable ``batches(i) -> (image (B, C, D, H, W) float32, label (B, D, H, W) uint8)``.

    Micro-batch ``i`` depends only on (seed, i): items drawn without replacement when the
    dataset has enough of them, and each slot of the batch gets its own patch
    randomness, so a subject drawn twice still gives two different patches. This is the
    form ``fasttversky.app.training.train`` resumes exactly (no iterator to replay).
    """

    def __init__(self, dataset: LesionDataset, batch_size: int = 1, seed: int = 0):
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)

    def __call__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, 1, int(i)))
        n = len(self.dataset)
        idx = rng.choice(n, size=self.batch_size, replace=self.batch_size > n)
        items = []
        for slot, k in enumerate(idx):
            self.dataset.set_epoch(int(i) * self.batch_size + slot)
            items.append(self.dataset[int(k)])
        return torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items])


class PaddedBatches:
    """Whole-volume batches zero-padded at the far end of each axis up to a multiple the
    U-Net can pool (e.g. the 182×218×182 MNI grid for 4 levels). Zero is background
    in both the z-scored image and the label, and predict() pads the same way."""

    def __init__(self, batches, multiple: int):
        self.batches, self.multiple = batches, multiple

    def __call__(self, i: int):
        image, label = self.batches(i)
        pad = []
        for s in reversed(label.shape[1:]):
            pad += [0, -(-s // self.multiple) * self.multiple - s]
        if any(pad):
            image, label = F.pad(image, pad), F.pad(label, pad)
        return image, label

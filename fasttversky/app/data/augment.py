"""On-the-fly augmentation of training patches (spatial + intensity) in plain torch.

One :class:`Augmenter` turns a patch cut with a margin around its centre into the
training patch: ``(image (C, d+2m, h+2m, w+2m) float32, mask (same spatial) {0,1},
seed) -> (image (C, d, h, w) float32, mask (d, h, w) uint8)``. It is deterministic
given the seed (each item of :class:`fasttversky.app.data.LesionDataset` passes one
drawn from its own (seed, epoch, index) generator), so runs stay reproducible and
resumable.

What it does, and why (the budget: a training step of batch 2 × 64³ takes ~1 s on two
cores, so augmentation may cost a few tens of ms per patch):

* **Spatial**, one draw shared by image and mask: with probability ``p_affine`` a
  rotation of up to ``rotate_deg`` about each axis and a zoom per axis in ``scale``
  (the anatomy and lesion sizes of a new patient differ from the training brains),
  then mirroring of ``flip_axes`` (axis 0 of MNI data is left-right: brains are
  near-symmetric, lesions are not lateralised). The affine is one
  ``torch.nn.functional.grid_sample`` of image and mask together (trilinear; the mask
  is thresholded at 0.5, a smoother boundary than nearest), sampled from the margin so
  that the rotated patch rarely reaches outside it. MONAI's ``RandAffined`` does the
  same resampling several times slower (bench/results/phantom_contrast.md), because it
  builds its grid and resamples image and label separately; the difference is a third
  of a training step on a CPU, so we keep the one-call version.
* **Intensity**, drawn *per modality* (scanners differ per sequence, and varying
  T1/T2/FLAIR independently also varies the lesion-to-white-matter contrast the
  network relies on), each applied inside the brain only — the background of a
  skull-stripped, z-scored volume is exactly 0 at inference, so it stays 0 here:
  gamma on the brain's intensities rescaled to [0, 1] (nnU-Net / MONAI
  ``RandAdjustContrast``), contrast (scaling about the patch's brain mean), an additive
  brightness shift, and Gaussian noise with a std drawn in [0, ``noise_std``].
  Optionally (``p_remap`` > 0) first a random monotone remapping of each modality's
  brain intensities through its 1/25/50/75/99 % quantiles: the three inner knots move
  by up to ``remap`` of the gap to their neighbours, so the contrast *between* tissues
  (cortex vs white matter vs lesion) changes, not just the global scale — patients and
  scanners differ exactly there (cortex is FLAIR 1.09× white matter in one shared
  patient, 1.14× in the other), and gamma/contrast/brightness are global maps that
  barely move those ratios. Values beyond the 1/99 % knots are shifted, not clipped,
  so a bright lesion stays brighter than everything else.
* **Resolution**, optional (``p_blur``, ``p_lowres`` > 0; the ``resolution`` set of
  :data:`AUGMENTATIONS`), per modality and before the intensity maps: a Gaussian blur
  with sigma drawn in ``blur_sigma`` voxels, and a simulated low-resolution acquisition
  (down-sampling by a factor drawn in ``lowres`` with nearest neighbours, back up
  trilinearly), as nnU-Net's default augmentation does. Scans differ in sharpness as
  much as in contrast (one shared patient's images are ~1.5× smoother than the
  other's: normal-WM sd / median 0.086 vs 0.114 on FLAIR), and a network trained on one
  sharp brain has never seen a smooth one. Both are normalised by the brain mask
  (blur of x·brain over blur of brain), so the skull-stripped edge does not darken.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["AUGMENTATIONS", "AugmentConfig", "Augmenter", "augment_config"]


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of each augmentation (a probability of 0 disables one).

    flip_axes: spatial axes (0, 1, 2 of the patch), each mirrored with ``p_flip``.
    p_affine, rotate_deg, scale: probability of a rotation + zoom, the largest rotation
        about each axis in degrees, and the (min, max) apparent size factor per axis
        (> 1 = anatomy looks larger).
    p_gamma, gamma: per modality, probability and range of the gamma exponent.
    p_contrast, contrast: per modality, factor range for scaling about the brain mean.
    p_brightness, brightness: per modality, additive offset range (z-score units).
    p_noise, noise_std: per modality, Gaussian noise with std uniform in [0, noise_std].
    p_remap, remap: per modality, probability of the quantile remapping and the largest
        move of an inner knot as a fraction of the gap to its neighbour (< 0.5 keeps the
        map monotone). With p_remap = 0 nothing is drawn for it, so the random stream
        of the other options is that of a config without it.
    p_blur, blur_sigma: per modality, probability of a Gaussian blur and the (min, max)
        of its sigma in voxels.
    p_lowres, lowres: per modality, probability of a simulated low-resolution
        acquisition and the (min, max) resolution factor (0.5 = half the voxels per
        axis). As for p_remap, nothing is drawn for the resolution options while both
        probabilities are 0.
    """

    flip_axes: tuple[int, ...] = (0,)
    p_flip: float = 0.5
    p_affine: float = 0.5
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    p_contrast: float = 0.3
    contrast: tuple[float, float] = (0.75, 1.25)
    p_brightness: float = 0.2
    brightness: tuple[float, float] = (-0.2, 0.2)
    p_noise: float = 0.2
    noise_std: float = 0.1
    p_remap: float = 0.0
    remap: float = 0.3
    p_blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    p_lowres: float = 0.0
    lowres: tuple[float, float] = (0.5, 1.0)

    def __post_init__(self):
        probabilities = ("p_flip", "p_affine", "p_gamma", "p_contrast", "p_brightness")
        for name in (*probabilities, "p_noise", "p_remap", "p_blur", "p_lowres"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        for ax in self.flip_axes:
            if ax not in (0, 1, 2):
                raise ValueError(f"flip_axes must be spatial axes 0, 1 or 2, got {ax}")
        for name in ("scale", "gamma", "contrast", "blur_sigma", "lowres"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be a range 0 < min <= max, got {(lo, hi)}")
        if self.lowres[1] > 1:
            raise ValueError(f"lowres factors must be <= 1 (fewer voxels), got {self.lowres}")
        if not 0 <= self.rotate_deg <= 45:
            raise ValueError(f"rotate_deg must be in [0, 45], got {self.rotate_deg}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if not 0 <= self.remap < 0.5:
            raise ValueError(f"remap must be in [0, 0.5), got {self.remap}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> AugmentConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# Named augmentation sets (DataConfig.augment; "none" = no Augmenter at all).
# "resolution" = "default" plus blur and simulated low resolution at nnU-Net's rates
# (its GaussianBlur and SimulateLowResolution transforms: sigma 0.5-1 with p 0.2 x 0.5
# per channel, factor 0.5-1 with p 0.25 x 0.5), a little stronger in sigma because the
# smoothness gap measured between the shared patients is ~1.5x.
AUGMENTATIONS: dict[str, AugmentConfig] = {
    "default": AugmentConfig(),
    "resolution": AugmentConfig(p_blur=0.2, blur_sigma=(0.5, 1.5), p_lowres=0.15),
}


def augment_config(name: str) -> AugmentConfig:
    """The :class:`AugmentConfig` of a named set (:data:`AUGMENTATIONS`); ValueError
    naming the choices otherwise."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {sorted(AUGMENTATIONS)}, got {name!r}")
    return AUGMENTATIONS[name]


def _over_mask(num: np.ndarray, den: np.ndarray, x: np.ndarray) -> np.ndarray:
    """num / den where the filtered brain mask ``den`` has weight (the average of brain
    voxels only), ``x`` unchanged where it has next to none; float32."""
    return np.where(den > 1e-3, num / np.maximum(den, 1e-3), x).astype(np.float32)


def _masked_blur(x: np.ndarray, brain: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of the brain's intensities, normalised by the blurred brain mask so
    that voxels near the edge are averages of brain voxels only (no darkening by the
    zero background); float32, background left to the caller."""
    from scipy import ndimage as ndi

    b = brain.astype(np.float32)
    num = ndi.gaussian_filter(x * b, sigma, mode="constant")
    return _over_mask(num, ndi.gaussian_filter(b, sigma, mode="constant"), x)


def _lowres(x: np.ndarray, brain: np.ndarray, factor: float) -> np.ndarray:
    """Simulated acquisition at ``factor`` of the resolution: nearest-neighbour
    down-sampling of x·brain and of the brain mask, trilinear back up, normalised by
    the resampled mask (as :func:`_masked_blur`)."""
    shape = x.shape
    small = tuple(max(1, int(round(s * factor))) for s in shape)
    b = torch.from_numpy(brain.astype(np.float32))[None, None]
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None] * b
    both = torch.cat([t, b], dim=1)
    # Pointwise resampling (no reduction), so the result is the same at any thread count.
    down = F.interpolate(both, size=small, mode="nearest")
    up = F.interpolate(down, size=shape, mode="trilinear", align_corners=False)[0].numpy()
    return _over_mask(up[0], up[1], x)


def _remap(x: np.ndarray, brain: np.ndarray, moves: np.ndarray) -> np.ndarray:
    """Monotone piecewise-linear map of x through its brain 1/25/50/75/99 % quantiles,
    the inner knots moved by ``moves`` (3 values in (-0.5, 0.5)) of the gap to the
    next (> 0) or previous (< 0) knot; identity shift beyond the outer knots."""
    q = np.percentile(x[brain].astype(np.float64), [1, 25, 50, 75, 99])
    if not q[4] > q[0]:
        return x
    y = q.copy()
    for k, m in enumerate(moves, start=1):
        y[k] = q[k] + m * ((q[k + 1] - q[k]) if m > 0 else (q[k] - q[k - 1]))
    inside = np.interp(x, q, y).astype(np.float32)
    return np.where((x >= q[0]) & (x <= q[4]), inside, x).astype(np.float32)


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """3×3 rotation, float64: Rz @ Ry @ Rx of the three angles (radians)."""
    cx, cy, cz = torch.cos(angles).tolist()
    sx, sy, sz = torch.sin(angles).tolist()
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float64)
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
    return rz @ ry @ rx


class Augmenter:
    """Callable ``(image, mask, seed) -> (image, mask)``; see the module docstring.

    Args:
        config: an :class:`AugmentConfig`.
        patch_size: (d, h, w) of the output patch.

    Attributes: ``margin`` (per axis) is how much larger than ``patch_size`` the input
    must be on each side (:meth:`input_size`): enough for a patch rotated by
    ``rotate_deg`` in one plane and shrunk to ``scale[0]``; compound rotations about
    all three axes may bring a few zero corner voxels in, which is harmless (zero is
    the background value).
    """

    def __init__(self, config: AugmentConfig, patch_size):
        self.config = config
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints, got {patch_size}")
        c = config
        if c.p_affine > 0:
            th = math.radians(c.rotate_deg)
            grow = (math.cos(th) + math.sin(th)) / c.scale[0]
        else:
            grow = 1.0
        self.margin = tuple(int(math.ceil(p * max(grow - 1, 0) / 2)) for p in self.patch_size)

    def input_size(self) -> tuple[int, ...]:
        """Spatial size to cut before calling: ``patch_size + 2 * margin``."""
        return tuple(p + 2 * m for p, m in zip(self.patch_size, self.margin, strict=True))

    def __call__(self, image, mask, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.as_tensor(np.asarray(image, dtype=np.float32))
        mask = torch.as_tensor(np.asarray(mask))
        size = self.input_size()
        if image.dim() != 4 or tuple(image.shape[1:]) != size or tuple(mask.shape) != size:
            raise ValueError(
                f"augment input must be image (C, *{size}) and mask {size}, "
                f"got {tuple(image.shape)} and {tuple(mask.shape)}"
            )
        c = self.config
        g = torch.Generator().manual_seed(int(seed) % 2**63)

        def draw(lo: float = 0.0, hi: float = 1.0, n: int = 1) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)

        # Every draw happens whether or not it is used, so one option's probability
        # does not shift the random stream of the others.
        do_affine = bool(draw() < c.p_affine)
        rad = math.radians(c.rotate_deg)
        angles = draw(-rad, rad, 3)
        zoom = draw(c.scale[0], c.scale[1], 3)
        flips = [ax for ax in c.flip_axes if bool(draw() < c.p_flip)]

        if do_affine:
            img, msk = self._affine(image, mask, _rotation(angles), zoom)
        else:
            sl = tuple(slice(m, m + p) for m, p in zip(self.margin, self.patch_size, strict=True))
            img, msk = image[(slice(None), *sl)], mask[sl].to(torch.float32)
        if flips:
            img = torch.flip(img, [a + 1 for a in flips])
            msk = torch.flip(msk, flips)

        # Intensity in numpy: single-threaded (so results do not depend on the torch
        # thread count: the brain-mean reduction would) and, on a loaded 2-core
        # machine, ~50× faster than torch's OpenMP elementwise ops on a 64³ patch.
        img = img.numpy()
        brain = (img != 0).any(axis=0)
        out = np.stack([self._intensity(ch, brain, draw, g) for ch in img])
        out *= brain  # the background stays exactly 0
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)), (msk >= 0.5).to(
            torch.uint8
        ).contiguous()

    def _affine(self, image, mask, rot, zoom):
        # affine_grid works in (x, y, z) = (W, H, D) normalised coordinates of the
        # output; theta maps them into the input's. An output offset of u voxels from
        # the centre samples the input at R·diag(1/zoom)·u voxels from its centre
        # (anatomy zoomed by ``zoom``); normalising by the output and input half-sizes
        # gives theta = diag(2/in) · R · diag(1/zoom) · diag(out/2).
        rev = [2, 1, 0]  # (D, H, W) -> (x, y, z)
        out_sz = torch.tensor([self.patch_size[i] for i in rev], dtype=torch.float64)
        in_sz = torch.tensor([image.shape[1 + i] for i in rev], dtype=torch.float64)
        z = zoom[rev]
        theta = torch.diag(1 / in_sz) @ rot @ torch.diag(out_sz / z)
        theta = torch.cat([theta, torch.zeros(3, 1, dtype=torch.float64)], dim=1)
        both = torch.cat([image, mask[None].to(image.dtype)], dim=0)[None]
        grid = F.affine_grid(
            theta[None].float(), (1, both.shape[1], *self.patch_size), align_corners=False
        )
        res = F.grid_sample(both, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[
            0
        ]
        return res[:-1], res[-1]

    def _intensity(self, ch, brain, draw, g):
        c = self.config
        do = [bool(draw() < p) for p in (c.p_gamma, c.p_contrast, c.p_brightness, c.p_noise)]
        gamma = float(draw(*c.gamma))
        factor = float(draw(*c.contrast))
        shift = float(draw(*c.brightness))
        std = float(draw(0.0, c.noise_std))
        noise_seed = int(torch.randint(0, 2**62, (1,), generator=g))
        remap = None
        if c.p_remap > 0:  # drawn only when enabled: see AugmentConfig
            do_remap = bool(draw() < c.p_remap)
            moves = draw(-c.remap, c.remap, 3).numpy()
            remap = moves if do_remap else None
        sigma = factor_lr = None
        if c.p_blur > 0 or c.p_lowres > 0:  # drawn only when enabled: see AugmentConfig
            do_blur, s = bool(draw() < c.p_blur), float(draw(*c.blur_sigma))
            do_lr, f = bool(draw() < c.p_lowres), float(draw(*c.lowres))
            sigma = s if do_blur else None
            factor_lr = f if do_lr else None
        resample = sigma is not None or factor_lr is not None
        n = int(brain.sum())
        if not (any(do) or remap is not None or resample) or n == 0:
            return ch
        # Whole-patch arithmetic (the caller zeroes the background afterwards),
        # statistics over the brain voxels only.
        x = ch.astype(np.float32, copy=True)
        # Resolution first: it is a property of the acquisition, which the scanner's
        # intensity scale and noise then act on.
        if sigma is not None:
            x = _masked_blur(x, brain, sigma)
        if factor_lr is not None:
            x = _lowres(x, brain, factor_lr)
        if remap is not None:
            x = _remap(x, brain, remap)
        if do[0]:
            lo, hi = float(x[brain].min()), float(x[brain].max())
            span = hi - lo
            if span > 0:
                x = np.clip((x - lo) / span, 0, 1) ** np.float32(gamma) * np.float32(span)
                x += np.float32(lo)
        if do[1]:
            mean = np.float32(x[brain].mean(dtype=np.float64))
            x = (x - mean) * np.float32(factor) + mean
        if do[2]:
            x += np.float32(shift)
        if do[3] and std > 0:
            noise = np.random.default_rng(noise_seed).standard_normal(x.shape, dtype=np.float32)
            x += np.float32(std) * noise
        return x

"""Lesion phantoms that need no download: procedural brains, or real masks in real brains.

Two generators write a dataset in the layout :func:`fasttversky.app.data.find_subjects`
reads (``out/subjectNN/{T1,T2,FLAIR,mask}.nii.gz``):

* :func:`make_phantom` — a procedural head in an MNI-sized box (182×218×182 mm sampled
  on any grid): scalp and skull (removed by default, as in skull-stripped data), cortex
  with gyral folding and sulcal CSF, white matter, deep grey matter, lateral and third
  ventricles, and white-matter lesions. T1/T2/FLAIR come from per-tissue intensities
  mixed with partial-volume weights, a smooth bias field and Rician noise.
* :func:`transplant` — a real lesion mask written into a real brain by changing the
  T1/T2/FLAIR contrast inside it (both in the same MNI grid, as in the shared data);
  :func:`write_transplant_dataset` writes such subjects, :func:`transplanted_subjects`
  keeps them in memory as extra training subjects; the contrast modes are
  :data:`TRANSPLANT_CONTRASTS`.

Lesion statistics follow the Ljubljana MS data (see ``open_ms_data/README.md``):
lesion load 0.01–0.7 % of the volume (log-uniform, so small loads are as common as in
the data), most lesions ~3–4 mm across with a heavy tail of confluent periventricular
ones up to ~2 cm, about half of the lesion centres within 10 mm of the ventricles, and
contrast relative to normal white matter FLAIR ~1.35×, T2 ~1.5–1.8×, T1 ~0.8×.

Everything is vectorised numpy/scipy.ndimage: a 96×112×96 subject takes well under a
second, a full 182×218×182 one a few seconds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ..config import TRANSPLANT_CONTRASTS as CONTRAST_NAMES
from ..config import SynthConfig
from ..errors import DataError
from .io import DEFAULT_MODALITIES, find_subjects, load_subject, load_volume, save_volume
from .transforms import WM_QUANTILE

_DEFAULTS = SynthConfig()
MNI_FOV_MM = (182.0, 218.0, 182.0)
MODALITIES = ("T1", "T2", "FLAIR")

# Tissue labels of the phantom's anatomy map.
BACKGROUND, CSF, GM, WM, DEEP_GM, SKULL, SCALP = range(7)

# Mean intensities per tissue (arbitrary scanner-like units), index = label above.
# Ratios follow typical 3T contrasts: T1 WM > GM > CSF; T2 CSF >> GM > WM; FLAIR is
# T2-weighted with CSF suppressed.
_TISSUE_MEANS = {
    "T1": np.array([0, 250, 600, 900, 700, 120, 750], np.float32),
    "T2": np.array([0, 1800, 950, 700, 850, 90, 600], np.float32),
    "FLAIR": np.array([0, 150, 750, 560, 680, 60, 500], np.float32),
}
# Lesion intensity = factor × normal-appearing WM; factor ranges over "lesion severity"
# u ∈ [0, 1] (more tissue destruction: darker T1, brighter T2/FLAIR). Mid-range values
# match the measured ratios FLAIR 1.35, T2 1.5–1.8, T1 0.8.
LESION_FACTOR = {"T1": (0.9, 0.65), "T2": (1.45, 1.85), "FLAIR": (1.25, 1.45)}

# Wider factors for training data: real lesions are not all "typical". Measured and
# published FLAIR lesion/NAWM ratios run from barely visible (~1.1, small or old
# lesions, partial volume) to ~2 (acute, confluent); T2 likewise up to ~2.2 and T1 from
# isointense to black holes (~0.55). With a severity drawn per lesion over [0, 1] a
# network trained on transplants sees faint and bright lesions, not one narrow band
# (the default factors give FLAIR 1.31–1.39× for the severities transplant draws).
WIDE_LESION_FACTOR = {"T1": (1.0, 0.55), "T2": (1.2, 2.2), "FLAIR": (1.1, 1.9)}

# "varied": each modality drawn on its own per lesion, and the faint end kept above
# cortical grey matter: on the shared patients cortex is about as bright as a "wide"
# lesion's faint end (a model trained on such lesions marked cortex as lesion), and the
# real lesions a model missed had modality ratios that one severity moving every
# modality together never produces (figures: bench/results/phantom_contrast.md).
VARIED_LESION_FACTOR = {"T1": (1.0, 0.55), "T2": (1.3, 2.2), "FLAIR": (1.2, 1.7)}

# Grey matter's contrast relative to normal WM, drawn once per transplanted copy of a
# brain (mode "varied-cortex"). Cortex/insula FLAIR brightness varies between scanners
# and sequences, and a model trained on one brain marked the brightest grey matter of
# another as lesion (bench/results/phantom_contrast.md). A brain whose grey matter is
# as bright as a faint lesion, labelled background, makes the network separate lesions
# from cortex by shape and place, not by intensity alone.
CORTEX_FACTOR = {"T2": (1.1, 1.45), "FLAIR": (1.0, 1.3)}

# The parameters of the contrast modes of transplanted lesions -> the keyword arguments
# of transplant(), in the order of the mode names config.TRANSPLANT_CONTRASTS declares
# (synth --contrast, train/reproduce --transplant-masks, transplanted_subjects all look
# a mode up here).
_VARIED = {
    "factors": VARIED_LESION_FACTOR,
    "severity": (0.0, 1.0),
    "per_lesion": True,
    "per_modality": True,
}
TRANSPLANT_CONTRASTS: dict[str, dict] = dict(
    zip(
        CONTRAST_NAMES,
        (
            # typical: one severity per subject in the typical band (FLAIR 1.31-1.41x)
            {"factors": None, "severity": (0.3, 0.8), "per_lesion": False},
            # wide: one severity per lesion, faint (FLAIR 1.1x) to bright (1.9x),
            # modalities coupled
            {"factors": WIDE_LESION_FACTOR, "severity": (0.0, 1.0), "per_lesion": True},
            # varied: per lesion and per modality, faint end above cortex (FLAIR 1.2-1.7x)
            _VARIED,
            # varied-cortex: varied lesions, and the brain's grey matter re-contrasted
            # per copy (CORTEX_FACTOR)
            {**_VARIED, "cortex": CORTEX_FACTOR},
        ),
        strict=True,
    )
)


def transplant_contrast(name: str) -> dict:
    """Keyword arguments of :func:`transplant` for a named contrast mode
    (:data:`TRANSPLANT_CONTRASTS`); ValueError naming the choices otherwise."""
    if name not in TRANSPLANT_CONTRASTS:
        raise ValueError(f"contrast must be one of {sorted(TRANSPLANT_CONTRASTS)}, got {name!r}")
    return dict(TRANSPLANT_CONTRASTS[name])


# Default lesion load: inside the 0.01–0.7 % of the README (declared in SynthConfig)
LESION_FRACTION_RANGE = _DEFAULTS.lesion_fraction


@dataclass
class Phantom:
    """One synthetic subject. images: modality -> (X, Y, Z) float32; mask (X, Y, Z) uint8;
    tissue (X, Y, Z) uint8 anatomy labels; affine (4, 4); lesions: per-lesion records."""

    images: dict[str, np.ndarray]
    mask: np.ndarray
    tissue: np.ndarray
    affine: np.ndarray
    voxel_mm: tuple[float, float, float]
    lesions: list[dict] = field(default_factory=list)

    @property
    def lesion_fraction(self) -> float:
        return float(self.mask.mean())


def _smooth_noise(shape: Sequence[int], scale_vox: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-std random field with features ~``scale_vox`` voxels, float32.

    White noise on a coarse grid (one node per ``scale_vox`` voxels) is interpolated
    with separable Gaussian weights, one small matrix product per axis. That is
    O(voxels × nodes per axis) in BLAS, where a full-resolution Gaussian filter costs
    O(voxels × scale) and scipy's zoom was the slowest step of a phantom.
    """
    scale = max(float(scale_vox), 1.0)
    field = rng.standard_normal([int(np.ceil(n / scale)) + 3 for n in shape]).astype(np.float32)
    for axis, n in enumerate(shape):
        nodes = (np.arange(field.shape[axis]) - 1.5) * scale  # coarse nodes span the axis
        pos = np.arange(n) + 0.5
        w = np.exp(-0.5 * ((pos[:, None] - nodes[None, :]) / scale) ** 2).astype(np.float32)
        w /= w.sum(axis=1, keepdims=True)
        field = np.moveaxis(np.tensordot(w, field, axes=([1], [axis])), 0, axis)
    field -= field.mean()
    field /= field.std() + 1e-8
    return np.ascontiguousarray(field)


def _mni_affine(shape: Sequence[int], voxel_mm: Sequence[float]) -> np.ndarray:
    """MNI-like orientation (x flipped, as FSL's MNI152) of an MNI-sized box."""
    aff = np.diag([-voxel_mm[0], voxel_mm[1], voxel_mm[2], 1.0])
    aff[:3, 3] = [90.0, -126.0, -72.0]
    return aff


def _draw_lesion_fraction(
    rng: np.random.Generator, bounds: Sequence[float] = LESION_FRACTION_RANGE
) -> float:
    lo, hi = bounds
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def make_phantom(
    shape: Sequence[int] = _DEFAULTS.shape,
    rng: np.random.Generator | int | None = None,
    lesion_fraction: float | Sequence[float] | None = None,
    skull_strip: bool = True,
    noise: float = _DEFAULTS.noise,
    bias: float = _DEFAULTS.bias,
) -> Phantom:
    """Synthesise one brain with lesions on a grid of ``shape`` voxels (MNI-sized box).

    Args:
        shape: grid (X, Y, Z); voxel size = 182×218×182 mm / shape, so lesion sizes in
            mm, and lesion *fractions*, are comparable with the real MNI data.
        lesion_fraction: lesion voxels / all voxels, or a (low, high) range drawn
            log-uniformly; default log-uniform in :data:`LESION_FRACTION_RANGE`.
        skull_strip: zero everything outside the brain, as in the shared real data.
        noise: Rician noise sigma relative to white-matter intensity.
        bias: amplitude of the multiplicative bias field (log scale).

    The steps draw from ``rng`` in a fixed order (anatomy, lesions, intensities), so a
    seed gives the same subject.
    """
    rng = np.random.default_rng(rng)
    shape = tuple(int(s) for s in shape)
    vs = tuple(f / s for f, s in zip(MNI_FOV_MM, shape, strict=False))
    grid = _mm_grid(shape, vs)
    tissue, depth = _head_and_cortex(grid, shape, vs, rng)
    vent = _deep_grey_and_ventricles(tissue, depth > 0, grid, shape, rng)
    if lesion_fraction is None:
        lesion_fraction = _draw_lesion_fraction(rng)
    elif not np.isscalar(lesion_fraction):  # a (low, high) range
        lesion_fraction = _draw_lesion_fraction(rng, lesion_fraction)
    mask, severity, lesions = _place_lesions(tissue, depth, vent, vs, lesion_fraction, rng)
    images = _intensities(tissue, mask, severity, depth, vs, noise, bias, skull_strip, rng)
    return Phantom(images, mask.astype(np.uint8), tissue, _mni_affine(shape, vs), vs, lesions)


def _mm_grid(shape, vs):
    """World-ish coordinates in mm, centred on the box (x left-right, y posterior-anterior,
    z inferior-superior), as open grids: memory stays at one volume per expression."""
    x, y, z = (
        ((np.arange(n, dtype=np.float32) + 0.5) * v - f / 2)
        for n, v, f in zip(shape, vs, MNI_FOV_MM, strict=False)
    )
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    return x, y, z - 8.0  # the brain sits above the box centre in MNI space


def _head_and_cortex(grid, shape, vs, rng):
    """Head and brain outline (perturbed ellipsoids), the layers outside the brain, and
    a folded cortical ribbon with sulcal CSF -> (tissue labels, depth below the brain
    surface in mm; > 0 inside the brain)."""
    x, y, z = grid
    s = rng.uniform(0.93, 1.04)
    ax_b = np.array([66.0, 84.0, 60.0]) * s
    rho = np.sqrt((x / ax_b[0]) ** 2 + (y / ax_b[1]) ** 2 + (z / ax_b[2]) ** 2)
    rho = rho + 0.035 * _smooth_noise(shape, 25.0 / vs[0], rng)  # lobes, asymmetry
    depth = (1.0 - rho) * float(ax_b.min())  # approximate distance below the surface, mm
    brain = depth > 0
    tissue = np.zeros(shape, np.uint8)
    # Layers outside the brain, by depth (negative = outside): scalp, skull, CSF.
    tissue[depth > -14.0] = SCALP
    tissue[(depth > -11.0) & (depth <= -3.0)] = SKULL
    tissue[(depth > -3.0) & (depth <= 0.0)] = CSF  # subarachnoid space
    tissue[brain] = WM
    # Cortex: a ribbon 2.5-7 mm thick whose inner edge folds with gyri.
    gyri = _smooth_noise(shape, 6.0 / vs[0], rng)
    thickness = 2.5 + 2.5 * (1.0 + np.tanh(1.5 * gyri))
    tissue[brain & (depth < thickness)] = GM
    # Sulci: thin sheets where a smooth field crosses zero, reaching into the ribbon.
    sulci = _smooth_noise(shape, 7.0 / vs[0], rng)
    tissue[brain & (depth < thickness + 2.0) & (np.abs(sulci) < 0.12)] = CSF
    return tissue, depth


def _deep_grey_and_ventricles(tissue, brain, grid, shape, rng):
    """Thalamus and caudate/putamen, two curved lateral ventricles and the third, written
    into ``tissue`` -> the ventricle mask."""
    x, y, z = grid
    for cx, cy, cz, a, b, c in ((10, -15, 4, 8, 14, 8), (22, 4, 0, 6, 12, 9)):
        for side in (-1, 1):
            e = ((x - side * cx) / a) ** 2 + ((y - cy) / b) ** 2 + ((z - cz) / c) ** 2
            tissue[(e < 1.0) & brain] = DEEP_GM
    atrophy = rng.uniform(0.8, 1.6)  # MS patients' ventricles are often enlarged
    L = 34.0
    yy = np.clip(y / L, -1, 1)
    zc = 14.0 - 10.0 * yy**2  # banana: body high, horns curve down
    rz = (4.0 + 3.0 * (1 - yy**2)) * atrophy**0.5
    rx = 4.5 * atrophy**0.5
    vent = np.zeros(shape, bool)
    for side in (-1, 1):
        vent |= (((x - side * (rx + 1.5)) / rx) ** 2 + ((z - zc) / rz) ** 2 < 1.0) & (np.abs(y) < L)
    vent |= (x / (1.5 * atrophy)) ** 2 + ((y + 5) / 11) ** 2 + ((z - 2) / 8) ** 2 < 1.0  # third
    tissue[vent & brain] = CSF
    return vent


def _place_lesions(tissue, depth, vent, vs, lesion_fraction: float, rng):
    """White-matter lesions until ``lesion_fraction`` of the voxels: 55 % centred within
    10 mm of the ventricles, the rest in deep white matter -> (mask, severity u in [0, 1]
    per lesion voxel, per-lesion records)."""
    shape = tissue.shape
    # Distance to the ventricles in mm (one EDT) places periventricular lesions.
    dist_vent = ndi.distance_transform_edt(~vent, sampling=vs).astype(np.float32)
    wm = tissue == WM
    pools = (np.flatnonzero(wm & (dist_vent < 10.0)), np.flatnonzero(wm & (depth > 4.0)))
    del dist_vent
    target = max(1, int(round(lesion_fraction * np.prod(shape))))
    mask = np.zeros(shape, bool)
    severity = np.zeros(shape, np.float32)
    can_host = (depth > 0) & (tissue != CSF)  # lesions live in parenchyma, not in CSF
    lesions: list[dict] = []
    count = 0
    for _ in range(5000):
        if count >= target or (len(pools[0]) == 0 and len(pools[1]) == 0):
            break
        count += _add_lesion(mask, severity, lesions, pools, can_host, vs, rng)
    return mask, severity, lesions


def _add_lesion(mask, severity, lesions, pools, can_host, vs, rng) -> int:
    """One ovoid lesion with an irregular border, drawn into ``mask``/``severity`` and
    recorded in ``lesions`` -> the number of new lesion voxels."""
    shape = mask.shape
    periv_idx, deep_idx = pools
    periv = (rng.random() < 0.55 and len(periv_idx)) or not len(deep_idx)
    pool = periv_idx if periv else deep_idx
    centre = np.array(np.unravel_index(pool[rng.integers(len(pool))], shape))
    if periv and rng.random() < 0.3:  # confluent periventricular lesion
        diam = float(np.clip(rng.lognormal(np.log(8.0), 0.4), 4.0, 22.0))
    else:  # typical small lesion
        diam = float(np.clip(rng.lognormal(np.log(3.5), 0.45), 1.5, 12.0))
    semi = diam / 2 * rng.uniform(0.7, 1.4, 3)  # ovoid, random elongation
    half = [int(np.ceil(1.3 * a / v)) + 1 for a, v in zip(semi, vs, strict=False)]
    lo = [max(int(c) - h, 0) for c, h in zip(centre, half, strict=False)]
    hi = [min(int(c) + h + 1, n) for c, h, n in zip(centre, half, shape, strict=False)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=False))
    d = [
        ((np.arange(a, b) - c) * v / r)
        for a, b, c, v, r in zip(lo, hi, centre, vs, semi, strict=False)
    ]
    r = np.sqrt(d[0][:, None, None] ** 2 + d[1][None, :, None] ** 2 + d[2][None, None, :] ** 2)
    # Irregular border: perturb the radius with voxel-scale noise.
    bump = ndi.gaussian_filter(rng.standard_normal(r.shape).astype(np.float32), 0.8)
    r = r + 0.15 * bump / (bump.std() + 1e-8)
    blob = (r < 1.0) & can_host[box]
    if not blob.any():
        blob = np.zeros(r.shape, bool)
        blob[tuple(int(c) - a for c, a in zip(centre, lo, strict=False))] = True
    new = blob & ~mask[box]
    u = rng.uniform()
    mask[box] |= blob
    severity[box][new] = u
    lesions.append(
        {
            "centre_vox": centre.tolist(),
            "diameter_mm": round(diam, 2),
            "periventricular": bool(periv),
            "severity": round(u, 3),
        }
    )
    return int(new.sum())


def _intensities(tissue, mask, severity, depth, vs, noise, bias, skull_strip, rng):
    """T1/T2/FLAIR from per-tissue means mixed with partial-volume weights, lesion
    contrast by severity, a smooth bias field and Rician noise -> {modality: image}."""
    shape = tissue.shape
    # Partial-volume weights: smoothed one-hot tissue maps (sigma ~0.6 voxel).
    labels_present = [t for t in range(7) if t != BACKGROUND and (tissue == t).any()]
    frac = {t: ndi.gaussian_filter((tissue == t).astype(np.float32), 0.6) for t in labels_present}
    w_lesion = ndi.gaussian_filter(mask.astype(np.float32), 0.5)
    w_lesion = np.clip(w_lesion * 1.6, 0, 1) * (mask | (w_lesion > 0.3))
    sev = ndi.maximum_filter(severity, size=3)  # carry each lesion's severity to its rim
    head = depth > -14.0
    strip = depth > -2.0  # skull-stripping keeps the brain and the CSF right on it
    images = {}
    for m in MODALITIES:
        means = _TISSUE_MEANS[m] * rng.uniform(0.95, 1.05, 7).astype(np.float32)
        img = np.zeros(shape, np.float32)
        for t in labels_present:
            img += frac[t] * means[t]
        img *= 1.0 + 0.03 * _smooth_noise(shape, 2.0, rng)  # texture
        f0, f1 = LESION_FACTOR[m]
        lesion_val = means[WM] * (f0 + (f1 - f0) * sev)
        img = (1.0 - w_lesion) * img + w_lesion * lesion_val
        img *= np.exp(bias * _smooth_noise(shape, 60.0 / vs[0], rng))
        sigma = noise * means[WM]
        n1 = rng.standard_normal(shape, dtype=np.float32) * sigma
        n2 = rng.standard_normal(shape, dtype=np.float32) * sigma
        img = np.sqrt((img + n1) ** 2 + n2**2)  # magnitude images have Rician noise
        img[~head] = 0.0
        if skull_strip:
            img[~strip] = 0.0
        images[m] = img.astype(np.float32)
    return images


# --------------------------------------------------------------------------------------
# transplant: real lesion masks into real brains
# --------------------------------------------------------------------------------------
def _normal_wm_reference(
    image: dict[str, np.ndarray], brain: np.ndarray, exclude: np.ndarray
) -> tuple[np.ndarray, dict[str, float]]:
    """Approximate normal-appearing WM (bright on T1 among brain voxels) and its median
    per modality. WM is the brightest T1 tissue, so the top 35 % of brain T1 is a
    serviceable WM sample without a segmentation (the same rule as normalize=
    "white-matter": :data:`fasttversky.app.data.transforms.WM_QUANTILE`)."""
    t1 = image["T1"]
    sel = brain & ~exclude
    thr = np.quantile(t1[sel], WM_QUANTILE)
    wm = sel & (t1 >= thr)
    return wm, {m: float(np.median(v[wm])) for m, v in image.items()}


def transplant(
    images: dict[str, np.ndarray],
    own_mask: np.ndarray | None,
    lesion_mask: np.ndarray,
    rng: np.random.Generator | int | None = None,
    *,
    factors: dict[str, tuple[float, float]] | None = None,
    severity: tuple[float, float] = (0.3, 0.8),
    per_lesion: bool = False,
    per_modality: bool = False,
    cortex: dict[str, tuple[float, float]] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Write ``lesion_mask`` into a real brain by changing contrast inside it.

    factors: modality -> (factor at severity 0, at severity 1) relative to normal WM
    (default ``LESION_FACTOR``; :data:`WIDE_LESION_FACTOR` spans faint to bright
    lesions); severity: the uniform range a severity is drawn from; per_lesion: draw
    one severity per connected lesion (26-connectivity) instead of one per subject;
    per_modality: draw each modality's severity independently (real lesions are not
    one-parameter: a lesion can be black on T1 but only moderately bright on FLAIR),
    instead of one severity moving every modality together; cortex: modality ->
    (low, high) range of grey matter's median relative to normal WM, one ratio drawn per
    call and per modality (see :func:`_recontrast_grey_matter`); None leaves grey matter
    as it is (and draws nothing, so the other modes' random streams are unchanged).

    images: modality -> (X, Y, Z) float32 (needs T1 for the WM estimate); own_mask the
    brain's own lesions (kept: the label is their union); lesion_mask (X, Y, Z) on the
    same grid. Inside new lesion voxels each modality becomes factor × normal-WM median
    (FLAIR ~1.35, T2 ~1.65, T1 ~0.78, jittered per subject) plus noise matched to the
    WM texture, blended at the border so there is no hard edge. New lesion voxels are
    restricted to parenchyma (not background or CSF-dark T1), as real lesions are.
    """
    rng = np.random.default_rng(rng)
    if "T1" not in images:
        raise DataError("transplant needs a T1 image to find normal white matter")
    brain = np.zeros(lesion_mask.shape, bool)
    for v in images.values():
        brain |= v != 0
    own = own_mask.astype(bool) if own_mask is not None else np.zeros_like(brain)
    wm, ref = _normal_wm_reference(images, brain, own)
    t1 = images["T1"]
    csf_thr = np.percentile(t1[brain], 20)
    new = lesion_mask.astype(bool) & brain & (t1 > csf_thr) & ~own
    w = np.clip(ndi.gaussian_filter(new.astype(np.float32), 0.6) * 1.6, 0, 1)
    w *= new | (w > 0.3)
    w *= brain
    table = LESION_FACTOR if factors is None else factors
    n_fields = len(images) if per_modality else 1
    u = _severities(new, w, severity, n_fields, per_lesion, rng)
    out = {}
    for k, (m, img) in enumerate(images.items()):
        if m in table:
            f0, f1 = table[m]
            factor = f0 + (f1 - f0) * u[k if per_modality else 0]
        else:  # an unknown extra modality keeps its contrast
            factor = 1.0
        std = float(np.std(img[wm]))
        target = factor * ref[m] + 0.5 * std * rng.standard_normal(img.shape).astype(np.float32)
        out[m] = ((1 - w) * img + w * target).astype(np.float32)
    if cortex:
        lesion = own | (w > 0)
        out = _recontrast_grey_matter(out, brain, lesion, csf_thr, ref, cortex, rng)
    return out, (own | new).astype(np.uint8)


def _severities(new, w, severity, n_fields: int, per_lesion: bool, rng) -> list:
    """The lesion severity of each of ``n_fields`` modality groups: one number per
    subject, or (``per_lesion``) a field holding each lesion's own draw, carried into its
    blurred border (``w`` > 0) by the nearest lesion voxel, so that a border blends
    towards its own lesion's value."""
    if not per_lesion:
        return list(rng.uniform(*severity, size=n_fields))
    labels, n = ndi.label(new, structure=np.ones((3, 3, 3), bool))
    draws = rng.uniform(*severity, size=(n_fields, n + 1))
    u = [np.full(new.shape, d[0], np.float32) for d in draws]
    if n:
        bb = ndi.find_objects((w > 0).astype(np.uint8))[0]
        sub = labels[bb]
        near = ndi.distance_transform_edt(sub == 0, return_distances=False, return_indices=True)
        nearest = sub[tuple(near)]
        for f, d in zip(u, draws, strict=True):
            f[bb] = d[nearest]
    return u


def _recontrast_grey_matter(images, brain, lesion, csf_thr, ref, cortex, rng):
    """Scale grey matter so that its median / normal-WM median becomes a ratio drawn from
    ``cortex[m]`` for each listed modality. Grey matter = parenchyma between the CSF and
    WM T1 thresholds (what transplant's WM estimate leaves), outside lesions; the scale
    fades over ~1 voxel so no edge is drawn, and lesions and WM keep their values."""
    # Cortex is T1 ~0.7x normal WM (bench/results/phantom_contrast.md): below the
    # midpoint 0.85x of the T1 smoothed over ~1 voxel, so neither noisy WM voxels nor WM
    # darker than transplant's top-35 % sample are made lesion-bright as background.
    t1 = ndi.gaussian_filter(images["T1"], 1.0)
    gm = brain & ~lesion & (t1 > csf_thr) & (t1 < 0.85 * ref["T1"])
    if not gm.any():
        return images
    fade = np.clip(ndi.gaussian_filter(gm.astype(np.float32), 0.7) * 1.4, 0, 1)
    fade *= brain & ~lesion & (gm | (fade > 0.3))  # one voxel of fade, not a halo
    out = dict(images)
    for m, (lo, hi) in cortex.items():
        if m not in images:
            continue
        ratio = float(rng.uniform(lo, hi))
        scale = ratio * ref[m] / float(np.median(images[m][gm]))
        out[m] = (images[m] * (1 + (scale - 1) * fade)).astype(np.float32)
    return out


# --------------------------------------------------------------------------------------
# writing datasets
# --------------------------------------------------------------------------------------
def _write_subject(
    folder: Path, images: dict[str, np.ndarray], mask: np.ndarray, affine: np.ndarray
) -> None:
    for m, img in images.items():
        save_volume(folder / f"{m}.nii.gz", img, affine)
    save_volume(folder / "mask.nii.gz", mask.astype(np.uint8), affine)


def write_phantom_dataset(
    out: str | Path,
    n_subjects: int = 4,
    shape: Sequence[int] = _DEFAULTS.shape,
    seed: int = 0,
    progress: Callable | None = None,
    **kwargs,
) -> list[dict]:
    """Write ``n_subjects`` phantoms as ``out/subjectNN/{T1,T2,FLAIR,mask}.nii.gz``.

    Subject i depends only on (seed, i). Returns per-subject statistics, also written
    to ``out/synth.json``. ``progress`` wraps the subject range (e.g. ``tqdm``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats = []
    it = range(n_subjects)
    for i in progress(it) if progress else it:
        ph = make_phantom(shape, np.random.default_rng((seed, i)), **kwargs)
        name = f"subject{i + 1:02d}"
        _write_subject(out / name, ph.images, ph.mask, ph.affine)
        stats.append(
            {
                "subject": name,
                "lesion_fraction": ph.lesion_fraction,
                "n_lesions": len(ph.lesions),
                "voxel_mm": list(ph.voxel_mm),
                "shape": list(shape),
            }
        )
    (out / "synth.json").write_text(
        json.dumps({"mode": "phantom", "seed": seed, "subjects": stats}, indent=1)
    )
    return stats


def lesion_mask_files(
    mask_dir: str | Path, skip_names: Sequence[str] = ()
) -> tuple[list[Path], list[str]]:
    """The .nii/.nii.gz lesion masks of ``mask_dir`` to transplant -> (paths, sorted;
    names of the skipped files). A mask named like one of ``skip_names``
    (``<name>.nii(.gz)``, case-insensitive) is skipped: a brain's own lesions are already
    in it, and a held-out patient's lesion shapes must not reach training. DataError
    when the folder is missing or no mask is left."""
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise DataError(f"transplant masks folder {mask_dir} does not exist")
    banned = {n.lower() for n in skip_names}
    all_masks = sorted(
        p for p in mask_dir.iterdir() if p.name.lower().endswith((".nii", ".nii.gz"))
    )
    kept = [p for p in all_masks if p.name.split(".")[0].lower() not in banned]
    skipped = [p.name for p in all_masks if p not in kept]
    if not kept:
        raise DataError(
            f"{mask_dir}: no .nii/.nii.gz lesion masks found"
            + (f" besides the skipped {', '.join(skipped)}" if skipped else "")
        )
    return kept, skipped


def check_excluded_names(mask_dir: str | Path, exclude: Sequence[str]) -> None:
    """DataError naming every name of ``exclude`` that no mask of ``mask_dir`` is named
    like (``<name>.nii(.gz)``, case-insensitive). Called where a user names held-out
    patients: a misspelt name would otherwise exclude nothing and let that patient's
    own lesion shapes into training without a word."""
    if not exclude:
        return
    stems = {
        p.name.split(".")[0].lower()
        for p in Path(mask_dir).iterdir()
        if p.name.lower().endswith((".nii", ".nii.gz"))
    }
    unknown = [n for n in exclude if n.lower() not in stems]
    if unknown:
        raise DataError(
            f"--exclude-masks: no mask named {', '.join(unknown)} (.nii/.nii.gz) in {mask_dir}; "
            "check the spelling, or that patient's lesions would reach training"
        )


def _transplant_each(brains, mask_files, seeds, options, progress):
    """Mask i of ``mask_files`` transplanted into brain i % len(brains) (Subjects, one
    in memory at a time) with ``np.random.default_rng((*seeds, i))`` -> yields
    (brain, mask path, images dict, label mask, affine)."""
    cache: dict = {}
    it = list(enumerate(mask_files))
    for i, path in progress(it) if progress else it:
        brain = brains[i % len(brains)]
        if brain.name not in cache:
            cache = {brain.name: load_subject(brain)}  # one brain in memory at a time
        img, own, aff = cache[brain.name]
        lm, _ = load_volume(path, kind="mask")
        if lm.shape != img.shape[1:]:
            raise DataError(
                f"{path}: shape {lm.shape} differs from brain {brain.name} {img.shape[1:]}; "
                "masks must be on the brains' grid"
            )
        images, mask = transplant(
            dict(zip(brain.modalities, img, strict=False)),
            own,
            lm,
            np.random.default_rng((*seeds, i)),
            **options,
        )
        yield brain, path, images, mask, aff


def transplanted_subjects(
    brains: Sequence,
    mask_dir: str | Path,
    exclude: Sequence[str] = (),
    *,
    target_shape: Sequence[int] | None = None,
    seed: int | Sequence[int] = 0,
    contrast: str = _DEFAULTS.contrast,
    n: int | None = None,
    progress: Callable | None = None,
    normalisation: tuple[str, int] = ("zscore", 0),
) -> list:
    """The masks of ``mask_dir`` transplanted into ``brains`` (cycling), in memory, as
    extra training subjects (what ``train``/``reproduce --transplant-masks`` add).

    brains: :class:`fasttversky.app.data.Subject` s (read from disk, one at a time);
    exclude: subject names whose mask file (``<name>.nii(.gz)``) must not be used —
    pass the held-out patients; masks named like a brain are skipped too (its own
    lesions are already in it). ``contrast``: a mode of :data:`TRANSPLANT_CONTRASTS`.
    ``n``: a random subset of n masks (drawn from ``seed``) instead of all. ``seed``:
    an int or a tuple of ints (e.g. (seed, fold)); mask i depends only on (seed, i).
    Returns PreparedSubjects named ``<brain>+<mask>``, normalised (``normalisation``:
    ``DataConfig.normalisation``) and cropped to ``target_shape`` like the real ones.
    """
    from .dataset import prepare_arrays  # torch: only when training subjects are built

    if not brains:
        raise ValueError("transplanted_subjects needs at least one brain")
    options = transplant_contrast(contrast)
    files, _ = lesion_mask_files(mask_dir, [*exclude, *(b.name for b in brains)])
    seeds = (seed,) if isinstance(seed, int) else tuple(seed)
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        picks = np.random.default_rng(seeds).choice(len(files), min(n, len(files)), False)
        files = [files[k] for k in picks]
    return [
        prepare_arrays(
            f"{brain.name}+{path.name.split('.')[0]}",
            np.stack(list(images.values())),
            mask,
            aff,
            target_shape,
            normalisation,
        )
        for brain, path, images, mask, aff in _transplant_each(
            list(brains), files, seeds, options, progress
        )
    ]


def write_transplant_dataset(
    out: str | Path,
    brains: str | Path,
    lesion_masks: str | Path,
    n_subjects: int | None = None,
    seed: int = 0,
    progress: Callable | None = None,
    exclude: Sequence[str] = (),
    contrast: str = _DEFAULTS.contrast,
) -> list[dict]:
    """Transplant the masks in ``lesion_masks`` (a folder of NIfTI masks) into the
    subjects of ``brains`` (a dataset folder), cycling through the brains, and write
    them as a dataset (:func:`transplanted_subjects` keeps them in memory instead).

    Output subject ``<brain>_<mask>`` per pair; ``n_subjects`` limits how many (or
    cycles the masks again). Masks must be on the brains' grid (the shared data: both
    in MNI 182×218×182). A mask named like one of the brains (``<name>.nii(.gz)``: that
    brain's own lesions, already in it) or like a name in ``exclude`` (e.g. held-out
    test patients, whose lesion shapes must not reach training) is skipped.
    ``contrast``: a mode of :data:`TRANSPLANT_CONTRASTS`.
    """
    options = transplant_contrast(contrast)
    out = Path(out)
    subjects = find_subjects(brains, DEFAULT_MODALITIES, require_mask=False)
    mask_files, skipped = lesion_mask_files(
        lesion_masks, [s.name for s in subjects] + list(exclude)
    )
    check_excluded_names(lesion_masks, exclude)
    n = len(mask_files) if n_subjects is None else int(n_subjects)
    stats = []
    files = [mask_files[i % len(mask_files)] for i in range(n)]
    for brain, mpath, images, mask, aff in _transplant_each(
        subjects, files, (seed,), options, progress
    ):
        name = f"{brain.name}_{mpath.name.split('.')[0]}"
        _write_subject(out / name, images, mask, aff)
        stats.append(
            {
                "subject": name,
                "brain": brain.name,
                "lesion_mask": mpath.name,
                "lesion_fraction": float(mask.mean()),
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "synth.json").write_text(
        json.dumps(
            {
                "mode": "transplant",
                "seed": seed,
                "contrast": contrast,
                "skipped_masks": skipped,
                "subjects": stats,
            },
            indent=1,
        )
    )
    return stats

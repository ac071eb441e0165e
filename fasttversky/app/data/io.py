"""Finding and reading subjects: a dataset is a folder with one sub-folder per subject.

Every subject folder holds one NIfTI file per modality (T1, T2, FLAIR by default) and,
for training and evaluation, one lesion mask. Files are matched by case-insensitive
shell-style patterns on the file name without its ``.nii``/``.nii.gz`` extension, so
``T1.nii.gz``, ``t1.nii`` and (with ``--t1 '*_T1w'``) ``sub-01_T1w.nii.gz`` are found.

Sub-folders that hold none of the modality files are not subjects and are skipped;
this is what lets ``open_ms_data/masks/`` (a folder of extra lesion masks) sit beside
the patients. A folder that holds some modalities but not all is an error: it is a
broken subject, not an unrelated folder.

Everything that can go wrong with a file raises :class:`DataError` naming the file
and what is wrong, before any training starts.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import DEFAULT_MASK_PATTERN, DEFAULT_MODALITIES
from ..errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")

# Affines written by different tools differ in the last float32 digits; a real
# mismatch (another space, flipped axis, other voxel size) is far above this.
_AFFINE_ATOL = 1e-3


def _stem(path: Path) -> str | None:
    """File name without a NIfTI suffix, or None if the file is not NIfTI."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _match(files: Sequence[Path], pattern: str) -> list[Path]:
    pat = pattern.lower()
    return [f for f in files if (s := _stem(f)) is not None and fnmatch.fnmatchcase(s.lower(), pat)]


@dataclass(frozen=True)
class Subject:
    """One subject's files. ``images`` maps modality name -> path, in channel order."""

    name: str
    images: dict[str, Path]
    mask: Path | None = None
    folder: Path | None = field(default=None, compare=False)

    @property
    def modalities(self) -> list[str]:
        return list(self.images)


def find_subject(
    folder: str | Path,
    modalities: Mapping[str, str] | None = None,
    mask_pattern: str | None = DEFAULT_MASK_PATTERN,
    require_mask: bool = True,
) -> Subject | None:
    """Match the files of one subject folder; None if it holds none of the modalities.

    ``modalities`` maps channel name -> pattern (default T1/T2/FLAIR); the channel order
    of the images is the mapping's order. ``mask_pattern=None`` ignores masks (predict).
    """
    folder = Path(folder)
    modalities = dict(modalities or DEFAULT_MODALITIES)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    images: dict[str, Path] = {}
    missing: list[str] = []
    for name, pattern in modalities.items():
        hits = _match(files, pattern)
        if len(hits) > 1:
            raise DataError(
                f"{folder}: pattern {pattern!r} for {name} matches several files: "
                + ", ".join(h.name for h in hits)
                + " (make the pattern more specific)"
            )
        if hits:
            images[name] = hits[0]
        else:
            missing.append(f"{name} ({pattern!r})")
    if not images:
        return None
    if missing:
        raise DataError(
            f"{folder}: no file for " + ", ".join(missing) + f"; found {[f.name for f in files]}"
        )
    mask = None
    if mask_pattern is not None:
        hits = [h for h in _match(files, mask_pattern) if h not in images.values()]
        if len(hits) > 1:
            raise DataError(
                f"{folder}: mask pattern {mask_pattern!r} matches several files: "
                + ", ".join(h.name for h in hits)
            )
        if hits:
            mask = hits[0]
        elif require_mask:
            raise DataError(f"{folder}: no lesion mask matching {mask_pattern!r}")
    return Subject(name=folder.name, images=images, mask=mask, folder=folder)


def find_subjects(
    root: str | Path,
    modalities: Mapping[str, str] | None = None,
    mask_pattern: str | None = DEFAULT_MASK_PATTERN,
    require_mask: bool = True,
) -> list[Subject]:
    """All subjects under ``root`` (one sub-folder each), sorted by folder name.

    Sub-folders with none of the modality files (e.g. ``open_ms_data/masks``) are
    skipped. Raises :class:`DataError` if ``root`` is missing or holds no subject.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist or is not a folder")
    subjects = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        s = find_subject(folder, modalities, mask_pattern, require_mask)
        if s is not None:
            subjects.append(s)
    if not subjects:
        pats = dict(modalities or DEFAULT_MODALITIES)
        raise DataError(
            f"{root}: no subject folder found (expected sub-folders holding files "
            f"matching {pats} with suffix .nii or .nii.gz)"
        )
    return subjects


_OS_REASONS = {
    FileNotFoundError: "no such file",
    PermissionError: "permission denied",
    IsADirectoryError: "a folder, not a file",
}


def load_volume(path: str | Path, *, kind: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Read one 3-D NIfTI volume -> (array (X, Y, Z), affine (4, 4) float64).

    Images come back as float32 and must be finite and not all zero (``kind="prob"``:
    float32, finite, may be all zero — a probability map); masks
    (``kind="mask"``) as uint8 {0, 1}: every voxel must be exactly 0 or 1 (any other
    value is a DataError naming the file), and may be empty — a subject without
    lesions is valid. A trailing axis of length 1 (X, Y, Z, 1), as
    some converters write, is dropped; any other 4-D volume is an error.
    """
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        reason = _OS_REASONS[type(e)]
        raise DataError(f"{path}: cannot read ({reason})") from e
    except Exception as e:  # nibabel/gzip/numpy raise many types for broken files
        # Their text (byte offsets, header fields) does not tell a user what to do.
        raise DataError(
            f"{path}: cannot read as NIfTI (not a .nii/.nii.gz image, or truncated or "
            "corrupt); re-export or copy the file again"
        ) from e
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {tuple(img.shape)}")
    if data.size == 0:
        raise DataError(f"{path}: volume has no voxels (shape {data.shape})")
    affine = np.asarray(img.affine, dtype=np.float64)
    if kind == "mask":
        data = np.asarray(data, dtype=np.float32)
        if not np.isfinite(data).all():
            raise DataError(f"{path}: mask contains non-finite values")
        # Exactly 0 and 1 only: a label map ({0, 1, 2}), a soft/resampled mask (0.5) or
        # a signed one is not a lesion mask, and binarising it silently would train on
        # (or score against) something other than what the user has.
        binary = (data == 0) | (data == 1)
        if not binary.all():
            bad = np.unique(data[~binary])
            shown = ", ".join(f"{v:g}" for v in bad[:5]) + (", ..." if len(bad) > 5 else "")
            raise DataError(
                f"{path}: lesion mask is not binary: {int((~binary).sum())} voxel(s) hold "
                f"values other than 0 and 1 ({shown}); write the mask as 0 = background, "
                "1 = lesion"
            )
        return data.astype(np.uint8), affine
    data = np.asarray(data, dtype=np.float32)
    finite = np.isfinite(data)
    if not finite.all():
        raise DataError(f"{path}: {int((~finite).sum())} non-finite voxel value(s) (NaN/inf)")
    if kind == "image" and not data.any():
        raise DataError(f"{path}: volume is empty (all voxels are zero)")
    return data, affine


def _describe_difference(a: np.ndarray, b: np.ndarray) -> str:
    zooms_a = np.sqrt((a[:3, :3] ** 2).sum(0))
    zooms_b = np.sqrt((b[:3, :3] ** 2).sum(0))
    parts = []
    if not np.allclose(zooms_a, zooms_b, atol=_AFFINE_ATOL):
        parts.append(
            f"voxel sizes {np.round(zooms_a, 4).tolist()} vs {np.round(zooms_b, 4).tolist()}"
        )
    if not np.allclose(a[:3, 3], b[:3, 3], atol=_AFFINE_ATOL):
        parts.append(
            f"origins {np.round(a[:3, 3], 3).tolist()} vs {np.round(b[:3, 3], 3).tolist()}"
        )
    if not parts:
        parts.append("orientation (direction cosines)")
    return "; ".join(parts)


def load_subject(subject: Subject) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Read a subject -> (image (C, X, Y, Z) float32, mask (X, Y, Z) uint8 or None, affine).

    All files must share shape and affine (same voxel grid); otherwise DataError names
    the two files and what differs (shape, voxel size, origin or orientation).
    """
    volumes = []
    ref_path = ref_shape = ref_affine = None
    entries = [(p, "image") for p in subject.images.values()]
    if subject.mask is not None:
        entries.append((subject.mask, "mask"))
    mask = None
    for path, kind in entries:
        data, affine = load_volume(path, kind=kind)
        if ref_path is None:
            ref_path, ref_shape, ref_affine = path, data.shape, affine
        elif data.shape != ref_shape:
            raise DataError(
                f"subject {subject.name}: {path.name} has shape {data.shape} but "
                f"{ref_path.name} has {ref_shape}; all files of a subject must share one grid"
            )
        elif not np.allclose(affine, ref_affine, atol=_AFFINE_ATOL):
            raise DataError(
                f"subject {subject.name}: affine of {path.name} differs from {ref_path.name} "
                f"({_describe_difference(affine, ref_affine)}); register/resample them first"
            )
        if kind == "mask":
            mask = data
        else:
            volumes.append(data)
    return np.stack(volumes), mask, ref_affine


def save_volume(path: str | Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write a 3-D array as NIfTI with the given affine (qform and sform both set)."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path

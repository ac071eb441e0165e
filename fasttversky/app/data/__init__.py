"""NIfTI datasets (one folder per subject), normalisation, patches, and lesion phantoms.

Entry points: :func:`find_subjects`, :func:`load_subject`, :func:`prepare_subject`,
:class:`LesionDataset`, :func:`batch_iterator`; phantoms in :mod:`fasttversky.app.data.synth`.
"""

from .dataset import (
    LesionDataset,
    PaddedBatches,
    PreparedSubject,
    RandomBatches,
    batch_iterator,
    prepare_arrays,
    prepare_subject,
)
from .io import (
    DEFAULT_MASK_PATTERN,
    DEFAULT_MODALITIES,
    DataError,
    Subject,
    find_subject,
    find_subjects,
    load_subject,
    load_volume,
    save_volume,
)
from .transforms import (
    CropInfo,
    apply_crop,
    brain_mask,
    crop_or_pad_info,
    normalise_in_brain,
    pad_to_multiple,
    undo_crop,
    white_matter_ratio,
    zscore_in_brain,
)

__all__ = [
    "DEFAULT_MASK_PATTERN",
    "DEFAULT_MODALITIES",
    "CropInfo",
    "DataError",
    "LesionDataset",
    "PaddedBatches",
    "PreparedSubject",
    "RandomBatches",
    "Subject",
    "apply_crop",
    "batch_iterator",
    "brain_mask",
    "crop_or_pad_info",
    "find_subject",
    "find_subjects",
    "load_subject",
    "load_volume",
    "normalise_in_brain",
    "pad_to_multiple",
    "prepare_arrays",
    "prepare_subject",
    "save_volume",
    "undo_crop",
    "white_matter_ratio",
    "zscore_in_brain",
]

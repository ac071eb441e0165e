"""nnU-Net's region tables (``label_manager.foreground_regions``), checked once, and the
region masks its data pipeline builds from a label map.

A region is a label or a set of labels; a voxel belongs to region r when its label is
one of region r's. nnU-Net's ``ConvertSegmentationToRegionsTransform`` turns the label
map into one bool channel per region (plus, with an ignore label, a last channel that
is True on ignored voxels). The fused losses read the label map and the table instead;
:func:`region_masks` builds nnU-Net's channels for the slower path, for the validation
metrics of the trainers, and for tests.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

import fasttversky
from fasttversky.errors import InvalidInputTypeError

Regions = tuple[tuple[int, ...], ...]


def _label(value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise InvalidInputTypeError(f"regions: a label must be an int, got {value!r}")
    if value < 0:
        raise fasttversky.InvalidInputError(
            f"regions: label {value} does not exist (labels are >= 0)"
        )
    return int(value)


def check_regions(regions, ignore_label: int | None) -> Regions:
    """``regions`` (a sequence of labels or of sequences of labels) as a tuple of tuples.

    Raises, naming the argument, for an empty table or region, a label that is not an
    int >= 0, and a region naming ``ignore_label`` or a label above it (nnU-Net's ignore
    label is the largest label value: there is no label above it).
    """
    if isinstance(regions, (str, bytes, torch.Tensor)) or not hasattr(regions, "__len__"):
        raise InvalidInputTypeError(
            f"regions must be a list or tuple of labels or label tuples, got {regions!r}"
        )
    if len(regions) == 0:
        raise fasttversky.InvalidInputError("regions is empty")
    table = []
    for r, region in enumerate(regions):
        labels = region if isinstance(region, (list, tuple)) else (region,)
        if len(labels) == 0:
            raise fasttversky.InvalidInputError(f"regions[{r}] is empty")
        labels = tuple(_label(v) for v in labels)
        if ignore_label is not None and max(labels) >= ignore_label:
            what = "is the ignore label" if ignore_label in labels else "does not exist"
            bad = ignore_label if ignore_label in labels else max(labels)
            raise fasttversky.InvalidInputError(
                f"regions[{r}] names label {bad}, which {what} (ignore_label={ignore_label}; "
                f"labels are 0..{ignore_label - 1})"
            )
        table.append(labels)
    return tuple(table)


def region_masks(labels: torch.Tensor, regions: Regions, ignore_label=None) -> torch.Tensor:
    """nnU-Net's region target: (B, R[+1], *spatial) bool from a (B, 1, *spatial) label
    map, channel r True where the label is in region r, and with ``ignore_label`` a last
    channel True where the label is ``ignore_label`` (what nnU-Net's
    ``ConvertSegmentationToRegionsTransform`` gives its loss)."""
    lab = labels.to(torch.uint8) if labels.dtype == torch.bool else labels
    sets = list(regions) + ([(ignore_label,)] if ignore_label is not None else [])
    chans = [torch.isin(lab, torch.tensor(s, dtype=lab.dtype, device=lab.device)) for s in sets]
    return torch.cat(chans, 1)

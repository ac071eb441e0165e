"""Sliding-window inference (Gaussian weighting, mirroring TTA), brain restriction and
small-component removal, each against an independent reference computation."""

from __future__ import annotations

import itertools
from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch import nn

from fasttversky.app.config import PredictConfig
from fasttversky.app.training import predict
from fasttversky.app.training.inference import (
    lesion_mask,
    remove_small_components,
    segment_volume,
)
from fasttversky.app.training.predict import gaussian_weights

pytestmark = pytest.mark.usefixtures("one_thread")


class _Voxelwise(nn.Module):
    """1×1×1 conv: each voxel's logits depend on that voxel only (no context)."""

    levels = 1

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv3d(2, 2, 1).double()

    def forward(self, x):
        return self.conv(x)


class _WindowMean(nn.Module):
    """Logits that depend on the whole window: channel-0 mean of the input window,
    added to a voxelwise term, so every window gives a different value per voxel."""

    levels = 1

    def forward(self, x):
        m = x[:, :1].mean(dim=(2, 3, 4), keepdim=True)
        return torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:2] + 3 * m], dim=1)


class _Shifted(nn.Module):
    """Not mirror-symmetric: the logit at a voxel is the input at its +1 neighbour
    along D and W (circular shift)."""

    levels = 1

    def forward(self, x):
        y = torch.roll(x[:, :1], shifts=(-1, -1), dims=(2, 4))
        return torch.cat([torch.zeros_like(y), y], dim=1)


def _image(seed, shape=(2, 11, 13, 9)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("weighting", ["gaussian", "uniform"])
def test_windows_of_a_voxelwise_model_equal_the_whole_volume(seed, weighting):
    model = _Voxelwise(seed)
    image = _image(seed)
    whole = predict(model, image)
    tiled = predict(model, image, window=(5, 6, 4), overlap=0.5, weighting=weighting)
    # A weighted mean of identical values is that value (up to float32 rounding).
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-6)


def _reference_gaussian(n, sigma_scale):
    # Independent formula: the product of 1-D normal densities, scaled to max 1.
    axes = [np.exp(-0.5 * ((np.arange(k) - (k - 1) / 2) / (sigma_scale * k)) ** 2) for k in n]
    w = np.einsum("i,j,k->ijk", *axes)
    return np.maximum(w / w.max(), 1e-3)


@pytest.mark.parametrize("window", [(5, 6, 4), (7, 7, 7), (3, 8, 5)])
def test_gaussian_weights_match_the_formula(window):
    got = gaussian_weights(window, 0.125).double().numpy()
    np.testing.assert_allclose(got, _reference_gaussian(window, 0.125), rtol=1e-6)
    assert got.max() == pytest.approx(1.0) and got.min() > 0


@pytest.mark.parametrize("seed", range(3))
def test_gaussian_windows_equal_a_reference_weighted_mean(seed):
    model = _WindowMean()
    image = _image(seed, (2, 10, 12, 9))
    window, overlap = (4, 5, 4), 0.5
    got = predict(model, image, window=window, overlap=overlap, weighting="gaussian")
    # Reference: every window start (step = window/2, last one flush with the end),
    # each window's probabilities times its Gaussian map, summed and normalised.
    size = image.shape[1:]
    w = _reference_gaussian(window, 0.125)
    num = np.zeros(size)
    den = np.zeros(size)
    starts = []
    for s, k in zip(size, window, strict=True):
        st = list(range(0, s - k + 1, max(1, int(k * (1 - overlap)))))
        if st[-1] != s - k:
            st.append(s - k)
        starts.append(st)
    for z, y, x in itertools.product(*starts):
        sl = (slice(z, z + window[0]), slice(y, y + window[1]), slice(x, x + window[2]))
        patch = image[(slice(None), *sl)]
        logit = patch[1] + 3 * patch[0].mean()
        p = torch.sigmoid(logit).numpy()  # softmax of (0, logit) = sigmoid(logit)
        num[sl] += p * w
        den[sl] += w
    np.testing.assert_allclose(got.numpy(), num / den, rtol=0, atol=2e-6)
    # and it differs from the uniform mean (the test could fail)
    uni = predict(model, image, window=window, overlap=overlap, weighting="uniform")
    assert (uni - got).abs().max() > 1e-3


@pytest.mark.parametrize("axes", [(0,), (0, 2), (0, 1, 2)])
def test_mirroring_of_a_symmetric_model_changes_nothing(axes):
    model = _Voxelwise(1)
    image = _image(4)
    plain = predict(model, image)
    torch.testing.assert_close(predict(model, image, mirror_axes=axes), plain, rtol=0, atol=1e-6)


def test_mirroring_averages_the_flipped_predictions():
    model = _Shifted()
    image = _image(5)
    got = predict(model, image, mirror_axes=(0, 2))
    # Reference: mean over the 4 subsets of {D, W} of flip(p(flip(x))).
    ref = 0
    for dims in [(), (1,), (3,), (1, 3)]:
        x = torch.flip(image, dims) if dims else image
        p = torch.sigmoid(torch.roll(x[:1], shifts=(-1, -1), dims=(1, 3)))[0]
        ref = ref + (torch.flip(p, [d - 1 for d in dims]) if dims else p)
    torch.testing.assert_close(got, (ref / 4).float(), rtol=0, atol=1e-6)
    assert (got - predict(model, image)).abs().max() > 1e-2  # mirroring did something


def _blobs(rng, shape, sizes):
    """Non-touching axis-aligned boxes of the given voxel counts (1×1×n rods), placed
    on a grid of cells so no two are 26-connected; returns (mask, list of boxes)."""
    mask = np.zeros(shape, bool)
    cells = [(z, y) for z in range(0, shape[0] - 1, 2) for y in range(0, shape[1] - 1, 2)]
    picks = rng.choice(len(cells), size=len(sizes), replace=False)
    boxes = []
    for n, k in zip(sizes, picks, strict=True):
        z, y = cells[k]
        x0 = int(rng.integers(0, shape[2] - n + 1))
        mask[z, y, x0 : x0 + n] = True
        boxes.append((z, y, x0, n))
    return mask, boxes


@pytest.mark.parametrize("seed", range(5))
def test_remove_small_components_keeps_exactly_the_large_ones(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 9, size=int(rng.integers(3, 12))).tolist()
    mask, boxes = _blobs(rng, (12, 12, 10), sizes)
    min_size = int(rng.integers(2, 7))
    expect = np.zeros_like(mask)
    for z, y, x0, n in boxes:
        if n >= min_size:
            expect[z, y, x0 : x0 + n] = True
    got = remove_small_components(mask.astype(np.uint8), min_size)
    assert got.dtype == bool
    np.testing.assert_array_equal(got, expect)
    np.testing.assert_array_equal(remove_small_components(mask, 0), mask)


def test_segment_volume_restricts_to_the_brain_and_follows_the_config():
    model = _Voxelwise(2)
    image = _image(6).float()
    image[:, :3] = 0  # background slab: 0 in every channel
    config = PredictConfig(window=[5, 6, 4], mirror="lr", threshold=0.3, min_lesion_size=2)
    prob, mask = segment_volume(model, image.numpy(), config)
    assert prob.shape == mask.shape == tuple(image.shape[1:])
    assert prob.dtype == np.float32 and mask.dtype == np.uint8
    assert (prob[:3] == 0).all() and not mask[:3].any()
    full = predict(model, image, window=(5, 6, 4), mirror_axes=(0,)).numpy()
    np.testing.assert_array_equal(prob[3:], full[3:])
    np.testing.assert_array_equal(mask, remove_small_components(prob >= 0.3, 2))
    np.testing.assert_array_equal(mask, lesion_mask(prob, config))
    assert PredictConfig(**asdict(config)) == config
    # to_grid maps the probability before thresholding: the mask is the mapped one's.
    pad = lambda v: np.pad(v, ((1, 0), (0, 0), (0, 0)))  # noqa: E731
    prob2, mask2 = segment_volume(model, image.numpy(), config, to_grid=pad)
    np.testing.assert_array_equal(prob2, pad(prob))
    np.testing.assert_array_equal(mask2, lesion_mask(pad(prob), config))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window=(4, 4)), "window"),
        (dict(overlap=1.0), "overlap"),
        (dict(weighting="median"), "weighting"),
        (dict(mirror="xy"), "mirror"),
        (dict(threshold=0.0), "threshold"),
        (dict(threshold=1.0), "threshold"),
        (dict(min_lesion_size=-1), "min_lesion_size"),
    ],
)
def test_options_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PredictConfig(**kwargs)

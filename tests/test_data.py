"""fasttversky.app.data: subject discovery, validation errors, normalisation, crop/pad,
patches, the torch Dataset, and the shared real MS data loading as-is."""

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from fasttversky.app.data import (
    DataError,
    LesionDataset,
    RandomBatches,
    apply_crop,
    batch_iterator,
    crop_or_pad_info,
    find_subjects,
    load_subject,
    normalise_in_brain,
    prepare_subject,
    undo_crop,
    white_matter_ratio,
    zscore_in_brain,
)
from fasttversky.app.data.transforms import WM_QUANTILE, WM_UNIT

SHAPE = (12, 14, 10)
AFFINE = np.diag([-1.5, 1.5, 1.5, 1.0])


def _write(path, data, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def _volume(seed, shape=SHAPE):
    rng = np.random.default_rng(seed)
    v = np.zeros(shape, np.float32)
    v[2:-2, 2:-2, 2:-2] = rng.uniform(100, 200, (shape[0] - 4, shape[1] - 4, shape[2] - 4))
    return v


def _subject(root, name, names=("T1", "T2", "FLAIR", "mask"), suffix=".nii.gz", shape=SHAPE):
    for k, n in enumerate(names):
        if "mask" in n.lower() or "lesion" in n.lower():
            m = np.zeros(shape, np.uint8)
            m[5:7, 6:8, 4:6] = 1
            _write(root / name / f"{n}{suffix}", m)
        else:
            _write(root / name / f"{n}{suffix}", _volume(k, shape))
    return root / name


# --------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------
def test_find_subjects_patterns_case_and_suffix(tmp_path):
    _subject(tmp_path, "b", names=("t1", "T2", "flair", "Mask"), suffix=".nii")
    _subject(tmp_path, "a")
    (tmp_path / "notes").mkdir()  # a folder without images is not a subject
    _write(tmp_path / "notes" / "lesions.nii.gz", np.zeros(SHAPE, np.uint8))
    subs = find_subjects(tmp_path)
    assert [s.name for s in subs] == ["a", "b"]
    assert subs[1].modalities == ["T1", "T2", "FLAIR"]
    assert subs[1].images["FLAIR"].name == "flair.nii" and subs[1].mask.name == "Mask.nii"


def test_custom_patterns(tmp_path):
    _subject(tmp_path, "sub-01", names=("sub-01_T1w", "sub-01_FLAIR", "sub-01_lesions"))
    subs = find_subjects(tmp_path, {"T1": "*_t1w", "FLAIR": "*_flair"}, "*lesions")
    img, mask, _ = load_subject(subs[0])
    assert img.shape == (2, *SHAPE) and img.dtype == np.float32
    assert mask.dtype == np.uint8 and mask.sum() == 8


def test_missing_modality_or_mask_is_an_error(tmp_path):
    _subject(tmp_path, "s1", names=("T1", "FLAIR", "mask"))
    with pytest.raises(DataError, match=r"no file for T2"):
        find_subjects(tmp_path)
    _subject(tmp_path / "x", "s2", names=("T1", "T2", "FLAIR"))
    with pytest.raises(DataError, match="no lesion mask"):
        find_subjects(tmp_path / "x")
    assert find_subjects(tmp_path / "x", require_mask=False)[0].mask is None


def test_ambiguous_pattern_is_an_error(tmp_path):
    _subject(tmp_path, "s1")
    _write(tmp_path / "s1" / "t1.nii", _volume(0))  # T1.nii.gz and t1.nii
    with pytest.raises(DataError, match="several files"):
        find_subjects(tmp_path)


def test_empty_or_missing_dataset(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        find_subjects(tmp_path / "nope")
    with pytest.raises(DataError, match="no subject folder"):
        find_subjects(tmp_path)


# --------------------------------------------------------------------------------------
# bad volumes: every case names the file and the problem
# --------------------------------------------------------------------------------------
def _load_one(tmp_path):
    return load_subject(find_subjects(tmp_path)[0])


def test_shape_mismatch_names_files(tmp_path):
    d = _subject(tmp_path, "s1")
    _write(d / "T2.nii.gz", _volume(1, (12, 14, 11)))
    with pytest.raises(DataError, match=r"T2\.nii\.gz has shape \(12, 14, 11\) but T1\.nii\.gz"):
        _load_one(tmp_path)


@pytest.mark.parametrize(
    "change, what",
    [
        (lambda a: np.diag([-1.5, 1.5, 2.0, 1.0]), "voxel sizes"),
        (lambda a: np.concatenate([a[:, :3], [[5.0], [0], [0], [1]]], axis=1), "origins"),
        (lambda a: np.diag([1.5, 1.5, 1.5, 1.0]), "orientation"),
    ],
)
def test_affine_mismatch_says_what_differs(tmp_path, change, what):
    d = _subject(tmp_path, "s1")
    _write(d / "FLAIR.nii.gz", _volume(2), affine=change(AFFINE))
    with pytest.raises(
        DataError, match=rf"affine of FLAIR\.nii\.gz differs from T1\.nii\.gz.*{what}"
    ):
        _load_one(tmp_path)


def test_unreadable_file(tmp_path):
    d = _subject(tmp_path, "s1")
    (d / "T2.nii.gz").write_bytes(b"this is not a nifti file")
    with pytest.raises(DataError, match=r"T2\.nii\.gz: cannot read as NIfTI"):
        _load_one(tmp_path)


def test_four_d_volume(tmp_path):
    d = _subject(tmp_path, "s1")
    _write(d / "T1.nii.gz", np.stack([_volume(0)] * 2, axis=-1))
    with pytest.raises(
        DataError, match=r"T1\.nii\.gz: expected a 3-D volume, got shape \(12, 14, 10, 2\)"
    ):
        _load_one(tmp_path)


def test_trailing_singleton_axis_is_accepted(tmp_path):
    d = _subject(tmp_path, "s1")
    _write(d / "T1.nii.gz", _volume(0)[..., None])
    img, _, _ = _load_one(tmp_path)
    assert img.shape == (3, *SHAPE)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_volume(tmp_path, bad):
    d = _subject(tmp_path, "s1")
    v = _volume(1)
    v[3, 3, 3] = bad
    _write(d / "FLAIR.nii.gz", v)
    with pytest.raises(DataError, match=r"FLAIR\.nii\.gz: 1 non-finite voxel"):
        _load_one(tmp_path)


def test_empty_volume(tmp_path):
    d = _subject(tmp_path, "s1")
    _write(d / "T2.nii.gz", np.zeros(SHAPE, np.float32))
    with pytest.raises(DataError, match=r"T2\.nii\.gz: volume is empty"):
        _load_one(tmp_path)


def test_empty_mask_is_valid(tmp_path):
    d = _subject(tmp_path, "s1")
    _write(d / "mask.nii.gz", np.zeros(SHAPE, np.uint8))
    _, mask, _ = _load_one(tmp_path)
    assert mask.sum() == 0


def test_cli_reports_data_errors(tmp_path, capsys):
    from fasttversky.app.cli import main

    d = _subject(tmp_path / "data", "s1")
    _write(d / "T2.nii.gz", np.zeros(SHAPE, np.float32))
    assert (
        main(["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--steps", "1"]) == 1
    )
    assert "T2.nii.gz: volume is empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    "values",
    [[0, 2], [0, 1, 2], [0, 0.5], [0, -1], [0, 1, -1]],
    ids=["0-2", "0-1-2", "half", "negative", "0-1-neg"],
)
def test_non_binary_mask_is_an_error_naming_the_file(tmp_path, values):
    """A label map, soft or signed mask is refused, not silently binarised at 0.5."""
    d = _subject(tmp_path, "s1")
    mask = np.zeros(SHAPE, np.float32)
    for k, v in enumerate(values[1:]):
        mask[k, 0, 0] = v
    _write(d / "mask.nii.gz", mask)
    with pytest.raises(DataError, match=r"mask\.nii\.gz: lesion mask is not binary") as e:
        _load_one(tmp_path)
    for v in values:
        if v not in (0, 1):
            assert f"{v:g}" in str(e.value)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.float64])
def test_binary_mask_of_any_dtype_loads(tmp_path, dtype):
    d = _subject(tmp_path, "s1")
    mask = np.zeros(SHAPE, dtype)
    mask[1:3, 2:4, 1] = 1
    _write(d / "mask.nii.gz", mask)
    _, got, _ = _load_one(tmp_path)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, mask.astype(np.uint8))


# --------------------------------------------------------------------------------------
# transforms and dataset
# --------------------------------------------------------------------------------------
def test_zscore_inside_brain_only():
    img = np.stack([_volume(0) * 3 + 10 * (_volume(0) != 0), _volume(1)])
    out = zscore_in_brain(img)
    brain = (img != 0).any(0)
    for c in range(2):
        assert out[c][brain].mean() == pytest.approx(0, abs=1e-5)
        assert out[c][brain].std() == pytest.approx(1, abs=1e-4)
        assert np.all(out[c][~brain] == 0)


def _tissue_brain(seed, shape=(20, 22, 18)):
    """Three tissues with known intensities (T1, FLAIR): WM (100, 50), cortex (60, 55),
    CSF (20, 10), WM the largest (45 % of the brain, so above T1's 65 % quantile), plus
    noise; background 0. Returns image (2, X, Y, Z), tissue labels (0 = background)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int64)
    inner = labels[2:-2, 2:-2, 2:-2]
    inner[...] = rng.choice([1, 2, 3], size=inner.shape, p=[0.45, 0.35, 0.20])
    means = np.array([[0, 0], [100, 50], [60, 55], [20, 10]], np.float64)
    img = means[labels].transpose(3, 0, 1, 2) * rng.uniform(0.98, 1.02, (2, *shape))
    return img.astype(np.float32), labels


@pytest.mark.parametrize("seed", range(3))
def test_white_matter_ratio_puts_each_tissue_on_its_ratio_to_wm(seed):
    img, labels = _tissue_brain(seed)
    out = white_matter_ratio(img, reference=0)
    assert out.dtype == np.float32 and np.all(out[:, labels == 0] == 0)
    # Expected: each tissue's mean over WM's mean, in WM_UNIT (noise is +-2 %).
    for c, (wm, gm, csf) in enumerate([(100, 60, 20), (50, 55, 10)]):
        for tissue, value in ((1, wm), (2, gm), (3, csf)):
            got = float(np.median(out[c][labels == tissue])) * WM_UNIT
            assert got == pytest.approx(value / wm, rel=0.03), (c, tissue)
    # The WM set is the top (1 - WM_QUANTILE) of T1: an oracle in float64.
    brain = labels > 0
    t1 = img[0][brain].astype(np.float64)
    wm = t1 >= np.quantile(t1, WM_QUANTILE)
    for c in range(2):
        vals = img[c][brain].astype(np.float64)
        want = (vals / (np.median(vals[wm]) * WM_UNIT)).astype(np.float32)
        np.testing.assert_array_equal(out[c][brain], want)


def test_white_matter_ratio_is_blind_to_each_scans_scale_and_tissue_mix():
    """What the mode is for: a second scan with other scanner units per modality and
    more CSF (atrophy) gives the same values for the same tissue; a z-score does not."""
    a, la = _tissue_brain(0)
    rng = np.random.default_rng(5)
    b, lb = _tissue_brain(1)
    # more CSF: a third of b's cortex becomes CSF (T1 20, FLAIR 10, same noise level)
    flip = (lb == 2) & (rng.random(lb.shape) < 0.33)
    b[:, flip] = np.array([20, 10], np.float32)[:, None] * rng.uniform(0.98, 1.02, (2, flip.sum()))
    lb[flip] = 3
    b = b * np.array([3.7, 0.25], np.float32)[:, None, None, None]  # scanner units
    cortex = lambda out, lab: float(np.median(out[1][lab == 2]))  # noqa: E731
    wa, wb = white_matter_ratio(a), white_matter_ratio(b)
    assert cortex(wb, lb) == pytest.approx(cortex(wa, la), rel=0.01)
    za, zb = zscore_in_brain(a), zscore_in_brain(b)
    assert abs(cortex(zb, lb) - cortex(za, la)) > 0.1  # the z-score moves with the mix


def test_white_matter_ratio_refuses_what_it_cannot_normalise():
    img, _ = _tissue_brain(0)
    bad = img.copy()
    bad[1] = -bad[1]
    with pytest.raises(ValueError, match="channel 1: white-matter median"):
        white_matter_ratio(bad)
    nan = img.copy()
    nan[0, 5, 5, 5] = np.nan  # NaN must not turn into finite numbers
    with pytest.raises(ValueError, match="channel 0: non-finite"):
        white_matter_ratio(nan)
    with pytest.raises(ValueError, match="reference channel 2"):
        white_matter_ratio(img, reference=2)
    with pytest.raises(ValueError, match="zscore or white-matter"):
        normalise_in_brain(img, None, ("minmax", 0))
    np.testing.assert_array_equal(normalise_in_brain(img), zscore_in_brain(img))
    np.testing.assert_array_equal(
        normalise_in_brain(img, None, ("white-matter", 0)), white_matter_ratio(img)
    )


def test_crop_pad_roundtrip_centres_on_brain():
    vol = np.zeros((20, 30, 10), np.float32)
    vol[12:18, 5:11, 2:8] = 1  # brain off-centre
    info = crop_or_pad_info(vol.shape, (8, 8, 16), vol > 0)
    out = apply_crop(vol, info)
    assert out.shape == (8, 8, 16)
    assert out.sum() == vol.sum()  # the whole brain fits: nothing lost
    back = undo_crop(out, info)
    np.testing.assert_array_equal(back, vol)
    lead = apply_crop(np.stack([vol, 2 * vol]), info)  # channel axis kept
    assert lead.shape == (2, 8, 8, 16)


def test_dataset_whole_volumes_and_patches(tmp_path):
    for k in range(3):
        _subject(tmp_path, f"s{k}")
    subs = find_subjects(tmp_path)
    ds = LesionDataset(subs, target_shape=(16, 16, 16))
    img, lab = ds[0]
    assert img.shape == (3, 16, 16, 16) and img.dtype == torch.float32
    assert lab.shape == (16, 16, 16) and lab.dtype == torch.uint8 and int(lab.sum()) == 8

    pds = LesionDataset(subs, patch_size=(6, 6, 6), patches_per_subject=4, lesion_prob=1.0, seed=3)
    assert len(pds) == 12
    img, lab = pds[5]
    assert img.shape == (3, 6, 6, 6) and lab.shape == (6, 6, 6) and lab.sum() > 0
    torch.testing.assert_close(pds[5][0], img)  # same (seed, epoch, index): same patch
    big = LesionDataset(subs, patch_size=(20, 20, 20))  # larger than the volume: zero-padded
    assert big[0][0].shape == (3, 20, 20, 20)

    batches = list(batch_iterator(pds, batch_size=4, epochs=1))
    assert len(batches) == 3 and batches[0][0].shape == (4, 3, 6, 6, 6)
    rb = RandomBatches(pds, batch_size=2, seed=1)
    x1, y1 = rb(7)
    x2, y2 = rb(7)
    assert x1.shape == (2, 3, 6, 6, 6) and y1.dtype == torch.uint8
    torch.testing.assert_close(x1, x2)
    torch.testing.assert_close(y1, y2)


def test_random_batches_never_repeat_a_patch_within_a_batch(tmp_path):
    # one subject, so every slot draws from the same volume: the slots must still differ
    _subject(tmp_path, "s0")
    ds = LesionDataset(find_subjects(tmp_path), patch_size=(6, 6, 6), lesion_prob=0.0, seed=2)
    rb = RandomBatches(ds, batch_size=3, seed=0)
    for i in range(10):
        x, _ = rb(i)
        for a in range(3):
            for b in range(a + 1, 3):
                assert not torch.equal(x[a], x[b]), (i, a, b)


def test_whole_volume_batches_are_padded_to_the_unet_multiple():
    from fasttversky.app.data import PaddedBatches

    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 13, 18, 9, generator=g)
    label = torch.randint(0, 2, (1, 13, 18, 9), dtype=torch.uint8, generator=g)
    x, y = PaddedBatches(lambda i: (image, label), 8)(0)
    assert x.shape == (1, 3, 16, 24, 16) and y.shape == (1, 16, 24, 16)
    assert torch.equal(x[..., :13, :18, :9], image) and torch.equal(y[..., :13, :18, :9], label)
    assert x[..., 13:, :, :].abs().sum() == 0 and y[..., :, 18:, :].sum() == 0


# --------------------------------------------------------------------------------------
# the shared real MS data (CI and every developer have it)
# --------------------------------------------------------------------------------------
needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"shared MS data not present at {SHARED_DATA}"
)


@pytest.mark.data
@needs_shared
def test_shared_real_data_loads_as_is():
    subs = find_subjects(SHARED_DATA)
    # masks/ (extra lesion masks, no images) is not a subject
    assert [s.name for s in subs] == ["patient07", "patient19"]
    p = prepare_subject(subs[0], target_shape=(144, 176, 144))
    assert p.image.shape == (3, 144, 176, 144) and p.image.dtype == np.float32
    assert p.mask.dtype == np.uint8 and p.full_mask.shape == (182, 218, 182)
    assert p.mask.sum() == p.full_mask.sum() > 0  # the crop keeps every lesion voxel
    assert abs(float(p.image[:, p.brain].mean())) < 1e-3
    frac = p.full_mask.mean()
    assert 1e-4 < frac < 1e-2  # README: patient07 0.018 %


@pytest.mark.data
@needs_shared
def test_shared_real_data_patches():
    ds = LesionDataset(
        find_subjects(SHARED_DATA)[1:],
        patch_size=(32, 32, 32),
        patches_per_subject=2,
        lesion_prob=1.0,
    )
    img, lab = ds[0]
    assert img.shape == (3, 32, 32, 32) and lab.sum() > 0

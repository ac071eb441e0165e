"""Lesion phantoms: lesion load, sizes, placement and contrasts follow the MS statistics
of the shared data's README; the written dataset loads; transplanting real masks."""

import json

import numpy as np
import pytest
from conftest import SHARED_DATA
from scipy import ndimage as ndi

from fasttversky.app.config import TRANSPLANT_CONTRASTS
from fasttversky.app.data import find_subjects, load_subject, save_volume, synth
from fasttversky.app.data.synth import (
    CSF,
    WM,
    make_phantom,
    transplant,
    write_phantom_dataset,
    write_transplant_dataset,
)

SHAPE = (64, 80, 64)  # 2.8 mm voxels: fast, still resolves ~3 mm lesions as 1–3 voxels


@pytest.fixture(scope="module")
def phantoms():
    return [make_phantom(SHAPE, seed) for seed in range(4)]


def test_lesion_fraction_in_ms_range(phantoms):
    fr = [p.lesion_fraction for p in phantoms]
    assert all(1e-4 <= f <= 7e-3 for f in fr), fr  # README: 0.01–0.7 % of voxels
    assert max(fr) / min(fr) > 2  # the load varies between subjects


def test_explicit_fraction_and_range():
    p = make_phantom(SHAPE, 1, lesion_fraction=3e-3)
    # Lesions are added until the target is reached; the last one may overshoot a bit.
    assert 3e-3 <= p.lesion_fraction < 4.5e-3
    q = make_phantom(SHAPE, 2, lesion_fraction=(5e-4, 1e-3))
    assert 5e-4 <= q.lesion_fraction < 1.6e-3


def test_lesion_sizes_typical_3mm(phantoms):
    diam = []
    for p in phantoms:
        lab, n = ndi.label(p.mask)
        sizes = np.bincount(lab.ravel())[1:]
        vox_mm3 = float(np.prod(p.voxel_mm))
        diam.extend((6 * sizes * vox_mm3 / np.pi) ** (1 / 3))  # equivalent-sphere diameter
        # the generator's own record: mostly small lesions, a tail of confluent ones
        d_rec = np.array([les["diameter_mm"] for les in p.lesions])
        assert 2.0 <= np.median(d_rec) <= 6.0 and d_rec.max() <= 22.0
    diam = np.array(diam)
    # A 2.8 mm voxel is itself 3.5 mm equivalent diameter, so measured components of
    # ~3 mm lesions come out at 1–3 voxels: median 3–8 mm, with a larger tail.
    assert 3.0 <= np.median(diam) <= 8.0, np.median(diam)
    assert np.percentile(diam, 90) > np.median(diam)


def test_lesions_in_white_matter_and_periventricular(phantoms):
    periv = []
    for p in phantoms:
        lesion = p.mask.astype(bool)
        assert not (lesion & (p.tissue == CSF)).any()  # never in CSF
        assert (lesion & (p.tissue == WM)).sum() > 0.5 * lesion.sum()  # README: ~74 % in WM
        periv += [les["periventricular"] for les in p.lesions]
    assert 0.35 <= np.mean(periv) <= 0.75  # README: about half within 10 mm


def test_contrasts_flair_t2_bright_t1_dark(phantoms):
    for p in phantoms:
        lesion = p.mask.astype(bool)
        core = ndi.binary_erosion(lesion) if ndi.binary_erosion(lesion).sum() > 10 else lesion
        wm = (p.tissue == WM) & ~ndi.binary_dilation(lesion, iterations=2)
        ratio = {m: p.images[m][core].mean() / p.images[m][wm].mean() for m in p.images}
        assert 1.1 < ratio["FLAIR"] < 1.6, ratio
        assert 1.3 < ratio["T2"] < 2.0, ratio
        assert 0.6 < ratio["T1"] < 0.95, ratio


def test_skull_stripped_background_is_zero(phantoms):
    p = phantoms[0]
    for img in p.images.values():
        assert img.dtype == np.float32 and np.isfinite(img).all()
        assert img[0, 0, 0] == 0 and (img == 0).mean() > 0.3
    assert p.mask.dtype == np.uint8


def test_written_dataset_loads(tmp_path):
    stats = write_phantom_dataset(tmp_path, n_subjects=2, shape=(32, 40, 32), seed=5)
    subs = find_subjects(tmp_path)
    assert [s.name for s in subs] == ["subject01", "subject02"]
    img, mask, aff = load_subject(subs[0])
    assert img.shape == (3, 32, 40, 32) and mask.mean() == pytest.approx(
        stats[0]["lesion_fraction"]
    )
    assert aff[0, 0] < 0  # MNI-like orientation
    assert (
        json.loads((tmp_path / "synth.json").read_text())["subjects"][1]["subject"] == "subject02"
    )
    again = write_phantom_dataset(tmp_path / "b", n_subjects=2, shape=(32, 40, 32), seed=5)
    assert again == stats  # deterministic in the seed


def _deep_wm_block(p):
    """A block of deep white matter (eroded: no partial volume with CSF/GM) away from
    the phantom's own lesions, as a uint8 mask."""
    deep_wm = ndi.binary_erosion(p.tissue == WM, iterations=2) & ~ndi.binary_dilation(
        p.mask.astype(bool), iterations=2
    )
    extra = np.zeros(SHAPE, np.uint8)
    extra[16:48, 20:60, 30:50] = 1
    return extra & deep_wm.astype(np.uint8)


def test_transplant_changes_contrast_inside_mask():
    p = make_phantom(SHAPE, 3, lesion_fraction=1e-3)
    rng = np.random.default_rng(0)
    extra = _deep_wm_block(p)
    imgs, mask = transplant(p.images, p.mask, extra, rng)
    new = mask.astype(bool) & ~p.mask.astype(bool)
    assert new.sum() > 20 and (mask >= p.mask).all()  # union with the brain's own lesions
    ratio = {m: imgs[m][new].mean() / p.images[m][new].mean() for m in imgs}
    assert 1.15 < ratio["FLAIR"] < 1.6 and 1.3 < ratio["T2"] < 2.0 and ratio["T1"] < 0.95, ratio
    far = ~ndi.binary_dilation(new, iterations=3)
    for m in imgs:  # untouched away from the transplanted lesions
        np.testing.assert_array_equal(imgs[m][far], p.images[m][far])


@pytest.mark.parametrize("name", TRANSPLANT_CONTRASTS)
def test_named_contrast_modes_stay_in_their_tables(name):
    """Every mode the CLI offers exists in synth, and its lesions' contrast (deep WM
    cores, relative to the untouched image) lies inside its factor table's range."""
    assert set(TRANSPLANT_CONTRASTS) == set(synth.TRANSPLANT_CONTRASTS)
    options = synth.transplant_contrast(name)
    table = options["factors"] or synth.LESION_FACTOR
    p = make_phantom(SHAPE, 3, lesion_fraction=1e-3)
    imgs, mask = transplant(
        p.images, p.mask, _deep_wm_block(p), np.random.default_rng(1), **options
    )
    core = ndi.binary_erosion(mask.astype(bool) & ~p.mask.astype(bool), iterations=2)
    for m, (f0, f1) in table.items():
        r = imgs[m][core].mean() / p.images[m][core].mean()
        assert min(f0, f1) - 0.1 < r < max(f0, f1) + 0.1, (m, r)
    with pytest.raises(ValueError, match="contrast must be one of"):
        synth.transplant_contrast("faint")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cortex_mode_recontrasts_grey_matter_only(seed):
    """ "varied-cortex": the phantom's cortex (GM away from lesions) ends at a median
    ratio to normal WM inside CORTEX_FACTOR's range for FLAIR and T2, different per
    draw; lesions and T1 are bitwise those of "varied" with the same stream, and deep WM
    nearly so (only its voxels as dark on T1 as cortex, under the bias field, may move)."""
    p = make_phantom(SHAPE, 3, lesion_fraction=1e-3)
    extra = _deep_wm_block(p)
    runs = {
        name: transplant(
            p.images, p.mask, extra, np.random.default_rng(seed), **synth.transplant_contrast(name)
        )
        for name in ("varied", "varied-cortex")
    }
    (plain, mask), (cortex, mask2) = runs["varied"], runs["varied-cortex"]
    np.testing.assert_array_equal(mask, mask2)
    lesion = ndi.binary_dilation(mask.astype(bool), iterations=2)
    gm = ndi.binary_erosion(p.tissue == synth.GM) & ~lesion
    wm = ndi.binary_erosion(p.tissue == WM, iterations=2) & ~lesion
    np.testing.assert_array_equal(cortex["T1"], plain["T1"])
    for m in p.images:
        np.testing.assert_array_equal(cortex[m][mask > 0], plain[m][mask > 0])
        assert np.mean(cortex[m][wm] == plain[m][wm]) > 0.9, m
        assert np.median(cortex[m][wm]) == pytest.approx(np.median(plain[m][wm]), rel=5e-3)
    for m, (lo, hi) in synth.CORTEX_FACTOR.items():
        ratio = np.median(cortex[m][gm]) / np.median(plain[m][wm])
        assert lo - 0.03 < ratio < hi + 0.03, (m, ratio)
        assert not np.allclose(cortex[m][gm], plain[m][gm])


@pytest.mark.data
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared MS data not at {SHARED_DATA}")
def test_transplant_dataset_from_shared_data(tmp_path):
    stats = write_transplant_dataset(
        tmp_path, SHARED_DATA, SHARED_DATA / "masks", n_subjects=1, seed=0
    )
    subs = find_subjects(tmp_path)
    assert len(subs) == 1 and subs[0].name == "patient07_patient01"
    _, mask, _ = load_subject(subs[0])
    assert mask.shape == (182, 218, 182)
    assert 1e-4 < stats[0]["lesion_fraction"] < 1e-2


def test_transplant_dataset_skips_own_and_excluded_masks(tmp_path):
    """`synth --brains B --lesion-masks M`: a mask named like a brain (its own lesions) or
    listed in exclude (a held-out patient) never becomes a training subject."""
    shape = (32, 40, 32)
    write_phantom_dataset(tmp_path / "brains", n_subjects=1, shape=shape, seed=3)
    for name, seed in (("subject01", 1), ("patient05", 5), ("patient09", 9)):
        p = make_phantom(shape, seed, lesion_fraction=3e-3)
        save_volume(tmp_path / "masks" / f"{name}.nii.gz", p.mask, p.affine)
    stats = write_transplant_dataset(
        tmp_path / "out", tmp_path / "brains", tmp_path / "masks", exclude=["PATIENT09"]
    )
    assert [s["lesion_mask"] for s in stats] == ["patient05.nii.gz"]
    meta = json.loads((tmp_path / "out" / "synth.json").read_text())
    assert meta["skipped_masks"] == ["patient09.nii.gz", "subject01.nii.gz"]
    assert meta["contrast"] == "varied"
    with pytest.raises(ValueError, match="besides the skipped"):
        write_transplant_dataset(
            tmp_path / "out2",
            tmp_path / "brains",
            tmp_path / "masks",
            exclude=["patient05", "patient09"],
        )

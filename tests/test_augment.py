"""On-the-fly patch augmentation: identity settings, flips, the affine resampling
against scipy.ndimage.affine_transform, shared image/mask geometry, intensity rules,
determinism, and the dataset integration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from fasttversky.app.data import LesionDataset, PreparedSubject
from fasttversky.app.data.augment import AugmentConfig, Augmenter, _rotation

OFF = dict(p_flip=0, p_affine=0, p_gamma=0, p_contrast=0, p_brightness=0, p_noise=0)
PATCH = (8, 10, 6)


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(aug, seed, c=2):
    rng = np.random.default_rng(seed)
    size = aug.input_size()
    img = rng.normal(size=(c, *size)).astype(np.float32)
    mask = (rng.random(size) < 0.2).astype(np.uint8)
    return img, mask


def _centre(aug, x):
    return x[(..., *(slice(m, m + p) for m, p in zip(aug.margin, aug.patch_size, strict=True)))]


@pytest.mark.parametrize("seed", range(3))
def test_everything_off_is_the_centre_crop(seed):
    aug = Augmenter(AugmentConfig(**{**OFF, "p_affine": 0.0}), PATCH)
    img, mask = _inputs(Augmenter(AugmentConfig(**OFF), PATCH), seed)
    x, y = aug(img, mask, seed)
    np.testing.assert_array_equal(x.numpy(), _centre(aug, img))
    np.testing.assert_array_equal(y.numpy(), _centre(aug, mask))
    assert x.dtype == torch.float32 and y.dtype == torch.uint8 and x.shape[1:] == PATCH


def test_flips_mirror_image_and_mask_together():
    aug = Augmenter(AugmentConfig(**{**OFF, "p_flip": 1.0, "flip_axes": (0, 2)}), PATCH)
    img, mask = _inputs(aug, 1)
    x, y = aug(img, mask, 0)
    np.testing.assert_array_equal(x.numpy(), np.flip(_centre(aug, img), (1, 3)))
    np.testing.assert_array_equal(y.numpy(), np.flip(_centre(aug, mask), (0, 2)))


@pytest.mark.parametrize("seed", range(4))
def test_affine_matches_scipy_affine_transform(seed):
    aug = Augmenter(AugmentConfig(**{**OFF, "p_affine": 1.0, "rotate_deg": 30}), PATCH)
    rng = np.random.default_rng(seed)
    img, mask = _inputs(aug, seed, c=1)
    angles = torch.tensor(rng.uniform(-0.5, 0.5, 3))
    zoom = torch.tensor(rng.uniform(0.8, 1.25, 3))
    out, _ = aug._affine(torch.from_numpy(img), torch.from_numpy(mask), _rotation(angles), zoom)
    # Reference in (D, H, W) index order: u_in = P R P diag(1/zoom) u_out about the
    # centres, P reversing the axes (the rotation is defined on (x, y, z) = (W, H, D)).
    p = np.eye(3)[::-1]
    m = p @ _rotation(angles).numpy() @ p @ np.diag(1 / zoom.numpy())
    c_in = (np.array(aug.input_size()) - 1) / 2
    c_out = (np.array(PATCH) - 1) / 2
    ref = ndi.affine_transform(
        img[0].astype(np.float64),
        m,
        offset=c_in - m @ c_out,
        output_shape=PATCH,
        order=1,
        mode="grid-constant",
        cval=0.0,
    )
    np.testing.assert_allclose(out[0].numpy(), ref, rtol=0, atol=2e-4)


@pytest.mark.parametrize("seed", range(4))
def test_image_and_mask_share_the_geometry(seed):
    # The mask copied into an image channel must come out where the mask comes out.
    cfg = AugmentConfig(**{**OFF, "p_affine": 1.0, "p_flip": 0.5, "flip_axes": (0, 1, 2)})
    aug = Augmenter(cfg, PATCH)
    size = aug.input_size()
    mask = np.zeros(size, np.uint8)
    mask[tuple(slice(n // 2 - 2, n // 2 + 2) for n in size)] = 1  # a central block
    x, y = aug(mask[None].astype(np.float32) + 0.0, mask, seed)
    np.testing.assert_array_equal((x[0] >= 0.5).numpy(), y.numpy().astype(bool))
    assert y.any()


@pytest.mark.parametrize("seed", range(4))
def test_intensity_keeps_background_zero_and_is_deterministic(seed):
    cfg = AugmentConfig(**{**OFF, "p_gamma": 1, "p_contrast": 1, "p_brightness": 1, "p_noise": 1})
    aug = Augmenter(cfg, PATCH)
    img, mask = _inputs(aug, seed)
    img[:, :, :3] = 0  # background (0 in every modality)
    x, y = aug(img, mask, seed)
    brain = _centre(aug, (img != 0).any(axis=0))
    assert (x.numpy()[:, ~brain] == 0).all()
    assert not np.allclose(x.numpy()[:, brain], _centre(aug, img)[:, brain])
    x2, y2 = aug(img, mask, seed)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = aug(img, mask, seed + 1)
    assert not torch.equal(x, x3)


def test_contrast_keeps_the_brain_mean():
    aug = Augmenter(AugmentConfig(**{**OFF, "p_contrast": 1.0}), PATCH)
    img, mask = _inputs(aug, 3)
    x, _ = aug(img, mask, 5)
    src = _centre(aug, img)
    np.testing.assert_allclose(x.numpy().mean(axis=(1, 2, 3)), src.mean(axis=(1, 2, 3)), atol=1e-5)
    assert not np.allclose(x.numpy(), src)


@pytest.mark.parametrize("seed", range(3))
def test_remap_is_monotone_and_moves_the_middle_not_the_tails(seed):
    aug = Augmenter(AugmentConfig(**{**OFF, "p_remap": 1.0, "remap": 0.4}), PATCH)
    img, mask = _inputs(aug, seed)
    img[:, :, :2] = 0  # background stays 0
    x = aug(img, mask, seed)[0].numpy()
    src = _centre(aug, img)
    brain = (src != 0).any(axis=0)
    for c in range(len(src)):
        a, b = src[c][brain], x[c][brain]
        order = np.argsort(a, kind="stable")
        assert (np.diff(b[order]) >= 0).all()  # monotone: no tissue overtakes another
        q = np.percentile(a.astype(np.float64), [1, 25, 50, 75, 99])
        tail = (a < q[0]) | (a > q[4])
        np.testing.assert_array_equal(b[tail], a[tail])  # tails shifted by 0, not clipped
        mid = np.abs(a - q[2]) < 0.05 * (q[4] - q[0])
        assert np.abs(b[mid] - a[mid]).max() > 1e-3  # the middle knots moved
        assert (x[c][~brain] == 0).all()
    # p_remap = 0 draws nothing: the other options keep the stream they had without it
    on = dict(p_gamma=1, p_contrast=1, p_noise=1)
    a = Augmenter(AugmentConfig(**{**OFF, **on}), PATCH)(img, mask, seed)[0]
    b = Augmenter(AugmentConfig(**{**OFF, **on, "p_remap": 0.0, "remap": 0.1}), PATCH)
    assert torch.equal(a, b(img, mask, seed)[0])


def test_dataset_patches_are_augmented_reproducibly():
    rng = np.random.default_rng(0)
    shape = (20, 24, 18)
    image = rng.normal(size=(2, *shape)).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[2:5, 3:6, 1:4] = 1  # near the border: the margin patch reaches outside
    sub = PreparedSubject("s", image, mask, np.ones(shape, bool), np.eye(4), None, mask)
    aug = Augmenter(AugmentConfig(p_affine=1.0), PATCH)
    ds = LesionDataset([sub], patch_size=PATCH, lesion_prob=1.0, seed=3, augment=aug)
    a, b = ds[0], ds[0]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (2, *PATCH) and a[1].shape == PATCH
    with pytest.raises(ValueError, match="patch"):
        LesionDataset([sub], patch_size=(8, 8, 8), augment=aug)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(p_flip=1.5), "p_flip"),
        (dict(flip_axes=(3,)), "flip_axes"),
        (dict(scale=(1.2, 0.9)), "scale"),
        (dict(gamma=(0, 1)), "gamma"),
        (dict(rotate_deg=90), "rotate_deg"),
        (dict(noise_std=-1), "noise_std"),
        (dict(p_remap=2), "p_remap"),
        (dict(remap=0.5), "remap"),
        (dict(p_blur=-0.1), "p_blur"),
        (dict(p_lowres=1.1), "p_lowres"),
        (dict(blur_sigma=(1.0, 0.5)), "blur_sigma"),
        (dict(lowres=(0, 0.5)), "lowres"),
        (dict(lowres=(0.5, 1.5)), "lowres"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AugmentConfig(**kwargs)


@pytest.mark.parametrize(
    "cfg",
    [
        AugmentConfig(p_affine=1.0, p_gamma=1, p_contrast=1, p_brightness=1, p_noise=1),
        AugmentConfig(p_affine=1.0, p_gamma=1, p_noise=1, p_blur=0.5, p_lowres=0.5),
    ],
)
def test_same_result_with_one_or_two_threads(cfg):
    aug = Augmenter(cfg, (16, 16, 16))
    img, mask = _inputs(aug, 7, c=3)
    x1, y1 = aug(img, mask, 11)
    torch.set_num_threads(2)  # the fixture restores the count afterwards
    x2, y2 = aug(img, mask, 11)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


# --- resolution: blur and simulated low resolution -------------------------------------
def _brain_inputs(aug, seed, c=2):
    """Inputs whose centre patch has a background corner (the edge rules matter)."""
    img, mask = _inputs(aug, seed, c)
    img[:, :3, :4] = 0
    return img, mask


def _blur_oracle(x, brain, sigma):
    b = brain.astype(np.float64)
    num = ndi.gaussian_filter(x.astype(np.float64) * b, sigma, mode="constant")
    den = ndi.gaussian_filter(b, sigma, mode="constant")
    return np.where(brain, num / np.where(brain, den, 1.0), 0.0)


def _linear_up(a, n, axis):
    """torch's linear interpolation (align_corners=False) along one axis, float64."""
    m = a.shape[axis]
    src = np.maximum((np.arange(n) + 0.5) * (m / n) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), m - 1)
    i1 = np.minimum(i0 + 1, m - 1)
    w = src - i0
    shape = [1] * a.ndim
    shape[axis] = n
    return np.take(a, i0, axis) * (1 - w).reshape(shape) + np.take(a, i1, axis) * w.reshape(shape)


def _lowres_oracle(x, brain, factor):
    b = brain.astype(np.float64)
    t, d = x.astype(np.float64) * b, b
    for axis, n in enumerate(x.shape):
        k = max(1, int(round(n * factor)))
        idx = np.minimum(np.floor(np.arange(k) * (n / k)).astype(int), n - 1)  # nearest
        t, d = np.take(t, idx, axis), np.take(d, idx, axis)
    for axis, n in enumerate(x.shape):
        t, d = _linear_up(t, n, axis), _linear_up(d, n, axis)
    return np.where(brain, t / np.maximum(d, 1e-3), 0.0)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("sigma", [0.6, 1.3])
def test_blur_matches_a_float64_masked_gaussian(seed, sigma):
    aug = Augmenter(AugmentConfig(**{**OFF, "p_blur": 1.0, "blur_sigma": (sigma, sigma)}), PATCH)
    img, mask = _brain_inputs(aug, seed)
    x = aug(img, mask, seed)[0].numpy()
    src = _centre(aug, img)
    brain = (src != 0).any(axis=0)
    for c in range(len(src)):
        np.testing.assert_allclose(x[c], _blur_oracle(src[c], brain, sigma), rtol=1e-4, atol=1e-5)
    assert (x[:, ~brain] == 0).all()
    assert np.std(x[:, brain]) < 0.8 * np.std(src[:, brain])  # white noise really smoothed


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("factor", [0.5, 0.7])
def test_lowres_matches_nearest_down_linear_up_in_float64(seed, factor):
    cfg = AugmentConfig(**{**OFF, "p_lowres": 1.0, "lowres": (factor, factor)})
    aug = Augmenter(cfg, PATCH)
    img, mask = _brain_inputs(aug, seed)
    x = aug(img, mask, seed)[0].numpy()
    src = _centre(aug, img)
    brain = (src != 0).any(axis=0)
    for c in range(len(src)):
        np.testing.assert_allclose(
            x[c], _lowres_oracle(src[c], brain, factor), rtol=1e-4, atol=1e-5
        )
    assert (x[:, ~brain] == 0).all()


@pytest.mark.parametrize("on", [dict(p_blur=1.0), dict(p_lowres=1.0)])
def test_resolution_keeps_a_uniform_brain_uniform_up_to_its_edge(on):
    # The normalisation by the resampled brain mask: the zero background does not bleed in.
    aug = Augmenter(AugmentConfig(**{**OFF, **on}), PATCH)
    img, mask = _brain_inputs(aug, 0, c=1)
    img = np.where(img != 0, np.float32(2.5), np.float32(0))
    x = aug(img, mask, 4)[0].numpy()
    brain = (_centre(aug, img) != 0).any(axis=0)
    np.testing.assert_allclose(x[0][brain], 2.5, rtol=1e-5)


def test_resolution_draws_nothing_when_off():
    # p_blur = p_lowres = 0 draws nothing: "default" keeps its random stream bitwise
    on = dict(p_gamma=1, p_contrast=1, p_noise=1)
    a = Augmenter(AugmentConfig(**{**OFF, **on}), PATCH)
    b = Augmenter(AugmentConfig(**{**OFF, **on, "blur_sigma": (1, 2), "lowres": (0.6, 0.9)}), PATCH)
    img, mask = _inputs(a, 2)
    assert torch.equal(a(img, mask, 3)[0], b(img, mask, 3)[0])
    c = Augmenter(AugmentConfig(**{**OFF, **on, "p_blur": 1.0}), PATCH)
    assert not torch.equal(a(img, mask, 3)[0], c(img, mask, 3)[0])


def test_named_sets_are_the_config_choices():
    from fasttversky.app.config import AUGMENTS
    from fasttversky.app.data.augment import AUGMENTATIONS, augment_config

    assert AUGMENTS == ("none", *AUGMENTATIONS)
    assert augment_config("default") == AugmentConfig()
    res = augment_config("resolution")
    assert res.p_blur > 0 and res.p_lowres > 0
    assert AugmentConfig.from_dict({**res.to_dict(), "p_blur": 0, "p_lowres": 0}) == AugmentConfig()
    with pytest.raises(ValueError, match="augment must be one of"):
        augment_config("strong")


@pytest.mark.parametrize("name", ["default", "resolution"])
def test_train_run_augments_with_the_named_set(tmp_path, monkeypatch, name):
    from dataclasses import replace

    import fasttversky.app.data.augment as augment_module
    from fasttversky.app.data.synth import write_phantom_dataset
    from fasttversky.app.pipeline import find_dataset, train_run
    from fasttversky.app.presets import PRESETS

    seen = []

    class Spy(Augmenter):
        def __init__(self, config, patch_size):
            seen.append(config)
            super().__init__(config, patch_size)

    monkeypatch.setattr(augment_module, "Augmenter", Spy)
    write_phantom_dataset(tmp_path / "d", n_subjects=1, shape=(24, 24, 24), seed=1)
    s = PRESETS["tiny"].run
    s = replace(s, data=replace(s.data, augment=name), train=replace(s.train, steps=1))
    train_run(find_dataset(tmp_path / "d", s.data), s, tmp_path / "run", progress=False)
    assert seen == [augment_module.AUGMENTATIONS[name]]

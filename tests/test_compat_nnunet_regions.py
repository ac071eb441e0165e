"""``fasttversky.compat.nnunet.DC_and_BCE_loss`` (nnU-Net's region-based loss) against
nnU-Net v2's own, and ``Tversky_and_BCE_loss`` against its formula in float64.

The reference is nnunetv2's ``DC_and_BCE_loss`` built as ``nnUNetTrainer._build_loss``
builds it for region datasets (``MemoryEfficientSoftDiceLoss``, do_bg=True, smooth=1e-5,
batch_dice both ways, ``use_ignore_label`` both ways), given the region target nnU-Net's
own pipeline makes (``ConvertSegmentationToRegionsTransform``, then
``DownsampleSegForDSTransform`` for deep supervision), value and gradient, on seeded
inputs. Ours gets that region target (bool and float) and, with ``regions=``, the label
map itself. nnU-Net sums its Dice in float32 whatever the logits' dtype: the comparison
uses the float32 row of the tolerance table; float64 is checked at float64 tolerance
against nnU-Net's formula written out in float64 here.

Marked ``nnunet``: CI installs the [nnunet] extra and a skip fails the run there.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _helpers import TOLERANCES, describe_mismatch

import fasttversky

pytestmark = [pytest.mark.nnunet, pytest.mark.usefixtures("one_thread")]
_BACKENDS = ["auto", "torch"]

# BraTS-like nested regions over labels 1..3 (whole ⊇ core ⊇ enhancing), ignore label 4.
REGIONS = ((1, 2, 3), (2, 3), (3,))
IGNORE = 4


@pytest.fixture
def nn():
    pytest.importorskip("nnunetv2")
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import (
        DownsampleSegForDSTransform,
    )
    from batchgeneratorsv2.transforms.utils.seg_to_regions import (
        ConvertSegmentationToRegionsTransform,
    )
    from nnunetv2.training.loss import compound_losses, deep_supervision, dice

    class NN:
        pass

    ns = NN()
    ns.compound, ns.dice, ns.ds = compound_losses, dice, deep_supervision
    ns.to_regions, ns.downsample = (
        ConvertSegmentationToRegionsTransform,
        DownsampleSegForDSTransform,
    )
    return ns


def _labels(B=2, shape=(6, 7, 5), ignore=True, seed=0):
    """(B, 1, *shape) float label map (nnU-Net's loader), labels 0..3 and holes of IGNORE."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (B, 1, *shape), generator=gen)
    if ignore:
        y = torch.where(torch.rand((B, 1, *shape), generator=gen) < 0.2, IGNORE, y)
    return y.float()


def _logits(B=2, shape=(6, 7, 5), R=3, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (2 * torch.randn((B, R, *shape), generator=gen, dtype=torch.float64)).to(dtype)


def _nnunet_regions(nn, y, regions=REGIONS, ignore=IGNORE):
    """nnU-Net's region target for a (B, 1, ...) label map: its transform, per sample."""
    tr = nn.to_regions(list(regions) + ([ignore] if ignore is not None else []), 0)
    return torch.stack([tr._apply_to_segmentation(s) for s in y])


def _kwargs(batch_dice, use_ignore_label):
    # nnUNetTrainer._build_loss's arguments for region datasets (ddp=False: one process).
    return dict(
        bce_kwargs={},
        soft_dice_kwargs={"batch_dice": batch_dice, "do_bg": True, "smooth": 1e-5, "ddp": False},
        use_ignore_label=use_ignore_label,
    )


def _pair(nn, batch_dice=False, use_ignore_label=True, **ours_kw):
    from fasttversky.compat.nnunet import DC_and_BCE_loss

    kw = _kwargs(batch_dice, use_ignore_label)
    ref = nn.compound.DC_and_BCE_loss(dice_class=nn.dice.MemoryEfficientSoftDiceLoss, **kw)
    kw = _kwargs(batch_dice, use_ignore_label)
    ours = DC_and_BCE_loss(dice_class=nn.dice.MemoryEfficientSoftDiceLoss, **kw, **ours_kw)
    return ref, ours


def _value_and_grad(loss_fn, x, *args):
    xi = [t.detach().clone().requires_grad_(True) for t in x] if isinstance(x, list) else None
    if xi is None:
        xi = x.detach().clone().requires_grad_(True)
    out = loss_fn(xi, *args)
    grads = torch.autograd.grad(out, xi, allow_unused=True, materialize_grads=True)
    return out.detach(), grads


def _assert_close(got, want, dtype, what):
    loss_rtol, grad_rtol = TOLERANCES[dtype]
    (v, gs), (rv, rgs) = got, want
    assert v.dtype == rv.dtype, f"{what}: dtype {v.dtype} vs nnU-Net's {rv.dtype}"
    tol = loss_rtol * max(rv.abs().item(), 1e-3)
    assert abs(v.double() - rv.double()) <= tol, f"{what} value: {describe_mismatch(v, rv, tol)}"
    for g, rg in zip(gs, rgs, strict=True):
        gtol = grad_rtol * max(rg.abs().max().item(), 1e-30)
        assert torch.allclose(g.double(), rg.double(), rtol=0, atol=gtol), (
            f"{what} grad: {describe_mismatch(g, rg, gtol)}"
        )


def _no_slow_path(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a SlowPathWarning would mean the fused path refused
        return fn(*args)


# ------------------------------------------------------------------------------------
# nnU-Net's region target
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("use_ignore_label", [False, True])
@pytest.mark.parametrize("as_float", [False, True])
def test_region_target_matches_nnunet(nn, backend, batch_dice, use_ignore_label, as_float):
    ref, ours = _pair(nn, batch_dice, use_ignore_label, backend=backend)
    y = _labels(ignore=use_ignore_label)
    t = _nnunet_regions(nn, y, ignore=IGNORE if use_ignore_label else None)
    t = t.float() if as_float else t
    x = _logits()
    assert ours.explain(x, t) == "fused"
    got = _no_slow_path(_value_and_grad, ours, x, t)
    what = f"bd={batch_dice} ignore={use_ignore_label} float={as_float}"
    _assert_close(got, _value_and_grad(ref, x, t), torch.float32, what)


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("use_ignore_label", [False, True])
@pytest.mark.parametrize("label_dtype", [torch.float32, torch.int16, torch.uint8])
def test_label_map_matches_nnunet(nn, backend, batch_dice, use_ignore_label, label_dtype):
    ii = IGNORE if use_ignore_label else None
    ref, ours = _pair(
        nn, batch_dice, use_ignore_label, backend=backend, regions=REGIONS, ignore_label=ii
    )
    y = _labels(ignore=use_ignore_label, seed=2)
    x = _logits(seed=3)
    assert ours.explain(x, y.to(label_dtype)) == "fused"
    got = _no_slow_path(_value_and_grad, ours, x, y.to(label_dtype))
    want = _value_and_grad(ref, x, _nnunet_regions(nn, y, ignore=ii))
    _assert_close(got, want, torch.float32, f"labels {label_dtype} bd={batch_dice} ii={ii}")


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("route", ["labels", "regions"])
def test_float64_matches_nnunet_formula_exactly(nn, batch_dice, route):
    # nnU-Net's formula in float64: wce * BCE + wd * (-mean dc), dc = (2I + s) / (Sg + Sp
    # + s) per region over the kept voxels; BCE summed over the kept voxels and regions
    # and divided by the kept voxels (nnU-Net's masked mean).
    from fasttversky.compat.nnunet import DC_and_BCE_loss

    kw = _kwargs(batch_dice, True)
    ours = DC_and_BCE_loss(
        weight_ce=0.7, weight_dice=1.3, regions=REGIONS, ignore_label=IGNORE, **kw
    )
    y = _labels(seed=4)
    x = _logits(dtype=torch.float64, seed=5)
    t = _nnunet_regions(nn, y)
    target = y if route == "labels" else t

    def formula(xi):
        keep = ~t[:, -1:]
        g = t[:, :-1].double()
        p = torch.sigmoid(xi) * keep
        axes = (0, 2, 3, 4) if batch_dice else (2, 3, 4)
        inter, sp, sg = (p * g).sum(axes), p.sum(axes), (g * keep).sum(axes)
        dc = (2 * inter + 1e-5) / (sg + sp + 1e-5)
        bce = F.binary_cross_entropy_with_logits(xi, g, reduction="none")
        return 0.7 * (bce * keep).sum() / keep.sum() - 1.3 * dc.mean()

    got = _no_slow_path(_value_and_grad, ours, x, target)
    _assert_close(got, _value_and_grad(formula, x), torch.float64, f"float64 {route}")


def _per_scale(downsample, batch):
    """nnU-Net's DownsampleSegForDSTransform on each sample: one (B, ...) tensor per scale."""
    per_sample = [downsample._apply_to_segmentation(s) for s in batch]
    return [torch.stack(s) for s in zip(*per_sample, strict=True)]


@pytest.mark.parametrize("use_ignore_label", [False, True])
def test_deep_supervision(nn, use_ignore_label):
    # nnUNetTrainer's weights (1, 1/2, 1/4, last zeroed, normalised); nnU-Net's targets
    # come from its transforms: regions, then downsampling of the region channels. Ours:
    # the label map downsampled by the same transform, or by fasttversky's
    # deep_supervision_loss from the full-resolution label map.
    ii = IGNORE if use_ignore_label else None
    ref, ours = _pair(nn, True, use_ignore_label, regions=REGIONS, ignore_label=ii)
    w = [1.0, 0.5, 0.25]
    w = [v / 1.5 for v in w[:2]] + [0.0]
    scales = [(1, 1, 1), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)]
    y = _labels(shape=(8, 8, 12), ignore=use_ignore_label, seed=6)
    xs = [_logits(shape=(8, 8, 12), seed=7), _logits(shape=(4, 4, 6), seed=8)]
    xs.append(_logits(shape=(2, 2, 3), seed=9))
    ds = nn.downsample(scales)
    onehots = _per_scale(ds, _nnunet_regions(nn, y, ignore=ii))
    label_maps = _per_scale(ds, y)
    want = _value_and_grad(nn.ds.DeepSupervisionWrapper(ref, w), xs, onehots)
    for what, args in (
        ("region targets", (nn.ds.DeepSupervisionWrapper(ours, w), xs, onehots)),
        ("label maps", (nn.ds.DeepSupervisionWrapper(ours, w), xs, label_maps)),
        ("full-res label map", (lambda xi, yi: ours.deep_supervision_loss(xi, yi, w), xs, y)),
    ):
        _assert_close(_no_slow_path(_value_and_grad, *args), want, torch.float32, what)


@pytest.mark.parametrize("label_dtype", [torch.float32, torch.uint8])
def test_label_map_route_hands_the_label_map_to_the_kernels(monkeypatch, label_dtype):
    # No region channel is built: the fused loss gets the label map itself (float label
    # maps read as they are), at each deep-supervision scale its nearest-downsampled
    # copy (one channel).
    import fasttversky.compat.nnunet.region_loss as region_loss
    from fasttversky.compat import _common
    from fasttversky.compat.nnunet import DC_and_BCE_loss

    seen = []
    for name in ("tversky_loss", "deep_supervision_loss"):
        real = getattr(fasttversky, name)
        spy = lambda x, t, *a, _real=real, **k: seen.append(t) or _real(x, t, *a, **k)  # noqa: E731
        monkeypatch.setattr(region_loss.fasttversky, name, spy)
    ours = DC_and_BCE_loss(**_kwargs(False, True), regions=REGIONS, ignore_label=IGNORE)
    y = _labels(shape=(8, 8, 8), seed=10).to(label_dtype)
    xs = [_logits(shape=(8, 8, 8), seed=11), _logits(shape=(4, 4, 4), seed=12)]
    ours(xs[0], y)
    if label_dtype.is_floating_point and not _common.float_labels_keep_backend("cpu"):
        assert seen.pop().dtype == torch.uint8  # converted: "auto" would change backend
    else:
        assert seen.pop() is y
    ours.deep_supervision_loss(xs, y, [0.7, 0.3])
    assert [tuple(t.shape) for t in seen.pop()] == [(2, 1, 8, 8, 8), (2, 1, 4, 4, 4)]
    assert not seen


def test_all_voxels_ignored(nn):
    # nnU-Net: Dice -1 (s / s), BCE 0 / clip(0, 1e-8) = 0.
    ref, ours = _pair(nn, False, True, regions=REGIONS, ignore_label=IGNORE)
    y = torch.full((2, 1, 6, 7, 5), float(IGNORE))
    x = _logits(seed=12)
    want = _value_and_grad(ref, x, _nnunet_regions(nn, y))
    assert want[0].item() == -1.0
    _assert_close(_no_slow_path(_value_and_grad, ours, x, y), want, torch.float32, "ignored")


def test_slow_paths_match_nnunet(nn):
    # Options outside the fused kernels: nnU-Net's own computation, same values.
    from fasttversky.compat.nnunet import DC_and_BCE_loss

    y = _labels(seed=13)
    x = _logits(seed=14)
    t = _nnunet_regions(nn, y)
    for dice_class, kw in (
        (nn.dice.SoftDiceLoss, {**_kwargs(False, True), "weight_dice": 0}),
        (
            nn.dice.SoftDiceLoss,
            {**_kwargs(True, True), "bce_kwargs": {"pos_weight": torch.tensor(2.0)}},
        ),  # fmt: skip
        (
            nn.dice.MemoryEfficientSoftDiceLoss,
            {**_kwargs(False, True), "soft_dice_kwargs": {"smooth": 0.0}},
        ),  # fmt: skip
    ):
        ref_kw = {**kw, "bce_kwargs": dict(kw["bce_kwargs"])}  # nnU-Net writes into it
        ref = nn.compound.DC_and_BCE_loss(dice_class=dice_class, **ref_kw)
        ours = DC_and_BCE_loss(dice_class=dice_class, regions=REGIONS, ignore_label=IGNORE, **kw)
        for target in (t, y):
            assert ours.explain(x, target).startswith("fallback: ")
            got = _value_and_grad(ours, x, target)
            _assert_close(got, _value_and_grad(ref, x, t), torch.float32, kw)


def test_nan_logits_give_nan(nn):
    from fasttversky.compat.nnunet import SlowPathWarning

    ref, ours = _pair(nn, False, True, regions=REGIONS, ignore_label=IGNORE)
    y = _labels(seed=15)
    x = _logits(seed=16)
    x[0, 1, 2, 3, 4] = float("nan")
    assert torch.isnan(ref(x, _nnunet_regions(nn, y)))
    with pytest.warns(SlowPathWarning):
        assert torch.isnan(ours(x, y))


# ------------------------------------------------------------------------------------
# bad input: one line naming the argument
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"regions": ((1, 2), (5,)), "ignore_label": 4, "use_ignore_label": True}, "regions[1]"),
        ({"regions": ((1, 4),), "ignore_label": 4, "use_ignore_label": True}, "regions[0]"),
        ({"regions": ((1, -2),)}, "regions"),
        ({"regions": ((1, 2), ())}, "regions[1]"),
        ({"regions": ()}, "regions"),
        ({"regions": ((1.5,),)}, "regions"),
        ({"regions": ((1,),), "use_ignore_label": True}, "ignore_label"),
        ({"ignore_label": 4}, "ignore_label"),
    ],
)
def test_bad_constructor_arguments(kwargs, name):
    from fasttversky.compat.nnunet import DC_and_BCE_loss

    kw = {"use_ignore_label": False, **kwargs}
    with pytest.raises(fasttversky.InvalidInputError) as e:
        DC_and_BCE_loss({}, {"do_bg": True}, **kw)
    assert name in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bad_inputs(nn):
    from fasttversky.compat.nnunet import DC_and_BCE_loss

    ours = DC_and_BCE_loss({}, {}, use_ignore_label=True, regions=REGIONS, ignore_label=IGNORE)
    y = _labels(seed=17)
    t = _nnunet_regions(nn, y)
    cases = [
        (_logits(R=4), y, "net_output"),  # 4 channels, 3 regions
        (_logits(), t[:, :3], "target"),  # the ignore channel missing
        (_logits(), t.float() * 0.5, "target"),  # not 0/1
        (_logits(), torch.zeros(2, 2, 6, 7, 5), "target"),
        (_logits().long(), y, "net_output"),
    ]
    for x, target, name in cases:
        with pytest.raises(fasttversky.InvalidInputError) as e:
            ours(x, target)
        assert str(e.value).startswith(name) and "\n" not in str(e.value), str(e.value)
    plain = DC_and_BCE_loss({}, {}, use_ignore_label=False)  # no regions: a region target
    with pytest.raises(fasttversky.InvalidInputError, match="^target"):
        plain(_logits(), y)


# ------------------------------------------------------------------------------------
# Tversky + BCE over regions
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("ignore_label", [None, IGNORE])
def test_tversky_and_bce_matches_formula(nn, batch_dice, ignore_label):
    from fasttversky.compat.nnunet import Tversky_and_BCE_loss

    loss = Tversky_and_BCE_loss(
        REGIONS, batch_dice=batch_dice, ignore_label=ignore_label, weight_ce=0.6
    )
    y = _labels(ignore=ignore_label is not None, seed=18)
    t = _nnunet_regions(nn, y, ignore=ignore_label)
    x = _logits(dtype=torch.float64, seed=19)

    def formula(xi):
        keep = ~t[:, -1:] if ignore_label is not None else torch.ones_like(t[:, :1])
        g = t[:, :3].double() * keep
        p = torch.sigmoid(xi) * keep
        axes = (0, 2, 3, 4) if batch_dice else (2, 3, 4)
        tp = (p * g).sum(axes)
        fp, fn = p.sum(axes) - tp, g.sum(axes) - tp
        tv = (1 - (tp + 1e-5) / (tp + 0.3 * fp + 0.7 * fn + 1e-5)).mean()
        bce = F.binary_cross_entropy_with_logits(xi, t[:, :3].double(), reduction="none")
        return tv + 0.6 * (bce * keep).sum() / (3 * keep.sum())

    want = _value_and_grad(formula, x)
    for target in (y, t, y.to(torch.int16)):
        got = _no_slow_path(_value_and_grad, loss, x, target)
        _assert_close(got, want, torch.float64, f"tversky+bce {target.dtype}")

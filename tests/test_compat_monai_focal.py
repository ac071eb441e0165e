"""``compat.monai.FocalLoss`` and ``DiceFocalLoss`` against MONAI's own classes (MONAI 1.6).

MONAI computes its focal term in float32 whatever the input's dtype (``input.float()``);
the drop-ins compute it in the input's precision. So values and gradients are compared,
in float64 at 1e-7 relative, with MONAI run with ``Tensor.float`` casting to float64
(:func:`_helpers.monai_focal_float64`), while dtypes, warnings and errors are compared
with MONAI as it is, and the values with it too at float32's rounding. Random option
sweeps, then MONAI's own test cases (tests/losses/test_focal_loss.py,
test_dice_focal_loss.py) re-expressed.
"""

from __future__ import annotations

import inspect
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

monai_losses = pytest.importorskip("monai.losses", reason="MONAI is in the [test] extra")

from _helpers import monai_focal_float64 as _monai64  # noqa: E402
from _helpers import monai_slow_path_warnings  # noqa: E402

from fasttversky.compat import monai as ours  # noqa: E402
from fasttversky.compat.monai import SlowPathWarning  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(fn, x, y):
    """(value, input grad, exception type, UserWarning texts, SlowPathWarning texts)."""
    xi = x.detach().clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            out = fn(xi, y)
        except Exception as exc:  # parity includes the errors
            return None, None, type(exc), None, None
        out.sum().backward()
    user = [str(w.message) for w in rec if w.category is UserWarning]
    slow = [str(w.message) for w in rec if w.category is SlowPathWarning]
    return out.detach(), xi.grad, None, user, slow


def _close(name, got, want, rtol):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    nan = torch.isnan(want)  # MONAI's own NaN (e.g. d(0^0.5)/dp): ours must be NaN there
    assert torch.equal(torch.isnan(got), nan), f"{name}: NaN where MONAI has none, or not"
    got, want = got[~nan], want[~nan]
    if want.numel() == 0:
        return
    tol = rtol * max(want.abs().max().item(), 1e-30)
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol, f"{name}: max |diff| {err:.3e} > {tol:.3e}"


def _parity(cls, kw, x, y, fused: bool):
    """Ours against MONAI: errors, warnings and dtype as MONAI gives them; value and
    gradient 1e-7 (relative to the largest) against MONAI at float64."""
    want = _run(getattr(monai_losses, cls)(**kw), x, y)
    mine = getattr(ours, cls)(**kw)
    path = mine.explain(x, y) if want[2] is None else ""
    got = _run(mine, x, y)
    assert got[2] is want[2], f"{kw}: exception {got[2]} vs MONAI {want[2]}"
    if want[2] is not None:
        return
    assert got[3] == want[3], f"{kw}: warnings {got[3]} vs MONAI {want[3]}"
    if fused:
        assert path.startswith("fused"), f"{kw}: {path}"
    assert got[4] == monai_slow_path_warnings(cls, path), f"{kw}: {path} {got[4]}"
    assert got[0].dtype == want[0].dtype, f"{kw}: dtype {got[0].dtype} vs {want[0].dtype}"
    with _monai64():
        want64 = _run(getattr(monai_losses, cls)(**kw), x, y)
    _close(f"{kw} value", got[0], want64[0], 1e-7)
    _close(f"{kw} grad", got[1], want64[1], 1e-7)
    _close(f"{kw} value vs MONAI in float32", got[0], want[0], 1e-5)


def _case(C, kind, seed, shape=(3, 4, 5)):
    """(input (2, C, *shape) float64, target of ``kind``)."""
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(2, C, *shape, generator=g, dtype=torch.float64)
    labels = torch.randint(0, max(C, 2), (2, 1, *shape), generator=g)
    if kind == "labels_int64":
        return x, labels
    if kind == "labels_uint8":
        return x, labels.to(torch.uint8)
    if kind == "labels_float":
        return x, labels.double()
    if C == 1:
        onehot = labels
    else:
        onehot = F.one_hot(labels[:, 0], C).movedim(-1, 1)
    if kind == "onehot_uint8":
        return x, onehot.to(torch.uint8)
    if kind == "soft_float":
        return x, torch.rand(onehot.shape, generator=g, dtype=torch.float64)
    return x, onehot.double()


_LABEL_KINDS = ("labels_int64", "labels_uint8", "labels_float")
_DENSE_KINDS = ("onehot_float", "onehot_uint8", "soft_float")


def _kept(C, bg, values):
    n = C if bg or C == 1 else C - 1
    return values[:n]


@pytest.mark.parametrize("seed", range(10))
def test_dice_focal_equals_monai_on_random_options(seed):
    rng = random.Random(seed)
    for i in range(10):
        C = rng.choice([1, 2, 3, 4])
        act = rng.choice(["sigmoid", "softmax", "none", "other_act"])
        onehot_y = C > 1 and rng.random() < 0.6
        kind = rng.choice(_LABEL_KINDS if onehot_y else _DENSE_KINDS)
        bg = rng.random() < 0.5
        red = rng.choice(["mean", "sum", "mean", "sum", "none"])
        squared = rng.random() < 0.1
        weight = rng.choice([None, 0.7, _kept(C, bg, [0.3, 1.2, 2.0, 0.5])])
        if isinstance(weight, list) and len(weight) == 1:
            weight = None  # MONAI's focal term raises for a per-class weight of 1 channel
        kw = dict(
            include_background=bg,
            to_onehot_y=onehot_y,
            sigmoid=act == "sigmoid",
            softmax=act == "softmax",
            other_act=torch.tanh if act == "other_act" else None,
            squared_pred=squared,
            jaccard=rng.random() < 0.3,
            reduction=red,
            smooth_nr=rng.choice([1e-5, 0.0, 0.5]),
            smooth_dr=rng.choice([1e-5, 1.0]),
            batch=rng.random() < 0.5,
            gamma=rng.choice([0.0, 0.5, 2.0, 3.0]),
            weight=weight,
            lambda_dice=rng.choice([1.0, 0.0, 0.6]),
            lambda_focal=rng.choice([1.0, 0.0, 1.7]),
            alpha=rng.choice([None, 0.25, 0.8]),
        )
        x, y = _case(C, kind, seed * 100 + i)
        both_zero = kw["lambda_dice"] == kw["lambda_focal"] == 0  # MONAI's 0: not fused
        fused = red != "none" and not squared and not both_zero
        _parity("DiceFocalLoss", kw, x, y, fused)


@pytest.mark.parametrize("seed", range(12))
def test_focal_equals_monai_on_random_options(seed):
    rng = random.Random(1000 + seed)
    for _ in range(10):
        C = rng.choice([1, 2, 3, 4])
        softmax = C > 1 and rng.random() < 0.5
        onehot_y = C > 1 and rng.random() < 0.6
        kind = rng.choice(_LABEL_KINDS if onehot_y else _DENSE_KINDS)
        bg = rng.random() < 0.7
        alpha = rng.choice([None, 0.25, 0.8, _kept(C, bg, [0.2, 0.5, 0.9, 0.4])])
        weight = rng.choice([None, 1.5, _kept(C, bg, [0.3, 1.2, 2.0, 0.5])])
        if isinstance(weight, list) and len(weight) == 1:
            weight = None
        red = rng.choice(["mean", "sum", "mean", "sum", "none"])
        ignore = rng.choice([None, None, 1, 255])
        kw = dict(
            include_background=bg,
            to_onehot_y=onehot_y,
            gamma=rng.choice([0.0, 0.5, 2.0]),
            alpha=alpha,
            weight=weight,
            reduction=red,
            use_softmax=softmax,
            ignore_index=ignore,
        )
        x, y = _case(C, kind, 7 * seed + C)
        label_map = onehot_y or (C == 1 and kind == "onehot_uint8")
        if ignore is not None and label_map:  # voxels holding the ignore label
            y = y.clone()
            y[:, :, 0] = ignore
        seq_alpha = isinstance(alpha, list)
        fused = (
            red != "none"
            and (bg or not softmax)
            and not (seq_alpha and not softmax)
            and not (seq_alpha and len(alpha) == 1)
            and (ignore is None or (label_map and red == "mean"))
        )
        _parity("FocalLoss", kw, x, y, fused)


@pytest.mark.parametrize(
    "kw,C,kind",
    [
        (dict(softmax=True, to_onehot_y=True), 3, "labels_uint8"),
        (dict(sigmoid=True, to_onehot_y=True, include_background=False), 4, "labels_float"),
        (dict(sigmoid=True), 1, "onehot_float"),
        (dict(softmax=True, batch=True, weight=[1.0, 2.0, 0.5]), 3, "soft_float"),
    ],
)
def test_dice_focal_common_configurations_are_fused(kw, C, kind):
    x, y = _case(C, kind, 3)
    _parity("DiceFocalLoss", kw, x, y, fused=True)
    passes = 1 if kw.get("sigmoid") else 2  # MONAI's focal term is always sigmoid
    assert ours.DiceFocalLoss(**kw).explain(x, y).startswith(f"fused: {passes} pass")


@pytest.mark.parametrize("dtype,k", [(torch.float32, 4.0), (torch.bfloat16, 2.0)])
@pytest.mark.parametrize(
    "cls,kw",
    [
        ("DiceFocalLoss", dict(sigmoid=True, to_onehot_y=True, alpha=0.25)),
        ("DiceFocalLoss", dict(softmax=True, to_onehot_y=True, include_background=False)),
        ("FocalLoss", dict(to_onehot_y=True, use_softmax=True, alpha=0.25)),
    ],
)
def test_low_precision_error_no_worse_than_monai(dtype, k, cls, kw):
    # flash-attention's rule: error vs MONAI at float64 at most k x MONAI's own error in
    # ``dtype`` (plus a floor for when MONAI happens to be exact).
    x, y = _case(3, "labels_uint8", 8, shape=(16, 16, 16))
    x = x.to(dtype)
    with _monai64():
        ref = _run(getattr(monai_losses, cls)(**kw), x.double(), y)
    lo = _run(getattr(monai_losses, cls)(**kw), x, y)
    got = _run(getattr(ours, cls)(**kw), x, y)
    assert not got[4] and got[0].dtype == lo[0].dtype and got[1].dtype == x.dtype
    for i, name in ((0, "value"), (1, "grad")):
        err_monai = (lo[i].double() - ref[i]).abs().max().item()
        err_ours = (got[i].double() - ref[i]).abs().max().item()
        floor = (1e-6 if dtype == torch.float32 else 1e-3) * ref[i].abs().max().item()
        assert err_ours <= k * err_monai + floor, (name, err_ours, err_monai)


def test_fallbacks_warn_once_and_match_monai():
    x, y = _case(3, "labels_int64", 4)
    for cls, kw in (
        ("FocalLoss", dict(use_softmax=True, include_background=False, to_onehot_y=True)),
        ("FocalLoss", dict(to_onehot_y=True, ignore_index=1, reduction="sum")),
        ("FocalLoss", dict(to_onehot_y=True, reduction="none")),
        ("DiceFocalLoss", dict(to_onehot_y=True, softmax=True, reduction="none")),
        ("DiceFocalLoss", dict(to_onehot_y=True, softmax=True, squared_pred=True)),
    ):
        _parity(cls, kw, x, y, fused=False)
        loss = getattr(ours, cls)(**kw)
        assert loss.explain(x, y).startswith("fallback")
        assert len(_run(loss, x, y)[4]) == 1
        assert not _run(loss, x, y)[4]  # once per reason


def test_nan_logits_give_nan_with_one_slow_path_warning():
    x, y = _case(3, "labels_int64", 5)
    x[0, 1, 0, 0, 0] = float("nan")
    for loss in (ours.DiceFocalLoss(softmax=True, to_onehot_y=True), ours.FocalLoss()):
        yy = y if isinstance(loss, ours.DiceFocalLoss) else F.one_hot(y[:, 0], 3).movedim(-1, 1)
        with pytest.warns(SlowPathWarning) as rec:
            out = loss(x, yy)
        assert torch.isnan(out) and len([w for w in rec if w.category is SlowPathWarning]) == 1


def test_float_label_maps_are_read_without_a_conversion_pass(monkeypatch):
    # Issue 28: the kernels read MONAI's float label maps as they are (on a backend that
    # reads them; with "auto" the drop-ins convert first where the backend "auto" picks
    # for integer labels does not, see _common.float_labels_keep_backend).
    from fasttversky.compat import _common

    def no_conversion(*args, **kwargs):
        raise AssertionError("float labels were converted before the kernels")

    monkeypatch.setattr(_common, "float_labels_to_int", no_conversion)
    x, y = _case(3, "labels_float", 6)
    for cls, kw in (
        ("TverskyLoss", dict(softmax=True, to_onehot_y=True, alpha=0.3, beta=0.7)),
        ("DiceLoss", dict(softmax=True, to_onehot_y=True)),
        ("DiceCELoss", dict(softmax=True, to_onehot_y=True)),
        ("DiceFocalLoss", dict(sigmoid=True, to_onehot_y=True)),
        ("FocalLoss", dict(to_onehot_y=True, use_softmax=True)),
    ):
        got = _run(getattr(ours, cls)(**kw, backend="torch"), x, y)
        want = _run(getattr(monai_losses, cls)(**kw), x, y)
        assert got[2] is None and not got[4], (cls, got[2], got[4])
        _close(f"{cls} value", got[0], want[0], 1e-5)


def test_non_integer_float_labels_are_truncated_like_monai():
    x, y = _case(3, "labels_float", 7)
    y = y + 0.5  # MONAI's one_hot truncates (.long())
    _parity("DiceFocalLoss", dict(sigmoid=True, to_onehot_y=True), x, y, fused=True)


def test_same_signature_and_defaults_as_monai():
    for cls in ("FocalLoss", "DiceFocalLoss"):
        mine = inspect.signature(getattr(ours, cls).__init__).parameters
        theirs = inspect.signature(getattr(monai_losses, cls).__init__).parameters
        assert list(mine)[: len(theirs)] == list(theirs), cls
        for name, p in theirs.items():
            assert mine[name].default == getattr(p.default, "value", p.default), (cls, name)


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="gamma"):
        ours.FocalLoss(gamma="two")
    with pytest.raises(TypeError, match="weight"):
        ours.DiceFocalLoss(weight="heavy")
    with pytest.raises(TypeError, match="weight"):
        ours.FocalLoss(weight="heavy")
    with pytest.raises(TypeError, match="alpha"):
        ours.FocalLoss(alpha="a")
    with pytest.raises(TypeError, match="use_softmax"):
        ours.FocalLoss(use_softmax="yes")
    with pytest.raises(ValueError, match="lambda_focal"):
        ours.DiceFocalLoss(lambda_focal=-1.0)
    with pytest.raises(ValueError, match="LossReduction"):
        ours.FocalLoss(reduction="unknown")


# ======================================================================================
# MONAI's own test cases (tests/losses/test_focal_loss.py), re-expressed
# ======================================================================================
_X = torch.tensor([[[[1.0, 1.0], [0.5, 0.0]]] * 3])  # (1, 3, 2, 2)
_Y = torch.tensor([[[[0, 1], [2, 0]]]])  # (1, 1, 2, 2)
_Y1H = F.one_hot(_Y[:, 0], 3).permute(0, 3, 1, 2)
_NONE = [
    [[0.02266, 0.70187], [0.37741, 0.17329]],
    [[0.70187, 0.02266], [0.37741, 0.17329]],
    [[0.70187, 0.70187], [0.06757, 0.17329]],
]
_NONE_W = [
    [[0.01133, 0.35093], [0.18871, 0.08664]],
    [[0.07019, 0.00227], [0.03774, 0.01733]],
    [[0.14037, 0.14037], [0.01352, 0.03466]],
]


@pytest.mark.parametrize(
    "kw,target,expected",
    [
        (dict(to_onehot_y=True), _Y, 0.34959),
        (dict(to_onehot_y=False), _Y1H, 0.34959),
        (dict(to_onehot_y=True, include_background=False), _Y, 0.36498),
        (dict(to_onehot_y=True, alpha=0.8), _Y, 0.08423),
        (dict(to_onehot_y=True, reduction="none"), _Y, [_NONE]),
        (dict(to_onehot_y=True, weight=torch.tensor([0.5, 0.1, 0.2]), reduction="none"), _Y,
         [_NONE_W]),
        (dict(to_onehot_y=True, use_softmax=True), _Y, 0.16276),
        (dict(to_onehot_y=True, alpha=0.8, use_softmax=True), _Y, 0.08138),
    ],
)  # fmt: skip
def test_monai_focal_values(kw, target, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowPathWarning)
        got = ours.FocalLoss(**kw)(_X, target)
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("gamma", [0.0, 0.1])
@pytest.mark.parametrize("onehot_y", [False, True])
def test_monai_focal_with_gamma_0_is_bce(gamma, onehot_y):
    g = torch.Generator().manual_seed(9)
    for _ in range(3):
        x = torch.rand(16, 10, 8, 4, generator=g)
        if onehot_y:
            lab = torch.randint(0, 10, (16, 1, 8, 4), generator=g)
            y, y1h = lab, F.one_hot(lab[:, 0], 10).permute(0, 3, 1, 2).float()
        else:
            y = y1h = torch.randint(0, 2, (16, 10, 8, 4), generator=g).float()
        for red in ("mean", "none"):
            got = ours.FocalLoss(to_onehot_y=onehot_y, gamma=gamma, reduction=red, weight=1.0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SlowPathWarning)
                got = got(x, y)
            bce = F.binary_cross_entropy_with_logits(x, y1h, reduction=red)
            err = (got - bce).abs().max().item()
            assert (err < 1e-6) if gamma == 0 else (err > 1e-3), (red, err)


@pytest.mark.parametrize("use_softmax", [False, True])
@pytest.mark.parametrize(
    "target",
    [
        [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]],  # binary
        [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],  # one class empty
        [[0, 0, 0, 0], [0, 1, 2, 0], [0, 3, 4, 0], [0, 0, 0, 0]],  # 6 classes
        [[[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]] * 3,  # binary 3D
    ],
)
def test_monai_focal_near_zero_for_a_very_good_prediction(use_softmax, target):
    t = torch.tensor(target).unsqueeze(0)
    C = 6 if t.max() > 1 else 2
    t1h = F.one_hot(t, C).movedim(-1, 1)
    x = 1000 * t1h.float() - 500.0
    for alpha in (None, 0.5):
        for onehot_y, y in ((True, t.unsqueeze(1)), (False, t1h)):
            loss = ours.FocalLoss(to_onehot_y=onehot_y, alpha=alpha, use_softmax=use_softmax)
            assert abs(loss(x, y).item()) < 1e-3


def test_monai_focal_foreground():
    background, foreground = torch.ones(1, 1, 5, 5), torch.zeros(1, 1, 5, 5)
    target = torch.cat((background, foreground), dim=1)
    x = torch.cat((background, foreground), dim=1)
    target[:, 0, 2, 2], target[:, 1, 2, 2] = 0, 1
    assert abs(ours.FocalLoss(include_background=True)(x, target).item() - 0.1116) < 1e-3
    assert abs(ours.FocalLoss(include_background=False)(x, target).item() - 0.1733) < 1e-3


def test_monai_focal_errors_and_warnings():
    with pytest.raises(ValueError):
        ours.FocalLoss(reduction="unknown")(torch.ones((1, 2, 3)), torch.ones((1, 2, 3)))
    with pytest.raises(ValueError):
        ours.FocalLoss(reduction="mean")(torch.ones((1, 2, 3)), torch.ones((1, 3)))
    x4 = torch.ones((1, 4, 3, 3))
    for kw in (
        dict(include_background=True, weight=(1.0, 1.0, 2.0)),
        dict(include_background=False, weight=(1.0, 1.0, 1.0, 1.0)),
        dict(include_background=False, weight=(1.0, 1.0, -1.0)),
    ):
        with pytest.raises(ValueError):
            ours.FocalLoss(**kw)(x4, x4)
    for kw, x in (
        (dict(to_onehot_y=True), torch.ones((1, 1, 3))),
        (dict(include_background=False), torch.ones((1, 1, 3))),
        (dict(include_background=False, use_softmax=True, alpha=0.5), torch.ones((1, 3, 3))),
    ):
        with pytest.warns(UserWarning):
            ours.FocalLoss(**kw)(x, x)


# ======================================================================================
# MONAI's own test cases (tests/losses/test_dice_focal_loss.py), re-expressed
# ======================================================================================
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("weight", [None, torch.tensor([1.0, 1.0, 2.0]), (3, 2.0, 1)])
@pytest.mark.parametrize("alpha", [None, 0.25])
def test_monai_dice_focal_is_dice_plus_focal(reduction, weight, alpha):
    g = torch.Generator().manual_seed(10)
    label = torch.randint(0, 2, (3, 3, 5, 5), generator=g)
    pred = torch.randn(3, 3, 5, 5, generator=g)
    common = dict(include_background=True, to_onehot_y=False, reduction=reduction, weight=weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowPathWarning)
        for lam in (0.5, 1.0, 1.5):
            got = ours.DiceFocalLoss(gamma=1.0, lambda_focal=lam, alpha=alpha, **common)(
                pred, label
            )
            dice = ours.DiceLoss(**common)(pred, label)
            focal = ours.FocalLoss(gamma=1.0, alpha=alpha, **common)(pred, label)
            torch.testing.assert_close(got, dice + lam * focal, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size,onehot", [([3, 3, 5, 5], True), ([3, 2, 5, 5], False)])
def test_monai_dice_focal_softmax_without_background(size, onehot):
    g = torch.Generator().manual_seed(11)
    label = torch.randint(0, size[1] - 1, size, generator=g)
    if onehot:
        label = torch.argmax(label, dim=1, keepdim=True)
    pred = torch.randn(size, generator=g)
    weights = [2.0] if size[1] != 3 else [torch.tensor([1.0, 2.0]), (2.0, 1)]
    for reduction in ("sum", "mean", "none"):
        for weight in weights:
            common = dict(include_background=False, to_onehot_y=onehot, reduction=reduction,
                          weight=weight)  # fmt: skip
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SlowPathWarning)
                got = ours.DiceFocalLoss(softmax=True, lambda_focal=0.5, **common)(pred, label)
                dice = ours.DiceLoss(softmax=True, **common)(pred, label)
                focal = ours.FocalLoss(**common)(pred, label)
            torch.testing.assert_close(got, dice + 0.5 * focal, rtol=1e-6, atol=1e-6)


def test_monai_dice_focal_errors():
    loss = ours.DiceFocalLoss()
    with pytest.raises(AssertionError):
        loss(torch.ones((1, 2, 3)), torch.ones((1, 2, 5)))
    with pytest.raises(ValueError):
        loss(torch.ones((1, 2, 3)), torch.ones((1, 1, 2, 3)))
    with pytest.raises(ValueError):
        loss(torch.ones((1, 3, 4, 4)), torch.ones((1, 2, 4, 4)))
    with pytest.raises(ValueError):
        ours.DiceFocalLoss(lambda_dice=-1.0)

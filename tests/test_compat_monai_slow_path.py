"""When ``fasttversky.compat.monai`` says it took the slower path (issue 26 item 2).

Every drop-in, for an option or input that cannot be fused, computes MONAI's result in
plain torch and gives one ``SlowPathWarning`` naming the class and ``explain()``'s
reason: once per instance and reason (a training loop hears it on its first step), again
for a new reason or a new instance, never before MONAI's own error, and attributed to the
caller's line. Values and gradients still equal MONAI's (float64 against MONAI at
float64, tolerances from ``_helpers.TOLERANCES``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

monai_losses = pytest.importorskip("monai.losses", reason="MONAI is in the [test] extra")

from _helpers import (  # noqa: E402
    TOLERANCES,
    is_monai_refusal_warning,
    monai_focal_float64,
    monai_slow_path_warnings,
)

from fasttversky.compat import monai as ours  # noqa: E402
from fasttversky.compat.monai import SlowPathWarning  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

_REQUIRES_GRAD = "target requires grad; the fused path has no gradient w.r.t. the target"

# (class, options that cannot be fused, target kind, explain()'s reason)
_OPTION_FALLBACKS = [
    ("TverskyLoss", dict(sigmoid=True, soft_label=True), "soft",
     "soft_label=True with a float target (may be soft)"),
    ("DiceLoss", dict(softmax=True, to_onehot_y=True, squared_pred=True), "labels",
     "squared_pred=True (sums of p², not of p)"),
    ("GeneralizedDiceLoss", dict(sigmoid=True, soft_label=True), "soft",
     "soft_label=True with a float target (may be soft)"),
    ("DiceCELoss", dict(softmax=True, to_onehot_y=True, squared_pred=True), "labels",
     "squared_pred=True (sums of squares are not the kernels' sums)"),
    ("FocalLoss", dict(to_onehot_y=True, reduction="none"), "labels",
     "reduction='none' (a voxel-sized result)"),
    ("DiceFocalLoss", dict(softmax=True, to_onehot_y=True, squared_pred=True), "labels",
     "squared_pred=True (sums of p², not of p)"),
]  # fmt: skip
_IDS = [case[0] for case in _OPTION_FALLBACKS]


def _case(kind: str, seed: int = 3):
    """(input (2, 3, 4, 5, 3) float64, a label map or a soft target)."""
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(2, 3, 4, 5, 3, generator=g, dtype=torch.float64)
    if kind == "soft":
        return x, torch.rand(x.shape, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (2, 1, 4, 5, 3), generator=g)


def _call(loss, x, y, backward=True):
    """(value, input grad, the SlowPathWarnings given) of one call and its backward."""
    xi = x.detach().clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = loss(xi, y)
    if backward:
        out.sum().backward()
    return out.detach(), xi.grad, [w for w in rec if w.category is SlowPathWarning]


def _expected(cls, reason):
    return monai_slow_path_warnings(cls, f"fallback: {reason}")


def _close(name, got, want):
    """``got`` equals ``want`` (same shape and dtype) to the float64 tolerance of the
    table, or one rounding to a narrower result dtype, relative to max |want|."""
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.dtype, want.dtype)
    rtol = max(TOLERANCES[torch.float64][0], torch.finfo(got.dtype).eps)
    err = (got - want).abs().max().item()
    assert err <= rtol * want.abs().max().item(), f"{name}: max |diff| {err:.3e}"


@pytest.mark.parametrize("cls,kw,kind,reason", _OPTION_FALLBACKS, ids=_IDS)
def test_an_option_fallback_warns_once_per_instance_and_equals_monai(cls, kw, kind, reason):
    x, y = _case(kind)
    loss = getattr(ours, cls)(**kw)
    assert loss.explain(x, y) == f"fallback: {reason}"
    value, grad, slow = _call(loss, x, y)
    assert [str(w.message) for w in slow] == _expected(cls, reason)
    assert slow[0].filename == __file__, slow[0].filename  # the caller's line, not ours
    theirs = lambda: _call(getattr(monai_losses, cls)(**kw), x, y)  # noqa: E731
    want, want_grad, _ = theirs()
    if "Focal" in cls:  # MONAI rounds its focal term to float32: compare at float64
        with monai_focal_float64():
            want64, want_grad, _ = theirs()
        want = want64.to(want.dtype)  # in MONAI's result dtype
    _close(f"{cls} value", value, want)
    _close(f"{cls} grad", grad, want_grad)
    # the next training step: the same value, no warning
    again = _call(loss, x, y)
    assert not again[2], [str(w.message) for w in again[2]]
    assert torch.equal(again[0], value) and torch.equal(again[1], grad)


@pytest.mark.parametrize("cls,kw,kind,reason", _OPTION_FALLBACKS, ids=_IDS)
def test_a_new_reason_or_a_new_instance_warns_again(cls, kw, kind, reason):
    x, y = _case(kind)
    loss = getattr(ours, cls)(**kw)
    assert len(_call(loss, x, y)[2]) == 1
    # a target that requires grad is another reason, checked before the options (forward
    # only: MONAI's GeneralizedDiceLoss cannot differentiate it, in-place weights)
    yg = y.detach().double().clone().requires_grad_(True)
    assert loss.explain(x, yg) == f"fallback: {_REQUIRES_GRAD}"
    slow = _call(loss, x, yg, backward=False)[2]
    assert [str(w.message) for w in slow] == _expected(cls, _REQUIRES_GRAD)
    assert not _call(loss, x, yg, backward=False)[2]
    assert not _call(loss, x, y)[2]  # both reasons remembered
    fresh = getattr(ours, cls)(**kw)
    assert [str(w.message) for w in _call(fresh, x, y)[2]] == _expected(cls, reason)


# (class, options, input, target) where MONAI raises: the drop-in raises the same error,
# with no SlowPathWarning, however often it is called
_MONAI_RAISES = [
    ("TverskyLoss", dict(sigmoid=True), (2, 3, 4), (2, 2, 4)),
    ("DiceLoss", dict(sigmoid=True, squared_pred=True), (2, 3, 4), (2, 2, 4)),
    ("GeneralizedDiceLoss", dict(sigmoid=True), (2, 3, 4), (2, 2, 4)),
    ("DiceCELoss", dict(), (1, 3, 4, 4), (1, 2, 4, 4)),
    ("FocalLoss", dict(), (2, 3, 4), (2, 2, 4)),
    ("DiceFocalLoss", dict(sigmoid=True), (2, 3, 4), (2, 2, 4)),
]


@pytest.mark.parametrize("cls,kw,xs,ys", _MONAI_RAISES, ids=[c[0] for c in _MONAI_RAISES])
def test_monai_errors_come_without_a_slow_path_warning(cls, kw, xs, ys):
    x, y = torch.rand(xs, dtype=torch.float64), torch.rand(ys, dtype=torch.float64)
    with pytest.raises(Exception) as want:
        getattr(monai_losses, cls)(**kw)(x, y)
    loss = getattr(ours, cls)(**kw)
    assert loss.explain(x, y).startswith("fallback: ")
    for _ in range(2):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            with pytest.raises(want.type):
                loss(x, y)
        assert not [w for w in rec if w.category is SlowPathWarning]


@pytest.mark.parametrize("cls", _IDS)
def test_refused_values_warn_once_per_instance_and_kind(cls):
    # NaN logits are found by the kernels while running: MONAI's NaN, one warning per
    # instance and kind of refusal, though the refusal's text (its count) changes.
    x, y = _case("labels")
    x[0, 1, 0, 0, 0] = float("nan")
    x2 = x.clone()
    x2[1, 2, 1, 1, 1] = float("nan")  # two NaNs: another text, the same kind
    kw = dict(to_onehot_y=True, **({} if cls == "FocalLoss" else dict(softmax=True)))
    if cls == "FocalLoss":
        kw["use_softmax"] = True
    loss = getattr(ours, cls)(**kw)
    assert loss.explain(x, y).startswith("fused")
    first, second, third = _call(loss, x, y), _call(loss, x, y), _call(loss, x2, y)
    for out in (first, second, third):
        assert torch.isnan(out[0]).all()
    assert len(first[2]) == 1 and not second[2] and not third[2], [second[2], third[2]]
    text = str(first[2][0].message)
    assert is_monai_refusal_warning(cls, text) and "non-finite" in text, text


def test_another_kind_of_refusal_warns_again():
    # TverskyLoss: NaN logits, then a soft target outside [0, 1] (MONAI computes with it)
    x, y = _case("soft")
    xn = x.clone()
    xn[0, 0, 0, 0, 0] = float("nan")
    loss = ours.TverskyLoss(sigmoid=True)
    assert len(_call(loss, xn, y)[2]) == 1
    value, grad, slow = _call(loss, x, 3 * y)
    assert len(slow) == 1 and is_monai_refusal_warning("TverskyLoss", str(slow[0].message))
    assert "non-finite" not in str(slow[0].message)
    want, want_grad, _ = _call(monai_losses.TverskyLoss(sigmoid=True), x, 3 * y)
    _close("value", value, want)
    _close("grad", grad, want_grad)


def test_a_warning_turned_into_an_error_is_raised_every_time():
    # Not counted as given when the filters raise it: every such call raises.
    x, y = _case("labels")
    loss = ours.DiceLoss(softmax=True, to_onehot_y=True, squared_pred=True)
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("error", SlowPathWarning)
            with pytest.raises(SlowPathWarning, match="squared_pred"):
                loss(x, y)


def test_common_configurations_give_no_warning():
    x, y = _case("labels")
    onehot = F.one_hot(y[:, 0], 3).movedim(-1, 1).double()
    for cls, kw, target in (
        ("TverskyLoss", dict(softmax=True, to_onehot_y=True, include_background=False), y),
        ("DiceLoss", dict(sigmoid=True, batch=True, weight=[0.5, 1.0, 2.0]), onehot),
        ("GeneralizedDiceLoss", dict(softmax=True, to_onehot_y=True), y),
        ("DiceCELoss", dict(softmax=True, to_onehot_y=True, weight=torch.ones(3).double()), y),
        ("FocalLoss", dict(use_softmax=True, to_onehot_y=True), y),
        ("DiceFocalLoss", dict(sigmoid=True, to_onehot_y=True), y),
    ):
        loss = getattr(ours, cls)(**kw)
        assert loss.explain(x, target).startswith("fused"), (cls, loss.explain(x, target))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss(x, target)

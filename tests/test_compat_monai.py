"""``fasttversky.compat.monai.TverskyLoss`` against ``monai.losses.TverskyLoss`` (MONAI 1.6).

Every option combination on small random volumes, in float64 so that any difference is
a semantic one (values rtol 1e-9, gradients too), then float32/bfloat16 with the
low-precision rule (error vs MONAI-in-float64 at most a few times MONAI's own error in
that dtype), plus warnings, errors, NaN, the path each case takes, and that importing
the compat module does not import MONAI.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import warnings

import pytest
import torch

monai_losses = pytest.importorskip("monai.losses")

from _helpers import is_monai_refusal_warning, monai_slow_path_warnings  # noqa: E402

import fasttversky  # noqa: E402
from fasttversky.compat.monai import SlowPathWarning, TverskyLoss  # noqa: E402

_AVAILABLE = [b for b in ("cpu", "torch") if fasttversky.available_backends()[b] is None]


@pytest.fixture(params=_AVAILABLE)
def backend(request):
    return request.param


pytestmark = pytest.mark.usefixtures("one_thread")


def _other_act(t):
    # Not a builtin: the compat class cannot special-case it.
    return torch.sigmoid(2.0 * t)


ACTS = {
    "none": {},
    "sigmoid": {"sigmoid": True},
    "softmax": {"softmax": True},
    "other_act": {"other_act": _other_act},
}
LABEL_KINDS = ("labels_int64", "labels_uint8", "labels_float", "labels_float_frac")
ONEHOT_KINDS = ("onehot_float", "onehot_uint8", "soft_float")


def _make_case(C, kind, ignore_index, dtype=torch.float64, shape=(4, 5, 6), B=2, seed=0):
    """(input (B, C, *shape) ``dtype``, target) for a target ``kind``.

    Label kinds: (B, 1, *shape) label map (for C = 1 a {0, 1} mask). One-hot kinds:
    (B, C, *shape). With an ``ignore_index`` the target holds that value (label kinds)
    or, for one-hot kinds and a sentinel, voxels with all channels zero.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((B, C, *shape), generator=gen, dtype=torch.float64).to(dtype)
    n_lab = max(C, 2)
    labels = torch.randint(0, n_lab, (B, 1, *shape), generator=gen)
    holes = torch.rand((B, 1, *shape), generator=gen) < 0.2
    if kind.startswith("labels"):
        if ignore_index is not None:
            labels = torch.where(holes, torch.full_like(labels, ignore_index), labels)
        if kind == "labels_int64":
            return x, labels
        if kind == "labels_uint8":
            return x, labels.to(torch.uint8)
        if kind == "labels_float":
            return x, labels.float()
        # non-integer float labels: MONAI's one_hot truncates them
        frac = labels.float() + 0.5
        if ignore_index is not None:  # ignored voxels keep the exact value
            frac = torch.where(holes, float(ignore_index), frac)
        return x, frac
    if C == 1:
        onehot = labels.double()
    else:
        onehot = torch.nn.functional.one_hot(labels[:, 0], C).movedim(-1, 1).double()
    if kind == "soft_float":
        onehot = torch.rand(onehot.shape, generator=gen, dtype=torch.float64)
    if ignore_index is not None:
        if C == 1:
            onehot = torch.where(holes, float(ignore_index), onehot)
        elif not 0 <= ignore_index < C:
            onehot = onehot * ~holes  # the sentinel case masks all-zero voxels
    if kind == "onehot_uint8":
        return x, onehot.to(torch.uint8)
    return x, onehot.to(torch.float64 if dtype == torch.float64 else torch.float32)


def _run(loss_fn, x, y):
    """(value, input grad, exception type, UserWarning texts, SlowPathWarnings); on an
    exception, the SlowPathWarnings given before it."""
    xi = x.detach().clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            out = loss_fn(xi, y)
        except Exception as exc:  # parity includes the errors
            slow = [str(w.message) for w in rec if w.category is SlowPathWarning]
            return None, None, type(exc), None, slow
        out.sum().backward()
    user = [str(w.message) for w in rec if w.category is UserWarning]
    slow = [str(w.message) for w in rec if w.category is SlowPathWarning]
    return out.detach(), xi.grad, None, user, slow


def _assert_close(name, got, want, rtol, atol):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got.double() - want.double()).abs()
    bad = diff > atol + rtol * want.double().abs()
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements differ, max |diff| "
            f"{diff.max().item():.3e}; first at {idx}: got {got[tuple(idx)].item()!r}, "
            f"want {want[tuple(idx)].item()!r}"
        )


def _slow_path_as_explained(cls, path, slow, allow_refusal=False):
    """The SlowPathWarnings of a first call: one naming ``explain()``'s reason for a
    fallback, none when fused -- or, with ``allow_refusal``, at most one saying that the
    kernels refused the values (found only while running, so not in ``path``)."""
    if allow_refusal and path.startswith("fused") and slow:
        assert len(slow) == 1 and is_monai_refusal_warning(cls, slow[0]), slow
    else:
        assert slow == monai_slow_path_warnings(cls, path), f"{path}: {slow}"


def _check_parity(kwargs, x, y, backend, rtol=1e-9, atol=1e-12, allow_slow=False, y_monai=None):
    want = _run(monai_losses.TverskyLoss(**kwargs), x, y if y_monai is None else y_monai)
    ours = TverskyLoss(**kwargs, backend=backend)
    path = ours.explain(x, y) if want[2] is None else ""
    got = _run(ours, x, y)
    assert got[2] is want[2], f"{kwargs}: exception {got[2]} vs MONAI {want[2]}"
    if want[2] is not None:
        assert not got[4], f"{kwargs}: {got[4]} before MONAI's error"
        return
    assert got[3] == want[3], f"{kwargs}: warnings {got[3]} vs MONAI {want[3]}"
    _slow_path_as_explained("TverskyLoss", path, got[4], allow_refusal=allow_slow)
    assert got[0].dtype == want[0].dtype, f"{kwargs}: dtype {got[0].dtype} vs {want[0].dtype}"
    _assert_close(f"{kwargs} value", got[0], want[0], rtol, atol)
    _assert_close(f"{kwargs} grad", got[1], want[1], rtol, atol)


_GRID = [
    (C, act, onehot_y, kind, ii)
    for C in (1, 3)
    for act in ACTS
    for onehot_y, kinds in ((True, LABEL_KINDS), (False, ONEHOT_KINDS))
    for kind in kinds
    for ii in (None, 1, 255)
    if not (C == 1 and kind == "labels_float_frac")  # a C = 1 target is used as values
]


@pytest.mark.parametrize(
    "C,act,to_onehot_y,kind,ignore_index",
    _GRID,
    ids=[f"C{c}-{a}-onehot{int(o)}-{k}-ii{i}" for c, a, o, k, i in _GRID],
)
def test_every_option_matches_monai_float64(C, act, to_onehot_y, kind, ignore_index):
    # The whole grid on the backend "auto" picks (what users get); the fallback
    # backend's kernels are checked against the reference elsewhere, and here below.
    backend = _AVAILABLE[0]
    x, y = _make_case(C, kind, ignore_index)
    for include_background, batch, reduction, soft_label in itertools.product(
        (True, False), (False, True), ("mean", "sum", "none"), (False, True)
    ):
        kwargs = dict(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            alpha=0.3,
            beta=0.7,
            reduction=reduction,
            batch=batch,
            soft_label=soft_label,
            ignore_index=ignore_index,
            smooth_nr=1e-4,
            smooth_dr=1e-3,
            **ACTS[act],
        )
        # MONAI quirk: soft_label=True runs linalg.vector_norm on the target itself, which
        # raises for an integer target that is not one-hot encoded by MONAI. The compat
        # class accepts it (a hard target); compare with MONAI on the same values as float.
        y_monai = None
        if soft_label and not y.is_floating_point() and not (to_onehot_y and C > 1):
            y_monai = y.double()
        _check_parity(kwargs, x, y, backend, y_monai=y_monai)


@pytest.mark.parametrize("spatial", [(17,), (6, 7), (3, 4, 5)])
def test_spatial_dims_and_defaults(backend, spatial):
    x, y = _make_case(4, "labels_int64", None, shape=spatial, B=3)
    _check_parity({}, x, torch.nn.functional.one_hot(y[:, 0], 4).movedim(-1, 1).double(), backend)
    _check_parity(dict(softmax=True, to_onehot_y=True), x, y, backend)


@pytest.mark.parametrize(
    "dtype,k", [(torch.float32, 4.0), (torch.bfloat16, 2.0), (torch.float16, 2.0)]
)
@pytest.mark.parametrize("act,kind", [("softmax", "labels_uint8"), ("sigmoid", "onehot_float")])
def test_low_precision_error_no_worse_than_monai(backend, dtype, k, act, kind):
    # flash-attention's rule: error vs MONAI in float64 at most k x MONAI's own error in
    # ``dtype`` (plus a floor for when MONAI happens to be exact).
    x, y = _make_case(3, kind, None, dtype=dtype, shape=(16, 16, 16), seed=3)
    kwargs = dict(
        to_onehot_y=kind.startswith("labels"),
        batch=False,
        reduction="none",
        alpha=0.3,
        beta=0.7,
        **ACTS[act],
    )
    y64 = y.double() if y.is_floating_point() else y
    ref = _run(monai_losses.TverskyLoss(**kwargs), x.double(), y64)
    lo = _run(monai_losses.TverskyLoss(**kwargs), x, y)
    got = _run(TverskyLoss(**kwargs, backend=backend), x, y)
    assert got[0].dtype == lo[0].dtype and got[1].dtype == x.dtype
    for i, name in ((0, "value"), (1, "grad")):
        err_monai = (lo[i].double() - ref[i]).abs().max().item()
        err_ours = (got[i].double() - ref[i]).abs().max().item()
        floor = 1e-6 if dtype == torch.float32 else 1e-3
        floor *= ref[i].abs().max().item()
        assert err_ours <= k * err_monai + floor, (name, err_ours, err_monai)


# ------------------------------------------------------------------------------------
# which path runs
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,C,kind,ii,path",
    [
        (dict(softmax=True, to_onehot_y=True), 3, "labels_uint8", None, "fused"),
        (dict(softmax=True, to_onehot_y=True), 3, "labels_float", None, "fused"),
        (dict(softmax=True, to_onehot_y=True, soft_label=True), 3, "labels_int64", 255, "fused"),
        (dict(softmax=True, to_onehot_y=True), 3, "labels_float", 255, "fused"),
        (dict(softmax=True, to_onehot_y=True), 3, "labels_float_frac", None, "fused"),
        (dict(softmax=True, to_onehot_y=True), 3, "labels_float_frac", 255, "fallback"),
        (dict(sigmoid=True), 1, "onehot_float", 255, "fused"),
        (dict(sigmoid=True), 3, "soft_float", None, "fused"),
        (dict(sigmoid=True), 3, "onehot_uint8", None, "fused"),
        (dict(sigmoid=True, soft_label=True), 3, "soft_float", None, "fallback"),
        (dict(sigmoid=True, soft_label=True), 3, "onehot_uint8", None, "fused"),
        (dict(soft_label=True), 3, "onehot_uint8", None, "fallback"),
        (dict(other_act=_other_act), 3, "onehot_float", None, "fused"),
        (dict(sigmoid=True), 3, "onehot_float", 1, "fallback"),
        (dict(sigmoid=True, alpha=-0.1), 3, "onehot_float", None, "fallback"),
    ],
)
def test_explain_path(kwargs, C, kind, ii, path):
    x, y = _make_case(C, kind, ii)
    assert TverskyLoss(**kwargs, ignore_index=ii).explain(x, y).startswith(path)


def test_fallbacks_match_monai(backend):
    # Cases outside the grid that take the mirror: negative alpha, target with grad.
    x, y = _make_case(3, "soft_float", None)
    _check_parity(dict(sigmoid=True, alpha=-0.2, beta=1.5), x, y, backend)
    yg = y.clone().requires_grad_(True)
    want = monai_losses.TverskyLoss(sigmoid=True)(x, yg)
    with pytest.warns(SlowPathWarning, match="target requires grad"):
        got = TverskyLoss(sigmoid=True, backend=backend)(x, yg)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    (gw,) = torch.autograd.grad(want, yg)
    (gg,) = torch.autograd.grad(got, yg)
    torch.testing.assert_close(gg, gw, rtol=1e-12, atol=0)


def test_negative_monai_term_keeps_monai_formula(backend):
    # fasttversky clamps 1 - T at 0; MONAI does not (1 - T < 0 when smooth_nr > smooth_dr
    # and the prediction is near-perfect): the compat class keeps MONAI's formula, fused.
    y = torch.nn.functional.one_hot(torch.arange(24).remainder(3).view(2, 3, 4), 3)
    y = y.movedim(-1, 1).double()
    x = 20.0 * (2 * y - 1)
    kw = dict(softmax=True, smooth_nr=1e-2, smooth_dr=1e-5)
    want = monai_losses.TverskyLoss(**kw)(x, y)
    assert want < 0
    loss = TverskyLoss(**kw, backend=backend)
    assert loss.explain(x, y).startswith("fused")
    torch.testing.assert_close(loss(x, y), want, rtol=1e-12, atol=0)
    assert fasttversky.tversky_loss(x, y, smooth_nr=1e-2, smooth_dr=1e-5) == 0


# ------------------------------------------------------------------------------------
# what the kernels refuse: MONAI's result or MONAI's error
# ------------------------------------------------------------------------------------
def test_nan_logits_give_monai_nan_with_slow_path_warning(backend):
    x, y = _make_case(3, "labels_uint8", None)
    x[0, 1, 0, 0, 0] = float("nan")
    want = monai_losses.TverskyLoss(softmax=True, to_onehot_y=True)(x, y)
    with pytest.warns(SlowPathWarning):
        got = TverskyLoss(softmax=True, to_onehot_y=True, backend=backend)(x, y)
    assert torch.isnan(want) and torch.isnan(got)


def test_out_of_range_soft_target_gives_monai_value(backend):
    x, y = _make_case(3, "onehot_float", None)
    y = y * 3.0  # MONAI takes any values
    _check_parity(dict(sigmoid=True), x, y, backend, allow_slow=True)
    assert _run(TverskyLoss(sigmoid=True, backend=backend), x, y)[4], "no SlowPathWarning"


@pytest.mark.parametrize("act", ["softmax", "sigmoid"])
@pytest.mark.parametrize(
    "kind,ii",
    [
        ("labels_uint8", 255),
        ("labels_float", 1),
        ("labels_int64", -100),
        ("labels_float", -100),
        ("onehot_float", None),
        ("soft_float", None),
    ],
)
def test_main_options_on_every_backend(backend, act, kind, ii):
    x, y = _make_case(3, kind, ii)
    for include_background, batch in itertools.product((True, False), (False, True)):
        kwargs = dict(
            include_background=include_background,
            batch=batch,
            reduction="none",
            to_onehot_y=kind.startswith("labels"),
            ignore_index=ii,
            alpha=0.2,
            beta=0.8,
            **ACTS[act],
        )
        _check_parity(kwargs, x, y, backend)


@pytest.mark.parametrize(
    "kwargs,C,kind,mutate",
    [
        (dict(softmax=True, to_onehot_y=True), 3, "labels_int64", lambda y: y + 5),  # scatter
        (dict(softmax=True, to_onehot_y=True), 3, "labels_int64", lambda y: y[:, 0]),  # shape
        (dict(softmax=True), 3, "labels_int64", lambda y: y),  # labels without to_onehot_y
        (dict(sigmoid=True), 3, "onehot_float", lambda y: y[:, :2]),
    ],
)
def test_errors_match_monai(backend, kwargs, C, kind, mutate):
    x, y = _make_case(C, kind, None)
    _check_parity(kwargs, x, mutate(y), backend, allow_slow=True)


def test_constructor_errors_match_monai():
    for kwargs in (
        dict(sigmoid=True, softmax=True),
        dict(softmax=True, other_act=torch.tanh),
        dict(other_act=3),
        dict(reduction="avg"),
    ):
        with pytest.raises(Exception) as want:
            monai_losses.TverskyLoss(**kwargs)
        with pytest.raises(want.type):
            TverskyLoss(**kwargs)


def test_same_signature_and_defaults_as_monai():
    import inspect

    ours = inspect.signature(TverskyLoss.__init__).parameters
    theirs = inspect.signature(monai_losses.TverskyLoss.__init__).parameters
    for name, p in theirs.items():
        assert name in ours, name
        want = getattr(p.default, "value", p.default)  # LossReduction.MEAN -> "mean"
        assert ours[name].default == want, name
        assert ours[name].kind == p.kind, name
    assert list(ours)[: len(theirs)] == list(theirs)
    from monai.utils import LossReduction

    assert TverskyLoss(reduction=LossReduction.SUM).reduction == "sum"


def test_metatensor_inputs(backend):
    from monai.data import MetaTensor

    x, y = _make_case(3, "labels_float", None)
    kw = dict(softmax=True, to_onehot_y=True)
    grads = []
    for loss_fn in (TverskyLoss(**kw, backend=backend), monai_losses.TverskyLoss(**kw)):
        xm = MetaTensor(x.clone()).requires_grad_(True)  # a leaf, like a network's output
        out = loss_fn(xm, MetaTensor(y))
        out.backward()
        grads.append((out.as_subclass(torch.Tensor), xm.grad.as_subclass(torch.Tensor)))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=0)


def test_import_does_not_import_monai():
    code = (
        "import sys, fasttversky.compat.monai, fasttversky.compat;"
        "bad = [m for m in sys.modules if m == 'monai' or m.startswith('monai.')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ======================================================================================
# DiceCELoss
# ======================================================================================
from _helpers import TOLERANCES  # noqa: E402

from fasttversky.compat.monai import DiceCELoss  # noqa: E402


def _dce_parity(kwargs, x, y, backend="auto", rtol=1e-9, atol=1e-12, expect_fused=None):
    want = _run(monai_losses.DiceCELoss(**kwargs), x, y)
    ours = DiceCELoss(**kwargs, backend=backend)
    path = ours.explain(x, y) if want[2] is None else ""
    got = _run(ours, x, y)
    assert got[2] is want[2], f"{kwargs}: exception {got[2]} vs MONAI {want[2]}"
    if want[2] is not None:
        assert not got[4], f"{kwargs}: {got[4]} before MONAI's error"
        return
    assert got[3] == want[3], f"{kwargs}: warnings {got[3]} vs MONAI {want[3]}"
    _slow_path_as_explained("DiceCELoss", path, got[4])
    if expect_fused is not None:
        assert path.startswith("fused") == expect_fused, f"{kwargs}: {path}"
    assert got[0].dtype == want[0].dtype, f"{kwargs}: dtype {got[0].dtype} vs {want[0].dtype}"
    _assert_close(f"{kwargs} value", got[0], want[0], rtol, atol)
    _assert_close(f"{kwargs} grad", got[1], want[1], rtol, atol)


_DCE_GRID = [
    (C, act, kind)
    for C in (1, 3)
    for act in ACTS
    for kind in ("labels_float", "labels_uint8", "onehot_float", "onehot_uint8", "soft_float")
]


@pytest.mark.parametrize("C,act,kind", _DCE_GRID, ids=[f"C{c}-{a}-{k}" for c, a, k in _DCE_GRID])
def test_dice_ce_every_option_matches_monai_float64(C, act, kind):
    x, y = _make_case(C, kind, None, seed=C)
    if y.is_floating_point():  # a float32 target makes MONAI's BCE round to float32
        y = y.double()
    gen = torch.Generator().manual_seed(7)
    w = torch.rand(C, generator=gen, dtype=torch.float64) + 0.1
    combos = itertools.product(
        (True, False), (False, True), ("mean", "sum"), (False, True), (None, w), (False,)
    )
    # squared_pred (always the slower path) once per case rather than on the whole grid
    for ib, batch, red, jaccard, weight, squared in [*combos, (False, True, "sum", True, w, True)]:
        kwargs = dict(
            include_background=ib,
            to_onehot_y=kind.startswith("labels"),
            reduction=red,
            batch=batch,
            jaccard=jaccard,
            weight=weight,
            squared_pred=squared,
            smooth_nr=1e-4,
            smooth_dr=1e-3,
            lambda_dice=1.3,
            lambda_ce=0.7,
            **ACTS[act],
        )
        # Fused but for squared_pred, MONAI's BCE pos_weight (C = 1) and a weighted CE
        # sum over a label map (which needs a class histogram).
        fused = not squared and (
            weight is None or (C > 1 and not (kind.startswith("labels") and red == "sum"))
        )
        _dce_parity(kwargs, x, y, expect_fused=fused)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("spatial", [(17,), (6, 7), (3, 4, 5)])
def test_dice_ce_backends_and_dims(backend, spatial):
    x, y = _make_case(4, "labels_int64", None, shape=spatial, B=3)
    _dce_parity(dict(softmax=True, to_onehot_y=True), x, y, backend, expect_fused=True)
    x1, y1 = _make_case(1, "labels_uint8", None, shape=spatial, B=3)
    _dce_parity(dict(sigmoid=True), x1, y1, backend, expect_fused=True)


def test_dice_ce_float32_within_tolerance_of_monai():
    loss_rtol, grad_rtol = TOLERANCES[torch.float32]
    for kw, C, kind in (
        (dict(softmax=True, to_onehot_y=True, include_background=False), 3, "labels_uint8"),
        (dict(sigmoid=True, batch=True), 1, "labels_float"),
    ):
        x, y = _make_case(C, kind, None, dtype=torch.float32, shape=(16, 16, 8), seed=3)
        got = _run(DiceCELoss(**kw), x, y)
        want = _run(monai_losses.DiceCELoss(**kw), x.double(), y)
        assert not got[4]
        _assert_close(f"{kw} value", got[0], want[0], 0, loss_rtol * want[0].abs().item())
        _assert_close(f"{kw} grad", got[1], want[1], 0, grad_rtol * want[1].abs().max().item())


# MONAI's own DiceCELoss test cases (tests/losses/test_dice_ce_loss.py), re-expressed on
# our own volumes: the input is a 0/1 map equal to the one-hot target, so with no
# activation the Dice term is exactly 0 and CE of two logits (1, 0) on the right class
# is log(1 + 1/e) (MONAI's "-1 + log(1 + e)").
def _binary_case():
    gen = torch.Generator().manual_seed(11)
    lab = torch.randint(0, 2, (2, 1, 4, 3, 5), generator=gen)
    onehot = torch.cat([1 - lab, lab], 1).double()
    return onehot.clone(), lab, onehot


@pytest.mark.parametrize("target_kind", ["labels", "onehot_float", "onehot_uint8"])
def test_monai_case_zero_dice_plus_ce(target_kind):
    x, lab, onehot = _binary_case()
    target = {"labels": lab.double(), "onehot_float": onehot, "onehot_uint8": onehot.byte()}
    want = math.log(1 + math.exp(-1))
    for lam in (1.0, 2.5):
        kw = dict(to_onehot_y=target_kind == "labels", lambda_ce=lam)
        got = DiceCELoss(**kw)(x, target[target_kind])
        assert abs(got.item() - lam * want) < 1e-12, (kw, got.item(), lam * want)
        _dce_parity(kw, x, target[target_kind])


def test_monai_case_weights_without_background():
    # MONAI applies no Dice weight when one class is left (weight [w0, w1] -> [w1]) but
    # weighs CE by class; logits saturated at 100 on some voxels.
    x, lab, _ = _binary_case()
    x = x.clone()
    x[0, 0, 0] = 100.0
    for w in ([1.0, 1.0], [0.0, 1.0], [0.3, 2.0]):
        kw = dict(include_background=False, to_onehot_y=True, weight=torch.tensor(w).double())
        _dce_parity(kw, x, lab.double())
        _dce_parity({**kw, "softmax": True}, x, lab.double(), expect_fused=True)


def test_monai_case_sigmoid_with_pos_weight():
    # One channel: MONAI's weight is BCE's pos_weight (the slower path), checked against
    # the formula written out: Dice of sigmoid + mean of -(w y log s + (1-y) log(1-s)).
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 1, 3, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (2, 1, 3, 4), generator=gen).double()
    w = 0.5
    with pytest.warns(SlowPathWarning, match="pos_weight"):
        got = DiceCELoss(sigmoid=True, weight=torch.tensor([w]).double())(x, y)
    s = torch.sigmoid(x)
    tp, sp, sg = (s * y).sum((2, 3)), s.sum((2, 3)), y.sum((2, 3))
    dice = (1 - (2 * tp + 1e-5) / (sp + sg + 1e-5)).mean()
    bce = -(w * y * torch.log(s) + (1 - y) * torch.log(1 - s)).mean()
    assert abs(got.item() - (dice + bce).item()) < 1e-12


def test_dice_ce_errors_match_monai():
    for x, y in (
        (torch.ones((1, 2, 3)), torch.ones((1, 2, 5))),  # AssertionError (Dice shapes)
        (torch.ones((1, 2, 3)), torch.ones((1, 1, 2, 3))),  # ValueError (dims)
        (torch.ones((1, 3, 4, 4)), torch.ones((1, 2, 4, 4))),  # ValueError (channels)
    ):
        with pytest.raises(Exception) as want:
            monai_losses.DiceCELoss()(x, y)
        with pytest.raises(want.type):
            DiceCELoss()(x, y)
    for kwargs in (
        dict(reduction="none"),
        dict(lambda_dice=-1.0),
        dict(lambda_ce=-0.5),
        dict(sigmoid=True, softmax=True),
        dict(other_act=3),
    ):
        with pytest.raises(Exception) as want:
            monai_losses.DiceCELoss(**kwargs)
        with pytest.raises(want.type):
            DiceCELoss(**kwargs)


def test_dice_ce_same_signature_and_defaults_as_monai():
    import inspect

    ours = inspect.signature(DiceCELoss.__init__).parameters
    theirs = inspect.signature(monai_losses.DiceCELoss.__init__).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for name, p in theirs.items():
        assert ours[name].default == getattr(p.default, "value", p.default), name


def test_dice_ce_nan_logits_give_nan():
    x, y = _make_case(3, "labels_int64", None)
    x[0, 1, 0, 0, 0] = float("nan")
    with pytest.warns(SlowPathWarning):
        out = DiceCELoss(softmax=True, to_onehot_y=True)(x, y)
    assert torch.isnan(out)


def test_dice_ce_torch_export_round_trip():
    # MONAI's export case (default options: MONAI's path) and the fused path with an
    # integer label map: torch.export, save, load, same value. (Float label maps are
    # range-checked on the host, which export cannot trace.)
    import io

    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 2, 8, 8, generator=gen)
    labels = torch.randint(0, 2, (2, 1, 8, 8), generator=gen)
    for kw, y in (
        ({}, torch.ones(2, 2, 8, 8)),
        (dict(softmax=True, to_onehot_y=True), labels.to(torch.uint8)),
    ):
        buf = io.BytesIO()
        torch.export.save(torch.export.export(DiceCELoss(**kw), (x, y)), buf)
        buf.seek(0)
        got = torch.export.load(buf).module()(x, y)
        want = monai_losses.DiceCELoss(**kw)(x, y.float())
        _assert_close(f"export {kw}", got, want, TOLERANCES[torch.float32][0], 0)


# ======================================================================================
# Edge semantics: where MONAI gives NaN or raises, the drop-ins do too; constructors
# check every argument they store.
# ======================================================================================
def _all_nan(t):
    return t is not None and bool(torch.isnan(t).all())


@pytest.mark.parametrize(
    "weight,labels",
    [
        ([0.0, 1.0, 2.0], "all0"),  # every voxel in the zero-weight class
        ([0.0, 0.0, 2.0], "0or1"),
        ([0.0, 0.0, 0.0], "random"),  # every weight 0
    ],
)
@pytest.mark.parametrize("include_background", [True, False])
def test_dice_ce_nan_when_no_voxel_has_a_weighted_class(
    backend, weight, labels, include_background
):
    # MONAI's weighted CE is Σ w·ce / Σ w over the voxels = 0/0: NaN value, NaN gradient.
    x, y = _make_case(3, "labels_int64", None, seed=4)
    y = {"all0": y * 0, "0or1": y.clamp_max(1), "random": y}[labels]
    kw = dict(
        softmax=True,
        to_onehot_y=True,
        include_background=include_background,
        weight=torch.tensor(weight, dtype=torch.float64),
    )
    want = _run(monai_losses.DiceCELoss(**kw), x, y)
    got = _run(DiceCELoss(**kw, backend=backend), x, y)
    assert _all_nan(want[0]) and _all_nan(want[1])
    assert _all_nan(got[0]) and _all_nan(got[1]), got[0]
    path = DiceCELoss(**kw).explain(x, y)
    assert path.startswith("fallback: ")
    # the plan knows (no refusal): one SlowPathWarning with the plan's reason
    assert got[4] == monai_slow_path_warnings("DiceCELoss", path), got[4]


def test_dice_ce_zero_weights_that_leave_a_counted_voxel_stay_fused(backend):
    # One voxel of a weighted class is enough for MONAI's CE to be a number: fused, equal.
    x, y = _make_case(3, "labels_int64", None, seed=4)
    y = y * 0
    y[1, 0, 2, 3, 4] = 2
    for w in ([0.0, 1.0, 2.0], [0.0, 0.0, 0.5]):
        kw = dict(softmax=True, to_onehot_y=True, weight=torch.tensor(w, dtype=torch.float64))
        _dce_parity(kw, x, y, backend, expect_fused=True)
        _dce_parity({**kw, "include_background": False}, x, y, backend, expect_fused=True)


def test_dice_ce_zero_dice_weights_of_the_kept_classes_match_monai(backend):
    # weight [1, 0, 0] without the background: MONAI's Dice weights are all 0 (the Dice
    # term is 0), its CE is a number; the fused loss takes no all-zero class weights, so
    # the plan sends it to MONAI's computation without a refusal.
    x, y = _make_case(3, "labels_int64", None, seed=5)
    kw = dict(
        softmax=True,
        to_onehot_y=True,
        include_background=False,
        weight=torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64),
    )
    _dce_parity(kw, x, y, backend)


@pytest.mark.parametrize("wdtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("target_kind", ["labels_uint8", "onehot_float"])
def test_dice_ce_weight_of_another_dtype_matches_monai(wdtype, target_kind):
    # torch's CE raises for a label map with a weight of another dtype than the logits
    # (MONAI too); with a one-hot target it computes. Either way the drop-in does the same.
    x, y = _make_case(3, target_kind, None, dtype=torch.float32, seed=6)
    w = torch.tensor([0.5, 1.0, 2.0], dtype=wdtype)
    for red in ("mean", "sum"):
        onehot_y = target_kind.startswith("labels")
        kw = dict(softmax=True, to_onehot_y=onehot_y, weight=w, reduction=red)
        if onehot_y:
            with pytest.raises(RuntimeError):
                monai_losses.DiceCELoss(**kw)(x, y)
        assert DiceCELoss(**kw).explain(x, y).startswith("fallback: ")
        _dce_parity(kw, x, y, rtol=TOLERANCES[torch.float32][0], atol=0)


_BOOL_CASES = [
    # (kwargs, C, target kind): MONAI feeds the bool target to its sums and raises
    (dict(sigmoid=True), 3, "onehot"),
    (dict(softmax=True), 3, "onehot"),
    (dict(), 3, "onehot"),
    (dict(sigmoid=True), 1, "mask"),
    (dict(softmax=True, to_onehot_y=True), 1, "mask"),
    (dict(sigmoid=True, soft_label=True), 3, "onehot"),
    (dict(sigmoid=True, soft_label=True), 1, "mask"),
    # ... and where it converts it first (one-hot encoding, the ignore mask) it computes
    (dict(softmax=True, to_onehot_y=True), 3, "labels"),
    (dict(softmax=True, to_onehot_y=True, ignore_index=1), 3, "labels"),
    (dict(sigmoid=True, ignore_index=1), 1, "mask"),
    (dict(sigmoid=True, ignore_index=255), 1, "mask"),
    (dict(sigmoid=True, ignore_index=0), 3, "onehot"),
]


@pytest.mark.parametrize("kwargs,C,kind", _BOOL_CASES)
def test_bool_targets_match_monai(backend, kwargs, C, kind):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, C, 4, 5, 3, generator=gen, dtype=torch.float64)
    n = 1 if kind in ("mask", "labels") else C
    y = torch.rand(2, n, 4, 5, 3, generator=gen) < 0.4
    want = _run(monai_losses.TverskyLoss(**kwargs), x, y)
    got = _run(TverskyLoss(**kwargs, backend=backend), x, y)
    assert got[2] is want[2], f"{kwargs}: exception {got[2]} vs MONAI {want[2]}"
    if want[2] is None:
        _check_parity(kwargs, x, y, backend)


_BAD_CONSTRUCTOR_ARGS = [
    # (class, kwargs, error): values MONAI's constructors store unchecked
    ("tversky", dict(alpha="0.3"), TypeError),
    ("tversky", dict(beta=None), TypeError),
    ("tversky", dict(include_background="no"), TypeError),
    ("tversky", dict(batch=2), TypeError),
    ("tversky", dict(soft_label="yes"), TypeError),
    ("tversky", dict(ignore_index=1.5), TypeError),
    ("tversky", dict(ignore_index=True), TypeError),
    ("tversky", dict(smooth_nr=True), TypeError),
    ("tversky", dict(backend="gpu"), ValueError),
    ("dice_ce", dict(jaccard="yes"), TypeError),
    ("dice_ce", dict(squared_pred=None), TypeError),
    ("dice_ce", dict(label_smoothing="0.1"), TypeError),
    ("dice_ce", dict(lambda_ce=True), TypeError),
    ("dice_ce", dict(to_onehot_y="True"), TypeError),
    ("dice_ce", dict(backend=3), ValueError),
]


@pytest.mark.parametrize("which,kwargs,error", _BAD_CONSTRUCTOR_ARGS)
def test_constructors_check_every_argument(which, kwargs, error):
    cls = {"tversky": TverskyLoss, "dice_ce": DiceCELoss}[which]
    name = next(iter(kwargs))
    with pytest.raises(error, match=name):
        cls(**kwargs)


def test_constructors_keep_monai_accepted_values():
    # What MONAI computes with stays accepted: 0/1 flags, numpy scalars, tensor alpha,
    # negative alpha (MONAI's computation), a LossReduction.
    import numpy as np

    loss = TverskyLoss(include_background=0, batch=np.bool_(True), alpha=torch.tensor(0.2))
    assert loss.include_background is False and loss.batch is True
    x, y = _make_case(3, "soft_float", None)
    _check_parity(dict(sigmoid=True, alpha=np.float64(-0.2), beta=1), x, y, "auto")
    DiceCELoss(lambda_dice=np.float32(0.5), smooth_nr=torch.tensor(1e-4))


@pytest.mark.parametrize("cls", [TverskyLoss, DiceCELoss])
def test_an_invalid_option_raises_instead_of_taking_the_slower_path(cls):
    # Only what the kernels refuse in the values (NaN, labels out of range) takes MONAI's
    # path; an option the fused call rejects is a bug to see, not a slow path to hide.
    x, y = _make_case(3, "labels_uint8", None)
    loss = cls(softmax=True, to_onehot_y=True)
    loss.backend = "gpu"  # set after construction, which checks it
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPathWarning)
        with pytest.raises(fasttversky.InvalidInputError, match="backend"):
            loss(x, y)


def test_dice_ce_label_smoothing_out_of_range_raises_at_construction():
    # torch's CE (so MONAI) raises at the first forward; the drop-in checks it up front.
    x, y = _make_case(3, "labels_uint8", None)
    with pytest.raises(RuntimeError, match="label_smoothing"):
        monai_losses.DiceCELoss(softmax=True, to_onehot_y=True, label_smoothing=1.5)(x, y)
    for bad in (1.5, -0.1):
        with pytest.raises(fasttversky.InvalidInputError, match="label_smoothing"):
            DiceCELoss(softmax=True, to_onehot_y=True, label_smoothing=bad)

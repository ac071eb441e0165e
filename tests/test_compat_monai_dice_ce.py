"""``compat.monai.DiceCELoss`` completed (issue 26): ``label_smoothing``, soft float targets
with ``to_onehot_y=False``, ``weight``, and every activation, against MONAI's own class in
float64 (value and gradient 1e-7 of the largest) over random option combinations; the
common configurations fused (no SlowPathWarning). Then MONAI's own DiceCELoss cases
(tests/losses/test_dice_ce_loss.py) re-expressed.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F

monai_losses = pytest.importorskip("monai.losses", reason="MONAI is in the [test] extra")

from _helpers import monai_slow_path_warnings  # noqa: E402

from fasttversky.compat.monai import DiceCELoss, SlowPathWarning  # noqa: E402

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


def _close(name, got, want, rtol=1e-7):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    tol = rtol * max(want.abs().max().item(), 1e-30)
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol, f"{name}: max |diff| {err:.3e} > {tol:.3e}"


def _parity(kw, x, y, fused: bool):
    want = _run(monai_losses.DiceCELoss(**kw), x, y)
    mine = DiceCELoss(**kw)
    path = mine.explain(x, y) if want[2] is None else ""
    got = _run(mine, x, y)
    assert got[2] is want[2], f"{kw}: exception {got[2]} vs MONAI {want[2]}"
    if want[2] is not None:
        return
    assert got[3] == want[3], f"{kw}: warnings {got[3]} vs MONAI {want[3]}"
    assert got[4] == monai_slow_path_warnings("DiceCELoss", path), f"{kw}: {got[4]}"
    assert path.startswith("fused") == fused, f"{kw}: {path}"
    assert got[0].dtype == want[0].dtype, f"{kw}: dtype {got[0].dtype} vs {want[0].dtype}"
    _close(f"{kw} value", got[0], want[0])
    _close(f"{kw} grad", got[1], want[1])


def _case(C, kind, seed, shape=(3, 4, 5)):
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(2, C, *shape, generator=g, dtype=torch.float64)
    labels = torch.randint(0, max(C, 2), (2, 1, *shape), generator=g)
    if kind == "labels_int64":
        return x, labels
    if kind == "labels_float":
        return x, labels.double()
    if kind == "labels_bool":
        return x, labels.bool()
    onehot = labels if C == 1 else F.one_hot(labels[:, 0], C).movedim(-1, 1)
    if kind == "onehot_uint8":
        return x, onehot.to(torch.uint8)
    if kind == "soft_float":
        return x, torch.rand(onehot.shape, generator=g, dtype=torch.float64)
    return x, onehot.double()


@pytest.mark.parametrize("seed", range(10))
def test_dice_ce_equals_monai_on_random_options(seed):
    rng = random.Random(seed)
    for i in range(12):
        C = rng.choice([1, 2, 3, 4])
        act = rng.choice(["softmax", "softmax", "sigmoid", "none", "other_act"])
        onehot_y = C > 1 and rng.random() < 0.6
        label_kinds = ("labels_int64", "labels_float", "labels_bool") if C == 2 else (
            "labels_int64", "labels_float")  # fmt: skip
        kind = rng.choice(label_kinds if onehot_y else ("onehot_float", "onehot_uint8",
                                                        "soft_float"))  # fmt: skip
        red = rng.choice(["mean", "sum"])
        weight = None
        if rng.random() < 0.5:
            g = torch.Generator().manual_seed(i)
            weight = torch.rand(C, generator=g, dtype=torch.float64) + 0.1
        kw = dict(
            include_background=rng.random() < 0.5,
            to_onehot_y=onehot_y,
            sigmoid=act == "sigmoid",
            softmax=act == "softmax",
            other_act=torch.tanh if act == "other_act" else None,
            jaccard=rng.random() < 0.3,
            reduction=red,
            smooth_nr=rng.choice([1e-5, 0.0, 0.5]),
            smooth_dr=rng.choice([1e-5, 1.0]),
            batch=rng.random() < 0.5,
            weight=weight,
            lambda_dice=rng.choice([1.0, 0.0, 0.6]),
            lambda_ce=rng.choice([1.0, 0.0, 1.7]),
            label_smoothing=rng.choice([0.0, 0.1, 0.3]),
        )
        x, y = _case(C, kind, 100 * seed + i)
        # Not fused: MONAI's BCE pos_weight (C = 1), a weighted CE sum over a label map
        # (it needs a class histogram), two zero lambdas.
        slow_ce = weight is not None and (C == 1 or (onehot_y and red == "sum"))
        fused = not (slow_ce and kw["lambda_ce"]) and (kw["lambda_dice"] or kw["lambda_ce"])
        _parity(kw, x, y, bool(fused))


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("kind", ["labels_int64", "soft_float", "onehot_float"])
@pytest.mark.parametrize("weighted", [False, True])
def test_label_smoothing_soft_targets_and_weights_are_fused(eps, kind, weighted):
    x, y = _case(3, kind, 5)
    w = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64) if weighted else None
    kw = dict(softmax=True, to_onehot_y=kind.startswith("labels"), label_smoothing=eps, weight=w)
    _parity(kw, x, y, fused=True)
    assert DiceCELoss(**kw).explain(x, y).startswith("fused: 1 pass")


def test_soft_target_out_of_range_gives_monai_value_with_a_warning():
    x, y = _case(3, "soft_float", 6)
    y = y * 1.5  # MONAI computes with it; the kernels refuse a target outside [0, 1]
    kw = dict(softmax=True, label_smoothing=0.1)
    want = _run(monai_losses.DiceCELoss(**kw), x, y)
    got = _run(DiceCELoss(**kw), x, y)
    assert len(got[4]) == 1
    _close("value", got[0], want[0])
    _close("grad", got[1], want[1])


# ======================================================================================
# MONAI's own test cases (tests/losses/test_dice_ce_loss.py), re-expressed
# ======================================================================================
_X = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]])
_X100 = torch.tensor([[[100.0, 100.0, 0.0], [0.0, 0.0, 1.0]], [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]])
_LAB = torch.tensor([[[0.0, 0.0, 1.0]], [[0.0, 1.0, 0.0]]])


@pytest.mark.parametrize(
    "kw,x,y,expected",
    [
        (dict(to_onehot_y=True), _X, _LAB, 0.3133),
        (dict(to_onehot_y=False), _X, _X.clone(), 0.3133),
        (dict(to_onehot_y=False), _X, _X.to(torch.uint8), 0.3133),
        (dict(include_background=False, to_onehot_y=True, weight=torch.tensor([1.0, 1.0])),
         _X100, _LAB, 0.2088),
        (dict(include_background=False, to_onehot_y=True, weight=torch.tensor([1.0, 1.0]),
              lambda_dice=1.0, lambda_ce=2.0), _X100, _LAB, 0.4176),
        (dict(include_background=False, to_onehot_y=True, weight=torch.tensor([0.0, 1.0])),
         _X100, _LAB, 0.3133),
        (dict(weight=torch.tensor([0.5]), sigmoid=True),
         torch.tensor([[[0.8, 0.6, 0.0]], [[0.0, 0.0, 0.9]]]), _LAB, 1.445239),
    ],
)  # fmt: skip
def test_monai_dice_ce_values(kw, x, y, expected):
    loss = DiceCELoss(**kw)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = loss(x, y)
    slow = [str(w.message) for w in rec if w.category is SlowPathWarning]
    assert slow == monai_slow_path_warnings("DiceCELoss", loss.explain(x, y)), slow
    assert abs(got.item() - expected) <= 1e-4 + 1e-4 * expected, (kw, got.item())
    want = monai_losses.DiceCELoss(**kw)(x, y)
    _close(f"{kw}", got, want, 1e-6)


def test_monai_dice_ce_shape_errors():
    loss = DiceCELoss()
    with pytest.raises(AssertionError):
        loss(torch.ones((1, 2, 3)), torch.ones((1, 2, 5)))
    with pytest.raises(ValueError):
        loss(torch.ones((1, 2, 3)), torch.ones((1, 1, 2, 3)))
    with pytest.raises(ValueError):
        loss(torch.ones((1, 3, 4, 4)), torch.ones((1, 2, 4, 4)))

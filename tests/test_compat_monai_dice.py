"""``compat.monai.DiceLoss`` and ``GeneralizedDiceLoss`` against MONAI's own classes:
value and gradient in float64 (1e-7 of the largest), over random option combinations;
the common configurations stay fused (no SlowPathWarning), the others give one naming
``explain()``'s reason."""

from __future__ import annotations

import itertools
import random
import warnings

import pytest
import torch

monai_losses = pytest.importorskip("monai.losses", reason="MONAI is in the [test] extra")

from _helpers import monai_slow_path_warnings  # noqa: E402

from fasttversky.compat import monai as ours  # noqa: E402
from fasttversky.compat.monai import SlowPathWarning  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(C, seed, onehot_target, ignore=None):
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(2, C, 5, 4, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, max(C, 2), (2, 1, 5, 4, 3), generator=g)
    if ignore is not None:
        labels[:, :, 0] = ignore
    if onehot_target and C > 1:
        return x, torch.nn.functional.one_hot(labels[:, 0], C).movedim(-1, 1).double()
    return x, labels if C > 1 else labels.clamp_max(1).double()


def _compare(theirs, mine, x, t, fused_expected):
    x1 = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = theirs(x1, t)
    ref.sum().backward()
    x2 = x.clone().requires_grad_(True)
    path = mine.explain(x, t)
    assert path.startswith("fused") or not fused_expected, path
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = mine(x2, t)
    slow = [str(w.message) for w in caught if issubclass(w.category, SlowPathWarning)]
    assert slow == monai_slow_path_warnings(type(mine).__name__, path), slow
    got.sum().backward()
    assert got.shape == ref.shape and got.dtype == ref.dtype
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-7 * ref.abs().max().item() + 1e-15)
    tol = 1e-7 * x1.grad.abs().max().item() + 1e-15
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=tol)


DICE_GRID = list(
    itertools.product(
        (2, 3, 1),  # C
        ("softmax", "sigmoid", None),
        (False, True),  # include_background
        (False, True),  # batch
        ("mean", "sum", "none"),
        (False, True),  # jaccard
    )
)


@pytest.mark.parametrize("seed", range(12))
def test_dice_loss_equals_monai_on_random_options(seed):
    rng = random.Random(seed)
    for C, act, bg, batch, red, jac in rng.sample(DICE_GRID, 12):
        if act == "softmax" and C == 1:
            act = "sigmoid"
        onehot = C > 1 and rng.random() < 0.3
        weight = rng.choice([None, 0.7, [0.2, 1.0, 2.0][: C - (0 if bg else 1)]]) if C > 1 else None
        squared = rng.random() < 0.2
        ignore = rng.choice([None, 1]) if (C > 1 and not onehot) else None
        kw = dict(
            include_background=bg,
            to_onehot_y=C > 1 and not onehot,
            sigmoid=act == "sigmoid",
            softmax=act == "softmax",
            batch=batch,
            reduction=red,
            jaccard=jac,
            squared_pred=squared,
            weight=weight,
            ignore_index=ignore,
            smooth_nr=rng.choice([1e-5, 0.0, 0.5]),
            smooth_dr=rng.choice([1e-5, 1.0]),
        )
        x, t = _inputs(C, seed, onehot, ignore)
        monai_kw = dict(kw, weight=None if weight is None else torch.as_tensor(weight))
        fused = act is not None and not squared
        _compare(monai_losses.DiceLoss(**monai_kw), ours.DiceLoss(**kw), x, t, fused)


@pytest.mark.parametrize("w_type", ["square", "simple", "uniform"])
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("bg", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_generalized_dice_loss_equals_monai(w_type, batch, bg, reduction):
    x, t = _inputs(3, 5, False)
    t[0][t[0] == 2] = 1  # a class absent from sample 0: MONAI's infinite-weight rule
    kw = dict(softmax=True, to_onehot_y=True, w_type=w_type, batch=batch,
              include_background=bg, reduction=reduction)  # fmt: skip
    _compare(monai_losses.GeneralizedDiceLoss(**kw), ours.GeneralizedDiceLoss(**kw), x, t, True)
    kw = dict(sigmoid=True, w_type=w_type, batch=batch, reduction=reduction)
    x1, t1 = _inputs(1, 6, False)
    _compare(monai_losses.GeneralizedDiceLoss(**kw), ours.GeneralizedDiceLoss(**kw), x1, t1, True)


def test_dice_loss_bad_arguments_are_named():
    with pytest.raises(TypeError, match="weight"):
        ours.DiceLoss(weight="heavy")
    with pytest.raises(TypeError, match="jaccard"):
        ours.DiceLoss(jaccard="yes")
    with pytest.raises(ValueError, match="weight type"):
        ours.GeneralizedDiceLoss(w_type="cubic")
    x, t = _inputs(3, 1, False)
    with pytest.raises(ValueError, match="length of the `weight`"):
        ours.DiceLoss(softmax=True, to_onehot_y=True, weight=[1.0, 2.0])(x, t)

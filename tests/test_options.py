"""``TverskyOptions``: declared once, checked at construction, the same for every caller."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import fasttversky
from fasttversky import (
    InvalidInputError,
    NonFiniteInputError,
    TverskyLoss,
    TverskyOptions,
    deep_supervision_loss,
    tversky_loss,
)
from tests._helpers import make_inputs


@pytest.mark.parametrize(
    "kw, error",
    [
        (dict(ce_weight="1"), TypeError),
        (dict(ce_weight=True), TypeError),
        (dict(gamma="0.75"), TypeError),
        (dict(smooth_nr=False), TypeError),
        (dict(alpha=True), TypeError),
        (dict(ce_class_weights=[0, 0]), ValueError),
        (dict(ce_class_weights=[1.0, float("nan")]), ValueError),
        (dict(batch=1), TypeError),
        (dict(ce_weight=1.0, reduction="none"), ValueError),
        (dict(alpha=[0.3, 0.3], beta=[0.7, 0.7, 0.7]), ValueError),
        (dict(ignore_index=1.5), TypeError),
        (dict(ce_label_smoothing=2.0), ValueError),
        (dict(ce_focal_gamma=-1.0), ValueError),
        (dict(ce_focal_gamma=2.0, ce_focal_alpha=True), TypeError),
        (dict(regions=((1,), (2,))), ValueError),  # softmax
        (dict(activation="sigmoid", regions=((1,), (2, "3"))), TypeError),
        (dict(activation="sigmoid", regions=((1,), (2,)), num_labels=2), ValueError),
    ],
)
def test_every_entry_point_rejects_at_construction(kw, error):
    for make in (TverskyOptions, TverskyLoss):
        with pytest.raises(error) as info:
            make(**kw)
        assert isinstance(info.value, InvalidInputError)
    x, t = make_inputs(1, 3, (4, 4))
    with pytest.raises(error):
        tversky_loss(x, t, **kw)
    with pytest.raises(error):
        deep_supervision_loss([x], t, **kw)


def test_defaults_are_declared_once():
    # The function and the module take their options from TverskyOptions: no default of
    # their own to drift from it (the code declares none) ...
    names = {f.name for f in dataclasses.fields(TverskyOptions)}
    for fn in (tversky_loss, TverskyLoss.__init__, deep_supervision_loss):
        code = fn.__code__
        declared = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        assert not names & set(declared), fn
    # ... and their signatures still show every option with the dataclass's default.
    for fn in (tversky_loss, TverskyLoss.__init__):
        params = inspect.signature(fn).parameters
        for f in dataclasses.fields(TverskyOptions):
            assert params[f.name].default == f.default, (fn, f.name)
        assert list(params)[-1] == "options"


def test_options_object_and_keywords_agree():
    x, t = make_inputs(2, 3, (5, 4, 3), seed=5)
    opts = TverskyOptions(alpha=0.4, beta=0.6, gamma=0.75, ce_weight=0.3)
    a = tversky_loss(x, t, options=opts)
    b = tversky_loss(x, t, 0.4, 0.6, gamma=0.75, ce_weight=0.3)
    c = TverskyLoss(options=opts)(x, t)
    d = tversky_loss(x, t, options=opts.replace(ce_weight=0.0), ce_weight=0.3)
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    assert TverskyLoss(options=opts).options == opts


def test_option_misuse_is_named():
    x, t = make_inputs(1, 3, (4, 4))
    with pytest.raises(TypeError, match="unknown loss option"):
        tversky_loss(x, t, alpah=0.3)
    with pytest.raises(TypeError, match="by position and by keyword"):
        tversky_loss(x, t, 0.3, alpha=0.4)
    with pytest.raises(TypeError, match="only alpha and beta"):
        tversky_loss(x, t, 0.3, 0.7, "softmax")
    with pytest.raises(ValueError, match="alpha has 2 entries but logits have C=3"):
        tversky_loss(x, t, alpha=[0.3, 0.7])


def test_tensor_per_class_values_are_read_once():
    opts = TverskyOptions(alpha=torch.tensor([0.2, 0.3, 0.4]), beta=torch.tensor(0.6))
    # a tuple of Python floats (the float32 values read once), not the tensor itself
    assert isinstance(opts.alpha, tuple) and all(type(a) is float for a in opts.alpha)
    assert opts.alpha == tuple(torch.tensor([0.2, 0.3, 0.4]).tolist())
    assert isinstance(opts.beta, float)
    hash(opts)  # frozen and hashable: usable as a cache key


def test_non_finite_logits_raise_the_exported_type():
    x, t = make_inputs(1, 3, (4, 4))
    x[0, 1, 2, 2] = float("nan")
    with pytest.raises(NonFiniteInputError, match="non-finite"):
        tversky_loss(x, t)
    t[0, 0, 0] = 9
    x[0, 1, 2, 2] = 0.0
    with pytest.raises(InvalidInputError, match="label"):
        tversky_loss(x, t)
    assert fasttversky.BACKENDS == ("cpu", "torch", "triton", "cuda")


def test_deep_supervision_rejects_a_target_of_another_size():
    x0 = torch.randn(1, 2, 8, 8, 8)
    x1 = torch.randn(1, 2, 4, 4, 4)
    for shape in [(1, 4, 4, 4), (1, 5, 9, 3), (1, 8, 8, 16), (1, 2, 8, 8, 8)]:
        t = torch.randint(0, 2, shape)
        with pytest.raises(ValueError, match="first scale's spatial size"):
            deep_supervision_loss([x0, x1], t)
    for shape in [(1, 8, 8, 8), (1, 1, 8, 8, 8)]:
        assert torch.isfinite(deep_supervision_loss([x0, x1], torch.randint(0, 2, shape)))

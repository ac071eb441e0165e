"""Bad input raises an exception that names the argument; never silently wrong numbers."""

from __future__ import annotations

import pytest
import torch

from fasttversky import BackendUnavailableError, TverskyLoss, tversky_loss
from reference import reference_tversky_loss
from tests._helpers import TOLERANCES

BACKENDS = ["cpu", "torch"]


def _ok(C=3):
    return torch.randn(2, C, 4, 5, 6), torch.randint(0, C, (2, 4, 5, 6))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda x, t: (x[:, :, :3], t), ValueError, "target label map must have shape"),
        (lambda x, t: (x, t[:1]), ValueError, "target label map must have shape"),
        (lambda x, t: (x, torch.rand(2, 2, 4, 5, 6)), ValueError, "float .*target must have"),
        (lambda x, t: (x.int(), t), TypeError, "logits dtype"),
        (lambda x, t: (x, t.to(torch.int8)), TypeError, "label map dtype"),
        # a float label map must still have the label map's shape
        (lambda x, t: (x, t.float()[:1]), ValueError, "float .*target must have"),
        (lambda x, t: (x[0, 0, 0, 0], t), ValueError, r"logits must have shape \(B, C"),
        (lambda x, t: (x[:, :, :0], t[:, :0]), ValueError, "logits is empty"),
        (lambda x, t: (x.unsqueeze(-1).unsqueeze(-1), t), ValueError, "1-3 spatial dims"),
        (lambda x, t: (x, t.numpy()), TypeError, "target must be a torch.Tensor"),
        (lambda x, t: (x, t.to("meta")), ValueError, "target is on meta"),
    ],
    ids=[
        "spatial-mismatch",
        "batch-mismatch",
        "soft-class-mismatch",
        "int-logits",
        "int8-labels",
        "float-labels-shape",
        "too-few-dims",
        "empty",
        "too-many-dims",
        "numpy-target",
        "device-mismatch",
    ],
)
def test_shape_dtype_device(backend, make, error, match):
    x, t = make(*_ok())
    with pytest.raises(error, match=match):
        tversky_loss(x, t, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C", [2, 3])  # C = 2 has its own fused kernel path
def test_label_range(backend, C):
    x, t = _ok(C)
    t[0, 0, 0, 0] = C
    with pytest.raises(ValueError, match=rf"1 label\(s\) outside \[0, {C}\)"):
        tversky_loss(x, t, backend=backend)
    t[0, 0, 0, 0] = -1
    with pytest.raises(ValueError, match="outside"):
        tversky_loss(x, t, backend=backend)
    # ... but the ignore value itself is fine
    tversky_loss(x, t, backend=backend, ignore_index=-1)
    # binary sigmoid: labels must be {0, 1}
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        tversky_loss(x[:, :1], torch.full((2, 4, 5, 6), 2), activation="sigmoid", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_target_range(backend):
    x, _ = _ok()
    soft = torch.rand(2, 3, 4, 5, 6)
    soft[1, 2, 3, 4, 5] = 1.5
    with pytest.raises(ValueError, match=r"target has 1 value\(s\) outside \[0, 1\]"):
        tversky_loss(x, soft, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C", [2, 3])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits(backend, bad, C):
    x, t = _ok(C)
    x[1, C - 1, 0, 1, 2] = bad
    with pytest.raises(ValueError, match=r"logits contain 1 non-finite"):
        tversky_loss(x, t, backend=backend)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"alpha": -0.1}, ValueError, "alpha must be finite and >= 0"),
        ({"beta": float("nan")}, ValueError, "beta must be finite and >= 0"),
        ({"alpha": [0.3, 0.3]}, ValueError, "alpha has 2 entries but logits have C=3"),
        ({"beta": "0.7"}, TypeError, "beta must be a float or a sequence"),
        ({"smooth_nr": -1e-5}, ValueError, "smooth_nr"),
        ({"smooth_dr": float("inf")}, ValueError, "smooth_dr"),
        ({"gamma": 0.0}, ValueError, "gamma must be finite and > 0"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"activation": "relu"}, ValueError, "activation must be one of"),
        ({"class_weights": [1, 2]}, ValueError, "class_weights has 2 entries"),
        (
            {"class_weights": [1, 0, 0], "include_background": False},
            ValueError,
            "class_weights of the kept classes",
        ),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
        ({"backend": "fortran"}, ValueError, "backend must be 'auto' or one of"),
        ({"backend": "cuda"}, BackendUnavailableError, "backend 'cuda' cannot run"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    x, t = _ok()
    with pytest.raises(error, match=match):
        tversky_loss(x, t, **kwargs)


def test_softmax_needs_two_classes():
    with pytest.raises(ValueError, match="softmax.*C >= 2"):
        tversky_loss(torch.randn(1, 1, 4), torch.zeros(1, 4, dtype=torch.long))


def test_ignore_index_with_soft_target():
    with pytest.raises(ValueError, match="ignore_index applies to label maps"):
        tversky_loss(torch.randn(1, 2, 4), torch.rand(1, 2, 4), ignore_index=0)


def test_module_rejects_bad_arguments_at_construction():
    with pytest.raises(ValueError, match="alpha"):
        TverskyLoss(alpha=-1)
    with pytest.raises(ValueError, match="reduction"):
        TverskyLoss(reduction="max")
    with pytest.raises(ValueError, match="beta must be finite and >= 0"):
        TverskyLoss(beta=[0.7, -0.1])
    with pytest.raises(ValueError, match="different lengths"):
        TverskyLoss(alpha=[0.3, 0.3], beta=[0.7, 0.7, 0.7])
    with pytest.raises(ValueError, match="class_weights"):
        TverskyLoss(class_weights=[1.0, float("nan")])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"backend": "nope"}, ValueError, "backend must be 'auto' or one of"),
        ({"backend": None}, ValueError, "backend must be"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int or None, got 1.5"),
        ({"ignore_index": "255"}, TypeError, "ignore_index must be an int"),
        ({"ignore_index": True}, TypeError, "ignore_index must be an int"),
    ],
)
def test_module_rejects_backend_and_ignore_index_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        TverskyLoss(**kwargs)


def test_function_rejects_float_ignore_index_before_work():
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        tversky_loss(torch.randn(1, 2, 4), torch.zeros(1, 4, dtype=torch.long), ignore_index=1.5)


def test_backend_env_typo_names_the_variable(monkeypatch):
    monkeypatch.setenv("FASTTVERSKY_BACKEND", "cpuu")
    x, t = torch.randn(1, 2, 4), torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="FASTTVERSKY_BACKEND must be .* got 'cpuu'"):
        tversky_loss(x, t)
    # an explicit backend argument does not read the variable
    assert torch.isfinite(tversky_loss(x, t, backend="torch"))


def test_torch_func_transforms_match_float64_autograd():
    # torch.func.grad / vmap run the loss as plain differentiable torch (no kernel), so
    # their results must equal ordinary autograd on the float64 reference.
    torch.manual_seed(0)
    x, t = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randint(0, 3, (2, 4, 4))
    ref_x = x.clone().requires_grad_(True)
    reference_tversky_loss(ref_x, t, 0.3, 0.7, ce_weight=0.5).backward()
    got = torch.func.grad(lambda z: tversky_loss(z, t, ce_weight=0.5))(x)
    torch.testing.assert_close(got, ref_x.grad, rtol=1e-10, atol=1e-12)
    got = torch.func.grad(lambda z: TverskyLoss(ce_weight=0.5)(z, t))(x)
    torch.testing.assert_close(got, ref_x.grad, rtol=1e-10, atol=1e-12)
    per_sample = torch.func.vmap(lambda z, y: tversky_loss(z[None], y[None]))(x, t)
    expected = torch.stack([reference_tversky_loss(x[i : i + 1], t[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(per_sample, expected, rtol=1e-10, atol=1e-12)


def test_vmap_with_cross_entropy_matches_float64():
    # float32: the torch backend's CE overflow re-check (below float64) branches on
    # values, which vmap forbids
    torch.manual_seed(1)
    x, t = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    loss_rtol, _ = TOLERANCES[torch.float32]
    for activation in ("softmax", "sigmoid"):
        kw = dict(ce_weight=0.5, activation=activation)
        got = torch.func.vmap(lambda z, y, kw=kw: tversky_loss(z[None], y[None], **kw))(x, t)
        expected = torch.stack(
            [reference_tversky_loss(x[i : i + 1].double(), t[i : i + 1], **kw) for i in range(2)]
        )
        torch.testing.assert_close(got.double(), expected, rtol=loss_rtol, atol=0)


def test_torch_func_transforms_check_labels_and_keep_nan():
    x, t = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    t[0, 0, 0] = 7
    with pytest.raises(ValueError, match="label"):
        torch.func.grad(lambda z: tversky_loss(z, t))(x)
    x[0, 0, 0, 0] = float("inf")
    out = torch.func.vmap(lambda z: tversky_loss(z[None], t[:1].clamp_max(2)))(x)
    assert torch.isnan(out[0]) and torch.isfinite(out[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_finite_logits_are_not_called_non_finite(backend):
    # |x1 - x0| overflows float32 here, the logits themselves are finite
    x = torch.full((1, 2, 100), 3e38)
    x[:, 1] = -3e38
    t = torch.zeros(1, 100, dtype=torch.uint8)
    loss = tversky_loss(x, t, backend=backend)
    assert torch.isfinite(loss)

"""Second derivatives: ``create_graph=True`` (a gradient penalty) on every backend.

The kernels' own backward is not differentiable; with a graph requested the loss
differentiates plain torch sums instead (``_stats_op.py``). These tests compare the
gradient of a gradient with float64 autograd through the reference, and run
``gradgradcheck`` (finite differences) where the backend computes in float64.
"""

from __future__ import annotations

import pytest
import torch

import fasttversky
from reference import reference_tversky_loss
from tests._helpers import (
    ALL_BACKENDS,
    BACKEND_DTYPES,
    TOLERANCES,
    describe_mismatch,
    make_inputs,
    use_backend,
)

CASES = {
    "softmax": dict(activation="softmax"),
    "softmax-ce-ignore": dict(activation="softmax", ce_weight=0.7, ignore_index=2),
    "sigmoid-ce-focal": dict(activation="sigmoid", ce_weight=1.0, gamma=0.75),
    "batch-weights": dict(batch=True, class_weights=[0.2, 1.0, 2.0], alpha=0.3, beta=0.7),
}


def _penalty_grad(loss_fn, x, v):
    """d/dx of <dL/dx, v>: what a gradient penalty's backward needs."""
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(x), x, create_graph=True)
    (gg,) = torch.autograd.grad((g * v.to(g.dtype)).sum(), x)
    return g, gg


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradient_of_gradient_matches_float64(backend, case, monkeypatch):
    device = use_backend(backend, monkeypatch)
    dtype = torch.float64 if torch.float64 in BACKEND_DTYPES[backend] else torch.float32
    kw = CASES[case]
    x, t = make_inputs(2, 3, (4, 5, 3), dtype=dtype, seed=7, device=device)
    if kw.get("ignore_index") is not None:
        t = t.clone()
        t[:, 0] = kw["ignore_index"]
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g, gg = _penalty_grad(
        lambda z: fasttversky.tversky_loss(z, t, backend=backend, **kw), x, v.to(device)
    )
    ref_g, ref_gg = _penalty_grad(
        lambda z: reference_tversky_loss(z, t.cpu(), **kw), x.cpu().double(), v
    )
    _, grad_rtol = TOLERANCES[dtype]
    for got, want in ((g, ref_g), (gg, ref_gg)):
        tol = grad_rtol * max(want.abs().max().item(), 1e-30)
        assert torch.allclose(got.cpu().double(), want, rtol=0, atol=tol), describe_mismatch(
            got.cpu(), want, tol
        )
    assert gg.abs().max() > 0  # a dropped second-order term would leave zeros


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_gradgradcheck(backend, monkeypatch):
    device = use_backend(backend, monkeypatch)
    x, t = make_inputs(1, 3, (3, 4), dtype=torch.float64, seed=3, device=device)
    x.requires_grad_(True)

    def loss(z):
        return fasttversky.tversky_loss(z, t, 0.3, 0.7, ce_weight=0.5, backend=backend)

    assert torch.autograd.gradgradcheck(loss, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_first_order_gradient_unchanged_without_graph():
    # Without create_graph the kernels' own backward runs: bitwise what it always was.
    x, t = make_inputs(2, 3, (6, 5, 4), seed=11)
    grads, has_graph = [], []
    for create_graph in (False, True):
        z = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(
            fasttversky.tversky_loss(z, t, backend="cpu"), z, create_graph=create_graph
        )
        has_graph.append(g.requires_grad)
        grads.append(g.detach())
    # only the call that asked for a graph gets a differentiable gradient
    assert has_graph == [False, True]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)
    z = x.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(fasttversky.tversky_loss(z, t, backend="cpu"), z)
    assert torch.equal(g1, grads[0])


def test_create_graph_through_a_soft_target_alone():
    # The loss requires grad only through a soft target (whose gradient is not computed):
    # the graph-building backward must not differentiate the logits then.
    x, _ = make_inputs(2, 3, (4, 5, 3), seed=5)
    q = torch.softmax(torch.randn(x.shape, dtype=x.dtype), 1).requires_grad_(True)
    loss = fasttversky.tversky_loss(x, q, backend="cpu")
    (g,) = torch.autograd.grad(loss, q, create_graph=True, allow_unused=True)
    assert g is None

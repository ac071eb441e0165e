"""Shared checks: compare a fasttversky backend with the float64 reference."""

from __future__ import annotations

import torch

import fasttversky
from reference import reference_tversky_loss

# Per logits dtype: (loss rtol, gradient tolerance relative to max |grad|). The backends
# compute in float32 (float64 for float64 logits) on the *same rounded inputs* as the
# reference, so loss errors are accumulation-only; gradients are additionally rounded
# to the logits' dtype when stored (bf16: 8 bits, fp16: 11 bits and subnormals).
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-5, 4e-3),
    torch.bfloat16: (2e-5, 2e-2),
}


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> str:
    diff = (actual.double() - expected.double()).abs()
    bad = diff > tol
    idx = bad.nonzero()[:5].tolist()
    return (
        f"{int(bad.sum())}/{diff.numel()} elements differ by more than {tol:.3g}; "
        f"max diff {diff.max().item():.3g}; first at {idx}"
    )


def run_both(logits, target, backend, **kwargs):
    """(loss, grad) from the backend and from the float64 reference on the same inputs."""
    x = logits.detach().clone().requires_grad_(True)
    loss = fasttversky.tversky_loss(x, target, backend=backend, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), x)

    xr = logits.detach().double().requires_grad_(True)
    tr = target.double() if target.is_floating_point() else target
    ref = reference_tversky_loss(xr, tr, **kwargs)
    (ref_grad,) = torch.autograd.grad(ref.sum(), xr)
    return loss, grad, ref, ref_grad


def check_against_reference(logits, target, backend, **kwargs):
    loss, grad, ref, ref_grad = run_both(logits, target, backend, **kwargs)
    loss_rtol, grad_rtol = TOLERANCES[logits.dtype]
    assert loss.shape == ref.shape, (loss.shape, ref.shape)
    assert grad.shape == logits.shape and grad.dtype == logits.dtype
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    loss_tol = loss_rtol * max(ref.abs().max().item(), 1e-3)
    assert torch.allclose(loss.double(), ref, rtol=0, atol=loss_tol), describe_mismatch(
        loss, ref, loss_tol
    )
    grad_tol = grad_rtol * max(ref_grad.abs().max().item(), 1e-30)
    assert torch.allclose(grad.double(), ref_grad, rtol=0, atol=grad_tol), describe_mismatch(
        grad, ref_grad, grad_tol
    )

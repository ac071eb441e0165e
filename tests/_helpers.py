"""The one backend-vs-reference harness: which backends run here, inputs, tolerances.

Every backend-equivalence test compares a backend's loss and dL/dlogits with the float64
reference (``reference/``) on the same rounded inputs, through
:func:`check_against_reference`, with the tolerances of :data:`TOLERANCES`.

Backends, as the tests name them (:func:`use_backend` makes each runnable here or skips
with the reason): ``cpu`` (C++ kernels), ``torch`` (fallback), ``triton`` (the Triton
interpreter on CPU tensors without a GPU, tests/conftest.py sets TRITON_INTERPRET=1;
compiled on CUDA tensors with one), ``cuda`` (the .cu built with the host compiler and
csrc/cuda/host_emulation.h on CPU tensors without a GPU; compiled with one).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

import fasttversky
from reference import reference_tversky_loss

# Per logits dtype: (loss tolerance relative to max |loss|, gradient tolerance relative
# to max |grad|), for every backend. The backends compute in float32 (float64 for
# float64 logits) on the *same rounded inputs* as the reference, so loss errors are
# accumulation-only; gradients are additionally rounded to the logits' dtype when
# stored (fp16: 11 bits, 2^-11 = 4.9e-4 of the largest; bf16: 8 bits, 3.9e-3).
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-5, 2e-3),
    torch.bfloat16: (2e-5, 1.5e-2),
}

ALL_BACKENDS = ("cpu", "torch", "triton", "cuda")
ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# Logits dtypes each backend takes (the CUDA kernels compute in fp32: no float64).
BACKEND_DTYPES = {
    "cpu": ALL_DTYPES,
    "torch": ALL_DTYPES,
    "triton": ALL_DTYPES,
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
}


def has_gpu() -> bool:
    return torch.cuda.is_available()


def backend_device(name: str) -> str:
    """Where ``name``'s inputs live in this session (emulations run on CPU tensors)."""
    return "cuda" if name in ("triton", "cuda") and has_gpu() else "cpu"


def use_backend(name: str, monkeypatch) -> str:
    """Make backend ``name`` runnable in this test (or skip with the reason); its device.

    Without a GPU, ``cuda`` runs its host emulation (FASTTVERSKY_CUDA_EMULATE=1, set for
    this test only) and ``triton`` the interpreter.
    """
    if name == "cuda" and not has_gpu():
        from fasttversky.ops import cuda as cu

        monkeypatch.setenv("FASTTVERSKY_CUDA_EMULATE", "1")
        if cu.find_nvcc() is None and not os.path.exists("/usr/local/cuda/include/cuda_fp16.h"):
            pytest.skip("the CUDA headers are absent: cannot build the emulation")
    why = fasttversky.available_backends()[name]
    if why is not None:
        pytest.skip(f"{name} backend unavailable: {why}")
    return backend_device(name)


def backend_dtype_params(backends=ALL_BACKENDS, dtypes=ALL_DTYPES):
    """pytest params (backend, dtype) for every pair a backend supports, ids 'cpu-float32'."""
    return [
        pytest.param(b, d, id=f"{b}-{str(d).split('.')[-1]}")
        for b in backends
        for d in dtypes
        if d in BACKEND_DTYPES[b]
    ]


def make_inputs(
    B,
    C,
    spatial,
    *,
    dtype=torch.float32,
    soft=False,
    activation="softmax",
    label_dtype=torch.int64,
    seed=0,
    device="cpu",
):
    """Logits (B, C, *spatial) and a target from a seeded generator (never hash()).

    Logits are 2·N(0, 1) (uniform [0, 1) probabilities for activation 'none'); the
    target is labels in [0, max(C, 2)) or, with ``soft``, float32 values in [0, 1)
    with about 30 % exact zeros.
    """
    g = torch.Generator().manual_seed(seed)
    shape = (B, C, *spatial)
    if activation == "none":
        x = torch.rand(shape, generator=g, dtype=torch.float64)
    else:
        x = 2.0 * torch.randn(shape, generator=g, dtype=torch.float64)
    if soft:
        t = torch.rand(shape, generator=g, dtype=torch.float64)
        t = torch.where(t < 0.3, torch.zeros_like(t), t).to(torch.float32)
    else:
        t = torch.randint(0, max(C, 2), (B, *spatial), generator=g)
        t = t.to(torch.bool) if label_dtype == torch.bool else t.to(label_dtype)
    return x.to(dtype).to(device), t.to(device)


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> str:
    diff = (actual.double() - expected.double()).abs()
    bad = diff > tol
    idx = bad.nonzero()[:5].tolist()
    return (
        f"{int(bad.sum())}/{diff.numel()} elements differ by more than {tol:.3g}; "
        f"max diff {diff.max().item():.3g}; first at {idx}"
    )


def run_both(logits, target, backend, **kwargs):
    """(loss, grad, ref, ref_grad): the backend and the float64 reference, same inputs.

    The gradient is of ``Σ w·loss`` with distinct weights w in [0.5, 1.5], so that with
    ``reduction='none'`` an error in one term's gradient cannot hide in the sum.
    """
    x = logits.detach().clone().requires_grad_(True)
    loss = fasttversky.tversky_loss(x, target, backend=backend, **kwargs)
    w = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64, device=loss.device)
    (grad,) = torch.autograd.grad((loss * w.to(loss.dtype).view_as(loss)).sum(), x)

    xr = logits.detach().double().requires_grad_(True)
    tr = target.double() if target.is_floating_point() else target
    ref = reference_tversky_loss(xr, tr, **kwargs)
    (ref_grad,) = torch.autograd.grad((ref * w.view_as(ref)).sum(), xr)
    return loss, grad, ref, ref_grad


def check_against_reference(logits, target, backend, **kwargs):
    """Assert that ``backend`` matches the float64 reference; return (loss, grad)."""
    loss, grad, ref, ref_grad = run_both(logits, target, backend, **kwargs)
    loss_rtol, grad_rtol = TOLERANCES[logits.dtype]
    assert loss.shape == ref.shape, (loss.shape, ref.shape)
    assert loss.dtype == torch.promote_types(logits.dtype, torch.float32)
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
    return loss, grad


def monai_slow_path_warnings(cls: str, path: str) -> list[str]:
    """The SlowPathWarning texts a fresh ``fasttversky.compat.monai`` instance of ``cls``
    gives on its first call whose ``explain()`` was ``path`` and which returned a result:
    none when fused, else one naming the class and ``explain()``'s reason."""
    if path.startswith("fused"):
        return []
    reason = path.removeprefix("fallback: ")
    return [
        f"fasttversky.compat.monai.{cls}: {reason}; "
        "computing MONAI's result with the slower torch path."
    ]


def is_monai_refusal_warning(cls: str, text: str) -> bool:
    """Whether ``text`` is the SlowPathWarning of a ``compat.monai`` ``cls`` whose kernels
    refused the inputs' values while running (NaN logits, targets out of range)."""
    return text.startswith(
        f"fasttversky.compat.monai.{cls}: the fused kernels refused these inputs ("
    ) and text.endswith("; computing MONAI's result with the slower torch path.")


@contextlib.contextmanager
def monai_focal_float64():
    """MONAI's focal term at float64: its ``.float()`` casts go to float64 instead
    (MONAI computes it in float32 whatever the input's dtype; the drop-ins do not)."""
    original = torch.Tensor.float
    torch.Tensor.float = lambda self, *args, **kwargs: self.to(torch.float64)
    try:
        yield
    finally:
        torch.Tensor.float = original

"""NaN in never comes out finite, on every backend, when the input check is off.

With ``FASTTVERSKY_CHECK_INPUTS=0`` (a sync-free training step) nothing rejects a NaN or
inf logit; the loss must then be exactly as non-finite as the float64 reference's, so
that a training loop's non-finite guard fires. The reference (plain torch softmax /
sigmoid) gives NaN for a NaN logit and for +inf under softmax, and a finite loss for
-inf (a zero probability) and for +-inf under sigmoid. The cases put the bad value in a
full 64-voxel tile and in the tail tile of the CPU kernel, on its two-class fused paths
(planar and channels_last_3d), its general path, sigmoid, soft targets and bf16 stores.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import fasttversky
from fasttversky.ops import cuda as cu
from fasttversky.ops import triton as tri
from reference import reference_tversky_loss

NAN, INF = float("nan"), float("inf")

# (id, C, activation, bad value, flat voxel index, options)
CASES = [
    ("2cls-nan-tile", 2, "softmax", NAN, 10, {}),
    ("2cls-nan-tail", 2, "softmax", NAN, 66, {}),
    ("2cls-posinf-tile", 2, "softmax", INF, 10, {}),
    ("2cls-posinf-tail", 2, "softmax", INF, 66, {}),
    ("2cls-neginf", 2, "softmax", -INF, 10, {}),
    ("2cls-nan-channels-last", 2, "softmax", NAN, 10, {"channels_last": True}),
    ("2cls-posinf-channels-last", 2, "softmax", INF, 66, {"channels_last": True}),
    ("2cls-nan-ignore-index", 2, "softmax", NAN, 10, {"ignore_index": 255}),
    ("2cls-nan-bf16", 2, "softmax", NAN, 10, {"dtype": torch.bfloat16}),
    ("3cls-nan", 3, "softmax", NAN, 10, {}),
    ("3cls-posinf-tail", 3, "softmax", INF, 66, {}),
    ("3cls-neginf", 3, "softmax", -INF, 66, {}),
    ("sigmoid-nan", 2, "sigmoid", NAN, 66, {}),
    ("sigmoid-posinf", 2, "sigmoid", INF, 10, {}),
    ("soft-nan", 3, "softmax", NAN, 10, {"soft": True}),
    ("none-nan", 2, "none", NAN, 66, {}),
]


def _inputs(C, bad, pos, opts):
    g = torch.Generator().manual_seed(C * 100 + pos)
    spatial = (1, 3, 23)  # N = 69: one full tile and a tail of 5 voxels
    x = torch.randn(2, C, *spatial, generator=g)
    if opts.get("soft"):
        t = torch.rand(2, C, *spatial, generator=g)
    else:
        t = torch.randint(0, C, (2, *spatial), generator=g).to(torch.uint8)
        if "ignore_index" in opts:
            t[:, 0, 0, :4] = opts["ignore_index"]
    x.view(2, C, -1)[1, C - 1, pos] = bad
    x = x.to(opts.get("dtype", torch.float32))
    if opts.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x, t


def _check_like_reference(backend, C, activation, bad, pos, opts, monkeypatch):
    monkeypatch.setenv("FASTTVERSKY_CHECK_INPUTS", "0")
    x, t = _inputs(C, bad, pos, opts)
    kw = {"activation": activation, "reduction": "none"}
    if "ignore_index" in opts:
        kw["ignore_index"] = opts["ignore_index"]
    xk = x.clone().requires_grad_()
    loss = fasttversky.tversky_loss(xk, t, backend=backend, **kw)
    loss.sum().backward()

    xr = x.detach().double().requires_grad_()
    ref = reference_tversky_loss(xr, t.double() if t.is_floating_point() else t, **kw)
    ref.sum().backward()

    loss = loss.detach().double()
    assert torch.equal(torch.isnan(loss), torch.isnan(ref)), (loss, ref)
    assert torch.isfinite(loss).all() == torch.isfinite(ref).all(), (loss, ref)
    finite = torch.isfinite(ref)
    torch.testing.assert_close(loss[finite], ref[finite], rtol=2e-2, atol=1e-3)
    # the gradient is non-finite exactly when the reference's is (somewhere)
    assert bool(torch.isfinite(xk.grad).all()) == bool(torch.isfinite(xr.grad).all())


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("case_id, C, activation, bad, pos, opts", CASES, ids=[c[0] for c in CASES])
def test_nonfinite_logits_like_reference(
    backend, case_id, C, activation, bad, pos, opts, monkeypatch
):
    _check_like_reference(backend, C, activation, bad, pos, opts, monkeypatch)


def test_cpu_float64_nan(monkeypatch):
    _check_like_reference("cpu", 2, "softmax", NAN, 10, {"dtype": torch.float64}, monkeypatch)
    _check_like_reference("cpu", 3, "softmax", INF, 66, {"dtype": torch.float64}, monkeypatch)


# A few cases on the GPU backends' real kernel code, run on the CPU: Triton in its
# interpreter, CUDA through its host emulation (tests/test_cuda_build.py).
GPU_CASES = [
    c
    for c in CASES
    if c[0]
    in ("2cls-nan-tile", "2cls-posinf-tail", "3cls-nan", "3cls-neginf", "sigmoid-nan", "soft-nan")
]


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "case_id, C, activation, bad, pos, opts", GPU_CASES, ids=[c[0] for c in GPU_CASES]
)
def test_triton_nonfinite_logits_like_reference(
    case_id, C, activation, bad, pos, opts, monkeypatch
):
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton interpreter on CPU tensors; tests/test_gpu.py covers a GPU")
    why = tri.BACKEND.unavailable()
    if why:
        pytest.skip(f"triton backend unavailable: {why}")
    _check_like_reference("triton", C, activation, bad, pos, opts, monkeypatch)


@pytest.mark.nvcc
@pytest.mark.parametrize(
    "case_id, C, activation, bad, pos, opts", GPU_CASES, ids=[c[0] for c in GPU_CASES]
)
def test_cuda_emulated_nonfinite_logits_like_reference(
    case_id, C, activation, bad, pos, opts, monkeypatch
):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/test_gpu.py runs the compiled kernels")
    if cu.find_nvcc() is None and not Path("/usr/local/cuda/include/cuda_fp16.h").exists():
        pytest.skip("the CUDA headers are absent: cannot build the emulation")
    monkeypatch.setenv("FASTTVERSKY_CUDA_EMULATE", "1")
    why = cu.BACKEND.unavailable()
    assert why is None, f"emulation build failed: {why}"
    _check_like_reference("cuda", C, activation, bad, pos, opts, monkeypatch)

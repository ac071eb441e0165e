"""The CUDA backend without a GPU.

1. Every ``csrc/cuda/*.cu`` compiles with ``nvcc -c`` for sm_80 and sm_90 (nvcc errors
   fail the test; it is skipped only when nvcc is absent).
2. The same .cu, built by the host compiler with csrc/cuda/host_emulation.h
   (``FASTTVERSKY_CUDA_EMULATE=1``: each block's threads as std::threads), runs through
   the public API with ``backend="cuda"`` on CPU tensors against the float64 reference:
   the real kernel code, its vectorised and scalar paths, tails, multi-block partials
   and the fixed-order finalize. On a machine with a GPU these are skipped: there
   tests/test_gpu.py runs the compiled kernels instead.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from _helpers import check_against_reference, make_inputs

import fasttversky
from fasttversky.ops import cuda as cu

# .ci/run (FASTTVERSKY_CI=1) fails when these skip: CI must compile every .cu.
pytestmark = pytest.mark.nvcc

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


# ------------------------------------------------------------------------------------
# 1. nvcc
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("src", CU_FILES, ids=[p.name for p in CU_FILES])
def test_nvcc_builds_for_sm80_and_sm90(src, tmp_path):
    if cu.find_nvcc() is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME): cannot check that the .cu compiles")
    # Both architectures in one nvcc call; --threads 2 builds them side by side.
    cmd = cu.nvcc_command("80", src, tmp_path / f"{src.stem}.o", shared=False)
    cmd[-3:-3] = ["-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v", "--threads", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    # Warnings in our own source fail too (nvcc's notes about the toolkit do not).
    ours = [ln for ln in proc.stderr.splitlines() if src.name in ln and "warning" in ln]
    assert not ours, "\n".join(ours)
    if src.name != "tversky_cuda.cu":
        return
    # No kernel variant may make ptxas spill: every instantiation (logits dtype, activation,
    # MAXC, and each CE-family variant: none, label, soft/smoothing, focal) and the
    # finalize kernels have zero spill bytes. (bench/ptxas_report.py prints the table.)
    spills, name = {}, None
    for line in proc.stderr.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if m:
            name = f"{m.group(1)} ({m.group(2)})"
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name is not None:
            spills[name] = int(m.group(1)) + int(m.group(2))
            name = None
    assert len(spills) >= 2 * (2 * 3 * 2 * 2 * 4 + 3), sorted(spills)  # both archs
    assert not {k: v for k, v in spills.items() if v}, {k: v for k, v in spills.items() if v}
    # Link it as ops/cuda.py does and load it: the exported launchers exist and the
    # compiled struct has the size of the loader's ctypes mirror (csrc/tversky.h drift).
    lib_path = tmp_path / "libtversky_cuda.so"
    link = [cmd[0], "--shared", str(tmp_path / f"{src.stem}.o"), "-o", str(lib_path)]
    proc = subprocess.run(link, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(link)}\n{proc.stderr[-4000:]}"
    import ctypes

    dll = ctypes.CDLL(str(lib_path))
    for name in (
        "tversky_cuda_forward",
        "tversky_cuda_backward",
        "tversky_cuda_check",
        "tversky_cuda_forward_workspace",
        "tversky_cuda_error_string",
    ):
        assert hasattr(dll, name), name
    dll.tversky_cuda_params_size.restype = ctypes.c_int64
    assert dll.tversky_cuda_params_size() == ctypes.sizeof(cu.TverskyParams)


# ------------------------------------------------------------------------------------
# 2. the kernels, emulated on the CPU
# ------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=False)
def emulated():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/test_gpu.py runs the compiled kernels")
    if cu.find_nvcc() is None and not Path("/usr/local/cuda/include/cuda_fp16.h").exists():
        pytest.skip("the CUDA headers are absent: cannot build the emulation")
    old = os.environ.get("FASTTVERSKY_CUDA_EMULATE")
    os.environ["FASTTVERSKY_CUDA_EMULATE"] = "1"
    why = cu.BACKEND.unavailable()
    if why:
        pytest.fail(f"emulation build failed: {why}")
    yield
    if old is None:
        os.environ.pop("FASTTVERSKY_CUDA_EMULATE", None)
    else:
        os.environ["FASTTVERSKY_CUDA_EMULATE"] = old


def _make(B, C, spatial, *, label_dtype=torch.uint8, **kw):
    return make_inputs(B, C, spatial, label_dtype=label_dtype, **kw)


def _check(x, t, **kw):
    """backend='cuda' (emulated) vs the float64 reference (tests/_helpers)."""
    return check_against_reference(x, t, "cuda", **kw)


# Spatial shapes: N = 640 (a multiple of 8: 16-byte vector path, tail inside the last
# block), N = 990 (rows not 16-byte aligned: scalar path), N = 4100 (several blocks per
# sample, ragged last packet).
SHAPES = [(8, 8, 10), (9, 10, 11), (4100,)]


@pytest.mark.parametrize("spatial", SHAPES, ids=["vec", "scalar", "multiblock"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_emulated_dtypes_and_paths(emulated, spatial, dtype):
    x, t = _make(2 if len(spatial) > 1 else 1, 3, spatial, dtype=dtype, seed=1)
    _check(x, t)


@pytest.mark.parametrize("soft", [False, True], ids=["labels", "soft"])
@pytest.mark.parametrize(
    "activation,C",
    [("softmax", 2), ("softmax", 5), ("softmax", 8), ("sigmoid", 1), ("sigmoid", 4), ("none", 2)],
)
def test_emulated_activation_target(emulated, activation, C, soft):
    x, t = _make(2, C, (8, 8, 10), soft=soft, activation=activation, seed=C)
    _check(x, t, activation=activation, gamma=0.75, batch=soft)


@pytest.mark.parametrize(
    "label_dtype,ignore_index",
    [
        (torch.uint8, 255),
        (torch.int16, -1),
        (torch.int32, 2),
        (torch.int64, -100),
        (torch.bool, None),
    ],
)
def test_emulated_labels_and_ignore(emulated, label_dtype, ignore_index):
    C = 2 if label_dtype == torch.bool else 3
    x, t = _make(2, C, (8, 8, 10), label_dtype=label_dtype, seed=3)
    if ignore_index is not None:
        drop = torch.rand(t.shape, generator=torch.Generator().manual_seed(4)) < 0.25
        t = torch.where(drop, torch.full_like(t, ignore_index), t)
    _, grad = _check(
        x,
        t,
        ignore_index=ignore_index,
        alpha=[0.2, 0.3, 0.4][:C],
        class_weights=[1.0, 2.0, 0.5][:C],
        include_background=False,
    )
    if ignore_index is not None:
        assert (grad.movedim(1, -1)[t == ignore_index] == 0).all()


@pytest.mark.parametrize("layout", ["channels_last_3d", "strided", "binary_channel_dim"])
def test_emulated_layouts(emulated, layout):
    if layout == "binary_channel_dim":
        x, t = _make(2, 1, (8, 8, 10), activation="sigmoid", seed=5)
        _check(x, t.unsqueeze(1), activation="sigmoid")
        return
    x, t = _make(2, 4, (8, 8, 10), seed=6)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    else:
        x, t = x[:, :, ::2, :, 1:], t[:, ::2, :, 1:]
    _check(x, t)


def test_emulated_repeat_is_bitwise_equal(emulated):
    x, t = _make(1, 4, (4100,), seed=7)
    outs = []
    for _ in range(2):
        xk = x.clone().requires_grad_()
        loss = fasttversky.tversky_loss(xk, t, backend="cuda")
        loss.backward()
        outs.append((loss.detach(), xk.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("bad", ["label", "nan", "soft"])
def test_emulated_bad_inputs_raise(emulated, bad):
    x, t = _make(2, 3, (4, 5, 6), soft=bad == "soft", seed=8)
    if bad == "label":
        t[1, 1, 1, 1] = 7
    elif bad == "nan":
        x[0, 1, 2, 3, 4] = float("nan")
    else:
        t[0, 0, 0, 0, 0] = -0.5
    with pytest.raises(ValueError):
        fasttversky.tversky_loss(x, t, backend="cuda")


def test_refusals_have_reasons(emulated):
    x, t = _make(1, 3, (4, 4), seed=9)
    with pytest.raises(fasttversky.BackendUnavailableError, match="float64"):
        fasttversky.tversky_loss(x.double(), t, backend="cuda")
    x, t = _make(1, cu.MAX_CLASSES + 1, (4, 4), seed=9)
    with pytest.raises(fasttversky.BackendUnavailableError, match="classes"):
        fasttversky.tversky_loss(x, t, backend="cuda")


def test_unavailable_is_one_clear_reason_without_gpu(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("only meaningful on a machine without a GPU")
    monkeypatch.delenv("FASTTVERSKY_CUDA_EMULATE", raising=False)
    why = cu.BACKEND.unavailable()
    assert why and "\n" not in why

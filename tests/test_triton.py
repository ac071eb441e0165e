"""The Triton backend against the float64 reference.

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported and
these run the real kernels in the Triton interpreter on CPU tensors (small volumes);
with a GPU (bench/gpu_report.py runs this file with the interpreter off) they run
compiled on CUDA tensors. Everything goes through the public API with
``backend="triton"``.
"""

from __future__ import annotations

import os

import pytest
import torch
from _helpers import check_against_reference, make_inputs

import fasttversky
from fasttversky.ops import triton as tri

pytestmark = pytest.mark.interpreter

if tri.BACKEND.unavailable() is not None:
    pytest.skip(f"triton backend unavailable: {tri.BACKEND.unavailable()}", allow_module_level=True)

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def _old_interpreter_with_new_numpy() -> bool:
    # triton < 3.8's interpreter turns a runtime loop bound into a 1-element array and
    # calls int() on it, which NumPy >= 2.3 refuses; the compiled kernels are unaffected
    # (test_kernels_compile_for_sm80_and_sm90 passes on triton 3.6).
    import numpy
    import triton

    def ver(v):
        return tuple(int(p) for p in v.split(".")[:2] if p.isdigit())

    return DEVICE == "cpu" and ver(triton.__version__) < (3, 8) and ver(numpy.__version__) >= (2, 3)


@pytest.fixture(autouse=True)
def _needs_working_interpreter(request):
    if (
        request.node.name.startswith("test_kernels_compile")
        or not _old_interpreter_with_new_numpy()
    ):
        return
    pytest.skip("triton < 3.8's interpreter cannot run runtime-bound loops with NumPy >= 2.3")


def _report(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float):
    """assert_close with a message saying how many elements differ and where."""
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    bad = ~torch.isclose(got, want, rtol=rtol, atol=atol)
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        diff = (got - want).abs()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements differ "
            f"(max abs diff {diff.max().item():.3e}); first at {idx}: "
            f"got {got[tuple(idx)].item():.9g}, want {want[tuple(idx)].item():.9g} "
            f"(rtol={rtol}, atol={atol})"
        )


def _make(B, C, spatial, **kw):
    return make_inputs(B, C, spatial, device=DEVICE, **kw)


def _check_against_reference(x, target, **kw):
    """Loss and dL/dlogits of backend='triton' vs the float64 reference (tests/_helpers)."""
    return check_against_reference(x, target, "triton", **kw)


# ------------------------------------------------------------------------------------
# activations x targets x class counts
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("soft", [False, True], ids=["labels", "soft"])
@pytest.mark.parametrize(
    "activation,C",
    [("softmax", 2), ("softmax", 5), ("sigmoid", 1), ("sigmoid", 3), ("none", 1), ("none", 2)],
)
def test_activation_target(activation, C, soft):
    x, t = _make(2, C, (9, 10, 11), soft=soft, activation=activation, seed=C)
    _check_against_reference(x, t, activation=activation)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("batch", [False, True])
def test_reduction_batch(reduction, batch):
    x, t = _make(3, 3, (6, 7, 5), seed=1)
    _check_against_reference(x, t, reduction=reduction, batch=batch)


@pytest.mark.parametrize("gamma", [0.75, 1.0, 2.0])
@pytest.mark.parametrize("include_background", [True, False])
def test_gamma_background(gamma, include_background):
    x, t = _make(2, 4, (8, 9), seed=2)
    _check_against_reference(x, t, gamma=gamma, include_background=include_background)


def test_per_class_alpha_beta_weights():
    x, t = _make(2, 4, (5, 6, 7), seed=3)
    _check_against_reference(
        x,
        t,
        alpha=[0.1, 0.3, 0.5, 0.7],
        beta=[0.9, 0.7, 0.5, 0.3],
        class_weights=[0.0, 1.0, 2.0, 0.5],
        include_background=True,
        reduction="mean",
    )
    _check_against_reference(x, t, alpha=0.5, beta=0.5, smooth_nr=0.0, smooth_dr=1e-6)


@pytest.mark.parametrize(
    "label_dtype,ignore_index",
    [
        (torch.uint8, 255),
        (torch.int16, -1),
        (torch.int32, 7),
        (torch.int64, -100),
        (torch.int64, None),
        (torch.bool, None),
    ],
)
def test_label_dtypes_and_ignore_index(label_dtype, ignore_index):
    C = 2 if label_dtype == torch.bool else 3
    x, t = _make(2, C, (7, 8, 9), label_dtype=label_dtype, seed=4)
    if ignore_index is not None:
        g = torch.Generator().manual_seed(5)
        drop = (torch.rand(t.shape, generator=g) < 0.25).to(t.device)
        t = torch.where(drop, torch.full_like(t, ignore_index), t)
    loss, grad = _check_against_reference(x, t, ignore_index=ignore_index)
    if ignore_index is not None:
        # Ignored voxels get exactly zero gradient in every class.
        assert (grad.movedim(1, -1)[t == ignore_index] == 0).all()


def test_binary_sigmoid_labels_with_ignore():
    x, t = _make(2, 1, (9, 10, 11), activation="sigmoid", label_dtype=torch.uint8, seed=6)
    t[:, :2] = 255
    _check_against_reference(x, t, activation="sigmoid", ignore_index=255)
    _check_against_reference(x, t.unsqueeze(1), activation="sigmoid", ignore_index=255)


# ------------------------------------------------------------------------------------
# layouts and dtypes
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "layout", ["contiguous", "channels_last_3d", "strided", "permuted", "label_channel_dim"]
)
def test_layouts(layout):
    x, t = _make(2, 3, (9, 10, 11), seed=7)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "strided":
        big, tb = _make(2, 3, (18, 10, 22), seed=8)
        x, t = big[:, :, ::2, :, ::2], tb[:, ::2, :, ::2]
    elif layout == "permuted":
        x = x.permute(0, 1, 4, 3, 2).contiguous().permute(0, 1, 4, 3, 2)
        t = t.transpose(1, 3).contiguous().transpose(1, 3)
    elif layout == "label_channel_dim":
        t = t.unsqueeze(1)
    _check_against_reference(x, t)


def test_channels_last_soft_target():
    x, t = _make(2, 3, (6, 7, 8), soft=True, seed=9)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    t = t.contiguous(memory_format=torch.channels_last_3d)
    _check_against_reference(x, t)


@pytest.mark.parametrize("spatial", [(257,), (13, 17), (5, 6, 7)], ids=["1d", "2d", "3d"])
def test_spatial_dims(spatial):
    x, t = _make(2, 3, spatial, seed=10)
    _check_against_reference(x, t, ignore_index=None)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str
)
@pytest.mark.parametrize("soft", [False, True], ids=["labels", "soft"])
def test_dtypes(dtype, soft):
    x, t = _make(2, 3, (9, 10, 11), dtype=dtype, soft=soft, seed=11)
    _check_against_reference(x, t)


@pytest.mark.parametrize("tile", [(16, 1), (16, 3), (32, 2)])
def test_many_tiles_and_tails(monkeypatch, tile):
    """Several tiles per sample, a partial last tile, a partial last step (masking)."""
    monkeypatch.setattr(tri, "_TILE_OVERRIDE", tile)
    x, t = _make(2, 5, (7, 9, 11), seed=12)
    t[0, 0] = 4
    _check_against_reference(x, t, ignore_index=4, gamma=0.75)
    xs, ts = _make(2, 3, (5, 7, 3), soft=True, seed=13)
    _check_against_reference(xs, ts, batch=True)


# ------------------------------------------------------------------------------------
# determinism and input checks
# ------------------------------------------------------------------------------------
def test_repeat_is_bitwise_equal(monkeypatch):
    monkeypatch.setattr(tri, "_TILE_OVERRIDE", (32, 3))
    x, t = _make(2, 4, (9, 10, 11), seed=14)
    outs = []
    for _ in range(3):
        xk = x.clone().requires_grad_()
        loss = fasttversky.tversky_loss(xk, t, backend="triton")
        loss.backward()
        outs.append((loss.detach(), xk.grad))
    for loss, grad in outs[1:]:
        assert torch.equal(loss, outs[0][0])
        assert torch.equal(grad, outs[0][1])


def test_stats_match_torch_backend():
    """The raw (B, C, 3) sums and flags, not only the loss."""
    from fasttversky._spec import KernelSpec
    from fasttversky.ops import torch as tb

    x, t = _make(2, 3, (9, 10, 11), seed=15)
    x3, t3 = x.flatten(2), t.flatten(1)
    t3 = t3.clone()
    t3[0, :5] = 9  # ignored
    t3[1, :3] = 3  # bad
    spec = KernelSpec(activation=0, soft_target=False, ignore_index=9, num_classes=3)
    s_k, f_k = tri.BACKEND.forward_stats(x3, t3, spec)
    s_t, f_t = tb.BACKEND.forward_stats(x3, t3, spec)
    _report("stats", s_k, s_t, atol=1e-4, rtol=1e-5)
    assert f_k.dtype == torch.int64 and f_k.tolist() == f_t.tolist() == [0, 3]


@pytest.mark.parametrize(
    "bad", ["label_high", "label_negative", "nan", "inf", "soft_high", "soft_nan"]
)
def test_bad_inputs_raise(bad):
    soft = bad.startswith("soft")
    x, t = _make(2, 3, (4, 5, 6), soft=soft, seed=16)
    if bad == "label_high":
        t[1, 2, 3, 4] = 3
        match = "label"
    elif bad == "label_negative":
        t[0, 0, 0, 0] = -2
        match = "label"
    elif bad == "nan":
        x[1, 2, 0, 0, 1] = float("nan")
        match = "non-finite"
    elif bad == "inf":
        x[0, 0, 3, 4, 5] = float("-inf")
        match = "non-finite"
    elif bad == "soft_high":
        t[0, 1, 1, 1, 1] = 1.5
        match = "outside"
    else:
        t[1, 0, 0, 0, 0] = float("nan")
        match = "outside"
    with pytest.raises(ValueError, match=match):
        fasttversky.tversky_loss(x, t, backend="triton")


def test_refuses_with_reason():
    x, t = _make(1, tri.MAX_CLASSES + 1, (2, 2), seed=17)
    with pytest.raises(fasttversky.BackendUnavailableError, match="classes"):
        fasttversky.tversky_loss(x, t, backend="triton")


# ------------------------------------------------------------------------------------
# the compiler, not the interpreter
# ------------------------------------------------------------------------------------
_COMPILE_SCRIPT = r"""
import sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fasttversky.ops import _triton_math as K

PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16", "fp64": "*fp64"}

def compile_one(kern, ptrs, consts, arch):
    sig = {}
    for name in kern.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptrs[name]
        else:
            sig[name] = "i64"
    try:
        src = ASTSource(kern, sig, constexprs=consts)
    except (TypeError, AttributeError, KeyError) as exc:  # another triton's ASTSource API
        print(f"API-MISMATCH {type(exc).__name__}: {exc}")
        sys.exit(4)
    triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})

n = 0
for arch in (80, 90):
    for xdt, cdt in (("fp32", tl.float32), ("bf16", tl.float32), ("fp16", tl.float32),
                     ("fp64", tl.float64)):
        part = "*fp64" if xdt == "fp64" else "*fp32"
        soft = PTR[xdt]
        # (ACTIVATION, target pointer, HAS_IGNORE_INDEX, C_PAD, other switches)
        cases = [(0, "*u8", True, 4, {}), (1, soft, False, 8, dict(HAS_SOFT_TARGET=True)),
                 (2, "*u8", False, 2, dict(BINARY_LABELS=True)),
                 (2, "*u8", False, 4, dict(HAS_REGIONS=True))]
        if xdt in ("fp32", "fp64"):  # the cross-entropy family
            cases += [(0, "*u8", True, 4, dict(CE=1)),
                      (1, "*u8", True, 2, dict(CE=1, BINARY_LABELS=True)),
                      (0, "*fp32", True, 4, dict(CE=1)),  # a float label map
                      (0, soft, False, 4, dict(CE=1, HAS_SOFT_TARGET=True, HAS_SMOOTHING=True)),
                      (0, "*u8", True, 4, dict(CE=2, HAS_SMOOTHING=True)),
                      (1, soft, False, 4, dict(CE=2, HAS_SOFT_TARGET=True)),
                      (1, "*fp16", True, 4, dict(CE=2, HAS_REGIONS=True))]
        for act, tdt, ign, cpad, other in cases:
            consts = dict(ACTIVATION=act, HAS_SOFT_TARGET=False, HAS_IGNORE_INDEX=ign,
                          BINARY_LABELS=False, C_PAD=cpad, BLOCK_N=2048 // cpad, CDTYPE=cdt,
                          CE=0, HAS_SMOOTHING=False, HAS_REGIONS=False)
            consts.update(other)
            compile_one(K._tversky_fwd_partials_kernel,
                        dict(logits_ptr=PTR[xdt], target_ptr=tdt, regions_ptr="*i64",
                             params_ptr=part, partials_ptr=part, counts_ptr="*i32"), consts, arch)
            compile_one(K._tversky_bwd_kernel,
                        dict(logits_ptr=PTR[xdt], target_ptr=tdt, regions_ptr="*i64",
                             params_ptr=part, coefs_ptr=part, grad_ptr=PTR[xdt]), consts, arch)
            n += 2
        for nce in ((0, 1, 2) if xdt in ("fp32", "fp64") else (0,)):
            compile_one(K._tversky_finalize_kernel,
                        dict(partials_ptr=part, counts_ptr="*i32", stats_ptr="*fp64",
                             flag_sums_ptr="*i64"), dict(C_PAD=4, BLOCK_T=256, NCE=nce), arch)
            n += 1
print(f"compiled {n} kernels")
"""


def test_kernels_compile_for_sm80_and_sm90():
    """The interpreter accepts things the compiler rejects (and vice versa): compile
    every kernel, each dtype and activation, to a cubin for sm_80 and sm_90 with
    triton's own ptxas. No GPU needed."""
    import subprocess
    import sys

    from triton.backends.compiler import GPUTarget  # noqa: F401  (API present?)

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(
        [
            str(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
            env.get("PYTHONPATH", ""),
        ]
    )
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env
    )
    if proc.returncode == 4:
        pytest.skip(f"this triton's compiler API differs: {proc.stdout.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "compiled 136 kernels" in proc.stdout, proc.stdout

"""Both GPU backends (compiled Triton, hand-written CUDA) on a real GPU.

Against the float64 reference computed on the GPU; 20-repeat bitwise determinism; the
paper's shape; a volume over 2**31 elements (int64 offsets); torch.compile. Skipped,
with the reason, on machines without CUDA. ``bench/gpu_report.py`` runs this file.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import check_against_reference

import fasttversky

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BACKENDS = ["triton", "cuda"]


def _need(backend: str):
    from fasttversky.ops import cuda as cu
    from fasttversky.ops import triton as tri

    why = (tri if backend == "triton" else cu).BACKEND.unavailable()
    if why:
        pytest.skip(f"{backend} backend unavailable: {why}")


def _make(
    B,
    C,
    spatial,
    *,
    dtype=torch.float32,
    soft=False,
    activation="softmax",
    label_dtype=torch.uint8,
    seed=0,
):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (B, C, *spatial)
    if activation == "none":
        x = torch.rand(shape, generator=g, device="cuda")
    else:
        x = 2.0 * torch.randn(shape, generator=g, device="cuda")
    if soft:
        t = torch.rand(shape, generator=g, device="cuda")
        t = torch.where(t < 0.3, torch.zeros_like(t), t)
    else:
        t = torch.randint(0, 2 if C == 1 else C, (B, *spatial), generator=g, device="cuda")
        t = t.to(label_dtype)
    return x.to(dtype), t


def _check(backend, x, t, **kw):
    """The backend vs the float64 reference on the GPU (tests/_helpers)."""
    return check_against_reference(x, t, backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape",
    [(2, 2, (64, 96, 96)), (1, 5, (17, 19, 23)), (3, 4, (33, 65))],
    ids=["realistic", "odd", "2d"],
)
def test_vs_reference(backend, dtype, shape):
    _need(backend)
    B, C, spatial = shape
    x, t = _make(B, C, spatial, dtype=dtype, seed=C)
    _check(backend, x, t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kw",
    [
        dict(activation="sigmoid", C=1),
        dict(activation="sigmoid", C=3),
        dict(activation="none", C=2),
        dict(soft=True, C=3),
        dict(ignore_index=255, C=4),
        dict(label_dtype=torch.int64, C=3, batch=True, gamma=0.75),
        dict(
            C=4,
            alpha=[0.1, 0.2, 0.3, 0.4],
            beta=[0.9, 0.8, 0.7, 0.6],
            class_weights=[0, 1, 2, 3],
            include_background=False,
            reduction="none",
        ),
        dict(C=3, layout="channels_last_3d"),
        dict(C=3, layout="strided"),
    ],
    ids=lambda kw: "-".join(
        f"{k}={v}" for k, v in kw.items() if k != "alpha" and k != "beta" and k != "class_weights"
    ),
)
def test_features(backend, kw):
    _need(backend)
    kw = dict(kw)
    C = kw.pop("C")
    soft = kw.pop("soft", False)
    layout = kw.pop("layout", None)
    label_dtype = kw.pop("label_dtype", torch.uint8)
    x, t = _make(
        2,
        C,
        (24, 40, 40),
        soft=soft,
        activation=kw.get("activation", "softmax"),
        label_dtype=label_dtype,
        seed=11,
    )
    if "ignore_index" in kw:
        t[:, :4] = kw["ignore_index"]
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "strided":
        x, t = x[:, :, ::2, 1:, ::3], t[:, ::2, 1:, ::3]
    _check(backend, x, t, **kw)


def test_triton_float64():
    _need("triton")
    x, t = _make(2, 3, (32, 48, 48), dtype=torch.float64, seed=3)
    _check("triton", x, t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_twenty_repeats_bitwise_equal(backend):
    _need(backend)
    x, t = _make(2, 4, (64, 128, 128), dtype=torch.bfloat16, seed=5)
    first = None
    for _ in range(20):
        xk = x.clone().requires_grad_()
        loss = fasttversky.tversky_loss(xk, t, backend=backend)
        loss.backward()
        out = (loss.detach().clone(), xk.grad)
        if first is None:
            first = out
        assert torch.equal(out[0], first[0]) and torch.equal(out[1], first[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_paper_shape(backend):
    _need(backend)
    x, t = _make(2, 2, (128, 224, 256), seed=7)
    _check(backend, x, t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_over_2_31_elements(backend):
    """int64 offsets: a (1, 2, 2**30 + 4099) bf16 volume, where the answer is exact."""
    _need(backend)
    free, _ = torch.cuda.mem_get_info()
    N = 2**30 + 4099
    if free < 12 * N:  # logits + grad in bf16 + labels, with room
        pytest.skip(f"needs ~{12 * N / 2**30:.0f} GiB free GPU memory")
    x = torch.zeros((1, 2, N), dtype=torch.bfloat16, device="cuda", requires_grad=True)
    t = torch.zeros((1, N), dtype=torch.uint8, device="cuda")
    t[0, -1000:] = 1
    loss = fasttversky.tversky_loss(
        x, t, backend=backend, reduction="none", smooth_nr=0, smooth_dr=0, alpha=0.5, beta=0.5
    )
    # p = 1/2 everywhere: class 0 has tp = (N-1000)/2, fp = 500, fn = (N-1000)/2.
    n0 = N - 1000
    t0 = (n0 / 2) / (n0 / 2 + 0.5 * 500 + 0.5 * n0 / 2)
    t1 = 500 / (500 + 0.5 * (N / 2 - 500) + 0.5 * 500)
    want = torch.tensor([[1 - t0, 1 - t1]], device="cuda")
    torch.testing.assert_close(loss.float(), want, rtol=1e-6, atol=1e-7)
    loss.sum().backward()
    g = x.grad
    # The gradient depends only on the label: equal at both ends of the volume.
    assert torch.equal(g[0, :, 0], g[0, :, n0 - 1]) and torch.equal(g[0, :, n0], g[0, :, -1])
    assert torch.isfinite(g[0, :, -1].float()).all() and (g[0, :, -1] != 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    _need(backend)
    x, t = _make(2, 3, (16, 32, 32), seed=9)

    def f(x, t):
        return fasttversky.tversky_loss(x, t, backend=backend) * 2.0

    compiled = torch.compile(f, fullgraph=True)
    xk = x.clone().requires_grad_()
    out = compiled(xk, t)
    out.backward()
    xe = x.clone().requires_grad_()
    ref = f(xe, t)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(xk.grad, xe.grad)


def test_auto_picks_a_fused_backend():
    from fasttversky._dispatch import select_backend
    from fasttversky._spec import KernelSpec

    x, t = _make(1, 3, (8, 8, 8), seed=1)
    spec = KernelSpec(activation=0, soft_target=False, ignore_index=None, num_classes=3)
    name = select_backend("auto", x.flatten(2), t.flatten(1), spec)
    assert name in ("cuda", "triton"), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_labels_raise(backend):
    _need(backend)
    x, t = _make(2, 3, (8, 8, 8), seed=2)
    t[1, 2, 3, 4] = 9
    with pytest.raises(ValueError, match="label"):
        fasttversky.tversky_loss(x, t, backend=backend)

"""The compound loss (Tversky + cross-entropy in the same fused pass) on every backend.

Every case compares value and gradient with the float64 reference
(``reference_tversky_loss(..., ce_weight=...)`` = reference Tversky + ``F.cross_entropy``
/ ``F.binary_cross_entropy_with_logits``) through the shared harness. The triton
backend runs in the Triton interpreter and the cuda backend in its host emulation when
there is no GPU; a backend that cannot run here is skipped with its reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import TOLERANCES, backend_device, check_against_reference, use_backend

from fasttversky import TverskyLoss, deep_supervision_loss, tversky_loss
from fasttversky.deep_supervision import default_weights, downsample_labels
from reference import reference_cross_entropy, reference_tversky_loss

BACKENDS = ["torch", "cpu", "triton", "cuda"]
FUSED = "cpu"  # the backend of the CPU-only checks (thread count, saved tensors, compile)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    use_backend(request.param, monkeypatch)
    return request.param


def _on(backend, *tensors):
    """The tensors on the backend's device (CPU for the interpreter / emulation)."""
    dev = backend_device(backend)
    out = tuple(t.to(dev) for t in tensors)
    return out if len(out) > 1 else out[0]


def _dtypes(backend):
    # the cuda kernels take float32/16/bf16 (float64 goes to triton)
    return (torch.float32, torch.bfloat16) if backend == "cuda" else (torch.float64, torch.float32)


def _data(B, C, spatial, *, seed, label_dtype=torch.int64, ignore=None, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    x = scale * torch.randn((B, C, *spatial), generator=gen, dtype=torch.float64)
    t = torch.randint(0, max(C, 2), (B, *spatial), generator=gen)
    if ignore is not None:
        t = torch.where(torch.rand(t.shape, generator=gen) < 0.2, torch.full_like(t, ignore), t)
    return x, t.to(label_dtype)


# (id, B, C, spatial, kwargs, label dtype, ignore label placed in the target)
CASES = [
    ("softmax", 2, 3, (5, 6, 7), {}, torch.int64, None),
    # two classes, N = 360: five full 64-voxel tiles (the CPU's fused two-class loop)
    # and a 40-voxel tail (its masked path)
    ("softmax-2class", 2, 2, (9, 8, 5), {}, torch.uint8, None),
    ("softmax-2class-ignore", 2, 2, (9, 8, 5), {"ignore_index": 255}, torch.uint8, 255),
    ("softmax-ignore", 2, 4, (5, 4, 6), {"ignore_index": -100}, torch.int64, -100),
    (
        "softmax-ce-weights",
        2,
        3,
        (4, 5, 6),
        {"ce_class_weights": [0.2, 1.0, 3.0], "ignore_index": 1},
        torch.int32,
        None,
    ),
    (
        "softmax-batch-sum-nobg",
        3,
        3,
        (4, 4, 5),
        {"batch": True, "reduction": "sum", "include_background": False, "gamma": 0.75},
        torch.int16,
        None,
    ),
    ("sigmoid-multiclass", 2, 3, (5, 4, 6), {"activation": "sigmoid"}, torch.int64, None),
    ("sigmoid-binary", 2, 1, (6, 5, 4), {"activation": "sigmoid"}, torch.uint8, None),
    (
        "sigmoid-binary-ignore",
        2,
        1,
        (6, 5, 4),
        {"activation": "sigmoid", "ignore_index": 255, "batch": True},
        torch.uint8,
        255,
    ),
    (
        "sigmoid-weights-ignore",
        2,
        3,
        (4, 5, 6),
        {"activation": "sigmoid", "ce_class_weights": [0.5, 1.0, 2.0], "ignore_index": 7},
        torch.int64,
        7,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(case, backend):
    _, B, C, spatial, kw, label_dtype, ignore = case
    x, t = _data(B, C, spatial, seed=len(case[0]), label_dtype=label_dtype, ignore=ignore)
    for dtype in _dtypes(backend):
        check_against_reference(*_on(backend, x.to(dtype), t), backend, ce_weight=0.8, **kw)


def test_reference_cross_entropy_is_torch():
    """The oracle's CE is torch's own, and the softmax CE has F.cross_entropy's weights."""
    x, t = _data(2, 3, (4, 5), seed=1)
    w = [0.5, 1.0, 2.0]
    want = F.cross_entropy(x, t, weight=torch.tensor(w, dtype=x.dtype))
    assert torch.equal(reference_cross_entropy(x, t, class_weights=w), want)
    want = F.binary_cross_entropy_with_logits(x, F.one_hot(t, 3).movedim(-1, 1).double())
    torch.testing.assert_close(reference_cross_entropy(x, t, activation="sigmoid"), want)


def test_channels_last_two_class(backend):
    """UNet3D's CPU output layout (the CPU kernel's interleaved two-class loop)."""
    x, t = _data(2, 2, (8, 8, 4), seed=5, label_dtype=torch.uint8, ignore=255)
    x = x.float().contiguous(memory_format=torch.channels_last_3d)
    check_against_reference(*_on(backend, x, t), backend, ce_weight=1.0, ignore_index=255)


@pytest.mark.parametrize("layout", ["planar", "channels_last"])
@pytest.mark.parametrize("ignore", [None, 255])
def test_two_class_many_blocks(layout, ignore, monkeypatch):
    """The CPU's fused two-class forward walks the full tiles of a 16384-voxel chunk in
    blocks of 16 tiles, folding the CE's products every 64: two samples of 35,409 voxels
    give full chunks (16 blocks, 4 folds each), a chunk ending in a partial block (41
    tiles) and a 17-voxel tail. Compared with the float64 reference in float32 and
    float64, and an inf logit in the last block must still make the loss NaN."""
    x, t = _data(2, 2, (33, 37, 29), seed=11, label_dtype=torch.uint8, ignore=ignore)
    mf = torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format
    kw = dict(ce_weight=1.0, ignore_index=ignore)
    for dtype in (torch.float64, torch.float32):
        xd = x.to(dtype).contiguous(memory_format=mf)
        check_against_reference(xd, t, FUSED, **kw)
    # equal logits and one label: every voxel's CE factor is 2, so products left
    # unfolded for more than 128 tiles would overflow float32
    check_against_reference(torch.zeros_like(xd), torch.zeros_like(t), FUSED, **kw)
    bad = x.float().contiguous(memory_format=mf)
    bad[1, 0, 32, 30, 0] = float("inf")  # voxel 35,206 of sample 1: the partial block
    monkeypatch.setenv("FASTTVERSKY_CHECK_INPUTS", "0")
    assert torch.isnan(tversky_loss(bad, t, backend=FUSED, **kw))


@pytest.mark.parametrize(
    "activation, C", [("softmax", 2), ("softmax", 3), ("sigmoid", 1), ("sigmoid", 3)]
)
def test_extreme_logits(backend, activation, C):
    """±1e4 logits (and ±65504 in float16): the same finite values as float64."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, C, 8, 8, 3, generator=gen, dtype=torch.float64)
    pick = torch.rand(x.shape, generator=gen)
    x = torch.where(pick < 0.3, torch.full_like(x, 1e4), x)
    x = torch.where(pick > 0.7, torch.full_like(x, -1e4), x)
    t = torch.randint(0, max(C, 2), (2, 8, 8, 3), generator=gen).to(torch.uint8)
    kw = dict(activation=activation, ce_weight=1.0, ignore_index=None)
    for dtype in _dtypes(backend):
        check_against_reference(*_on(backend, x.to(dtype), t), backend, **kw)
    if backend != "torch":  # torch's CPU softmax in float16 is the only non-kernel path
        big = torch.where(x > 0, 65504.0, torch.where(x < 0, -65504.0, x)).to(torch.float16)
        check_against_reference(*_on(backend, big, t), backend, **kw)


def test_deterministic(backend):
    x, t = _data(2, 3, (16, 16, 12), seed=7, label_dtype=torch.uint8, ignore=255)
    x, t = _on(backend, x.float(), t)
    out = []
    for _ in range(3):
        xr = x.clone().requires_grad_(True)
        loss = tversky_loss(xr, t, backend=backend, ce_weight=1.0, ignore_index=255)
        loss.backward()
        out.append((loss.detach(), xr.grad))
    for loss, grad in out[1:]:
        assert torch.equal(loss, out[0][0]) and torch.equal(grad, out[0][1])


def test_cpu_independent_of_thread_count():
    x, t = _data(1, 2, (48, 48, 40), seed=8, label_dtype=torch.uint8)
    x = x.float()
    n = torch.get_num_threads()
    res = []
    try:
        for threads in (1, max(2, n)):
            torch.set_num_threads(threads)
            xr = x.clone().requires_grad_(True)
            loss = tversky_loss(xr, t, backend=FUSED, ce_weight=1.0)
            loss.backward()
            res.append((loss.detach(), xr.grad))
    finally:
        torch.set_num_threads(n)
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])


def test_zero_weight_is_todays_loss(backend):
    """ce_weight=0 runs the Tversky-only kernels: bitwise today's value and gradient."""
    x, t = _data(2, 3, (6, 5, 4), seed=9)
    x, t = _on(backend, x.float(), t)
    res = []
    for kw in ({}, {"ce_weight": 0.0, "ce_class_weights": [1.0, 2.0, 3.0]}):
        xr = x.clone().requires_grad_(True)
        loss = tversky_loss(xr, t, backend=backend, **kw)
        loss.backward()
        res.append((loss.detach(), xr.grad))
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])


def test_all_voxels_ignored_is_zero_ce(backend):
    x, t = _data(1, 3, (4, 4, 4), seed=10)
    t = torch.full_like(t, 5)
    ref = reference_tversky_loss(x, t, ignore_index=5)
    x, t = _on(backend, x, t)
    xr = x.float().requires_grad_(True)
    loss = tversky_loss(xr, t, backend=backend, ce_weight=1.0, ignore_index=5)
    loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    assert torch.all(xr.grad == 0)


def test_forward_saves_nothing_voxel_sized():
    x = torch.randn(2, 3, 20, 20, 20, requires_grad=True)
    t = torch.randint(0, 3, (2, 20, 20, 20), dtype=torch.uint8)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = tversky_loss(x, t, backend=FUSED, ce_weight=1.0, ce_class_weights=[1, 2, 3])
    big = [s for s in saved if s.numel() > 1000]
    assert all(s.data_ptr() in (x.data_ptr(), t.data_ptr()) for s in big), [
        tuple(s.shape) for s in big
    ]
    loss.backward()


def test_gradcheck():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 4, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 3, (2, 4, 5, 3), generator=gen)
    for activation in ("softmax", "sigmoid"):

        def f(z, activation=activation):
            return tversky_loss(
                z,
                t,
                backend=FUSED,
                activation=activation,
                ce_weight=0.5,
                ce_class_weights=[1.0, 0.5, 2.0],
                ignore_index=1,
            )

        assert torch.autograd.gradcheck(f, (x,))


def test_torch_compile_fullgraph():
    x, t = _data(2, 3, (6, 7, 8), seed=12, label_dtype=torch.uint8)
    x = x.float()

    def step(z):
        return tversky_loss(z * 2.0, t, ce_weight=1.0, backend=FUSED)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    l1 = compiled(x1)
    l1.backward()
    l2 = step(x2)
    l2.backward()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(x1.grad, x2.grad)


def test_module_equals_function():
    x, t = _data(2, 3, (5, 5, 5), seed=13)
    kw = dict(ce_weight=0.5, ce_class_weights=[1.0, 2.0, 0.5], batch=True)
    mod = TverskyLoss(0.4, 0.6, **kw)
    assert torch.equal(mod(x, t), tversky_loss(x, t, 0.4, 0.6, **kw))


@pytest.mark.parametrize(
    "kw, target, match",
    [
        ({"ce_weight": -1.0}, "labels", "ce_weight must be finite and >= 0"),
        ({"ce_weight": float("nan")}, "labels", "ce_weight must be finite"),
        ({"ce_weight": 1.0, "reduction": "none"}, "labels", "reduction='none'"),
        # a soft target now takes the CE (soft_ce), but regions need a label map
        (
            {"ce_weight": 1.0, "activation": "sigmoid", "regions": ((1,), (2,), (1, 2))},
            "soft",
            "regions read a label map",
        ),
        ({"ce_weight": 1.0, "activation": "none"}, "labels", "'softmax' or 'sigmoid'"),
        ({"ce_weight": 1.0, "ce_class_weights": [1.0, 2.0]}, "labels", "ce_class_weights has 2"),
        ({"ce_weight": 1.0, "ce_class_weights": [0, 0, 0]}, "labels", "must not all be zero"),
        ({"ce_weight": 1.0, "ce_class_weights": [1, -1, 1]}, "labels", "ce_class_weights must"),
    ],
)
def test_bad_arguments(kw, target, match):
    x = torch.rand(1, 3, 4, 4)
    t = torch.rand(1, 3, 4, 4) if target == "soft" else torch.randint(0, 3, (1, 4, 4))
    with pytest.raises(ValueError, match=match):
        tversky_loss(x, t, **kw)


def test_module_rejects_bad_arguments_at_construction():
    with pytest.raises(ValueError, match="reduction='none'"):
        TverskyLoss(ce_weight=1.0, reduction="none")
    with pytest.raises(ValueError, match="ce_weight"):
        TverskyLoss(ce_weight=-0.5)
    with pytest.raises(ValueError, match="different lengths"):
        TverskyLoss(class_weights=[1, 1], ce_class_weights=[1, 1, 1])


def test_nonfinite_logits_raise(backend):
    x, t = _data(1, 3, (4, 4, 4), seed=14)
    x = x.float()
    x[0, 1, 2, 2, 2] = float("nan")
    x, t = _on(backend, x, t)
    with pytest.raises(ValueError, match="non-finite"):
        tversky_loss(x, t, backend=backend, ce_weight=1.0)


# ------------------------------------------------------------------------------------
# deep supervision
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape_in, shape_out",
    [((8, 10, 6), (4, 5, 3)), ((9, 10, 7), (5, 5, 4)), ((9, 10, 7), (3, 2, 2)), ((7, 6), (7, 3))],
)
def test_downsample_labels_is_nearest_exact(shape_in, shape_out):
    """Voxel for voxel what nnU-Net v2's DownsampleSegForDSTransform produces."""
    gen = torch.Generator().manual_seed(20)
    t = torch.randint(0, 5, (2, *shape_in), generator=gen, dtype=torch.uint8)
    want = F.interpolate(t[:, None].float(), shape_out, mode="nearest-exact")[:, 0].to(t.dtype)
    got = downsample_labels(t, shape_out)
    assert got.dtype == t.dtype and torch.equal(got, want)
    assert torch.equal(downsample_labels(t[:, None], shape_out), want)


def test_default_weights_are_nnunets():
    w = [1.0, 0.5, 0.25, 0.0]
    assert default_weights(4) == pytest.approx([v / sum(w) for v in w])
    assert default_weights(1) == [1.0]


def _scales(seed, B=2, C=3, shape=(8, 8, 6)):
    gen = torch.Generator().manual_seed(seed)
    sizes = [shape, tuple(s // 2 for s in shape), tuple(s // 4 for s in shape)]
    xs = [torch.randn(B, C, *s, generator=gen, dtype=torch.float64) for s in sizes]
    t = torch.randint(0, C, (B, *shape), generator=gen, dtype=torch.uint8)
    return xs, t, sizes


def test_deep_supervision_matches_reference(backend):
    xs, t, sizes = _scales(21)
    kw = dict(alpha=0.3, beta=0.7, ce_weight=1.0, ignore_index=None)
    weights = [0.5, 0.3, 0.2]
    dtype = _dtypes(backend)[-1]
    xk = [_on(backend, x.to(dtype)).requires_grad_(True) for x in xs]
    loss = deep_supervision_loss(xk, _on(backend, t), weights, backend=backend, **kw)
    loss.backward()
    xr = [x.to(dtype).double().requires_grad_(True) for x in xs]
    ref = 0.0
    for x, w, s in zip(xr, weights, sizes, strict=True):
        ts = F.interpolate(t[:, None].float(), s, mode="nearest-exact")[:, 0].long()
        ref = ref + w * reference_tversky_loss(x, ts, **kw)
    ref.backward()
    loss_rtol, grad_rtol = TOLERANCES[dtype]
    assert abs(loss.item() - ref.item()) <= loss_rtol * abs(ref.item())
    for a, b in zip(xk, xr, strict=True):
        scale = b.grad.abs().max().item()
        assert (a.grad.cpu().double() - b.grad).abs().max().item() <= grad_rtol * scale


def test_deep_supervision_default_weights_and_target_list():
    xs, t, sizes = _scales(22)
    ts = [downsample_labels(t, s) for s in sizes]
    got = deep_supervision_loss(xs, ts, ce_weight=0.5, batch=True)
    w = default_weights(3)
    want = sum(w[i] * tversky_loss(xs[i], ts[i], ce_weight=0.5, batch=True) for i in range(2))
    assert torch.equal(got, want)
    # the lowest scale has weight 0 and is never computed: a bad target there is unseen
    ts[2] = torch.full_like(ts[2], 99)
    assert torch.equal(deep_supervision_loss(xs, ts, ce_weight=0.5, batch=True), want)


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(weights=[1.0, 0.5]), "weights has 2 entries"),
        (dict(weights=[0.0, 0.0, 0.0]), "not all zero"),
        (dict(weights=[1.0, -1.0, 0.0]), "weights must be finite"),
        (dict(target="list2"), "target has 2 scales"),
        (dict(target="float"), "single float target"),
    ],
)
def test_deep_supervision_bad_arguments(args, match):
    xs, t, sizes = _scales(23)
    target = {"list2": [t, t], "float": torch.rand(2, 3, *sizes[0])}.get(
        args.pop("target", None), t
    )
    with pytest.raises(ValueError, match=match):
        deep_supervision_loss(xs, target, **args)


def test_triton_many_tiles_and_tails(monkeypatch):
    """Several forward tiles per sample, masked tails, and the fixed-order finalize."""
    use_backend("triton", monkeypatch)
    from fasttversky.ops import triton as tri

    monkeypatch.setattr(tri, "_TILE_OVERRIDE", (16, 3))
    for C, kw in ((3, {}), (1, {"activation": "sigmoid", "ignore_index": 255})):
        x, t = _data(2, C, (7, 6, 5), seed=30 + C, label_dtype=torch.uint8, ignore=255)
        if C > 1:
            kw = {"ignore_index": 255, "ce_class_weights": [1.0, 0.5, 2.0]}
        check_against_reference(*_on("triton", x.float(), t), "triton", ce_weight=1.0, **kw)

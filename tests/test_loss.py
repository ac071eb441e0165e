"""The fused loss (CPU kernel and torch fallback) against the float64 reference."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from _helpers import backend_dtype_params, check_against_reference, use_backend

import fasttversky
from fasttversky import TverskyLoss, tversky_loss
from reference import reference_tversky_loss

BACKENDS = ["cpu", "torch"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _labels(B, C, spatial, dtype=torch.int64, fg=None, gen=None):
    if fg is None:
        return torch.randint(0, max(C, 2), (B, *spatial), generator=gen).to(dtype)
    # mostly background, a few lesion voxels: the regime the paper is about
    return (torch.rand((B, *spatial), generator=gen) < fg).to(dtype)


# (name, B, C, spatial, kwargs, target kind)
CASES = [
    ("softmax-default", 2, 3, (5, 6, 7), {}, "labels"),
    ("softmax-batch", 3, 2, (9, 8, 4), {"batch": True}, "labels"),
    ("softmax-none-red", 2, 5, (4, 5, 6), {"reduction": "none"}, "labels"),
    (
        "softmax-sum-nobg",
        1,
        5,
        (17, 31, 5),
        {"reduction": "sum", "include_background": False},
        "labels",
    ),
    ("focal-gamma", 2, 3, (6, 5, 4), {"gamma": 0.75}, "labels"),
    ("gamma-2", 2, 3, (6, 5, 4), {"gamma": 2.0, "batch": True}, "labels"),
    (
        "per-class-ab",
        2,
        3,
        (6, 5, 4),
        {"alpha": [0.1, 0.3, 0.5], "beta": [0.9, 0.7, 0.5]},
        "labels",
    ),
    ("weights", 2, 3, (6, 5, 4), {"class_weights": [0.2, 1.0, 3.0]}, "labels"),
    ("ignore-index", 2, 3, (6, 5, 4), {"ignore_index": 2}, "labels"),
    ("ignore-outside", 2, 3, (6, 5, 4), {"ignore_index": -100}, "labels-ignore"),
    ("two-class-ignore", 2, 2, (8, 9, 7), {"ignore_index": 255}, "labels-255"),
    ("sigmoid-binary", 3, 1, (7, 6, 5), {"activation": "sigmoid"}, "binary"),
    ("sigmoid-multilabel", 2, 3, (5, 4, 3), {"activation": "sigmoid"}, "soft"),
    ("softmax-soft", 2, 4, (5, 4, 3), {}, "soft"),
    ("probabilities", 2, 2, (5, 4, 3), {"activation": "none"}, "soft"),
    ("one-voxel", 1, 2, (1, 1, 1), {}, "labels"),
    ("2d", 3, 3, (11, 13), {"batch": True, "smooth_nr": 0.0, "smooth_dr": 1e-3}, "labels"),
    ("1d", 2, 2, (37,), {"alpha": 1.0, "beta": 1.0}, "labels"),
    ("small-lesions", 2, 2, (16, 16, 16), {}, "lesion"),
]


def _make(case, dtype, gen):
    name, B, C, spatial, kwargs, kind = case
    x = (torch.randn((B, C, *spatial), generator=gen) * 2).to(dtype)
    if kwargs.get("activation") == "none":
        x = torch.softmax(x.double(), 1).to(dtype)
    if kind == "labels":
        t = _labels(B, C, spatial, gen=gen)
    elif kind == "labels-ignore":
        t = _labels(B, C, spatial, gen=gen)
        t[torch.rand(t.shape, generator=gen) < 0.3] = -100
    elif kind == "labels-255":
        t = _labels(B, C, spatial, torch.uint8, gen=gen)
        t[torch.rand(t.shape, generator=gen) < 0.3] = 255
    elif kind == "binary":
        t = _labels(B, C, spatial, torch.uint8, gen=gen)
    elif kind == "lesion":
        t = _labels(B, C, spatial, torch.uint8, fg=0.01, gen=gen)
    else:
        t = torch.softmax(torch.randn((B, C, *spatial), generator=gen, dtype=torch.float64), 1)
        if kwargs.get("activation") == "sigmoid":
            t = torch.rand((B, C, *spatial), generator=gen, dtype=torch.float64)
        t = t.to(torch.float32)
    return x, t, kwargs


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_matches_reference(case, dtype, backend, monkeypatch):
    """Every backend (triton: interpreter, cuda: host emulation without a GPU)."""
    device = use_backend(backend, monkeypatch)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case[0]}-{dtype}".encode()))
    x, t, kwargs = _make(case, dtype, gen)
    check_against_reference(x.to(device), t.to(device), backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "label_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool]
)
def test_label_dtypes_and_layouts(backend, label_dtype):
    gen = torch.Generator().manual_seed(1)
    C = 2
    x = torch.randn(2, C, 6, 7, 8, generator=gen)
    t = torch.randint(0, C, (2, 6, 7, 8), generator=gen).to(label_dtype)
    check_against_reference(x, t, backend)
    check_against_reference(x, t.unsqueeze(1), backend)  # (B, 1, *spatial)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8, 9, 10, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 3, (2, 8, 9, 10), generator=gen)
    cl = x.contiguous(memory_format=torch.channels_last_3d)
    check_against_reference(cl, t, backend)
    # the gradient keeps the channels_last layout (no hidden copy)
    xg = cl.clone().requires_grad_(True)
    tversky_loss(xg, t, backend=backend).backward()
    assert xg.grad.stride() == cl.stride()
    check_against_reference(x[:, :, ::2, 1:, :], t[:, ::2, 1:, :], backend)  # strided crop
    check_against_reference(x.transpose(2, 4), t.transpose(1, 3), backend)  # permuted view
    soft = torch.softmax(torch.randn(2, 3, 8, 9, 10, generator=gen), 1)
    check_against_reference(x.transpose(2, 4), soft.transpose(2, 4).contiguous(), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multichunk_multithread(backend):
    # > 65536 voxels per sample: several 16384-voxel chunks and both threads in use
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 40, 41, 42, generator=gen)
    t = _labels(2, 3, (40, 41, 42), torch.uint8, fg=0.02, gen=gen) * 2
    check_against_reference(x, t, backend, alpha=0.3, beta=0.7)
    check_against_reference(x.double(), t, backend, batch=True, include_background=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 3, (2, 4, 5, 3), generator=gen)
    soft = torch.rand(2, 3, 4, 5, 3, generator=gen, dtype=torch.float64)

    def f(z):
        return tversky_loss(z, t, 0.3, 0.7, backend=backend, gamma=0.75, ignore_index=1)

    def g(z):
        return tversky_loss(
            z,
            soft,
            [0.2, 0.3, 0.4],
            0.7,
            activation="sigmoid",
            batch=True,
            reduction="none",
            backend=backend,
        )

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradcheck(g, (x,))


def _hard(gen, shape):
    p = (torch.rand(shape, generator=gen) < 0.4).double()
    g = (torch.rand(shape, generator=gen) < 0.3).double()
    return p, g


@pytest.mark.parametrize("backend", BACKENDS)
def test_dice_identity(backend):
    """alpha = beta = 1/2 is the Dice loss 1 - 2|P∩G| / (|P| + |G|)."""
    gen = torch.Generator().manual_seed(5)
    p = torch.rand(2, 1, 9, 9, 9, generator=gen, dtype=torch.float64)
    g = (torch.rand(2, 1, 9, 9, 9, generator=gen) < 0.3).double()
    loss = tversky_loss(
        p,
        g,
        0.5,
        0.5,
        activation="none",
        reduction="none",
        smooth_nr=0,
        smooth_dr=0,
        backend=backend,
    )
    dice = 2 * (p * g).sum((2, 3, 4)) / (p.sum((2, 3, 4)) + g.sum((2, 3, 4)))
    torch.testing.assert_close(loss, 1 - dice, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tanimoto_identity(backend):
    """alpha = beta = 1 is the Tanimoto (Jaccard) loss 1 - |P∩G| / |P∪G| on hard masks."""
    gen = torch.Generator().manual_seed(6)
    p, g = _hard(gen, (3, 1, 7, 8, 9))
    loss = tversky_loss(
        p,
        g,
        1.0,
        1.0,
        activation="none",
        reduction="none",
        smooth_nr=0,
        smooth_dr=0,
        backend=backend,
    )
    inter = (p * g).sum((2, 3, 4))
    union = ((p + g) > 0).double().sum((2, 3, 4))
    torch.testing.assert_close(loss, 1 - inter / union, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.5, 0.7, 0.9])
def test_fbeta_identity(backend, beta):
    """alpha + beta = 1 gives 1 - F_b on hard predictions, with b^2 = beta / alpha."""
    sklearn = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(7)
    p, g = _hard(gen, (1, 1, 10, 11, 12))
    alpha = 1 - beta
    loss = tversky_loss(
        p,
        g.to(torch.uint8)[:, 0],
        alpha,
        beta,
        activation="none",
        smooth_nr=0,
        smooth_dr=0,
        backend=backend,
    )
    f = sklearn.fbeta_score(g.flatten().numpy(), p.flatten().numpy(), beta=math.sqrt(beta / alpha))
    assert abs(loss.item() - (1 - f)) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 2, 40, 40, 48, generator=gen)
    t = _labels(2, 2, (40, 40, 48), torch.uint8, fg=0.01, gen=gen)
    results = []
    for _ in range(10):
        xr = x.clone().requires_grad_(True)
        loss = tversky_loss(xr, t, backend=backend)
        loss.backward()
        results.append((loss.detach(), xr.grad))
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


def _loss_and_grad_with_threads(threads, x, t, **kw):
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        xr = x.clone().requires_grad_(True)
        loss = tversky_loss(xr, t, **kw)
        loss.sum().backward()
    finally:
        torch.set_num_threads(n)
    return loss.detach(), xr.grad


# (id, C, spatial, activation, logits dtype). B = C = 1 with >= 32768 voxels is the
# single-output reduction ATen splits across threads; C = 40 is what "auto" sends to the
# torch backend on CPU.
THREAD_CASES = {
    "softmax-c3": (3, (50, 50, 50), "softmax", torch.float32),
    "sigmoid-c1-f64": (1, (64, 64, 33), "sigmoid", torch.float64),
    "probs-c1-f64": (1, (64, 64, 33), "none", torch.float64),
    "probs-c40-f32": (40, (24, 24, 24), "none", torch.float32),
}
# The torch backend's sums are fixed-order (ops/torch.py _sum_n), but ATen's own softmax
# and sigmoid kernels may round an element differently with another thread count (see
# README, Determinism): its thread-count check is on activation="none".
THREAD_PARAMS = [
    ("cpu", "softmax-c3"),
    ("cpu", "sigmoid-c1-f64"),
    ("cpu", "probs-c1-f64"),
    ("torch", "probs-c1-f64"),
    ("torch", "probs-c40-f32"),
]


@pytest.mark.parametrize("backend,case", THREAD_PARAMS)
def test_result_independent_of_thread_count(backend, case):
    """Bitwise equal loss and gradient with 1 and 2 threads (README: determinism)."""
    C, spatial, activation, dtype = THREAD_CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    if activation == "none":
        x = torch.rand(1, C, *spatial, generator=gen, dtype=torch.float64).to(dtype)
    else:
        x = torch.randn(1, C, *spatial, generator=gen, dtype=torch.float64).to(dtype)
    t = torch.randint(0, max(C, 2), (1, *spatial), generator=gen, dtype=torch.uint8)
    kw = dict(backend=backend, activation=activation, reduction="none")
    one = _loss_and_grad_with_threads(1, x, t, **kw)
    two = _loss_and_grad_with_threads(2, x, t, **kw)
    assert torch.equal(one[0], two[0])
    assert torch.equal(one[1], two[1]), (one[1] - two[1]).abs().max()


def test_torch_backend_sums_are_fixed_order():
    """One (B, C) group of 135168 voxels: ATen's plain sum splits it across threads."""
    from fasttversky.ops.torch import _sum_n

    gen = torch.Generator().manual_seed(34)
    v = torch.randn(1, 1, 135168, generator=gen, dtype=torch.float64)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _sum_n(v)
        torch.set_num_threads(2)
        two = _sum_n(v)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, two)
    torch.testing.assert_close(one, v.sum(-1), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------
# gamma: term = max(1 - T, 0) ** gamma, continuous in gamma
# ------------------------------------------------------------------------------------
def _perfect(C=3, spatial=(4, 5, 6), seed=30):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, C, (2, *spatial), generator=gen)
    p = torch.nn.functional.one_hot(t, C).movedim(-1, 1).double()
    return p, t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("smooth", [(1e-5, 1e-5), (1e-3, 1e-5)], ids=["equal", "nr>dr"])
@pytest.mark.parametrize("gamma", [0.5, 0.75, 1.0, 1.0001, 2.0])
def test_perfect_prediction_costs_zero_for_every_gamma(backend, smooth, gamma):
    # Before: gamma = 1 with smooth_nr > smooth_dr gave a negative term (1 - T < 0) and
    # gamma != 1 a floor of 1e-12 ** gamma (1e-6 at gamma = 0.5): a jump at gamma = 1.
    p, t = _perfect()
    x = p.clone().requires_grad_(True)
    loss = tversky_loss(
        x,
        t,
        activation="none",
        gamma=gamma,
        smooth_nr=smooth[0],
        smooth_dr=smooth[1],
        backend=backend,
    )
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_is_continuous_in_gamma(backend):
    """Near-perfect softmax predictions, smooth_nr > smooth_dr: 1 - T is around 0."""
    p, t = _perfect(seed=31)
    x = 12.0 * (2 * p - 1)
    x[0, :, 0, 0, :2] = 0.0  # a few uncertain voxels: some terms positive, some clamped
    kw = dict(smooth_nr=1e-2, smooth_dr=1e-5, reduction="none", backend=backend)
    at_one = tversky_loss(x, t, gamma=1.0, **kw)
    assert (at_one >= 0).all()
    for g in (1.0 - 1e-6, 1.0 + 1e-6):
        torch.testing.assert_close(tversky_loss(x, t, gamma=g, **kw), at_one, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("gamma", [0.3, 0.5, 0.75])
def test_gamma_below_one_gradient_is_finite_near_zero(gamma):
    """d/dd d**gamma = gamma d**(gamma-1) is unbounded at 0+: finite at every d > 0 and
    at d = 0 (where the gradient is 0), never inf or NaN, and equal to float64 autograd."""
    p, t = _perfect(seed=32)
    for eps in (1e-3, 1e-9, 0.0):
        x = ((1 - eps) * p + eps / 3).requires_grad_(True)
        loss = tversky_loss(x, t, activation="none", gamma=gamma, backend="torch")
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all(), eps
        xr = x.detach().clone().requires_grad_(True)
        ref = reference_tversky_loss(xr, t, activation="none", gamma=gamma)
        if eps == 1e-3:
            # (smaller eps: 1 - T cancels to a few digits, so summation order shows)
            ref.backward()
            torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=0)
            torch.testing.assert_close(loss, ref, rtol=1e-9, atol=0)
        elif eps == 0.0:
            assert loss.item() == 0.0 and (x.grad == 0).all()


# ------------------------------------------------------------------------------------
# a 0-d tensor is a scalar
# ------------------------------------------------------------------------------------
def test_zero_dim_tensor_alpha_beta_are_scalars():
    gen = torch.Generator().manual_seed(33)
    x = torch.randn(2, 3, 4, 5, generator=gen)
    t = torch.randint(0, 3, (2, 4, 5), generator=gen)
    want = tversky_loss(x, t, 0.3, 0.7, class_weights=None)
    got = tversky_loss(x, t, torch.tensor(0.3), torch.tensor(0.7))
    assert torch.equal(got, want)
    mod = TverskyLoss(alpha=torch.tensor(0.3), beta=torch.tensor(0.7, dtype=torch.float64))
    assert torch.equal(mod(x, t), want)
    # a 1-element sequence is still per-class: one entry for C = 3 is an error
    with pytest.raises(ValueError, match="alpha has 1 entries"):
        tversky_loss(x, t, torch.tensor([0.3]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [False, True])
def test_empty_foreground_is_finite(backend, batch):
    x = torch.randn(2, 2, 8, 8, 8, requires_grad=True)
    t = torch.zeros(2, 8, 8, 8, dtype=torch.uint8)
    loss = tversky_loss(x, t, backend=backend, batch=batch, include_background=False)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # and it matches the reference's (well-defined, smoothed) value
    ref = reference_tversky_loss(x.detach().double(), t, batch=batch, include_background=False)
    assert abs(loss.item() - ref.item()) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_voxels_get_zero_gradient(backend):
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(1, 3, 6, 6, 6, generator=gen, requires_grad=True)
    t = torch.randint(0, 3, (1, 6, 6, 6), generator=gen, dtype=torch.uint8)
    t[0, :3] = 255
    tversky_loss(x, t, backend=backend, ignore_index=255).backward()
    assert torch.all(x.grad[0, :, :3] == 0)
    assert torch.any(x.grad[0, :, 3:] != 0)


def test_forward_saves_nothing_voxel_sized():
    """Saved for backward: the inputs and O(B·C) numbers, no activations or one-hots."""
    x = torch.randn(2, 3, 20, 20, 20, requires_grad=True)
    t = torch.randint(0, 3, (2, 20, 20, 20), dtype=torch.uint8)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = tversky_loss(x, t, backend="cpu", gamma=0.75, batch=True)
    big = [s for s in saved if s.numel() > 1000]
    assert all(s.data_ptr() in (x.data_ptr(), t.data_ptr()) for s in big), [
        tuple(s.shape) for s in big
    ]
    loss.backward()


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_torch_compile_fullgraph(backend, monkeypatch):
    # The backend is chosen inside the custom ops, so tracing never runs the selection
    # (no torch._dynamo marking at import); "auto" resolves to the C++ kernels here.
    from fasttversky.ops import cpu as cpu_ops

    calls = []
    impl = cpu_ops.BACKEND
    real_fwd, real_bwd = impl.forward_stats, impl.backward
    monkeypatch.setattr(impl, "forward_stats", lambda *a: calls.append("fwd") or real_fwd(*a))
    monkeypatch.setattr(impl, "backward", lambda *a: calls.append("bwd") or real_bwd(*a))
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 6, 7, 8, generator=gen)
    t = torch.randint(0, 3, (2, 6, 7, 8), generator=gen, dtype=torch.uint8)

    def step(z):
        return tversky_loss(z * 2.0, t, 0.3, 0.7, gamma=0.75, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    l1 = compiled(x1)
    l1.backward()
    assert calls == ["fwd", "bwd"]  # the compiled graph ran the C++ kernels
    l2 = step(x2)
    l2.backward()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(x1.grad, x2.grad)


def test_module_equals_function():
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 2, 5, 5, 5, generator=gen)
    t = torch.randint(0, 2, (2, 5, 5, 5), generator=gen)
    mod = TverskyLoss(0.4, 0.6, gamma=0.8, batch=True)
    assert torch.equal(mod(x, t), tversky_loss(x, t, 0.4, 0.6, gamma=0.8, batch=True))
    assert "alpha=0.4" in repr(mod)


def test_half_logits_give_float32_loss():
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.bfloat16)
    t = torch.randint(0, 2, (1, 4, 4, 4))
    assert tversky_loss(x, t).dtype == torch.float32


def test_auto_picks_cpu_kernel_and_env_override(monkeypatch):
    from fasttversky._dispatch import select_backend
    from fasttversky._spec import KernelSpec

    x = torch.randn(1, 2, 8)
    t = torch.zeros(1, 8, dtype=torch.uint8)
    spec = KernelSpec(activation=0, soft_target=False, ignore_index=None, num_classes=2)
    assert fasttversky.available_backends()["cpu"] is None
    assert select_backend("auto", x, t, spec) == "cpu"
    monkeypatch.setenv("FASTTVERSKY_BACKEND", "torch")
    assert select_backend("auto", x, t, spec) == "torch"


def test_many_classes_fall_back_to_torch():
    from fasttversky.ops.cpu import MAX_CLASSES

    C = MAX_CLASSES + 1  # more classes than the CPU kernels take
    x = torch.randn(1, C, 3, 3, 3, dtype=torch.float64)
    t = torch.randint(0, C, (1, 3, 3, 3))
    from fasttversky._dispatch import select_backend
    from fasttversky._spec import KernelSpec
    from fasttversky.functional import _prepare

    x3, t3 = _prepare(x, t, fasttversky.TverskyOptions())
    spec = KernelSpec(activation=0, soft_target=False, ignore_index=None, num_classes=C)
    assert select_backend("auto", x3, t3, spec) == "torch"
    with pytest.raises(fasttversky.BackendUnavailableError, match=f"C={C}"):
        tversky_loss(x, t, backend="cpu")
    check_against_reference(x, t, "auto")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("ignore_index", [None, 255])
def test_two_class_channels_last(backend, dtype, ignore_index):
    # UNet3D's CPU output layout: two classes interleaved (the kernel has a path for it)
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 2, 9, 10, 11, generator=gen).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    t = _labels(2, 2, (9, 10, 11), torch.uint8, fg=0.1, gen=gen)
    if ignore_index is not None:
        t[torch.rand(t.shape, generator=gen) < 0.2] = ignore_index
    check_against_reference(x, t, backend, ignore_index=ignore_index)
    xg = x.clone().requires_grad_(True)
    tversky_loss(xg, t, backend=backend, ignore_index=ignore_index).backward()
    assert xg.grad.stride() == x.stride()
    bad = x.clone()
    bad[1, 0, 0, 0, 1] = float("nan")  # in a full tile
    with pytest.raises(ValueError, match="1 non-finite"):
        tversky_loss(bad, t, backend=backend, ignore_index=ignore_index)

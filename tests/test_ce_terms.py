"""The terms of this round on every backend that lists them, against the float64 oracle.

Soft-target CE, label smoothing, focal CE (softmax and sigmoid), float label maps and
nnU-Net regions (``fasttversky/_spec.py``). Each case names the ``Backend.features`` it
needs; it runs on every backend whose ``features`` list them (cpu, torch, triton in the
interpreter, cuda in its host emulation without a GPU), so a backend that adds a
feature name is covered here at once. Value and dL/dlogits are compared with
``reference_tversky_loss`` (plain float64 torch: one-hot built, MONAI's focal formula
spelt out) through the shared harness, in every logits dtype the backend takes, and in
the contiguous, channels_last_3d and expanded layouts; the tolerances are
tests/_helpers.py's.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    ALL_BACKENDS,
    BACKEND_DTYPES,
    TOLERANCES,
    backend_device,
    check_against_reference,
    describe_mismatch,
    use_backend,
)

import fasttversky
from fasttversky import InvalidInputError, NonFiniteInputError, TverskyOptions, tversky_loss
from fasttversky._dispatch import _MODULES
from reference import reference_focal, reference_tversky_loss

IGNORE = 255
# nnU-Net BraTS-style nested regions over labels 1..3 (whole tumour, core, enhancing);
# label 4 is valid but in no region, 255 the ignore label.
REGIONS = ((1, 2, 3), (2, 3), (3,))


def _features(name: str) -> frozenset:
    return importlib.import_module(_MODULES[name]).BACKEND.features


def _labels(B, spatial, n, gen, ignore=True):
    t = torch.randint(0, n, (B, *spatial), generator=gen)
    if ignore:
        t = torch.where(torch.rand(t.shape, generator=gen) < 0.2, torch.full_like(t, IGNORE), t)
    return t


def _soft(B, C, spatial, gen):
    q = torch.rand((B, C, *spatial), generator=gen, dtype=torch.float64)
    return torch.where(q < 0.3, torch.zeros_like(q), q).float()


def _inputs(kind: str, C: int, seed: int, spatial=(5, 4, 6), B=2):
    """Logits (B, C, *spatial) float64 and the case's target."""
    gen = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn((B, C, *spatial), generator=gen, dtype=torch.float64)
    if kind == "labels":
        t = _labels(B, spatial, max(C, 2), gen)
    elif kind == "empty-class":  # class C - 1 absent from every sample
        t = _labels(B, spatial, C - 1, gen, ignore=False)
    elif kind == "soft":
        t = _soft(B, C, spatial, gen)
    elif kind == "regions":
        t = _labels(B, spatial, 5, gen)
    elif kind == "regions-float":  # nnU-Net's (B, 1, *spatial) float segmentation
        t = _labels(B, spatial, 5, gen).float()[:, None]
    elif kind.startswith("float"):  # "float-<dtype>[-b1]": a float label map
        _, dtype, *b1 = kind.split("-")
        t = _labels(B, spatial, max(C, 2), gen).to(getattr(torch, dtype))
        t = t[:, None] if b1 else t
    else:
        raise ValueError(kind)
    return x, t


SIG = {"activation": "sigmoid"}
IGN = {"ignore_index": IGNORE}
REG = {"activation": "sigmoid", "regions": REGIONS, "num_labels": 5, "ignore_index": IGNORE}
W3 = {"ce_class_weights": [0.5, 1.0, 2.0]}
# (id, target kind, C, loss options, features needed)
CASES = [
    ("smoothing", "labels", 3, {"ce_label_smoothing": 0.2, **IGN, **W3}, {"label_smoothing"}),
    ("smoothing-2class", "labels", 2, {"ce_label_smoothing": 0.1, **IGN}, {"label_smoothing"}),
    ("smoothing-empty-class", "empty-class", 3, {"ce_label_smoothing": 0.3}, {"label_smoothing"}),
    ("soft-ce", "soft", 3, {**W3}, {"soft_ce"}),
    ("soft-ce-smoothing", "soft", 3, {"ce_label_smoothing": 0.1}, {"soft_ce", "label_smoothing"}),
    ("soft-bce", "soft", 3, {**SIG, **W3}, {"soft_ce"}),
    ("soft-bce-binary", "soft", 1, {**SIG}, {"soft_ce"}),
    ("focal", "labels", 3, {"ce_focal_gamma": 2.0, "ce_focal_alpha": 0.25, **IGN}, {"focal"}),
    ("focal-g0-weights", "labels", 3, {"ce_focal_gamma": 0.0, **IGN, **W3}, {"focal"}),
    (
        "focal-smoothing-empty",
        "empty-class",
        3,
        {"ce_focal_gamma": 1.5, "ce_label_smoothing": 0.1},
        {"focal", "label_smoothing"},
    ),
    (
        "focal-sigmoid",
        "labels",
        3,
        {**SIG, "ce_focal_gamma": 2.0, "ce_focal_alpha": 0.25, **IGN, **W3},
        {"focal"},
    ),
    ("focal-sigmoid-binary", "labels", 1, {**SIG, "ce_focal_gamma": 2.0, **IGN}, {"focal"}),
    (
        "focal-soft",
        "soft",
        3,
        {"ce_focal_gamma": 2.0, "ce_focal_alpha": 0.6},
        {"focal", "soft_ce"},
    ),
    (
        "focal-sigmoid-soft",
        "soft",
        3,
        {**SIG, "ce_focal_gamma": 0.5, "ce_focal_alpha": 0.75},
        {"focal", "soft_ce"},
    ),
    ("float-labels", "float-float32", 3, {**IGN, **W3}, {"float_labels"}),
    ("float-labels-f16-b1", "float-float16-b1", 3, {**IGN}, {"float_labels"}),
    ("float-labels-bf16", "float-bfloat16", 3, {**SIG, **IGN}, {"float_labels"}),
    ("float-labels-f64-binary", "float-float64", 1, {**SIG, **IGN}, {"float_labels"}),
    ("regions", "regions", 3, {**REG}, {"regions"}),
    ("regions-bce", "regions", 3, {**REG, **W3}, {"regions"}),
    ("regions-one", "regions", 1, {**REG, "regions": ((2, 3),)}, {"regions"}),
    (
        "regions-float-focal",
        "regions-float",
        3,
        {**REG, "ce_focal_gamma": 2.0, "ce_focal_alpha": 0.3},
        {"regions", "float_labels", "focal"},
    ),
]
CE_FREE = {"float-labels-f16-b1", "regions"}  # also checked without the CE term


def _needs(case) -> frozenset:
    """The case's features: its own, and "ce" (every case runs with ce_weight > 0)."""
    return frozenset(case[4] | {"ce"})


def _params():
    """(backend, case) for every backend listing the case's features."""
    out = []
    for backend in ALL_BACKENDS:
        for case in CASES:
            if _needs(case) <= _features(backend):
                out.append(pytest.param(backend, case, id=f"{backend}-{case[0]}"))
    return out


def _on(backend, *tensors):
    dev = backend_device(backend)
    return tuple(t.to(dev) for t in tensors)


@pytest.mark.parametrize("backend, case", _params())
def test_matches_reference(backend, case, monkeypatch):
    """Every logits dtype the backend takes, contiguous, CE weight 0.8 (and without CE)."""
    use_backend(backend, monkeypatch)
    name, kind, C, kw, _ = case
    x, t = _inputs(kind, C, seed=len(name))
    for dtype in BACKEND_DTYPES[backend]:
        check_against_reference(*_on(backend, x.to(dtype), t), backend, ce_weight=0.8, **kw)
    if name in CE_FREE:
        no_ce = {k: v for k, v in kw.items() if not k.startswith("ce_")}
        check_against_reference(*_on(backend, x.float(), t), backend, **no_ce)


def _layout_params():
    picks = ("smoothing", "soft-ce", "focal-sigmoid", "float-labels", "regions-bce")
    return [p for p in _params() if p.values[1][0] in picks]


@pytest.mark.parametrize("backend, case", _layout_params())
def test_layouts(backend, case, monkeypatch):
    """channels_last_3d logits (read in place) and logits expanded over the batch (the
    gradient, summed into the one stored sample, against the reference's)."""
    use_backend(backend, monkeypatch)
    name, kind, C, kw, _ = case
    x, t = _inputs(kind, C, seed=3 + len(name), spatial=(6, 5, 4))
    dtype = torch.float32
    xc = x.to(dtype).contiguous(memory_format=torch.channels_last_3d)
    check_against_reference(*_on(backend, xc, t), backend, ce_weight=0.8, **kw)
    (base,) = _on(backend, x[:1].to(dtype))
    (tt,) = _on(backend, t)
    b = base.clone().requires_grad_(True)
    loss = tversky_loss(b.expand_as(x), tt, backend=backend, ce_weight=0.8, **kw)
    (grad,) = torch.autograd.grad(loss, b)
    r = base.cpu().double().requires_grad_(True)
    ref = reference_tversky_loss(r.expand_as(x), t, ce_weight=0.8, **kw)
    (ref_grad,) = torch.autograd.grad(ref, r)
    loss_rtol, grad_rtol = TOLERANCES[dtype]
    assert abs(loss.item() - ref.item()) <= loss_rtol * max(abs(ref.item()), 1e-3)
    tol = grad_rtol * ref_grad.abs().max().item()
    assert torch.allclose(grad.cpu().double(), ref_grad, rtol=0, atol=tol), describe_mismatch(
        grad.cpu(), ref_grad, tol
    )


@pytest.mark.parametrize("backend, case", _params())
def test_extreme_logits(backend, case, monkeypatch):
    """±1e4 logits (p exactly 0 or 1 in float32): the float64 values, finite."""
    use_backend(backend, monkeypatch)
    name, kind, C, kw, _ = case
    x, t = _inputs(kind, C, seed=40 + len(name))
    gen = torch.Generator().manual_seed(6)
    pick = torch.rand(x.shape, generator=gen)
    x = torch.where(pick < 0.3, torch.full_like(x, 1e4), x)
    x = torch.where(pick > 0.7, torch.full_like(x, -1e4), x)
    if kw.get("ce_focal_gamma", 1.0) < 1.0:
        # the float64 oracle's autograd of (1 - p)^γ, γ < 1, is NaN where p = 1 exactly
        kw = {**kw, "ce_focal_gamma": 1.0}
    dtype = torch.float32 if torch.float32 in BACKEND_DTYPES[backend] else torch.bfloat16
    check_against_reference(*_on(backend, x.to(dtype), t), backend, ce_weight=1.0, **kw)


@pytest.mark.parametrize("backend, case", _params())
def test_non_finite_logits_raise(backend, case, monkeypatch):
    use_backend(backend, monkeypatch)
    name, kind, C, kw, _ = case
    x, t = _inputs(kind, C, seed=1)
    x = x.float()
    x[1, C - 1, 2, 1, 3] = float("nan") if len(name) % 2 else float("inf")
    x, t = _on(backend, x, t)
    with pytest.raises(NonFiniteInputError, match="logits contain 1 non-finite"):
        tversky_loss(x, t, backend=backend, ce_weight=1.0, **kw)


def _float_label_backends():
    return [b for b in ALL_BACKENDS if "float_labels" in _features(b)]


@pytest.mark.parametrize("backend", _float_label_backends())
@pytest.mark.parametrize(
    "value, match",
    [
        (1.5, r"1 value\(s\) that are not integral"),
        (float("nan"), r"1 value\(s\) that are not integral"),
        (float("inf"), r"1 value\(s\) that are not integral"),
        (3.0, r"1 label\(s\) outside \[0, 3\) other than ignore_index=255"),
        (-1.0, r"1 label\(s\) outside \[0, 3\)"),
    ],
)
def test_bad_float_labels_raise(backend, value, match, monkeypatch):
    """A float label map's NaN, inf and fractional values and labels out of range raise,
    each named as what it is."""
    use_backend(backend, monkeypatch)
    x, t = _inputs("float-float32", 3, seed=2)
    t[0, 1, 2, 3] = value
    x, t = _on(backend, x.float(), t)
    with pytest.raises(InvalidInputError, match=match):
        tversky_loss(x, t, backend=backend, ignore_index=IGNORE)


@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if "regions" in _features(b)])
def test_regions_ignored_voxels_add_nothing(backend, monkeypatch):
    """nnU-Net's ignore label: its voxels' logits change nothing and get zero gradient;
    a label in no region is background for every region (target 0, its logits count)."""
    use_backend(backend, monkeypatch)
    x, t = _inputs("regions", 3, seed=8)
    kw = dict(REG, ce_weight=1.0, backend=backend)
    x, t = _on(backend, x.float(), t)
    ignored = (t == IGNORE).unsqueeze(1).expand_as(x)
    z = x.clone().requires_grad_(True)
    loss = tversky_loss(z, t, **kw)
    (grad,) = torch.autograd.grad(loss, z)
    assert ignored.any() and torch.all(grad[ignored] == 0)
    assert torch.all(grad[(t == 4).unsqueeze(1).expand_as(x)] != 0)
    moved = torch.where(ignored, x + 7.0, x)
    torch.testing.assert_close(tversky_loss(moved, t, **kw), loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if "regions" in _features(b)])
def test_region_labels_out_of_range_raise(backend, monkeypatch):
    use_backend(backend, monkeypatch)
    x, t = _inputs("regions", 3, seed=9)
    t[1, 0, 0, 0] = 5
    x, t = _on(backend, x.float(), t)
    with pytest.raises(InvalidInputError, match=r"1 label\(s\) outside \[0, 5\)"):
        tversky_loss(x, t, backend=backend, **REG)


# ------------------------------------------------------------------------------------
# the oracle against the libraries it stands for
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_softmax", [True, False])
@pytest.mark.parametrize("alpha", [None, 0.25])
def test_reference_focal_is_monais(use_softmax, alpha):
    from monai.losses import FocalLoss

    x, t = _inputs("labels", 3, seed=11)
    t = t.clamp_max(2)
    onehot = F.one_hot(t, 3).movedim(-1, 1).double()
    w = [0.5, 1.0, 2.0]
    monai = FocalLoss(gamma=2.0, alpha=alpha, weight=w, use_softmax=use_softmax)(x, onehot)
    act = "softmax" if use_softmax else "sigmoid"
    ref = reference_focal(x, t, 2.0, alpha, activation=act, class_weights=w)
    # MONAI computes in float32 (it casts its input)
    torch.testing.assert_close(ref.float(), monai, rtol=2e-6, atol=0)


def test_reference_smoothing_is_torchs():
    """torch's label smoothing with weights and ignore_index: (1 − ε)·NLL + ε/C·Σ_c w_c
    (−log p_c) over the kept voxels, divided by Σ w_label; the loss's own finalize gives
    the same number from its sums (torch backend, float64)."""
    x, t = _inputs("labels", 3, seed=12)
    t = torch.where(t == IGNORE, torch.full_like(t, -100), t)
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    want = F.cross_entropy(x, t, weight=w, ignore_index=-100, label_smoothing=0.2)
    opts = dict(ce_class_weights=w.tolist(), ignore_index=-100, ce_label_smoothing=0.2)
    got = tversky_loss(x, t, backend="torch", ce_weight=1.0, **opts)
    tv = tversky_loss(x, t, backend="torch", ignore_index=-100)
    torch.testing.assert_close(got - tv, want, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------
# the options' bad values
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(ce_label_smoothing=-0.1), ValueError, "ce_label_smoothing must be finite and >= 0"),
        (dict(ce_label_smoothing=1.5), ValueError, r"ce_label_smoothing must be in \[0, 1\]"),
        (dict(ce_label_smoothing="0.1"), TypeError, "ce_label_smoothing must be a real number"),
        (dict(ce_label_smoothing=0.1, activation="sigmoid"), ValueError, "softmax cross-entropy"),
        (dict(ce_focal_gamma=-1.0), ValueError, "ce_focal_gamma must be finite and >= 0"),
        (dict(ce_focal_gamma=float("nan")), ValueError, "ce_focal_gamma must be finite"),
        (dict(ce_focal_gamma=2.0, ce_focal_alpha=1.5), ValueError, "ce_focal_alpha must be in"),
        (dict(ce_focal_alpha=0.25), ValueError, "ce_focal_alpha weighs the focal term"),
        (dict(activation="sigmoid", regions=()), TypeError, "regions must be a non-empty"),
        (dict(activation="sigmoid", regions="12"), TypeError, "regions must be a non-empty"),
        (dict(activation="sigmoid", regions=((1, -2),)), ValueError, "labels >= 0"),
        (dict(activation="sigmoid", regions=((1, 2.0),)), TypeError, "int labels"),
        (dict(activation="sigmoid", regions=((1,), ())), ValueError, "each region must name"),
        (dict(activation="sigmoid", regions=[(1,)] * 64), ValueError, "at most 63"),
        (dict(regions=((1,), (2,))), ValueError, "regions need activation 'sigmoid'"),
        (
            dict(activation="sigmoid", regions=((1, 2), (2,)), num_labels=2),
            ValueError,
            "num_labels=2 must exceed every label",
        ),
        (dict(num_labels=4), ValueError, "num_labels applies with regions"),
        (dict(activation="sigmoid", regions=((1,),), num_labels=2.0), TypeError, "num_labels"),
        (
            dict(activation="sigmoid", regions=((1, 3), (3,)), ignore_index=2),
            ValueError,
            r"ignore_index=2 must not be a valid label of the regions \[0, 4\)",
        ),
        (
            dict(activation="sigmoid", regions=((1,), (2,)), ignore_index=2),
            ValueError,
            "ignore_index=2 must not be a valid label",
        ),
    ],
)
def test_bad_options_raise_at_construction(kw, error, match):
    for make in (TverskyOptions, fasttversky.TverskyLoss):
        with pytest.raises(error, match=match):
            make(**kw)


def test_regions_need_one_channel_per_region():
    x, t = _inputs("regions", 2, seed=13)
    with pytest.raises(InvalidInputError, match="regions has 3 regions but logits have C=2"):
        tversky_loss(x, t, **REG)


def test_options_normalise_regions():
    opts = TverskyOptions(activation="sigmoid", regions=[1, (2, 3)], ignore_index=4)
    assert opts.regions == ((1,), (2, 3)) and opts.region_num_labels == 4
    assert opts.region_masks() == (0, 0b01, 0b10, 0b10)


def test_float_label_map_is_not_copied():
    """A float label map reaches the backend as a view of the user's tensor."""
    from fasttversky.ops import torch as torch_backend

    seen = []
    real = torch_backend.BACKEND.forward_stats

    def spy(logits, target, spec):
        seen.append((target.data_ptr(), target.dtype, spec.float_labels))
        return real(logits, target, spec)

    x, t = _inputs("float-float16-b1", 3, seed=14)
    t = t.clamp_max(2)
    torch_backend.BACKEND.forward_stats = spy
    try:
        tversky_loss(x, t, backend="torch", ce_weight=1.0)
    finally:
        torch_backend.BACKEND.forward_stats = real
    assert seen == [(t.data_ptr(), torch.float16, True)]


# ------------------------------------------------------------------------------------
# second derivatives, torch.func, torch.compile, float32 overflow
# ------------------------------------------------------------------------------------
_AUTOGRAD_PICKS = ("smoothing", "soft-ce", "focal", "focal-sigmoid", "regions-bce")


def _penalty_grad(loss_fn, x, v):
    """(dL/dx, d<dL/dx, v>/dx): what a gradient penalty's backward needs."""
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(x), x, create_graph=True)
    (gg,) = torch.autograd.grad((g * v.to(g.dtype)).sum(), x)
    return g, gg


@pytest.mark.parametrize(
    "backend, case", [p for p in _params() if p.values[1][0] in _AUTOGRAD_PICKS]
)
def test_gradient_of_gradient(backend, case, monkeypatch):
    """create_graph=True differentiates the torch backend's sums (_stats_op.py): both
    orders against float64 autograd of the oracle."""
    use_backend(backend, monkeypatch)
    name, kind, C, kw, _ = case
    dtype = torch.float64 if torch.float64 in BACKEND_DTYPES[backend] else torch.float32
    x, t = _inputs(kind, C, seed=21)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xd, td, vd = _on(backend, x.to(dtype), t, v)
    g, gg = _penalty_grad(
        lambda z: tversky_loss(z, td, backend=backend, ce_weight=0.8, **kw), xd, vd
    )
    ref_g, ref_gg = _penalty_grad(
        lambda z: reference_tversky_loss(z, t, ce_weight=0.8, **kw), x.to(dtype).double(), v
    )
    _, grad_rtol = TOLERANCES[dtype]
    for got, want in ((g, ref_g), (gg, ref_gg)):
        tol = grad_rtol * max(want.abs().max().item(), 1e-30)
        assert torch.allclose(got.cpu().double(), want, rtol=0, atol=tol), describe_mismatch(
            got.cpu(), want, tol
        )
    assert gg.abs().max() > 0


@pytest.mark.parametrize("name", ["focal-sigmoid", "regions-float-focal", "soft-ce-smoothing"])
def test_torch_func_grad(name):
    """torch.func.grad runs the plain torch sums (differentiable_stats): the same
    gradient as the eager backward."""
    _, kind, C, kw, _ = next(c for c in CASES if c[0] == name)
    x, t = _inputs(kind, C, seed=22)

    def loss(z):
        return tversky_loss(z, t, backend="torch", ce_weight=0.8, **kw)

    z = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(loss(z), z)
    torch.testing.assert_close(torch.func.grad(loss)(x), want, rtol=1e-12, atol=1e-15)


def test_torch_compile_fullgraph():
    """The op's fake implementation shapes 3 + ce_columns (5 for the sigmoid focal
    term) and takes the region table: compiled equals eager, value and gradient."""
    _, kind, C, kw, _ = next(c for c in CASES if c[0] == "regions-float-focal")
    x, t = _inputs(kind, C, seed=23)
    x = x.float()

    def step(z):
        return tversky_loss(z * 2.0, t, ce_weight=1.0, backend="torch", **kw)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    l1, l2 = compiled(x1), step(x2)
    (l1 + l2).backward()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("name", ["smoothing", "focal", "focal-sigmoid", "soft-bce"])
def test_torch_backend_ce_overflow(name):
    """±3e38 logits overflow a voxel's softmax CE-family term in float32 although the
    mean fits: the torch backend re-sums every CE column from float64 logits. (A sigmoid
    voxel's BCE stays below FLT_MAX: those cases check the values there.)"""
    _, kind, C, kw, _ = next(c for c in CASES if c[0] == name)
    x, t = _inputs(kind, C, seed=24)
    gen = torch.Generator().manual_seed(3)
    sign = torch.randint(0, 2, x.shape, generator=gen).double() * 2 - 1
    x = sign * (1 - 0.5 * torch.rand(x.shape, generator=gen, dtype=torch.float64)) * 3e38
    if kw.get("ce_focal_gamma") is not None:
        kw = {**kw, "ce_focal_gamma": 2.0}
    check_against_reference(x.float(), t, "torch", ce_weight=1.0, **kw)


def test_deep_supervision_resizes_a_float_label_map():
    """nnU-Net's float (B, 1, *spatial) segmentation with regions: each scale gets the
    label map picked by nearest selection, as from the integer labels."""
    from fasttversky import deep_supervision_loss
    from fasttversky.deep_supervision import downsample_labels

    gen = torch.Generator().manual_seed(25)
    sizes = [(8, 8, 6), (4, 4, 3), (2, 2, 2)]
    xs = [torch.randn(2, 3, *s, generator=gen, dtype=torch.float64) for s in sizes]
    t = _labels(2, sizes[0], 5, gen)
    kw = dict(REG, ce_weight=1.0, backend="torch")
    got = deep_supervision_loss(xs, t.float()[:, None], [0.5, 0.3, 0.2], **kw)
    want = sum(
        w * tversky_loss(x, downsample_labels(t, x.shape[2:]), **kw)
        for w, x in zip([0.5, 0.3, 0.2], xs, strict=True)
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)

"""The Triton backend's new kernel terms against the contract's formulas in float64.

``fasttversky/_spec.py`` defines, per sample and class, the stats columns (Tversky sums,
then the CE-family columns) and the gradient the backward adds for given coefficients.
This file computes those columns with plain float64 torch on the same (rounded) inputs,
differentiates ``Σ coef · stats`` with autograd, and compares both with the kernels'
``forward_stats`` / ``backward`` (the interpreter on CPU tensors without a GPU). Covered:
float label maps (and their bad values), region tables, soft targets and label smoothing
with CE, and the focal CE term (softmax and sigmoid). Tolerances: tests/_helpers.py.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from _helpers import TOLERANCES, describe_mismatch

from fasttversky._spec import CE_FOCAL, CE_NONE, CE_PLAIN, KernelSpec
from fasttversky.ops import triton as tri

pytestmark = pytest.mark.interpreter

if tri.BACKEND.unavailable() is not None:
    pytest.skip(f"triton backend unavailable: {tri.BACKEND.unavailable()}", allow_module_level=True)

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
ACT = {"softmax": 0, "sigmoid": 1, "none": 2}
# nnU-Net's BraTS-style regions over labels 0..3: whole tumour, tumour core, enhancing.
REGIONS = (0b000, 0b001, 0b011, 0b111)


# ------------------------------------------------------------------------------------
# the contract in float64
# ------------------------------------------------------------------------------------
def _truth(target, spec: KernelSpec, C: int):
    """(g (B, C, N), w (B, N)) float64 from a label map or a soft target."""
    if spec.soft_target:
        g = target.double()
        return g, torch.ones_like(g[:, 0])
    lab = target.double()
    w = torch.ones_like(lab)
    if spec.ignore_index is not None:
        w = (lab != spec.ignore_index).double()
    labi = torch.where(w > 0, lab, torch.zeros_like(lab)).long()
    if spec.region_masks is not None:
        bits = torch.tensor(spec.region_masks)[labi]
        g = (bits[:, None, :] >> torch.arange(C)[None, :, None]) & 1
    elif spec.binary_labels:
        g = (labi == 1)[:, None, :]
    else:
        g = F.one_hot(labi, C).movedim(-1, 1)
    return g.double() * w[:, None, :], w


def _ce_columns(x, p, q, w, spec: KernelSpec):
    """The CE-family columns (B, C, k) of _spec.py."""
    gamma = spec.focal_gamma
    if spec.activation == 0:
        nll = -torch.log_softmax(x, dim=1)
        if spec.ce == CE_FOCAL:
            nll = nll * (1.0 - p) ** gamma
        term = torch.where(q != 0, q * nll, torch.zeros_like(nll))
        return (w[:, None] * term).sum(-1, keepdim=True)
    bce = F.binary_cross_entropy_with_logits(x, q, reduction="none")
    if spec.ce == CE_PLAIN:
        return (w[:, None] * bce).sum(-1, keepdim=True)
    h = torch.exp(gamma * F.logsigmoid(-x * (2 * q - 1))) * bce
    return torch.stack([(w[:, None] * h).sum(-1), (w[:, None] * q * h).sum(-1)], dim=-1)


def contract_stats(x, target, spec: KernelSpec):
    """stats (B, C, 3 + spec.ce_columns) float64 of logits x (float64, may need grad)."""
    C = x.shape[1]
    g, w = _truth(target, spec, C)
    p = {0: lambda: x.softmax(1), 1: lambda: x.sigmoid(), 2: lambda: x}[spec.activation]()
    pw = p * w[:, None]
    cols = [(pw * g).sum(-1), pw.sum(-1), g.sum(-1)]
    stats = torch.stack(cols, dim=-1)
    if spec.ce == CE_NONE:
        return stats
    q = g
    if spec.label_smoothing:
        q = ((1 - spec.label_smoothing) * g + spec.label_smoothing / C) * w[:, None]
    return torch.cat([stats, _ce_columns(x, p, q, w, spec)], dim=-1)


# ------------------------------------------------------------------------------------
# the check
# ------------------------------------------------------------------------------------
def _coefs(B, C, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    return [torch.randn(B, C, generator=gen, dtype=torch.float64).to(cdt) for _ in range(k)]


def check_terms(x, target, spec: KernelSpec, seed=0):
    """Kernel stats and backward vs the float64 contract; returns (stats, grad)."""
    B, C, _ = x.shape
    xd, td = x.to(DEVICE), target.to(DEVICE)
    stats, flags = tri.BACKEND.forward_stats(xd, td, spec)
    assert flags.tolist() == [0, 0]
    xr = x.detach().double().requires_grad_(True)
    ref = contract_stats(xr, target, spec)
    loss_rtol, grad_rtol = TOLERANCES[x.dtype]
    assert stats.shape == ref.shape and stats.dtype == torch.float64
    for col in range(ref.shape[-1]):
        got, want = stats[..., col].cpu(), ref[..., col].detach()
        tol = loss_rtol * max(want.abs().max().item(), 1e-3)
        why = f"column {col}: {describe_mismatch(got, want, tol)}"
        assert torch.allclose(got, want, rtol=0, atol=tol), why
    # d(Σ coef · stats): coef_a multiplies sum_p (column 1), coef_b sum_pg (column 0).
    coef_a, coef_b, *ce = _coefs(B, C, 2 + spec.ce_columns, x.dtype, seed + 1)
    weights = torch.stack([coef_b, coef_a, torch.zeros_like(coef_a), *ce], -1).double()
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), xr)
    kw = dict(zip(("coef_ce", "coef_ce2"), [c.to(DEVICE) for c in ce], strict=False))
    grad = tri.BACKEND.backward(xd, td, coef_a.to(DEVICE), coef_b.to(DEVICE), spec, **kw)
    assert grad.shape == x.shape and grad.dtype == x.dtype
    assert torch.isfinite(grad).all()
    tol = grad_rtol * max(ref_grad.abs().max().item(), 1e-30)
    got = grad.cpu().double()
    assert torch.allclose(got, ref_grad, rtol=0, atol=tol), describe_mismatch(got, ref_grad, tol)
    return stats, grad


def _logits(B, C, N, dtype, seed, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(B, C, N, generator=gen, dtype=torch.float64)).to(dtype)


def _labels(B, N, num, seed, dtype=torch.int64, ignore=None):
    gen = torch.Generator().manual_seed(seed + 100)
    lab = torch.randint(0, num, (B, N), generator=gen)
    if ignore is not None:
        lab[torch.rand(B, N, generator=gen) < 0.25] = ignore
    return lab.to(dtype)


def _soft(B, C, N, seed):
    gen = torch.Generator().manual_seed(seed + 200)
    t = torch.rand(B, C, N, generator=gen, dtype=torch.float64)
    return torch.where(t < 0.3, torch.zeros_like(t), t).float()


@pytest.fixture(autouse=True)
def _several_tiles(monkeypatch):
    """Several tiles per sample and masked tails, on these tiny volumes."""
    monkeypatch.setattr(tri, "_TILE_OVERRIDE", (16, 2))


def _spec(act, C, **kw):
    kw.setdefault("soft_target", False)
    kw.setdefault("ignore_index", None)
    return KernelSpec(activation=ACT[act], num_classes=C, **kw)


# ------------------------------------------------------------------------------------
# float label maps
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "label_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str
)
@pytest.mark.parametrize(
    "act,C,ce,ignore",
    [("softmax", 3, CE_NONE, -1), ("softmax", 3, CE_PLAIN, 255), ("sigmoid", 1, CE_PLAIN, 255)],
)
def test_float_labels(label_dtype, act, C, ce, ignore):
    x = _logits(2, C, 45, torch.float32, seed=1)
    lab = _labels(2, 45, max(C, 2), seed=1, dtype=label_dtype, ignore=ignore)
    spec = _spec(act, C, ignore_index=ignore, ce=ce, float_labels=True)
    check_terms(x, lab, spec)


def test_float_labels_float64_logits():
    x = _logits(2, 4, 37, torch.float64, seed=2)
    lab = _labels(2, 37, 4, seed=2, dtype=torch.float64, ignore=-100)
    check_terms(x, lab, _spec("softmax", 4, ignore_index=-100, ce=CE_PLAIN, float_labels=True))


@pytest.mark.parametrize("label_dtype", [torch.float32, torch.float64], ids=str)
def test_float_labels_bad_values_are_counted(label_dtype):
    """NaN, ±inf, fractional and out-of-range labels are bad targets; ignore_index is
    not, and a NaN is not mistaken for ignore_index = -1."""
    x = _logits(2, 3, 40, torch.float32, seed=3)
    lab = _labels(2, 40, 3, seed=3, dtype=label_dtype, ignore=-1)
    bad = [float("nan"), float("inf"), -float("inf"), 2.5, 3.0, -2.0, 1e30, 0.5]
    if label_dtype == torch.float64:
        bad.append(1.0 + 2.0**-40)
    lab[0, : len(bad)] = torch.tensor(bad, dtype=label_dtype)
    lab[1, 7] = float("nan")
    spec = _spec("softmax", 3, ignore_index=-1, ce=CE_PLAIN, float_labels=True)
    _, flags = tri.BACKEND.forward_stats(x.to(DEVICE), lab.to(DEVICE), spec)
    assert flags.tolist() == [0, len(bad) + 1]
    # The same map without its bad values: nothing counted, the sums as an int map's.
    good = lab.clone()
    good[0, : len(bad)] = 0
    good[1, 7] = 1
    stats, flags = tri.BACKEND.forward_stats(x.to(DEVICE), good.to(DEVICE), spec)
    int_spec = _spec("softmax", 3, ignore_index=-1, ce=CE_PLAIN)
    want, _ = tri.BACKEND.forward_stats(x.to(DEVICE), good.long().to(DEVICE), int_spec)
    assert flags.tolist() == [0, 0] and torch.equal(stats, want)


# ------------------------------------------------------------------------------------
# region tables
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "act,ce,label_dtype,ignore",
    [
        ("sigmoid", CE_NONE, torch.uint8, None),
        ("sigmoid", CE_PLAIN, torch.int64, -1),
        ("sigmoid", CE_PLAIN, torch.float32, 255),
        ("none", CE_NONE, torch.int16, 9),
    ],
)
def test_regions(act, ce, label_dtype, ignore):
    x = _logits(2, 3, 50, torch.float32, seed=4)
    if act == "none":
        x = x.sigmoid()
    lab = _labels(2, 50, 4, seed=4, dtype=label_dtype, ignore=ignore)
    spec = _spec(
        act,
        3,
        ignore_index=ignore,
        ce=ce,
        region_masks=REGIONS,
        float_labels=label_dtype.is_floating_point,
    )
    check_terms(x, lab, spec)


def test_regions_float64_and_bad_labels():
    """Overlapping regions, a label in no region, a 63-bit-wide table entry; labels
    outside the table are bad targets (and read no mask)."""
    masks = (0, 0b01, 0b11, 0, (1 << 62) | 0b10)
    x = _logits(2, 2, 33, torch.float64, seed=5)
    lab = _labels(2, 33, len(masks), seed=5)
    check_terms(x, lab, _spec("sigmoid", 2, ce=CE_PLAIN, region_masks=masks))
    lab[0, 3], lab[1, 30] = len(masks), -3
    spec = _spec("sigmoid", 2, region_masks=masks)
    _, flags = tri.BACKEND.forward_stats(x.to(DEVICE), lab.to(DEVICE), spec)
    assert flags.tolist() == [0, 2]


def test_regions_table_is_cached_per_device():
    spec = _spec("sigmoid", 3, region_masks=REGIONS)
    x, lab = _logits(1, 3, 8, torch.float32, seed=6).to(DEVICE), torch.zeros(1, 8).long()
    first, _ = tri._tables(x, lab.to(DEVICE), spec)
    again, _ = tri._tables(x, lab.to(DEVICE), spec)
    assert first is again and first.dtype == torch.int64 and first.device == x.device
    assert first.tolist() == list(REGIONS)


# ------------------------------------------------------------------------------------
# soft targets and label smoothing with CE
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act,C", [("softmax", 3), ("softmax", 5), ("sigmoid", 1), ("sigmoid", 3)])
def test_soft_target_ce(act, C, dtype):
    x = _logits(2, C, 41, dtype, seed=7)
    check_terms(x, _soft(2, C, 41, seed=7), _spec(act, C, soft_target=True, ce=CE_PLAIN))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("eps", [0.1, 0.35, 1.0])
@pytest.mark.parametrize("ignore", [None, 2])
def test_label_smoothing(eps, ignore, dtype):
    x = _logits(2, 4, 39, dtype, seed=8)
    lab = _labels(2, 39, 4, seed=8, ignore=ignore)
    check_terms(x, lab, _spec("softmax", 4, ignore_index=ignore, ce=CE_PLAIN, label_smoothing=eps))


def test_label_smoothing_soft_target_and_float_labels():
    x = _logits(2, 3, 29, torch.float32, seed=9)
    spec = _spec("softmax", 3, soft_target=True, ce=CE_PLAIN, label_smoothing=0.2)
    check_terms(x, _soft(2, 3, 29, seed=9), spec)
    lab = _labels(2, 29, 3, seed=9, dtype=torch.float16, ignore=255)
    spec = _spec(
        "softmax", 3, ignore_index=255, ce=CE_PLAIN, label_smoothing=0.2, float_labels=True
    )
    check_terms(x, lab, spec)


def test_smoothed_ce_of_saturated_softmax_is_finite():
    """Logits 120 apart: p of the low classes underflows to 0 in float32 while log p is
    finite; with smoothing every class has q > 0, so the kernel must take log p from the
    log-sum-exp, never log(p)."""
    x = torch.zeros(1, 3, 20)
    x[:, 0] = 60.0
    x[:, 1] = -60.0
    lab = torch.zeros(1, 20, dtype=torch.int64)
    lab[:, ::3] = 2
    stats, _ = check_terms(x, lab, _spec("softmax", 3, ce=CE_PLAIN, label_smoothing=0.1))
    assert torch.isfinite(stats).all() and stats[0, 1, 3] > 0


# ------------------------------------------------------------------------------------
# focal CE
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.7])
@pytest.mark.parametrize("act,C", [("softmax", 3), ("sigmoid", 1), ("sigmoid", 3)])
def test_focal_labels(act, C, gamma, dtype):
    x = _logits(2, C, 43, dtype, seed=10)
    lab = _labels(2, 43, max(C, 2), seed=10, ignore=7)
    check_terms(x, lab, _spec(act, C, ignore_index=7, ce=CE_FOCAL, focal_gamma=gamma))


@pytest.mark.parametrize("act", ["softmax", "sigmoid"])
def test_focal_soft_target(act):
    x = _logits(2, 4, 31, torch.float32, seed=11)
    spec = _spec(act, 4, soft_target=True, ce=CE_FOCAL, focal_gamma=1.5)
    check_terms(x, _soft(2, 4, 31, seed=11), spec)


def test_focal_with_smoothing_regions_and_half_precision():
    x = _logits(2, 3, 35, torch.float64, seed=12)
    lab = _labels(2, 35, 3, seed=12, ignore=255)
    spec = _spec("softmax", 3, ignore_index=255, ce=CE_FOCAL, focal_gamma=2.0, label_smoothing=0.1)
    check_terms(x, lab, spec)
    lab = _labels(2, 35, 4, seed=12, ignore=255)
    spec = _spec("sigmoid", 3, ignore_index=255, ce=CE_FOCAL, focal_gamma=2.0, region_masks=REGIONS)
    check_terms(x.to(torch.float16), lab, spec)
    check_terms(x.to(torch.bfloat16), lab.to(torch.uint8), spec)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_saturated_softmax(gamma):
    """p == 1 exactly in float32 (logits 200 apart): (1 - p)^gamma is 0 (1 when gamma
    is 0) and the gradient's gamma term is taken as 0, not 0 * inf."""
    x = torch.zeros(1, 3, 20)
    x[:, 0, :10] = 200.0
    x[:, 1, 10:] = 1.0
    lab = torch.zeros(1, 20, dtype=torch.int64)
    lab[:, 5:] = 1
    spec = _spec("softmax", 3, ce=CE_FOCAL, focal_gamma=gamma)
    stats, flags = tri.BACKEND.forward_stats(x, lab, spec)
    want = contract_stats(x.double(), lab, spec)
    assert flags.tolist() == [0, 0] and torch.isfinite(stats).all()
    assert torch.allclose(stats, want, rtol=2e-5, atol=1e-6)
    coefs = [torch.ones(1, 3)] * 3
    grad = tri.BACKEND.backward(x, lab, coefs[0], coefs[1], spec, coef_ce=coefs[2])
    assert torch.isfinite(grad).all()
    # voxels 0..4: label 0 with p_0 == 1: no focal CE and no focal gradient at all
    # (the Tversky part still has its own gradient, zero here too: p is saturated)
    assert (grad[0, :, :5] == 0).all()


# ------------------------------------------------------------------------------------
# the same contract as the torch backend
# ------------------------------------------------------------------------------------
TORCH_CASES = {
    "float-labels-ce": (
        "softmax",
        3,
        "float-labels",
        dict(ce=CE_PLAIN, ignore_index=-1, float_labels=True),
    ),
    "regions-focal": (
        "sigmoid",
        3,
        "regions",
        dict(ce=CE_FOCAL, focal_gamma=2.0, region_masks=REGIONS, ignore_index=-1),
    ),
    "soft-smoothed": (
        "softmax",
        4,
        "soft",
        dict(ce=CE_PLAIN, soft_target=True, label_smoothing=0.1),
    ),
    "focal-softmax": ("softmax", 3, "labels", dict(ce=CE_FOCAL, focal_gamma=0.5, ignore_index=-1)),
    "focal-sigmoid-soft": (
        "sigmoid",
        2,
        "soft",
        dict(ce=CE_FOCAL, focal_gamma=1.0, soft_target=True),
    ),
}


@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_matches_torch_backend(case):
    """Stats, flags and gradient equal the torch backend's (float64 logits)."""
    from fasttversky.ops import torch as tb

    act, C, kind, kw = TORCH_CASES[case]
    x = _logits(2, C, 37, torch.float64, seed=13)
    if kind == "soft":
        t = _soft(2, C, 37, seed=13)
    else:
        t = _labels(2, 37, 4 if kind == "regions" else C, seed=13, ignore=-1)
        t = t.double() if kind == "float-labels" else t
    spec = _spec(act, C, **kw)
    (s_k, f_k), (s_t, f_t) = (be.forward_stats(x, t, spec) for be in (tri.BACKEND, tb.BACKEND))
    assert f_k.tolist() == f_t.tolist() == [0, 0]
    tol = TOLERANCES[torch.float64][0] * s_t.abs().max().item()
    assert torch.allclose(s_k, s_t, rtol=0, atol=tol), describe_mismatch(s_k, s_t, tol)
    coef_a, coef_b, *ce = _coefs(2, C, 2 + spec.ce_columns, torch.float64, seed=14)
    kw = dict(zip(("coef_ce", "coef_ce2"), ce, strict=False))
    g_k, g_t = (be.backward(x, t, coef_a, coef_b, spec, **kw) for be in (tri.BACKEND, tb.BACKEND))
    tol = TOLERANCES[torch.float64][1] * g_t.abs().max().item()
    assert torch.allclose(g_k, g_t, rtol=0, atol=tol), describe_mismatch(g_k, g_t, tol)

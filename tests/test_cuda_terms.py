"""The CUDA kernels' terms of this round (``_spec.py``), in host emulation, against float64.

Each case calls the cuda backend's ``forward_stats`` and ``backward`` directly with a
``KernelSpec`` (the kernels' own contract, before any public option reaches them) and
compares them with a float64 torch computation of the contract's formulas written here:
the stats columns (Tversky sums, the CE-family columns), the bad-target count, and the
gradient, which is float64 autograd of ``Σ coef · stats`` (so it also checks the
contract's closed-form gradients that the kernels implement). Features: float label maps,
region tables, soft-target CE, label smoothing and the focal term (softmax and sigmoid).
The real kernel code runs as in tests/test_cuda_build.py (host compiler +
csrc/cuda/host_emulation.h, each block's threads as std::threads), so the vector and
scalar paths, tails and multi-block partials are those of the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from _helpers import TOLERANCES, describe_mismatch

from fasttversky._spec import CE_FOCAL, CE_NONE, CE_PLAIN, KernelSpec
from fasttversky.ops import cuda as cu

ACT = {"softmax": 0, "sigmoid": 1, "none": 2}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# N = 640: 16-byte vector path; N = 990: rows not aligned (scalar path); N = 4100: several
# blocks per sample and a ragged last packet.
SIZES = {"vec": 640, "scalar": 990, "multiblock": 4100}


@pytest.fixture
def cuda_emulated(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/test_gpu.py runs the compiled kernels")
    monkeypatch.setenv("FASTTVERSKY_CUDA_EMULATE", "1")
    if cu.find_nvcc() is None and not os.path.exists("/usr/local/cuda/include/cuda_fp16.h"):
        pytest.skip("the CUDA headers are absent: cannot build the emulation")
    why = cu.BACKEND.unavailable()
    if why:  # a build error must fail these tests, not skip them
        pytest.fail(f"emulation build failed: {why}")


# ------------------------------------------------------------------------------------
# the float64 oracle of _spec.py
# ------------------------------------------------------------------------------------
def oracle_target(target, spec: KernelSpec, C: int):
    """(g (B, C, N), w (B, 1, N), bad count) in float64, as _spec.py defines them."""
    if spec.soft_target:
        g = target.double()
        bad = int((~((g >= 0) & (g <= 1))).sum())
        return g, torch.ones_like(g[:, :1]), bad
    lab = target.double()
    keep = torch.ones_like(lab, dtype=torch.bool)
    if spec.ignore_index is not None:
        keep = lab != spec.ignore_index
    integral = torch.isfinite(lab) & (lab == torch.floor(lab))
    valid = integral & (lab >= 0) & (lab < spec.num_labels)
    bad = int((keep & ~valid).sum())
    y = torch.where(valid, lab, torch.zeros_like(lab)).long()
    if spec.region_masks is not None:
        table = torch.tensor(spec.region_masks, dtype=torch.int64)
        bits = table[y]
        g = torch.stack([(bits >> c) & 1 for c in range(C)], dim=1).double()
    elif spec.binary_labels:
        g = (y == 1).double().unsqueeze(1)
    else:
        g = F.one_hot(y, max(C, spec.num_labels))[..., :C].movedim(-1, 1).double()
    w = keep.double().unsqueeze(1)  # a bad label still counts (sum_p), with g = 0
    g = g * valid.double().unsqueeze(1) * w
    return g, w, bad


def oracle_stats(x, target, spec: KernelSpec):
    """stats (B, C, 3 + ce_columns) float64 of logits x (float64, requires grad)."""
    B, C, _ = x.shape
    g, w, _ = oracle_target(target, spec, C)
    if spec.activation == 0:
        p, logp = torch.softmax(x, 1), torch.log_softmax(x, 1)
    elif spec.activation == 1:
        p = torch.sigmoid(x)
    else:
        p = x
    cols = [(w * p * g).sum(-1), (w * p).sum(-1), (w * g).sum(-1)]
    if spec.ce != CE_NONE:
        cols += oracle_ce(x, p, logp if spec.activation == 0 else None, g, w, spec)
    return torch.stack(cols, dim=-1)


def oracle_ce(x, p, logp, g, w, spec: KernelSpec):
    C = x.shape[1]
    gamma = spec.focal_gamma
    if spec.activation == 0:
        eps = spec.label_smoothing
        q = ((1 - eps) * g + eps / C) * w
        term = -logp
        if spec.ce == CE_FOCAL:
            term = (1 - p) ** gamma * term
        return [torch.where(q == 0, torch.zeros_like(x), q * term).sum(-1)]
    q = g * w
    bce = x.clamp(min=0) - x * q + torch.log1p(torch.exp(-x.abs()))
    if spec.ce == CE_PLAIN:
        return [(w * bce).sum(-1)]
    s = 2 * q - 1
    h = torch.exp(gamma * F.logsigmoid(-x * s)) * bce
    return [(w * h).sum(-1), (w * q * h).sum(-1)]


# ------------------------------------------------------------------------------------
# running the kernels and comparing
# ------------------------------------------------------------------------------------
def make_case(
    B,
    C,
    N,
    *,
    dtype=torch.float32,
    activation="softmax",
    soft=False,
    seed=0,
    num_labels=None,
    label_dtype=torch.int64,
    scale=2.0,
):
    """Seeded (logits (B, C, N) in dtype, target) with labels in [0, num_labels)."""
    gen = torch.Generator().manual_seed(seed)
    if activation == "none":
        x = torch.rand((B, C, N), generator=gen, dtype=torch.float64)
    else:
        x = scale * torch.randn((B, C, N), generator=gen, dtype=torch.float64)
    if soft:
        t = torch.rand((B, C, N), generator=gen, dtype=torch.float64)
        t = torch.where(t < 0.3, torch.zeros_like(t), t).to(torch.float32)
    else:
        t = torch.randint(0, num_labels or max(C, 2), (B, N), generator=gen).to(label_dtype)
    return x.to(dtype), t


def run_and_compare(x, t, spec: KernelSpec, seed=0):
    """Forward stats, flags and backward of the cuda backend vs the oracle; returns flags."""
    stats, flags = cu.BACKEND.forward_stats(x, t, spec)
    xr = x.detach().double().requires_grad_(True)
    ref = oracle_stats(xr, t, spec)
    _, _, bad = oracle_target(t, spec, x.shape[1])
    assert stats.shape == ref.shape and stats.dtype == torch.float64
    assert int(flags[0]) == 0 and int(flags[1]) == bad, (flags.tolist(), bad)
    loss_rtol, grad_rtol = TOLERANCES[x.dtype]
    for k in range(ref.shape[-1]):
        col, rcol = stats[..., k], ref[..., k].detach()
        tol = loss_rtol * max(rcol.abs().max().item(), 1e-3)
        assert torch.allclose(col, rcol, rtol=0, atol=tol), f"col {k}: " + describe_mismatch(
            col, rcol, tol
        )
    gen = torch.Generator().manual_seed(seed + 100)
    coefs = [
        torch.rand(ref.shape[:2], generator=gen, dtype=torch.float64) * 2 - 1 for _ in range(5)
    ]
    coef_a, coef_b, coef_ce, coef_ce2 = coefs[1], coefs[0], coefs[3], coefs[4]
    weight = torch.stack(coefs[: ref.shape[-1]], dim=-1)
    weight[..., 2] = 0  # sum_g does not depend on the logits
    (ref_grad,) = torch.autograd.grad((ref * weight).sum(), xr)
    ce = coef_ce if spec.ce_columns > 0 else None
    ce2 = coef_ce2 if spec.ce_columns > 1 else None
    grad = cu.BACKEND.backward(x, t, coef_a, coef_b, spec, coef_ce=ce, coef_ce2=ce2)
    assert grad.shape == x.shape and grad.dtype == x.dtype
    assert torch.isfinite(grad).all()
    tol = grad_rtol * max(ref_grad.abs().max().item(), 1e-30)
    assert torch.allclose(grad.double(), ref_grad, rtol=0, atol=tol), describe_mismatch(
        grad, ref_grad, tol
    )
    return flags


def spec_for(x, t, activation="softmax", **kw) -> KernelSpec:
    return KernelSpec(
        activation=ACT[activation],
        soft_target=t.dim() == 3,
        ignore_index=kw.pop("ignore_index", None),
        num_classes=x.shape[1],
        **kw,
    )


def with_ignored(t, value, seed, frac=0.2):
    drop = torch.rand(t.shape, generator=torch.Generator().manual_seed(seed)) < frac
    return torch.where(drop, torch.full_like(t, value), t)


# ------------------------------------------------------------------------------------
# 1. float label maps
# ------------------------------------------------------------------------------------
# every size once with float32 labels; the other dtypes on one path each (the load differs)
FLOAT_LABEL_CASES = [(torch.float32, size) for size in SIZES] + [
    (torch.float16, "vec"),
    (torch.bfloat16, "scalar"),
    (torch.float64, "vec"),
    (torch.float64, "scalar"),
]


@pytest.mark.parametrize(
    "label_dtype,size", FLOAT_LABEL_CASES, ids=[f"{d}-{s}" for d, s in FLOAT_LABEL_CASES]
)
def test_float_labels_softmax_ce(cuda_emulated, label_dtype, size):
    x, t = make_case(2, 3, SIZES[size], label_dtype=label_dtype, seed=1)
    t = with_ignored(t, 255, seed=2)
    spec = spec_for(x, t, ignore_index=255, ce=CE_PLAIN, float_labels=True)
    run_and_compare(x, t, spec)


@pytest.mark.parametrize("ce", [CE_NONE, CE_PLAIN])
@pytest.mark.parametrize("C", [1, 4])
def test_float_labels_sigmoid(cuda_emulated, C, ce):
    x, t = make_case(2, C, 990, activation="sigmoid", label_dtype=torch.float16, seed=3)
    t = with_ignored(t, -1, seed=4)
    spec = spec_for(x, t, "sigmoid", ignore_index=-1, ce=ce, float_labels=True)
    run_and_compare(x, t, spec)


@pytest.mark.parametrize("label_dtype", FLOAT_DTYPES, ids=str)
def test_float_labels_bad_values_are_counted(cuda_emulated, label_dtype):
    x, t = make_case(2, 3, 640, label_dtype=torch.float64, seed=5)
    bad = [float("nan"), float("inf"), -float("inf"), 1.5, 3.0, -2.0, 1e30, -0.25]
    for k, v in enumerate(bad):
        t[k % 2, 7 * k + 1] = v
    t[0, 100] = t[1, 200] = -1.0  # ignore_index: not bad
    t = t.to(label_dtype)
    spec = spec_for(x, t, ignore_index=-1, float_labels=True)
    _, flags = cu.BACKEND.forward_stats(x, t, spec)
    _, _, expect = oracle_target(t, spec, 3)
    assert expect == len(bad)
    assert flags.tolist() == [0, expect]


def test_float_labels_channel_last_logits(cuda_emulated):
    x, t = make_case(2, 4, 640, label_dtype=torch.float32, seed=6)
    x = x.transpose(1, 2).contiguous().transpose(1, 2)  # stride_c = 1, stride_n = C
    spec = spec_for(x, t, ce=CE_PLAIN, float_labels=True)
    run_and_compare(x, t, spec)


# ------------------------------------------------------------------------------------
# 2. region tables (sigmoid / none)
# ------------------------------------------------------------------------------------
# BraTS-like: labels 0..3; region 0 = {1, 2, 3}, 1 = {2, 3}, 2 = {3}.
NESTED = (0b000, 0b001, 0b011, 0b111)
# overlapping and empty regions, and table bits above C that must be ignored
OTHER = (0b0100, 0b0011, 0b0000, 0b1110, 0b0101 | (1 << 40))


@pytest.mark.parametrize("size", list(SIZES), ids=list(SIZES))
@pytest.mark.parametrize("ce", [CE_NONE, CE_PLAIN, CE_FOCAL])
def test_regions_sigmoid(cuda_emulated, ce, size):
    x, t = make_case(
        2, 3, SIZES[size], activation="sigmoid", num_labels=4, seed=7, label_dtype=torch.uint8
    )
    t = with_ignored(t, 255, seed=8)
    spec = spec_for(
        x,
        t,
        "sigmoid",
        ignore_index=255,
        ce=ce,
        region_masks=NESTED,
        focal_gamma=2.0 if ce == CE_FOCAL else 0.0,
    )
    run_and_compare(x, t, spec)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_regions_overlapping_float_labels(cuda_emulated, dtype):
    x, t = make_case(
        2,
        3,
        640,
        activation="sigmoid",
        num_labels=5,
        seed=9,
        dtype=dtype,
        label_dtype=torch.float32,
    )
    t[0, 3] = 5.0  # out of range: one bad label
    spec = spec_for(x, t, "sigmoid", ce=CE_PLAIN, region_masks=OTHER, float_labels=True)
    assert int(run_and_compare(x, t, spec)[1]) == 1


def test_regions_activation_none(cuda_emulated):
    x, t = make_case(2, 4, 990, activation="none", num_labels=5, seed=10, label_dtype=torch.int32)
    t = with_ignored(t, -100, seed=11)
    spec = spec_for(x, t, "none", ignore_index=-100, region_masks=OTHER)
    run_and_compare(x, t, spec)


def test_regions_table_is_cached_per_device(cuda_emulated):
    a = cu._region_table(NESTED, torch.device("cpu"))
    assert cu._region_table(NESTED, torch.device("cpu")) is a
    assert a.dtype == torch.int64 and a.tolist() == list(NESTED)


# ------------------------------------------------------------------------------------
# 3. soft-target CE and label smoothing
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", list(SIZES), ids=list(SIZES))
@pytest.mark.parametrize("activation,C", [("softmax", 3), ("softmax", 8), ("sigmoid", 4)])
def test_soft_target_ce(cuda_emulated, activation, C, size):
    x, t = make_case(2, C, SIZES[size], activation=activation, soft=True, seed=12 + C)
    run_and_compare(x, t, spec_for(x, t, activation, ce=CE_PLAIN))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_soft_target_ce_half_targets(cuda_emulated, dtype):
    x, t = make_case(2, 3, 640, soft=True, seed=13, dtype=dtype)
    t = t.to(dtype)
    run_and_compare(x, t, spec_for(x, t, ce=CE_PLAIN, label_smoothing=0.2))


def test_soft_target_ce_bad_values_are_counted(cuda_emulated):
    x, t = make_case(1, 3, 640, soft=True, seed=14)
    t[0, 1, 5], t[0, 2, 9], t[0, 0, 600] = -0.5, float("nan"), 1.25
    _, flags = cu.BACKEND.forward_stats(x, t, spec_for(x, t, ce=CE_PLAIN))
    assert flags.tolist() == [0, 3]


@pytest.mark.parametrize(
    "eps,size", [(0.1, "vec"), (0.1, "scalar"), (0.1, "multiblock"), (0.5, "vec")]
)
def test_label_smoothing(cuda_emulated, eps, size):
    x, t = make_case(2, 5, SIZES[size], seed=15, label_dtype=torch.int16)
    t = with_ignored(t, -100, seed=16)
    spec = spec_for(x, t, ignore_index=-100, ce=CE_PLAIN, label_smoothing=eps)
    run_and_compare(x, t, spec)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_label_smoothing_half_logits(cuda_emulated, dtype):
    x, t = make_case(2, 8, 990, seed=17, dtype=dtype, label_dtype=torch.uint8)
    run_and_compare(x, t, spec_for(x, t, ce=CE_PLAIN, label_smoothing=0.1))


def test_soft_ce_extreme_logits(cuda_emulated):
    # a gap of ~2 x FLT_MAX between classes: -log p overflows float32 per voxel, not in
    # the kernels' CE units
    x, t = make_case(1, 3, 640, soft=True, seed=18)
    x[0, 0, :5], x[0, 1, :5] = 3e38, -3e38
    run_and_compare(x, t, spec_for(x, t, ce=CE_PLAIN, label_smoothing=0.1))


# ------------------------------------------------------------------------------------
# 4. the focal term
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "gamma,size", [(2.0, "vec"), (2.0, "scalar"), (2.0, "multiblock"), (0.0, "vec"), (0.5, "vec")]
)
def test_focal_softmax_labels(cuda_emulated, gamma, size):
    x, t = make_case(2, 4, SIZES[size], seed=19)
    t = with_ignored(t, 255, seed=20)
    spec = spec_for(x, t, ignore_index=255, ce=CE_FOCAL, focal_gamma=gamma)
    run_and_compare(x, t, spec)


@pytest.mark.parametrize("soft", [False, True], ids=["labels", "soft"])
def test_focal_softmax_smoothing(cuda_emulated, soft):
    x, t = make_case(2, 3, 990, seed=21, soft=soft)
    spec = spec_for(x, t, ce=CE_FOCAL, focal_gamma=2.0, label_smoothing=0.1)
    run_and_compare(x, t, spec)


@pytest.mark.parametrize(
    "gamma,size", [(2.0, "vec"), (2.0, "scalar"), (2.0, "multiblock"), (0.0, "vec")]
)
@pytest.mark.parametrize("soft", [False, True], ids=["labels", "soft"])
def test_focal_sigmoid(cuda_emulated, gamma, soft, size):
    x, t = make_case(2, 3, SIZES[size], activation="sigmoid", soft=soft, seed=22)
    if not soft:
        t = with_ignored(t, 255, seed=23)
    spec = spec_for(
        x, t, "sigmoid", ignore_index=None if soft else 255, ce=CE_FOCAL, focal_gamma=gamma
    )
    run_and_compare(x, t, spec)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_focal_half_logits(cuda_emulated, activation, dtype):
    x, t = make_case(2, 5, 640, activation=activation, seed=24, dtype=dtype)
    run_and_compare(x, t, spec_for(x, t, activation, ce=CE_FOCAL, focal_gamma=1.5))


def test_focal_extreme_logits(cuda_emulated):
    x, t = make_case(1, 3, 640, seed=25)
    x[0, 0, :8], x[0, 2, :8] = 3e38, -3e38
    x[0, 1, 8:16] = 200.0  # p = 1 exactly in float32 for class 1
    t[0, :4] = 2  # the target is the class at -3e38
    run_and_compare(x, t, spec_for(x, t, ce=CE_FOCAL, focal_gamma=2.0))


def test_backend_lists_the_features(cuda_emulated):
    assert {"float_labels", "regions", "soft_ce", "label_smoothing", "focal"} <= cu.BACKEND.features

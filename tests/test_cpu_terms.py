"""The C++ CPU kernels' own check of this round's kernel terms (``fasttversky/_spec.py``):
float label maps, region tables, soft-target CE, label smoothing and focal CE.

Each case calls ``fasttversky.ops.cpu.BACKEND`` directly and compares its stats with the
contract's formulas written here in float64 torch on the same rounded inputs, and its
``backward`` with float64 autograd of ``Σ coef · stats`` for seeded random coefficients
(the backward's contract: the gradient of exactly that sum), within the tolerances of
``tests/_helpers.py``. Float label maps must give bitwise the results of the same labels
stored as int64, and every term must be bitwise independent of the thread count.
"""

from __future__ import annotations

import random

import pytest
import torch

from fasttversky._spec import CE_FOCAL, CE_NONE, CE_PLAIN, KernelSpec
from tests._helpers import TOLERANCES, describe_mismatch

cpu = pytest.importorskip("fasttversky.ops.cpu")

SOFTMAX, SIGMOID, NONE = 0, 1, 2
FLOAT_LABELS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LOGIT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _kernels():
    why = cpu.BACKEND.unavailable()
    if why is not None:
        pytest.skip(why)


# ---- the contract's formulas in float64 -----------------------------------------------


def ref_targets(target: torch.Tensor, spec: KernelSpec):
    """(g (B, C, N) masked, w (B, 1, N), number of bad targets), as _spec.py defines them."""
    C = spec.num_classes
    if spec.soft_target:
        g = target.double()
        bad = int(((g < 0) | (g > 1) | ~torch.isfinite(g)).sum())
        return g, torch.ones_like(g[:, :1]), bad
    lab = target.double()
    keep = torch.ones_like(lab, dtype=torch.bool)
    if spec.ignore_index is not None:
        keep = lab != spec.ignore_index
    valid = torch.isfinite(lab) & (lab == lab.round()) & (lab >= 0) & (lab < spec.num_labels)
    bad = int((keep & ~valid).sum())
    idx = torch.where(valid, lab, 0).long()
    classes = torch.arange(C).view(1, C, 1)
    if spec.region_masks is not None:
        masks = torch.tensor(spec.region_masks, dtype=torch.int64)[idx]
        g = (masks.unsqueeze(1) >> classes) & 1
    elif spec.binary_labels:
        g = (idx == 1).unsqueeze(1)
    else:
        g = idx.unsqueeze(1) == classes
    # a bad label still counts in sum_p (w = 1) but matches no class: the kernels' view,
    # though a call with bad targets raises before its values are used
    g = g & valid.unsqueeze(1)
    w = keep.unsqueeze(1).double()
    return g.double() * w, w, bad


def ref_ce_columns(x, g, w, spec: KernelSpec) -> list[torch.Tensor]:
    """The CE-family columns (B, C) of _spec.py, from float64 logits x."""
    if spec.ce == CE_NONE:
        return []
    gamma = spec.focal_gamma
    if spec.activation == SOFTMAX:
        C = spec.num_classes
        q = ((1 - spec.label_smoothing) * g + spec.label_smoothing / C) * w
        logp = torch.log_softmax(x, dim=1)
        term = -logp
        if spec.ce == CE_FOCAL:
            term = term * (1 - logp.exp()).pow(gamma)
        return [torch.where(q != 0, q * term, 0.0).sum(-1)]
    q = g
    bce = x.clamp(min=0) - x * q + torch.log1p(torch.exp(-x.abs()))
    if spec.ce == CE_PLAIN:
        return [(w * bce).sum(-1)]
    s = 2 * q - 1
    h = torch.exp(gamma * torch.nn.functional.logsigmoid(-x * s)) * bce
    return [(w * h).sum(-1), (w * q * h).sum(-1)]


def ref_stats(x, target, spec: KernelSpec):
    """(stats (B, C, 3 + ce_columns) float64, differentiable in x; bad-target count)."""
    g, w, bad = ref_targets(target, spec)
    if spec.activation == SOFTMAX:
        p = torch.softmax(x, dim=1)
    elif spec.activation == SIGMOID:
        p = torch.sigmoid(x)
    else:
        p = x
    cols = [(w * p * g).sum(-1), (w * p).sum(-1), g.sum(-1)]
    cols += ref_ce_columns(x, g, w, spec)
    return torch.stack(cols, dim=-1), bad


# ---- running the kernels ----------------------------------------------------------------


def coefficients(B, C, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    return [torch.randn(B, C, generator=gen, dtype=torch.float64).to(cdt) for _ in range(4)]


def run_kernels(logits, target, spec: KernelSpec, coefs):
    stats, flags = cpu.BACKEND.forward_stats(logits, target, spec)
    a, b, ce, ce2 = coefs
    grad = cpu.BACKEND.backward(
        logits,
        target,
        a,
        b,
        spec,
        coef_ce=ce if spec.with_ce else None,
        coef_ce2=ce2 if spec.ce_columns == 2 else None,
    )
    return stats, flags, grad


def check_case(logits, target, spec: KernelSpec):
    """Compare the kernels with the contract in float64; return (stats, flags, grad)."""
    B, C, _ = logits.shape
    coefs = coefficients(B, C, logits.dtype)
    stats, flags, grad = run_kernels(logits, target, spec, coefs)
    x = logits.detach().double().requires_grad_(True)
    ref, bad = ref_stats(x, target, spec)
    assert stats.shape == ref.shape and stats.dtype == torch.float64
    assert flags.tolist() == [0, bad]
    loss = sum((coefs[k].double() * ref[..., col]).sum() for k, col in ((0, 1), (1, 0)))
    for k in range(spec.ce_columns):
        loss = loss + (coefs[2 + k].double() * ref[..., 3 + k]).sum()
    (ref_grad,) = torch.autograd.grad(loss, x)
    loss_rtol, grad_rtol = TOLERANCES[logits.dtype]
    for col in range(ref.shape[-1]):
        tol = loss_rtol * max(ref[..., col].abs().max().item(), 1e-3)
        actual, expected = stats[..., col], ref[..., col].detach()
        assert torch.allclose(actual, expected, rtol=0, atol=tol), (
            f"column {col}: " + describe_mismatch(actual, expected, tol)
        )
    assert grad.shape == logits.shape and grad.dtype == logits.dtype
    assert grad.stride() == logits.stride() or not logits.is_contiguous()
    tol = grad_rtol * max(ref_grad.abs().max().item(), 1e-30)
    assert torch.allclose(grad.double(), ref_grad, rtol=0, atol=tol), describe_mismatch(
        grad, ref_grad, tol
    )
    return stats, flags, grad


def make_logits(B, C, N, dtype, seed=0, layout="contiguous", activation=SOFTMAX):
    """(B, C, N) logits as the backends see them, in a given memory layout."""
    gen = torch.Generator().manual_seed(seed)
    if activation == NONE:
        x = torch.rand(B, C, N, generator=gen, dtype=torch.float64)
    else:
        x = 2.0 * torch.randn(B, C, N, generator=gen, dtype=torch.float64)
    x = x.to(dtype)
    if layout == "channels_last":  # (B, N, C) storage: stride_c 1, stride_n C
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "strided":  # every other voxel of a larger buffer
        big = torch.zeros(B, C, 2 * N, dtype=dtype)
        big[..., ::2] = x
        return big[..., ::2]
    if layout == "expanded":  # one sample repeated: stride_b 0
        return x[:1].expand(B, C, N)
    return x


def make_labels(B, N, num_labels, seed=0, ignore_index=None, dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed + 100)
    lab = torch.randint(0, num_labels, (B, N), generator=gen)
    if ignore_index is not None:
        lab[torch.rand(B, N, generator=gen) < 0.15] = ignore_index
    return lab.to(dtype)


def make_soft(B, C, N, seed=0):
    gen = torch.Generator().manual_seed(seed + 200)
    t = torch.rand(B, C, N, generator=gen, dtype=torch.float64)
    return torch.where(t < 0.3, torch.zeros_like(t), t).to(torch.float32)


def spec_of(activation, C, *, ce=CE_NONE, ignore_index=None, soft=False, **kw):
    return KernelSpec(activation, soft, ignore_index, C, ce=ce, **kw)


# ---- float label maps ---------------------------------------------------------------------

# (activation, C, ce, layout): the two-class softmax fast paths (planar and interleaved,
# with and without CE), the general tile, sigmoid, and the binary C == 1 case.
LABEL_PATHS = [
    (SOFTMAX, 2, CE_NONE, "contiguous"),
    (SOFTMAX, 2, CE_PLAIN, "contiguous"),
    (SOFTMAX, 2, CE_PLAIN, "channels_last"),
    (SOFTMAX, 2, CE_NONE, "strided"),
    (SOFTMAX, 4, CE_PLAIN, "contiguous"),
    (SIGMOID, 3, CE_PLAIN, "channels_last"),
    (SIGMOID, 1, CE_NONE, "contiguous"),
    (NONE, 3, CE_NONE, "expanded"),
]


@pytest.mark.parametrize("label_dtype", FLOAT_LABELS, ids=str)
@pytest.mark.parametrize("path", LABEL_PATHS, ids=lambda p: "-".join(map(str, p)))
def test_float_labels_match_integer_labels(path, label_dtype):
    """float32 label maps take the integer maps' paths: bitwise their results. The rarer
    float16/bfloat16/float64 maps take the terms paths: checked against the contract."""
    activation, C, ce, layout = path
    B, N = 2, 3 * 64 * 7 + 5  # full tiles and a tail
    for dtype, ignore_index in ((torch.float32, -100), (torch.bfloat16, None)):
        logits = make_logits(B, C, N, dtype, layout=layout, activation=activation)
        labels = make_labels(B, N, max(C, 2), ignore_index=ignore_index)
        spec = spec_of(activation, C, ce=ce, ignore_index=ignore_index)
        fspec = spec_of(activation, C, ce=ce, ignore_index=ignore_index, float_labels=True)
        coefs = coefficients(B, C, dtype)
        want = run_kernels(logits, labels, spec, coefs)
        got = check_case(logits, labels.to(label_dtype), fspec)
        if label_dtype == torch.float32:
            for a, b in zip(got, want, strict=True):
                assert torch.equal(a, b)


@pytest.mark.parametrize("label_dtype", FLOAT_LABELS, ids=str)
@pytest.mark.parametrize("C", [2, 3])
def test_float_labels_flag_bad_values(C, label_dtype):
    """NaN, inf, fractions, negatives and labels >= C are bad targets; ignore_index is not."""
    B, N = 1, 300
    logits = make_logits(B, C, N, torch.float32)
    labels = make_labels(B, N, C, ignore_index=-100).to(torch.float64)
    bad_values = [float("nan"), float("inf"), -float("inf"), 0.5, 1.25, -1.0, C, 1e10, -3e9]
    labels[0, 7 : 7 + len(bad_values)] = torch.tensor(bad_values, dtype=torch.float64)
    labels = labels.to(label_dtype)
    ignored = int((labels == -100).sum())
    assert ignored > 0
    for ce in (CE_NONE, CE_PLAIN):
        spec = spec_of(SOFTMAX, C, ce=ce, ignore_index=-100, float_labels=True)
        _, flags = cpu.BACKEND.forward_stats(logits, labels, spec)
        assert flags.tolist() == [0, len(bad_values)]
    # without an ignore_index, -100 is a bad label too
    spec = spec_of(SOFTMAX, C, float_labels=True)
    _, flags = cpu.BACKEND.forward_stats(logits, labels, spec)
    assert flags.tolist() == [0, len(bad_values) + ignored]


@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
def test_float_labels_against_contract(dtype):
    B, C, N = 2, 5, 700
    logits = make_logits(B, C, N, dtype, layout="channels_last")
    labels = make_labels(B, N, C, ignore_index=255).to(torch.float32)
    for activation in (SOFTMAX, SIGMOID):
        spec = spec_of(activation, C, ce=CE_PLAIN, ignore_index=255, float_labels=True)
        check_case(logits, labels, spec)


# ---- regions -------------------------------------------------------------------------------

# nnU-Net's regions ((1, 2, 3), (2, 3), (3,)) over labels 0..3: bit r of a label's mask
# says that the label belongs to region r.
REGION_MASKS = (0b000, 0b001, 0b011, 0b111)


@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
@pytest.mark.parametrize(
    "activation, ce",
    [(SIGMOID, CE_NONE), (SIGMOID, CE_PLAIN), (SIGMOID, CE_FOCAL), (NONE, CE_NONE)],
)
def test_regions_against_contract(activation, ce, dtype):
    B, C, N = 2, 3, 64 * 5 + 17
    logits = make_logits(B, C, N, dtype, layout="channels_last", activation=activation)
    for label_dtype, ignore_index in ((torch.int64, 255), (torch.uint8, None), (torch.float32, -1)):
        labels = make_labels(B, N, 4, ignore_index=ignore_index, dtype=label_dtype)
        spec = spec_of(
            activation,
            C,
            ce=ce,
            ignore_index=ignore_index,
            region_masks=REGION_MASKS,
            focal_gamma=2.0 if ce == CE_FOCAL else 0.0,
            float_labels=label_dtype.is_floating_point,
        )
        check_case(logits, labels, spec)


def test_regions_flag_labels_outside_the_table():
    B, C, N = 1, 3, 200
    logits = make_logits(B, C, N, torch.float32)
    labels = make_labels(B, N, 4)
    labels[0, :5] = torch.tensor([4, 5, -1, 100, -100])
    spec = spec_of(SIGMOID, C, region_masks=REGION_MASKS)
    stats, flags, _ = check_case(logits, labels, spec)
    assert flags.tolist() == [0, 5]


def test_regions_of_many_bits():
    """Regions beyond bit 31 of the mask (C up to the kernels' class limit)."""
    B, C, N = 1, min(cpu.MAX_CLASSES, 63), 300
    rng = random.Random(3)
    masks = tuple(rng.getrandbits(C) for _ in range(6))
    logits = make_logits(B, C, N, torch.float64)
    labels = make_labels(B, N, 6)
    check_case(logits, labels, spec_of(SIGMOID, C, ce=CE_PLAIN, region_masks=masks))


# ---- soft-target CE, label smoothing, focal ------------------------------------------------


@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
@pytest.mark.parametrize("activation", [SOFTMAX, SIGMOID])
@pytest.mark.parametrize("ce", [CE_PLAIN, CE_FOCAL])
def test_soft_target_ce_against_contract(ce, activation, dtype):
    B, C, N = 2, 3, 64 * 4 + 9
    for layout, eps in (("contiguous", 0.0), ("channels_last", 0.1), ("strided", 0.0)):
        logits = make_logits(B, C, N, dtype, layout=layout)
        soft = make_soft(B, C, N)
        if layout == "channels_last":
            soft = soft.transpose(1, 2).contiguous().transpose(1, 2)
        spec = spec_of(
            activation,
            C,
            ce=ce,
            soft=True,
            label_smoothing=eps if activation == SOFTMAX else 0.0,
            # γ = 2 takes the kernels' squared focal factors, other γ the exp/log form
            focal_gamma=(2.0 if layout == "channels_last" else 1.5) if ce == CE_FOCAL else 0.0,
        )
        check_case(logits, soft, spec)


def test_soft_target_ce_flags_bad_values():
    B, C, N = 1, 2, 100
    logits = make_logits(B, C, N, torch.float32)
    soft = make_soft(B, C, N)
    soft[0, 0, :4] = torch.tensor([-0.5, 1.5, float("nan"), float("inf")])
    for activation in (SOFTMAX, SIGMOID):
        spec = spec_of(activation, C, ce=CE_PLAIN, soft=True)
        _, flags = cpu.BACKEND.forward_stats(logits, soft, spec)
        assert flags.tolist() == [0, 4]


@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
@pytest.mark.parametrize("C", [2, 4])
def test_label_smoothing_against_contract(C, dtype):
    B, N = 2, 64 * 6 + 3
    for layout, ignore_index, label_dtype in (
        ("contiguous", None, torch.int64),
        ("channels_last", -100, torch.int16),
        ("contiguous", 0, torch.float32),
    ):
        logits = make_logits(B, C, N, dtype, layout=layout)
        labels = make_labels(B, N, C, ignore_index=ignore_index, dtype=label_dtype)
        spec = spec_of(
            SOFTMAX,
            C,
            ce=CE_PLAIN,
            ignore_index=ignore_index,
            label_smoothing=0.2,
            float_labels=label_dtype.is_floating_point,
        )
        check_case(logits, labels, spec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_label_smoothing_two_class_over_chunks(layout, dtype):
    """The fused two-class paths with smoothing over several chunks: blocked tiles whose
    log products are folded many times (planar, interleaved), strided tiles, tails."""
    B, C, N = 2, 2, 2 * 16384 + 64 * 5 + 7
    logits = make_logits(B, C, N, dtype, layout=layout)
    for ignore_index, label_dtype in ((None, torch.uint8), (255, torch.float32)):
        labels = make_labels(B, N, C, ignore_index=ignore_index, dtype=label_dtype)
        spec = spec_of(
            SOFTMAX,
            C,
            ce=CE_PLAIN,
            ignore_index=ignore_index,
            label_smoothing=0.1,
            float_labels=label_dtype.is_floating_point,
        )
        check_case(logits, labels, spec)


@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_focal_two_class_over_chunks(layout, dtype):
    """The fused two-class paths with softmax focal CE (hard labels, no smoothing) over
    several chunks: planar and interleaved blocks, strided tiles, tails; γ = 2 (squares),
    other γ (an exp), γ = 0 (0^0 = 1)."""
    B, C, N = 2, 2, 2 * 16384 + 64 * 5 + 7
    logits = make_logits(B, C, N, dtype, layout=layout)
    for gamma, ignore_index, label_dtype in (
        (2.0, None, torch.uint8),
        (1.5, 255, torch.float32),
        (0.0, -100, torch.int64),
    ):
        labels = make_labels(B, N, C, ignore_index=ignore_index, dtype=label_dtype)
        spec = spec_of(
            SOFTMAX,
            C,
            ce=CE_FOCAL,
            ignore_index=ignore_index,
            focal_gamma=gamma,
            float_labels=label_dtype.is_floating_point,
        )
        check_case(logits, labels, spec)


@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_focal_general_classes(layout, dtype):
    """Softmax focal CE on label maps of C != 2 classes (the general tile, no smoothing):
    γ = 2 (squares), other γ (exp and log), γ < 1 (its gradient's (1 - p)^(γ-1))."""
    B, N = 2, 64 * 5 + 11
    for C, gamma, ignore_index, label_dtype in (
        (3, 2.0, None, torch.uint8),
        (5, 1.5, 255, torch.float32),
        (3, 0.5, -100, torch.int32),
    ):
        logits = make_logits(B, C, N, dtype, layout=layout)
        labels = make_labels(B, N, C, ignore_index=ignore_index, dtype=label_dtype)
        spec = spec_of(
            SOFTMAX,
            C,
            ce=CE_FOCAL,
            ignore_index=ignore_index,
            focal_gamma=gamma,
            float_labels=label_dtype.is_floating_point,
        )
        check_case(logits, labels, spec)


@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
@pytest.mark.parametrize("activation, C", [(SOFTMAX, 2), (SOFTMAX, 5), (SIGMOID, 1), (SIGMOID, 3)])
def test_focal_on_label_maps_against_contract(activation, C, dtype):
    B, N = 2, 64 * 5 + 11
    for gamma, ignore_index, eps in ((0.0, None, 0.0), (0.5, 255, 0.1), (2.0, -100, 0.0)):
        logits = make_logits(B, C, N, dtype, layout="contiguous")
        labels = make_labels(B, N, max(C, 2), ignore_index=ignore_index)
        spec = spec_of(
            activation,
            C,
            ce=CE_FOCAL,
            ignore_index=ignore_index,
            focal_gamma=gamma,
            label_smoothing=eps if activation == SOFTMAX else 0.0,
        )
        check_case(logits, labels, spec)


@pytest.mark.parametrize("C", [2, 3])
@pytest.mark.parametrize("activation", [SOFTMAX, SIGMOID])
@pytest.mark.parametrize("ce, eps", [(CE_PLAIN, 0.1), (CE_FOCAL, 0.0)])
def test_terms_with_extreme_logits(activation, ce, eps, C):
    """Saturated probabilities (p rounds to 0 or 1): the terms stay finite and exact
    (C = 2: the fused two-class softmax paths)."""
    B, N = 1, 64 * 3
    logits = make_logits(B, C, N, torch.float32) * 40
    labels = make_labels(B, N, C)
    soft = make_soft(B, C, N)
    for gamma in (2.0, 1.5):
        spec = spec_of(
            activation,
            C,
            ce=ce,
            focal_gamma=gamma,
            label_smoothing=eps if activation == SOFTMAX else 0.0,
        )
        check_case(logits, labels, spec)
        spec = spec_of(
            activation,
            C,
            ce=ce,
            focal_gamma=gamma,
            soft=True,
            label_smoothing=eps if activation == SOFTMAX else 0.0,
        )
        check_case(logits, soft, spec)


# ---- determinism ---------------------------------------------------------------------------

THREAD_CASES = {
    "float-labels-ce": (spec_of(SOFTMAX, 2, ce=CE_PLAIN, float_labels=True), "labels-f32"),
    "regions-focal": (
        spec_of(SIGMOID, 3, ce=CE_FOCAL, focal_gamma=2.0, region_masks=REGION_MASKS),
        "labels4",
    ),
    "soft-ce": (spec_of(SOFTMAX, 3, ce=CE_PLAIN, soft=True, label_smoothing=0.1), "soft"),
    "smoothing": (spec_of(SOFTMAX, 3, ce=CE_PLAIN, ignore_index=0, label_smoothing=0.1), "labels"),
    "smoothing-2class": (spec_of(SOFTMAX, 2, ce=CE_PLAIN, label_smoothing=0.1), "labels"),
    "softmax-focal": (spec_of(SOFTMAX, 4, ce=CE_FOCAL, focal_gamma=0.5), "labels"),
    "softmax-focal-2class": (spec_of(SOFTMAX, 2, ce=CE_FOCAL, focal_gamma=2.0), "labels"),
    "softmax-focal-2class-g1.5": (spec_of(SOFTMAX, 2, ce=CE_FOCAL, focal_gamma=1.5), "labels"),
    "sigmoid-focal-soft": (spec_of(SIGMOID, 2, ce=CE_FOCAL, soft=True, focal_gamma=2.0), "soft"),
}


@pytest.mark.parametrize("case", sorted(THREAD_CASES))
def test_terms_independent_of_thread_count(case):
    spec, kind = THREAD_CASES[case]
    B, C, N = 2, spec.num_classes, 3 * 16384 + 777  # several chunks per sample
    logits = make_logits(B, C, N, torch.float32)
    if kind == "soft":
        target = make_soft(B, C, N)
    else:
        target = make_labels(B, N, 4 if kind == "labels4" else C)
        target = target.float() if kind == "labels-f32" else target
    coefs = coefficients(B, C, torch.float32)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(run_kernels(logits, target, spec, coefs))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


# ---- many classes --------------------------------------------------------------------------

MANY_CLASS_CASES = {
    # label maps: the general tile with and without CE; softmax, sigmoid
    "softmax-ce": dict(activation=SOFTMAX, ce=CE_PLAIN, ignore_index=255),
    "softmax": dict(activation=SOFTMAX, ce=CE_NONE, ignore_index=None),
    "sigmoid-ce": dict(activation=SIGMOID, ce=CE_PLAIN, ignore_index=None),
    # the terms paths
    "smoothing": dict(activation=SOFTMAX, ce=CE_PLAIN, ignore_index=None, label_smoothing=0.1),
    "softmax-focal": dict(activation=SOFTMAX, ce=CE_FOCAL, ignore_index=255, focal_gamma=2.0),
    "soft-ce": dict(activation=SOFTMAX, ce=CE_PLAIN, ignore_index=None, soft=True),
    "soft": dict(activation=SIGMOID, ce=CE_NONE, ignore_index=None, soft=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", sorted(MANY_CLASS_CASES))
def test_many_classes_against_contract(case, dtype):
    """C = 118 (TotalSegmentator) and the kernels' limit, planar and channels-last."""
    kw = dict(MANY_CLASS_CASES[case])
    for C, layout in ((118, "channels_last"), (cpu.MAX_CLASSES, "contiguous")):
        B, N = 1, 64 * 3 + 5
        logits = make_logits(B, C, N, dtype, layout=layout)
        if kw.get("soft"):
            target = make_soft(B, C, N)
        else:
            target = make_labels(B, N, C, ignore_index=kw["ignore_index"])
        check_case(logits, target, spec_of(C=C, **kw))

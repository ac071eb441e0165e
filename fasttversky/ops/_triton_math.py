# The Triton kernels of the Tversky loss. Launchers and the backend object live in
# fasttversky/ops/triton.py; this module holds everything decorated with @triton.jit, so
# that a machine without triton gets one clear reason from the backend's unavailable()
# instead of an import error (triton.py imports this module lazily).
#
# The math (full derivation in csrc/tversky.h, same names):
#
#   per (sample b, class c), over the non-ignored voxels n (mask w_n in {0, 1}):
#     sum_pg = Σ w p g,   sum_p = Σ w p,   sum_g = Σ w g
#   and the backward is AFFINE in g (paper Eq. 5 pushed through these sums):
#     u_{c,n} = dL/dp_{c,n} = w_n (A_c + B_c g_{c,n}),  A = dL/dsum_p, B = dL/dsum_pg
#   chained through the activation:
#     softmax: dL/dz_k = p_k (u_k - Σ_c p_c u_c)
#     sigmoid: dL/dz_c = u_c p_c (1 - p_c)
#     none:    dL/dx_c = u_c
#
# Cross-entropy family (CE = 1 plain, 2 focal; softmax or sigmoid; fasttversky/_spec.py
# has every formula): more per-(b, c) sums in the same pass over the CE target
# q = (1 - eps) g + eps / C (HAS_SMOOTHING; q = g otherwise), 0 on ignored voxels —
# softmax: q (-log p) (focal: times (1 - p)^gamma), -log p_c = log Σ_k exp(x_k - m) -
# (x_c - m) from the max and exp sum the softmax takes anyway; sigmoid: BCE(x, q) =
# max(x, 0) - x q + log(1 + exp(-|x|)) (focal: h = BCE exp(-gamma softplus(x (2q - 1))),
# and a second column q h). Its backward is one more term in the same elementwise pass
# (_grad_ce), from e = dL/dcol3 (and dL/dcol4). With CE = 0 the kernels compile exactly
# to the Tversky-only work; eps and gamma are read from a small tensor in the compute
# dtype (params = [eps, gamma]) because a Python float argument would reach the kernel
# rounded to float32.
#
# Targets: integer label maps; float label maps (the target pointer's dtype decides, at
# compile time), whose NaN/inf/fractional values count as bad labels; soft targets
# (HAS_SOFT_TARGET); and region tables (HAS_REGIONS): g_c = bit c of regions[label].
#
# Shape of the work: the forward is a reduction over a whole volume, so each program
# reduces one tile of one sample (all C classes at once, a (C_PAD, BLOCK_N) register
# block per step) into a per-tile partial [sum_pg, sum_p, sum_g] and a fixed-order
# finalize adds the partials in float64. No float atomics anywhere: the result depends
# only on the shapes and the launch configuration, never on scheduling, so repeated
# calls are bitwise equal. The backward is elementwise over voxels and recomputes p
# from the logits instead of saving it (saving p would cost a logits-sized buffer).
#
# Labels are read as integers (or floats) and compared with the class index in registers; a one-hot
# tensor is never built. All offsets are int64, so volumes over 2**31 elements work.

import triton
import triton.language as tl

# The cross-entropy is summed in units of CE_UNIT: each term is multiplied by CE_SCALE =
# 1 / CE_UNIT as it is formed (the logits before their difference is taken), and the
# finalize's float64 sum by CE_UNIT. A voxel's CE can exceed float32's range while the
# loss does not (logits near +-3e38: a gap of up to 2 x FLT_MAX between two classes); in
# these units any sum over up to 2**31 voxels fits. Scaling by a power of two is exact,
# so every sum rounds as the unscaled one did (only terms below 2**-92, subnormal once
# scaled, lose bits).
CE_SCALE = tl.constexpr(2.0**-34)
CE_UNIT = tl.constexpr(2.0**34)


@triton.jit
def _probs(x, cmask2, ACTIVATION: tl.constexpr):
    """p from a (C_PAD, BLOCK_N) block of logits x (compute dtype).

    cmask2: (C_PAD, 1) bool, True for real classes. Padded class rows get p = 0, so they
    vanish from the softmax denominator and from every sum below.
    """
    if ACTIVATION == 0:
        # Softmax over the class axis, max-subtracted for range. The padding rows are
        # -inf so exp() gives exactly 0 for them.
        xm = tl.where(cmask2, x, float("-inf"))
        mx = tl.max(xm, axis=0)
        e = tl.exp(xm - mx[None, :])
        p = e / tl.sum(e, axis=0)[None, :]
    elif ACTIVATION == 1:
        p = tl.where(cmask2, tl.sigmoid(x), 0.0)
    else:
        p = tl.where(cmask2, x, 0.0)
    return p


@triton.jit
def _softplus(z):
    """log(1 + exp(z)), without overflow."""
    return tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))


@triton.jit
def _bce(x, q, scale: tl.constexpr):
    """BCE(x, q) = max(x, 0) - x q + log(1 + exp(-|x|)), times scale (a power of two)."""
    xs = x * scale
    return tl.maximum(xs, 0.0) - xs * q + tl.log(1.0 + tl.exp(-tl.abs(x))) * scale


@triton.jit
def _pow_1m(p, gamma):
    """(1 - p)^gamma, with 0^0 = 1 (p == 1: a saturated class)."""
    omp = 1.0 - p
    pos = omp > 0.0
    # log of a positive value only: no inf (or 0 * inf = NaN) even in the unused branch
    power = tl.exp(gamma * tl.log(tl.where(pos, omp, 1.0)))
    return tl.where(pos, power, tl.where(gamma == 0.0, 1.0, 0.0))


@triton.jit
def _ce_target(g, keep, C, params_ptr, HAS_SMOOTHING: tl.constexpr):
    """q, the CE target: (1 - eps) g + eps / C on counted voxels (eps = params[0]), 0
    elsewhere; g itself (already 0 off keep) without smoothing."""
    q = g
    if HAS_SMOOTHING:
        eps = tl.load(params_ptr)
        q = tl.where(keep, (1.0 - eps) * g + eps / C, 0.0)
    return q


@triton.jit
def _probs_ce(x, q, keep, cmask2, params_ptr, ACTIVATION: tl.constexpr, CE: tl.constexpr):
    """(p, ce, ce2) from a (C_PAD, BLOCK_N) block of logits and the CE target q (CE > 0).

    ce, ce2: per element the terms of stats columns 3 and 4 (_spec.py), in CE units, 0 on
    ignored voxels, tail voxels and padded rows (q = 0 there, keep False); ce2 is only
    meaningful for sigmoid focal.
    """
    if ACTIVATION == 0:
        xm = tl.where(cmask2, x, float("-inf"))
        mx = tl.max(xm, axis=0)
        e = tl.exp(xm - mx[None, :])
        s = tl.sum(e, axis=0)
        p = e / s[None, :]
        # -log p_c = log s - (x_c - m) (s in [1, C]), in CE units: finite for every finite
        # logit, also where p_c underflows to 0; a q_c = 0 term adds exactly 0.
        nll = tl.log(s)[None, :] * CE_SCALE - (x * CE_SCALE - mx[None, :] * CE_SCALE)
        if CE == 2:
            nll = nll * _pow_1m(p, tl.load(params_ptr + 1))
        ce = tl.where(q != 0.0, q * nll, 0.0)
        ce2 = ce
    else:
        p = tl.where(cmask2, tl.sigmoid(x), 0.0)
        bce = _bce(x, q, CE_SCALE)
        if CE == 2:
            # MONAI's modulating factor exp(gamma logsigmoid(-x s)), s = 2q - 1
            bce = bce * tl.exp(-tl.load(params_ptr + 1) * _softplus(x * (2.0 * q - 1.0)))
        ce = tl.where(keep, bce, 0.0)
        ce2 = ce * q
    return p, ce, ce2


@triton.jit
def _float_labels(raw):
    """(lab int64, ok) of a float label map's values: ok where the value is an integral
    number (not NaN, inf or fractional); lab = -1 where not.

    float64 labels are checked in float64 (1 + 2**-40 is not a label); the narrower
    dtypes hold their values exactly in float32.
    """
    if raw.dtype == tl.float64:
        lf = raw
    else:
        lf = raw.to(tl.float32)
    # NaN and inf fail this test, so the conversion below only ever sees values that an
    # int64 holds exactly (|v| < 2**62); a value is integral if it converts back to itself.
    fits = tl.abs(lf) < 4611686018427387904.0
    lab = tl.where(fits, lf, 0.0).to(tl.int64)
    ok = fits & (lab.to(lf.dtype) == lf)
    return tl.where(ok, lab, -1), ok


@triton.jit
def _labels(t_ptrs, nmask, ignore_index, num_labels, HAS_IGNORE_INDEX: tl.constexpr):
    """(lab int64, keep1, bad1), each (BLOCK_N,), of a label map of any integer or float
    dtype: keep1, the voxel counts (w = 1); bad1, it counts and its label is invalid
    (outside [0, num_labels); for float labels also NaN, inf or fractional)."""
    raw = tl.load(t_ptrs, mask=nmask, other=0)
    if raw.dtype.is_floating():
        lab, ok = _float_labels(raw)
    else:
        # widened to int64 so that every value (negative, or beyond the int32 range) is
        # compared exactly
        lab = raw.to(tl.int64)
        ok = nmask
    if HAS_IGNORE_INDEX:
        keep1 = nmask & ~(ok & (lab == ignore_index))
    else:
        keep1 = nmask
    bad1 = keep1 & (~ok | (lab < 0) | (lab >= num_labels))
    return lab, keep1, bad1


@triton.jit
def _target_block(
    t_base,
    regions_ptr,
    cls,
    n,
    nmask,
    cmask2,
    target_stride_c,
    target_stride_n,
    ignore_index,
    num_labels,
    CDTYPE: tl.constexpr,
    HAS_SOFT_TARGET: tl.constexpr,
    HAS_IGNORE_INDEX: tl.constexpr,
    BINARY_LABELS: tl.constexpr,
    HAS_REGIONS: tl.constexpr,
):
    """(g, keep, bad) for one tile; t_base: this sample's target (target_ptr + b * stride_b).

    g: (C_PAD, BLOCK_N) CDTYPE ground truth (0 on padding and ignored voxels);
    keep: (C_PAD, BLOCK_N) bool, the voxel counts (w = 1) and the class is real;
    bad: (C_PAD, BLOCK_N) int32, 1 per invalid target (a bad label, counted once per
    voxel in row 0; soft values outside [0, 1] or NaN, counted per element).
    """
    m2 = cmask2 & nmask[None, :]
    if HAS_SOFT_TARGET:
        # target (B, C, N) float of any dtype, any strides.
        offs = cls[:, None].to(tl.int64) * target_stride_c + n[None, :] * target_stride_n
        t = tl.load(t_base + offs, mask=m2, other=0.0).to(CDTYPE)
        # NaN fails both comparisons, so it is counted as bad too.
        bad = (m2 & ~((t >= 0.0) & (t <= 1.0))).to(tl.int32)
        keep = m2
        g = tl.where(m2, t, 0.0)
    else:
        t_ptrs = t_base + n * target_stride_n
        lab, keep1, bad1 = _labels(t_ptrs, nmask, ignore_index, num_labels, HAS_IGNORE_INDEX)
        bad = (bad1[None, :] & (cls == 0)[:, None]).to(tl.int32)
        keep = cmask2 & keep1[None, :]
        if HAS_REGIONS:
            # bit c of the label's mask (C <= 63); an invalid label reads no mask
            valid = keep1 & (lab >= 0) & (lab < num_labels)
            bits = tl.load(regions_ptr + tl.where(valid, lab, 0), mask=valid, other=0)
            hit = ((bits[None, :] >> cls[:, None].to(tl.int64)) & 1) != 0
        elif BINARY_LABELS:
            # C == 1 label map: the single channel is the foreground, g = (label == 1).
            hit = (lab == 1)[None, :] & cmask2
        else:
            hit = lab[None, :] == cls[:, None].to(tl.int64)
        g = tl.where(keep & hit, 1.0, 0.0).to(CDTYPE)
    return g, keep, bad


@triton.jit
def _tile_terms(
    x_base,
    t_base,
    regions_ptr,
    cls,
    n,
    N,
    cmask2,
    logits_stride_n,
    target_stride_c,
    target_stride_n,
    ignore_index,
    num_labels,
    CDTYPE: tl.constexpr,
    HAS_SOFT_TARGET: tl.constexpr,
    HAS_IGNORE_INDEX: tl.constexpr,
    BINARY_LABELS: tl.constexpr,
    HAS_REGIONS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    WITH_P: tl.constexpr,
):
    """(x, p, g, keep, bad, nonfinite) of the voxels n of one sample, all (C_PAD, BLOCK_N).

    What both kernels read per tile. x_base: (C_PAD, 1) pointers to the sample's class
    rows (logits_ptr + b * stride_b + c * stride_c); t_base: the sample's target. x: the
    logits in CDTYPE; p: _probs(x) with WITH_P (taken before the target is read, which
    keeps fewer values live: the CE forward takes p with its log-sum-exp instead), else
    x; g, keep, bad as _target_block; nonfinite: 1 per NaN/inf logit. Tail voxels load 0
    (a harmless finite value) and are masked out of every sum by keep.
    """
    nmask = n < N
    m2 = cmask2 & nmask[None, :]
    x = tl.load(x_base + n[None, :] * logits_stride_n, mask=m2, other=0.0).to(CDTYPE)
    nonfinite = (m2 & ~((x == x) & (tl.abs(x) != float("inf")))).to(tl.int32)
    p = x
    if WITH_P:
        p = _probs(x, cmask2, ACTIVATION)
    g, keep, bad = _target_block(
        t_base,
        regions_ptr,
        cls,
        n,
        nmask,
        cmask2,
        target_stride_c,
        target_stride_n,
        ignore_index,
        num_labels,
        CDTYPE,
        HAS_SOFT_TARGET,
        HAS_IGNORE_INDEX,
        BINARY_LABELS,
        HAS_REGIONS,
    )
    return x, p, g, keep, bad, nonfinite


@triton.jit
def _fwd_tile_sums(
    x_base,
    t_base,
    regions_ptr,
    params_ptr,
    cls,
    pid_t,
    iters,
    N,
    C,
    logits_stride_n,
    target_stride_c,
    target_stride_n,
    ignore_index,
    num_labels,
    ACTIVATION: tl.constexpr,
    HAS_SOFT_TARGET: tl.constexpr,
    HAS_IGNORE_INDEX: tl.constexpr,
    BINARY_LABELS: tl.constexpr,
    HAS_REGIONS: tl.constexpr,
    C_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CDTYPE: tl.constexpr,
    CE: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
):
    """One forward tile: its (C_PAD, BLOCK_N) element-wise sums (pg, p, g, ce, ce2) and
    counts (non-finite logits, bad targets), not yet reduced over the voxel axis."""
    cmask2 = (cls < C)[:, None]
    # Accumulate element-wise in registers across the steps and reduce over the voxel
    # axis once at the end: cheaper than a cross-lane reduction per step, and each lane
    # only adds `iters` values, which keeps fp32 rounding small before the fp64 finalize.
    acc_pg = tl.zeros((C_PAD, BLOCK_N), dtype=CDTYPE)
    acc_p = tl.zeros((C_PAD, BLOCK_N), dtype=CDTYPE)
    acc_g = tl.zeros((C_PAD, BLOCK_N), dtype=CDTYPE)
    acc_ce = tl.zeros((C_PAD, BLOCK_N), dtype=CDTYPE)  # the CE columns stay 0 (compiled
    acc_ce2 = tl.zeros((C_PAD, BLOCK_N), dtype=CDTYPE)  # away) where they do not exist
    n_nonfinite = tl.zeros((C_PAD, BLOCK_N), dtype=tl.int32)
    n_bad = tl.zeros((C_PAD, BLOCK_N), dtype=tl.int32)
    for i in range(iters):
        n = (pid_t * iters + i) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        x, p, g, keep, bad, nonfinite = _tile_terms(
            x_base,
            t_base,
            regions_ptr,
            cls,
            n,
            N,
            cmask2,
            logits_stride_n,
            target_stride_c,
            target_stride_n,
            ignore_index,
            num_labels,
            CDTYPE,
            HAS_SOFT_TARGET,
            HAS_IGNORE_INDEX,
            BINARY_LABELS,
            HAS_REGIONS,
            ACTIVATION,
            CE == 0,
        )
        n_nonfinite += nonfinite
        n_bad += bad
        if CE != 0:
            q = _ce_target(g, keep, C, params_ptr, HAS_SMOOTHING)
            p, ce, ce2 = _probs_ce(x, q, keep, cmask2, params_ptr, ACTIVATION, CE)
            acc_ce += ce
            if CE == 2 and ACTIVATION == 1:
                acc_ce2 += ce2
        pw = tl.where(keep, p, 0.0)  # not p * w: an ignored voxel adds exact zeros
        acc_pg += pw * g
        acc_p += pw
        acc_g += g
    return acc_pg, acc_p, acc_g, acc_ce, acc_ce2, n_nonfinite, n_bad


@triton.jit
def _store_partials(
    out, acc_pg, acc_p, acc_g, acc_ce, acc_ce2, C_PAD: tl.constexpr, NCE: tl.constexpr
):
    """Write one tile's per-class sums: out points at its row (3 + NCE, C_PAD) of partials."""
    tl.store(out, tl.sum(acc_pg, axis=1))
    tl.store(out + C_PAD, tl.sum(acc_p, axis=1))
    tl.store(out + 2 * C_PAD, tl.sum(acc_g, axis=1))
    if NCE >= 1:
        tl.store(out + 3 * C_PAD, tl.sum(acc_ce, axis=1))
    if NCE == 2:
        tl.store(out + 4 * C_PAD, tl.sum(acc_ce2, axis=1))


@triton.jit
def _tversky_fwd_partials_kernel(
    logits_ptr,  # (B, C, N) float32/float16/bfloat16/float64, any strides
    target_ptr,  # (B, N) integer or float labels, or (B, C, N) float soft target
    regions_ptr,  # (num_labels,) int64 region bitmasks, read only with HAS_REGIONS
    params_ptr,  # (2,) CDTYPE [label smoothing eps, focal gamma], read only as needed
    partials_ptr,  # (B, T, 3 + NCE, C_PAD) CDTYPE out: per-tile [sum_pg, sum_p, sum_g, ce..]
    counts_ptr,  # (B, T, 2) int32 out: per-tile [non-finite logits, bad targets]
    N,
    C,
    T,
    iters,  # voxels per sample, classes, tiles per sample, BLOCK_N steps per tile
    logits_stride_b,
    logits_stride_c,
    logits_stride_n,
    target_stride_b,
    target_stride_c,
    target_stride_n,
    ignore_index,
    num_labels,
    ACTIVATION: tl.constexpr,  # 0 softmax, 1 sigmoid, 2 none
    HAS_SOFT_TARGET: tl.constexpr,
    HAS_IGNORE_INDEX: tl.constexpr,
    BINARY_LABELS: tl.constexpr,  # C == 1 label map
    C_PAD: tl.constexpr,  # next power of 2 >= C (>= 2)
    BLOCK_N: tl.constexpr,  # voxels per step, power of 2
    CDTYPE: tl.constexpr,  # tl.float32, or tl.float64 for float64 logits
    CE: tl.constexpr = 0,  # _spec.CE_NONE / CE_PLAIN / CE_FOCAL
    HAS_SMOOTHING: tl.constexpr = False,  # CE target (1 - eps) g + eps / C
    HAS_REGIONS: tl.constexpr = False,  # g_c = bit c of regions[label]
):
    # grid = (T, B): program (t, b) reduces voxels [t*iters*BLOCK_N, (t+1)*iters*BLOCK_N)
    # of sample b. Batch on axis 1 (limit _base.MAX_GRID_BATCH), tiles on axis 0 (limit 2**31 - 1).
    pid_t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cls = tl.arange(0, C_PAD)
    acc_pg, acc_p, acc_g, acc_ce, acc_ce2, n_nonfinite, n_bad = _fwd_tile_sums(
        logits_ptr + b * logits_stride_b + cls[:, None].to(tl.int64) * logits_stride_c,
        target_ptr + b * target_stride_b,
        regions_ptr,
        params_ptr,
        cls,
        pid_t,
        iters,
        N,
        C,
        logits_stride_n,
        target_stride_c,
        target_stride_n,
        ignore_index,
        num_labels,
        ACTIVATION,
        HAS_SOFT_TARGET,
        HAS_IGNORE_INDEX,
        BINARY_LABELS,
        HAS_REGIONS,
        C_PAD,
        BLOCK_N,
        CDTYPE,
        CE,
        HAS_SMOOTHING,
    )
    # CE columns: 2 for sigmoid focal ([h, q h]), else 1 with CE
    NCE: tl.constexpr = (2 if CE == 2 and ACTIVATION == 1 else 1) if CE != 0 else 0
    tile = b * T + pid_t
    out = partials_ptr + tile * ((3 + NCE) * C_PAD) + cls
    _store_partials(out, acc_pg, acc_p, acc_g, acc_ce, acc_ce2, C_PAD, NCE)
    tl.store(counts_ptr + tile * 2, tl.sum(tl.sum(n_nonfinite, axis=1), axis=0))
    tl.store(counts_ptr + tile * 2 + 1, tl.sum(tl.sum(n_bad, axis=1), axis=0))


@triton.jit
def _tversky_finalize_kernel(
    partials_ptr,  # (B, T, 3 + NCE, C_PAD) float32/float64 in
    counts_ptr,  # (B, T, 2) int32 in
    stats_ptr,  # (B, C, 3 + NCE) float64 out: [sum_pg, sum_p, sum_g, CE columns..]
    flag_sums_ptr,  # (B, 2) int64 out: per-sample [non-finite logits, bad targets]
    C,
    T,
    C_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tiles summed per step, power of 2
    NCE: tl.constexpr = 0,  # CE columns, 0, 1 or 2 (_spec.KernelSpec.ce_columns)
):
    # grid = (B,). One program adds the T tile partials of one sample in float64, in a
    # fixed order (fixed chunks of BLOCK_T, each reduced by the same tree): deterministic.
    b = tl.program_id(0).to(tl.int64)
    cls = tl.arange(0, C_PAD)
    tt = tl.arange(0, BLOCK_T)
    acc_pg = tl.zeros((BLOCK_T, C_PAD), dtype=tl.float64)
    acc_p = tl.zeros((BLOCK_T, C_PAD), dtype=tl.float64)
    acc_g = tl.zeros((BLOCK_T, C_PAD), dtype=tl.float64)
    acc_ce = tl.zeros((BLOCK_T, C_PAD), dtype=tl.float64)  # stay 0 (compiled away)
    acc_ce2 = tl.zeros((BLOCK_T, C_PAD), dtype=tl.float64)  # without their columns
    NSTATS: tl.constexpr = 3 + NCE
    cnt_nf = tl.zeros((BLOCK_T,), dtype=tl.int64)
    cnt_bad = tl.zeros((BLOCK_T,), dtype=tl.int64)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tt
        tmask = t < T
        tile = b * T + t.to(tl.int64)
        m2 = tmask[:, None] & (cls < C_PAD)[None, :]
        base = partials_ptr + tile[:, None] * (NSTATS * C_PAD) + cls[None, :]
        acc_pg += tl.load(base, mask=m2, other=0.0).to(tl.float64)
        acc_p += tl.load(base + C_PAD, mask=m2, other=0.0).to(tl.float64)
        acc_g += tl.load(base + 2 * C_PAD, mask=m2, other=0.0).to(tl.float64)
        if NCE >= 1:
            acc_ce += tl.load(base + 3 * C_PAD, mask=m2, other=0.0).to(tl.float64)
        if NCE == 2:
            acc_ce2 += tl.load(base + 4 * C_PAD, mask=m2, other=0.0).to(tl.float64)
        cnt_nf += tl.load(counts_ptr + tile * 2, mask=tmask, other=0).to(tl.int64)
        cnt_bad += tl.load(counts_ptr + tile * 2 + 1, mask=tmask, other=0).to(tl.int64)
    cmask = cls < C
    out = stats_ptr + (b * C + cls) * NSTATS
    tl.store(out, tl.sum(acc_pg, axis=0), mask=cmask)
    tl.store(out + 1, tl.sum(acc_p, axis=0), mask=cmask)
    tl.store(out + 2, tl.sum(acc_g, axis=0), mask=cmask)
    if NCE >= 1:
        tl.store(out + 3, tl.sum(acc_ce, axis=0) * CE_UNIT, mask=cmask)
    if NCE == 2:
        tl.store(out + 4, tl.sum(acc_ce2, axis=0) * CE_UNIT, mask=cmask)
    tl.store(flag_sums_ptr + b * 2, tl.sum(cnt_nf, axis=0))
    tl.store(flag_sums_ptr + b * 2 + 1, tl.sum(cnt_bad, axis=0))


@triton.jit
def _grad_ce(x, p, q, keep, cmask2, e, e2, params_ptr, ACTIVATION: tl.constexpr, CE: tl.constexpr):
    """The CE family's dL/dlogits (formulas in _spec.py) of one (C_PAD, BLOCK_N) tile, for
    e = dL/dcol3 and e2 = dL/dcol4 (sigmoid focal), (C_PAD, 1) each; 0 off keep."""
    if ACTIVATION == 0:
        if CE == 2:
            gamma = tl.load(params_ptr + 1)
            xm = tl.where(cmask2, x, float("-inf"))
            mx = tl.max(xm, axis=0)[None, :]
            logp = (x - mx) - tl.log(tl.sum(tl.exp(xm - mx), axis=0))[None, :]
            omp = 1.0 - p
            # gamma p (1 - p)^(gamma - 1) log p, which tends to 0 where p is 0 or 1 (where
            # log p or the power is infinite)
            inside = (p > 0.0) & (omp > 0.0)
            dmod = gamma * p * tl.exp((gamma - 1.0) * tl.log(tl.where(inside, omp, 1.0))) * logp
            dmod = tl.where(inside, dmod, 0.0)
            a = e * q * (dmod - _pow_1m(p, gamma))
        else:
            a = -(e * q)
        dx = a - p * tl.sum(a, axis=0)[None, :]
    else:
        d = p - q
        if CE == 2:
            gamma = tl.load(params_ptr + 1)
            sgn = 2.0 * q - 1.0
            z = x * sgn
            d = tl.exp(-gamma * _softplus(z)) * (d - gamma * sgn * tl.sigmoid(z) * _bce(x, q, 1.0))
            e = e + e2 * q
        dx = tl.where(keep, e * d, 0.0)
    return dx


@triton.jit
def _grad_logits(p, u, ACTIVATION: tl.constexpr):
    """dL/dlogits of the Tversky terms of one (C_PAD, BLOCK_N) tile: u = dL/dp (0 on
    ignored voxels and padding) chained through the activation."""
    if ACTIVATION == 0:
        s = tl.sum(p * u, axis=0)
        dx = p * (u - s[None, :])
    elif ACTIVATION == 1:
        dx = u * p * (1.0 - p)
    else:
        dx = u
    return dx


@triton.jit
def _tversky_bwd_kernel(
    logits_ptr,  # (B, C, N) float32/float16/bfloat16/float64, any strides
    target_ptr,  # (B, N) integer or float labels, or (B, C, N) float soft target
    regions_ptr,  # (num_labels,) int64 region bitmasks, read only with HAS_REGIONS
    params_ptr,  # (2,) CDTYPE [label smoothing eps, focal gamma], read only as needed
    coefs_ptr,  # (B, K, C) contiguous CDTYPE: [dL/dsum_p, dL/dsum_pg, dL/dcol3, dL/dcol4]
    grad_ptr,  # (B, C, N) out, the logits' dtype, any (non-overlapping) strides
    N,
    C,
    logits_stride_b,
    logits_stride_c,
    logits_stride_n,
    target_stride_b,
    target_stride_c,
    target_stride_n,
    grad_stride_b,
    grad_stride_c,
    grad_stride_n,
    ignore_index,
    num_labels,
    ACTIVATION: tl.constexpr,
    HAS_SOFT_TARGET: tl.constexpr,
    HAS_IGNORE_INDEX: tl.constexpr,
    BINARY_LABELS: tl.constexpr,
    C_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CDTYPE: tl.constexpr,
    CE: tl.constexpr = 0,
    HAS_SMOOTHING: tl.constexpr = False,
    HAS_REGIONS: tl.constexpr = False,
):
    # grid = (cdiv(N, BLOCK_N), B). Purely elementwise over voxels; the only reduction is
    # over the C_PAD classes of one voxel (softmax), inside the register block.
    # K = coefs per class: 2 (Tversky), 3 (with CE), 4 (sigmoid focal, 2 CE columns).
    K: tl.constexpr = (4 if CE == 2 and ACTIVATION == 1 else 3) if CE != 0 else 2
    pid_n = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cls = tl.arange(0, C_PAD)
    cmask = cls < C
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    c64 = cls[:, None].to(tl.int64)
    x, p, g, keep, _, _ = _tile_terms(
        logits_ptr + b * logits_stride_b + c64 * logits_stride_c,
        target_ptr + b * target_stride_b,
        regions_ptr,
        cls,
        n,
        N,
        cmask[:, None],
        logits_stride_n,
        target_stride_c,
        target_stride_n,
        ignore_index,
        num_labels,
        CDTYPE,
        HAS_SOFT_TARGET,
        HAS_IGNORE_INDEX,
        BINARY_LABELS,
        HAS_REGIONS,
        ACTIVATION,
        True,
    )
    coefs = coefs_ptr + b * (K * C) + cls
    coef_a = tl.load(coefs, mask=cmask, other=0.0).to(CDTYPE)[:, None]
    coef_b = tl.load(coefs + C, mask=cmask, other=0.0).to(CDTYPE)[:, None]
    # u = dL/dp; zero on ignored voxels and padding, so they get exactly zero gradient.
    dx = _grad_logits(p, tl.where(keep, coef_a + coef_b * g, 0.0), ACTIVATION)
    if CE != 0:
        e = tl.load(coefs + 2 * C, mask=cmask, other=0.0).to(CDTYPE)[:, None]
        e2 = tl.load(coefs + (K - 1) * C, mask=cmask, other=0.0).to(CDTYPE)[:, None]
        q = _ce_target(g, keep, C, params_ptr, HAS_SMOOTHING)
        dx += _grad_ce(x, p, q, keep, cmask[:, None], e, e2, params_ptr, ACTIVATION, CE)
    tl.store(
        grad_ptr + b * grad_stride_b + c64 * grad_stride_c + n[None, :] * grad_stride_n,
        dx.to(grad_ptr.dtype.element_ty),
        mask=cmask[:, None] & (n < N)[None, :],
    )

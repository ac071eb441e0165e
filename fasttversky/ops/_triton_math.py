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
# Cross-entropy (HAS_CE, label maps only): one more per-(b, c) sum, sum_ce, in the same
# pass — softmax: -log p_y = log Σ_c exp(x_c - m) - (x_y - m) from the max and exp sum
# the softmax takes anyway, added to the row of the voxel's label; sigmoid: BCE(x, g) =
# max(x, 0) - x g + log(1 + exp(-|x|)) in every row. Its backward is one more term in the
# same elementwise pass, with e = dL/dsum_ce (coef_ce): softmax e_y (p_k - [k = y]),
# sigmoid e_c (p_c - g_c). With HAS_CE False the kernels compile exactly as before.
#
# Shape of the work: the forward is a reduction over a whole volume, so each program
# reduces one tile of one sample (all C classes at once, a (C_PAD, BLOCK_N) register
# block per step) into a per-tile partial [sum_pg, sum_p, sum_g] and a fixed-order
# finalize adds the partials in float64. No float atomics anywhere: the result depends
# only on the shapes and the launch configuration, never on scheduling, so repeated
# calls are bitwise equal. The backward is elementwise over voxels and recomputes p
# from the logits instead of saving it (saving p would cost a logits-sized buffer).
#
# Labels are read as integers and compared with the class index in registers; a one-hot
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
def _probs_ce(
    x,
    cls,
    cmask2,
    t_base,
    n,
    nmask,
    target_stride_n,
    ignore_index,
    ACTIVATION: tl.constexpr,
    HAS_IGNORE_INDEX: tl.constexpr,
    BINARY_LABELS: tl.constexpr,
):
    """(p, ce) from a (C_PAD, BLOCK_N) block of logits and the labels (HAS_CE).

    t_base: this sample's labels (target_ptr + b * target_stride_b).
    ce: (C_PAD, BLOCK_N), per element the voxel's cross-entropy in its label's row
    (softmax) or BCE(x_c, g_c) in every real row (sigmoid); 0 on ignored voxels, tail
    voxels and padded rows. The labels are re-read here (an L1 hit: _target_block reads
    the same bytes) so that the Tversky-only path keeps its exact shape.
    """
    lab = tl.load(t_base + n * target_stride_n, mask=nmask, other=0).to(tl.int64)
    if HAS_IGNORE_INDEX:
        keep1 = nmask & (lab != ignore_index)
    else:
        keep1 = nmask
    if BINARY_LABELS:
        hit = (lab == 1)[None, :] & cmask2
    else:
        hit = lab[None, :] == cls[:, None].to(tl.int64)
    keep = cmask2 & keep1[None, :]
    if ACTIVATION == 0:
        xm = tl.where(cmask2, x, float("-inf"))
        mx = tl.max(xm, axis=0)
        e = tl.exp(xm - mx[None, :])
        s = tl.sum(e, axis=0)
        p = e / s[None, :]
        # -log p_y = log s - (x_y - m) (s in [1, C]), in CE units
        xs = x * CE_SCALE - mx[None, :] * CE_SCALE
        ce = tl.where(keep & hit, tl.log(s)[None, :] * CE_SCALE - xs, 0.0)
    else:
        p = tl.where(cmask2, tl.sigmoid(x), 0.0)
        gy = tl.where(hit, 1.0, 0.0)
        xs = x * CE_SCALE  # BCE in CE units
        bce = tl.maximum(xs, 0.0) - xs * gy + tl.log(1.0 + tl.exp(-tl.abs(x))) * CE_SCALE
        ce = tl.where(keep, bce, 0.0)
    return p, ce


@triton.jit
def _target_block(
    t_base,
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
):
    """(g, keep, bad) for one tile; t_base: this sample's target (target_ptr + b * stride_b).

    g: (C_PAD, BLOCK_N) CDTYPE ground truth (0 on padding and ignored voxels);
    keep: (C_PAD, BLOCK_N) bool, the voxel counts (w = 1) and the class is real;
    bad: (C_PAD, BLOCK_N) int32, 1 per invalid target (labels outside [0, num_labels)
    other than ignore_index, counted once per voxel in row 0; soft values outside
    [0, 1] or NaN, counted per element).
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
        # target (B, N) integer labels of any width; widened to int64 so that every
        # value (negative, or beyond the int32 range) is compared exactly.
        lab = tl.load(t_base + n * target_stride_n, mask=nmask, other=0).to(tl.int64)
        if HAS_IGNORE_INDEX:
            keep1 = nmask & (lab != ignore_index)
        else:
            keep1 = nmask
        bad1 = keep1 & ((lab < 0) | (lab >= num_labels))
        bad = (bad1[None, :] & (cls == 0)[:, None]).to(tl.int32)
        keep = cmask2 & keep1[None, :]
        if BINARY_LABELS:
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
    cls,
    n,
    N,
    cmask2,
    logits_stride_n,
    target_stride_c,
    target_stride_n,
    ignore_index,
    num_labels,
    ACTIVATION: tl.constexpr,
    HAS_SOFT_TARGET: tl.constexpr,
    HAS_IGNORE_INDEX: tl.constexpr,
    BINARY_LABELS: tl.constexpr,
    CDTYPE: tl.constexpr,
    WITH_CE: tl.constexpr,
):
    """(p, ce, g, keep, bad, nonfinite) of the voxels n of one sample, all (C_PAD, BLOCK_N).

    What both kernels read per tile. x_base: (C_PAD, 1) pointers to the sample's class
    rows (logits_ptr + b * stride_b + c * stride_c); t_base: the sample's target. p, g,
    keep, bad as _probs / _target_block; ce as _probs_ce (WITH_CE; otherwise p, unused);
    nonfinite: 1 per NaN/inf logit. Tail voxels load 0 (a harmless finite value) and are
    masked out of every sum by keep.
    """
    nmask = n < N
    m2 = cmask2 & nmask[None, :]
    x = tl.load(x_base + n[None, :] * logits_stride_n, mask=m2, other=0.0).to(CDTYPE)
    nonfinite = (m2 & ~((x == x) & (tl.abs(x) != float("inf")))).to(tl.int32)
    if WITH_CE:
        p, ce = _probs_ce(
            x,
            cls,
            cmask2,
            t_base,
            n,
            nmask,
            target_stride_n,
            ignore_index,
            ACTIVATION,
            HAS_IGNORE_INDEX,
            BINARY_LABELS,
        )
    else:
        p = _probs(x, cmask2, ACTIVATION)
        ce = p
    g, keep, bad = _target_block(
        t_base,
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
    )
    return p, ce, g, keep, bad, nonfinite


@triton.jit
def _store_partials(out, acc_pg, acc_p, acc_g, acc_ce, C_PAD: tl.constexpr, HAS_CE: tl.constexpr):
    """Write one tile's per-class sums: out points at its row (NSTATS, C_PAD) of partials."""
    tl.store(out, tl.sum(acc_pg, axis=1))
    tl.store(out + C_PAD, tl.sum(acc_p, axis=1))
    tl.store(out + 2 * C_PAD, tl.sum(acc_g, axis=1))
    if HAS_CE:
        tl.store(out + 3 * C_PAD, tl.sum(acc_ce, axis=1))


@triton.jit
def _tversky_fwd_partials_kernel(
    logits_ptr,  # (B, C, N) float32/float16/bfloat16/float64, any strides
    target_ptr,  # (B, N) uint8/int16/int32/int64 labels, or (B, C, N) float soft target
    partials_ptr,  # (B, T, 3, C_PAD) CDTYPE out: per-tile [sum_pg, sum_p, sum_g]
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
    HAS_CE: tl.constexpr = False,  # also sum_ce; partials are then (B, T, 4, C_PAD)
):
    # grid = (T, B): program (t, b) reduces voxels [t*iters*BLOCK_N, (t+1)*iters*BLOCK_N)
    # of sample b. Batch on axis 1 (limit _base.MAX_GRID_BATCH), tiles on axis 0 (limit 2**31 - 1).
    pid_t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cls = tl.arange(0, C_PAD)
    cmask2 = (cls < C)[:, None]
    x_base = logits_ptr + b * logits_stride_b + cls[:, None].to(tl.int64) * logits_stride_c
    # Accumulate element-wise in registers across the steps and reduce over the voxel
    # axis once at the end: cheaper than a cross-lane reduction per step, and each lane
    # only adds `iters` values, which keeps fp32 rounding small before the fp64 finalize.
    acc_pg = tl.zeros((C_PAD, BLOCK_N), dtype=CDTYPE)
    acc_p = tl.zeros((C_PAD, BLOCK_N), dtype=CDTYPE)
    acc_g = tl.zeros((C_PAD, BLOCK_N), dtype=CDTYPE)
    acc_ce = tl.zeros((C_PAD, BLOCK_N), dtype=CDTYPE)  # stays 0 (compiled away) without CE
    n_nonfinite = tl.zeros((C_PAD, BLOCK_N), dtype=tl.int32)
    n_bad = tl.zeros((C_PAD, BLOCK_N), dtype=tl.int32)
    for i in range(iters):
        n = (pid_t * iters + i) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        p, ce, g, keep, bad, nonfinite = _tile_terms(
            x_base,
            target_ptr + b * target_stride_b,
            cls,
            n,
            N,
            cmask2,
            logits_stride_n,
            target_stride_c,
            target_stride_n,
            ignore_index,
            num_labels,
            ACTIVATION,
            HAS_SOFT_TARGET,
            HAS_IGNORE_INDEX,
            BINARY_LABELS,
            CDTYPE,
            HAS_CE,
        )
        n_nonfinite += nonfinite
        n_bad += bad
        if HAS_CE:
            acc_ce += ce
        pw = tl.where(keep, p, 0.0)  # not p * w: an ignored voxel adds exact zeros
        acc_pg += pw * g
        acc_p += pw
        acc_g += g
    NSTATS: tl.constexpr = 4 if HAS_CE else 3
    tile = b * T + pid_t
    out = partials_ptr + tile * (NSTATS * C_PAD) + cls
    _store_partials(out, acc_pg, acc_p, acc_g, acc_ce, C_PAD, HAS_CE)
    tl.store(counts_ptr + tile * 2, tl.sum(tl.sum(n_nonfinite, axis=1), axis=0))
    tl.store(counts_ptr + tile * 2 + 1, tl.sum(tl.sum(n_bad, axis=1), axis=0))


@triton.jit
def _tversky_finalize_kernel(
    partials_ptr,  # (B, T, 3, C_PAD) float32/float64 in
    counts_ptr,  # (B, T, 2) int32 in
    stats_ptr,  # (B, C, 3) float64 out: [sum_pg, sum_p, sum_g]
    flag_sums_ptr,  # (B, 2) int64 out: per-sample [non-finite logits, bad targets]
    C,
    T,
    C_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tiles summed per step, power of 2
    HAS_CE: tl.constexpr = False,  # partials (B, T, 4, C_PAD) -> stats (B, C, 4)
):
    # grid = (B,). One program adds the T tile partials of one sample in float64, in a
    # fixed order (fixed chunks of BLOCK_T, each reduced by the same tree): deterministic.
    b = tl.program_id(0).to(tl.int64)
    cls = tl.arange(0, C_PAD)
    tt = tl.arange(0, BLOCK_T)
    acc_pg = tl.zeros((BLOCK_T, C_PAD), dtype=tl.float64)
    acc_p = tl.zeros((BLOCK_T, C_PAD), dtype=tl.float64)
    acc_g = tl.zeros((BLOCK_T, C_PAD), dtype=tl.float64)
    if HAS_CE:
        acc_ce = tl.zeros((BLOCK_T, C_PAD), dtype=tl.float64)
    NSTATS: tl.constexpr = 4 if HAS_CE else 3
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
        if HAS_CE:
            acc_ce += tl.load(base + 3 * C_PAD, mask=m2, other=0.0).to(tl.float64)
        cnt_nf += tl.load(counts_ptr + tile * 2, mask=tmask, other=0).to(tl.int64)
        cnt_bad += tl.load(counts_ptr + tile * 2 + 1, mask=tmask, other=0).to(tl.int64)
    cmask = cls < C
    out = stats_ptr + (b * C + cls) * NSTATS
    tl.store(out, tl.sum(acc_pg, axis=0), mask=cmask)
    tl.store(out + 1, tl.sum(acc_p, axis=0), mask=cmask)
    tl.store(out + 2, tl.sum(acc_g, axis=0), mask=cmask)
    if HAS_CE:
        tl.store(out + 3, tl.sum(acc_ce, axis=0) * CE_UNIT, mask=cmask)
    tl.store(flag_sums_ptr + b * 2, tl.sum(cnt_nf, axis=0))
    tl.store(flag_sums_ptr + b * 2 + 1, tl.sum(cnt_bad, axis=0))


@triton.jit
def _grad_logits(p, u, g, keep, ce_c, ACTIVATION: tl.constexpr, HAS_CE: tl.constexpr):
    """dL/dlogits of one (C_PAD, BLOCK_N) tile: u = dL/dp (0 on ignored voxels and
    padding) chained through the activation, plus the cross-entropy's term with
    ce_c (C_PAD,) = dL/dsum_ce (HAS_CE)."""
    if ACTIVATION == 0:
        s = tl.sum(p * u, axis=0)
        dx = p * (u - s[None, :])
    elif ACTIVATION == 1:
        dx = u * p * (1.0 - p)
    else:
        dx = u
    if HAS_CE:
        if ACTIVATION == 0:
            # e_y (p_k - [k = y]); g is the one-hot of the label, 0 on ignored voxels
            ey = tl.sum(ce_c[:, None] * g, axis=0)
            dx += p * ey[None, :] - ce_c[:, None] * g
        else:
            dx += tl.where(keep, ce_c[:, None] * (p - g), 0.0)
    return dx


@triton.jit
def _tversky_bwd_kernel(
    logits_ptr,  # (B, C, N) float32/float16/bfloat16/float64, any strides
    target_ptr,  # (B, N) integer labels, or (B, C, N) float soft target
    coef_a_ptr,  # (B, C) contiguous CDTYPE: A = dL/dsum_p
    coef_b_ptr,  # (B, C) contiguous CDTYPE: B = dL/dsum_pg
    coef_ce_ptr,  # (B, C) contiguous CDTYPE: dL/dsum_ce, read only when HAS_CE
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
    HAS_CE: tl.constexpr = False,
):
    # grid = (cdiv(N, BLOCK_N), B). Purely elementwise over voxels; the only reduction is
    # over the C_PAD classes of one voxel (softmax), inside the register block.
    pid_n = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cls = tl.arange(0, C_PAD)
    cmask = cls < C
    cmask2 = cmask[:, None]
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    c64 = cls[:, None].to(tl.int64)
    p, _, g, keep, _, _ = _tile_terms(
        logits_ptr + b * logits_stride_b + c64 * logits_stride_c,
        target_ptr + b * target_stride_b,
        cls,
        n,
        N,
        cmask2,
        logits_stride_n,
        target_stride_c,
        target_stride_n,
        ignore_index,
        num_labels,
        ACTIVATION,
        HAS_SOFT_TARGET,
        HAS_IGNORE_INDEX,
        BINARY_LABELS,
        CDTYPE,
        False,
    )
    coef_a = tl.load(coef_a_ptr + b * C + cls, mask=cmask, other=0.0).to(CDTYPE)
    coef_b = tl.load(coef_b_ptr + b * C + cls, mask=cmask, other=0.0).to(CDTYPE)
    # u = dL/dp; zero on ignored voxels and padding, so they get exactly zero gradient.
    u = tl.where(keep, coef_a[:, None] + coef_b[:, None] * g, 0.0)
    if HAS_CE:
        ce_c = tl.load(coef_ce_ptr + b * C + cls, mask=cmask, other=0.0).to(CDTYPE)
    else:
        ce_c = coef_a  # not read without HAS_CE
    dx = _grad_logits(p, u, g, keep, ce_c, ACTIVATION, HAS_CE)
    tl.store(
        grad_ptr + b * grad_stride_b + c64 * grad_stride_c + n[None, :] * grad_stride_n,
        dx.to(grad_ptr.dtype.element_ty),
        mask=cmask2 & (n < N)[None, :],
    )

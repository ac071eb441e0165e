// fasttversky CPU kernels: fused Tversky forward statistics and backward, vectorised and
// multithreaded. The math (sums, Eq. 5, chain rule) is derived in ../tversky.h.
//
// Layout of the work: the voxels of each sample are cut into fixed CHUNKs; a work item
// is one (sample, chunk). Within a chunk, TILEs of voxels are loaded into small
// class-major float arrays [c][lane] so that every inner loop runs over contiguous
// lanes and gcc vectorises it (AVX2/AVX-512 with -march=native); the activation is
// computed in those registers/arrays and nothing voxel-sized is ever written in the
// forward. Each work item writes its own partial sums into a slot, and the slots are
// added in a fixed order at the end: the result does not depend on the number of
// threads or on which thread ran which item, so it is bitwise reproducible and free of
// atomics.
//
// This round's terms (fasttversky/_spec.py: soft-target CE, focal CE, region tables, label
// maps of float16/bfloat16/float64) run on the "terms paths" near the end of this file;
// float32 label maps take the integer label maps' paths, and so does label smoothing on
// those maps (without focal CE).
//
// Compute precision: float32 for float32/float16/bfloat16 logits (per-lane float
// accumulators over one chunk, then float64 across lanes and chunks), float64 for
// float64 logits (so the float64 path matches the reference to ~1e-15).
#include "../tversky.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <type_traits>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace {

constexpr int TILE = 64;        // voxels per inner tile (lanes)
constexpr int PREFETCH_TILES = 4;  // how far ahead load_logits prefetches the class rows
constexpr int64_t CHUNK = 16384;  // voxels per work item; fixed => deterministic sums
// Classes a tile holds. Every per-class array of a work item is [MAX_C][TILE], on the
// worker's stack (at most 8 such arrays: 512 KiB in float64); only the call's C rows are
// touched, so the two-class paths run as with a small MAX_C, and at C = 128 a tile's rows
// (32 KiB per array in float32) stay in L2. Larger C goes to the torch backend (ops/cpu.py).
constexpr int MAX_C = 128;

// Lanes of a tile whose accumulators the fused two-class forward holds in registers at
// once (ForwardItem::block). With AVX-512's 32 zmm registers: two vectors,
// so the ten accumulators fit beside the exp's constants. Elsewhere (16 registers) the
// whole tile, i.e. the plain tile-by-tile loop: measured here, narrower groups made gcc
// emit loops 2x (AVX2, baseline) and 1.5x (AVX-512, one vector) slower. Only the loop
// order depends on it, not the result: each lane sums the same voxels in the same order.
#if defined(__AVX512F__)
template <typename F>
constexpr int LANE_GROUP = 128 / (int)sizeof(F);
#else
template <typename F>
constexpr int LANE_GROUP = TILE;
#endif
static_assert(TILE % LANE_GROUP<float> == 0 && TILE % LANE_GROUP<double> == 0);

struct bf16 {
  uint16_t bits;
};
using f16 = _Float16;

// ---- storage <-> compute conversions --------------------------------------------------
template <typename F>
inline F to_compute(float v) { return (F)v; }

inline float load_val(const float* p) { return *p; }
inline double load_val(const double* p) { return *p; }
inline float load_val(const f16* p) { return (float)*p; }
inline float load_val(const bf16* p) {
  uint32_t u = (uint32_t)p->bits << 16;
  return __builtin_bit_cast(float, u);
}
inline int64_t load_label(const uint8_t* p) { return *p; }
inline int64_t load_label(const int16_t* p) { return *p; }
inline int64_t load_label(const int32_t* p) { return *p; }
inline int64_t load_label(const int64_t* p) { return *p; }

inline void store_val(float* p, float v) { *p = v; }
inline void store_val(double* p, double v) { *p = v; }
inline void store_val(f16* p, float v) { *p = (f16)v; }
inline void store_val(bf16* p, float v) {
  // round to nearest even; a NaN (FASTTVERSKY_CHECK_INPUTS=0 lets them through) is
  // truncated and kept quiet instead, since rounding could carry its payload into inf/0
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  p->bits = (uint16_t)(v == v ? rounded >> 16 : (u >> 16) | 0x40u);
}

// Row copies between storage and the tile arrays. The __restrict qualifiers tell gcc the
// user's tensor cannot alias the tile, which it needs in order to vectorise these loops.
template <typename LT, typename F>
inline void load_row(const LT* __restrict src, int64_t stride, int n, F* __restrict dst) {
  if (stride == 1) {
#pragma GCC ivdep
    for (int i = 0; i < n; ++i) dst[i] = (F)load_val(src + i);
  } else {
#pragma GCC ivdep
    for (int i = 0; i < n; ++i) dst[i] = (F)load_val(src + i * stride);
  }
  for (int i = n; i < TILE; ++i) dst[i] = (F)0;
}

// Gradient rows of float32 logits bypass the caches (non-temporal stores) when the whole
// gradient is larger than this: it cannot stay in cache until autograd reads it, and a
// normal store first reads each line it writes. Measured on the many-class backward
// (bench/results/many_classes_cpu.md); a small gradient keeps normal stores, so that its
// consumer finds it in cache.
constexpr int64_t STREAM_MIN_BYTES = 4 << 20;

// A full tile row of float32 values to a 64-byte aligned destination with non-temporal
// stores; false where that is not possible (then the caller stores normally). The work
// item ends with a store fence (stream_fence), as such stores are weakly ordered.
template <typename LT, typename F>
__attribute__((always_inline)) inline bool stream_row(const F* __restrict src, LT* __restrict dst) {
  if constexpr (std::is_same_v<LT, float> && std::is_same_v<F, float>) {
    if (((uintptr_t)dst & 63) != 0) return false;
#if defined(__AVX512F__)
    for (int i = 0; i < TILE; i += 16) _mm512_stream_ps(dst + i, _mm512_load_ps(src + i));
    return true;
#elif defined(__AVX__)
    for (int i = 0; i < TILE; i += 8) _mm256_stream_ps(dst + i, _mm256_load_ps(src + i));
    return true;
#endif
  }
  return false;
}

inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

template <typename LT, typename F>
inline void store_row(const F* __restrict src, int n, LT* __restrict dst, int64_t stride,
                      bool stream = false) {
  if (stream && stride == 1 && n == TILE && stream_row(src, dst)) return;
  if (stride == 1) {
#pragma GCC ivdep
    for (int i = 0; i < n; ++i) store_val(dst + i, src[i]);
  } else {
#pragma GCC ivdep
    for (int i = 0; i < n; ++i) store_val(dst + i * stride, src[i]);
  }
}

template <typename T>
struct compute_of {
  using type = float;
};
template <>
struct compute_of<double> {
  using type = double;
};

// ---- exp ---------------------------------------------------------------------------------
// fma and round-to-nearest as single instructions where the target has them. The
// baseline x86-64 build (no FMA, no SSE4.1; see fasttversky/ops/_cpu_build.py) would
// otherwise call libm's fmaf/rintf once per lane, unvectorised: 50x slower.
#if defined(__x86_64__) || defined(__i386__)
#define TV_X86 1
#else
#define TV_X86 0
#endif
inline float fmadd(float a, float b, float c) {
#if defined(__FMA__) || !TV_X86
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;  // rounds twice: still within fast_exp's few ulp
#endif
}
inline float round_nearest(float v) {
#if defined(__SSE4_1__) || !TV_X86
  return __builtin_rintf(v);
#else
  // |v| < 2^22 here: adding and subtracting 1.5 * 2^23 rounds to an integer (to even)
  constexpr float magic = 12582912.0f;
  return (v + magic) - magic;
#endif
}

// libm's expf does not vectorise; this one does (range reduction to 2^n·e^r with
// |r| <= ln2/2, degree-6 polynomial, 2^n built in the exponent bits): ~2 ulp, far
// below the float32 tolerance of a loss summed over millions of voxels. Always inlined:
// in a large work item gcc's inliner may otherwise leave it a call, and the voxel loop
// around it scalar.
__attribute__((always_inline)) inline float fast_exp(float x) {
  // Written as selects (not std::min/max) so they compile to single vmaxps/vminps, in
  // the order that lets a NaN through (x86 max/min return their second operand when
  // either is NaN): exp(NaN) must be NaN, or NaN logits become a finite loss.
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = round_nearest(x * 1.44269504088896341f);
  float r = fmadd(n, -0.693359375f, x);
  r = fmadd(n, 2.12194440e-4f, r);
  float y = 1.9875691500e-4f;
  y = fmadd(y, r, 1.3981999507e-3f);
  y = fmadd(y, r, 8.3334519073e-3f);
  y = fmadd(y, r, 4.1665795894e-2f);
  y = fmadd(y, r, 1.6666665459e-1f);
  y = fmadd(y, r, 5.0000001201e-1f);
  y = fmadd(y * r, r, r) + 1.0f;
  const int32_t e = ((int32_t)n + 127) << 23;
  return y * __builtin_bit_cast(float, e);
}
inline double fast_exp(double x) { return std::exp(x); }

// log of a positive, normal float, vectorisable like fast_exp (libm's logf is not):
// x = 2^k · m with m in [sqrt(1/2), sqrt(2)), log m = f - f²/2 + f³·P(f), f = m - 1,
// P a degree-8 minimax polynomial (Cephes' logf coefficients), k·ln2 split in two
// parts. ~1 ulp. Used for the cross-entropy's log-sum-exp, where x = Σ exp(x_c - m)
// lies in [1, C].
__attribute__((always_inline)) inline float fast_log(float x) {
  const int32_t bits = __builtin_bit_cast(int32_t, x);
  int32_t k = ((bits >> 23) & 0xff) - 126;                                      // m in [0.5, 1)
  float m = __builtin_bit_cast(float, (bits & 0x007fffff) | 0x3f000000);
  const bool small = m < 0.70710678118654752f;
  k = small ? k - 1 : k;
  const float f = small ? m + m - 1.0f : m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = fmadd(y, f, -1.1514610310e-1f);
  y = fmadd(y, f, 1.1676998740e-1f);
  y = fmadd(y, f, -1.2420140846e-1f);
  y = fmadd(y, f, 1.4249322787e-1f);
  y = fmadd(y, f, -1.6668057665e-1f);
  y = fmadd(y, f, 2.0000714765e-1f);
  y = fmadd(y, f, -2.4999993993e-1f);
  y = fmadd(y, f, 3.3333331174e-1f);
  y = y * f * z;
  const float kf = (float)k;
  y = fmadd(kf, -2.12194440e-4f, y);
  y = fmadd(z, -0.5f, y);
  return fmadd(kf, 0.693359375f, f + y);
}
inline double fast_log(double x) { return std::log(x); }

// log(1 + e) for e in [0, 1] without losing e when 1 + e rounds (Goldberg's trick:
// log(u) · e / (u - 1) with u = 1 + e is exact to a few ulp; u == 1 means log1p(e) = e).
__attribute__((always_inline)) inline float log1p_small(float e) {
  const float u = 1.0f + e;
  const float d = u - 1.0f;
  // both sides computed, then a select: a branch here would stop gcc vectorising
  const bool exact = d == 0.0f;
  const float q = fast_log(u) * (e / (exact ? 1.0f : d));
  return exact ? e : q;
}
inline double log1p_small(double e) { return std::log1p(e); }

// log(1 + e) for e in [0, 1] (the two-class softmax's e = exp(-|x1 - x0|)) as e · P(e), P
// a degree-8 polynomial fitted to log1p(e) / e on [0, 1] (weighted least squares towards
// minimax): ~3 ulp relative, e small included, in a third of the instructions of
// log1p_small (fast_log's exponent handling and a division). The focal CE needs one per
// voxel in both passes, where the plain CE's products avoid it.
__attribute__((always_inline)) inline float log1p_unit(float e) {
  float y = 5.3839255124e-03f;
  y = fmadd(y, e, -3.0110426247e-02f);
  y = fmadd(y, e, 7.9209871590e-02f);
  y = fmadd(y, e, -1.3746549189e-01f);
  y = fmadd(y, e, 1.9145083427e-01f);
  y = fmadd(y, e, -2.4852937460e-01f);
  y = fmadd(y, e, 3.3320343494e-01f);
  y = fmadd(y, e, -4.9999552965e-01f);
  y = fmadd(y, e, 1.0f);
  return y * e;
}
inline double log1p_unit(double e) { return std::log1p(e); }

// exp(x) that is exactly 0 below fast_exp's clamp (e^-87), where a focal factor must
// vanish: it multiplies terms that may be as large as the logits.
template <typename F>
__attribute__((always_inline)) inline F exp_or_zero(F x) {
  const F e = fast_exp(x);
  return x < (F)-87 ? (F)0 : e;
}

// omp^γ for omp = 1 - p in [0, 1], with 0^0 = 1 (MONAI's softmax focal factor): log 0 is
// taken as -FLT_MAX, so that γ > 0 gives exp(-huge) = 0 and γ = 0 gives exp(-0) = 1
// without a select on γ (a loop-invariant condition that gcc may leave as a branch, and
// then not vectorise). SQ: γ = 2 (MONAI's default), a square instead of an exp and a log.
// Always inlined: a call per lane would stop gcc vectorising the loops around it.
template <bool SQ, typename F>
__attribute__((always_inline)) inline F pow_focal(F omp, F gamma) {
  if constexpr (SQ) return omp * omp;
  constexpr F log0 = -std::numeric_limits<F>::max();
  const F l = fast_log(omp > (F)0 ? omp : (F)1);
  return exp_or_zero(gamma * (omp > (F)0 ? l : log0));
}

// The cross-entropy is summed in units of CE_UNIT: each term is multiplied by
// ce_scale<F> = 1 / CE_UNIT as it is formed, and the item's float64 sum by CE_UNIT. A
// voxel's CE can exceed float32's range while the loss does not (logits near +-3e38: the
// gap between two classes, up to 2 x FLT_MAX); in these units a term, and a lane's sum
// over a chunk (CHUNK / TILE = 256 voxels), fits. The logits are scaled before their
// difference is taken, so that the difference cannot overflow. Scaling by a power of two
// is exact, so every sum rounds exactly as the unscaled one did (only terms below
// 2^-116, subnormal once scaled, lose bits).
constexpr double CE_UNIT = 0x1p10;
template <typename F>
constexpr F ce_scale = (F)0x1p-10;

template <typename F>
inline bool not_finite(F x) {
  // x - x is 0 for finite x and NaN for NaN/inf; written without isfinite so that it
  // vectorises and survives any future -ffinite-math-only.
  return !((x - x) == (F)0);
}

// ---- one tile: logits -> probabilities --------------------------------------------------
// x[c][i] holds logits on entry and probabilities on exit (lanes >= n hold 0 logits and
// are masked out by the caller through w).
template <typename F, typename LT>
__attribute__((always_inline)) inline int64_t load_logits(const TverskyParams& P, int64_t b,
                                                           int64_t n0, int n,
                                                           F (*__restrict x)[TILE]) {
  const LT* base = (const LT*)P.logits_ptr + b * P.logits_stride_b;
  const int64_t C = P.C, sc = P.logits_stride_c, sn = P.logits_stride_n;
  int64_t nonfinite = 0;
  // The C rows of a tile are C separate streams (one per class plane) of TILE values
  // each, more than the hardware prefetchers follow: ask for the lines PREFETCH_TILES
  // tiles ahead (measured: bench/results/many_classes_cpu.md).
  if (sn == 1)
    for (int64_t c = 0; c < C; ++c)
      for (int l = 0; l < (int)(TILE * sizeof(LT)); l += 64)
        __builtin_prefetch((const char*)(base + c * sc + n0 + PREFETCH_TILES * TILE) + l, 0, 3);
  for (int64_t c = 0; c < C; ++c) {
    load_row(base + c * sc + n0 * sn, sn, n, x[c]);
    int bad = 0;
    for (int i = 0; i < TILE; ++i) bad += not_finite(x[c][i]);
    nonfinite += bad;
  }
  return nonfinite;
}

// Two-class softmax with one exp: p_hi = 1/(1+e), p_lo = e/(1+e), e = exp(-|x1-x0|).
// Computing the smaller probability as e/(1+e) (not 1 - p_hi) keeps its relative
// precision when the network is confident, which is most voxels of a trained model.
template <typename F>
__attribute__((always_inline)) inline void softmax2(F x0, F x1, F& p0, F& p1, F& e, F& r) {
  const F d = x1 - x0;
  e = fast_exp(-std::abs(d));
  r = (F)1 / ((F)1 + e);
  const F lo = e * r;
  p1 = d >= (F)0 ? r : lo;
  p0 = d >= (F)0 ? lo : r;
}

// A +inf logit makes a two-class softmax NaN (inf - inf, as in torch), but the one-exp
// form above sees only x1 - x0 and would give finite probabilities. This happens only
// with the input check off, and the tile's non-finite count already says so, so the
// per-voxel loop pays nothing: the tile is patched afterwards, setting sum_p of both
// classes to NaN. (NaN logits need no patch: fast_exp keeps them NaN.) x(c, i) reads
// class c of lane i; backward needs none of this, its coefficients are NaN by then.
template <typename F, typename X>
void poison_softmax2_inf(int n, X x, F (*__restrict acc_p)[TILE]) {
  constexpr F inf = std::numeric_limits<F>::infinity();
  constexpr F nan = std::numeric_limits<F>::quiet_NaN();
  for (int i = 0; i < n; ++i)
    if (!(x(0, i) < inf && x(1, i) < inf)) acc_p[0][i] = acc_p[1][i] = nan;
}

template <typename F, typename LT>
__attribute__((always_inline)) inline int64_t load_probs(const TverskyParams& P, int64_t b,
                                                          int64_t n0, int n,
                                                          F (*__restrict x)[TILE]) {
  const int64_t C = P.C;
  const int64_t nonfinite = load_logits<F, LT>(P, b, n0, n, x);
  if (P.activation == TV_SOFTMAX) {
    F m[TILE], s[TILE];
    for (int i = 0; i < TILE; ++i) m[i] = x[0][i];
    for (int64_t c = 1; c < C; ++c)
      for (int i = 0; i < TILE; ++i) m[i] = std::max(m[i], x[c][i]);
    for (int i = 0; i < TILE; ++i) s[i] = (F)0;
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < TILE; ++i) {
        x[c][i] = fast_exp(x[c][i] - m[i]);
        s[i] += x[c][i];
      }
    for (int i = 0; i < TILE; ++i) s[i] = (F)1 / s[i];
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < TILE; ++i) x[c][i] *= s[i];
  } else if (P.activation == TV_SIGMOID) {
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < TILE; ++i) x[c][i] = (F)1 / ((F)1 + fast_exp(-x[c][i]));
  }
  return nonfinite;
}

// ---- one tile: target -> labels / soft g and the voxel mask w -----------------------------
// Label maps: y[i] is the class the voxel belongs to (or -1 on ignored / padded lanes,
// which matches no class), w[i] in {0,1}. Returns the number of bad labels. Labels are
// compared as int32 (int64 only for int64 label maps) so the loop vectorises; the
// branch-free body matters: this loop runs once per voxel in both passes.
// Float label maps (nnU-Net's and MONAI's, spec.float_labels) are compared as int32 too.
template <typename TT>
using label_int_t = std::conditional_t<std::is_same_v<TT, int64_t>, int64_t, int32_t>;

// A label as the integer the loops compare. A float label map's value (read directly, no
// conversion pass) is itself when it is an integer in int32's range; anything else (NaN,
// inf, a fraction, beyond int32) becomes INT32_MIN, which is out of range and never the
// ignore_index (IgnoreLabel), so it is counted as a bad target like a label out of range.
// Written as selects and bit masks around one truncating conversion, so that it
// vectorises inside the callers' loops (a select on the final compare made gcc give up
// on the fused two-class loop: 4x slower); the clamp keeps the conversion defined (NaN
// fails both compares and lands on the lower bound).
template <typename TT>
__attribute__((always_inline)) inline label_int_t<TT> to_label(TT raw) {
  if constexpr (std::is_integral_v<TT>) {
    return (label_int_t<TT>)raw;
  } else {
    using V = std::conditional_t<std::is_same_v<TT, double>, double, float>;
    const V v = load_val(&raw);
    constexpr V lo = (V)-2147483648.0;
    constexpr V hi = std::is_same_v<V, double> ? (V)2147483647.0 : (V)2147483520.0;
    V c = v > lo ? v : lo;
    c = c < hi ? c : hi;
    const int32_t i = (int32_t)c;
    const uint32_t not_integral = -(uint32_t)((V)i != v);  // all ones or 0
    return (int32_t)(((uint32_t)i & ~not_integral) | (0x80000000u & not_integral));
  }
}

// ignore_index as a label value of type TT: {matches at all, value}. One outside TT's
// range can never match (e.g. -100 with uint8 labels; float labels: int32's range, as
// to_label reads them). Soft targets have none.
template <typename TT>
struct IgnoreLabel {
  bool active = false;
  label_int_t<TT> value = 0;
  explicit IgnoreLabel(const TverskyParams& P) {
    using Range = std::conditional_t<std::is_integral_v<TT>, TT, int32_t>;
    // float labels: INT32_MIN is to_label's "not a label", never ignored
    const int64_t lo = (int64_t)std::numeric_limits<Range>::min() + !std::is_integral_v<TT>;
    active = P.has_ignore_index && P.ignore_index >= lo &&
             P.ignore_index <= (int64_t)std::numeric_limits<Range>::max();
    value = active ? (label_int_t<TT>)P.ignore_index : 0;
  }
};

template <typename TT>
inline int64_t load_labels(const TverskyParams& P, int64_t b, int64_t n0, int n,
                           int32_t* __restrict y, float* __restrict w) {
  using L = label_int_t<TT>;
  const TT* base = (const TT*)P.target_ptr + b * P.target_stride_b;
  const int64_t sn = P.target_stride_n;
  const IgnoreLabel<TT> ignore(P);
  const bool has_ii = ignore.active;
  const L ii = ignore.value;
  const L num_labels = (L)P.num_labels;
  const bool binary = P.binary_labels;
  alignas(64) L v[TILE];
  if (sn == 1) {
    const TT* r = base + n0;
    for (int i = 0; i < n; ++i) v[i] = to_label(r[i]);
  } else {
    for (int i = 0; i < n; ++i) v[i] = to_label(base[(n0 + i) * sn]);
  }
  int32_t bad = 0;
  for (int i = 0; i < n; ++i) {
    const L vi = v[i];
    const bool keep = !(has_ii & (vi == ii));
    bad += keep & ((vi < 0) | (vi >= num_labels));
    // C == 1: the single channel is the foreground, so label 1 maps to "class 0".
    const L cls = binary ? (vi == 1 ? (L)0 : (L)-1) : vi;
    y[i] = keep ? (int32_t)cls : -1;
    w[i] = keep ? 1.f : 0.f;
  }
  for (int i = n; i < TILE; ++i) {
    y[i] = -1;
    w[i] = 0.f;
  }
  return bad;
}

template <typename F, typename TT>
inline int64_t load_soft(const TverskyParams& P, int64_t b, int64_t n0, int n,
                         F (*g)[TILE]) {
  const TT* base = (const TT*)P.target_ptr + b * P.target_stride_b;
  const int64_t sc = P.target_stride_c, sn = P.target_stride_n;
  int64_t bad = 0;
  for (int64_t c = 0; c < P.C; ++c) {
    load_row(base + c * sc + n0 * sn, sn, n, g[c]);
    int nb = 0;
    for (int i = 0; i < TILE; ++i) nb += !(g[c][i] >= (F)0 && g[c][i] <= (F)1);
    bad += nb;
  }
  return bad;
}

// ---- thread pool for one call ---------------------------------------------------------------
template <typename Fn>
void parallel_items(int64_t n_items, int num_threads, Fn&& fn) {
  const int T = (int)std::max<int64_t>(1, std::min<int64_t>(num_threads, n_items));
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    for (int64_t k; (k = next.fetch_add(1)) < n_items;) fn(k);
  };
  std::vector<std::thread> threads;
  threads.reserve(T - 1);
  for (int t = 1; t < T; ++t) threads.emplace_back(worker);
  worker();
  for (auto& th : threads) th.join();
}

// ---- cross-entropy of one tile (general path) --------------------------------------------
// x[c][i]: logits on entry, probabilities on exit (as load_probs); y, w from load_labels.
// Softmax comes here only with label smoothing (the plain softmax CE is fused into
// ForwardItem::tile_softmax). Adds each lane's CE to acc_ce: softmax -log p_y = log s -
// (x_y - m) into class y's row (from the same max m and exp sum s the softmax needs: one
// log per voxel); sigmoid
// BCE(x_c, g_c) = max(x, 0) - x g + log1p(e), e = exp(-|x|), into every class's row, with
// p = 1/(1+e) or e/(1+e) from the same exp. Ignored and padded lanes (w = 0, y = -1) add 0.
// Label smoothing (softmax) needs -log p_c of every class, not only of y:
// -log p_c = log s - (x_c - m), so it adds the two parts it needs, Σ w log s (one row)
// and Σ w (m - x_c) (one row per class), and ForwardItem::finish forms the columns.
template <typename F>
struct SmoothSums {
  F (*__restrict per_class)[TILE];  // Σ w (m - x_c), CE units
  F* __restrict log_s;              // Σ w log s, CE units
};

template <typename F, typename LT>
__attribute__((always_inline)) inline int64_t load_probs_ce(const TverskyParams& P, int64_t b,
                                                             int64_t n0, int n,
                                                             F (*__restrict x)[TILE],
                                                             const int32_t* __restrict y,
                                                             const float* __restrict w,
                                                             F (*__restrict acc_ce)[TILE],
                                                             const SmoothSums<F>& sm) {
  const int64_t C = P.C;
  const int64_t nonfinite = load_logits<F, LT>(P, b, n0, n, x);
  if (P.activation == TV_SOFTMAX) {
    F m[TILE], s[TILE], xy[TILE];
    for (int i = 0; i < TILE; ++i) m[i] = x[0][i];
    for (int64_t c = 1; c < C; ++c)
      for (int i = 0; i < TILE; ++i) m[i] = std::max(m[i], x[c][i]);
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < TILE; ++i)
        sm.per_class[c][i] += w[i] != 0.f ? m[i] * ce_scale<F> - x[c][i] * ce_scale<F> : (F)0;
    for (int i = 0; i < TILE; ++i) s[i] = xy[i] = (F)0;
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < TILE; ++i) {
        xy[i] += y[i] == (int32_t)c ? x[c][i] * ce_scale<F> - m[i] * ce_scale<F> : (F)0;
        x[c][i] = fast_exp(x[c][i] - m[i]);
        s[i] += x[c][i];
      }
    for (int i = 0; i < TILE; ++i) {
      const F ls = w[i] != 0.f ? fast_log(s[i]) * ce_scale<F> : (F)0;
      sm.log_s[i] += ls;
      xy[i] = ls - xy[i];  // xy is 0 on ignored lanes (y = -1)
      s[i] = (F)1 / s[i];
    }
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < TILE; ++i) {
        x[c][i] *= s[i];
        acc_ce[c][i] += y[i] == (int32_t)c ? xy[i] : (F)0;
      }
  } else {
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < TILE; ++i) {
        const F v = x[c][i];
        const F e = fast_exp(-std::abs(v));
        const F r = (F)1 / ((F)1 + e);
        const F g = y[i] == (int32_t)c ? (F)1 : (F)0;
        const F vs = v * ce_scale<F>;  // BCE in CE units (see ce_scale)
        const F bce = std::max(vs, (F)0) - vs * g + log1p_small(e) * ce_scale<F>;
        acc_ce[c][i] += (F)w[i] * bce;
        x[c][i] = v >= (F)0 ? r : e * r;
      }
  }
  return nonfinite;
}

// ---- softmax focal CE of one tile (general path) -----------------------------------------
// Label maps without smoothing (needs_terms): only class y has q != 0, so y's row gets
// (1 - p_y)^γ (-log p_y), -log p_y as in load_probs_ce. 1 - p_y is summed from the other
// classes' exps (so), exact where p_y rounds to 1. x: logits in, probabilities out; SQ: γ = 2.
template <bool SQ, typename F, typename LT>
__attribute__((always_inline)) inline int64_t load_probs_focal(
    const TverskyParams& P, int64_t b, int64_t n0, int n, F (*__restrict x)[TILE],
    const int32_t* __restrict y, const float* __restrict w, F (*__restrict acc_ce)[TILE],
    F gamma) {
  const int64_t C = P.C;
  const int64_t nonfinite = load_logits<F, LT>(P, b, n0, n, x);
  alignas(64) F m[TILE], s[TILE], so[TILE], xy[TILE];
  for (int i = 0; i < TILE; ++i) m[i] = x[0][i];
  for (int64_t c = 1; c < C; ++c)
    for (int i = 0; i < TILE; ++i) m[i] = std::max(m[i], x[c][i]);
  for (int i = 0; i < TILE; ++i) s[i] = so[i] = xy[i] = (F)0;
  for (int64_t c = 0; c < C; ++c)
    for (int i = 0; i < TILE; ++i) {
      const bool is_y = y[i] == (int32_t)c;
      xy[i] += is_y ? x[c][i] * ce_scale<F> - m[i] * ce_scale<F> : (F)0;
      x[c][i] = fast_exp(x[c][i] - m[i]);
      s[i] += x[c][i];
      so[i] += is_y ? (F)0 : x[c][i];
    }
  for (int i = 0; i < TILE; ++i) {
    const F r = (F)1 / s[i];
    const F lce = w[i] != 0.f ? fast_log(s[i]) * ce_scale<F> - xy[i] : (F)0;
    xy[i] = pow_focal<SQ>(so[i] * r, gamma) * lce;  // ignored lanes: lce = 0
    s[i] = r;
  }
  for (int64_t c = 0; c < C; ++c)
    for (int i = 0; i < TILE; ++i) {
      x[c][i] *= s[i];
      acc_ce[c][i] += y[i] == (int32_t)c ? xy[i] : (F)0;
    }
  return nonfinite;
}

// ---- the CE of the fused two-class softmax paths -------------------------------------------
// Which CE a block of the fused two-class paths computes: a compile-time variant, so that
// each loop holds only its own arithmetic. Focal CE takes these paths with a hard label
// and no smoothing (needs_terms); γ = 2 (MONAI's default) squares instead of an exp.
enum TwoClassCE { CE2_PLAIN = 0, CE2_SMOOTH = 1, CE2_FOCAL_SQ = 2, CE2_FOCAL = 3 };
template <int M>
using CE2 = std::integral_constant<int, M>;

// Calls fn(CE2<mode>{}) with the call's TwoClassCE: a branch per tile or block, outside
// the voxel loops. Only CE items (CE = true) instantiate more than CE2_PLAIN.
template <bool CE, class Fn>
__attribute__((always_inline)) inline void with_two_class_ce(bool smooth, bool focal,
                                                             bool focal_sq, Fn&& fn) {
  if constexpr (CE) {
    if (focal && focal_sq)
      fn(CE2<CE2_FOCAL_SQ>{});
    else if (focal)
      fn(CE2<CE2_FOCAL>{});
    else if (smooth)
      fn(CE2<CE2_SMOOTH>{});
    else
      fn(CE2<CE2_PLAIN>{});
  } else {
    fn(CE2<CE2_PLAIN>{});
  }
}

// (1 - p_y)^γ from p_o = 1 - p_y (the other class's p, exact where p_y rounds to 1) or,
// for a general γ, from nlpo = -log p_o in CE units: exp(-γ nlpo), capped so that γ = 0
// gives 0^0 = 1 where nlpo exceeds float's range (extreme logits).
template <bool SQ, typename F>
__attribute__((always_inline)) inline F focal_factor2(F po, F nlpo, F gamma) {
  if constexpr (SQ) return po * po;
  constexpr F big = std::numeric_limits<F>::max();
  const F t = nlpo * (F)CE_UNIT;
  return exp_or_zero(-gamma * (t < big ? t : big));
}

// The focal CE of one voxel into the per-lane sums ce0, ce1 (CE units): with -log p_c =
// l + d_c (l = log(1 + e); d0 = max(d, 0), d1 = max(-d, 0), d = x1 - x0 in CE units), the
// column of y gets (1 - p_y)^γ (-log p_y). g0, g1: the label, 0 on ignored voxels.
template <bool SQ, typename F>
__attribute__((always_inline)) inline void focal_ce2(F d, F e, F p0, F p1, F g0, F g1,
                                                     F gamma, F& ce0, F& ce1) {
  const F d0 = std::max(d, (F)0), d1 = std::max(-d, (F)0);
  const F l = log1p_unit(e) * ce_scale<F>;
  const bool y1 = g1 != (F)0;
  const F f = focal_factor2<SQ>(y1 ? p0 : p1, l + (y1 ? d0 : d1), gamma);
  ce0 += g0 * f * (l + d0);
  ce1 += g1 * f * (l + d1);
}

// dL/dz1 (= -dL/dz0) of the focal CE of one voxel with label y in {0, 1} (else 0): only
// a_y is non-zero (_spec.py) and dz_k += a_y ([k = y] - p_k), so dz1 = ±a_y p_o (+ for
// y = 1), a_y p_o = e_y (1 - p_y)^γ (γ p_y log p_y - p_o). p_y log p_y is formed from
// -log p_y in CE units (|d| may exceed float's range), then scaled: it lies in [-1/e, 0].
template <bool SQ, typename F>
__attribute__((always_inline)) inline F focal_ce2_grad(F d, F e, F p0, F p1, bool y0,
                                                       bool y1, F e0, F e1, F gamma) {
  const F d0 = std::max(d, (F)0), d1 = std::max(-d, (F)0);
  const F l = log1p_unit(e) * ce_scale<F>;
  const F py = y1 ? p1 : p0, po = y1 ? p0 : p1;
  const F f = focal_factor2<SQ>(po, l + (y1 ? d0 : d1), gamma);
  const F plp = -(py * (l + (y1 ? d1 : d0))) * (F)CE_UNIT;
  const F ey = y1 ? e1 : (y0 ? e0 : (F)0);
  const F apo = ey * f * (gamma * plp - po);
  return y1 ? apo : -apo;
}

// ---- forward ------------------------------------------------------------------------------
// One work item of the forward: sample b, voxels [start, stop) (one CHUNK). It holds the
// per-lane accumulators and runs, tile by tile, the path the inputs call for:
//   blocked_two_class  two-class softmax label maps, planar or interleaved, full tiles
//   tile_soft          soft targets (any activation)
//   tile_two_class     two-class softmax on a tail or strided tile
//   tile_general       everything else (any C, softmax/sigmoid/none, with or without CE)
// Each lane sums its voxels in voxel order whichever path ran, so the sums depend only on
// the shape. The methods are always inlined into the work item's loop: the accumulators
// stay a local object whose address never escapes, as gcc needs to vectorise.
//
// Label smoothing (softmax CE, ε > 0): the CE target q_c = (1 - ε) g_c + ε / C gives
// column c = (1 - ε) Σ_{y = c} (-log p_c) + (ε / C) Σ_kept (-log p_c). The first sum is the
// plain CE's; the second is formed at finish() from a few more per-lane sums (acc_sm,
// acc_lse), each of non-negative terms, so nothing cancels. The plain CE's loops are
// unchanged: the smoothing sums are separate code, taken only when ε > 0.
template <typename LT, typename TT, bool SOFT, bool CE>
struct ForwardItem {
  using F = typename compute_of<LT>::type;
  static constexpr int S = CE ? 4 : 3;  // stats columns: [sum_pg, sum_p, sum_g(, sum_ce)]
  static int columns(const TverskyParams&) { return S; }
  // Two-class CE: -log p_y = log(1 + e) + [y is the less likely class]·|x1 - x0|. The
  // log(1 + e) parts are multiplied up per lane and class (each factor in [1, 2]) and
  // their log is taken once per 64 tiles (2^64 cannot overflow): one multiply-add per
  // voxel instead of a log. Rounding: one float32 rounding per factor, as torch's own
  // float32 log-sum-exp rounds 1 + e.
  static constexpr int FOLD_TILES = 64;
  // Tiles per block of the blocked path (4 KiB of float32 logits per class): L1.
  static constexpr int BLOCK_TILES = 16;

  const TverskyParams& P;
  const int64_t b, start, stop, C;
  alignas(64) F x[MAX_C][TILE];
  alignas(64) F g[SOFT ? MAX_C : 1][TILE];
  alignas(64) F acc_pg[MAX_C][TILE], acc_p[MAX_C][TILE], acc_g[MAX_C][TILE];
  alignas(64) F acc_ce[CE ? MAX_C : 1][TILE];
  alignas(64) F prod_ce[CE ? 2 : 1][TILE];
  // Label smoothing's sums, in CE units (finish() says how they combine):
  //   two-class softmax: acc_lse[c] = Σ_{y = c} log(1 + e) (the products folded here
  //     instead of into acc_ce, which then holds Σ_{y = c} [class c less likely] |d|),
  //     acc_sm[c] = Σ_{y = other class} [class c less likely] |d|;
  //   general path: acc_lse[0] = Σ_kept log s, acc_sm[c] = Σ_kept (m - x_c).
  alignas(64) F acc_sm[CE ? MAX_C : 1][TILE];
  alignas(64) F acc_lse[CE ? 2 : 1][TILE];
  alignas(64) int32_t y[TILE];
  alignas(64) float w[TILE];
  int64_t nonfinite = 0, bad = 0;
  // softmax CE with label smoothing (sigmoid has no ε: _spec.py); focal CE (softmax
  // only, without smoothing: needs_terms), γ = 2 or not
  const bool smooth, focal, focal_sq;
  const F gamma;

  __attribute__((always_inline)) ForwardItem(const TverskyParams& p, int64_t b_, int64_t start_,
                                             int64_t stop_)
      : P(p), b(b_), start(start_), stop(stop_), C(p.C),
        smooth(CE && p.activation == TV_SOFTMAX && p.label_smoothing != 0.0),
        focal(CE && p.ce_kind == TV_CE_FOCAL), focal_sq(focal && p.focal_gamma == 2.0),
        gamma((F)p.focal_gamma) {
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < TILE; ++i) acc_pg[c][i] = acc_p[c][i] = acc_g[c][i] = (F)0;
    if constexpr (CE) {
      for (int64_t c = 0; c < C; ++c)
        for (int i = 0; i < TILE; ++i) acc_ce[c][i] = acc_sm[c][i] = (F)0;
      for (int c = 0; c < 2; ++c)
        for (int i = 0; i < TILE; ++i) {
          prod_ce[c][i] = (F)1;
          acc_lse[c][i] = (F)0;
        }
    }
  }

  __attribute__((always_inline)) void fold_products() {
    if constexpr (CE) {
      if (focal) return;  // focal CE takes no products
      F(*to)[TILE] = smooth ? acc_lse : acc_ce;
      for (int c = 0; c < 2; ++c)
        for (int i = 0; i < TILE; ++i) {
          to[c][i] += fast_log(prod_ce[c][i]) * ce_scale<F>;
          prod_ce[c][i] = (F)1;
        }
    }
  }

  // The dispatcher: the blocked path over the chunk's full tiles where it applies, then a
  // tile loop over the rest.
  __attribute__((always_inline)) void run() {
    const bool two_class_softmax = C == 2 && P.activation == TV_SOFTMAX;
    const bool contiguous = P.logits_stride_n == 1 && P.target_stride_n == 1;
    // channels_last_3d logits of two classes: the classes of a voxel are adjacent
    // (stride_c 1, stride_n 2). UNet3D's CPU output has this layout.
    const bool interleaved = C == 2 && P.logits_stride_c == 1 && P.logits_stride_n == 2 &&
                             P.target_stride_n == 1;
    int64_t first_tile_voxel = start;  // voxels before it were done by the blocked path
    if constexpr (!SOFT)
      if (two_class_softmax && (contiguous || interleaved))
        first_tile_voxel = blocked_two_class(interleaved);
    for (int64_t n0 = first_tile_voxel; n0 < stop; n0 += TILE) {
      const int n = (int)std::min<int64_t>(TILE, stop - n0);
      if constexpr (SOFT)
        tile_soft(n0, n);
      else if (two_class_softmax)
        with_two_class_ce<CE>(smooth, focal, focal_sq,
                              [&](auto mode) { tile_two_class<decltype(mode)::value>(n0, n); });
      else
        tile_general(n0, n);
    }
    fold_products();
  }

  // Fused two-class path (the paper's setup) over the chunk's full tiles: logits and
  // labels are read straight from memory, one exp per voxel, nothing stored per voxel.
  // Blocks of KT tiles are walked one lane group at a time (block()). Returns the first
  // voxel it left to the tile loop.
  __attribute__((always_inline)) int64_t blocked_two_class(bool interleaved) {
    constexpr int KT = BLOCK_TILES;
    static_assert(FOLD_TILES % KT == 0);
    const IgnoreLabel<TT> ignore(P);
    const int64_t n_full = (stop - start) / TILE;
    using One = std::integral_constant<int, 1>;
    using Two = std::integral_constant<int, 2>;
    for (int64_t t0 = 0; t0 < n_full; t0 += KT) {
      const int64_t kt = std::min<int64_t>(KT, n_full - t0);
      // Compile-time variants: with/without ignore_index (without it, the common case,
      // the mask work disappears), planar/interleaved classes (voxel stride 1 or 2),
      // and which CE (TwoClassCE; only a CE item instantiates more than CE2_PLAIN).
      auto run_block = [&](auto mode) {
        if (interleaved) {
          if (ignore.active)
            block(std::true_type{}, Two{}, mode, ignore.value, t0, kt);
          else
            block(std::false_type{}, Two{}, mode, ignore.value, t0, kt);
        } else {
          if (ignore.active)
            block(std::true_type{}, One{}, mode, ignore.value, t0, kt);
          else
            block(std::false_type{}, One{}, mode, ignore.value, t0, kt);
        }
      };
      with_two_class_ce<CE>(smooth, focal, focal_sq, run_block);
      // the CE's products are folded every FOLD_TILES tiles, as a tile loop would
      if constexpr (CE)
        if ((t0 + kt) % FOLD_TILES == 0) fold_products();
    }
    return start + n_full * TILE;
  }

  // The accumulators of one lane group, held in registers over a block of tiles instead
  // of being loaded and stored once per tile (measured: 2-5 % on the AVX-512 forward; the
  // CE's cost is its arithmetic, not these stores). Ten with the CE: six sums, four CE;
  // twelve with label smoothing's two (SM).
  template <int G, bool SM>
  struct GroupSums {
    F p0[G], p1[G], pg0[G], pg1[G], g0[G], g1[G];
    F pc0[G], pc1[G], ce0[G], ce1[G];
    F sm0[SM ? G : 1], sm1[SM ? G : 1];
  };

  template <int G, bool SM>
  __attribute__((always_inline)) void load_group(int g, GroupSums<G, SM>& r) const {
    for (int i = 0; i < G; ++i) {
      if constexpr (SM) {
        r.sm0[i] = acc_sm[0][g + i];
        r.sm1[i] = acc_sm[1][g + i];
      }
      r.p0[i] = acc_p[0][g + i];
      r.p1[i] = acc_p[1][g + i];
      r.pg0[i] = acc_pg[0][g + i];
      r.pg1[i] = acc_pg[1][g + i];
      r.g0[i] = acc_g[0][g + i];
      r.g1[i] = acc_g[1][g + i];
      if constexpr (CE) {
        r.pc0[i] = prod_ce[0][g + i];
        r.pc1[i] = prod_ce[1][g + i];
        r.ce0[i] = acc_ce[0][g + i];
        r.ce1[i] = acc_ce[1][g + i];
      }
    }
  }

  template <int G, bool SM>
  __attribute__((always_inline)) void store_group(int g, const GroupSums<G, SM>& r) {
    for (int i = 0; i < G; ++i) {
      if constexpr (SM) {
        acc_sm[0][g + i] = r.sm0[i];
        acc_sm[1][g + i] = r.sm1[i];
      }
      acc_p[0][g + i] = r.p0[i];
      acc_p[1][g + i] = r.p1[i];
      acc_pg[0][g + i] = r.pg0[i];
      acc_pg[1][g + i] = r.pg1[i];
      acc_g[0][g + i] = r.g0[i];
      acc_g[1][g + i] = r.g1[i];
      if constexpr (CE) {
        prod_ce[0][g + i] = r.pc0[i];
        prod_ce[1][g + i] = r.pc1[i];
        acc_ce[0][g + i] = r.ce0[i];
        acc_ce[1][g + i] = r.ce1[i];
      }
    }
  }

  // Tiles t0 .. t0 + kt - 1 of the chunk, LANE_GROUP lanes at a time. Each lane sums the
  // same voxels in the same order as a tile-by-tile loop, so the result does not depend
  // on LANE_GROUP.
  template <typename HasII, typename Stride, typename Mode>
  __attribute__((always_inline)) void block(HasII, Stride, Mode, label_int_t<TT> ii,
                                            int64_t t0, int64_t kt) {
    constexpr bool HAS_II = HasII::value;
    constexpr int S2 = Stride::value;  // voxel stride: 1 planar, 2 interleaved
    constexpr bool SM = Mode::value == CE2_SMOOTH;  // label smoothing's sums (see acc_sm)
    constexpr bool FOCAL = Mode::value >= CE2_FOCAL_SQ;
    constexpr int G = LANE_GROUP<F>;
    using L = label_int_t<TT>;
    using U = std::make_unsigned_t<L>;
    const LT* base = (const LT*)P.logits_ptr + b * P.logits_stride_b;
    const TT* lbase = (const TT*)P.target_ptr + b * P.target_stride_b;
    const int64_t sc = P.logits_stride_c, sn = P.logits_stride_n;
    int32_t nf = 0, nb = 0;
    for (int g = 0; g < TILE; g += G) {
      GroupSums<G, SM> r;
      load_group<G, SM>(g, r);
      for (int64_t t = t0; t < t0 + kt; ++t) {
        const int64_t n0 = start + t * TILE + g;
        // interleaved: both classes from one base pointer, so gcc sees one load
        // group and de-interleaves with shuffles instead of gathers
        const LT* r0 = base + n0 * sn;
        const LT* r1 = r0 + sc;
        const TT* lab = lbase + n0;
        for (int i = 0; i < G; ++i) {
          const F x0 = (F)load_val(r0 + i * S2);
          const F x1 = (F)load_val(S2 == 2 ? r0 + 2 * i + 1 : r1 + i);
          nf += not_finite(x0) + not_finite(x1);
          const L v = to_label(lab[i]);
          const bool keep = HAS_II ? v != ii : true;
          nb += keep & ((U)v > (U)1);  // unsigned: negative labels are bad too
          const F g0 = (keep & (v == 0)) ? (F)1 : (F)0;
          const F g1 = (keep & (v == 1)) ? (F)1 : (F)0;
          F p0, p1, e, rr;
          softmax2(x0, x1, p0, p1, e, rr);
          if constexpr (FOCAL) {
            const F d = x1 * ce_scale<F> - x0 * ce_scale<F>;
            focal_ce2<Mode::value == CE2_FOCAL_SQ>(d, e, p0, p1, g0, g1, gamma,
                                                   r.ce0[i], r.ce1[i]);
          } else if constexpr (CE) {
            // -log p_hi = log(1 + e), -log p_lo = |d| + log(1 + e), d = x1 - x0
            // (p_hi is class 1 when d >= 0), in CE units (see ce_scale); g0, g1 are
            // already 0 on ignored voxels.
            const F d = x1 * ce_scale<F> - x0 * ce_scale<F>;
            r.pc0[i] *= g0 * e + (F)1;  // exact: g is 0 or 1
            r.pc1[i] *= g1 * e + (F)1;
            // |d| where class 0 resp. 1 is the less likely one: max(±d, 0), which is
            // one instruction, and one fma into the sum
            const F d0 = std::max(d, (F)0), d1 = std::max(-d, (F)0);
            r.ce0[i] += g0 * d0;
            r.ce1[i] += g1 * d1;
            if constexpr (SM) {  // the same for the voxels of the other class
              r.sm0[i] += g1 * d0;
              r.sm1[i] += g0 * d1;
            }
          }
          if constexpr (HAS_II) {
            const F wi = keep ? (F)1 : (F)0;
            p0 *= wi;
            p1 *= wi;
          }
          r.p0[i] += p0;
          r.p1[i] += p1;
          r.pg0[i] += p0 * g0;
          r.pg1[i] += p1 * g1;
          r.g0[i] += g0;
          r.g1[i] += g1;
        }
      }
      store_group<G, SM>(g, r);
    }
    if (nf)
      for (int64_t t = t0; t < t0 + kt; ++t) {
        const LT* r0 = base + (start + t * TILE) * sn;
        poison_softmax2_inf(TILE, [&](int c, int i) {
          return (F)load_val(r0 + c * sc + i * sn);
        }, acc_p);
      }
    nonfinite += nf;
    bad += nb;
  }

  __attribute__((always_inline)) void tile_soft(int64_t n0, int n) {
    nonfinite += load_probs<F, LT>(P, b, n0, n, x);
    bad += load_soft<F, TT>(P, b, n0, n, g);
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < TILE; ++i) {
        // padded lanes have g = 0; their p must not count either
        const F p = i < n ? x[c][i] : (F)0;
        acc_p[c][i] += p;
        acc_pg[c][i] += p * g[c][i];
        acc_g[c][i] += g[c][i];
      }
  }

  // Fused two-class path on a tail or strided tile: one exp per voxel; MODE: which CE.
  template <int MODE>
  __attribute__((always_inline)) void tile_two_class(int64_t n0, int n) {
    const int64_t nf = load_logits<F, LT>(P, b, n0, n, x);
    nonfinite += nf;
    bad += load_labels<TT>(P, b, n0, n, y, w);
    for (int i = 0; i < TILE; ++i) {
      F p0, p1, e, r;
      softmax2(x[0][i], x[1][i], p0, p1, e, r);
      p0 *= (F)w[i];
      p1 *= (F)w[i];
      const F g0 = (F)(y[i] == 0), g1 = (F)(y[i] == 1);
      if constexpr (CE) {
        // in CE units (see ce_scale)
        const F d = x[1][i] * ce_scale<F> - x[0][i] * ce_scale<F>;
        const F l1p = log1p_small(e) * ce_scale<F>, ad = std::abs(d);
        if constexpr (MODE >= CE2_FOCAL_SQ) {
          focal_ce2<MODE == CE2_FOCAL_SQ>(d, e, p0, p1, g0, g1, gamma, acc_ce[0][i],
                                          acc_ce[1][i]);
        } else if constexpr (MODE == CE2_SMOOTH) {  // the blocked path's sums (see acc_sm)
          const F d0 = std::max(d, (F)0), d1 = std::max(-d, (F)0);
          acc_lse[0][i] += g0 * l1p;
          acc_lse[1][i] += g1 * l1p;
          acc_ce[0][i] += g0 * d0;
          acc_ce[1][i] += g1 * d1;
          acc_sm[0][i] += g1 * d0;
          acc_sm[1][i] += g0 * d1;
        } else {
          acc_ce[0][i] += g0 * (d >= (F)0 ? l1p + ad : l1p);
          acc_ce[1][i] += g1 * (d >= (F)0 ? l1p : l1p + ad);
        }
      }
      acc_p[0][i] += p0;
      acc_p[1][i] += p1;
      acc_pg[0][i] += p0 * g0;
      acc_pg[1][i] += p1 * g1;
      acc_g[0][i] += g0;
      acc_g[1][i] += g1;
    }
    if (nf) poison_softmax2_inf(n, [&](int c, int i) { return x[c][i]; }, acc_p);
  }

  // Softmax on a label map, any C, with the plain CE or none: the general path's work in
  // three passes over the tile (max, exp, sums) instead of six; the probabilities are
  // never stored, p_c = e_c / s is formed where the sums need it.
  __attribute__((always_inline)) void tile_softmax(int64_t n0, int n) {
    bad += load_labels<TT>(P, b, n0, n, y, w);
    nonfinite += load_logits<F, LT>(P, b, n0, n, x);
    alignas(64) F m[TILE], s[TILE], lce[TILE];
    for (int i = 0; i < TILE; ++i) m[i] = x[0][i];
    for (int64_t c = 1; c < C; ++c)
      for (int i = 0; i < TILE; ++i) m[i] = std::max(m[i], x[c][i]);
    for (int i = 0; i < TILE; ++i) s[i] = lce[i] = (F)0;
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < TILE; ++i) {
        if constexpr (CE)  // x_y - m, in CE units (see ce_scale)
          lce[i] += y[i] == (int32_t)c ? x[c][i] * ce_scale<F> - m[i] * ce_scale<F> : (F)0;
        x[c][i] = fast_exp(x[c][i] - m[i]);
        s[i] += x[c][i];
      }
    for (int i = 0; i < TILE; ++i) {
      if constexpr (CE)  // -log p_y = log s - (x_y - m); 0 on ignored and padded lanes
        lce[i] = w[i] != 0.f ? fast_log(s[i]) * ce_scale<F> - lce[i] : (F)0;
      s[i] = (F)1 / s[i];
    }
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < TILE; ++i) {
        const F p = x[c][i] * s[i] * (F)w[i];
        const bool is_y = y[i] == (int32_t)c;
        const F gi = is_y ? (F)1 : (F)0;
        acc_p[c][i] += p;
        acc_pg[c][i] += p * gi;
        acc_g[c][i] += gi;
        if constexpr (CE) acc_ce[c][i] += is_y ? lce[i] : (F)0;
      }
  }

  __attribute__((always_inline)) void tile_general(int64_t n0, int n) {
    if (!smooth && !focal && P.activation == TV_SOFTMAX) return tile_softmax(n0, n);
    if constexpr (CE) {
      bad += load_labels<TT>(P, b, n0, n, y, w);
      const SmoothSums<F> sums{acc_sm, acc_lse[0]};
      if (focal && focal_sq)
        nonfinite += load_probs_focal<true, F, LT>(P, b, n0, n, x, y, w, acc_ce, gamma);
      else if (focal)
        nonfinite += load_probs_focal<false, F, LT>(P, b, n0, n, x, y, w, acc_ce, gamma);
      else
        nonfinite += load_probs_ce<F, LT>(P, b, n0, n, x, y, w, acc_ce, sums);
    } else {
      nonfinite += load_probs<F, LT>(P, b, n0, n, x);
      bad += load_labels<TT>(P, b, n0, n, y, w);
    }
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < TILE; ++i) {
        const F p = x[c][i] * (F)w[i];
        const F gi = y[i] == (int32_t)c ? (F)1 : (F)0;
        acc_p[c][i] += p;
        acc_pg[c][i] += p * gi;
        acc_g[c][i] += gi;
      }
  }

  // The item's sums, lanes added in float64: out[c][S], flags[2] (non-finite, bad).
  __attribute__((always_inline)) void finish(double* out, int64_t* flags) const {
    for (int64_t c = 0; c < C; ++c) {
      double s_pg = 0, s_p = 0, s_g = 0;
      for (int i = 0; i < TILE; ++i) {
        s_pg += (double)acc_pg[c][i];
        s_p += (double)acc_p[c][i];
        s_g += (double)acc_g[c][i];
      }
      out[c * S + 0] = s_pg;
      out[c * S + 1] = s_p;
      out[c * S + 2] = s_g;
      if constexpr (CE) {
        double s_ce = 0;
        for (int i = 0; i < TILE; ++i) s_ce += (double)acc_ce[c][i];
        out[c * S + 3] = (smooth ? smoothed_ce(c, s_ce) : s_ce) * CE_UNIT;
      }
    }
    flags[0] = nonfinite;
    flags[1] = bad;
  }

  // Column c with label smoothing, in CE units, from acc_ce's lane sum s_ce:
  // (1 - ε) own + (ε / C) all, own = Σ_{y = c} -log p_c, all = Σ_kept -log p_c.
  // Two-class softmax (-log p_c = log(1 + e) + [class c less likely] |d|):
  //   own = acc_lse[c] + s_ce, all = acc_lse[0] + acc_lse[1] + s_ce + acc_sm[c];
  // general path (-log p_c = log s + (m - x_c)): own = s_ce, all = acc_lse[0] + acc_sm[c].
  // A bad label (the call raises) adds to `all` on the general path only.
  double smoothed_ce(int64_t c, double s_ce) const {
    auto lanes = [](const F* row) {
      double s = 0;
      for (int i = 0; i < TILE; ++i) s += (double)row[i];
      return s;
    };
    const bool two_class = C == 2;  // smoothing is softmax only: C == 2 is the fused path
    const double lse0 = lanes(acc_lse[0]), lse1 = two_class ? lanes(acc_lse[1]) : 0.0;
    const double own = two_class ? (c == 0 ? lse0 : lse1) + s_ce : s_ce;
    const double all = lse0 + lse1 + (two_class ? s_ce : 0.0) + lanes(acc_sm[c]);
    const double eps = P.label_smoothing;
    return (1.0 - eps) * own + eps / (double)C * all;
  }
};

// Every forward: the chunks of every sample as work items (ForwardItem, TermsForwardItem),
// each item's sums in its own slot, added in a fixed order.
template <class Item>
int forward_items(const TverskyParams& P) {
  const int64_t S = Item::columns(P);
  const int64_t B = P.B, C = P.C, N = P.N;
  const int64_t n_chunks = (N + CHUNK - 1) / CHUNK;
  const int64_t n_items = B * n_chunks;
  // partial[item][c][S] and per-item flag counts: written once per item, summed in order.
  std::vector<double> partial((size_t)n_items * C * S);
  std::vector<int64_t> flags((size_t)n_items * 2, 0);
  parallel_items(n_items, P.num_threads, [&](int64_t item) {
    const int64_t b = item / n_chunks, k = item % n_chunks;
    const int64_t start = k * CHUNK;
    Item it(P, b, start, std::min(N, start + CHUNK));
    it.run();
    it.finish(partial.data() + item * C * S, flags.data() + item * 2);
  });

  // fixed-order final reduction
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < C * S; ++j) {
      double s = 0;
      for (int64_t k = 0; k < n_chunks; ++k) s += partial[(b * n_chunks + k) * C * S + j];
      P.stats_ptr[b * C * S + j] = s;
    }
  int64_t nf = 0, nb = 0;
  for (int64_t it = 0; it < n_items; ++it) {
    nf += flags[it * 2];
    nb += flags[it * 2 + 1];
  }
  P.flags_ptr[0] = nf;
  P.flags_ptr[1] = nb;
  return TV_OK;
}

// ---- backward -----------------------------------------------------------------------------
// One work item of the backward: sample b, voxels [start, stop). Elementwise: each tile's
// dL/dlogits is written once, by the path the inputs call for:
//   two_class_direct  two-class softmax label maps, full planar/interleaved tile, read
//                     and written straight from/to memory
//   two_class_tile    two-class softmax label maps on a tail or strided tile
//   general_tile      everything else: u = dL/dp (affine in g), then chain_rule()
// Always inlined into the work item's loop, like the forward's ForwardItem.
//
// Label smoothing (softmax CE, ε > 0): on a kept voxel of label y, q_c = (1 - ε)[c = y] +
// ε / C, so the CE's dz_k = p_k Σ_c e_c q_c - e_k q_k (_spec.py) takes per-class
// constants instead of e_y alone (EK, ES below); separate code, taken only when ε > 0.
template <typename LT, typename TT, bool SOFT, bool CE>
struct BackwardItem {
  using F = typename compute_of<LT>::type;
  const TverskyParams& P;
  const int64_t b, C;
  LT* gbase;
  alignas(64) F x[MAX_C][TILE];
  alignas(64) F u[MAX_C][TILE];
  alignas(64) int32_t y[TILE];
  alignas(64) float w[TILE];
  alignas(64) F s[TILE];
  F A[MAX_C], Bc[MAX_C], E[MAX_C];
  // smoothing: EK[c] = e_c (1 - ε), ES[c] = e_c ε / C, ES_SUM = Σ_c ES[c]; focal: as
  // ForwardItem's
  const bool smooth, focal, focal_sq;
  const F gamma;
  F EK[CE ? MAX_C : 1], ES[CE ? MAX_C : 1], ES_SUM = 0;
  const bool stream;  // non-temporal gradient stores (STREAM_MIN_BYTES)

  __attribute__((always_inline)) BackwardItem(const TverskyParams& p, int64_t b_)
      : P(p), b(b_), C(p.C), gbase((LT*)p.grad_ptr + b_ * p.grad_stride_b),
        smooth(CE && p.activation == TV_SOFTMAX && p.label_smoothing != 0.0),
        focal(CE && p.ce_kind == TV_CE_FOCAL), focal_sq(focal && p.focal_gamma == 2.0),
        gamma((F)p.focal_gamma),
        stream(p.B * p.C * p.N * (int64_t)sizeof(LT) >= STREAM_MIN_BYTES) {
    const F* coef_a = (const F*)P.coef_a_ptr;
    const F* coef_b = (const F*)P.coef_b_ptr;
    for (int64_t c = 0; c < C; ++c) {
      A[c] = coef_a[b * C + c];
      Bc[c] = coef_b[b * C + c];
      E[c] = CE ? ((const F*)P.coef_ce_ptr)[b * C + c] : (F)0;
    }
    if constexpr (CE) {
      const F keep = (F)(1.0 - P.label_smoothing), spread = (F)(P.label_smoothing / (double)C);
      for (int64_t c = 0; c < C; ++c) {
        EK[c] = E[c] * keep;
        ES[c] = E[c] * spread;
        ES_SUM += ES[c];
      }
    }
  }

  // The dispatcher, per tile.
  __attribute__((always_inline)) void run(int64_t start, int64_t stop) {
    const bool two_class_softmax = C == 2 && P.activation == TV_SOFTMAX;
    const bool contiguous =
        P.logits_stride_n == 1 && P.target_stride_n == 1 && P.grad_stride_n == 1;
    const bool interleaved = C == 2 && P.logits_stride_c == 1 && P.logits_stride_n == 2 &&
                             P.grad_stride_c == 1 && P.grad_stride_n == 2 &&
                             P.target_stride_n == 1;
    const IgnoreLabel<TT> ignore(P);
    for (int64_t n0 = start; n0 < stop; n0 += TILE) {
      const int n = (int)std::min<int64_t>(TILE, stop - n0);
      if constexpr (!SOFT) {
        if (two_class_softmax && n == TILE && (contiguous || interleaved)) {
          two_class_direct_any(n0, ignore, interleaved);
          continue;
        }
        if (two_class_softmax) {
          with_two_class_ce<CE>(smooth, focal, focal_sq, [&](auto mode) {
            two_class_tile<decltype(mode)::value>(n0, n);
          });
          continue;
        }
      }
      general_tile(n0, n);
    }
  }

  // two_class_direct's variant for this call: layout and CE (TwoClassCE; only a CE item
  // instantiates more than CE2_PLAIN).
  __attribute__((always_inline)) void two_class_direct_any(int64_t n0, const IgnoreLabel<TT>& ignore,
                                                           bool interleaved) {
    with_two_class_ce<CE>(smooth, focal, focal_sq, [&](auto mode) {
      if (interleaved)
        two_class_direct<2, decltype(mode)::value>(n0, ignore);
      else
        two_class_direct<1, decltype(mode)::value>(n0, ignore);
    });
  }

  // dL/dz1 = -dL/dz0 = w p0 p1 (u1 - u0), p0 p1 = e r^2: one exp per voxel, read and
  // written straight from/to memory on a full tile; S = voxel stride, 1 planar or 2
  // interleaved; MODE: which CE (TwoClassCE).
  template <int S, int MODE>
  __attribute__((always_inline)) void two_class_direct(int64_t n0, const IgnoreLabel<TT>& ignore) {
    using L = label_int_t<TT>;
    const bool has_ii = ignore.active;
    const auto ii = ignore.value;
    const LT* r0 = (const LT*)P.logits_ptr + b * P.logits_stride_b + n0 * P.logits_stride_n;
    const LT* r1 = r0 + P.logits_stride_c;
    const TT* lab = (const TT*)P.target_ptr + b * P.target_stride_b + n0;
    LT* o0 = gbase + n0 * P.grad_stride_n;
    LT* o1 = o0 + P.grad_stride_c;
    // locals, not the item's members, in the loop: see smooth2()
    const F dA = A[1] - A[0], B0 = Bc[0], B1 = Bc[1], E0 = E[0], E1 = E[1], gm = gamma;
    const Smooth2 k2 = smooth2();
#pragma GCC ivdep
    for (int i = 0; i < TILE; ++i) {
      const F x1 = (F)load_val(S == 2 ? r0 + 2 * i + 1 : r1 + i), x0 = (F)load_val(r0 + i * S);
      const F d = x1 - x0;
      const F e = fast_exp(-std::abs(d));
      const F r = (F)1 / ((F)1 + e);
      const L v = to_label(lab[i]);
      const bool keep = !(has_ii & (v == ii));
      const F du = dA + (v == 1 ? B1 : (F)0) - (v == 0 ? B0 : (F)0);
      F t = e * r * r * du;
      if constexpr (CE) {
        // dz1 = -dz0 = e_y (p1 - [y = 1]); p1 - 1 = -p0 kept exact for y = 1
        const F lo = e * r, p0 = d >= (F)0 ? lo : r, p1 = d >= (F)0 ? r : lo;
        if constexpr (MODE >= CE2_FOCAL_SQ)
          t += focal_ce2_grad<MODE == CE2_FOCAL_SQ>(x1 * ce_scale<F> - x0 * ce_scale<F>, e,
                                                    p0, p1, v == 0, v == 1, E0, E1, gm);
        else if constexpr (MODE == CE2_SMOOTH)
          t += smoothed_ce2(k2, v == 0, v == 1, p0, p1);
        else
          t += v == 1 ? -E1 * p0 : (v == 0 ? E0 * p1 : (F)0);
      }
      const F g1 = keep ? t : (F)0;
      store_val(o0 + i * S, -g1);
      store_val(S == 2 ? o0 + 2 * i + 1 : o1 + i, g1);
    }
  }

  // The same through the tile arrays (any strides, partial tiles).
  template <int MODE>
  __attribute__((always_inline)) void two_class_tile(int64_t n0, int n) {
    load_logits<F, LT>(P, b, n0, n, x);
    load_labels<TT>(P, b, n0, n, y, w);
    const Smooth2 k2 = smooth2();
    for (int i = 0; i < TILE; ++i) {
      const F d = x[1][i] - x[0][i];
      const F e = fast_exp(-std::abs(d));
      const F r = (F)1 / ((F)1 + e);
      const F du = (A[1] - A[0]) + (y[i] == 1 ? Bc[1] : (F)0) - (y[i] == 0 ? Bc[0] : (F)0);
      F t = e * r * r * du;
      if constexpr (CE) {
        const F lo = e * r, p0 = d >= (F)0 ? lo : r, p1 = d >= (F)0 ? r : lo;
        const bool y0 = y[i] == 0, y1 = y[i] == 1;
        if constexpr (MODE >= CE2_FOCAL_SQ)
          t += focal_ce2_grad<MODE == CE2_FOCAL_SQ>(x[1][i] * ce_scale<F> - x[0][i] * ce_scale<F>,
                                                    e, p0, p1, y0, y1, E[0], E[1], gamma);
        else if constexpr (MODE == CE2_SMOOTH)
          t += smoothed_ce2(k2, y0, y1, p0, p1);
        else
          t += y1 ? -E[1] * p0 : (y0 ? E[0] * p1 : (F)0);
      }
      const F g1 = (F)w[i] * t;
      u[0][i] = -g1;
      u[1][i] = g1;
    }
    store_tile(n0, n, 2);
  }

  // Two classes with label smoothing: dz1 = -dz0 = p1 e0 q0 - p0 e1 q1 (the softmax CE's
  // gradient with q0 + q1 = 1), q_c = (1 - ε)[y = c] + ε / 2. A bad label (the forward
  // raised) gets q_c = ε / 2, as on the terms paths. The four e_c q_c are taken into locals
  // before a voxel loop (smooth2()): read from the item inside it, gcc must assume that
  // the gradient's stores may change them, and leaves the loop scalar.
  struct Smooth2 {
    F hi0, lo0, hi1, lo1;  // e_c q_c for y = c and for y != c
  };
  __attribute__((always_inline)) Smooth2 smooth2() const {
    if constexpr (CE)
      return {EK[0] + ES[0], ES[0], EK[1] + ES[1], ES[1]};
    else
      return {};  // EK, ES hold one element without CE
  }
  __attribute__((always_inline)) static F smoothed_ce2(const Smooth2& k, bool y0, bool y1, F p0,
                                                       F p1) {
    return p1 * (y0 ? k.hi0 : k.lo0) - p0 * (y1 ? k.hi1 : k.lo1);
  }

  // Softmax on a label map, any C, with the plain CE or none: general_tile's work with
  // the affine u, the normalisation and the chain rule's sums fused into two passes
  // after the max (Σ_c p_c u_c = r Σ_c e_c u_c, r = 1 / Σ_c e_c); p is never stored.
  __attribute__((always_inline)) void softmax_tile(int64_t n0, int n) {
    load_labels<TT>(P, b, n0, n, y, w);
    load_logits<F, LT>(P, b, n0, n, x);  // non-finite logits: the forward raised
    alignas(64) F m[TILE], su[TILE], ey[TILE];
    for (int i = 0; i < TILE; ++i) m[i] = x[0][i];
    for (int64_t c = 1; c < C; ++c)
      for (int i = 0; i < TILE; ++i) m[i] = std::max(m[i], x[c][i]);
    for (int i = 0; i < TILE; ++i) s[i] = su[i] = ey[i] = (F)0;
    for (int64_t c = 0; c < C; ++c) {
      const F ac = A[c], bc = Bc[c], ec = E[c];  // scalars: see chain_rule
      for (int i = 0; i < TILE; ++i) {
        const bool is_y = y[i] == (int32_t)c;
        const F e = fast_exp(x[c][i] - m[i]);
        x[c][i] = e;
        s[i] += e;
        su[i] += e * (ac + (is_y ? bc : (F)0));
        if constexpr (CE) ey[i] += is_y ? ec : (F)0;  // e_y: the CE's (p_k - [k = y]) e_y
      }
    }
    for (int i = 0; i < TILE; ++i) {
      s[i] = (F)1 / s[i];
      su[i] = su[i] * s[i] - ey[i];
    }
    for (int64_t c = 0; c < C; ++c) {
      const F ac = A[c], bc = Bc[c];
      for (int i = 0; i < TILE; ++i) {
        const bool is_y = y[i] == (int32_t)c;
        const F uc = ac + (is_y ? bc : (F)0);
        u[c][i] = (F)w[i] * (x[c][i] * s[i] * (uc - su[i]) - (is_y ? ey[i] : (F)0));
      }
    }
    store_tile(n0, n, C);
  }

  __attribute__((always_inline)) void general_tile(int64_t n0, int n) {
    if constexpr (!SOFT) {
      if (focal) return focal_general_tile(n0, n);
      if (!smooth && P.activation == TV_SOFTMAX) return softmax_tile(n0, n);
    }
    load_probs<F, LT>(P, b, n0, n, x);
    // u = dL/dp / w = A + B g  (affine in g)
    if constexpr (SOFT) {
      load_soft<F, TT>(P, b, n0, n, u);
      for (int64_t c = 0; c < C; ++c)
        for (int i = 0; i < TILE; ++i) u[c][i] = A[c] + Bc[c] * u[c][i];
      for (int i = 0; i < TILE; ++i) w[i] = 1.f;
    } else {
      load_labels<TT>(P, b, n0, n, y, w);
      for (int64_t c = 0; c < C; ++c) {
        // scalars, not masked loads of A[c]/Bc[c] per lane: gcc vectorises this form
        const F ac = A[c], bc = Bc[c];
        for (int i = 0; i < TILE; ++i) u[c][i] = ac + (y[i] == (int32_t)c ? bc : (F)0);
      }
    }
    chain_rule();
    store_tile(n0, n, C);
  }

  // Softmax focal CE (label maps, no smoothing) on the general path: only a_y != 0
  // (_spec.py), dz_k += a_y ([k = y] - p_k), which is the plain CE's e_y (p_k - [k = y])
  // with e_y replaced per voxel by t = -a_y = e_y (1 - p_y)^γ - γ e_y p_y (1 - p_y)^(γ-1)
  // log p_y (focal_probs).
  __attribute__((always_inline)) void focal_general_tile(int64_t n0, int n) {
    alignas(64) F t[TILE];
    load_labels<TT>(P, b, n0, n, y, w);
    if (focal_sq)
      focal_probs<true>(n0, n, t);
    else
      focal_probs<false>(n0, n, t);
    for (int i = 0; i < TILE; ++i) s[i] = (F)0;
    for (int64_t c = 0; c < C; ++c) {
      const F ac = A[c], bc = Bc[c];
      for (int i = 0; i < TILE; ++i) {
        u[c][i] = ac + (y[i] == (int32_t)c ? bc : (F)0);
        s[i] += x[c][i] * u[c][i];
      }
    }
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < TILE; ++i)
        u[c][i] = (F)w[i] * (x[c][i] * (u[c][i] - s[i] + t[i]) -
                             (y[i] == (int32_t)c ? t[i] : (F)0));
    store_tile(n0, n, C);
  }

  // x: logits -> p; t[i] = -a_y of focal_general_tile (0 on ignored lanes). p_o = 1 - p_y
  // is summed from the other classes' exps; p_y log p_y is formed from log p_y in CE
  // units (x_y - m may exceed float's range), then scaled: it lies in [-1/e, 0]. The γ
  // part is 0 where p_y or p_o is 0; SQ (γ = 2) needs no division by p_o.
  template <bool SQ>
  __attribute__((always_inline)) void focal_probs(int64_t n0, int n, F* __restrict t) {
    load_logits<F, LT>(P, b, n0, n, x);
    alignas(64) F m[TILE], so[TILE], ex[TILE], xy[TILE], ey[TILE];
    for (int i = 0; i < TILE; ++i) m[i] = x[0][i];
    for (int64_t c = 1; c < C; ++c)
      for (int i = 0; i < TILE; ++i) m[i] = std::max(m[i], x[c][i]);
    for (int i = 0; i < TILE; ++i) s[i] = so[i] = ex[i] = xy[i] = ey[i] = (F)0;
    for (int64_t c = 0; c < C; ++c) {
      const F ec = E[c];
      for (int i = 0; i < TILE; ++i) {
        const bool is_y = y[i] == (int32_t)c;
        xy[i] += is_y ? x[c][i] * ce_scale<F> - m[i] * ce_scale<F> : (F)0;
        ey[i] += is_y ? ec : (F)0;
        x[c][i] = fast_exp(x[c][i] - m[i]);
        s[i] += x[c][i];
        so[i] += is_y ? (F)0 : x[c][i];
        ex[i] += is_y ? x[c][i] : (F)0;
      }
    }
    for (int i = 0; i < TILE; ++i) {
      const F r = (F)1 / s[i], po = so[i] * r, py = ex[i] * r;
      const F plp = py * (xy[i] - fast_log(s[i]) * ce_scale<F>) * (F)CE_UNIT;
      F a;
      if constexpr (SQ) {
        a = po * (po - gamma * plp);
      } else {
        const F pw = pow_focal<false>(po, gamma);
        const bool inner = (po > (F)0) & (py > (F)0);
        // divided unconditionally, then selected: gcc does not if-convert a division
        // under a condition, and the loop would not vectorise
        const F gp = gamma * plp * pw / (inner ? po : (F)1);
        a = pw - (inner ? gp : (F)0);
      }
      t[i] = w[i] != 0.f ? ey[i] * a : (F)0;
      s[i] = r;
    }
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < TILE; ++i) x[c][i] *= s[i];
  }

  // Chain rule through the activation, written back into u as dL/dlogit (x holds p).
  // The plain softmax CE never comes here (general_tile hands it to softmax_tile, and a CE
  // item is never SOFT): a softmax CE here is a smoothed one.
  __attribute__((always_inline)) void chain_rule() {
    if (CE && P.activation == TV_SOFTMAX) {
      smoothed_chain_rule();
    } else if (CE && P.activation == TV_SIGMOID) {
      for (int64_t c = 0; c < C; ++c)
        for (int i = 0; i < TILE; ++i) {
          const F q = x[c][i], g = y[i] == (int32_t)c ? (F)1 : (F)0;
          u[c][i] = (F)w[i] * (u[c][i] * q * ((F)1 - q) + E[c] * (q - g));
        }
    } else if (P.activation == TV_SOFTMAX) {
      for (int i = 0; i < TILE; ++i) s[i] = (F)0;
      for (int64_t c = 0; c < C; ++c)
        for (int i = 0; i < TILE; ++i) s[i] += x[c][i] * u[c][i];
      for (int64_t c = 0; c < C; ++c)
        for (int i = 0; i < TILE; ++i) u[c][i] = (F)w[i] * x[c][i] * (u[c][i] - s[i]);
    } else if (P.activation == TV_SIGMOID) {
      for (int64_t c = 0; c < C; ++c)
        for (int i = 0; i < TILE; ++i) u[c][i] = (F)w[i] * u[c][i] * x[c][i] * ((F)1 - x[c][i]);
    } else {
      for (int64_t c = 0; c < C; ++c)
        for (int i = 0; i < TILE; ++i) u[c][i] = (F)w[i] * u[c][i];
    }
  }

  // Softmax with the smoothed CE: Σ_c e_c q_c = EK[y] + ES_SUM, e_k q_k = [k = y] EK[k] +
  // ES[k], so dz_k = w (p_k (u_k - s + EK[y] + ES_SUM) - [k = y] EK[k] - ES[k]).
  __attribute__((always_inline)) void smoothed_chain_rule() {
    alignas(64) F ey[TILE];
    for (int i = 0; i < TILE; ++i) s[i] = ey[i] = (F)0;
    for (int64_t c = 0; c < C; ++c) {
      const F ek = EK[c];
      for (int i = 0; i < TILE; ++i) {
        s[i] += x[c][i] * u[c][i];
        ey[i] += y[i] == (int32_t)c ? ek : (F)0;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const F es = ES[c];
      for (int i = 0; i < TILE; ++i)
        u[c][i] = (F)w[i] * (x[c][i] * (u[c][i] - s[i] + ey[i] + ES_SUM) -
                             (y[i] == (int32_t)c ? ey[i] : (F)0) - es);
    }
  }

  // u's first `classes` rows into the gradient's voxels n0 .. n0 + n - 1.
  __attribute__((always_inline)) void store_tile(int64_t n0, int n, int64_t classes) {
    for (int64_t c = 0; c < classes; ++c)
      store_row(u[c], n, gbase + c * P.grad_stride_c + n0 * P.grad_stride_n, P.grad_stride_n,
                stream);
  }
};

// Every backward: the chunks of every sample as work items (BackwardItem,
// TermsBackwardItem), each writing its own voxels of the gradient.
template <class Item>
int backward_items(const TverskyParams& P) {
  const int64_t N = P.N;
  const int64_t n_chunks = (N + CHUNK - 1) / CHUNK;
  parallel_items(P.B * n_chunks, P.num_threads, [&](int64_t item) {
    const int64_t b = item / n_chunks, start = (item % n_chunks) * CHUNK;
    Item it(P, b);
    it.run(start, std::min(N, start + CHUNK));
    stream_fence();  // the item's non-temporal stores, if any, before the pool joins
  });
  return TV_OK;
}

// ---- this round's terms: soft-target CE, label smoothing, focal CE, region tables --------
// (contract: fasttversky/_spec.py). These paths hold the target as an array g[c][lane]
// (masked: 0 on ignored and padded lanes) instead of the fast paths' label index y, and
// form the CE target q from it: q_c = w ((1 - ε) g_c + ε / C) for softmax, q_c = g_c for
// sigmoid. The Tversky-only, plain-CE and smoothed-CE paths of integer and float32 label
// maps never come here (needs_terms); label smoothing comes here with soft targets or
// focal CE. Which target kind a terms path reads is a template argument, as
// is its compute type F; the storage types of the logits, the target and the gradient are
// switched at run time once per tile row (64 voxels), which costs nothing measurable and
// keeps the number of instantiations (and the build time) down. Label maps stored as
// float16, bfloat16 or float64 (rarer than float32 ones) come here too, for the same
// reason.
enum TermsTarget { TK_LABELS = 0, TK_REGIONS = 1, TK_SOFT = 2 };

// Logits of any storage type computed in F (float32 for float32/float16/bfloat16, float64
// for float64), and the gradient row stored back, through a run-time switch.
template <typename F>
inline int64_t load_logits_any(const TverskyParams& P, int64_t b, int64_t n0, int n,
                               F (*__restrict x)[TILE]) {
  if constexpr (std::is_same_v<F, double>) {
    return load_logits<F, double>(P, b, n0, n, x);
  } else {
    switch (P.logits_dtype) {
      case TV_FLOAT16: return load_logits<F, f16>(P, b, n0, n, x);
      case TV_BFLOAT16: return load_logits<F, bf16>(P, b, n0, n, x);
      default: return load_logits<F, float>(P, b, n0, n, x);
    }
  }
}

// Row c of a tile, voxels n0 .. n0 + n - 1 of sample b, into the gradient.
template <typename F>
inline void store_grad_row(const TverskyParams& P, const F* __restrict src, int n, int64_t b,
                           int64_t c, int64_t n0) {
  const int64_t at = b * P.grad_stride_b + c * P.grad_stride_c + n0 * P.grad_stride_n;
  const int64_t sn = P.grad_stride_n;
  if constexpr (std::is_same_v<F, double>) {
    store_row(src, n, (double*)P.grad_ptr + at, sn);
  } else {
    switch (P.logits_dtype) {
      case TV_FLOAT16: return store_row(src, n, (f16*)P.grad_ptr + at, sn);
      case TV_BFLOAT16: return store_row(src, n, (bf16*)P.grad_ptr + at, sn);
      default: return store_row(src, n, (float*)P.grad_ptr + at, sn);
    }
  }
}

// y, w of a label map of any storage type (integer, or float: spec.float_labels).
inline int64_t load_labels_any(const TverskyParams& P, int64_t b, int64_t n0, int n,
                               int32_t* y, float* w) {
  switch (P.target_dtype) {
    case TV_UINT8: return load_labels<uint8_t>(P, b, n0, n, y, w);
    case TV_INT16: return load_labels<int16_t>(P, b, n0, n, y, w);
    case TV_INT32: return load_labels<int32_t>(P, b, n0, n, y, w);
    case TV_INT64: return load_labels<int64_t>(P, b, n0, n, y, w);
    case TV_FLOAT32: return load_labels<float>(P, b, n0, n, y, w);
    case TV_FLOAT16: return load_labels<f16>(P, b, n0, n, y, w);
    case TV_BFLOAT16: return load_labels<bf16>(P, b, n0, n, y, w);
    default: return load_labels<double>(P, b, n0, n, y, w);
  }
}

template <typename F>
inline int64_t load_soft_any(const TverskyParams& P, int64_t b, int64_t n0, int n,
                             F (*g)[TILE]) {
  switch (P.target_dtype) {
    case TV_FLOAT32: return load_soft<F, float>(P, b, n0, n, g);
    case TV_FLOAT16: return load_soft<F, f16>(P, b, n0, n, g);
    case TV_BFLOAT16: return load_soft<F, bf16>(P, b, n0, n, g);
    default: return load_soft<F, double>(P, b, n0, n, g);
  }
}

// g[c][i] (masked by w), w[i] for a terms path; returns the number of bad targets.
// Regions: g_c = bit c of region_masks[label]; a label outside the table (a bad one, or
// an ignored / padded lane, y = -1) has no bits.
template <typename F, int TK>
__attribute__((always_inline)) inline int64_t load_g(const TverskyParams& P, int64_t b,
                                                     int64_t n0, int n, F (*__restrict g)[TILE],
                                                     float* __restrict w,
                                                     int32_t* __restrict y) {
  const int64_t C = P.C;
  if constexpr (TK == TK_SOFT) {
    for (int i = 0; i < TILE; ++i) w[i] = i < n ? 1.f : 0.f;
    return load_soft_any<F>(P, b, n0, n, g);
  }
  const int64_t bad = load_labels_any(P, b, n0, n, y, w);
  if constexpr (TK == TK_REGIONS) {
    alignas(64) uint64_t m[TILE];
    const int64_t L = P.num_labels;
    for (int i = 0; i < TILE; ++i)
      m[i] = (y[i] >= 0 && y[i] < L) ? (uint64_t)P.region_masks_ptr[y[i]] : 0;
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < TILE; ++i) g[c][i] = (F)((m[i] >> c) & 1u);
  } else {
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < TILE; ++i) g[c][i] = y[i] == (int32_t)c ? (F)1 : (F)0;
  }
  return bad;
}

// The focal paths take SQ = (γ == 2), MONAI's default, as a template argument: the
// factors are then squares instead of an exp and a log per class and voxel.

// (1 - p)^γ for p in [0, 1], with 0^0 = 1 (pow_focal).
template <bool SQ, typename F>
inline F pow_one_minus(F p, F gamma) {
  return pow_focal<SQ>((F)1 - p, gamma);
}

// The sigmoid focal factor of _spec.py, m = exp(γ logsigmoid(-v)) = σ(-v)^γ with v = x s,
// s = 2q - 1, and σ(v) (the backward's), from es = exp(-|v|) and l = log1p(es):
// logsigmoid(-v) = -(max(v, 0) + l). A hard target (label maps and regions: q is 0 or 1,
// s = ±1, HARD) has |v| = |x|: es and l are the sigmoid's own e and the BCE's log1p(e),
// so the factor costs one exp more than the BCE (none with SQ).
template <bool HARD, bool SQ, typename F>
__attribute__((always_inline)) inline F sigmoid_focal_factor(F x, F q, F e, F l1p, F gamma,
                                                             F& sig_v) {
  F v, es, l;
  if constexpr (HARD) {
    v = q != (F)0 ? x : -x;
    es = std::abs(x) > (F)87 ? (F)0 : e;  // exactly 0 where fast_exp clamps: see exp_or_zero
    l = l1p;
  } else {
    v = x * ((F)2 * q - (F)1);
    es = exp_or_zero(-std::abs(v));
    l = log1p_small(es);
  }
  const F r = (F)1 / ((F)1 + es);
  sig_v = v >= (F)0 ? r : es * r;
  if constexpr (SQ) {
    const F sig_minus = v >= (F)0 ? es * r : r;  // σ(-v)
    return sig_minus * sig_minus;
  }
  return exp_or_zero(-gamma * (std::max(v, (F)0) + l));
}

// One work item of the forward through the terms paths: sample b, voxels [start, stop).
// CEK: TV_CE_NONE (regions without CE), TV_CE_PLAIN or TV_CE_FOCAL.
template <typename F, int TK, int CEK>
struct TermsForwardItem {
  static constexpr bool CE = CEK != TV_CE_NONE, FOCAL = CEK == TV_CE_FOCAL;
  const TverskyParams& P;
  const int64_t b, start, stop, C;
  const int S;  // stats columns: 3 + ce_columns
  const F eps, gamma;
  alignas(64) F x[MAX_C][TILE];
  alignas(64) F g[MAX_C][TILE];
  alignas(64) F lp[CE ? MAX_C : 1][TILE];  // softmax CE: (x_c - max) in CE units
  alignas(64) F acc_pg[MAX_C][TILE], acc_p[MAX_C][TILE], acc_g[MAX_C][TILE];
  alignas(64) F acc_ce[CE ? MAX_C : 1][TILE], acc_ce2[FOCAL ? MAX_C : 1][TILE];
  alignas(64) int32_t y[TILE];
  alignas(64) float w[TILE];
  int64_t nonfinite = 0, bad = 0;

  static int columns(const TverskyParams& P) {
    return 3 + (CE ? 1 : 0) + (FOCAL && P.activation == TV_SIGMOID ? 1 : 0);
  }

  __attribute__((always_inline)) TermsForwardItem(const TverskyParams& p, int64_t b_,
                                                  int64_t start_, int64_t stop_)
      : P(p), b(b_), start(start_), stop(stop_), C(p.C), S(columns(p)),
        eps(p.activation == TV_SOFTMAX ? (F)p.label_smoothing : (F)0),
        gamma((F)p.focal_gamma) {
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < TILE; ++i) {
        acc_pg[c][i] = acc_p[c][i] = acc_g[c][i] = (F)0;
        if constexpr (CE) acc_ce[c][i] = (F)0;
        if constexpr (FOCAL) acc_ce2[c][i] = (F)0;
      }
  }

  __attribute__((always_inline)) void run() {
    for (int64_t n0 = start; n0 < stop; n0 += TILE) {
      const int n = (int)std::min<int64_t>(TILE, stop - n0);
      nonfinite += load_logits_any<F>(P, b, n0, n, x);
      bad += load_g<F, TK>(P, b, n0, n, g, w, y);
      if (FOCAL && gamma == (F)2)
        activation_terms<FOCAL>();
      else
        activation_terms<false>();
      for (int64_t c = 0; c < C; ++c)
        for (int i = 0; i < TILE; ++i) {
          const F p = x[c][i] * (F)w[i];
          acc_p[c][i] += p;
          acc_pg[c][i] += p * g[c][i];
          acc_g[c][i] += g[c][i];
        }
    }
  }

  template <bool SQ>
  __attribute__((always_inline)) void activation_terms() {
    if (P.activation == TV_SOFTMAX)
      softmax_terms<SQ>();
    else if (P.activation == TV_SIGMOID)
      sigmoid_terms<SQ>();
  }

  // x: logits -> probabilities, and the (focal) CE of q into acc_ce, in CE units:
  // -log p_c = log s - (x_c - m), both parts >= 0, so they are summed as they come.
  template <bool SQ>
  __attribute__((always_inline)) void softmax_terms() {
    alignas(64) F m[TILE], s[TILE];
    for (int i = 0; i < TILE; ++i) m[i] = x[0][i];
    for (int64_t c = 1; c < C; ++c)
      for (int i = 0; i < TILE; ++i) m[i] = std::max(m[i], x[c][i]);
    for (int i = 0; i < TILE; ++i) s[i] = (F)0;
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < TILE; ++i) {
        if constexpr (CE) lp[c][i] = x[c][i] * ce_scale<F> - m[i] * ce_scale<F>;
        x[c][i] = fast_exp(x[c][i] - m[i]);
        s[i] += x[c][i];
      }
    for (int i = 0; i < TILE; ++i) {
      m[i] = fast_log(s[i]) * ce_scale<F>;  // log s, in CE units
      s[i] = (F)1 / s[i];
    }
    const F keep = (F)1 - eps, spread = eps / (F)C;
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < TILE; ++i) {
        const F p = x[c][i] * s[i];
        x[c][i] = p;
        if constexpr (CE) {
          const F q = (F)w[i] * (keep * g[c][i] + spread);
          F t = m[i] - lp[c][i];
          if constexpr (FOCAL) t *= pow_one_minus<SQ>(p, gamma);
          acc_ce[c][i] += q != (F)0 ? q * t : (F)0;  // q = 0 adds 0, even where t is inf
        }
      }
  }

  // x: logits -> probabilities, and BCE(x, q) (focal: h, q h) into acc_ce (acc_ce2).
  template <bool SQ>
  __attribute__((always_inline)) void sigmoid_terms() {
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < TILE; ++i) {
        const F v = x[c][i];
        if constexpr (!CE) {
          x[c][i] = (F)1 / ((F)1 + fast_exp(-v));
        } else {
          const F e = fast_exp(-std::abs(v));
          const F r = (F)1 / ((F)1 + e);
          const F q = g[c][i], vs = v * ce_scale<F>, l1p = log1p_small(e);
          F h = std::max(vs, (F)0) - vs * q + l1p * ce_scale<F>;
          if constexpr (FOCAL) {
            F unused;
            h *= sigmoid_focal_factor<TK != TK_SOFT, SQ>(v, q, e, l1p, gamma, unused);
            acc_ce2[c][i] += (F)w[i] * q * h;
          }
          acc_ce[c][i] += (F)w[i] * h;
          x[c][i] = v >= (F)0 ? r : e * r;
        }
      }
  }

  __attribute__((always_inline)) void finish(double* out, int64_t* flags) const {
    for (int64_t c = 0; c < C; ++c) {
      double s[5] = {0, 0, 0, 0, 0};
      for (int i = 0; i < TILE; ++i) {
        s[0] += (double)acc_pg[c][i];
        s[1] += (double)acc_p[c][i];
        s[2] += (double)acc_g[c][i];
        if constexpr (CE) s[3] += (double)acc_ce[c][i];
        if constexpr (FOCAL) s[4] += (double)acc_ce2[c][i];
      }
      for (int k = 0; k < S; ++k) out[c * S + k] = k < 3 ? s[k] : s[k] * CE_UNIT;
    }
    flags[0] = nonfinite;
    flags[1] = bad;
  }
};

// One work item of the backward through the terms paths: sample b, voxels [start, stop).
// u_c = A_c + B_c g_c (the Tversky part of dL/dp), then, per activation, the chain rule
// with the CE family's gradient added (_spec.py): softmax with t_k = e_k q_k (plain) or
// -a_k (focal), dz_k = p_k (w (u_k - Σ_c p_c u_c) + Σ_c t_c) - t_k.
template <typename F, int TK, int CEK>
struct TermsBackwardItem {
  static constexpr bool CE = CEK != TV_CE_NONE, FOCAL = CEK == TV_CE_FOCAL;
  const TverskyParams& P;
  const int64_t b, C;
  const F eps, gamma;
  alignas(64) F x[MAX_C][TILE];
  alignas(64) F g[MAX_C][TILE];
  alignas(64) F u[MAX_C][TILE];
  alignas(64) F lq[FOCAL ? MAX_C : 1][TILE];
  alignas(64) int32_t y[TILE];
  alignas(64) float w[TILE];
  F A[MAX_C], Bc[MAX_C], E[MAX_C], E2[MAX_C];

  __attribute__((always_inline)) TermsBackwardItem(const TverskyParams& p, int64_t b_)
      : P(p), b(b_), C(p.C), eps(p.activation == TV_SOFTMAX ? (F)p.label_smoothing : (F)0),
        gamma((F)p.focal_gamma) {
    const bool two = FOCAL && P.activation == TV_SIGMOID;
    for (int64_t c = 0; c < C; ++c) {
      A[c] = ((const F*)P.coef_a_ptr)[b * C + c];
      Bc[c] = ((const F*)P.coef_b_ptr)[b * C + c];
      E[c] = CE ? ((const F*)P.coef_ce_ptr)[b * C + c] : (F)0;
      E2[c] = two ? ((const F*)P.coef_ce2_ptr)[b * C + c] : (F)0;
    }
  }

  __attribute__((always_inline)) void run(int64_t start, int64_t stop) {
    for (int64_t n0 = start; n0 < stop; n0 += TILE) {
      const int n = (int)std::min<int64_t>(TILE, stop - n0);
      load_logits_any<F>(P, b, n0, n, x);
      load_g<F, TK>(P, b, n0, n, g, w, y);
      for (int64_t c = 0; c < C; ++c) {
        const F ac = A[c], bc = Bc[c];
        for (int i = 0; i < TILE; ++i) u[c][i] = ac + bc * g[c][i];
      }
      if (FOCAL && gamma == (F)2)
        activation_grad<FOCAL>();
      else
        activation_grad<false>();
      for (int64_t c = 0; c < C; ++c)
        store_grad_row(P, u[c], n, b, c, n0);
    }
  }

  template <bool SQ>
  __attribute__((always_inline)) void activation_grad() {
    if (P.activation == TV_SOFTMAX)
      softmax_grad<SQ>();
    else if (P.activation == TV_SIGMOID)
      sigmoid_grad<SQ>();
    else
      for (int64_t c = 0; c < C; ++c)
        for (int i = 0; i < TILE; ++i) u[c][i] *= (F)w[i];
  }

  // x: logits -> p; g -> t (the CE family's part of dL/dz: e q, or -a for focal);
  // u -> dL/dz. Focal: log p_c = (x_c - max) - log s, kept in lq.
  template <bool SQ>
  __attribute__((always_inline)) void softmax_grad() {
    alignas(64) F m[TILE], s[TILE], s1[TILE], st[TILE];
    for (int i = 0; i < TILE; ++i) m[i] = x[0][i];
    for (int64_t c = 1; c < C; ++c)
      for (int i = 0; i < TILE; ++i) m[i] = std::max(m[i], x[c][i]);
    for (int i = 0; i < TILE; ++i) s[i] = s1[i] = st[i] = (F)0;
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < TILE; ++i) {
        const F d = x[c][i] - m[i];
        if constexpr (FOCAL) lq[c][i] = d;
        x[c][i] = fast_exp(d);
        s[i] += x[c][i];
      }
    for (int i = 0; i < TILE; ++i) {
      if constexpr (FOCAL) m[i] = fast_log(s[i]);
      s[i] = (F)1 / s[i];
    }
    const F keep = (F)1 - eps, spread = eps / (F)C;
    for (int64_t c = 0; c < C; ++c) {
      const F ec = E[c];
      for (int i = 0; i < TILE; ++i) {
        const F p = x[c][i] * s[i];
        x[c][i] = p;
        s1[i] += p * u[c][i];
        if constexpr (CE) {
          const F q = (F)w[i] * (keep * g[c][i] + spread);
          F t = ec * q;
          if constexpr (FOCAL) {
            // -a_c = e q ((1 - p)^γ - γ p (1 - p)^(γ-1) log p), the γ part 0 where
            // p is 0 or 1 or q is 0 (p log p -> 0; a term with q = 0 is 0)
            const F omp = (F)1 - p, pw = pow_one_minus<SQ>(p, gamma);
            const bool inner = (omp > (F)0) & (p > (F)0) & (q != (F)0);
            const F gp = gamma * p * (lq[c][i] - m[i]) * pw / (inner ? omp : (F)1);
            t *= pw - (inner ? gp : (F)0);
          }
          g[c][i] = t;
          st[i] += t;
        }
      }
    }
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < TILE; ++i) {
        const F t = CE ? g[c][i] : (F)0;
        u[c][i] = x[c][i] * ((F)w[i] * (u[c][i] - s1[i]) + st[i]) - t;
      }
  }

  // dz_c = w (u_c p (1 - p) + the CE family's part), p = σ(x) from one exp.
  template <bool SQ>
  __attribute__((always_inline)) void sigmoid_grad() {
    for (int64_t c = 0; c < C; ++c) {
      const F ec = E[c], ec2 = E2[c];
      for (int i = 0; i < TILE; ++i) {
        const F v = x[c][i];
        const F e = fast_exp(-std::abs(v));
        const F r = (F)1 / ((F)1 + e);
        const F p = v >= (F)0 ? r : e * r;
        F du = u[c][i] * p * ((F)1 - p);
        if constexpr (CE) {
          const F q = g[c][i];
          if constexpr (FOCAL) {
            const F l1p = log1p_small(e);
            const F bce = std::max(v, (F)0) - v * q + l1p;
            F sig_xs;
            const F mf = sigmoid_focal_factor<TK != TK_SOFT, SQ>(v, q, e, l1p, gamma, sig_xs);
            const F sgn = (F)2 * q - (F)1;
            du += (ec + ec2 * q) * mf * (p - q - gamma * sgn * sig_xs * bce);
          } else {
            du += ec * (p - q);
          }
        }
        u[c][i] = (F)w[i] * du;
      }
    }
  }
};

// ---- dtype dispatch -------------------------------------------------------------------------
// Dir (Forward or Backward) names the work items of one direction: the fast paths'
// <logits storage, target storage, soft, CE> and the terms paths' <compute type, target
// kind, CE kind>.
struct Forward {
  static constexpr bool BACKWARD = false;
  template <typename LT, typename TT, bool SOFT, bool CE>
  static int fast(const TverskyParams& P) { return forward_items<ForwardItem<LT, TT, SOFT, CE>>(P); }
  template <typename F, int TK, int CEK>
  static int terms(const TverskyParams& P) {
    return forward_items<TermsForwardItem<F, TK, CEK>>(P);
  }
};
struct Backward {
  static constexpr bool BACKWARD = true;
  template <typename LT, typename TT, bool SOFT, bool CE>
  static int fast(const TverskyParams& P) { return backward_items<BackwardItem<LT, TT, SOFT, CE>>(P); }
  template <typename F, int TK, int CEK>
  static int terms(const TverskyParams& P) {
    return backward_items<TermsBackwardItem<F, TK, CEK>>(P);
  }
};

template <class Dir, typename LT, bool CE>
int dispatch_labels(const TverskyParams& P) {
  switch (P.target_dtype) {
    case TV_UINT8: return Dir::template fast<LT, uint8_t, false, CE>(P);
    case TV_INT16: return Dir::template fast<LT, int16_t, false, CE>(P);
    case TV_INT32: return Dir::template fast<LT, int32_t, false, CE>(P);
    case TV_INT64: return Dir::template fast<LT, int64_t, false, CE>(P);
    // float32 label maps (nnU-Net's and MONAI's), read directly (to_label)
    case TV_FLOAT32: return Dir::template fast<LT, float, false, CE>(P);
  }
  return TV_ERR_TARGET_DTYPE;
}

template <class Dir, typename LT>
int dispatch_fast(const TverskyParams& P) {
  if (P.soft_target) {
    switch (P.target_dtype) {
      case TV_FLOAT32: return Dir::template fast<LT, float, true, false>(P);
      case TV_FLOAT16: return Dir::template fast<LT, f16, true, false>(P);
      case TV_BFLOAT16: return Dir::template fast<LT, bf16, true, false>(P);
      case TV_FLOAT64: return Dir::template fast<LT, double, true, false>(P);
    }
    return TV_ERR_TARGET_DTYPE;
  }
  // The CE term is a separate instantiation, so the Tversky-only loops stay as they were.
  return P.ce_kind ? dispatch_labels<Dir, LT, true>(P) : dispatch_labels<Dir, LT, false>(P);
}

template <class Dir, typename F, int TK>
int dispatch_terms_ce(const TverskyParams& P) {
  if (P.ce_kind == TV_CE_FOCAL) return Dir::template terms<F, TK, TV_CE_FOCAL>(P);
  if (P.ce_kind == TV_CE_PLAIN) return Dir::template terms<F, TK, TV_CE_PLAIN>(P);
  if constexpr (TK == TK_SOFT) return TV_ERR_CE;  // not reached: soft without CE is fast
  return Dir::template terms<F, TK, TV_CE_NONE>(P);
}

template <class Dir, typename F>
int dispatch_terms(const TverskyParams& P) {
  if (P.region_masks_ptr) return dispatch_terms_ce<Dir, F, TK_REGIONS>(P);
  if (P.soft_target) return dispatch_terms_ce<Dir, F, TK_SOFT>(P);
  return dispatch_terms_ce<Dir, F, TK_LABELS>(P);
}

// Whether a call takes a terms path: regions, soft targets with CE, label maps stored as
// float16/bfloat16/float64, and focal CE other than softmax without smoothing.
// Label smoothing and that focal CE on the other label maps stay on the fast paths
// (ForwardItem, BackwardItem).
inline bool needs_terms(const TverskyParams& P) {
  if (P.region_masks_ptr) return true;
  if (P.soft_target) return P.ce_kind != TV_CE_NONE;
  if (P.target_dtype >= TV_FLOAT16 && P.target_dtype <= TV_FLOAT64) return true;
  if (P.ce_kind != TV_CE_FOCAL) return false;
  return !(P.activation == TV_SOFTMAX && P.label_smoothing == 0.0);
}

// What no path covers, as a TverskyError (0: every path can run it).
int check_params(const TverskyParams& P, bool backward) {
  const bool soft_dtype = P.target_dtype >= TV_FLOAT32 && P.target_dtype <= TV_FLOAT64;
  const bool label_dtype = soft_dtype || (P.target_dtype >= TV_UINT8 && P.target_dtype <= TV_INT64);
  const bool regions = P.region_masks_ptr != nullptr;
  if (P.C < 1 || P.C > MAX_C || (regions && P.C > 63)) return TV_ERR_NUM_CLASSES;
  if (!(P.soft_target ? soft_dtype : label_dtype)) return TV_ERR_TARGET_DTYPE;
  if (regions && (P.soft_target || P.activation == TV_SOFTMAX)) return TV_ERR_ACTIVATION;
  if (P.ce_kind < TV_CE_NONE || P.ce_kind > TV_CE_FOCAL) return TV_ERR_CE;
  // cross-entropy: softmax or sigmoid only; the backward needs its coefficients
  if (P.ce_kind && P.activation == TV_NONE) return TV_ERR_CE;
  const bool two_columns = P.ce_kind == TV_CE_FOCAL && P.activation == TV_SIGMOID;
  if (backward && P.ce_kind && (!P.coef_ce_ptr || (two_columns && !P.coef_ce2_ptr)))
    return TV_ERR_CE;
  return TV_OK;
}

template <class Dir>
int dispatch(const TverskyParams& P) {
  if (const int err = check_params(P, Dir::BACKWARD)) return err;
  if (P.logits_dtype < TV_FLOAT32 || P.logits_dtype > TV_FLOAT64) return TV_ERR_LOGITS_DTYPE;
  if (needs_terms(P))
    return P.logits_dtype == TV_FLOAT64 ? dispatch_terms<Dir, double>(P)
                                        : dispatch_terms<Dir, float>(P);
  switch (P.logits_dtype) {
    case TV_FLOAT32: return dispatch_fast<Dir, float>(P);
    case TV_FLOAT16: return dispatch_fast<Dir, f16>(P);
    case TV_BFLOAT16: return dispatch_fast<Dir, bf16>(P);
  }
  return dispatch_fast<Dir, double>(P);
}

}  // namespace

extern "C" {
// Return 0 (TV_OK) or a negative TverskyError (csrc/tversky.h).
int tversky_cpu_forward(const TverskyParams* params) { return dispatch<Forward>(*params); }
int tversky_cpu_backward(const TverskyParams* params) { return dispatch<Backward>(*params); }
int tversky_cpu_max_classes() { return MAX_C; }
// sizeof(TverskyParams) as compiled: the loader checks it against its ctypes mirror.
int64_t tversky_cpu_params_size() { return (int64_t)sizeof(TverskyParams); }
}

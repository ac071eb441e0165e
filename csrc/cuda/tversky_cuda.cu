// fasttversky: the CUDA kernels of the fused Tversky loss. No torch here: everything the
// kernels need arrives in csrc/tversky.h's plain TverskyParams; the only torch-facing
// file is fasttversky/ops/cuda.py, which builds this file with nvcc, loads it with
// ctypes and calls the extern "C" launchers at the bottom on torch's current stream.
//
// The math is derived once, in csrc/tversky.h. In short, per (sample b, class c) over the
// non-ignored voxels (mask w):
//   forward:  sum_pg = Σ w p g,  sum_p = Σ w p,  sum_g = Σ w g
//   CE family (template CE; contract: fasttversky/_spec.py): one or two more sums per
//             (b, c) with the CE target q_c = (1 - ε) g_c + ε / C (softmax) or g_c:
//             kCeLabel (one-hot label maps, regions for sigmoid): -log p_y = log s -
//             (x_y - m) from the softmax's own max and exp sum, into the label's class,
//             or BCE = max(x,0) - x g + log1p(e), e = exp(-|x|); backward e_y (p_k -
//             [k = y]) or e_c (p_c - g_c), e = coef_ce. kCeSoft (soft targets, label
//             smoothing): Σ_c q_c (log s + m - x_c), backward p_k Σ e_c q_c - e_k q_k;
//             kCeFocal: MONAI's focal term (softmax, or sigmoid with two columns).
//             kNoCE compiles the Tversky-only code.
//   backward: u_c = dL/dp_c = w (A_c + B_c g_c)  (affine in g: A = dL/dsum_p,
//             B = dL/dsum_pg come from the host's O(B·C) autograd), then
//             softmax dz_k = p_k (u_k - Σ_c p_c u_c); sigmoid dz_c = u_c p_c (1 - p_c);
//             none dx_c = u_c.
//
// Work shape:
//   _tversky_fwd_partials_kernel  grid (G, B), 256 threads. Each thread owns VEC
//       consecutive voxels per step and walks the sample's volume grid-stride; it holds
//       the C·VEC logits of its step in registers, computes the activation there, reads
//       the integer labels and compares them with the class index (no one-hot), and
//       accumulates per-class sums in fp32 registers. At the end: warp-shuffle
//       butterfly, then warps in a fixed order through shared memory, into ONE partial
//       [sum_pg, sum_p, sum_g] per (b, block). No atomics.
//   _tversky_finalize_kernel      one block: adds the G partials of every (b, c) in
//       float64, in block order. Together: the result depends only on the shape and the
//       device's SM count (which fixes G), so repeated calls are bitwise equal.
//   _tversky_bwd_kernel           grid (G, B), elementwise; recomputes p from the logits
//       (saving p would cost a logits-sized buffer) and writes dL/dlogits once.
//
// Templates: logits storage type T (float, __half, __nv_bfloat16; compute is fp32 —
// float64 logits go to the triton backend, see ops/cuda.py), activation ACT (TV_SOFTMAX,
// or TV_SIGMOID for the two per-element activations: sigmoid and none differ by one
// uniform run-time branch), and MAXC, a bound on C (4 or 8) so that a voxel's classes
// live in registers (C > 8 goes to the triton backend), and the CE variant (above). The
// target's type (uint8/int16/int32/int64 or float label maps, or a float soft target) and
// a region table are run-time switches at the load: uniform over the grid (no
// divergence), touching only the load, while templating on them multiplied the
// instantiations, and nvcc's build time. A label becomes one 32-bit word as it is loaded
// (label_word: its class bits and the voxel's mask). VEC = voxels per thread per step: 16
// bytes of one class's logits when the layout allows (stride_n == 1, aligned rows), fewer
// when MAXC is large so that MAXC·VEC logits still fit in 64 registers.
// Every kernel is __launch_bounds__(kThreads, 1): with the one-block minimum stated, ptxas
// gives a variant the registers it needs (at most 255) instead of squeezing some under an
// occupancy step (80 or 128) with spills, which it did depending on unrelated code in the
// same kernel (bench/ptxas_report.py prints the table; tests/test_cuda_build.py checks it).
// TODO(perf): channels_last_3d logits (stride_c == 1, stride_n == C) take the scalar
// path; a per-voxel packet over the classes would make them vector loads too.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "../tversky.h"

// Launches go through TV_LAUNCH so that tests can run these very kernels without a GPU:
// compiled by a host C++ compiler with -DTV_HOST_EMULATION, host_emulation.h runs each
// block's threads as std::threads (see tests/test_cuda_build.py). Under nvcc it is the
// plain <<<>>> launch.
#ifdef TV_HOST_EMULATION
#include "host_emulation.h"
#else
#include <cuda_runtime.h>
#define TV_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#define TV_LAST_ERROR() ((int)cudaGetLastError())
// This library carries its own (static) CUDA runtime, whose current device is not
// torch's: every launcher selects the tensors' device itself.
#define TV_SET_DEVICE(d) ((int)cudaSetDevice(d))
#endif

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Storage type T <-> the fp32 the kernels compute in.
template <typename T>
struct Convert;
template <>
struct Convert<float> {
  __device__ __forceinline__ static float to_float(float v) { return v; }
  __device__ __forceinline__ static float from_float(float v) { return v; }
};
template <>
struct Convert<__half> {
  __device__ __forceinline__ static float to_float(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_float(float v) { return __float2half_rn(v); }
};
template <>
struct Convert<__nv_bfloat16> {
  __device__ __forceinline__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
};

// VEC elements of T moved as one aligned access (ld.global.v4 / v2 when 16 / 8 bytes).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Packet {
  T v[VEC];
};

template <typename T, int MAXC>
__host__ __device__ constexpr int vec_width() {
  // 16-byte loads, limited so that a thread's MAXC x VEC logits stay <= 64 registers.
  constexpr int by_bytes = 16 / (int)sizeof(T);
  constexpr int by_regs = 64 / MAXC > 0 ? 64 / MAXC : 1;
  return by_bytes < by_regs ? by_bytes : by_regs;
}

// Load VEC values starting at voxel n0 of one (b, c) row; out-of-range voxels read 0.
// `vec` says the whole row is contiguous and aligned for Packet loads (host-checked).
template <typename T, int VEC>
__device__ __forceinline__ void load_row(const T* __restrict__ row, int64_t stride_n,
                                         int64_t n0, int64_t N, bool vec, float (&out)[VEC]) {
  if (vec && n0 + VEC <= N) {
    const Packet<T, VEC> pk = *reinterpret_cast<const Packet<T, VEC>*>(row + n0);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = Convert<T>::to_float(pk.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i)
      out[i] = (n0 + i < N) ? Convert<T>::to_float(row[(n0 + i) * stride_n]) : 0.f;
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_row(T* __restrict__ row, int64_t stride_n, int64_t n0,
                                          int64_t N, bool vec, const float (&val)[VEC]) {
  if (vec && n0 + VEC <= N) {
    Packet<T, VEC> pk;
#pragma unroll
    for (int i = 0; i < VEC; ++i) pk.v[i] = Convert<T>::from_float(val[i]);
    *reinterpret_cast<Packet<T, VEC>*>(row + n0) = pk;
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i)
      if (n0 + i < N) row[(n0 + i) * stride_n] = Convert<T>::from_float(val[i]);
  }
}

// A stored label as int64. Integer labels convert exactly. A float label map (nnU-Net's
// and MONAI's are float) must hold a finite integral value: anything else becomes `bad`,
// a value outside [0, num_labels) that is not ignore_index, so that it is counted like a
// label out of range. |v| < 2^63 keeps the conversion defined (NaN fails every test).
template <typename L>
__device__ __forceinline__ int64_t label_value(L v, int64_t) {
  return (int64_t)v;
}
__device__ __forceinline__ int64_t label_value(float v, int64_t bad) {
  return (v == floorf(v) && v >= -0x1p63f && v < 0x1p63f) ? (int64_t)v : bad;
}
__device__ __forceinline__ int64_t label_value(double v, int64_t bad) {
  return (v == floor(v) && v >= -0x1p63 && v < 0x1p63) ? (int64_t)v : bad;
}
__device__ __forceinline__ int64_t label_value(__half v, int64_t bad) {
  return label_value(__half2float(v), bad);
}
__device__ __forceinline__ int64_t label_value(__nv_bfloat16 v, int64_t bad) {
  return label_value(__bfloat162float(v), bad);
}

// A label map's voxel as one word: bit c = g_c (c < C <= 8), bit 31 (kKeep) = the voxel
// counts (w = 1: inside the volume, not ignore_index). g_c is label == c, label == 1 for
// a binary (C == 1) map, or bit c of region_masks[label] (regions); a label out of range
// has no bit set and adds 1 to n_bad.
constexpr uint32_t kKeep = 1u << 31;

__device__ __forceinline__ uint32_t label_word(const TverskyParams& p, int64_t y, bool inside,
                                               int& n_bad) {
  const bool keep = inside && !(p.has_ignore_index && y == p.ignore_index);
  const bool valid = y >= 0 && y < p.num_labels;
  n_bad += keep && !valid;
  uint32_t g;
  if (p.region_masks_ptr != nullptr)
    g = valid ? (uint32_t)(p.region_masks_ptr[y] & 0xff) : 0u;
  else if (p.binary_labels)
    g = y == 1 ? 1u : 0u;
  else
    g = valid && y < 31 ? 1u << y : 0u;
  return keep ? (g | kKeep) : 0u;
}

// label_word() of voxels n0 .. n0 + VEC - 1 of one row of labels of type L: each label
// is turned into its word as it is loaded (no int64 array of labels is kept).
template <typename L, int VEC>
__device__ __forceinline__ int load_label_words(const TverskyParams& p, const L* __restrict__ row,
                                                int64_t n0, bool vec, int64_t bad,
                                                uint32_t (&bits)[VEC]) {
  int n_bad = 0;
  if (vec && n0 + VEC <= p.N) {
    const Packet<L, VEC> pk = *reinterpret_cast<const Packet<L, VEC>*>(row + n0);
#pragma unroll
    for (int i = 0; i < VEC; ++i) bits[i] = label_word(p, label_value(pk.v[i], bad), true, n_bad);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const bool inside = n0 + i < p.N;
      const int64_t y = inside ? label_value(row[(n0 + i) * p.target_stride_n], bad) : 0;
      bits[i] = label_word(p, y, inside, n_bad);
    }
  }
  return n_bad;
}

template <typename L, int VEC>
__device__ __forceinline__ int label_bits_as(const TverskyParams& p, int64_t b, int64_t n0,
                                             bool vec, int64_t bad, uint32_t (&bits)[VEC]) {
  return load_label_words<L, VEC>(p, static_cast<const L*>(p.target_ptr) + b * p.target_stride_b,
                                  n0, vec, bad, bits);
}

// The words of voxels n0..n0+VEC-1 of sample b's label map; returns the number of bad
// labels. Labels are widened to int64 so that every stored value (negative, beyond
// int32) is compared exactly. vec: Packet loads are legal. The dtype switch is uniform
// over the grid; float label maps only reach it with spec.float_labels (a float target is
// otherwise a soft target).
template <int VEC>
__device__ __forceinline__ int load_label_bits(const TverskyParams& p, int64_t b, int64_t n0,
                                               bool vec, uint32_t (&bits)[VEC]) {
  // what a bad float label becomes: out of range, and never ignore_index
  const int64_t bad = (p.has_ignore_index && p.ignore_index == INT64_MIN) ? INT64_MAX : INT64_MIN;
  switch (p.target_dtype) {
    case TV_UINT8: return label_bits_as<uint8_t, VEC>(p, b, n0, vec, bad, bits);
    case TV_INT16: return label_bits_as<int16_t, VEC>(p, b, n0, vec, bad, bits);
    case TV_INT32: return label_bits_as<int32_t, VEC>(p, b, n0, vec, bad, bits);
    case TV_FLOAT32: return label_bits_as<float, VEC>(p, b, n0, vec, bad, bits);
    case TV_FLOAT16: return label_bits_as<__half, VEC>(p, b, n0, vec, bad, bits);
    case TV_BFLOAT16: return label_bits_as<__nv_bfloat16, VEC>(p, b, n0, vec, bad, bits);
    case TV_FLOAT64: return label_bits_as<double, VEC>(p, b, n0, vec, bad, bits);
    default: return label_bits_as<int64_t, VEC>(p, b, n0, vec, bad, bits);
  }
}

__device__ __forceinline__ float bit_g(uint32_t bits, int c) { return (float)((bits >> c) & 1u); }
__device__ __forceinline__ float bit_w(uint32_t bits) { return (float)(bits >> 31); }

// One soft-target value; the dtype switch is uniform across the grid (no divergence).
__device__ __forceinline__ float load_soft(const void* base, int32_t dtype, int64_t off) {
  switch (dtype) {
    case TV_FLOAT16: return __half2float(static_cast<const __half*>(base)[off]);
    case TV_BFLOAT16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[off]);
    case TV_FLOAT64: return (float)static_cast<const double*>(base)[off];
    default: return static_cast<const float*>(base)[off];
  }
}

// The cross-entropy is summed in units of kCeUnit: each term is multiplied by kCeScale =
// 1 / kCeUnit as it is formed (the logits before their difference is taken), and the
// finalize's float64 sum by kCeUnit. A voxel's CE can exceed float32's range while the
// loss does not (logits near +-3e38: a gap of up to 2 x FLT_MAX between two classes); in
// these units a block's sum over up to 2^31 voxels fits. Scaling by a power of two is
// exact, so every sum rounds as the unscaled one did (only terms below 2^-92, subnormal
// once scaled, lose bits).
constexpr float kCeScale = 0x1p-34f;
constexpr float kCeUnitF = 0x1p34f;
constexpr double kCeUnit = 0x1p34;

// Which CE-family code a kernel carries (template CE), from TverskyParams' ce_kind, target
// and label_smoothing (see dispatch()). Each is compiled only where it is used, so the
// kNoCE kernels are the Tversky-only code and kCeLabel the hard-label CE of before.
constexpr int kNoCE = 0;     // Tversky sums only
constexpr int kCeLabel = 1;  // CE / BCE on a label map (regions too), no smoothing
constexpr int kCeSoft = 2;   // CE / BCE on a general target q: soft target, label smoothing
constexpr int kCeFocal = 3;  // the focal term, any target

// CE-family stats columns after [sum_pg, sum_p, sum_g] (fasttversky/_spec.py ce_columns).
__host__ __device__ constexpr int ce_columns(int act, int ce) {
  return ce == kNoCE ? 0 : (ce == kCeFocal && act == TV_SIGMOID) ? 2 : 1;
}

// max over the first C classes of voxel i (the softmax's shift).
template <int MAXC, int VEC>
__device__ __forceinline__ float class_max(const float (&x)[MAXC][VEC], int C, int i) {
  float m = x[0][i];
#pragma unroll
  for (int c = 1; c < MAXC; ++c)
    if (c < C) m = fmaxf(m, x[c][i]);
  return m;
}

// p in place of x, for the first C rows (rows >= C are left untouched and never read).
template <int ACT, int MAXC, int VEC>
__device__ __forceinline__ void activate(float (&x)[MAXC][VEC], int C, int activation) {
  if (ACT == TV_SOFTMAX) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float m = class_max(x, C, i);
      float s = 0.f;
#pragma unroll
      for (int c = 0; c < MAXC; ++c)
        if (c < C) {
          x[c][i] = expf(x[c][i] - m);  // max-subtracted: no overflow
          s += x[c][i];
        }
      const float inv = 1.f / s;
#pragma unroll
      for (int c = 0; c < MAXC; ++c)
        if (c < C) x[c][i] *= inv;
    }
  } else if (activation == TV_SIGMOID) {
#pragma unroll
    for (int c = 0; c < MAXC; ++c)
      if (c < C) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) x[c][i] = 1.f / (1.f + expf(-x[c][i]));
      }
  }
  // TV_NONE: the inputs already are probabilities.
}

// activate() plus the cross-entropy of each voxel on a label map, added to acc_ce
// (kCeLabel kernels). bits: label_bits() of voxels n0 .. n0 + VEC - 1 (one class bit at
// most with softmax). softmax: -log p_y = log s - (x_y - m) into row y, one logf per
// voxel next to the C expf; sigmoid: BCE(x_c, g_c) into every row, with p = 1/(1+e) or
// e/(1+e) from the same e = exp(-|x|).
template <int ACT, int MAXC, int VEC>
__device__ __forceinline__ void activate_ce(float (&x)[MAXC][VEC], int C,
                                            const uint32_t (&bits)[VEC], float (&acc_ce)[MAXC]) {
  if (ACT == TV_SOFTMAX) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float m = class_max(x, C, i);
      float s = 0.f, xy = 0.f;
#pragma unroll
      for (int c = 0; c < MAXC; ++c)
        if (c < C) {
          xy = ((bits[i] >> c) & 1u) ? x[c][i] : xy;
          x[c][i] = expf(x[c][i] - m);
          s += x[c][i];
        }
      const float l = (bits[i] & kKeep) ? logf(s) * kCeScale - (xy * kCeScale - m * kCeScale) : 0.f;
      const float inv = 1.f / s;
#pragma unroll
      for (int c = 0; c < MAXC; ++c)
        if (c < C) {
          x[c][i] *= inv;
          acc_ce[c] += ((bits[i] >> c) & 1u) ? l : 0.f;
        }
    }
  } else {
#pragma unroll
    for (int c = 0; c < MAXC; ++c)
      if (c < C) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float v = x[c][i];
          const float e = expf(-fabsf(v));
          const float r = 1.f / (1.f + e);
          const float g = bit_g(bits[i], c);
          const float vs = v * kCeScale;  // BCE in CE units
          acc_ce[c] += (bits[i] & kKeep) ? fmaxf(vs, 0.f) - vs * g + log1pf(e) * kCeScale : 0.f;
          x[c][i] = v >= 0.f ? r : e * r;
        }
      }
  }
}

// Butterfly over the 32 lanes: every lane ends with the same, order-fixed sum.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}
__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// The logits of voxels n0 .. n0 + VEC - 1 of the first C classes of one sample (xb) into
// x, in fp32; out-of-range voxels read 0.
template <typename T, int MAXC, int VEC>
__device__ __forceinline__ void load_logits(const T* __restrict__ xb, int64_t stride_c,
                                            int64_t stride_n, int C, int64_t n0, int64_t N,
                                            bool vec_x, float (&x)[MAXC][VEC]) {
#pragma unroll
  for (int c = 0; c < MAXC; ++c)
    if (c < C) load_row<T, VEC>(xb + c * stride_c, stride_n, n0, N, vec_x, x[c]);
}

// How many of those logits are NaN or inf.
template <int MAXC, int VEC>
__device__ __forceinline__ int count_nonfinite(const float (&x)[MAXC][VEC], int C, int64_t n0,
                                               int64_t N) {
  int n = 0;
#pragma unroll
  for (int c = 0; c < MAXC; ++c)
    if (c < C)
#pragma unroll
      for (int i = 0; i < VEC; ++i) n += (n0 + i < N) && !isfinite(x[c][i]);
  return n;
}

// Adds one step's soft-target sums (g read per class and voxel from target + off_b, any
// float dtype; every voxel counts) to a thread's running sums; returns how many target
// values are outside [0, 1] or NaN.
template <int MAXC, int VEC>
__device__ __forceinline__ int add_soft_target(const void* target, int32_t dtype, int64_t off_b,
                                               int64_t stride_c, int64_t stride_n, int C,
                                               int64_t n0, int64_t N,
                                               const float (&x)[MAXC][VEC],
                                               float (&acc_pg)[MAXC], float (&acc_p)[MAXC],
                                               float (&acc_g)[MAXC]) {
  int n_bad = 0;
#pragma unroll
  for (int c = 0; c < MAXC; ++c)
    if (c < C)
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        if (n0 + i >= N) continue;
        const float g = load_soft(target, dtype, off_b + c * stride_c + (n0 + i) * stride_n);
        n_bad += !(g >= 0.f && g <= 1.f);  // NaN fails both
        acc_pg[c] += x[c][i] * g;
        acc_p[c] += x[c][i];
        acc_g[c] += g;
      }
  return n_bad;
}

// The same for a label map: g = bit c of label_bits() on kept voxels (a one-hot is never
// built); the bad labels were counted by label_bits().
template <int MAXC, int VEC>
__device__ __forceinline__ void add_label_map(int C, const uint32_t (&bits)[VEC],
                                              const float (&x)[MAXC][VEC],
                                              float (&acc_pg)[MAXC], float (&acc_p)[MAXC],
                                              float (&acc_g)[MAXC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    if (!(bits[i] & kKeep)) continue;
#pragma unroll
    for (int c = 0; c < MAXC; ++c)
      if (c < C) {
        const float g = bit_g(bits[i], c);
        acc_pg[c] += x[c][i] * g;
        acc_p[c] += x[c][i];
        acc_g[c] += g;
      }
  }
}

// The block's sums in a fixed order (lanes by butterfly, then warps 0..kWarps-1) into its
// partial (S, C), S = 3 + NCE, and counts (2,).
template <int MAXC, int NCE>
__device__ __forceinline__ void store_block_sums(int C, const float (&acc_pg)[MAXC],
                                                 const float (&acc_p)[MAXC],
                                                 const float (&acc_g)[MAXC],
                                                 const float (&acc_ce)[NCE > 0 ? MAXC : 1],
                                                 const float (&acc_ce2)[NCE > 1 ? MAXC : 1],
                                                 int n_nonfinite, int n_bad,
                                                 float* __restrict__ partial,
                                                 int* __restrict__ count) {
  constexpr int S = 3 + NCE;
  __shared__ float s_acc[kWarps][S * MAXC];
  __shared__ int s_cnt[kWarps][2];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int c = 0; c < MAXC; ++c) {
    if (c >= C) break;
    const float a = warp_sum(acc_pg[c]), q = warp_sum(acc_p[c]), g = warp_sum(acc_g[c]);
    if (lane == 0) {
      s_acc[warp][c] = a;
      s_acc[warp][MAXC + c] = q;
      s_acc[warp][2 * MAXC + c] = g;
    }
    if constexpr (NCE > 0) {
      const float e = warp_sum(acc_ce[c]);
      if (lane == 0) s_acc[warp][3 * MAXC + c] = e;
    }
    if constexpr (NCE > 1) {
      const float e = warp_sum(acc_ce2[c]);
      if (lane == 0) s_acc[warp][4 * MAXC + c] = e;
    }
  }
  n_nonfinite = warp_sum(n_nonfinite);
  n_bad = warp_sum(n_bad);
  if (lane == 0) {
    s_cnt[warp][0] = n_nonfinite;
    s_cnt[warp][1] = n_bad;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < S * C; j += kThreads) {
    const int k = j / C, c = j % C;
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += s_acc[w][k * MAXC + c];
    partial[j] = s;  // layout (S, C): j = k*C + c
  }
  if (threadIdx.x < 2) {
    int s = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += s_cnt[w][threadIdx.x];
    count[threadIdx.x] = s;
  }
}

// ---------------------------------------------------------------------------------------
// The general CE-family terms (kCeSoft, kCeFocal): a target q per class, read from a soft
// target or a label map (with label smoothing: q = (1 - ε) g + ε / C).
// ---------------------------------------------------------------------------------------

// The target of voxel n0 + i for class c: a soft target's value (read where it is needed;
// the second read of a value hits L1) or a label map's bit. w(i): the voxel counts;
// q(g, i): the CE target w ((1 - ε) g + ε / C) (ε = 0 for sigmoid).
template <int VEC>
struct TargetAt {
  const TverskyParams& p;
  const uint32_t (&bits)[VEC];
  int64_t off_b, n0;
  float keep, eps_c;  // 1 - ε, ε / C

  __device__ __forceinline__ float g(int c, int i) const {
    if (!p.soft_target) return bit_g(bits[i], c);
    if (n0 + i >= p.N) return 0.f;
    return load_soft(p.target_ptr, p.target_dtype,
                     off_b + c * p.target_stride_c + (n0 + i) * p.target_stride_n);
  }
  __device__ __forceinline__ float w(int i) const {
    if (!p.soft_target) return bit_w(bits[i]);
    return n0 + i < p.N ? 1.f : 0.f;
  }
  __device__ __forceinline__ float q(float g, int i) const { return w(i) * (keep * g + eps_c); }
  // a soft target value outside [0, 1] or NaN (label maps: counted by label_bits())
  __device__ __forceinline__ int bad(float g, int i) const {
    return p.soft_target && n0 + i < p.N && !(g >= 0.f && g <= 1.f);
  }
};

template <int ACT, int VEC>
__device__ __forceinline__ TargetAt<VEC> target_at(const TverskyParams& p, int64_t b, int64_t n0,
                                                   const uint32_t (&bits)[VEC]) {
  const float eps = ACT == TV_SOFTMAX ? (float)p.label_smoothing : 0.f;
  return TargetAt<VEC>{p, bits, b * p.target_stride_b, n0, 1.f - eps, eps / (float)p.C};
}

// Softmax with the kCeSoft CE: x becomes p. -log p_c = log s + (m - x_c) is summed in its
// two parts, both >= 0 (nothing cancels): acc_ce[c] += w q_c (m - x_c) here, while the
// target is at hand, and ls[i] = log s (CE units) for add_sums(), which reads q again.
template <int MAXC, int VEC>
__device__ __forceinline__ void softmax_ce_q(float (&x)[MAXC][VEC], int C, const TargetAt<VEC>& t,
                                             float (&acc_ce)[MAXC], float (&ls)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const float m = class_max(x, C, i);
    float s = 0.f;
#pragma unroll
    for (int c = 0; c < MAXC; ++c)
      if (c < C) {
        acc_ce[c] += t.q(t.g(c, i), i) * (m * kCeScale - x[c][i] * kCeScale);
        x[c][i] = expf(x[c][i] - m);
        s += x[c][i];
      }
    ls[i] = logf(s) * kCeScale;
    const float inv = 1.f / s;
#pragma unroll
    for (int c = 0; c < MAXC; ++c)
      if (c < C) x[c][i] *= inv;
  }
}

// Softmax with the focal term: x becomes p, acc_ce[c] += w q_c (1 - p_c)^γ (-log p_c).
// log p_c = (x_c - m) - log s is kept in CE units (finite for any finite logits) and p_c
// taken from it, a second expf per class, since both are needed together.
template <int MAXC, int VEC>
__device__ __forceinline__ void softmax_focal(float (&x)[MAXC][VEC], int C, const TargetAt<VEC>& t,
                                              float gamma, float (&acc_ce)[MAXC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const float m = class_max(x, C, i);
    float s = 0.f;
#pragma unroll
    for (int c = 0; c < MAXC; ++c)
      if (c < C) {
        s += expf(x[c][i] - m);
        x[c][i] = x[c][i] * kCeScale - m * kCeScale;
      }
    const float ls = logf(s) * kCeScale;
#pragma unroll
    for (int c = 0; c < MAXC; ++c)
      if (c < C) {
        const float lp = x[c][i] - ls, pc = expf(lp * kCeUnitF);
        acc_ce[c] -= t.q(t.g(c, i), i) * powf(1.f - pc, gamma) * lp;
        x[c][i] = pc;
      }
  }
}

// The Tversky sums of one step from x = p and the target; with LS, also the log s share
// w q_c ls[i] of the kCeSoft CE. Returns the number of bad soft-target values.
template <bool LS, int MAXC, int VEC>
__device__ __forceinline__ int add_sums(int C, const float (&x)[MAXC][VEC],
                                        const TargetAt<VEC>& t, const float (&ls)[VEC],
                                        float (&acc_pg)[MAXC], float (&acc_p)[MAXC],
                                        float (&acc_g)[MAXC], float (&acc_ce)[MAXC]) {
  int n_bad = 0;
#pragma unroll
  for (int c = 0; c < MAXC; ++c)
    if (c < C)
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float g = t.g(c, i);
        n_bad += t.bad(g, i);
        if (!(t.w(i) > 0.f)) continue;
        acc_pg[c] += x[c][i] * g;
        acc_p[c] += x[c][i];
        acc_g[c] += g;
        if constexpr (LS) acc_ce[c] += t.q(g, i) * ls[i];
      }
  return n_bad;
}

// Per element of the sigmoid focal term, from the logit v and target q: p = σ(v), BCE(v, q)
// (times `unit`: kCeScale in the forward), s = 2 q - 1, σ(v s) and MONAI's modulator
// m = exp(γ logsigmoid(-v s)) (m = 1 for γ = 0).
struct SigmoidFocal {
  float p, bce, s, sig_vs, m;
};

__device__ __forceinline__ SigmoidFocal sigmoid_focal(float v, float q, float gamma, float unit) {
  SigmoidFocal f;
  const float e = expf(-fabsf(v)), r = 1.f / (1.f + e);
  f.p = v >= 0.f ? r : e * r;
  const float vu = v * unit;
  f.bce = fmaxf(vu, 0.f) - vu * q + log1pf(e) * unit;
  f.s = 2.f * q - 1.f;
  const float z = v * f.s, ez = expf(-fabsf(z)), rz = 1.f / (1.f + ez);
  f.sig_vs = z >= 0.f ? rz : ez * rz;
  f.m = expf(gamma * (fminf(-z, 0.f) - log1pf(ez)));  // logsigmoid(-z)
  return f;
}

// One step of the sigmoid kCeSoft (BCE, soft target) or kCeFocal forward, elementwise:
// the Tversky sums, acc_ce (BCE, or h = m BCE) and for focal acc_ce2 (q h). Returns the
// number of bad soft-target values.
template <int CE, int MAXC, int VEC>
__device__ __forceinline__ int sigmoid_terms(int C, const float (&x)[MAXC][VEC],
                                             const TargetAt<VEC>& t, float gamma,
                                             float (&acc_pg)[MAXC], float (&acc_p)[MAXC],
                                             float (&acc_g)[MAXC], float (&acc_ce)[MAXC],
                                             float (&acc_ce2)[CE == kCeFocal ? MAXC : 1]) {
  int n_bad = 0;
#pragma unroll
  for (int c = 0; c < MAXC; ++c)
    if (c < C)
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float g = t.g(c, i);
        n_bad += t.bad(g, i);
        if (!(t.w(i) > 0.f)) continue;
        const SigmoidFocal f = sigmoid_focal(x[c][i], g, gamma, kCeScale);
        if constexpr (CE == kCeFocal) {
          acc_ce[c] += f.m * f.bce;
          acc_ce2[c] += g * (f.m * f.bce);
        } else {
          acc_ce[c] += f.bce;
        }
        acc_pg[c] += f.p * g;
        acc_p[c] += f.p;
        acc_g[c] += g;
      }
  return n_bad;
}

// One step of the kCeSoft / kCeFocal forward after the logits are loaded: the target, the
// activation and every sum. Returns the number of bad targets.
template <int ACT, int CE, int MAXC, int VEC>
__device__ __forceinline__ int fwd_terms_step(const TverskyParams& p, int64_t b, int64_t n0,
                                              bool vec_t, float (&x)[MAXC][VEC],
                                              float (&acc_pg)[MAXC], float (&acc_p)[MAXC],
                                              float (&acc_g)[MAXC], float (&acc_ce)[MAXC],
                                              float (&acc_ce2)[ce_columns(ACT, CE) > 1 ? MAXC : 1]) {
  const int C = (int)p.C;
  uint32_t bits[VEC] = {};
  int n_bad = 0;
  if (!p.soft_target) {
    n_bad = load_label_bits<VEC>(p, b, n0, vec_t, bits);
  }
  const TargetAt<VEC> t = target_at<ACT, VEC>(p, b, n0, bits);
  if constexpr (ACT == TV_SOFTMAX) {
    float ls[VEC];
    if constexpr (CE == kCeSoft)
      softmax_ce_q<MAXC, VEC>(x, C, t, acc_ce, ls);
    else
      softmax_focal<MAXC, VEC>(x, C, t, (float)p.focal_gamma, acc_ce);
    return n_bad + add_sums<CE == kCeSoft, MAXC, VEC>(C, x, t, ls, acc_pg, acc_p, acc_g, acc_ce);
  } else {
    return n_bad + sigmoid_terms<CE, MAXC, VEC>(C, x, t, (float)p.focal_gamma, acc_pg, acc_p,
                                                acc_g, acc_ce, acc_ce2);
  }
}

template <typename T, int ACT, int MAXC, int CE>
__global__ void __launch_bounds__(kThreads, 1)
    _tversky_fwd_partials_kernel(const TverskyParams p,
                                 float* __restrict__ partials,  // (B, G, S, C) fp32, S = 3 + NCE
                                 int* __restrict__ counts,      // (B, G, 2) int32
                                 int vec_x, int vec_t) {
  constexpr int VEC = vec_width<T, MAXC>();
  constexpr int NCE = ce_columns(ACT, CE), S = 3 + NCE;
  const int C = (int)p.C;
  const int64_t N = p.N;
  const int64_t b = blockIdx.y;
  const T* xb = static_cast<const T*>(p.logits_ptr) + b * p.logits_stride_b;

  float acc_pg[MAXC], acc_p[MAXC], acc_g[MAXC];
  float acc_ce[NCE > 0 ? MAXC : 1], acc_ce2[NCE > 1 ? MAXC : 1];
#pragma unroll
  for (int c = 0; c < MAXC; ++c) acc_pg[c] = acc_p[c] = acc_g[c] = 0.f;
#pragma unroll
  for (int c = 0; c < (NCE > 0 ? MAXC : 1); ++c) acc_ce[c] = 0.f;
#pragma unroll
  for (int c = 0; c < (NCE > 1 ? MAXC : 1); ++c) acc_ce2[c] = 0.f;
  int n_nonfinite = 0, n_bad = 0;

  const int64_t step = (int64_t)gridDim.x * kThreads * VEC;
  for (int64_t n0 = ((int64_t)blockIdx.x * kThreads + threadIdx.x) * VEC; n0 < N; n0 += step) {
    float x[MAXC][VEC];
    load_logits<T, MAXC, VEC>(xb, p.logits_stride_c, p.logits_stride_n, C, n0, N, vec_x, x);
    n_nonfinite += count_nonfinite<MAXC, VEC>(x, C, n0, N);
    if constexpr (CE == kCeSoft || CE == kCeFocal) {
      n_bad += fwd_terms_step<ACT, CE, MAXC, VEC>(p, b, n0, vec_t, x, acc_pg, acc_p, acc_g,
                                                  acc_ce, acc_ce2);
    } else if constexpr (CE == kCeLabel) {
      // labels first: the CE term needs them next to the log-sum-exp (never soft here)
      uint32_t bits[VEC];
      n_bad += load_label_bits<VEC>(p, b, n0, vec_t, bits);
      activate_ce<ACT, MAXC, VEC>(x, C, bits, acc_ce);
      add_label_map<MAXC, VEC>(C, bits, x, acc_pg, acc_p, acc_g);
    } else {
      activate<ACT, MAXC, VEC>(x, C, p.activation);
      if (p.soft_target) {
        n_bad += add_soft_target<MAXC, VEC>(p.target_ptr, p.target_dtype, b * p.target_stride_b,
                                            p.target_stride_c, p.target_stride_n, C, n0, N, x,
                                            acc_pg, acc_p, acc_g);
      } else {
        uint32_t bits[VEC];
        n_bad += load_label_bits<VEC>(p, b, n0, vec_t, bits);
        add_label_map<MAXC, VEC>(C, bits, x, acc_pg, acc_p, acc_g);
      }
    }
  }
  const int64_t blk = b * gridDim.x + blockIdx.x;
  store_block_sums<MAXC, NCE>(C, acc_pg, acc_p, acc_g, acc_ce, acc_ce2, n_nonfinite, n_bad,
                              partials + blk * S * C, counts + blk * 2);
}

// One block: stats[b, c, k] = Σ_g partials[b, g, k, c] in float64, g ascending.
// S: stats per (b, c), 3 + the CE-family columns. A template parameter, not an
// argument: divisions by a run-time S cost registers and made ptxas spill at sm_90.
template <int S>
__global__ void __launch_bounds__(kThreads, 1)
    _tversky_finalize_kernel(const float* __restrict__ partials, const int* __restrict__ counts,
                             double* __restrict__ stats, int64_t* __restrict__ flags, int64_t B,
                             int64_t C, int64_t G) {
  for (int64_t j = threadIdx.x; j < B * C * S; j += kThreads) {
    const int64_t b = j / (S * C), c = (j / S) % C, k = j % S;
    const float* src = partials + b * G * S * C + k * C + c;
    double s = 0.0;
    for (int64_t g = 0; g < G; ++g) s += (double)src[g * S * C];
    stats[j] = k >= 3 ? s * kCeUnit : s;  // layout (B, C, S): j = (b*C + c)*S + k
  }
  if (threadIdx.x < 2) {
    int64_t s = 0;  // integers: exact in any order
    for (int64_t i = 0; i < B * G; ++i) s += counts[i * 2 + threadIdx.x];
    flags[threadIdx.x] = s;
  }
}

// dL/dlogits of voxels n0 .. n0 + VEC - 1 from x (= p, activated), written to the
// gradient's rows (gb, strides gsc, gsn). u_of(c, i): u_c = dL/dp_c of voxel n0 + i;
// bits: label_bits() (label maps); e: dL/dsum_ce per class (kCeLabel kernels only).
template <typename T, int ACT, int MAXC, int VEC, int CE, typename UOf>
__device__ __forceinline__ void store_grad(T* __restrict__ gb, int64_t gsc, int64_t gsn, int C,
                                           int activation, int64_t n0, int64_t N, bool vec_g,
                                           const float (&x)[MAXC][VEC], const UOf& u_of,
                                           const uint32_t (&bits)[VEC], const float* e) {
  float dot[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) dot[i] = 0.f;
  // Cross-entropy, softmax: e_y (p_k - [k = y]) = p_k e_y - [k = y] e_y; e_y folds into
  // the softmax's shift (dot - e_y), e_y = 0 on ignored voxels (w = 0). e_y is neither
  // kept per voxel nor summed in a pass of its own (either made ptxas spill at
  // MAXC = 8): it joins the dot product's loop, and the [k = y] term re-reads e[k].
  // (bits has no class bit on ignored voxels: w = 0 needs no test there.)
  if (ACT == TV_SOFTMAX) {
#pragma unroll
    for (int c = 0; c < MAXC; ++c)
      if (c < C)
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          dot[i] += x[c][i] * u_of(c, i);
          if constexpr (CE == kCeLabel) dot[i] -= ((bits[i] >> c) & 1u) ? e[c] : 0.f;
        }
  }
#pragma unroll
  for (int c = 0; c < MAXC; ++c) {
    if (c >= C) break;
    float d[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float u = u_of(c, i), q = x[c][i];
      d[i] = ACT == TV_SOFTMAX        ? q * (u - dot[i])
             : activation == TV_SIGMOID ? u * q * (1.f - q)
                                        : u;
      if constexpr (CE == kCeLabel) {
        if (ACT == TV_SOFTMAX)
          d[i] -= ((bits[i] >> c) & 1u) ? e[c] : 0.f;
        else  // sigmoid: e_c (p_c - g_c) on kept voxels
          d[i] += bit_w(bits[i]) * e[c] * (q - bit_g(bits[i], c));
      }
    }
    store_row<T, VEC>(gb + c * gsc, gsn, n0, N, vec_g, d);
  }
}

// The backward's (B, C) coefficients of one sample, in shared memory, and the CE target's
// constants: a = dL/dsum_p, b = dL/dsum_pg, e = dL/dcol3, e2 = dL/dcol4.
struct GradCoefs {
  const float *a, *b, *e, *e2;
  float gamma;
};

// Softmax kCeSoft / kCeFocal backward of one step. kCeSoft: x = p, and
// dz_k = p_k (u_k - Σ_c (p_c u_c - e_c q_c)) - e_k q_k. kCeFocal: x = log p, and with
// a_c = e_c q_c (γ p_c (1 - p_c)^(γ-1) log p_c - (1 - p_c)^γ) (the γ term 0 where p_c is
// 0 or 1, or q_c = 0), dz_k = p_k (u_k - Σ_c (p_c u_c + a_c)) + a_k. Neither keeps a
// per-class value across the two loops: u, q (and a) are recomputed, as store_grad does.
template <typename T, int CE, int MAXC, int VEC>
__device__ __forceinline__ void grad_softmax_terms(T* __restrict__ gb, int64_t gsc, int64_t gsn,
                                                   int C, bool vec_g, const float (&x)[MAXC][VEC],
                                                   const TargetAt<VEC>& t, const GradCoefs& k) {
  // (p_c, u_c, the CE share: -e_c q_c or a_c) of voxel i, class c
  auto terms = [&](int c, int i, float& pc, float& u) -> float {
    const float g = t.g(c, i), q = t.q(g, i);
    u = t.w(i) * (k.a[c] + k.b[c] * g);
    if constexpr (CE == kCeSoft) {
      pc = x[c][i];
      return -k.e[c] * q;
    } else {
      const float lp = x[c][i];
      pc = expf(lp);
      const float om = 1.f - pc;
      const bool inner = q != 0.f && pc > 0.f && om > 0.f;
      const float gt = inner ? k.gamma * pc * powf(om, k.gamma - 1.f) * lp : 0.f;
      return k.e[c] * q * (gt - powf(om, k.gamma));
    }
  };
  float dot[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    dot[i] = 0.f;
#pragma unroll
    for (int c = 0; c < MAXC; ++c)
      if (c < C) {
        float pc, u;
        const float a = terms(c, i, pc, u);
        dot[i] += pc * u + a;
      }
  }
#pragma unroll
  for (int c = 0; c < MAXC; ++c) {
    if (c >= C) break;
    float d[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float pc, u;
      const float a = terms(c, i, pc, u);
      d[i] = pc * (u - dot[i]) + a;
    }
    store_row<T, VEC>(gb + c * gsc, gsn, t.n0, t.p.N, vec_g, d);
  }
}

// Sigmoid kCeSoft / kCeFocal backward of one step, elementwise from the logits x:
// dz_c = u_c p_c (1 - p_c) + w e_c (p_c - q_c)  (kCeSoft), or with the focal term
// + w (e_c + e2_c q_c) m (p_c - q_c - γ s σ(x_c s) BCE)  (kCeFocal).
template <typename T, int CE, int MAXC, int VEC>
__device__ __forceinline__ void grad_sigmoid_terms(T* __restrict__ gb, int64_t gsc, int64_t gsn,
                                                   int C, bool vec_g, const float (&x)[MAXC][VEC],
                                                   const TargetAt<VEC>& t, const GradCoefs& k) {
#pragma unroll
  for (int c = 0; c < MAXC; ++c) {
    if (c >= C) break;
    float d[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float g = t.g(c, i), w = t.w(i);
      const SigmoidFocal f = sigmoid_focal(x[c][i], g, k.gamma, 1.f);
      d[i] = w * (k.a[c] + k.b[c] * g) * f.p * (1.f - f.p);
      if constexpr (CE == kCeFocal)
        d[i] += w * (k.e[c] + k.e2[c] * g) * f.m *
                (f.p - g - k.gamma * f.s * f.sig_vs * f.bce);
      else
        d[i] += w * k.e[c] * (f.p - g);
    }
    store_row<T, VEC>(gb + c * gsc, gsn, t.n0, t.p.N, vec_g, d);
  }
}

// x = log p (softmax, max-shifted log-sum-exp), for the focal backward.
template <int MAXC, int VEC>
__device__ __forceinline__ void log_softmax(float (&x)[MAXC][VEC], int C) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const float m = class_max(x, C, i);
    float s = 0.f;
#pragma unroll
    for (int c = 0; c < MAXC; ++c)
      if (c < C) s += expf(x[c][i] - m);
    const float ls = logf(s);
#pragma unroll
    for (int c = 0; c < MAXC; ++c)
      if (c < C) x[c][i] = (x[c][i] - m) - ls;
  }
}

// One step of the kCeSoft / kCeFocal backward after the logits are loaded.
template <typename T, int ACT, int CE, int MAXC, int VEC>
__device__ __forceinline__ void bwd_terms_step(const TverskyParams& p, int64_t b, int64_t n0,
                                               bool vec_t, bool vec_g, float (&x)[MAXC][VEC],
                                               T* __restrict__ gb, const GradCoefs& k) {
  const int C = (int)p.C;
  uint32_t bits[VEC] = {};
  if (!p.soft_target) {
    load_label_bits<VEC>(p, b, n0, vec_t, bits);
  }
  const TargetAt<VEC> t = target_at<ACT, VEC>(p, b, n0, bits);
  if constexpr (ACT == TV_SOFTMAX) {
    if constexpr (CE == kCeFocal)
      log_softmax<MAXC, VEC>(x, C);
    else
      activate<ACT, MAXC, VEC>(x, C, p.activation);
    grad_softmax_terms<T, CE, MAXC, VEC>(gb, p.grad_stride_c, p.grad_stride_n, C, vec_g, x, t, k);
  } else {
    grad_sigmoid_terms<T, CE, MAXC, VEC>(gb, p.grad_stride_c, p.grad_stride_n, C, vec_g, x, t, k);
  }
}

// One step of the kNoCE / kCeLabel backward after the logits are loaded.
template <typename T, int ACT, int MAXC, int VEC, int CE>
__device__ __forceinline__ void bwd_step(const TverskyParams& p, int64_t b, int64_t n0,
                                         bool vec_t, bool vec_g, float (&x)[MAXC][VEC],
                                         T* __restrict__ gb, const float* s_a, const float* s_b,
                                         const float* s_e) {
  const bool soft = p.soft_target != 0;
  const int C = (int)p.C;
  const int64_t N = p.N;
  activate<ACT, MAXC, VEC>(x, C, p.activation);

  // u_c = w (A_c + B_c g_c): recomputed where needed rather than kept, to spare
  // MAXC x VEC registers (labels are in registers; soft targets re-read from L1).
  uint32_t bits[VEC];
  if (!soft) {
    load_label_bits<VEC>(p, b, n0, vec_t, bits);
  }
  auto u_of = [&](int c, int i) -> float {
    if (soft) {
      if (n0 + i >= N) return 0.f;
      const float g = load_soft(p.target_ptr, p.target_dtype,
                                b * p.target_stride_b + c * p.target_stride_c +
                                    (n0 + i) * p.target_stride_n);
      return s_a[c] + s_b[c] * g;
    } else {
      return bit_w(bits[i]) * (s_a[c] + ((bits[i] >> c) & 1u ? s_b[c] : 0.f));
    }
  };
  store_grad<T, ACT, MAXC, VEC, CE>(gb, p.grad_stride_c, p.grad_stride_n, C, p.activation, n0,
                                    N, vec_g, x, u_of, bits, s_e);
}

template <typename T, int ACT, int MAXC, int CE>
__global__ void __launch_bounds__(kThreads, 1)
    _tversky_bwd_kernel(const TverskyParams p, int vec_x, int vec_t, int vec_g) {
  constexpr int VEC = vec_width<T, MAXC>();
  constexpr int NCE = ce_columns(ACT, CE);
  const int C = (int)p.C;
  const int64_t N = p.N;
  const int64_t b = blockIdx.y;
  const T* xb = static_cast<const T*>(p.logits_ptr) + b * p.logits_stride_b;
  T* gb = static_cast<T*>(p.grad_ptr) + b * p.grad_stride_b;

  // coef_a/coef_b (and coef_ce, coef_ce2) (B, C) fp32: this sample's row, once per block.
  __shared__ float s_a[MAXC], s_b[MAXC], s_e[NCE > 0 ? MAXC : 1], s_e2[NCE > 1 ? MAXC : 1];
  for (int c = threadIdx.x; c < C; c += kThreads) {
    s_a[c] = static_cast<const float*>(p.coef_a_ptr)[b * C + c];
    s_b[c] = static_cast<const float*>(p.coef_b_ptr)[b * C + c];
    if constexpr (NCE > 0) s_e[c] = static_cast<const float*>(p.coef_ce_ptr)[b * C + c];
    if constexpr (NCE > 1) s_e2[c] = static_cast<const float*>(p.coef_ce2_ptr)[b * C + c];
  }
  __syncthreads();

  const int64_t step = (int64_t)gridDim.x * kThreads * VEC;
  for (int64_t n0 = ((int64_t)blockIdx.x * kThreads + threadIdx.x) * VEC; n0 < N; n0 += step) {
    float x[MAXC][VEC];
    load_logits<T, MAXC, VEC>(xb, p.logits_stride_c, p.logits_stride_n, C, n0, N, vec_x, x);
    if constexpr (CE == kCeSoft || CE == kCeFocal) {
      const GradCoefs k{s_a, s_b, s_e, s_e2, (float)p.focal_gamma};
      bwd_terms_step<T, ACT, CE, MAXC, VEC>(p, b, n0, vec_t, vec_g, x, gb, k);
    } else {
      bwd_step<T, ACT, MAXC, VEC, CE>(p, b, n0, vec_t, vec_g, x, gb, s_a, s_b, s_e);
    }
  }
}

// ---------------------------------------------------------------------------------------
// host side: pick the instantiation, size the grid, launch
// ---------------------------------------------------------------------------------------
template <typename X>
struct Tag {
  using type = X;
};
// One instantiation of the kernels: logits storage type T, activation ACT, class bound
// MAXC, cross-entropy variant CE, and the voxels per thread per step that follow.
template <typename T_, int ACT_, int MAXC_, int CE_>
struct Variant {
  using T = T_;
  static constexpr int ACT = ACT_, MAXC = MAXC_, VEC = vec_width<T_, MAXC_>();
  static constexpr int CE = CE_;
  static constexpr int S = 3 + ce_columns(ACT_, CE_);  // stats per (b, c)
};

template <int V>
struct IntTag {
  static constexpr int value = V;
};

// The kernels' CE variant for p (kNoCE .. kCeFocal), or TV_ERR_CE: the CE family needs
// softmax or sigmoid, and softmax CE a one-hot target (no regions).
inline int ce_variant(const TverskyParams& p) {
  if (p.ce_kind == TV_CE_NONE) return kNoCE;
  if (p.ce_kind != TV_CE_PLAIN && p.ce_kind != TV_CE_FOCAL) return TV_ERR_CE;
  if (p.activation == TV_NONE) return TV_ERR_CE;
  if (p.activation == TV_SOFTMAX && p.region_masks_ptr != nullptr) return TV_ERR_CE;
  if (p.ce_kind == TV_CE_FOCAL) return kCeFocal;
  const bool smooth = p.activation == TV_SOFTMAX && p.label_smoothing != 0.0;
  return (p.soft_target || smooth) ? kCeSoft : kCeLabel;
}

// Label maps: integer codes, or float ones (float label maps); soft targets: float codes.
inline bool target_dtype_ok(const TverskyParams& p) {
  const bool is_float = p.target_dtype >= TV_FLOAT32 && p.target_dtype <= TV_FLOAT64;
  const bool is_int = p.target_dtype >= TV_UINT8 && p.target_dtype <= TV_INT64;
  return p.soft_target ? is_float : (is_float || is_int);
}

// Calls f(Variant<...>{}) for p's logits dtype, activation, C and cross-entropy variant.
template <typename F>
int dispatch(const TverskyParams& p, F&& f) {
  const int ce = ce_variant(p);
  if (ce < 0) return ce;
  if (!target_dtype_ok(p)) return TV_ERR_TARGET_DTYPE;
  auto with_ce = [&](auto t, auto act, auto maxc) -> int {
    using T = typename decltype(t)::type;
    constexpr int ACT = decltype(act)::value, MAXC = decltype(maxc)::value;
    switch (ce) {
      case kCeLabel: return f(Variant<T, ACT, MAXC, kCeLabel>{});
      case kCeSoft: return f(Variant<T, ACT, MAXC, kCeSoft>{});
      case kCeFocal: return f(Variant<T, ACT, MAXC, kCeFocal>{});
    }
    return f(Variant<T, ACT, MAXC, kNoCE>{});
  };
  auto with_maxc = [&](auto t, auto act) -> int {
    if (p.C <= 4) return with_ce(t, act, IntTag<4>{});
    if (p.C <= 8) return with_ce(t, act, IntTag<8>{});
    return TV_ERR_NUM_CLASSES;
  };
  auto with_act = [&](auto t) -> int {
    switch (p.activation) {
      case TV_SOFTMAX: return with_maxc(t, IntTag<TV_SOFTMAX>{});
      case TV_SIGMOID: return with_maxc(t, IntTag<TV_SIGMOID>{});
      case TV_NONE: return with_maxc(t, IntTag<TV_SIGMOID>{});  // see the header comment
    }
    return TV_ERR_ACTIVATION;
  };
  switch (p.logits_dtype) {
    case TV_FLOAT32: return with_act(Tag<float>{});
    case TV_FLOAT16: return with_act(Tag<__half>{});
    case TV_BFLOAT16: return with_act(Tag<__nv_bfloat16>{});
  }
  return TV_ERR_LOGITS_DTYPE;
}

// Checks the sizes, selects the device, then dispatch(p, f): the launchers' common start.
template <typename F>
int launch(const TverskyParams& p, int device, F&& f) {
  if (p.B < 1 || p.B > TV_MAX_BATCH || p.N < 1) return TV_ERR_SIZE;
  if (const int err = TV_SET_DEVICE(device)) return err;
  return dispatch(p, f);
}

inline bool aligned(const void* ptr, int64_t bytes) {
  return (reinterpret_cast<uintptr_t>(ptr) % (uintptr_t)bytes) == 0;
}

// Packet loads of one (b, c) row are legal when every row starts VEC-aligned.
inline bool rows_vectorisable(const void* ptr, int64_t elem, int vec, int64_t stride_b,
                              int64_t stride_c, int64_t stride_n, bool has_c) {
  return stride_n == 1 && aligned(ptr, elem * vec) && stride_b % vec == 0 &&
         (!has_c || stride_c % vec == 0);
}

inline int64_t label_size(int32_t code);

// Which of p's tensors the kernels of Variant V may move as Packets (0/1 each, as the
// kernels take them); the gradient's only when it is set (backward).
template <typename V>
struct RowsVec {
  int x, t, g;
  explicit RowsVec(const TverskyParams& p)
      : x(rows_vectorisable(p.logits_ptr, sizeof(typename V::T), V::VEC, p.logits_stride_b,
                            p.logits_stride_c, p.logits_stride_n, true)),
        t(!p.soft_target && rows_vectorisable(p.target_ptr, label_size(p.target_dtype), V::VEC,
                                              p.target_stride_b, 0, p.target_stride_n, false)),
        g(p.grad_ptr != nullptr &&
          rows_vectorisable(p.grad_ptr, sizeof(typename V::T), V::VEC, p.grad_stride_b,
                            p.grad_stride_c, p.grad_stride_n, true)) {}
};

inline int64_t label_size(int32_t code) {
  switch (code) {
    case TV_UINT8: return 1;
    case TV_INT16:
    case TV_FLOAT16:
    case TV_BFLOAT16: return 2;
    case TV_INT32:
    case TV_FLOAT32: return 4;
    default: return 8;
  }
}

// Blocks per sample: enough to fill every SM ~4 times over, no more than the work needs.
inline int64_t blocks_per_sample(const TverskyParams& p, int vec, int num_sms) {
  const int64_t need = (p.N + (int64_t)kThreads * vec - 1) / ((int64_t)kThreads * vec);
  int64_t want = (4 * (int64_t)(num_sms > 0 ? num_sms : 1) + p.B - 1) / p.B;
  if (want < 1) want = 1;
  return need < want ? need : want;
}

// Blocks per sample of the forward for p, or a negative code from dispatch().
inline int64_t forward_grid(const TverskyParams& p, int num_sms) {
  return dispatch(p, [&](auto v) -> int {
    return (int)blocks_per_sample(p, decltype(v)::VEC, num_sms);
  });
}

inline int64_t workspace_bytes_for(const TverskyParams& p, int64_t G) {
  const int ce = ce_variant(p);
  const int64_t S = 3 + ce_columns(p.activation == TV_SOFTMAX ? TV_SOFTMAX : TV_SIGMOID, ce);
  return p.B * G * (S * p.C * (int64_t)sizeof(float) + 2 * (int64_t)sizeof(int));
}

}  // namespace

extern "C" {

// sizeof(TverskyParams) as this file was compiled: the loader checks it against its
// ctypes mirror, so a header change that the loader missed fails loudly.
int64_t tversky_cuda_params_size(void) { return (int64_t)sizeof(TverskyParams); }

// 0 when this library's kernels can run on `device` (its CUDA runtime works with the
// installed driver and the kernels were built for the device's architecture), else the
// cudaError_t; tversky_cuda_error_string() names it.
int tversky_cuda_check(int device) {
#ifdef TV_HOST_EMULATION
  (void)device;
  return 0;
#else
  if (const int err = TV_SET_DEVICE(device)) return err;
  cudaFuncAttributes attr;
  return (int)cudaFuncGetAttributes(&attr, _tversky_finalize_kernel<3>);
#endif
}

const char* tversky_cuda_error_string(int code) {
#ifdef TV_HOST_EMULATION
  (void)code;
  return "emulation error";
#else
  return cudaGetErrorString((cudaError_t)code);
#endif
}

// Workspace bytes tversky_cuda_forward needs for p on a device with num_sms SMs (the
// per-block partials and counts), or a negative code for unsupported arguments.
int64_t tversky_cuda_forward_workspace(const TverskyParams* p, int num_sms) {
  const int64_t G = forward_grid(*p, num_sms);
  return G < 0 ? G : workspace_bytes_for(*p, G);
}

// Forward: p->stats_ptr (B, C, 3 + CE-family columns) float64 and p->flags_ptr (2,) int64.
// workspace: device memory of tversky_cuda_forward_workspace() bytes, 16-byte aligned.
// Returns 0, a negative code for arguments the kernels do not cover, or a cudaError_t.
int tversky_cuda_forward(const TverskyParams* pp, void* workspace, int64_t workspace_bytes,
                         int device, int num_sms, cudaStream_t stream) {
  const TverskyParams& p = *pp;
  return launch(p, device, [&](auto v) -> int {
    using V = decltype(v);
    const int64_t G = blocks_per_sample(p, V::VEC, num_sms);
    if (workspace_bytes < workspace_bytes_for(p, G)) return TV_ERR_WORKSPACE;
    float* partials = static_cast<float*>(workspace);
    int* counts = reinterpret_cast<int*>(partials + p.B * G * V::S * p.C);
    const RowsVec<V> vec(p);
    auto* fwd = _tversky_fwd_partials_kernel<typename V::T, V::ACT, V::MAXC, V::CE>;
    TV_LAUNCH(fwd, dim3((unsigned)G, (unsigned)p.B), kThreads, stream, p, partials, counts,
              vec.x, vec.t);
    TV_LAUNCH(_tversky_finalize_kernel<V::S>, dim3(1), kThreads, stream, partials, counts,
              p.stats_ptr, p.flags_ptr, p.B, p.C, G);
    return TV_LAST_ERROR();
  });
}

// Backward: writes p->grad_ptr (B, C, N), the logits' dtype, from logits, target and
// coef_a/coef_b (and coef_ce, coef_ce2) (B, C) float32, on `stream`. Same return codes as
// the forward.
int tversky_cuda_backward(const TverskyParams* pp, int device, int num_sms,
                          cudaStream_t stream) {
  const TverskyParams& p = *pp;
  return launch(p, device, [&](auto v) -> int {
    using V = decltype(v);
    // Elementwise: size the grid like the forward; a grid-stride loop covers the rest.
    const int64_t G = blocks_per_sample(p, V::VEC, num_sms) * 2;
    const RowsVec<V> vec(p);
    auto* bwd = _tversky_bwd_kernel<typename V::T, V::ACT, V::MAXC, V::CE>;
    TV_LAUNCH(bwd, dim3((unsigned)G, (unsigned)p.B), kThreads, stream, p, vec.x, vec.t, vec.g);
    return TV_LAST_ERROR();
  });
}

}  // extern "C"

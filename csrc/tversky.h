// fasttversky: the parameter block shared by the CPU and CUDA kernels. No torch here.
//
// The math (one vocabulary everywhere: tp, fp, fn, sum_p, sum_pg, sum_g):
//
//   For one (sample b, class c) group over the non-ignored voxels n (mask w_n in {0,1}):
//     sum_pg = Σ w p g,   sum_p = Σ w p,   sum_g = Σ w g
//     tp = sum_pg,  fp = Σ p(1-g) = sum_p - sum_pg,  fn = Σ (1-p) g = sum_g - sum_pg
//     T  = (tp + s_nr) / (tp + α fp + β fn + s_dr),  loss term = (1 - T)^γ
//
//   Paper Eq. 5, in these sums: with den = tp + α fp + β fn + s_dr,
//     ∂T/∂sum_pg = (den - (tp + s_nr)(1 - α - β)) / den²
//     ∂T/∂sum_p  = -(tp + s_nr) α / den²
//   and since ∂sum_pg/∂p_n = w_n g_n, ∂sum_p/∂p_n = w_n, the gradient of the loss L
//   w.r.t. one probability is AFFINE in g:
//     dL/dp_{c,n} = w_n (A_c + B_c g_{c,n}),  A_c = dL/dsum_p, B_c = dL/dsum_pg.
//   The (B, C) numbers A, B are computed on the host side by autograd over the
//   O(B·C) finalize; the backward kernel only needs them, the logits and the labels.
//
//   Chain rule through the activation (u_c = dL/dp_c):
//     softmax: dL/dz_k = p_k (u_k - Σ_c p_c u_c)
//              for a label map Σ_c p_c u_c = w (Σ_c p_c A_c + p_y B_y)
//     sigmoid: dL/dz_c = u_c p_c (1 - p_c)
//     none:    dL/dx_c = u_c
//
// Cross-entropy (with_ce): per voxel with label y (not ignored), softmax
//     -log p_y = log Σ_c exp(x_c - m) - (x_y - m),  m = max_c x_c   (log-sum-exp)
//   and sigmoid, per class, BCE(x, g) = max(x, 0) - x g + log1p(exp(-|x|)); summed per
//   (b, c) into sum_ce. With e_c = dL/dsum_ce[b, c] (coef_ce), the extra gradient is
//     softmax: dL/dz_k += e_y (p_k - [k = y]);   sigmoid: dL/dz_c += e_c (p_c - g_c).
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// dtype codes (storage types; compute is float32, or float64 for float64 logits)
enum TverskyDType {
  TV_FLOAT32 = 0,
  TV_FLOAT16 = 1,
  TV_BFLOAT16 = 2,
  TV_FLOAT64 = 3,
  TV_UINT8 = 10,  // bool label maps are passed as uint8
  TV_INT16 = 11,
  TV_INT32 = 12,
  TV_INT64 = 13,
};

enum TverskyActivation { TV_SOFTMAX = 0, TV_SIGMOID = 1, TV_NONE = 2 };

// The cross-entropy family term (fasttversky/_spec.py CE_NONE, CE_PLAIN, CE_FOCAL).
enum TverskyCE { TV_CE_NONE = 0, TV_CE_PLAIN = 1, TV_CE_FOCAL = 2 };

// What every kernel entry point (CPU and CUDA) returns: 0, or a negative TverskyError for
// arguments the kernels do not cover. CUDA entry points may also return a positive
// cudaError_t. fasttversky/ops/_base.py decodes both the same way for every backend.
enum TverskyError {
  TV_OK = 0,
  TV_ERR_LOGITS_DTYPE = -1,
  TV_ERR_NUM_CLASSES = -2,
  TV_ERR_ACTIVATION = -3,
  TV_ERR_TARGET_DTYPE = -4,
  TV_ERR_SIZE = -5,  // batch or volume size out of range
  TV_ERR_WORKSPACE = -6,
  TV_ERR_CE = -7,  // a cross-entropy term the kernel does not implement (or activation "none")
};

// CUDA's limit on grid axis 1, which carries the batch (ops/_base.py MAX_GRID_BATCH).
#define TV_MAX_BATCH 65535

typedef struct TverskyParams {
  // logits (B, C, N), strides in elements
  const void* logits_ptr;
  int64_t logits_stride_b, logits_stride_c, logits_stride_n;
  int32_t logits_dtype;
  // target: labels (B, N) when soft_target == 0, else probabilities (B, C, N)
  const void* target_ptr;
  int64_t target_stride_b, target_stride_c, target_stride_n;
  int32_t target_dtype;
  int32_t soft_target;
  // grad (B, C, N), same dtype as the logits; backward only
  void* grad_ptr;
  int64_t grad_stride_b, grad_stride_c, grad_stride_n;
  // coef_a, coef_b: (B, C) contiguous, float32 (float64 for float64 logits); backward only
  const void* coef_a_ptr;
  const void* coef_b_ptr;
  // stats: (B, C, 3) float64 [sum_pg, sum_p, sum_g]; flags: (2,) int64
  // [non-finite logits, bad targets]; forward only
  double* stats_ptr;
  int64_t* flags_ptr;
  int64_t B, C, N;
  int32_t activation;
  int32_t has_ignore_index;
  int64_t ignore_index;
  int32_t binary_labels;  // C == 1 label map: g = (label == 1)
  int64_t num_labels;     // valid labels: [0, num_labels)
  int32_t num_threads;    // CPU only
  // Cross-entropy family (contract: fasttversky/_spec.py). ce_kind = TV_CE_NONE:
  // everything above is exactly the Tversky-only contract. TV_CE_PLAIN (CE / BCE) and
  // TV_CE_FOCAL add stats columns (3 + ce_columns: 1, or 2 for sigmoid focal) and the
  // backward adds coef_ce (and coef_ce2 for sigmoid focal) (B, C), the coef_a dtype,
  // times their gradient. The CE target is q_c = (1 - label_smoothing) g_c +
  // label_smoothing / C (softmax; label_smoothing is 0 for sigmoid).
  int32_t ce_kind;
  const void* coef_ce_ptr;
  const void* coef_ce2_ptr;
  double label_smoothing;
  double focal_gamma;
  // NULL, or num_labels int64 bitmasks (device memory for CUDA): a label map's
  // g_c = (region_masks[label] >> c) & 1 (regions of labels, sigmoid/none, C <= 63).
  const int64_t* region_masks_ptr;
} TverskyParams;

#ifdef __cplusplus
}
#endif

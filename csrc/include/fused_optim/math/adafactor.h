// Adafactor math (ALGORITHMS.md section 3), THE one copy for the CPU kernels (csrc/cpu) and the
// CUDA kernels (csrc/cuda); triton_kernels/_adafactor.py has the same functions in Triton.
//
// Both flavours run the same five phases; only per-step scalars and where eps1 enters differ.
// A tensor with ndim >= 2 is B matrices of n x m (its last two dims, leading dims as batch);
// ndim < 2 keeps a full second moment v. Per element g is the gradient times grad_multiplier
// (math/adam.h: sign, GradScaler unscale, clip) and t the new step.
//   1 stats     per tile of a matrix: row sums and column sums of s, sum of theta^2;
//               full tensors: v <- update(v, s) in place, sum of theta^2
//   2 factors   per matrix: row/col states <- update(state, sum / count), then the O(n + m)
//               factors rf_i, cf_j of the update (below)
//   3 unorm     per tile: sum of u^2 (the CPU takes most matrices' sums in phase 2 from
//               per-column sums gathered in phase 1: csrc/cpu/adafactor.cpp)
//   4 scalars   per tensor: RMS(theta), RMS(u) -> the apply scalars; advances the step
//   5 apply     per element: theta update (and HF's momentum)
// s = g^2 (torch) or g^2 + eps1 (transformers). update() is torch.lerp(state, s, w) with
// w = t^beta2_decay (torch), or beta2t * state + (1 - beta2t) * s with beta2t = 1 - t^decay_rate
// (transformers).
// u per element: torch  factored  g * rsqrt(max(r_i c_j / max(mean r, eps1), eps1^2))
//                        full      g * rsqrt(max(v, eps1^2))
//                transformers      g * rsqrt(r_i / mean r) * rsqrt(c_j)
//                        full      g * rsqrt(v)
// computed as below (adafactor_u_factored). Precision rule: the factors are normalised before
// they meet, never rsqrt(r_i * c_j / mean r) from raw products (underflow, and NaN for an
// all-zero gradient matrix).
#pragma once

#include <math.h>
#include <stdint.h>

#include "fused_optim/macros.h"

namespace fused_optim {

// ---- Tiles -------------------------------------------------------------------------------
// A tile is a block of whole rows of ONE matrix (a full tensor's tile is a flat range): whole
// rows keep the CPU's memory access sequential (row pieces with jumps between them starve its
// prefetchers: 3x slower measured). Rows longer than a tile are cut into column blocks.
// Statistics are per-tile partial sums, combined in a fixed order by the next phase, so the
// larger a tile, the fewer partials move: the CPU takes 64K elements, a CUDA tile fits a
// block's shared memory. But a column's partial is a float32 sum down the tile's rows, so a
// tile has at most kAdafactorTileRows rows: the 65536 rows of a narrow matrix's CPU tile put
// its column statistics 3e-6 off the float64 sum (50 ulps), 256 rows about 1e-7.
constexpr int64_t kAdafactorCpuTileElems = int64_t{1} << 16;
constexpr int64_t kAdafactorCudaTileElems = 8192;
constexpr int64_t kAdafactorTileRows = 256;

struct TileShape {
  int64_t rows, cols;
};

// rows x cols of the tiles of an n x m matrix (n, m >= 1), at most `elems` elements.
FO_HOST_DEVICE TileShape adafactor_tile_shape(int64_t n, int64_t m, int64_t elems) {
  const int64_t cols = m < elems ? m : elems;
  const int64_t fit = elems / cols < kAdafactorTileRows ? elems / cols : kAdafactorTileRows;
  return TileShape{n < fit ? n : fit, cols};
}

// ---- Per-step scalars ----------------------------------------------------------------------

// How much of the new statistics enters the second-moment average in step t: torch's lerp
// weight w = t^beta2_decay, transformers' 1 - beta2t = t^decay_rate and beta2t itself, each
// rounded to fp32 from double as the peers' Python scalars are.
struct AdafactorStatWeights {
  float w;     // weight of the new mean
  float keep;  // transformers: beta2t = 1 - t^decay_rate, the weight of the old value
};

FO_HOST_DEVICE AdafactorStatWeights adafactor_stat_weights(double t, double decay) {
  const double w = pow(t, decay);
  return AdafactorStatWeights{static_cast<float>(w), static_cast<float>(1.0 - w)};
}

// torch.lerp's two-sided formula (exact at w = 1), as torch.optim.Adafactor updates its states.
FO_HOST_DEVICE float lerp(float a, float b, float w) {
  return fabsf(w) < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w);
}

// The new value of a second-moment statistic from its old value and the new mean of s.
FO_HOST_DEVICE float adafactor_stat_update(float old, float mean, AdafactorStatWeights sw,
                                           bool transformers) {
  if (transformers) return sw.keep * old + sw.w * mean;
  return lerp(old, mean, sw.w);
}

// s of one gradient element (eps1_add: transformers' eps1, 0 for torch).
FO_HOST_DEVICE float adafactor_square(float g, float eps1_add) { return g * g + eps1_add; }

// 1 / sqrt(x), IEEE (as torch.rsqrt on the CPU), propagating NaN.
FO_HOST_DEVICE float rsqrt_ieee(float x) { return 1.0f / sqrtf(x); }

// max(x, floor) and min(x, cap) that keep a NaN x (selects, not fmaxf / fminf).
FO_HOST_DEVICE float clamp_min_nan(float x, float floor) { return x < floor ? floor : x; }
FO_HOST_DEVICE float clamp_max_nan(float x, float cap) { return x > cap ? cap : x; }

// The factors are rsqrt'ed once per row and column (O(n + m) square roots), so an element costs
// two multiplies and a select instead of a square root and a division:
//   rr_i = rsqrt(r_i / mean r)   (torch: mean r clamped at eps1 first)
//   rc_j = rsqrt(c_j)
//   u    = g * min(rr_i * rc_j, cap)
// torch clamps the estimate r_i c_j / mean r at eps1^2, the same as capping its rsqrt at
// 1 / eps1; transformers does not clamp (cap = inf). A full tensor's u is g * min(rsqrt(v), cap).
FO_HOST_DEVICE float adafactor_row_factor(float r, float mean_r, float eps1, bool transformers) {
  return rsqrt_ieee(r / (transformers ? mean_r : clamp_min_nan(mean_r, eps1)));
}

FO_HOST_DEVICE float adafactor_col_factor(float c) { return rsqrt_ieee(c); }

FO_HOST_DEVICE float adafactor_u_cap(double eps1, bool transformers) {
  return transformers ? INFINITY : static_cast<float>(1.0 / eps1);
}

FO_HOST_DEVICE float adafactor_u_factored(float g, float rr, float rc, float cap) {
  return g * clamp_max_nan(rr * rc, cap);
}

FO_HOST_DEVICE float adafactor_u_full(float g, float v, float cap) {
  return g * clamp_max_nan(rsqrt_ieee(v), cap);
}

// Hyper-parameters of a call (host values; lr may instead come from device memory).
struct AdafactorHyper {
  bool transformers = false;
  double eps1 = 1e-30;  // torch: finfo(param dtype).eps when the user gave None
  double eps2 = 1e-3;
  double decay = -0.8;  // torch: beta2_decay; transformers: decay_rate
  double d = 1.0;       // torch: d; transformers: clip_threshold
  double weight_decay = 0.0;
  double beta1 = 0.0;  // transformers, with has_beta1
  bool has_beta1 = false;
  bool relative_step = false, scale_parameter = false, warmup_init = false;  // transformers
};

// What phase 5 applies to every element of one tensor.
struct AdafactorApply {
  float scale;  // the factor of u: alpha / max(1, RMS(u) / d)
  float decay;  // torch: theta *= decay (1 - lr * wd, exactly 1 without weight decay);
                // transformers: theta -= decay * theta (wd * alpha; 0, skipped, without)
  float beta1, one_minus_beta1;  // transformers' momentum
};

// Phase 4: the apply scalars of a tensor from sum(theta^2), sum(u^2), its numel, the new step
// and lr. rms_theta receives RMS(theta) (transformers' RMS state).
FO_HOST_DEVICE AdafactorApply adafactor_apply_scalars(const AdafactorHyper& h, double sum_theta_sq,
                                                      double sum_u_sq, int64_t numel, double t,
                                                      double lr, float* rms_theta) {
  const double n = static_cast<double>(numel);
  // RMS in fp32, as the peers take x.norm() / sqrt(numel) in the tensor's (fp32) math dtype.
  const float rms = static_cast<float>(sqrt(sum_theta_sq) / sqrt(n));
  const float rms_u = static_cast<float>(sqrt(sum_u_sq) / sqrt(n));
  *rms_theta = rms;
  double rho;
  if (!h.transformers) {
    rho = fmin(lr, 1.0 / sqrt(t));
  } else if (h.relative_step) {
    rho = fmin(h.warmup_init ? 1e-6 * t : 1e-2, 1.0 / sqrt(t));
  } else {
    rho = lr;
  }
  const float eps2 = static_cast<float>(h.eps2);
  float alpha = static_cast<float>(rho);
  if (!h.transformers || h.scale_parameter) alpha = clamp_min_nan(rms, eps2) * alpha;
  const float denom = clamp_min_nan(rms_u / static_cast<float>(h.d), 1.0f);
  AdafactorApply a;
  a.scale = alpha / denom;
  a.beta1 = static_cast<float>(h.beta1);
  a.one_minus_beta1 = static_cast<float>(1.0 - h.beta1);
  // Exactly "no decay" without weight decay, even where lr or alpha is inf (inf * 0 = NaN).
  if (h.weight_decay == 0.0) {
    a.decay = h.transformers ? 0.0f : 1.0f;
  } else if (h.transformers) {
    a.decay = static_cast<float>(h.weight_decay) * alpha;
  } else {
    a.decay = static_cast<float>(1.0 - lr * h.weight_decay);
  }
  return a;
}

// Phase 5 for one element. m (transformers' exp_avg) is touched only with kMomentum.
template <bool kTransformers, bool kMomentum>
FO_HOST_DEVICE void adafactor_apply(float& theta, float u, float& m, const AdafactorApply& a) {
  if (!kTransformers) {
    theta = theta * a.decay - a.scale * u;
    return;
  }
  float step = a.scale * u;
  if (kMomentum) {
    m = a.beta1 * m + a.one_minus_beta1 * step;
    step = m;
  }
  // Skipped when 0 (not theta - 0 * theta): an inf theta must not become NaN.
  if (a.decay != 0.0f) theta = theta - a.decay * theta;
  theta = theta - step;
}

}  // namespace fused_optim

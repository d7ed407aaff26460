// Global-norm clipping math (ALGORITHMS.md section 5), shared by the CPU and CUDA kernels.
#pragma once

#include <math.h>

#include "fused_optim/macros.h"

namespace fused_optim {

// How the per-element contributions to a p-norm are formed and combined.
enum class NormKind : int { kTwo = 0, kInf = 1, kP = 2 };

FO_HOST_DEVICE float norm_contribution(float x, NormKind kind, float p) {
  const float a = fabsf(x);
  switch (kind) {
    case NormKind::kTwo:
      return a * a;
    case NormKind::kInf:
      return a;
    default:
      return powf(a, p);
  }
}

// Combines two partial results (sums, or maxima for the inf-norm). Propagates NaN for max.
FO_HOST_DEVICE double norm_combine(double acc, double x, NormKind kind) {
  if (kind == NormKind::kInf) return (x > acc || x != x) ? x : acc;
  return acc + x;
}

// From the combined partials to the norm itself.
FO_HOST_DEVICE double norm_finish(double acc, NormKind kind, double p) {
  switch (kind) {
    case NormKind::kTwo:
      return sqrt(acc);
    case NormKind::kInf:
      return acc;
    default:
      return pow(acc, 1.0 / p);
  }
}

// torch.nn.utils.clip_grad_norm_: coef = min(1, max_norm / (norm + 1e-6)). NaN stays NaN.
FO_HOST_DEVICE float clip_coefficient(double total_norm, double max_norm) {
  const double coef = max_norm / (total_norm + 1e-6);
  return static_cast<float>(coef < 1.0 ? coef : (coef != coef ? coef : 1.0));
}

}  // namespace fused_optim

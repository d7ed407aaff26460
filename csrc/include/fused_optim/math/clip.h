// Global-norm clipping math (ALGORITHMS.md section 5), shared by the CPU and CUDA kernels.
#pragma once

#include <float.h>
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

// The total norm of grads / grad_scale from the combined partials of the (fp32, fp16 or bf16)
// grads, with torch's overflow: torch accumulates these dtypes in fp32, so a sum of squares (of
// |x|^p) beyond FLT_MAX is +inf there, while the partials here are combined in fp64. The rule
// is applied to the sum of the unscaled grads, as torch sees them after GradScaler.unscale_.
// Every backend applies it in its finalize (the Triton one, the reference); fp64 grads (only
// the reference takes them) are exact in fp64.
FO_HOST_DEVICE double norm_total(double acc, NormKind kind, double p, double grad_scale) {
  if (kind != NormKind::kInf) {
    const double unscaled = grad_scale == 1.0 ? acc : acc / pow(grad_scale, p);
    if (unscaled > static_cast<double>(FLT_MAX)) return static_cast<double>(INFINITY);
  }
  return norm_finish(acc, kind, p) / grad_scale;
}

// torch.nn.utils.clip_grad_norm_: coef = min(1, max_norm / (norm + 1e-6)), from the norm as
// reported (rounded to fp32, so an fp32 norm of inf gives 0 as in torch). NaN stays NaN; a
// negative max_norm gives a negative coefficient, as in torch.
FO_HOST_DEVICE float clip_coefficient(float total_norm, double max_norm) {
  const double coef = max_norm / (static_cast<double>(total_norm) + 1e-6);
  return static_cast<float>(coef < 1.0 ? coef : (coef != coef ? coef : 1.0));
}

}  // namespace fused_optim

// Per-element math of the Adam family (Adam, AdamW, AdaX, AdaXW): THE one copy, used by the
// CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda). See ALGORITHMS.md sections 1 and 2.
//
// Adam and AdaX share one element update; they differ only in the per-step scalars:
//   m <- m + (1 - beta1) (g - m)
//   v <- beta2_t v + (1 - beta2_t) g^2
//   theta <- theta - step_size * m / (sqrt(v) / bc2_sqrt + eps_t)
// Adam: beta2_t = beta2, step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t),
//   eps_t = eps.
// AdaX (normalised v-hat form, never overflows): bc_t = (1 + beta2)^t - 1,
//   1 - beta2_t = beta2 / bc_t, step_size = lr, bc2_sqrt = 1, eps_t = eps / sqrt(bc_t).
#pragma once

#include <math.h>

#include "fused_optim/macros.h"

namespace fused_optim {

// Scalars shared by every element of one tensor in one step, computed once per tensor.
struct AdamStepScalars {
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float step_size;
  float bc2_sqrt;
  float eps;
  float l2_decay;      // coupled (L2) weight decay: g += l2_decay * theta; 0 when decoupled
  float decay_factor;  // decoupled weight decay: theta *= 1 - lr * wd; 1 when coupled
};

// t is the new (already incremented) step. Bias corrections are taken in double, as torch does.
FO_HOST_DEVICE AdamStepScalars adam_step_scalars(double lr, double t, double beta1, double beta2,
                                                 double eps, double weight_decay, bool decoupled) {
  AdamStepScalars s;
  const double bc1 = 1.0 - pow(beta1, t);
  const double bc2 = 1.0 - pow(beta2, t);
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.step_size = static_cast<float>(lr / bc1);
  s.bc2_sqrt = static_cast<float>(sqrt(bc2));
  s.eps = static_cast<float>(eps);
  s.l2_decay = decoupled ? 0.0f : static_cast<float>(weight_decay);
  s.decay_factor = decoupled ? static_cast<float>(1.0 - lr * weight_decay) : 1.0f;
  return s;
}

// AdaX: beta2 is the growth increment. bc_t = expm1(t * log1p(beta2)) in double.
FO_HOST_DEVICE AdamStepScalars adax_step_scalars(double lr, double t, double beta1, double beta2,
                                                 double eps, double weight_decay, bool decoupled) {
  AdamStepScalars s;
  const double bc = expm1(t * log1p(beta2));
  const double w = beta2 / bc;  // weight of g^2 in the v-hat average; 1 at t = 1
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(1.0 - w);
  s.one_minus_beta2 = static_cast<float>(w);
  s.step_size = static_cast<float>(lr);
  s.bc2_sqrt = 1.0f;
  s.eps = static_cast<float>(eps / sqrt(bc));
  s.l2_decay = decoupled ? 0.0f : static_cast<float>(weight_decay);
  s.decay_factor = decoupled ? static_cast<float>(1.0 - lr * weight_decay) : 1.0f;
  return s;
}

// One multiplier applied to the raw gradient: the sign for `maximize`, the GradScaler
// unscale and the global-norm clip coefficient, folded so the hot loop does one multiply.
FO_HOST_DEVICE float grad_multiplier(bool maximize, const float* grad_scale,
                                     const float* clip_coef) {
  float mult = maximize ? -1.0f : 1.0f;
  if (grad_scale != nullptr) mult = mult / *grad_scale;
  if (clip_coef != nullptr) mult = mult * *clip_coef;
  return mult;
}

// One element. g is the raw gradient (times grad_multiplier). vmax is only touched when
// kAmsgrad; it tracks the maximum of the raw second moment, as torch does.
template <bool kAmsgrad>
FO_HOST_DEVICE void adam_element(float& theta, float g, float& m, float& v, float& vmax,
                                 const AdamStepScalars& s) {
  // Skipped when 0 (not g + 0 * theta): a non-finite theta must not turn g into NaN.
  if (s.l2_decay != 0.0f) g = g + s.l2_decay * theta;
  theta = theta * s.decay_factor;
  m = m + s.one_minus_beta1 * (g - m);
  v = s.beta2 * v + s.one_minus_beta2 * (g * g);
  float second = v;
  if (kAmsgrad) {
    // A select, not fmaxf: it vectorises, and a NaN in v propagates as with torch.maximum.
    vmax = (vmax >= v) ? vmax : v;
    second = vmax;
  }
  const float denom = sqrtf(second) / s.bc2_sqrt + s.eps;
  theta = theta - s.step_size * (m / denom);
}

}  // namespace fused_optim

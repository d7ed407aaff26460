// Adam-family CPU kernel: one parallel loop over every (tensor, chunk) work item of the call.
// The per-element math is fused_optim::adam_element (math/adam.h), shared with CUDA.
#include <ATen/Parallel.h>

#include <vector>

#include "dtype.h"
#include "fused_optim/kernels.h"
#include "fused_optim/math/adam.h"
#include "isa.h"

namespace fused_optim {
namespace {

// The inner loop over one chunk, once per ISA (isa.h). Plain indexing and fp32 math so the
// compiler vectorises it (built with -O3 -fno-math-errno: sqrtf would otherwise block it).
#define FO_DEFINE_ADAM_CHUNK(suffix, attrs)                                                  \
  template <typename P, typename S, bool kAmsgrad>                                           \
  attrs void adam_chunk_##suffix(P* __restrict__ param, const P* __restrict__ grad,          \
                                 S* __restrict__ exp_avg, S* __restrict__ exp_avg_sq,        \
                                 S* __restrict__ max_exp_avg_sq, int64_t n,                  \
                                 const AdamStepScalars s, const float grad_mult) {           \
    for (int64_t i = 0; i < n; ++i) {                                                        \
      float theta = static_cast<float>(param[i]);                                            \
      float m = static_cast<float>(exp_avg[i]);                                              \
      float v = static_cast<float>(exp_avg_sq[i]);                                           \
      float vmax = kAmsgrad ? static_cast<float>(max_exp_avg_sq[i]) : 0.0f;                  \
      adam_element<kAmsgrad>(theta, static_cast<float>(grad[i]) * grad_mult, m, v, vmax, s); \
      param[i] = static_cast<P>(theta);                                                      \
      exp_avg[i] = static_cast<S>(m);                                                        \
      exp_avg_sq[i] = static_cast<S>(v);                                                     \
      if (kAmsgrad) max_exp_avg_sq[i] = static_cast<S>(vmax);                                \
    }                                                                                        \
  }
FO_CPU_ISA_VARIANTS(FO_DEFINE_ADAM_CHUNK)
#undef FO_DEFINE_ADAM_CHUNK

template <typename P, typename S, bool kAmsgrad>
void adam_items(const AdamArgs& a, const std::vector<AdamStepScalars>& scalars, float grad_mult) {
  const auto chunk = pick_isa(adam_chunk_base<P, S, kAmsgrad>, adam_chunk_avx2<P, S, kAmsgrad>,
                              adam_chunk_avx512<P, S, kAmsgrad>);
  at::parallel_for(0, a.n_items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const WorkItem item = a.items[w];
      const AdamTensor& t = a.tensors[item.tensor];
      const int64_t start = item.chunk * kChunkSize;
      const int64_t n = std::min(kChunkSize, t.numel - start);
      if (n <= 0) continue;
      chunk(static_cast<P*>(t.param) + start, static_cast<const P*>(t.grad) + start,
            static_cast<S*>(t.exp_avg) + start, static_cast<S*>(t.exp_avg_sq) + start,
            kAmsgrad ? static_cast<S*>(t.max_exp_avg_sq) + start : nullptr, n, scalars[item.tensor],
            grad_mult);
    }
  });
}

}  // namespace

void adam_cpu(const AdamArgs& a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // GradScaler: skip the step
  const double lr = a.lr_ptr == nullptr ? a.lr
                    : a.lr_is_f64       ? *static_cast<const double*>(a.lr_ptr)
                                        : *static_cast<const float*>(a.lr_ptr);
  // Per-tensor scalars (each tensor keeps its own step, as torch does); then advance steps.
  // Tensors of a group nearly always share their step: recompute only when it changes.
  std::vector<AdamStepScalars> scalars(a.n_tensors);
  float prev_step = -1.0f;
  for (int32_t i = 0; i < a.n_tensors; ++i) {
    const float step = *a.tensors[i].step;
    if (i == 0 || step != prev_step) {
      const double t = static_cast<double>(step) + 1.0;
      scalars[i] =
          a.adax ? adax_step_scalars(lr, t, a.beta1, a.beta2, a.eps, a.weight_decay, a.decoupled)
                 : adam_step_scalars(lr, t, a.beta1, a.beta2, a.eps, a.weight_decay, a.decoupled);
    } else {
      scalars[i] = scalars[i - 1];
    }
    prev_step = step;
    *a.tensors[i].step = step + 1.0f;
  }
  const float grad_mult = grad_multiplier(a.maximize, a.grad_scale, a.clip_coef);
  dispatch_dtype(a.param_dtype, [&](auto p_tag) {
    dispatch_dtype(a.state_dtype, [&](auto s_tag) {
      using P = decltype(p_tag);
      using S = decltype(s_tag);
      if (a.amsgrad) {
        adam_items<P, S, true>(a, scalars, grad_mult);
      } else {
        adam_items<P, S, false>(a, scalars, grad_mult);
      }
    });
  });
}

}  // namespace fused_optim

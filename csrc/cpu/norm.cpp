// Multi-tensor p-norm and in-place scaling on the CPU, for global-norm gradient clipping.
// Deterministic: each work item's partial is computed the same way whatever the thread count,
// and partials are combined in item order.
#include <ATen/Parallel.h>

#include <algorithm>

#include "dtype.h"
#include "fused_optim/kernels.h"
#include "isa.h"

namespace fused_optim {
namespace {

// Independent accumulator lanes let the compiler vectorise the sum without reassociating
// (no -ffast-math); the lanes are combined in a fixed order.
constexpr int kLanes = 16;

#define FO_DEFINE_SUM_OF_SQUARES(suffix, attrs)                                    \
  template <typename T>                                                            \
  attrs double chunk_sum_of_squares_##suffix(const T* __restrict__ x, int64_t n) { \
    float lanes[kLanes] = {};                                                      \
    int64_t i = 0;                                                                 \
    for (; i + kLanes <= n; i += kLanes) {                                         \
      for (int l = 0; l < kLanes; ++l) {                                           \
        const float v = static_cast<float>(x[i + l]);                              \
        lanes[l] += v * v;                                                         \
      }                                                                            \
    }                                                                              \
    double acc = 0.0;                                                              \
    for (int l = 0; l < kLanes; ++l) acc += lanes[l];                              \
    for (; i < n; ++i) {                                                           \
      acc += norm_contribution(static_cast<float>(x[i]), NormKind::kTwo, 2.0f);    \
    }                                                                              \
    return acc;                                                                    \
  }
FO_CPU_ISA_VARIANTS(FO_DEFINE_SUM_OF_SQUARES)
#undef FO_DEFINE_SUM_OF_SQUARES

#define FO_DEFINE_SCALE(suffix, attrs)                                                      \
  template <typename T>                                                                     \
  attrs void chunk_scale_##suffix(T* __restrict__ x, int64_t n, float coef) {               \
    for (int64_t i = 0; i < n; ++i) x[i] = static_cast<T>(static_cast<float>(x[i]) * coef); \
  }
FO_CPU_ISA_VARIANTS(FO_DEFINE_SCALE)
#undef FO_DEFINE_SCALE

template <typename T>
double chunk_partial(const T* x, int64_t n, NormKind kind, float p) {
  if (kind == NormKind::kTwo) {
    static const auto sum_sq = pick_isa(chunk_sum_of_squares_base<T>, chunk_sum_of_squares_avx2<T>,
                                        chunk_sum_of_squares_avx512<T>);
    return sum_sq(x, n);
  }
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    acc = norm_combine(acc, norm_contribution(static_cast<float>(x[i]), kind, p), kind);
  }
  return acc;
}

}  // namespace

void norm_partials_cpu(const NormPartialsArgs& a) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, a.n_items, 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const WorkItem item = a.items[w];
        const FlatTensor& t = a.tensors[item.tensor];
        const int64_t start = item.chunk * kChunkSize;
        const int64_t n = std::max<int64_t>(0, std::min(kChunkSize, t.numel - start));
        a.partials[w] = chunk_partial(static_cast<const T*>(t.data) + start, n, a.kind, a.p);
      }
    });
  });
}

void norm_finalize_cpu(const NormFinalizeArgs& a) {
  double acc = 0.0;
  for (int64_t i = 0; i < a.n_partials; ++i) acc = norm_combine(acc, a.partials[i], a.kind);
  const double scale = a.grad_scale != nullptr ? static_cast<double>(*a.grad_scale) : 1.0;
  const auto norm = static_cast<float>(norm_total(acc, a.kind, a.p, scale));
  *a.total_norm = norm;
  if (a.clip_coef != nullptr) *a.clip_coef = clip_coefficient(norm, a.max_norm);
}

void scale_cpu(const ScaleArgs& a) {
  const float coef = *a.coef;
  // x * 1 == x: the common no-clip case costs a read of coef instead of a pass over the data.
  if (coef == 1.0f) return;
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto scale = pick_isa(chunk_scale_base<T>, chunk_scale_avx2<T>, chunk_scale_avx512<T>);
    at::parallel_for(0, a.n_items, 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const WorkItem item = a.items[w];
        const FlatTensor& t = a.tensors[item.tensor];
        const int64_t start = item.chunk * kChunkSize;
        const int64_t n = std::min(kChunkSize, t.numel - start);
        scale(static_cast<T*>(t.data) + start, n, coef);
      }
    });
  });
}

}  // namespace fused_optim

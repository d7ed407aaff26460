// Global-norm gradient clipping on CUDA (ALGORITHMS.md section 5): per-work-item partial norms,
// a one-block finalize that writes the total norm and the clip coefficient to device memory,
// and an in-place multi-tensor scale. Deterministic: fixed reduction order, no float atomics.
// The math is fused_optim::norm_* / clip_coefficient (math/clip.h), shared with the CPU kernels.
#include <cuda_runtime_api.h>
#include <stdint.h>

#include "fused_optim/cuda/dtype.cuh"
#include "fused_optim/cuda/launch.cuh"
#include "fused_optim/cuda/reduce.cuh"
#include "fused_optim/kernels.h"
#include "fused_optim/math/clip.h"

namespace fused_optim {
namespace {

constexpr int kNormThreads = 512;
constexpr int kFinalizeThreads = 1024;
constexpr int kScaleThreads = 512;

// Folds the contributions of n elements into acc, each thread taking a fixed strided subset in
// a fixed order (kVec = 1 is the unaligned path).
template <typename T, int kVec>
__device__ __forceinline__ double norm_range(const T* x, int64_t n, NormKind kind, float p,
                                             double acc) {
  const int64_t n_vec = n / kVec;
  for (int64_t i = threadIdx.x; i < n_vec; i += blockDim.x) {
    float vals[kVec];
    cuda::load_vec<T, kVec>(x, i, vals);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      acc = norm_combine(acc, static_cast<double>(norm_contribution(vals[k], kind, p)), kind);
    }
  }
  return acc;
}

template <typename T>
__global__ void __launch_bounds__(kNormThreads) norm_partials_kernel(NormPartialsArgs args) {
  const WorkItem item = args.items[blockIdx.x];
  const FlatTensor t = args.tensors[item.tensor];
  const cuda::ChunkRange r = cuda::chunk_range(item.chunk, t.numel);
  const T* x = static_cast<const T*>(t.data) + r.begin;
  const NormKind kind = args.kind;

  // 0 is the identity of both the sum and the max of absolute values.
  double acc = 0.0;
  constexpr int kVec = cuda::kVecBytes / sizeof(T);
  int64_t done = 0;
  if (cuda::is_aligned(t.data)) {
    acc = norm_range<T, kVec>(x, r.size, kind, args.p, acc);
    done = r.size / kVec * kVec;
  }
  acc = norm_range<T, 1>(x + done, r.size - done, kind, args.p, acc);

  acc = cuda::block_reduce<kNormThreads>(
      acc, [kind](double a, double b) { return norm_combine(a, b, kind); });
  if (threadIdx.x == 0) args.partials[blockIdx.x] = acc;
}

__global__ void __launch_bounds__(kFinalizeThreads) norm_finalize_kernel(NormFinalizeArgs args) {
  const NormKind kind = args.kind;
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < args.n_partials; i += kFinalizeThreads) {
    acc = norm_combine(acc, args.partials[i], kind);
  }
  acc = cuda::block_reduce<kFinalizeThreads>(
      acc, [kind](double a, double b) { return norm_combine(a, b, kind); });
  if (threadIdx.x == 0) {
    // The norm of the unscaled gradients: grads / grad_scale.
    const double scale = args.grad_scale != nullptr ? static_cast<double>(*args.grad_scale) : 1.0;
    const auto norm = static_cast<float>(norm_total(acc, kind, args.p, scale));
    if (args.total_norm != nullptr) *args.total_norm = norm;
    if (args.clip_coef != nullptr) *args.clip_coef = clip_coefficient(norm, args.max_norm);
  }
}

template <typename T, int kVec>
__device__ __forceinline__ void scale_range(T* x, int64_t n, float coef) {
  const int64_t n_vec = n / kVec;
  for (int64_t i = threadIdx.x; i < n_vec; i += blockDim.x) {
    float vals[kVec];
    cuda::load_vec<T, kVec>(x, i, vals);
#pragma unroll
    for (int k = 0; k < kVec; ++k) vals[k] = vals[k] * coef;
    cuda::store_vec<T, kVec>(x, i, vals);
  }
}

template <typename T>
__global__ void __launch_bounds__(kScaleThreads) scale_kernel(ScaleArgs args) {
  const float coef = *args.coef;
  // x * 1 == x: the common no-clip case costs a read of coef instead of a pass over the data.
  if (coef == 1.0f) return;

  const WorkItem item = args.items[blockIdx.x];
  const FlatTensor t = args.tensors[item.tensor];
  const cuda::ChunkRange r = cuda::chunk_range(item.chunk, t.numel);
  T* x = static_cast<T*>(t.data) + r.begin;

  constexpr int kVec = cuda::kVecBytes / sizeof(T);
  int64_t done = 0;
  if (cuda::is_aligned(t.data)) {
    scale_range<T, kVec>(x, r.size, coef);
    done = r.size / kVec * kVec;
  }
  scale_range<T, 1>(x + done, r.size - done, coef);
}

}  // namespace

void norm_partials_cuda(const NormPartialsArgs& args, cudaStream_t stream) {
  if (args.n_items == 0) return;
  const unsigned int grid = cuda::grid_for_items(args.n_items, "norm_partials_cuda");
  if (args.tensors == nullptr || args.items == nullptr || args.partials == nullptr) {
    throw std::invalid_argument("fused_optim: norm_partials_cuda: missing plan or partials");
  }
  cuda::dispatch_dtype(args.dtype, [&](auto tag) {
    norm_partials_kernel<typename decltype(tag)::type><<<grid, kNormThreads, 0, stream>>>(args);
  });
  cuda::check_launch("norm_partials_cuda");
}

void norm_finalize_cuda(const NormFinalizeArgs& args, cudaStream_t stream) {
  if (args.n_partials > 0 && args.partials == nullptr) {
    throw std::invalid_argument("fused_optim: norm_finalize_cuda: missing partials");
  }
  // Launched even without partials: the norm of nothing is 0, and the outputs must be written.
  norm_finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(args);
  cuda::check_launch("norm_finalize_cuda");
}

void scale_cuda(const ScaleArgs& args, cudaStream_t stream) {
  if (args.n_items == 0) return;
  const unsigned int grid = cuda::grid_for_items(args.n_items, "scale_cuda");
  if (args.tensors == nullptr || args.items == nullptr || args.coef == nullptr) {
    throw std::invalid_argument("fused_optim: scale_cuda: missing plan or coefficient");
  }
  cuda::dispatch_dtype(args.dtype, [&](auto tag) {
    scale_kernel<typename decltype(tag)::type><<<grid, kScaleThreads, 0, stream>>>(args);
  });
  cuda::check_launch("scale_cuda");
}

}  // namespace fused_optim

// Deterministic block-wide reduction: the combination order depends only on kThreads, never on
// scheduling, so a reduction gives bit-identical results run after run (no float atomics).
#pragma once

namespace fused_optim {
namespace cuda {

constexpr int kWarpSize = 32;

// Combines one double per thread with op (associativity is not assumed: the tree is fixed).
// Every thread of the block must call it; a second call in one kernel needs a __syncthreads()
// first (both use one shared buffer).
// The result is valid in thread 0 only.
template <int kThreads, typename Op>
__device__ __forceinline__ double block_reduce(double value, Op op) {
  static_assert(kThreads % kWarpSize == 0 && kThreads <= 1024, "kThreads: whole warps, <= 1024");
  constexpr int kWarps = kThreads / kWarpSize;
  __shared__ double warp_results[kWarps];

  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = op(value, __shfl_down_sync(0xffffffffu, value, offset));
  }
  if (lane == 0) warp_results[warp] = value;
  __syncthreads();

  if (warp == 0) {
    value = lane < kWarps ? warp_results[lane] : 0.0;
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      // Lanes at or past kWarps hold no result; never let them into lane 0's chain.
      const double other = __shfl_down_sync(0xffffffffu, value, offset);
      if (lane + offset < kWarps) value = op(value, other);
    }
  }
  return value;
}

}  // namespace cuda
}  // namespace fused_optim

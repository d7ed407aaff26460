// Adafactor on CUDA: the five phases of math/adafactor.h as five launches over all tensors of a
// call, whatever their number or mix of factored and full tensors. Tiles, matrices and tensors
// are the blocks of the three kinds of launch. Deterministic: per-tile partials are written to
// their own slots and combined in a fixed order (no float atomics). The per-element and
// per-tensor math is the header's, the same functions the CPU kernels call.
#include <cuda_runtime_api.h>
#include <stdint.h>

#include "fused_optim/cuda/dtype.cuh"
#include "fused_optim/cuda/launch.cuh"
#include "fused_optim/cuda/reduce.cuh"
#include "fused_optim/kernels.h"
#include "fused_optim/math/adafactor.h"
#include "fused_optim/math/adam.h"

namespace fused_optim {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ bool skipped(const AdafactorArgs& a) {
  return a.found_inf != nullptr && *a.found_inf != 0.0f;  // GradScaler: the step is skipped
}

using cuda::load;
using cuda::store;

// u of element (k, j) of a tile: recomputed from g and the factors (or the full v) wherever
// it is needed, so it is never stored.
template <typename P, typename S>
__device__ __forceinline__ float u_at(const AdafactorArgs& a, const AdafactorTensor& t,
                                      const AdafactorTile& x, int64_t k, int64_t j, int64_t e,
                                      float mult, float cap) {
  const float g = load<P>(t.grad, e) * mult;
  if (t.factored) {
    const float rr = a.factors[t.factors + x.b * t.rows + x.row0 + k];
    const float rc = a.factors[t.factors + t.batch * t.rows + x.b * t.cols + x.col0 + j];
    return adafactor_u_factored(g, rr, rc, cap);
  }
  return adafactor_u_full(g, load<S>(t.full, e), cap);
}

__device__ __forceinline__ float eps1_add(const AdafactorArgs& a) {
  return a.hyper.transformers ? static_cast<float>(a.hyper.eps1) : 0.0f;
}

__device__ __forceinline__ float u_cap(const AdafactorArgs& a) {
  return adafactor_u_cap(a.hyper.eps1, a.hyper.transformers);
}

// Phase 1, one block per tile. A factored tile's s values are staged in shared memory, then
// summed along rows (a warp per row, or a thread per row for narrow tiles) and down columns (a
// thread per column), each in a fixed order.
template <typename P, typename S>
__global__ void __launch_bounds__(kThreads) stats_kernel(AdafactorArgs a) {
  if (skipped(a)) return;
  __shared__ float staged[kAdafactorCudaTileElems];
  const int64_t w = blockIdx.x;
  const WorkItem item = a.tiles[w];
  const AdafactorTensor t = a.tensors[item.tensor];
  const AdafactorTile x = adafactor_tile(t, item.chunk);
  const float mult = grad_multiplier(a.maximize, a.grad_scale, a.clip_coef);
  const float add = eps1_add(a);
  const int64_t count = x.n_rows * x.n_cols;
  double theta_sq = 0.0;
  if (t.factored) {
    for (int64_t e = threadIdx.x; e < count; e += kThreads) {
      const int64_t k = e / x.n_cols, j = e % x.n_cols;
      const int64_t at = adafactor_offset(t, x, k, j);
      staged[e] = adafactor_square(load<P>(t.grad, at) * mult, add);
      const float th = load<P>(t.param, at);
      theta_sq += static_cast<double>(th * th);
    }
    __syncthreads();
    const int lane = threadIdx.x % cuda::kWarpSize, warp = threadIdx.x / cuda::kWarpSize;
    float* row_out = a.row_partials + t.row_partials + (x.b * t.rows + x.row0) * t.col_tiles + x.cb;
    if (x.n_cols >= cuda::kWarpSize) {
      for (int64_t k = warp; k < x.n_rows; k += kThreads / cuda::kWarpSize) {
        float acc = 0.0f;
        for (int64_t j = lane; j < x.n_cols; j += cuda::kWarpSize) acc += staged[k * x.n_cols + j];
#pragma unroll
        for (int offset = cuda::kWarpSize / 2; offset > 0; offset /= 2) {
          acc += __shfl_down_sync(0xffffffffu, acc, offset);
        }
        if (lane == 0) row_out[k * t.col_tiles] = acc;
      }
    } else {
      for (int64_t k = threadIdx.x; k < x.n_rows; k += kThreads) {
        float acc = 0.0f;
        for (int64_t j = 0; j < x.n_cols; ++j) acc += staged[k * x.n_cols + j];
        row_out[k * t.col_tiles] = acc;
      }
    }
    float* col_out = a.col_partials + t.col_partials + (x.b * t.row_tiles + x.rb) * t.cols + x.col0;
    for (int64_t j = threadIdx.x; j < x.n_cols; j += kThreads) {
      float acc = 0.0f;
      for (int64_t k = 0; k < x.n_rows; ++k) acc += staged[k * x.n_cols + j];
      col_out[j] = acc;
    }
  } else if (count > 0) {
    const AdafactorStatWeights sw = adafactor_stat_weights(*t.step + 1.0, a.hyper.decay);
    for (int64_t j = threadIdx.x; j < count; j += kThreads) {
      const int64_t at = x.col0 + j;
      const float s = adafactor_square(load<P>(t.grad, at) * mult, add);
      store<S>(t.full, at, adafactor_stat_update(load<S>(t.full, at), s, sw, a.hyper.transformers));
      const float th = load<P>(t.param, at);
      theta_sq += static_cast<double>(th * th);
    }
  }
  theta_sq = cuda::block_reduce<kThreads>(theta_sq, [](double p, double q) { return p + q; });
  if (threadIdx.x == 0) a.tile_partials[2 * w] = theta_sq;
}

// Phase 2, one block per matrix: row and column statistics from their partials (each combined
// by one thread in tile order), the mean of the rows, then the factors. A shard's phase 1
// (kPhase, kernel_args.h) stops at the new row statistics (kept in the row factors' slots) and
// writes [their sum, the column sums] to the sums; its phase 2 takes the factors from the whole
// sums.
template <typename S, int kPhase>
__global__ void __launch_bounds__(kThreads) factors_kernel(AdafactorArgs a) {
  if (skipped(a)) return;
  __shared__ float mean_r;
  const WorkItem item = a.matrices[blockIdx.x];
  const AdafactorTensor t = a.tensors[item.tensor];
  const int64_t b = item.chunk;
  const AdafactorHyper& h = a.hyper;
  const AdafactorStatWeights sw = adafactor_stat_weights(*t.step + 1.0, h.decay);
  float* rf = a.factors + t.factors + b * t.rows;
  float* cf = a.factors + t.factors + t.batch * t.rows + b * t.cols;
  double* stats = kPhase == 0 ? nullptr : a.sums + t.stats_at + b * (t.cols + 1);
  const auto global_rows = static_cast<double>(t.global_rows);
  if (kPhase != 2) {
    double sum_r = 0.0;
    for (int64_t i = threadIdx.x; i < t.rows; i += kThreads) {
      const float* p = a.row_partials + t.row_partials + (b * t.rows + i) * t.col_tiles;
      double s = 0.0;
      for (int64_t k = 0; k < t.col_tiles; ++k) s += p[k];
      const int64_t at = b * t.rows + i;
      const float r = adafactor_stat_update(load<S>(t.row, at),
                                            static_cast<float>(s / static_cast<double>(t.cols)), sw,
                                            h.transformers);
      store<S>(t.row, at, r);
      rf[i] = r;  // replaced by the factor once the mean is known (by this thread)
      sum_r += r;
    }
    sum_r = cuda::block_reduce<kThreads>(sum_r, [](double p, double q) { return p + q; });
    if (threadIdx.x == 0) {
      if (kPhase == 1) stats[0] = sum_r;
      mean_r = static_cast<float>(sum_r / global_rows);
    }
  } else if (threadIdx.x == 0) {
    mean_r = static_cast<float>(stats[0] / global_rows);
  }
  __syncthreads();
  const float eps1 = static_cast<float>(h.eps1);
  for (int64_t i = threadIdx.x; kPhase != 1 && i < t.rows; i += kThreads) {
    rf[i] = adafactor_row_factor(rf[i], mean_r, eps1, h.transformers);
  }
  for (int64_t j = threadIdx.x; j < t.cols; j += kThreads) {
    double s = 0.0;
    if (kPhase == 2) {
      s = stats[1 + j];
    } else {
      const float* p = a.col_partials + t.col_partials + b * t.row_tiles * t.cols + j;
      for (int64_t k = 0; k < t.row_tiles; ++k) s += p[k * t.cols];
    }
    if (kPhase == 1) {
      stats[1 + j] = s;
      continue;
    }
    const int64_t at = b * t.cols + j;
    const float c = adafactor_stat_update(load<S>(t.col, at), static_cast<float>(s / global_rows),
                                          sw, h.transformers);
    store<S>(t.col, at, c);
    cf[j] = adafactor_col_factor(c);
  }
}

// Phase 3, one block per tile: the partial sum of u^2.
template <typename P, typename S>
__global__ void __launch_bounds__(kThreads) unorm_kernel(AdafactorArgs a) {
  if (skipped(a)) return;
  const int64_t w = blockIdx.x;
  const WorkItem item = a.tiles[w];
  const AdafactorTensor t = a.tensors[item.tensor];
  const AdafactorTile x = adafactor_tile(t, item.chunk);
  const float mult = grad_multiplier(a.maximize, a.grad_scale, a.clip_coef);
  const float cap = u_cap(a);
  double acc = 0.0;
  for (int64_t e = threadIdx.x; e < x.n_rows * x.n_cols; e += kThreads) {
    const int64_t k = e / x.n_cols, j = e % x.n_cols;
    const float u = u_at<P, S>(a, t, x, k, j, adafactor_offset(t, x, k, j), mult, cap);
    acc += static_cast<double>(u * u);
  }
  acc = cuda::block_reduce<kThreads>(acc, [](double p, double q) { return p + q; });
  if (threadIdx.x == 0) a.tile_partials[2 * w + 1] = acc;
}

// A shard's phases 1 and 2, one block per tensor: the sum of its tiles' partials of theta^2
// (slot 0, to sums[tensor]) or of u^2 (slot 1, to sums[u_sq_at + tensor]).
__global__ void __launch_bounds__(kThreads) tensor_sums_kernel(AdafactorArgs a, int slot) {
  if (skipped(a)) return;
  const int32_t i = blockIdx.x;
  const int64_t end = i + 1 < a.n_tensors ? a.tensors[i + 1].first_tile : a.n_tiles;
  double acc = 0.0;
  for (int64_t k = a.tensors[i].first_tile + threadIdx.x; k < end; k += kThreads) {
    acc += a.tile_partials[2 * k + slot];
  }
  acc = cuda::block_reduce<kThreads>(acc, [](double p, double q) { return p + q; });
  if (threadIdx.x == 0) a.sums[(slot == 0 ? 0 : a.u_sq_at) + i] = acc;
}

// Phase 4, one block per tensor: its tiles' partials in a fixed order (a shard's phase 3: the
// whole sums), the apply scalars, the RMS state; advances the step (no other phase reads it
// after this one).
__global__ void __launch_bounds__(kThreads) scalars_kernel(AdafactorArgs a) {
  if (skipped(a)) return;
  const int32_t i = blockIdx.x;
  const AdafactorTensor t = a.tensors[i];
  const int64_t end = i + 1 < a.n_tensors ? a.tensors[i + 1].first_tile : a.n_tiles;
  double theta_sq = 0.0, u_sq = 0.0;
  // (a shard's phase 3 has no partials: its sums are read below)
  for (int64_t k = t.first_tile + threadIdx.x; a.phase != 3 && k < end; k += kThreads) {
    theta_sq += a.tile_partials[2 * k];
    u_sq += a.tile_partials[2 * k + 1];
  }
  const auto add = [](double p, double q) { return p + q; };
  theta_sq = cuda::block_reduce<kThreads>(theta_sq, add);
  __syncthreads();  // block_reduce's shared buffer is reused by the second reduction
  u_sq = cuda::block_reduce<kThreads>(u_sq, add);
  if (a.phase == 3) {
    theta_sq = a.sums[i];
    u_sq = a.sums[a.u_sq_at + i];
  }
  if (threadIdx.x == 0) {
    double lr = a.lr;
    if (a.lr_ptr != nullptr) {
      lr = a.lr_is_f64 ? *static_cast<const double*>(a.lr_ptr)
                       : static_cast<double>(*static_cast<const float*>(a.lr_ptr));
    }
    const float step = *t.step;
    float rms = 0.0f;
    if (t.global_numel > 0) {
      a.apply[i] =
          adafactor_apply_scalars(a.hyper, theta_sq, u_sq, t.global_numel, step + 1.0, lr, &rms);
    }
    if (t.rms != nullptr) *t.rms = rms;
    *t.step = step + 1.0f;
  }
}

// Phase 5, one block per tile: the update of every element.
template <typename P, typename S, bool kHf, bool kMomentum>
__global__ void __launch_bounds__(kThreads) apply_kernel(AdafactorArgs a) {
  if (skipped(a)) return;
  const WorkItem item = a.tiles[blockIdx.x];
  const AdafactorTensor t = a.tensors[item.tensor];
  const AdafactorTile x = adafactor_tile(t, item.chunk);
  const float mult = grad_multiplier(a.maximize, a.grad_scale, a.clip_coef);
  const float cap = u_cap(a);
  const AdafactorApply s = a.apply[item.tensor];
  for (int64_t e = threadIdx.x; e < x.n_rows * x.n_cols; e += kThreads) {
    const int64_t k = e / x.n_cols, j = e % x.n_cols;
    const int64_t at = adafactor_offset(t, x, k, j);
    const float u = u_at<P, S>(a, t, x, k, j, at, mult, cap);
    float theta = load<P>(t.param, at);
    float m = kMomentum ? load<S>(t.exp_avg, at) : 0.0f;
    adafactor_apply<kHf, kMomentum>(theta, u, m, s);
    store<P>(t.param, at, theta);
    if (kMomentum) store<S>(t.exp_avg, at, m);
  }
}

template <typename P, typename S>
void launch_apply(const AdafactorArgs& a, unsigned int tiles, cudaStream_t stream) {
  if (!a.hyper.transformers) {
    apply_kernel<P, S, false, false><<<tiles, kThreads, 0, stream>>>(a);
  } else if (a.hyper.has_beta1) {
    apply_kernel<P, S, true, true><<<tiles, kThreads, 0, stream>>>(a);
  } else {
    apply_kernel<P, S, true, false><<<tiles, kThreads, 0, stream>>>(a);
  }
}

// The phases' launches: the whole step in one call (phase 0), or one of a shard's three calls.
template <typename P, typename S>
void launch_all(const AdafactorArgs& a, cudaStream_t stream) {
  const unsigned int tiles = cuda::grid_for_items(a.n_tiles, "adafactor_cuda");
  const unsigned int matrices = cuda::grid_for_items(a.n_matrices, "adafactor_cuda");
  const auto tensors = static_cast<unsigned int>(a.n_tensors);
  // A shard may hold no tile (every tensor empty here) or no matrix: such launches are left out.
  const bool has_tiles = tiles > 0, has_matrices = matrices > 0;
  switch (a.phase) {
    case 0:
      stats_kernel<P, S><<<tiles, kThreads, 0, stream>>>(a);
      if (has_matrices) factors_kernel<S, 0><<<matrices, kThreads, 0, stream>>>(a);
      unorm_kernel<P, S><<<tiles, kThreads, 0, stream>>>(a);
      scalars_kernel<<<tensors, kThreads, 0, stream>>>(a);
      launch_apply<P, S>(a, tiles, stream);
      break;
    case 1:
      if (has_tiles) stats_kernel<P, S><<<tiles, kThreads, 0, stream>>>(a);
      if (has_matrices) factors_kernel<S, 1><<<matrices, kThreads, 0, stream>>>(a);
      tensor_sums_kernel<<<tensors, kThreads, 0, stream>>>(a, 0);
      break;
    case 2:
      if (has_matrices) factors_kernel<S, 2><<<matrices, kThreads, 0, stream>>>(a);
      if (has_tiles) unorm_kernel<P, S><<<tiles, kThreads, 0, stream>>>(a);
      tensor_sums_kernel<<<tensors, kThreads, 0, stream>>>(a, 1);
      break;
    default:
      scalars_kernel<<<tensors, kThreads, 0, stream>>>(a);
      if (has_tiles) launch_apply<P, S>(a, tiles, stream);
  }
}

}  // namespace

void adafactor_cuda(const AdafactorArgs& args, cudaStream_t stream) {
  if (args.n_tensors == 0) return;
  if (args.tensors == nullptr || args.tiles == nullptr || args.tile_partials == nullptr ||
      args.apply == nullptr || (args.phase != 0 && args.sums == nullptr)) {
    throw std::invalid_argument("fused_optim: adafactor_cuda: missing plan or scratch buffers");
  }
  cuda::dispatch_dtype(args.param_dtype, [&](auto param_tag) {
    cuda::dispatch_dtype(args.state_dtype, [&](auto state_tag) {
      launch_all<typename decltype(param_tag)::type, typename decltype(state_tag)::type>(args,
                                                                                         stream);
    });
  });
  cuda::check_launch("adafactor_cuda");
}

}  // namespace fused_optim

// SMMF on CUDA: the two passes of math/smmf.h as two launches over all tensors of a call,
// whatever their number or mix of factorized and dense tensors. Tiles are the blocks of the
// update launch, finalize parts the blocks of the second. Deterministic: every partial has its
// own slot, sums run in a fixed order (no float atomics). The per-element math is the header's,
// the same functions the CPU kernel calls.
//
// An update block is 8 warps over a tile of at most 256 columns: a warp owns one sign word
// (32 columns, a lane per column) of every G-th row, G = 8 / words per tile row. The new word is
// one __ballot_sync and one store by lane 0; tiles start on word boundaries, so no two blocks
// ever write one word.
#include <cuda_runtime_api.h>
#include <stdint.h>

#include "fused_optim/cuda/dtype.cuh"
#include "fused_optim/cuda/launch.cuh"
#include "fused_optim/cuda/reduce.cuh"
#include "fused_optim/kernels.h"
#include "fused_optim/math/adam.h"
#include "fused_optim/math/smmf.h"

namespace fused_optim {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / cuda::kWarpSize;
static_assert(kSmmfCudaMaxCols == kThreads, "a CUDA tile row is at most one column per thread");
// Row partials (one per row and word) of a tile whose rows span several words: at most 496
// (33 to 64 columns: 2 words x 248 rows); narrower tiles write straight to global memory.
constexpr int kRowSlots = 512;

constexpr int most_row_slots() {
  int most = 0;
  for (int64_t cols = cuda::kWarpSize + 1; cols <= kSmmfCudaMaxCols; ++cols) {
    const SmmfTileShape tile =
        smmf_tile_shape(kSmmfCudaTileElems, cols, kSmmfCudaTileElems, kSmmfCudaMaxCols);
    const int64_t slots = tile.rows * ((cols + 31) / 32);
    most = slots > most ? static_cast<int>(slots) : most;
  }
  return most;
}
static_assert(most_row_slots() <= kRowSlots, "kRowSlots: a tile's (row, word) partials must fit");

__device__ __forceinline__ bool skipped(const SmmfArgs& a) {
  return a.found_inf != nullptr && *a.found_inf != 0.0f;  // GradScaler: the step is skipped
}

__device__ __forceinline__ double read_lr(const SmmfArgs& a) {
  if (a.lr_ptr == nullptr) return a.lr;
  return a.lr_is_f64 ? *static_cast<const double*>(a.lr_ptr)
                     : static_cast<double>(*static_cast<const float*>(a.lr_ptr));
}

using cuda::load;
using cuda::store;

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = cuda::kWarpSize / 2; offset > 0; offset /= 2) {
    x += __shfl_down_sync(0xffffffffu, x, offset);
  }
  return x;  // valid in lane 0
}

// Pass 1 on a dense tile: a flat range, M and V kept whole.
template <typename P, bool kMomentum, bool kL2>
__device__ void update_dense(const SmmfTensor& t, const SmmfTile& x, const SmmfScalars& s,
                             float mult) {
  for (int64_t j = threadIdx.x; j < x.n_cols; j += kThreads) {
    const int64_t e = x.col0 + j;
    float theta = load<P>(t.param, e), m, v;
    const float m_old = kMomentum ? load<P>(t.exp_avg, e) : 0.0f;
    smmf_element<kMomentum, kL2>(theta, load<P>(t.grad, e) * mult, m_old, load<P>(t.exp_avg_sq, e),
                                 s, m, v);
    store<P>(t.param, e, theta);
    if (kMomentum) store<P>(t.exp_avg, e, m);
    store<P>(t.exp_avg_sq, e, v);
  }
}

// Pass 1, one block per tile.
template <typename P, bool kMomentum, bool kL2>
__global__ void __launch_bounds__(kThreads) update_kernel(SmmfArgs a) {
  if (skipped(a)) return;
  __shared__ float row_m[kRowSlots], row_v[kRowSlots];
  __shared__ float col_m[kThreads], col_v[kThreads];
  const int64_t w = blockIdx.x;
  const WorkItem item = a.tiles[w];
  const SmmfTensor t = a.tensors[item.tensor];
  const SmmfTile x = smmf_tile(t, item.chunk);
  if (x.n_rows == 0 || x.n_cols == 0) return;
  const SmmfScalars s = smmf_scalars(read_lr(a), *t.step + 1.0, a.beta, a.growth_rate, a.decay_rate,
                                     a.eps, a.weight_decay, a.decoupled);
  const float mult = grad_multiplier(false, a.grad_scale, a.clip_coef);
  if (!t.factored) {
    update_dense<P, kMomentum, kL2>(t, x, s, mult);
    return;
  }
  const int lane = threadIdx.x % cuda::kWarpSize, warp = threadIdx.x / cuda::kWarpSize;
  const int words = static_cast<int>((x.n_cols + cuda::kWarpSize - 1) / cuda::kWarpSize);
  const int groups = kWarps / words;  // warps sharing a word take every groups-th row
  const int word = warp % words, group = warp / words;
  const int64_t j = static_cast<int64_t>(word) * cuda::kWarpSize + lane;  // column in the tile
  const bool active = group < groups;
  const bool in_tile = active && j < x.n_cols;
  const float cm = kMomentum && in_tile ? t.col_m[x.col0 + j] : 0.0f;
  const float cv = in_tile ? t.col_v[x.col0 + j] : 0.0f;
  float acc_m = 0.0f, acc_v = 0.0f;  // this column's sums over the rows this warp takes
  const SmmfPartials p = smmf_partials(t, a.partials);
  float* row_m_out = p.row_m;
  float* row_v_out = p.row_v;
  if (active) {
    for (int64_t k = group; k < x.n_rows; k += groups) {
      const int64_t i = x.row0 + k;
      const int64_t at = i * t.words + x.col0 / kSmmfWordBits + word;  // this warp's sign word
      const uint32_t old = kMomentum ? static_cast<uint32_t>(t.sign[at]) : 0u;
      float m = 0.0f, v = 0.0f;
      // the tensor's element; a shard's first and last rows hold only some (SmmfTensor)
      const int64_t e = i * t.cols + x.col0 + j - t.skip;
      const bool valid = in_tile && e >= 0 && e < t.numel;
      if (valid) {
        float theta = load<P>(t.param, e);
        const float m_old = kMomentum ? smmf_signed(t.row_m[t.row0 + i], cm, old, lane) : 0.0f;
        smmf_element<kMomentum, kL2>(theta, load<P>(t.grad, e) * mult, m_old,
                                     t.row_v[t.row0 + i] * cv, s, m, v);
        store<P>(t.param, e, theta);
      }
      const float abs_m = fabsf(m);  // 0 in the lanes past the row's end
      if (kMomentum) {
        const uint32_t bits = __ballot_sync(0xffffffffu, valid && smmf_sign_bit(m) != 0u);
        if (lane == 0) t.sign[at] = static_cast<int32_t>(bits);
        acc_m += abs_m;
      }
      acc_v += v;
      const float rm = kMomentum ? warp_sum(abs_m) : 0.0f;
      const float rv = warp_sum(v);
      if (lane == 0) {
        if (words == 1) {  // the warp's sum is the row's: straight to the partials
          row_m_out[i * t.col_tiles + x.cb] = rm;
          row_v_out[i * t.col_tiles + x.cb] = rv;
        } else {
          row_m[k * words + word] = rm;
          row_v[k * words + word] = rv;
        }
      }
    }
  }
  col_m[threadIdx.x] = acc_m;
  col_v[threadIdx.x] = acc_v;
  __syncthreads();
  // Rows spread over several words: their word sums added in word order.
  if (words > 1) {
    for (int64_t k = threadIdx.x; k < x.n_rows; k += kThreads) {
      float rm = 0.0f, rv = 0.0f;
      for (int q = 0; q < words; ++q) {
        rm += row_m[k * words + q];
        rv += row_v[k * words + q];
      }
      row_m_out[(x.row0 + k) * t.col_tiles + x.cb] = rm;
      row_v_out[(x.row0 + k) * t.col_tiles + x.cb] = rv;
    }
  }
  // Column partials: the row groups' sums of a column added in group order.
  float* col_m_out = p.col_m + x.rb * t.cols + x.col0;
  float* col_v_out = p.col_v + x.rb * t.cols + x.col0;
  double tile_m = 0.0, tile_v = 0.0;
  for (int64_t c = threadIdx.x; c < x.n_cols; c += kThreads) {
    const int q = static_cast<int>(c / cuda::kWarpSize), l = static_cast<int>(c % cuda::kWarpSize);
    float cm_sum = 0.0f, cv_sum = 0.0f;
    for (int g = 0; g < groups; ++g) {
      cm_sum += col_m[(g * words + q) * cuda::kWarpSize + l];
      cv_sum += col_v[(g * words + q) * cuda::kWarpSize + l];
    }
    col_m_out[c] = cm_sum;
    col_v_out[c] = cv_sum;
    tile_m += cm_sum;
    tile_v += cv_sum;
  }
  const auto add = [](double lhs, double rhs) { return lhs + rhs; };
  tile_m = cuda::block_reduce<kThreads>(tile_m, add);
  __syncthreads();  // block_reduce's shared buffer is reused by the second reduction
  tile_v = cuda::block_reduce<kThreads>(tile_v, add);
  if (threadIdx.x == 0) {
    a.tile_totals[2 * w] = tile_m;
    a.tile_totals[2 * w + 1] = tile_v;
  }
}

// Pass 2, one block per part: the new factors of a block of rows or of columns; part 0 of every
// tensor advances its step.
template <bool kMomentum>
__global__ void __launch_bounds__(kThreads) finalize_kernel(SmmfArgs a) {
  if (skipped(a)) return;
  const WorkItem item = a.parts[blockIdx.x];
  const SmmfTensor t = a.tensors[item.tensor];
  const int64_t part = item.chunk;
  if (part == 0 && threadIdx.x == 0) *t.step = *t.step + 1.0f;
  if (!t.factored || t.numel == 0) return;
  const SmmfPartials p = smmf_partials(t, a.partials);
  const SmmfRawSums out = smmf_raw_sums(t, a.sums, a.sums_rows, a.sums_cols, a.sums_mats);
  if (part < t.row_parts) {
    const int64_t i1 = min(t.rows, (part + 1) * kSmmfFinalizeChunk);
    for (int64_t i = part * kSmmfFinalizeChunk + threadIdx.x; i < i1; i += kThreads) {
      smmf_finalize_row<kMomentum>(t, p, out, i);
    }
    return;
  }
  // The matrix's totals, from its tiles' totals: each thread a strided run, then a fixed tree.
  __shared__ double totals[2];
  const int64_t n_tiles = t.row_tiles * t.col_tiles;
  double total_m = 0.0, total_v = 0.0;
  for (int64_t k = threadIdx.x; k < n_tiles; k += kThreads) {
    total_m += a.tile_totals[2 * (t.first_tile + k)];
    total_v += a.tile_totals[2 * (t.first_tile + k) + 1];
  }
  const auto add = [](double lhs, double rhs) { return lhs + rhs; };
  total_m = cuda::block_reduce<kThreads>(total_m, add);
  __syncthreads();
  total_v = cuda::block_reduce<kThreads>(total_v, add);
  if (threadIdx.x == 0) {
    totals[0] = total_m;
    totals[1] = total_v;
  }
  __syncthreads();
  const int64_t j0 = (part - t.row_parts) * kSmmfFinalizeChunk;
  const int64_t j1 = min(t.cols, j0 + kSmmfFinalizeChunk);
  for (int64_t j = j0 + threadIdx.x; j < j1; j += kThreads) {
    double m = 0.0, v = 0.0;
    for (int64_t k = 0; k < t.row_tiles; ++k) {
      m += p.col_m[k * t.cols + j];
      v += p.col_v[k * t.cols + j];
    }
    smmf_finalize_col<kMomentum>(t, out, j, m, v, totals[0], totals[1]);
  }
}

template <typename P, bool kMomentum, bool kL2>
void launch_all(const SmmfArgs& a, cudaStream_t stream) {
  const unsigned int tiles = cuda::grid_for_items(a.n_tiles, "smmf_cuda");
  const unsigned int parts = cuda::grid_for_items(a.n_parts, "smmf_cuda");
  update_kernel<P, kMomentum, kL2><<<tiles, kThreads, 0, stream>>>(a);
  finalize_kernel<kMomentum><<<parts, kThreads, 0, stream>>>(a);
}

}  // namespace

void smmf_cuda(const SmmfArgs& args, cudaStream_t stream) {
  if (args.n_tensors == 0) return;
  if (args.tensors == nullptr || args.tiles == nullptr || args.parts == nullptr ||
      args.tile_totals == nullptr) {
    throw std::invalid_argument("fused_optim: smmf_cuda: missing plan or scratch buffers");
  }
  const bool l2 = !args.decoupled && args.weight_decay != 0.0;
  cuda::dispatch_dtype(args.param_dtype, [&](auto param_tag) {
    using P = typename decltype(param_tag)::type;
    if (args.momentum) {
      l2 ? launch_all<P, true, true>(args, stream) : launch_all<P, true, false>(args, stream);
    } else {
      l2 ? launch_all<P, false, true>(args, stream) : launch_all<P, false, false>(args, stream);
    }
  });
  cuda::check_launch("smmf_cuda");
}

}  // namespace fused_optim

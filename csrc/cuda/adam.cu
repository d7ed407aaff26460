// Adam / AdamW / AdaX / AdaXW on CUDA: one launch for all tensors of a call, one block per work
// item (tensor, chunk). The per-element math is fused_optim::adam_element (math/adam.h), the
// same function the CPU kernels call; ALGORITHMS.md sections 1 and 2.
#include <cuda_runtime_api.h>
#include <stdint.h>

#include "fused_optim/cuda/dtype.cuh"
#include "fused_optim/cuda/launch.cuh"
#include "fused_optim/kernels.h"
#include "fused_optim/math/adam.h"

namespace fused_optim {
namespace {

constexpr int kAdamThreads = 512;

// Per-block values computed once by thread 0 (double math is slow on many GPUs).
struct BlockScalars {
  AdamStepScalars s;
  float grad_mult;
  float new_step;
};

// Updates n elements starting at the given pointers; the vectorised body needs every pointer
// aligned to kVecBytes, the scalar path (kVec = 1) needs nothing.
template <typename ParamT, typename StateT, bool kAmsgrad, int kVec>
__device__ __forceinline__ void adam_range(ParamT* param, const ParamT* grad, StateT* exp_avg,
                                           StateT* exp_avg_sq, StateT* max_exp_avg_sq, int64_t n,
                                           const BlockScalars& b) {
  const int64_t n_vec = n / kVec;
  for (int64_t i = threadIdx.x; i < n_vec; i += blockDim.x) {
    float theta[kVec], g[kVec], m[kVec], v[kVec], vmax[kVec];
    cuda::load_vec<ParamT, kVec>(param, i, theta);
    cuda::load_vec<ParamT, kVec>(grad, i, g);
    cuda::load_vec<StateT, kVec>(exp_avg, i, m);
    cuda::load_vec<StateT, kVec>(exp_avg_sq, i, v);
    if constexpr (kAmsgrad) cuda::load_vec<StateT, kVec>(max_exp_avg_sq, i, vmax);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      adam_element<kAmsgrad>(theta[k], g[k] * b.grad_mult, m[k], v[k], vmax[k], b.s);
    }
    cuda::store_vec<ParamT, kVec>(param, i, theta);
    cuda::store_vec<StateT, kVec>(exp_avg, i, m);
    cuda::store_vec<StateT, kVec>(exp_avg_sq, i, v);
    if constexpr (kAmsgrad) cuda::store_vec<StateT, kVec>(max_exp_avg_sq, i, vmax);
  }
}

template <typename ParamT, typename StateT, bool kAmsgrad>
__global__ void __launch_bounds__(kAdamThreads) adam_kernel(AdamArgs args) {
  // GradScaler found inf/NaN: the whole step is skipped, step counters included.
  if (args.found_inf != nullptr && *args.found_inf != 0.0f) return;

  const WorkItem item = args.items[blockIdx.x];
  const AdamTensor t = args.tensors[item.tensor];

  __shared__ BlockScalars shared;
  if (threadIdx.x == 0) {
    double lr = args.lr;
    if (args.lr_ptr != nullptr) {
      lr = args.lr_is_f64 ? *static_cast<const double*>(args.lr_ptr)
                          : static_cast<double>(*static_cast<const float*>(args.lr_ptr));
    }
    // The step is a float32 tensor incremented in float32, as torch.optim does.
    const float new_step = *t.step + 1.0f;
    const double step = static_cast<double>(new_step);
    shared.s = args.adax ? adax_step_scalars(lr, step, args.beta1, args.beta2, args.eps,
                                             args.weight_decay, args.decoupled)
                         : adam_step_scalars(lr, step, args.beta1, args.beta2, args.eps,
                                             args.weight_decay, args.decoupled);
    shared.grad_mult = grad_multiplier(args.maximize, args.grad_scale, args.clip_coef);
    shared.new_step = new_step;
  }
  __syncthreads();
  const BlockScalars b = shared;

  const cuda::ChunkRange r = cuda::chunk_range(item.chunk, t.numel);
  ParamT* param = static_cast<ParamT*>(t.param) + r.begin;
  const ParamT* grad = static_cast<const ParamT*>(t.grad) + r.begin;
  StateT* exp_avg = static_cast<StateT*>(t.exp_avg) + r.begin;
  StateT* exp_avg_sq = static_cast<StateT*>(t.exp_avg_sq) + r.begin;
  StateT* max_exp_avg_sq = kAmsgrad ? static_cast<StateT*>(t.max_exp_avg_sq) + r.begin : nullptr;

  // One vector moves kVec elements of the wider type in <= kVecBytes, so a vector of either
  // type is kVec * sizeof(T) bytes and chunk starts (multiples of 65536 elements) keep it aligned.
  constexpr int kWide = sizeof(ParamT) > sizeof(StateT) ? sizeof(ParamT) : sizeof(StateT);
  constexpr int kVec = cuda::kVecBytes / kWide;
  const bool aligned = cuda::is_aligned(t.param) && cuda::is_aligned(t.grad) &&
                       cuda::is_aligned(t.exp_avg) && cuda::is_aligned(t.exp_avg_sq) &&
                       (!kAmsgrad || cuda::is_aligned(t.max_exp_avg_sq));
  int64_t done = 0;
  if (aligned) {
    adam_range<ParamT, StateT, kAmsgrad, kVec>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
                                               r.size, b);
    done = r.size / kVec * kVec;
  }
  // Misaligned tensors, and the tail of an aligned one.
  adam_range<ParamT, StateT, kAmsgrad, 1>(
      param + done, grad + done, exp_avg + done, exp_avg_sq + done,
      kAmsgrad ? max_exp_avg_sq + done : nullptr, r.size - done, b);

  // The last block of a tensor to finish writes its step. Every block read the old step before
  // its increment of the counter, so no block can see the new value. The counter goes back to
  // zero so the buffer serves the next launch (and CUDA-graph replays) without a memset.
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const int old = atomicAdd(&args.done_counters[item.tensor], 1);
    if (old == num_chunks(t.numel) - 1) {
      __threadfence();  // acquire side: the other blocks' reads of the old step came first
      *t.step = b.new_step;
      args.done_counters[item.tensor] = 0;
    }
  }
}

template <typename ParamT, typename StateT>
void launch_adam(const AdamArgs& args, unsigned int grid, cudaStream_t stream) {
  if (args.amsgrad) {
    adam_kernel<ParamT, StateT, true><<<grid, kAdamThreads, 0, stream>>>(args);
  } else {
    adam_kernel<ParamT, StateT, false><<<grid, kAdamThreads, 0, stream>>>(args);
  }
}

}  // namespace

void adam_cuda(const AdamArgs& args, cudaStream_t stream) {
  if (args.n_items == 0) return;
  const unsigned int grid = cuda::grid_for_items(args.n_items, "adam_cuda");
  if (args.tensors == nullptr || args.items == nullptr || args.done_counters == nullptr) {
    throw std::invalid_argument("fused_optim: adam_cuda: missing plan or counters buffer");
  }
  cuda::dispatch_dtype(args.param_dtype, [&](auto param_tag) {
    cuda::dispatch_dtype(args.state_dtype, [&](auto state_tag) {
      launch_adam<typename decltype(param_tag)::type, typename decltype(state_tag)::type>(
          args, grid, stream);
    });
  });
  cuda::check_launch("adam_cuda");
}

}  // namespace fused_optim

// The multi-tensor work plan shared by the CPU and CUDA kernels (DESIGN.md "Multi-tensor work
// plan"). Every tensor is cut into chunks of kChunkSize elements; a work item names one
// (tensor, chunk) pair. An empty tensor still gets one work item, so per-tensor bookkeeping
// (the step counter) happens exactly once for every tensor. Element counts are int64.
#pragma once

#include <stdint.h>

#include "fused_optim/macros.h"

namespace fused_optim {

constexpr int64_t kChunkSize = int64_t{1} << 16;

// Storage dtypes of params, grads and states. Math is always fp32.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct WorkItem {
  int32_t tensor;
  int32_t chunk;
};

// Addresses of one tensor of an Adam-family call. max_exp_avg_sq is null unless amsgrad.
struct AdamTensor {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  float* step;
  int64_t numel;
};

// Addresses of one tensor of a norm or scale call.
struct FlatTensor {
  void* data;
  int64_t numel;
};

// Host and device: the CUDA Adam kernel finds the last block of a tensor with it.
FO_HOST_DEVICE int64_t num_chunks(int64_t numel) {
  return numel == 0 ? 1 : (numel + kChunkSize - 1) / kChunkSize;
}

}  // namespace fused_optim

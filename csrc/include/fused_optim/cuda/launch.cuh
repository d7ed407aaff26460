// Work-plan and launch helpers shared by the CUDA kernels (one block per work item).
// CUDA headers only (no torch).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include <stdexcept>
#include <string>

#include "fused_optim/multi_tensor.h"

namespace fused_optim {
namespace cuda {

// Elements [begin, begin + size) of one work item: its chunk, empty for an empty tensor.
struct ChunkRange {
  int64_t begin;
  int64_t size;
};

__device__ __forceinline__ ChunkRange chunk_range(int32_t chunk, int64_t numel) {
  const int64_t begin = static_cast<int64_t>(chunk) * kChunkSize;
  const int64_t left = numel - begin;
  return ChunkRange{begin, left < 0 ? 0 : (left < kChunkSize ? left : kChunkSize)};
}

// Host: turns a failed launch into an exception the Python binding reports.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fused_optim: CUDA error in ") + kernel + ": " +
                             cudaGetErrorString(err));
  }
}

// Host: the grid of a one-block-per-work-item launch.
inline unsigned int grid_for_items(int64_t n_items, const char* kernel) {
  if (n_items < 0 || n_items > INT32_MAX) {
    throw std::invalid_argument(std::string("fused_optim: ") + kernel + ": " +
                                std::to_string(n_items) + " work items do not fit one grid");
  }
  return static_cast<unsigned int>(n_items);
}

}  // namespace cuda
}  // namespace fused_optim

// Moves a host work plan (per-tensor records followed by work items) to the device that runs
// the kernel. On the CPU the host vectors are used as they are; on CUDA the plan is uploaded
// with one async copy from pinned memory and cached by content, so a step whose tensor
// addresses did not change uploads nothing (and can be replayed inside a CUDA graph).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace fused_optim {

struct DevicePlan {
  const void* records = nullptr;        // device copy of the per-tensor records
  const void* items = nullptr;          // device copy of the work items
  int32_t* counters = nullptr;          // n_tensors zeroed int32 (for per-tensor completion counts)
  at::Tensor keep_plan, keep_counters;  // hold the buffers until the launch is queued
};

// `bytes` holds records (records_size bytes) followed by the work items.
DevicePlan upload_plan(const std::vector<uint8_t>& bytes, size_t records_size, int32_t n_tensors,
                       const at::Device& device);

}  // namespace fused_optim

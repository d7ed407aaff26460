// CUDA side of device_plan.h. Host C++ (torch APIs), compiled only in CUDA builds.
#include "../ops/device_plan.h"

#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <string_view>

namespace fused_optim {
namespace {

struct CachedPlan {
  at::Device device{at::kCPU};
  std::vector<uint8_t> key;  // the host bytes: the plan is reused only on an exact match
  at::Tensor host;           // pinned copy, kept alive: a captured graph replays the copy from it
  at::Tensor plan;           // device copy
  at::Tensor counters;       // int32 zeros
  bool captured = false;     // used by a stream capture: a graph may replay it, never evicted
};

// One entry per distinct plan in use (an optimizer has one per bucket); host bytes are small.
constexpr size_t kMaxCached = 1024;
std::mutex cache_mutex;
std::deque<CachedPlan> cache;  // most recently used first

}  // namespace

DevicePlan upload_plan(const std::vector<uint8_t>& bytes, size_t records_size, int32_t n_tensors,
                       const at::Device& device) {
  std::lock_guard<std::mutex> lock(cache_mutex);
  for (auto it = cache.begin(); it != cache.end(); ++it) {
    if (it->device == device && it->key == bytes) {
      if (it != cache.begin()) {
        cache.push_front(std::move(*it));
        cache.erase(std::next(it));
      }
      break;
    }
  }
  if (cache.empty() || cache.front().device != device || cache.front().key != bytes) {
    c10::cuda::CUDAGuard guard(device);
    CachedPlan entry;
    entry.device = device;
    entry.key = bytes;
    const int64_t n = static_cast<int64_t>(bytes.size());
    entry.host = at::empty({n}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(entry.host.data_ptr(), bytes.data(), bytes.size());
    entry.plan = entry.host.to(device, /*non_blocking=*/true);
    entry.counters = at::zeros({std::max<int32_t>(n_tensors, 1)},
                               at::TensorOptions().dtype(at::kInt).device(device));
    cache.push_front(std::move(entry));
    // Evict the least recently used plans that no captured graph may depend on.
    for (size_t i = cache.size(); cache.size() > kMaxCached && i-- > 1;) {
      if (!cache[i].captured) cache.erase(cache.begin() + static_cast<std::ptrdiff_t>(i));
    }
  }
  CachedPlan& hit = cache.front();
  // A graph captured now replays with these buffers: keep them for good (hits included).
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    hit.captured = true;
  } else {
    // Used on the current stream, perhaps not the one that allocated them: an eviction must
    // not hand the memory to that stream's allocations before this launch is done with it.
    const c10::Stream stream = c10::cuda::getCurrentCUDAStream(device.index());
    hit.plan.record_stream(stream);
    hit.counters.record_stream(stream);
  }
  DevicePlan out;
  out.records = hit.plan.data_ptr();
  out.items = static_cast<const uint8_t*>(hit.plan.data_ptr()) + records_size;
  out.counters = hit.counters.data_ptr<int32_t>();
  out.keep_plan = hit.plan;
  out.keep_counters = hit.counters;
  return out;
}

}  // namespace fused_optim

// The machinery every operator binding shares (csrc/ops/<algorithm>.cpp): input checks, dense
// working copies for unusual memory layouts, the multi-tensor work plan and running it on the
// CPU kernels (csrc/cpu) or uploading it and launching the CUDA kernels (csrc/cuda).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "device_plan.h"
#include "fused_optim/kernels.h"

#ifdef FO_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fused_optim {

inline DType to_dtype(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "fused_optim: ", what, " has dtype ", t.scalar_type(),
                       "; supported dtypes are float32, float16 and bfloat16");
  }
}

inline void check_plain(const at::Tensor& t, const char* what, int64_t i) {
  TORCH_CHECK(t.defined(), "fused_optim: ", what, "[", i, "] is undefined");
  TORCH_CHECK(t.layout() == at::kStrided, "fused_optim: ", what, "[", i,
              "] is sparse; fused optimizers support dense tensors only");
  TORCH_CHECK_TYPE(!t.is_complex(), "fused_optim: ", what, "[", i,
                   "] is complex; view it as real (torch.view_as_real) first");
}

inline void check_same_device(const at::Tensor& t, const at::Device& device, const char* what,
                              int64_t i) {
  TORCH_CHECK(t.device() == device, "fused_optim: ", what, "[", i, "] is on ", t.device(),
              " but params[0] is on ", device, "; one call takes tensors of one device");
}

inline void check_scalar_tensor(const std::optional<at::Tensor>& t, const at::Device& device,
                                const char* what) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat, "fused_optim: ", what,
              " must be a one-element float32 tensor, got ", t->scalar_type(), " with ", t->numel(),
              " elements");
  TORCH_CHECK(t->device() == device, "fused_optim: ", what, " is on ", t->device(),
              " but the params are on ", device);
}

// params[i], grads[i] and state_steps[i] of a call whose tensors live on `device`: plain, on
// the device, one dtype for params and grads (that of params[0]), same shapes, a float32 step.
inline void check_param_grad_step(at::TensorList params, at::TensorList grads, at::TensorList steps,
                                  size_t i, const at::Device& device) {
  const auto ii = static_cast<int64_t>(i);
  const at::Tensor& p = params[i];
  check_plain(p, "params", ii);
  check_plain(grads[i], "grads", ii);
  check_same_device(p, device, "params", ii);
  check_same_device(grads[i], device, "grads", ii);
  TORCH_CHECK_TYPE(p.scalar_type() == params[0].scalar_type() &&
                       grads[i].scalar_type() == params[0].scalar_type(),
                   "fused_optim: params[", i, "] and grads[", i, "] must both have dtype ",
                   params[0].scalar_type(), " (one call per dtype), got ", p.scalar_type(), " and ",
                   grads[i].scalar_type());
  TORCH_CHECK(grads[i].sizes() == p.sizes(), "fused_optim: grads[", i, "] has shape ",
              grads[i].sizes(), " but params[", i, "] has shape ", p.sizes());
  TORCH_CHECK(
      steps[i].numel() == 1 && steps[i].scalar_type() == at::kFloat && steps[i].device() == device,
      "fused_optim: state_steps[", i, "] must be a one-element float32 tensor on ", device);
}

// Two records over one param's memory would race inside a parallel loop / grid: refuse them.
template <typename Record>
void check_distinct_params(const std::vector<Record>& records) {
  std::vector<void*> seen;
  for (const Record& r : records) {
    if (r.numel > 0) seen.push_back(r.param);
  }
  std::sort(seen.begin(), seen.end());
  TORCH_CHECK(std::adjacent_find(seen.begin(), seen.end()) == seen.end(),
              "fused_optim: the same parameter memory appears twice in one call; pass each "
              "parameter once");
}

// Where a kernel reads a tensor lr (a one-element float32 or float64 tensor on the params'
// device) from; leaves ptr null without one.
inline void lr_source(const std::optional<at::Tensor>& lr_tensor, const at::Device& device,
                      const void*& ptr, bool& is_f64) {
  ptr = nullptr;
  if (!lr_tensor.has_value()) return;
  TORCH_CHECK(lr_tensor->numel() == 1 && (lr_tensor->scalar_type() == at::kFloat ||
                                          lr_tensor->scalar_type() == at::kDouble),
              "fused_optim: a tensor lr must be a one-element float32 or float64 tensor");
  TORCH_CHECK(lr_tensor->device() == device, "fused_optim: lr is on ", lr_tensor->device(),
              " but the params are on ", device);
  ptr = lr_tensor->data_ptr();
  is_f64 = lr_tensor->scalar_type() == at::kDouble;
}

inline const float* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

// A step's GradScaler and clipping tensors (each a one-element float32 tensor or none), checked
// and set on any kernel's arguments.
template <typename Args>
void set_step_tensors(Args& args, const at::Device& device,
                      const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::Tensor>& clip_coef) {
  check_scalar_tensor(grad_scale, device, "grad_scale");
  check_scalar_tensor(found_inf, device, "found_inf");
  check_scalar_tensor(clip_coef, device, "clip_coef");
  args.grad_scale = ptr_or_null(grad_scale);
  args.found_inf = ptr_or_null(found_inf);
  args.clip_coef = ptr_or_null(clip_coef);
}

// The kernels walk each tensor as flat memory, so all tensors of one index must share one
// dense layout. Params, grads and states almost always do; when one does not (a strided
// view param, a grad assigned with other strides) it goes through a dense working copy.
class Layouts {
 public:
  // Returns the tensor to hand to the kernel for `t`, laid out like `ref`.
  at::Tensor use(const at::Tensor& t, const at::Tensor& ref, bool written) {
    if (written) check_writable(t);
    if (t.is_non_overlapping_and_dense() && t.strides() == ref.strides()) return t;
    // ref's layout, t's dtype (states may be fp32 under 16-bit params)
    at::Tensor work = at::empty_like(ref, ref.options().dtype(t.scalar_type()));
    work.copy_(t);
    keep_alive_.push_back(work);  // the kernel reads it after this returns
    if (written) write_back_.emplace_back(t, work);
    return work;
  }
  // The layout the kernel uses for a param: its own when dense, else contiguous.
  static at::Tensor reference(const at::Tensor& param) {
    return param.is_non_overlapping_and_dense()
               ? param
               : at::empty_like(param, at::MemoryFormat::Contiguous);
  }
  // Returns `t` when it is contiguous, else a contiguous working copy (row-major order is what
  // a kernel walking rows and columns needs, whatever the param's own layout).
  at::Tensor contiguous(const at::Tensor& t, bool written) {
    if (written) check_writable(t);
    if (t.is_contiguous()) return t;
    at::Tensor work = t.contiguous();
    keep_alive_.push_back(work);
    if (written) write_back_.emplace_back(t, work);
    return work;
  }
  // A written tensor whose elements share memory (an expanded one) would be written back only
  // after the kernels ran (copy_ refuses it then): refuse it while the plan is built, before
  // anything changes.
  static void check_writable(const at::Tensor& t) {
    TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes,
                "fused_optim: a tensor of shape ", t.sizes(), " and strides ", t.strides(),
                " that the step writes has elements sharing memory (an expanded tensor?)");
  }
  void finish() {
    for (auto& [dst, src] : write_back_) dst.copy_(src);
  }
  bool used() const { return !keep_alive_.empty(); }

 private:
  std::vector<at::Tensor> keep_alive_;
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back_;
};

// The params of an optimizer bucket held by a group object (AdamGroup, SmmfGroup) as raw
// TensorImpl pointers, without a strong or weak reference: either would make
// torch.utils.swap_tensors (module.to / load_state_dict with swapping) refuse them. The contract
// with the only caller, the optimizer's bucket (fused_optim/optim/_base.py): it holds the
// params, and it replaces the group object before a step whenever a param's TensorImpl changed
// (it compares each param's _cdata every step).
class RawParams {
 public:
  explicit RawParams(const std::vector<at::Tensor>& params) {
    impls_.reserve(params.size());
    for (const at::Tensor& p : params) impls_.push_back(p.unsafeGetTensorImpl());
  }
  size_t size() const { return impls_.size(); }
  const c10::TensorImpl* operator[](size_t i) const { return impls_[i]; }
  // Strong references, only while a full plan is built (touching 2000 refcounts per step cost
  // more than the groups' reuse checks themselves).
  std::vector<at::Tensor> tensors() const {
    std::vector<at::Tensor> params;
    params.reserve(impls_.size());
    for (c10::TensorImpl* impl : impls_) {
      params.emplace_back(
          c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>::reclaim_copy(impl));
    }
    return params;
  }

 private:
  std::vector<c10::TensorImpl*> impls_;
};

// Two sizes or strides arrays equal, without the memcmp call of IntArrayRef's == (the groups'
// reuse checks compare thousands a step).
inline bool same_ints(c10::IntArrayRef a, c10::IntArrayRef b) {
  if (a.size() != b.size()) return false;
  for (size_t k = 0; k < a.size(); ++k) {
    if (a[k] != b[k]) return false;
  }
  return true;
}

// Whether tensor t still lays its elements out as `param` does: contiguous both, the common
// case, costs two flags and no comparison.
inline bool same_layout(const c10::TensorImpl& t, const c10::TensorImpl& param) {
  if (t.numel() != param.numel()) return false;
  if (t.is_contiguous() && param.is_contiguous()) return true;
  return same_ints(t.sizes(), param.sizes()) && same_ints(t.strides(), param.strides());
}

inline std::vector<WorkItem> make_items(const std::vector<int64_t>& numels) {
  std::vector<WorkItem> items;
  for (size_t i = 0; i < numels.size(); ++i) {
    const int64_t chunks = num_chunks(numels[i]);
    TORCH_CHECK(chunks <= INT32_MAX, "fused_optim: tensor ", i, " is too large");
    for (int64_t c = 0; c < chunks; ++c) {
      items.push_back({static_cast<int32_t>(i), static_cast<int32_t>(c)});
    }
  }
  return items;
}

// Records followed by work items, in one buffer (one upload on CUDA).
template <typename Record>
std::vector<uint8_t> pack_plan(const std::vector<Record>& records,
                               const std::vector<WorkItem>& items) {
  const size_t rec_bytes = records.size() * sizeof(Record);
  std::vector<uint8_t> bytes(rec_bytes + items.size() * sizeof(WorkItem));
  std::memcpy(bytes.data(), records.data(), rec_bytes);
  std::memcpy(bytes.data() + rec_bytes, items.data(), items.size() * sizeof(WorkItem));
  return bytes;
}

// Runs `cpu(args)` or, on CUDA, uploads the plan and runs `cuda(args, stream)`.
template <typename Args, typename Record, typename CpuFn, typename CudaFn>
void run_plan(Args args, const std::vector<Record>& records, const std::vector<WorkItem>& items,
              const at::Device& device, CpuFn cpu, CudaFn cuda, int32_t** counters = nullptr) {
  args.n_tensors = static_cast<int32_t>(records.size());
  args.n_items = static_cast<int64_t>(items.size());
  if (device.is_cpu()) {
    args.tensors = records.data();
    args.items = items.data();
    cpu(args);
    return;
  }
#ifdef FO_WITH_CUDA
  TORCH_CHECK(device.is_cuda(), "fused_optim: unsupported device ", device);
  c10::cuda::CUDAGuard guard(device);
  const DevicePlan plan = upload_plan(pack_plan(records, items), records.size() * sizeof(Record),
                                      args.n_tensors, device);
  args.tensors = static_cast<const Record*>(plan.records);
  args.items = static_cast<const WorkItem*>(plan.items);
  if (counters != nullptr) *counters = plan.counters;
  cuda(args, c10::cuda::getCurrentCUDAStream(device.index()).stream());
#else
  (void)cuda;
  (void)counters;
  TORCH_CHECK(false, "fused_optim: this build has no CUDA kernels (device ", device, ")");
#endif
}

}  // namespace fused_optim

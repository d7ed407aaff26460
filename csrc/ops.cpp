// The fused_optim operator library: schemas (TORCH_LIBRARY) and the CPU / CUDA
// implementations (TORCH_LIBRARY_IMPL), so torch.ops.fused_optim.* dispatches on the tensors'
// device. This file checks inputs, fixes up unusual memory layouts, builds the multi-tensor
// work plan and hands it to the kernels of csrc/cpu or csrc/cuda.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "device_plan.h"
#include "fused_optim/kernels.h"

#ifdef FO_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fused_optim {
namespace {

DType to_dtype(const at::Tensor& t, const char* what) {
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

void check_plain(const at::Tensor& t, const char* what, int64_t i) {
  TORCH_CHECK(t.defined(), "fused_optim: ", what, "[", i, "] is undefined");
  TORCH_CHECK(t.layout() == at::kStrided, "fused_optim: ", what, "[", i,
              "] is sparse; fused optimizers support dense tensors only");
  TORCH_CHECK_TYPE(!t.is_complex(), "fused_optim: ", what, "[", i,
                   "] is complex; view it as real (torch.view_as_real) first");
}

void check_same_device(const at::Tensor& t, const at::Device& device, const char* what, int64_t i) {
  TORCH_CHECK(t.device() == device, "fused_optim: ", what, "[", i, "] is on ", t.device(),
              " but params[0] is on ", device, "; one call takes tensors of one device");
}

void check_scalar_tensor(const std::optional<at::Tensor>& t, const at::Device& device,
                         const char* what) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat, "fused_optim: ", what,
              " must be a one-element float32 tensor, got ", t->scalar_type(), " with ", t->numel(),
              " elements");
  TORCH_CHECK(t->device() == device, "fused_optim: ", what, " is on ", t->device(),
              " but the params are on ", device);
}

const float* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

// The kernels walk each tensor as flat memory, so all tensors of one index must share one
// dense layout. Params, grads and states almost always do; when one does not (a strided
// view param, a grad assigned with other strides) it goes through a dense working copy.
class Layouts {
 public:
  // Returns the tensor to hand to the kernel for `t`, laid out like `ref`.
  at::Tensor use(const at::Tensor& t, const at::Tensor& ref, bool written) {
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
  void finish() {
    for (auto& [dst, src] : write_back_) dst.copy_(src);
  }
  bool used() const { return !keep_alive_.empty(); }

 private:
  std::vector<at::Tensor> keep_alive_;
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back_;
};

std::vector<WorkItem> make_items(const std::vector<int64_t>& numels) {
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

// ---- Adam family -------------------------------------------------------------------------

// A checked Adam-family call: its work plan and kernel arguments, ready to run.
struct AdamPlan {
  at::Device device{at::kCPU};
  bool amsgrad = false;
  std::vector<AdamTensor> records;
  std::vector<WorkItem> items;
  AdamArgs args;
  Layouts layouts;  // dense working copies, when some tensor needed one
};

// Checks the tensor lists and builds the plan. Hyper-parameters are set by set_adam_scalars.
std::unique_ptr<AdamPlan> plan_adam(at::TensorList params, at::TensorList grads,
                                    at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                    at::TensorList max_exp_avg_sqs, at::TensorList steps,
                                    bool amsgrad) {
  const size_t n = params.size();
  TORCH_CHECK(
      grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
      "fused_optim: params, grads, exp_avgs, exp_avg_sqs and state_steps must have the "
      "same length, got ",
      n, ", ", grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", steps.size());
  TORCH_CHECK(!amsgrad || max_exp_avg_sqs.size() == n,
              "fused_optim: amsgrad needs one max_exp_avg_sq per param");
  auto plan = std::make_unique<AdamPlan>();
  if (n == 0) return plan;
  const at::Device device = params[0].device();
  plan->device = device;
  plan->amsgrad = amsgrad;
  plan->args.param_dtype = to_dtype(params[0], "params[0]");
  plan->args.state_dtype = to_dtype(exp_avgs[0], "exp_avgs[0]");

  Layouts& layouts = plan->layouts;
  std::vector<AdamTensor>& records = plan->records;
  records.resize(n);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {
    const auto ii = static_cast<int64_t>(i);
    check_plain(params[i], "params", ii);
    check_plain(grads[i], "grads", ii);
    check_same_device(grads[i], device, "grads", ii);
    check_same_device(exp_avgs[i], device, "exp_avgs", ii);
    check_same_device(exp_avg_sqs[i], device, "exp_avg_sqs", ii);
    check_same_device(params[i], device, "params", ii);
    TORCH_CHECK_TYPE(params[i].scalar_type() == params[0].scalar_type() &&
                         grads[i].scalar_type() == params[0].scalar_type(),
                     "fused_optim: params[", i, "] and grads[", i, "] must both have dtype ",
                     params[0].scalar_type(), " (one call per dtype), got ",
                     params[i].scalar_type(), " and ", grads[i].scalar_type());
    TORCH_CHECK_TYPE(exp_avgs[i].scalar_type() == exp_avgs[0].scalar_type() &&
                         exp_avg_sqs[i].scalar_type() == exp_avgs[0].scalar_type(),
                     "fused_optim: optimizer states must share one dtype per call");
    TORCH_CHECK(grads[i].numel() == params[i].numel() && exp_avgs[i].numel() == params[i].numel() &&
                    exp_avg_sqs[i].numel() == params[i].numel(),
                "fused_optim: params[", i, "], its grad and its states differ in size");
    TORCH_CHECK(steps[i].numel() == 1 && steps[i].scalar_type() == at::kFloat &&
                    steps[i].device() == device,
                "fused_optim: state_steps[", i, "] must be a one-element float32 tensor on ",
                device);
    const at::Tensor ref = Layouts::reference(params[i]);
    AdamTensor& r = records[i];
    r.param = layouts.use(params[i], ref, true).data_ptr();
    r.grad = layouts.use(grads[i], ref, false).data_ptr();
    r.exp_avg = layouts.use(exp_avgs[i], ref, true).data_ptr();
    r.exp_avg_sq = layouts.use(exp_avg_sqs[i], ref, true).data_ptr();
    if (amsgrad) {
      check_same_device(max_exp_avg_sqs[i], device, "max_exp_avg_sqs", ii);
      TORCH_CHECK_TYPE(max_exp_avg_sqs[i].scalar_type() == exp_avgs[0].scalar_type() &&
                           max_exp_avg_sqs[i].numel() == params[i].numel(),
                       "fused_optim: max_exp_avg_sqs[", i,
                       "] must match exp_avgs in dtype and size");
      r.max_exp_avg_sq = layouts.use(max_exp_avg_sqs[i], ref, true).data_ptr();
    }
    r.step = steps[i].data_ptr<float>();
    r.numel = params[i].numel();
    numels[i] = r.numel;
  }
  // Two records over one memory would race inside the parallel loop / grid (torch applies
  // duplicated params one after the other); refuse them.
  std::vector<void*> seen;
  seen.reserve(n);
  for (const AdamTensor& r : records) {
    if (r.numel > 0) seen.push_back(r.param);
  }
  std::sort(seen.begin(), seen.end());
  TORCH_CHECK(std::adjacent_find(seen.begin(), seen.end()) == seen.end(),
              "fused_optim: the same parameter memory appears twice in one call; pass each "
              "parameter once");
  plan->items = make_items(numels);
  return plan;
}

void set_adam_scalars(AdamArgs& args, const at::Device& device, double lr,
                      const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                      double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                      bool adax, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::Tensor>& clip_coef) {
  check_scalar_tensor(grad_scale, device, "grad_scale");
  check_scalar_tensor(found_inf, device, "found_inf");
  check_scalar_tensor(clip_coef, device, "clip_coef");
  args.lr = lr;
  args.lr_ptr = nullptr;
  if (lr_tensor.has_value()) {
    TORCH_CHECK(lr_tensor->numel() == 1 && (lr_tensor->scalar_type() == at::kFloat ||
                                            lr_tensor->scalar_type() == at::kDouble),
                "fused_optim: a tensor lr must be a one-element float32 or float64 tensor");
    TORCH_CHECK(lr_tensor->device() == device, "fused_optim: lr is on ", lr_tensor->device(),
                " but the params are on ", device);
    args.lr_ptr = lr_tensor->data_ptr();
    args.lr_is_f64 = lr_tensor->scalar_type() == at::kDouble;
  }
  args.beta1 = beta1;
  args.beta2 = beta2;
  args.eps = eps;
  args.weight_decay = weight_decay;
  args.decoupled = decoupled;
  args.amsgrad = amsgrad;
  args.maximize = maximize;
  args.adax = adax;
  args.grad_scale = ptr_or_null(grad_scale);
  args.found_inf = ptr_or_null(found_inf);
  args.clip_coef = ptr_or_null(clip_coef);
}

void run_adam(AdamPlan& plan) {
  if (plan.records.empty()) return;
  int32_t* counters = nullptr;
  run_plan(
      plan.args, plan.records, plan.items, plan.device, [](const AdamArgs& a) { adam_cpu(a); },
      [&counters](AdamArgs a, auto stream) {
        a.done_counters = counters;
#ifdef FO_WITH_CUDA
        adam_cuda(a, stream);
#else
        (void)a;
        (void)stream;
#endif
      },
      &counters);
  plan.layouts.finish();
}

void adam_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
           double lr, const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
           double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize, bool adax,
           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
           const std::optional<at::Tensor>& clip_coef) {
  auto plan = plan_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad);
  if (plan->records.empty()) return;
  set_adam_scalars(plan->args, plan->device, lr, lr_tensor, beta1, beta2, eps, weight_decay,
                   decoupled, amsgrad, maximize, adax, grad_scale, found_inf, clip_coef);
  run_adam(*plan);
}

// The tensors of one optimizer bucket, held on the C++ side with their checked plan, so that
// a step passes only its grads from Python and re-checks only them: boxing a tensor through
// the dispatcher costs ~0.1 us, and passing and checking params, states and steps again every
// step cost more than the update of 2000 small tensors. Anything unusual (a param or state
// that moved, a grad with another layout, working copies) takes the full path of adam_.
class AdamGroup : public torch::CustomClassHolder {
 public:
  // Params are kept as raw TensorImpl pointers, without a strong or weak reference: either
  // would make torch.utils.swap_tensors (module.to / load_state_dict with swapping) refuse
  // them. The contract with the only caller, the optimizer's bucket (fused_optim/optim/
  // _base.py): it holds the params, and it replaces this object before a step whenever a
  // param's TensorImpl changed (it compares each param's _cdata every step).
  AdamGroup(const std::vector<at::Tensor>& params, std::vector<at::Tensor> exp_avgs,
            std::vector<at::Tensor> exp_avg_sqs, std::vector<at::Tensor> max_exp_avg_sqs,
            std::vector<at::Tensor> steps)
      : exp_avgs_(std::move(exp_avgs)),
        exp_avg_sqs_(std::move(exp_avg_sqs)),
        max_exp_avg_sqs_(std::move(max_exp_avg_sqs)),
        steps_(std::move(steps)) {
    param_impls_.reserve(params.size());
    for (const at::Tensor& p : params) param_impls_.push_back(p.unsafeGetTensorImpl());
  }

  void step(const std::vector<at::Tensor>& grads, double lr,
            const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
            double weight_decay, bool decoupled, bool amsgrad, bool maximize, bool adax,
            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
            const std::optional<at::Tensor>& clip_coef) {
    if (!plan_ || plan_->amsgrad != amsgrad || !reuse(grads)) {
      // Strong references only while a full plan is built (touching 2000 refcounts per step
      // cost more than the reuse check itself).
      std::vector<at::Tensor> params;
      params.reserve(param_impls_.size());
      for (c10::TensorImpl* impl : param_impls_) {
        params.emplace_back(
            c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>::reclaim_copy(impl));
      }
      plan_ = plan_adam(params, grads, exp_avgs_, exp_avg_sqs_, max_exp_avg_sqs_, steps_, amsgrad);
    }
    if (plan_->records.empty()) return;
    set_adam_scalars(plan_->args, plan_->device, lr, lr_tensor, beta1, beta2, eps, weight_decay,
                     decoupled, amsgrad, maximize, adax, grad_scale, found_inf, clip_coef);
    run_adam(*plan_);
    if (plan_->layouts.used()) plan_.reset();  // working copies are per call
  }

 private:
  // True when the cached plan still describes these tensors; then it takes the grads' addresses.
  bool reuse(const std::vector<at::Tensor>& grads) {
    if (plan_->layouts.used() || grads.size() != param_impls_.size()) return false;
    for (size_t i = 0; i < grads.size(); ++i) {
      const at::Tensor& g = grads[i];
      const c10::TensorImpl* param = param_impls_[i];
      const AdamTensor& r = plan_->records[i];
      const bool same =
          g.defined() && g.layout() == at::kStrided && g.device() == plan_->device &&
          g.dtype() == param->dtype() && g.numel() == r.numel && param->numel() == r.numel &&
          g.is_non_overlapping_and_dense() && g.strides() == param->strides() &&
          param->data() == r.param && exp_avgs_[i].data_ptr() == r.exp_avg &&
          exp_avg_sqs_[i].data_ptr() == r.exp_avg_sq && steps_[i].data_ptr() == r.step &&
          (!plan_->amsgrad || max_exp_avg_sqs_[i].data_ptr() == r.max_exp_avg_sq);
      if (!same) return false;
    }
    for (size_t i = 0; i < grads.size(); ++i) plan_->records[i].grad = grads[i].data_ptr();
    return true;
  }

  std::vector<c10::TensorImpl*> param_impls_;
  std::vector<at::Tensor> exp_avgs_, exp_avg_sqs_, max_exp_avg_sqs_, steps_;
  std::unique_ptr<AdamPlan> plan_;
};

// ---- Global norm, clip coefficient, scaling ------------------------------------------------

NormKind norm_kind(double norm_type) {
  // 0, negative and -inf norm types (torch accepts them) are computed with torch ops by
  // fused_optim.clip_grad_norm_; the kernels take positive ones and inf.
  TORCH_CHECK_VALUE(norm_type > 0.0, "fused_optim: norm_type must be positive or inf, got ",
                    norm_type);
  if (norm_type == 2.0) return NormKind::kTwo;
  if (std::isinf(norm_type)) return NormKind::kInf;
  return NormKind::kP;
}

// The tensors grouped by dtype, keeping order within a dtype, as flat records. A tensor that is
// not dense in memory goes through a dense working copy, copied back by write_back() when the
// call writes it.
struct FlatGroups {
  std::vector<DType> dtypes;
  std::vector<std::vector<FlatTensor>> records;
  std::vector<std::vector<int64_t>> numels;
  std::vector<at::Tensor> keep_alive;                         // working copies
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_backs;  // (tensor, its working copy)

  // On CUDA the copies are queued on the current stream, after the kernels.
  void write_back() {
    for (auto& [dst, src] : copy_backs) dst.copy_(src);
  }
};

FlatGroups flat_groups(at::TensorList tensors, const at::Device& device, const char* what,
                       bool writable) {
  FlatGroups g;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    check_plain(t, what, static_cast<int64_t>(i));
    check_same_device(t, device, what, static_cast<int64_t>(i));
    const DType dt = to_dtype(t, what);
    at::Tensor dense = t;
    if (!t.is_non_overlapping_and_dense()) {
      dense = t.contiguous();
      g.keep_alive.push_back(dense);
      if (writable) g.copy_backs.emplace_back(t, dense);
    }
    size_t k = 0;
    while (k < g.dtypes.size() && g.dtypes[k] != dt) ++k;
    if (k == g.dtypes.size()) {
      g.dtypes.push_back(dt);
      g.records.emplace_back();
      g.numels.emplace_back();
    }
    g.records[k].push_back({dense.data_ptr(), dense.numel()});
    g.numels[k].push_back(dense.numel());
  }
  return g;
}

// scale_ writes all its tensors at once (a parallel loop, one grid): two tensors over the same
// memory would be scaled concurrently, a race with a nondeterministic result, where torch
// multiplies such memory once per occurrence, one after the other (clip_grad_norm_ splits
// repeated grads into rounds, one call each). So a call whose tensors share memory is refused:
// the byte spans are sorted and neighbours compared, O(n log n). The spans of tensors that are
// not dense in memory may overlap without sharing an element (interleaved views); they are
// refused too, as what cannot be proven apart.
void check_no_overlap(at::TensorList tensors, const char* what) {
  struct Span {
    uintptr_t begin, end;
    size_t index;
  };
  std::vector<Span> spans;
  spans.reserve(tensors.size());
  bool sorted = true;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) continue;
    int64_t extent = t.numel();  // elements from the first to one past the last
    if (!t.is_non_overlapping_and_dense()) {
      TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "fused_optim: ", what, "[", i,
                  "] has elements that share memory (an expanded tensor?); it cannot be scaled "
                  "in place");
      extent = 1;
      for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
    }
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t end = begin + static_cast<uintptr_t>(extent) * t.element_size();
    sorted = sorted && (spans.empty() || spans.back().begin <= begin);
    spans.push_back({begin, end, i});
  }
  if (!sorted) {
    std::sort(spans.begin(), spans.end(),
              [](const Span& a, const Span& b) { return a.begin < b.begin; });
  }
  size_t reach = 0;  // the span reaching furthest so far
  for (size_t k = 1; k < spans.size(); ++k) {
    const Span &a = spans[reach], &b = spans[k];
    TORCH_CHECK(b.begin >= a.end, "fused_optim: ", what, "[", std::min(a.index, b.index), "] and ",
                what, "[", std::max(a.index, b.index),
                "] overlap in memory (the same tensor twice, or views of one tensor); one scale_ "
                "call scales its tensors in parallel, so pass memory shared by several tensors "
                "in separate calls");
    if (b.end > a.end) reach = k;
  }
}

std::tuple<at::Tensor, at::Tensor> global_norm(at::TensorList tensors, double norm_type,
                                               double max_norm,
                                               const std::optional<at::Tensor>& grad_scale) {
  TORCH_CHECK(!tensors.empty(), "fused_optim: global_norm needs at least one tensor");
  const at::Device device = tensors[0].device();
  check_scalar_tensor(grad_scale, device, "grad_scale");
  const NormKind kind = norm_kind(norm_type);
  const FlatGroups g = flat_groups(tensors, device, "tensors", false);

  std::vector<std::vector<WorkItem>> items;
  int64_t n_partials = 0;
  for (const auto& numels : g.numels) {
    items.push_back(make_items(numels));
    n_partials += static_cast<int64_t>(items.back().size());
  }
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
  at::Tensor partials = at::empty({n_partials}, f32.dtype(at::kDouble));
  at::Tensor total_norm = at::empty({}, f32);
  at::Tensor clip_coef = at::empty({}, f32);

  int64_t offset = 0;
  for (size_t k = 0; k < g.dtypes.size(); ++k) {
    NormPartialsArgs a;
    a.dtype = g.dtypes[k];
    a.kind = kind;
    a.p = static_cast<float>(norm_type);
    a.partials = partials.data_ptr<double>() + offset;
    run_plan(
        a, g.records[k], items[k], device, [](const NormPartialsArgs& x) { norm_partials_cpu(x); },
        [](const NormPartialsArgs& x, auto stream) {
#ifdef FO_WITH_CUDA
          norm_partials_cuda(x, stream);
#else
          (void)x;
          (void)stream;
#endif
        });
    offset += static_cast<int64_t>(items[k].size());
  }
  NormFinalizeArgs f;
  f.partials = partials.data_ptr<double>();
  f.n_partials = n_partials;
  f.kind = kind;
  f.p = norm_type;
  f.max_norm = max_norm;
  f.grad_scale = ptr_or_null(grad_scale);
  f.total_norm = total_norm.data_ptr<float>();
  f.clip_coef = clip_coef.data_ptr<float>();
  if (device.is_cpu()) {
    norm_finalize_cpu(f);
  } else {
#ifdef FO_WITH_CUDA
    c10::cuda::CUDAGuard guard(device);
    norm_finalize_cuda(f, c10::cuda::getCurrentCUDAStream(device.index()).stream());
#endif
  }
  return {total_norm, clip_coef};
}

void scale_(at::TensorList tensors, const at::Tensor& coef) {
  if (tensors.empty()) return;
  const at::Device device = tensors[0].device();
  check_scalar_tensor(coef, device, "coef");
  FlatGroups g = flat_groups(tensors, device, "tensors", true);
  check_no_overlap(tensors, "tensors");  // before anything is written
  for (size_t k = 0; k < g.dtypes.size(); ++k) {
    ScaleArgs a;
    a.dtype = g.dtypes[k];
    a.coef = coef.data_ptr<float>();
    run_plan(
        a, g.records[k], make_items(g.numels[k]), device, [](const ScaleArgs& x) { scale_cpu(x); },
        [](const ScaleArgs& x, auto stream) {
#ifdef FO_WITH_CUDA
          scale_cuda(x, stream);
#else
          (void)x;
          (void)stream;
#endif
        });
  }
  g.write_back();
}

}  // namespace

TORCH_LIBRARY(fused_optim, m) {
  m.def(
      "adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, *, "
      "float lr, Tensor? lr_tensor, float beta1, float beta2, float eps, float weight_decay, "
      "bool decoupled, bool amsgrad, bool maximize, bool adax, Tensor? grad_scale, "
      "Tensor? found_inf, Tensor? clip_coef) -> ()");
  m.def(
      "global_norm(Tensor[] tensors, float norm_type, float max_norm, Tensor? grad_scale) "
      "-> (Tensor total_norm, Tensor clip_coef)");
  m.def("scale_(Tensor(a!)[] tensors, Tensor coef) -> ()");
  m.class_<AdamGroup>("AdamGroup")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, std::vector<at::Tensor>>())
      .def("step", &AdamGroup::step);
}

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) {
  m.impl("adam_", &adam_);
  m.impl("global_norm", &global_norm);
  m.impl("scale_", &scale_);
}

#ifdef FO_WITH_CUDA
TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) {
  m.impl("adam_", &adam_);
  m.impl("global_norm", &global_norm);
  m.impl("scale_", &scale_);
}
#endif

}  // namespace fused_optim

// fused_optim._C is imported for its side effect of registering the ops above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}

// The Adam-family operator (Adam, AdamW, AdaX, AdaXW): torch.ops.fused_optim.adam_ and the
// AdamGroup class that keeps an optimizer bucket's tensors on the C++ side.
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <vector>

#include "common.h"

namespace fused_optim {
namespace {

// A checked Adam-family call: its work plan and kernel arguments, ready to run.
struct AdamPlan {
  at::Device device{at::kCPU};
  bool amsgrad = false;
  at::ScalarType param_type = at::kFloat, state_type = at::kFloat;
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
  plan->param_type = params[0].scalar_type();
  plan->state_type = exp_avgs[0].scalar_type();

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
  set_step_tensors(args, device, grad_scale, found_inf, clip_coef);
  args.lr = lr;
  lr_source(lr_tensor, device, args.lr_ptr, args.lr_is_f64);
  args.beta1 = beta1;
  args.beta2 = beta2;
  args.eps = eps;
  args.weight_decay = weight_decay;
  args.decoupled = decoupled;
  args.amsgrad = amsgrad;
  args.maximize = maximize;
  args.adax = adax;
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
  // The params as RawParams (ops/common.h: the contract with the bucket).
  AdamGroup(const std::vector<at::Tensor>& params, std::vector<at::Tensor> exp_avgs,
            std::vector<at::Tensor> exp_avg_sqs, std::vector<at::Tensor> max_exp_avg_sqs,
            std::vector<at::Tensor> steps)
      : params_(params),
        exp_avgs_(std::move(exp_avgs)),
        exp_avg_sqs_(std::move(exp_avg_sqs)),
        max_exp_avg_sqs_(std::move(max_exp_avg_sqs)),
        steps_(std::move(steps)) {}

  void step(const std::vector<at::Tensor>& grads, double lr,
            const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
            double weight_decay, bool decoupled, bool amsgrad, bool maximize, bool adax,
            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
            const std::optional<at::Tensor>& clip_coef) {
    if (!plan_ || plan_->amsgrad != amsgrad || !reuse(grads)) {
      plan_ = plan_adam(params_.tensors(), grads, exp_avgs_, exp_avg_sqs_, max_exp_avg_sqs_, steps_,
                        amsgrad);
      ++plans_;
    }
    if (plan_->records.empty()) return;
    set_adam_scalars(plan_->args, plan_->device, lr, lr_tensor, beta1, beta2, eps, weight_decay,
                     decoupled, amsgrad, maximize, adax, grad_scale, found_inf, clip_coef);
    run_adam(*plan_);
    if (plan_->layouts.used()) plan_.reset();  // working copies are per call
  }

  // How many full plans the steps so far have built (for tests: an unchanged step builds none).
  int64_t plans() const { return plans_; }

 private:
  // True when the cached plan still describes these tensors; then it takes the grads' addresses.
  // A tensor changed in place (.data =, set_, resize_, as_strided_) can keep its address: sizes,
  // strides and dtypes are compared too, as plan_adam checks them.
  bool reuse(const std::vector<at::Tensor>& grads) {
    if (plan_->layouts.used() || grads.size() != params_.size()) return false;
    for (size_t i = 0; i < grads.size(); ++i) {
      const at::Tensor& g = grads[i];
      const c10::TensorImpl* param = params_[i];
      const AdamTensor& r = plan_->records[i];
      auto same_state = [&](const at::Tensor& t, const void* ptr) {
        return t.scalar_type() == plan_->state_type &&
               same_layout(*t.unsafeGetTensorImpl(), *param) && t.data_ptr() == ptr;
      };
      const bool same =
          g.defined() && g.layout() == at::kStrided && g.device() == plan_->device &&
          g.scalar_type() == plan_->param_type && param->dtype() == g.dtype() &&
          param->numel() == r.numel && g.is_non_overlapping_and_dense() &&
          same_ints(g.sizes(), param->sizes()) && same_layout(*g.unsafeGetTensorImpl(), *param) &&
          param->data() == r.param && same_state(exp_avgs_[i], r.exp_avg) &&
          same_state(exp_avg_sqs_[i], r.exp_avg_sq) && steps_[i].data_ptr() == r.step &&
          steps_[i].numel() == 1 && steps_[i].scalar_type() == at::kFloat &&
          (!plan_->amsgrad || same_state(max_exp_avg_sqs_[i], r.max_exp_avg_sq));
      if (!same) return false;
    }
    for (size_t i = 0; i < grads.size(); ++i) plan_->records[i].grad = grads[i].data_ptr();
    return true;
  }

  RawParams params_;
  std::vector<at::Tensor> exp_avgs_, exp_avg_sqs_, max_exp_avg_sqs_, steps_;
  std::unique_ptr<AdamPlan> plan_;
  int64_t plans_ = 0;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_optim, m) {
  m.def(
      "adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, *, "
      "float lr, Tensor? lr_tensor, float beta1, float beta2, float eps, float weight_decay, "
      "bool decoupled, bool amsgrad, bool maximize, bool adax, Tensor? grad_scale, "
      "Tensor? found_inf, Tensor? clip_coef) -> ()");
  m.class_<AdamGroup>("AdamGroup")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, std::vector<at::Tensor>>())
      .def("step", &AdamGroup::step)
      .def("plans", &AdamGroup::plans);
}

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("adam_", &adam_); }

#ifdef FO_WITH_CUDA
TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) { m.impl("adam_", &adam_); }
#endif

}  // namespace fused_optim

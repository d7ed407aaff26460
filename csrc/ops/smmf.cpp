// The SMMF operator (math/smmf.h): torch.ops.fused_optim.smmf_. Checks the tensor lists, views
// every factorized param as its square-matricized matrix (row-major; working copies when a
// tensor is not), or a shard as its run of that matrix, builds the tile / part plan and the
// scratch, and runs the two passes; and the SmmfGroup class that keeps an optimizer bucket's
// tensors on the C++ side.
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <vector>

#include "common.h"

namespace fused_optim {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// (n, m) of the square-matricized view of `numel` elements, as _reference/smmf.smmf_shape: the
// largest divisor m <= sqrt(numel), n = numel / m; (0, 0) when empty.
std::pair<int64_t, int64_t> smmf_shape(int64_t numel) {
  if (numel <= 0) return {0, 0};
  auto root = static_cast<int64_t>(std::sqrt(static_cast<double>(numel)));
  while (root * root > numel) --root;
  while ((root + 1) * (root + 1) <= numel) ++root;
  for (int64_t i = root; i > 1; --i) {
    if (numel % i == 0) return {numel / i, i};
  }
  return {numel, 1};
}

// The authors' dense path: vector_reshape=False and exactly one dimension other than 1.
bool takes_dense_path(at::IntArrayRef sizes, bool vector_reshape) {
  if (vector_reshape) return false;
  int64_t dims = 0;
  for (const int64_t s : sizes) dims += s != 1 ? 1 : 0;
  return dims == 1;
}

// The CPU reuses one scratch buffer per thread: pass 2 has finished with it when the call
// returns, and a fresh multi-megabyte allocation per step would cost page faults every step.
at::Tensor cpu_scratch(int64_t bytes) {
  thread_local at::Tensor buffer;
  if (!buffer.defined() || buffer.numel() < bytes) buffer = at::empty({bytes}, at::kByte);
  return buffer;
}

// A checked SMMF call: its records, its tile and part plan and its kernel arguments, ready to
// run.
struct SmmfPlan {
  at::Device device{at::kCPU};
  bool momentum = false, vector_reshape = true, sharded = false;
  at::ScalarType param_type = at::kFloat;  // grads' and dense moments' too
  std::vector<SmmfTensor> records;
  std::vector<WorkItem> tiles, parts;
  int64_t partials = 0;  // floats of partial sums
  SmmfArgs args;
  Layouts layouts;  // row-major working copies, when some tensor needed one
};

// Checks the tensor lists and builds the plan. Hyper-parameters are set by set_smmf_scalars,
// the scratch and the sharded sums by run_smmf.
std::unique_ptr<SmmfPlan> plan_smmf(at::TensorList params, at::TensorList grads,
                                    at::TensorList row_ms, at::TensorList col_ms,
                                    at::TensorList signs, at::TensorList row_vs,
                                    at::TensorList col_vs, at::TensorList exp_avgs,
                                    at::TensorList exp_avg_sqs, at::TensorList steps, bool momentum,
                                    bool vector_reshape, at::OptionalIntArrayRef global_numels,
                                    at::OptionalIntArrayRef starts) {
  auto plan = std::make_unique<SmmfPlan>();
  const size_t n = params.size();
  plan->momentum = momentum;
  plan->vector_reshape = vector_reshape;
  if (n == 0) return plan;
  TORCH_CHECK(grads.size() == n && steps.size() == n,
              "fused_optim: params, grads and state_steps must have the same length, got ", n, ", ",
              grads.size(), ", ", steps.size());
  // FSDP2 shards (_reference/smmf.py's smmf has the contract): params[i] is the run of elements
  // [starts[i], starts[i] + numel) of a param of global_numels[i] elements (-1: the dense path).
  const bool sharded = global_numels.has_value();
  plan->sharded = sharded;
  TORCH_CHECK(!sharded || (global_numels->size() == n && starts->size() == n),
              "fused_optim: global_numels and starts need one entry per param");
  std::vector<bool> dense_of(n);
  size_t n_dense = 0;
  for (size_t i = 0; i < n; ++i) {
    dense_of[i] =
        sharded ? (*global_numels)[i] < 0 : takes_dense_path(params[i].sizes(), vector_reshape);
    n_dense += dense_of[i] ? 1 : 0;
  }
  const size_t n_fac = n - n_dense;
  TORCH_CHECK(row_vs.size() == n_fac && col_vs.size() == n_fac && exp_avg_sqs.size() == n_dense,
              "fused_optim: expected row_vs and col_vs for each of the ", n_fac,
              " factorized params and exp_avg_sqs for each of the ", n_dense, " dense ones, got ",
              row_vs.size(), ", ", col_vs.size(), " and ", exp_avg_sqs.size());
  const size_t want_fac_m = momentum ? n_fac : 0, want_dense_m = momentum ? n_dense : 0;
  TORCH_CHECK(row_ms.size() == want_fac_m && col_ms.size() == want_fac_m &&
                  signs.size() == want_fac_m && exp_avgs.size() == want_dense_m,
              "fused_optim: with beta ", momentum ? "set" : "None", " expected ", want_fac_m,
              " row_ms, col_ms and signs and ", want_dense_m, " exp_avgs, got ", row_ms.size(),
              ", ", col_ms.size(), ", ", signs.size(), " and ", exp_avgs.size());

  const at::Device device = params[0].device();
  plan->device = device;
  SmmfArgs& args = plan->args;
  args.param_dtype = to_dtype(params[0], "params[0]");
  plan->param_type = params[0].scalar_type();
  args.momentum = momentum;

  const bool cpu = device.is_cpu();
  const int64_t tile_elems = cpu ? kSmmfCpuTileElems : kSmmfCudaTileElems;
  const int64_t max_cols = cpu ? kSmmfCpuMaxCols : kSmmfCudaMaxCols;
  Layouts& layouts = plan->layouts;
  std::vector<SmmfTensor>& records = plan->records;
  records.resize(n);
  std::vector<WorkItem>&tiles = plan->tiles, &parts = plan->parts;
  int64_t partials = 0, sum_rows = 0, sum_cols = 0, sum_mats = 0;
  size_t next_fac = 0, next_dense = 0;
  for (size_t i = 0; i < n; ++i) {
    const auto ii = static_cast<int64_t>(i);
    const at::Tensor& p = params[i];
    check_param_grad_step(params, grads, steps, i, device);
    // The matricized view is of the row-major flattening.
    const at::Tensor ref = p.is_contiguous() ? p : at::empty_like(p, at::MemoryFormat::Contiguous);
    auto state = [&](const at::Tensor& t, const char* what, int64_t numel, at::ScalarType type) {
      check_plain(t, what, ii);
      check_same_device(t, device, what, ii);
      TORCH_CHECK_TYPE(t.scalar_type() == type, "fused_optim: ", what, "[", i, "] has dtype ",
                       t.scalar_type(), ", expected ", type);
      TORCH_CHECK(t.numel() == numel, "fused_optim: ", what, "[", i, "] has ", t.numel(),
                  " elements, expected ", numel, " for params[", i, "] of shape ", p.sizes());
    };

    SmmfTensor& r = records[i];
    r.numel = p.numel();
    r.first_tile = static_cast<int64_t>(tiles.size());
    r.step = steps[i].data_ptr<float>();
    const bool dense = dense_of[i];
    const size_t k = dense ? next_dense++ : next_fac++;
    int64_t n_tiles = 1, n_parts = 1;
    if (dense) {
      state(exp_avg_sqs[k], "exp_avg_sqs", r.numel, p.scalar_type());
      if (momentum) state(exp_avgs[k], "exp_avgs", r.numel, p.scalar_type());
      if (r.numel > 0) {
        r.param = layouts.use(p, ref, true).data_ptr();
        r.grad = layouts.use(grads[i], ref, false).data_ptr();
        r.exp_avg_sq = layouts.use(exp_avg_sqs[k], ref, true).data_ptr();
        if (momentum) r.exp_avg = layouts.use(exp_avgs[k], ref, true).data_ptr();
        r.tile_rows = 1;
        r.tile_cols = tile_elems;  // a dense tensor's tiles are flat ranges
        n_tiles = ceil_div(r.numel, tile_elems);
      }
    } else {
      r.factored = 1;
      const int64_t whole = sharded ? (*global_numels)[i] : r.numel;
      const auto [rows, cols] = smmf_shape(whole);
      r.cols = cols;
      r.words = smmf_sign_words(cols);
      r.rows = rows;  // one process: every row, from row 0
      if (sharded) {
        const int64_t start = (*starts)[i];
        TORCH_CHECK(start >= 0 && start + r.numel <= whole, "fused_optim: params[", i, "] (",
                    r.numel, " elements from ", start, ") lies outside its param of ", whole,
                    " elements");
        r.row0 = cols > 0 ? start / cols : 0;
        r.rows = r.numel > 0 ? ceil_div(start + r.numel, cols) - r.row0 : 0;
        r.skip = start - r.row0 * cols;
        r.sum_row = sum_rows;
        r.sum_col = sum_cols;
        r.sum_index = sum_mats;
      }
      sum_rows += rows;
      sum_cols += cols;
      sum_mats += 1;
      state(row_vs[k], "row_vs", rows, at::kFloat);
      state(col_vs[k], "col_vs", cols, at::kFloat);
      r.row_v = layouts.contiguous(row_vs[k], true).data_ptr<float>();
      r.col_v = layouts.contiguous(col_vs[k], true).data_ptr<float>();
      if (momentum) {
        state(row_ms[k], "row_ms", rows, at::kFloat);
        state(col_ms[k], "col_ms", cols, at::kFloat);
        state(signs[k], "signs", r.rows * r.words, at::kInt);
        r.row_m = layouts.contiguous(row_ms[k], true).data_ptr<float>();
        r.col_m = layouts.contiguous(col_ms[k], true).data_ptr<float>();
        r.sign = layouts.contiguous(signs[k], true).data_ptr<int32_t>();
      }
      if (r.numel > 0) {
        r.param = layouts.use(p, ref, true).data_ptr();
        r.grad = layouts.use(grads[i], ref, false).data_ptr();
        const SmmfTileShape shape = smmf_tile_shape(r.rows, cols, tile_elems, max_cols);
        r.tile_rows = shape.rows;
        r.tile_cols = shape.cols;
        r.row_tiles = ceil_div(r.rows, shape.rows);
        r.col_tiles = ceil_div(cols, shape.cols);
        r.partials = partials;
        partials += 2 * (r.rows * r.col_tiles + r.row_tiles * cols);
        n_tiles = r.row_tiles * r.col_tiles;
        r.row_parts = ceil_div(r.rows, kSmmfFinalizeChunk);
        n_parts = r.row_parts + ceil_div(cols, kSmmfFinalizeChunk);
      }
    }
    TORCH_CHECK(n_tiles <= INT32_MAX, "fused_optim: params[", i, "] is too large");
    for (int64_t q = 0; q < n_tiles; ++q) {
      tiles.push_back({static_cast<int32_t>(i), static_cast<int32_t>(q)});
    }
    for (int64_t q = 0; q < n_parts; ++q) {
      parts.push_back({static_cast<int32_t>(i), static_cast<int32_t>(q)});
    }
  }
  check_distinct_params(records);
  plan->partials = partials;
  args.n_tensors = static_cast<int32_t>(n);
  args.n_tiles = static_cast<int64_t>(tiles.size());
  args.n_parts = static_cast<int64_t>(parts.size());
  args.sums_rows = sum_rows;
  args.sums_cols = sum_cols;
  args.sums_mats = sum_mats;
  return plan;
}

void set_smmf_scalars(SmmfArgs& args, const at::Device& device, double lr,
                      const std::optional<at::Tensor>& lr_tensor, std::optional<double> beta,
                      double eps, double weight_decay, double decay_rate, double growth_rate,
                      bool decoupled, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::Tensor>& clip_coef) {
  set_step_tensors(args, device, grad_scale, found_inf, clip_coef);
  args.beta = beta.value_or(0.0);
  args.eps = eps;
  args.weight_decay = weight_decay;
  args.decay_rate = decay_rate;
  args.growth_rate = growth_rate;
  args.decoupled = decoupled;
  args.lr = lr;
  lr_source(lr_tensor, device, args.lr_ptr, args.lr_is_f64);
}

// Runs a plan: the scratch (tile totals in doubles, then the partial sums), the sums of a
// sharded step, the two passes.
void run_smmf(SmmfPlan& plan, const std::optional<at::Tensor>& sums) {
  if (plan.records.empty()) return;
  TORCH_CHECK(plan.sharded == sums.has_value(),
              "fused_optim: global_numels, starts and sums go together");
  SmmfArgs& args = plan.args;
  const at::Device device = plan.device;
  const bool cpu = device.is_cpu();
  const int64_t totals_bytes = args.n_tiles * 16;
  const int64_t bytes = totals_bytes + plan.partials * 4;
  const at::Tensor scratch =
      cpu ? cpu_scratch(bytes)
          : at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  auto* base = static_cast<uint8_t*>(scratch.data_ptr());
  args.tile_totals = reinterpret_cast<double*>(base);
  args.partials = reinterpret_cast<float*>(base + totals_bytes);
  args.sums = nullptr;
  if (plan.sharded) {
    const at::Tensor& out = *sums;
    const int64_t want = 2 * (args.sums_rows + args.sums_cols + args.sums_mats);
    check_same_device(out, device, "sums", 0);
    TORCH_CHECK(out.scalar_type() == at::kDouble && out.is_contiguous() && out.numel() == want,
                "fused_optim: sums must be a contiguous float64 tensor of ", want,
                " elements (SmmfSums), got ", out.scalar_type(), " of ", out.numel());
    args.sums = out.data_ptr<double>();
  }

  if (cpu) {
    args.tensors = plan.records.data();
    args.tiles = plan.tiles.data();
    args.parts = plan.parts.data();
    smmf_cpu(args);
  } else {
#ifdef FO_WITH_CUDA
    TORCH_CHECK(device.is_cuda(), "fused_optim: unsupported device ", device);
    c10::cuda::CUDAGuard guard(device);
    // Records, then the tiles, then the parts: one upload, cached by content.
    std::vector<WorkItem> items = plan.tiles;
    items.insert(items.end(), plan.parts.begin(), plan.parts.end());
    const DevicePlan uploaded =
        upload_plan(pack_plan(plan.records, items), plan.records.size() * sizeof(SmmfTensor),
                    args.n_tensors, device);
    args.tensors = static_cast<const SmmfTensor*>(uploaded.records);
    args.tiles = static_cast<const WorkItem*>(uploaded.items);
    args.parts = args.tiles + args.n_tiles;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
    // The scratch is freed when this returns: allocated on this stream, it is handed out again
    // only to work queued after these kernels.
    smmf_cuda(args, stream);
#else
    TORCH_CHECK(false, "fused_optim: this build has no CUDA kernels (device ", device, ")");
#endif
  }
  plan.layouts.finish();
}

void smmf_(at::TensorList params, at::TensorList grads, at::TensorList row_ms,
           at::TensorList col_ms, at::TensorList signs, at::TensorList row_vs,
           at::TensorList col_vs, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
           at::TensorList steps, double lr, const std::optional<at::Tensor>& lr_tensor,
           std::optional<double> beta, double eps, double weight_decay, double decay_rate,
           double growth_rate, bool vector_reshape, bool decoupled,
           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
           const std::optional<at::Tensor>& clip_coef, at::OptionalIntArrayRef global_numels,
           at::OptionalIntArrayRef starts, const std::optional<at::Tensor>& sums) {
  TORCH_CHECK(global_numels.has_value() == starts.has_value() &&
                  global_numels.has_value() == sums.has_value(),
              "fused_optim: global_numels, starts and sums go together");
  auto plan = plan_smmf(params, grads, row_ms, col_ms, signs, row_vs, col_vs, exp_avgs, exp_avg_sqs,
                        steps, beta.has_value(), vector_reshape, global_numels, starts);
  if (plan->records.empty()) return;
  set_smmf_scalars(plan->args, plan->device, lr, lr_tensor, beta, eps, weight_decay, decay_rate,
                   growth_rate, decoupled, grad_scale, found_inf, clip_coef);
  run_smmf(*plan, sums);
}

// The tensors of one optimizer bucket held on the C++ side with their checked plan, as AdamGroup
// (ops/adam.cpp; the same contract with the bucket): a step passes only its grads, and re-checks
// only them and the addresses the plan holds. With 2000 small tensors, boxing ten lists and
// rebuilding the plan every step cost about as much as the update itself. Anything unusual
// (a tensor that moved or changed shape, a grad in another layout, working copies) takes the
// full path of smmf_.
class SmmfGroup : public torch::CustomClassHolder {
 public:
  SmmfGroup(const std::vector<at::Tensor>& params, std::vector<at::Tensor> row_ms,
            std::vector<at::Tensor> col_ms, std::vector<at::Tensor> signs,
            std::vector<at::Tensor> row_vs, std::vector<at::Tensor> col_vs,
            std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs,
            std::vector<at::Tensor> steps)
      : params_(params),
        row_ms_(std::move(row_ms)),
        col_ms_(std::move(col_ms)),
        signs_(std::move(signs)),
        row_vs_(std::move(row_vs)),
        col_vs_(std::move(col_vs)),
        exp_avgs_(std::move(exp_avgs)),
        exp_avg_sqs_(std::move(exp_avg_sqs)),
        steps_(std::move(steps)) {}

  void step(const std::vector<at::Tensor>& grads, double lr,
            const std::optional<at::Tensor>& lr_tensor, std::optional<double> beta, double eps,
            double weight_decay, double decay_rate, double growth_rate, bool vector_reshape,
            bool decoupled, const std::optional<at::Tensor>& grad_scale,
            const std::optional<at::Tensor>& found_inf,
            const std::optional<at::Tensor>& clip_coef) {
    const bool momentum = beta.has_value();
    if (!plan_ || plan_->momentum != momentum || plan_->vector_reshape != vector_reshape ||
        !reuse(grads)) {
      plan_ =
          plan_smmf(params_.tensors(), grads, row_ms_, col_ms_, signs_, row_vs_, col_vs_, exp_avgs_,
                    exp_avg_sqs_, steps_, momentum, vector_reshape, std::nullopt, std::nullopt);
      ++plans_;
    }
    if (plan_->records.empty()) return;
    set_smmf_scalars(plan_->args, plan_->device, lr, lr_tensor, beta, eps, weight_decay, decay_rate,
                     growth_rate, decoupled, grad_scale, found_inf, clip_coef);
    run_smmf(*plan_, std::nullopt);
    if (plan_->layouts.used()) plan_.reset();  // working copies are per call
  }

  // How many full plans the steps so far have built (for tests: an unchanged step builds none).
  int64_t plans() const { return plans_; }

 private:
  // True when the cached plan still describes these tensors; then it takes the grads' addresses.
  // Every tensor the plan points into is row-major in place (no working copies), so a grad is
  // usable when it is contiguous and shaped like its param. A tensor changed in place (.data =,
  // set_, resize_, as_strided_) can keep its address: sizes, dtypes and layouts are compared too,
  // as plan_smmf checks them.
  bool reuse(const std::vector<at::Tensor>& grads) {
    if (plan_->layouts.used() || grads.size() != params_.size()) return false;
    const bool m = plan_->momentum;
    const at::ScalarType type = plan_->param_type;
    size_t fac = 0, dense = 0;
    for (size_t i = 0; i < grads.size(); ++i) {
      const at::Tensor& g = grads[i];
      const c10::TensorImpl* param = params_[i];
      const SmmfTensor& r = plan_->records[i];
      if (!g.defined() || g.layout() != at::kStrided || g.device() != plan_->device ||
          g.scalar_type() != type || param->dtype() != g.dtype() || param->numel() != r.numel ||
          !same_ints(g.sizes(), param->sizes()) || !same_state(steps_[i], r.step, 1, at::kFloat) ||
          (r.factored != 0) == takes_dense_path(param->sizes(), plan_->vector_reshape)) {
        return false;
      }
      if (r.numel > 0 &&
          (param->data() != r.param || !param->is_contiguous() || !g.is_contiguous())) {
        return false;
      }
      const bool same =
          r.factored ? same_state(row_vs_[fac], r.row_v, r.rows, at::kFloat) &&
                           same_state(col_vs_[fac], r.col_v, r.cols, at::kFloat) &&
                           (!m || (same_state(row_ms_[fac], r.row_m, r.rows, at::kFloat) &&
                                   same_state(col_ms_[fac], r.col_m, r.cols, at::kFloat) &&
                                   same_state(signs_[fac], r.sign, r.rows * r.words, at::kInt)))
                     : same_state(exp_avg_sqs_[dense], r.exp_avg_sq, r.numel, type) &&
                           (!m || same_state(exp_avgs_[dense], r.exp_avg, r.numel, type));
      if (!same) return false;
      ++(r.factored ? fac : dense);
    }
    for (size_t i = 0; i < grads.size(); ++i) {
      if (plan_->records[i].numel > 0) plan_->records[i].grad = grads[i].data_ptr();
    }
    return true;
  }

  // A state tensor as the plan took it: the same memory, size and dtype, row-major.
  static bool same_state(const at::Tensor& t, const void* ptr, int64_t numel, at::ScalarType type) {
    return t.numel() == numel && t.scalar_type() == type && t.is_contiguous() &&
           (numel == 0 || t.data_ptr() == ptr);
  }

  RawParams params_;
  std::vector<at::Tensor> row_ms_, col_ms_, signs_, row_vs_, col_vs_, exp_avgs_, exp_avg_sqs_,
      steps_;
  std::unique_ptr<SmmfPlan> plan_;
  int64_t plans_ = 0;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_optim, m) {
  m.def(
      "smmf_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] row_ms, Tensor(c!)[] col_ms, "
      "Tensor(d!)[] signs, Tensor(e!)[] row_vs, Tensor(f!)[] col_vs, Tensor(g!)[] exp_avgs, "
      "Tensor(h!)[] exp_avg_sqs, Tensor(i!)[] state_steps, *, float lr, Tensor? lr_tensor, "
      "float? beta, float eps, float weight_decay, float decay_rate, float growth_rate, "
      "bool vector_reshape, bool decoupled, Tensor? grad_scale, Tensor? found_inf, "
      "Tensor? clip_coef, int[]? global_numels=None, int[]? starts=None, "
      "Tensor(j!)? sums=None) -> ()");
  m.class_<SmmfGroup>("SmmfGroup")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>())
      .def("step", &SmmfGroup::step)
      .def("plans", &SmmfGroup::plans);
}

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("smmf_", &smmf_); }

#ifdef FO_WITH_CUDA
TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) { m.impl("smmf_", &smmf_); }
#endif

}  // namespace fused_optim

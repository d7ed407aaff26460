// The Adafactor operator (both flavours, math/adafactor.h): torch.ops.fused_optim.adafactor_.
// Checks the tensor lists, lays every tensor out as row-major matrices (working copies when it
// is not), builds the tile / matrix plan and the scratch buffers, and runs the five phases.
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

#include "common.h"

namespace fused_optim {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// torch.finfo(dtype).eps: torch.optim.Adafactor's eps1 when it is None.
double finfo_eps(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return static_cast<double>(std::numeric_limits<c10::Half>::epsilon());
    case at::kBFloat16:
      return static_cast<double>(std::numeric_limits<c10::BFloat16>::epsilon());
    default:
      return static_cast<double>(std::numeric_limits<float>::epsilon());
  }
}

// Byte offsets of the scratch buffers inside one allocation, each 16-byte aligned.
struct ScratchLayout {
  int64_t row_partials = 0, col_partials = 0, tile_partials = 0, factors = 0, apply = 0;
  int64_t q_partials = 0, matrix_u_sq = 0, total = 0;
};

int64_t take(int64_t& at, int64_t bytes) {
  const int64_t start = at;
  at += ceil_div(bytes, 16) * 16;
  return start;
}

void adafactor_(at::TensorList params, at::TensorList grads, at::TensorList rows,
                at::TensorList cols, at::TensorList fulls, at::TensorList exp_avgs,
                at::TensorList rmss, at::TensorList steps, bool transformers, double lr,
                const std::optional<at::Tensor>& lr_tensor, std::optional<double> eps1, double eps2,
                double decay, double d, double weight_decay, std::optional<double> beta1,
                bool maximize, bool relative_step, bool scale_parameter, bool warmup_init,
                const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf,
                const std::optional<at::Tensor>& clip_coef, int64_t phase,
                at::OptionalIntArrayRef global_numels, at::OptionalIntArrayRef stats_at,
                const std::optional<at::Tensor>& sums, const std::optional<at::Tensor>& carry) {
  const size_t n = params.size();
  if (n == 0) return;
  // FSDP2 shards (kernel_args.h: AdafactorArgs::phase): params[i] is a shard of whole rows (ndim
  // 2) or whole matrices of a param of global_numels[i] elements.
  const bool sharded = phase != 0;
  TORCH_CHECK(phase >= 0 && phase <= 3, "fused_optim: phase must be 0, 1, 2 or 3, got ", phase);
  TORCH_CHECK(sharded == global_numels.has_value() && sharded == stats_at.has_value() &&
                  sharded == sums.has_value() && sharded == carry.has_value(),
              "fused_optim: a sharded phase (1, 2 or 3) takes global_numels, stats_at, sums and "
              "carry, and phase 0 none of them");
  TORCH_CHECK(!sharded || (global_numels->size() == n && stats_at->size() == n),
              "fused_optim: global_numels and stats_at need one entry per param");
  TORCH_CHECK(grads.size() == n && steps.size() == n,
              "fused_optim: params, grads and state_steps must have the same length, got ", n, ", ",
              grads.size(), ", ", steps.size());
  const bool momentum = beta1.has_value();
  TORCH_CHECK(!momentum || exp_avgs.size() == n,
              "fused_optim: beta1 needs one exp_avg per param, got ", exp_avgs.size());
  TORCH_CHECK(rmss.empty() || rmss.size() == n,
              "fused_optim: rmss must be empty or hold one tensor per param, got ", rmss.size());
  size_t n_factored = 0;
  for (const at::Tensor& p : params) n_factored += p.dim() >= 2 ? 1 : 0;
  TORCH_CHECK(
      rows.size() == n_factored && cols.size() == n_factored && fulls.size() == n - n_factored,
      "fused_optim: expected one row and one column statistic per param with ndim >= 2 (",
      n_factored, ") and one full second moment per other param (", n - n_factored, "), got ",
      rows.size(), ", ", cols.size(), " and ", fulls.size());

  const at::Device device = params[0].device();
  check_scalar_tensor(grad_scale, device, "grad_scale");
  check_scalar_tensor(found_inf, device, "found_inf");
  check_scalar_tensor(clip_coef, device, "clip_coef");

  AdafactorArgs args;
  args.param_dtype = to_dtype(params[0], "params[0]");
  const at::Tensor* first_state = n_factored > 0 ? &rows[0] : (fulls.empty() ? nullptr : &fulls[0]);
  const at::ScalarType state_type =
      first_state != nullptr ? first_state->scalar_type() : params[0].scalar_type();
  if (first_state != nullptr) args.state_dtype = to_dtype(*first_state, "optimizer states");
  if (momentum) {
    TORCH_CHECK_TYPE(exp_avgs[0].scalar_type() == state_type,
                     "fused_optim: exp_avgs must have the dtype of the other states, ", state_type);
    args.state_dtype = to_dtype(exp_avgs[0], "exp_avgs[0]");
  }

  AdafactorHyper& h = args.hyper;
  h.transformers = transformers;
  h.eps1 = eps1.has_value() ? *eps1 : finfo_eps(params[0].scalar_type());
  h.eps2 = eps2;
  h.decay = decay;
  h.d = d;
  h.weight_decay = weight_decay;
  h.has_beta1 = momentum;
  h.beta1 = momentum ? *beta1 : 0.0;
  h.relative_step = relative_step;
  h.scale_parameter = scale_parameter;
  h.warmup_init = warmup_init;
  args.maximize = maximize && !transformers;
  args.lr = lr;
  lr_source(lr_tensor, device, args.lr_ptr, args.lr_is_f64);
  args.grad_scale = ptr_or_null(grad_scale);
  args.found_inf = ptr_or_null(found_inf);
  args.clip_coef = ptr_or_null(clip_coef);

  const int64_t tile_elems = device.is_cpu() ? kAdafactorCpuTileElems : kAdafactorCudaTileElems;
  Layouts layouts;
  std::vector<AdafactorTensor> records(n);
  std::vector<WorkItem> tiles, matrices;
  int64_t row_partials = 0, col_partials = 0, factors = 0;
  size_t next_factored = 0, next_full = 0;
  for (size_t i = 0; i < n; ++i) {
    const auto ii = static_cast<int64_t>(i);
    const at::Tensor& p = params[i];
    check_param_grad_step(params, grads, steps, i, device);
    // The kernels walk rows and columns of the row-major layout.
    const at::Tensor ref = p.is_contiguous() ? p : at::empty_like(p, at::MemoryFormat::Contiguous);
    auto state = [&](const at::Tensor& t, const char* what, int64_t numel) {
      check_plain(t, what, ii);
      check_same_device(t, device, what, ii);
      TORCH_CHECK_TYPE(t.scalar_type() == state_type, "fused_optim: ", what, "[", i, "] has dtype ",
                       t.scalar_type(), "; the optimizer states of one call share ", state_type);
      TORCH_CHECK(t.numel() == numel, "fused_optim: ", what, "[", i, "] has ", t.numel(),
                  " elements, expected ", numel, " for params[", i, "] of shape ", p.sizes());
    };

    AdafactorTensor& r = records[i];
    r.numel = p.numel();
    r.global_numel = sharded ? (*global_numels)[i] : r.numel;
    r.stats_at = -1;
    r.first_tile = static_cast<int64_t>(tiles.size());
    r.step = steps[i].data_ptr<float>();
    if (!rmss.empty()) {
      TORCH_CHECK(
          rmss[i].numel() == 1 && rmss[i].scalar_type() == at::kFloat && rmss[i].device() == device,
          "fused_optim: rmss[", i, "] must be a one-element float32 tensor on ", device);
      r.rms = rmss[i].data_ptr<float>();
    }
    const bool factored = p.dim() >= 2;
    const at::Tensor* row = factored ? &rows[next_factored] : nullptr;
    const at::Tensor* col = factored ? &cols[next_factored] : nullptr;
    const at::Tensor* full = factored ? nullptr : &fulls[next_full];
    (factored ? next_factored : next_full) += 1;
    // Nothing to update: one empty tile, so phase 4 still counts the step. A shard without
    // elements of a non-empty matrix (ndim 2) still updates the column statistics.
    const bool rowless = factored && p.dim() == 2 && r.numel == 0 && r.global_numel > 0;
    if (r.numel == 0 && !rowless) {
      r.batch = r.rows = r.cols = 1;
      tiles.push_back({static_cast<int32_t>(i), 0});
      continue;
    }
    if (!rowless) {
      r.param = layouts.use(p, ref, true).data_ptr();
      r.grad = layouts.use(grads[i], ref, false).data_ptr();
    }
    if (momentum) {
      state(exp_avgs[i], "exp_avgs", r.numel);
      r.exp_avg = layouts.use(exp_avgs[i], ref, true).data_ptr();
    }
    int64_t n_tiles = 0;
    if (factored) {
      r.factored = 1;
      r.rows = p.size(-2);
      r.cols = p.size(-1);
      r.batch = rowless ? 1 : r.numel / (r.rows * r.cols);
      r.global_rows = p.dim() == 2 ? r.global_numel / r.cols : r.rows;
      if (sharded) {
        r.stats_at = (*stats_at)[i];
        TORCH_CHECK(r.stats_at >= 0, "fused_optim: stats_at[", i, "] is negative");
      }
      state(*row, "row_vars", r.batch * r.rows);
      state(*col, "col_vars", r.batch * r.cols);
      r.row = layouts.contiguous(*row, true).data_ptr();
      r.col = layouts.contiguous(*col, true).data_ptr();
      const TileShape shape =
          adafactor_tile_shape(std::max<int64_t>(r.rows, 1), r.cols, tile_elems);
      r.tile_rows = shape.rows;
      r.tile_cols = shape.cols;
      r.row_tiles = ceil_div(r.rows, shape.rows);
      r.col_tiles = ceil_div(r.cols, shape.cols);
      r.row_partials = row_partials;
      r.col_partials = col_partials;
      r.factors = factors;
      r.first_matrix = static_cast<int64_t>(matrices.size());
      row_partials += r.batch * r.rows * r.col_tiles;
      col_partials += r.batch * r.cols * r.row_tiles;
      factors += r.batch * (r.rows + r.cols);
      n_tiles = r.batch * r.row_tiles * r.col_tiles;
      TORCH_CHECK(r.batch <= INT32_MAX, "fused_optim: params[", i, "] has too many matrices");
      for (int64_t b = 0; b < r.batch; ++b) {
        matrices.push_back({static_cast<int32_t>(i), static_cast<int32_t>(b)});
      }
    } else {
      r.batch = r.rows = 1;
      r.cols = r.numel;
      state(*full, "variances", r.numel);
      r.full = layouts.use(*full, ref, true).data_ptr();
      r.tile_rows = 1;
      r.tile_cols = tile_elems;  // a full tensor's tiles are flat ranges
      n_tiles = ceil_div(r.numel, tile_elems);
    }
    TORCH_CHECK(n_tiles <= INT32_MAX, "fused_optim: params[", i, "] is too large");
    for (int64_t q = 0; q < n_tiles; ++q) {
      tiles.push_back({static_cast<int32_t>(i), static_cast<int32_t>(q)});
    }
  }
  check_distinct_params(records);

  if (sharded) {
    // sums: [theta^2 per tensor | the matrices' statistics (stats_at) | u^2 per tensor].
    const at::Tensor& out = *sums;
    check_same_device(out, device, "sums", 0);
    TORCH_CHECK(out.scalar_type() == at::kDouble && out.is_contiguous() && out.dim() == 1 &&
                    out.numel() >= static_cast<int64_t>(2 * n),
                "fused_optim: sums must be a contiguous 1-D float64 tensor of at least 2 * ", n,
                " elements");
    for (const AdafactorTensor& r : records) {
      const bool inside =
          r.stats_at >= static_cast<int64_t>(n) &&
          r.stats_at + r.batch * (r.cols + 1) <= out.numel() - static_cast<int64_t>(n);
      TORCH_CHECK(r.stats_at < 0 || inside, "fused_optim: stats_at points outside sums");
    }
    const at::Tensor& kept = *carry;
    check_same_device(kept, device, "carry", 0);
    TORCH_CHECK(kept.scalar_type() == at::kFloat && kept.is_contiguous() && kept.numel() == factors,
                "fused_optim: carry must be a contiguous float32 tensor of ", factors,
                " elements (the row and column factors of this rank's matrices)");
    args.phase = static_cast<int32_t>(phase);
    args.sums = out.data_ptr<double>();
    args.u_sq_at = out.numel() - static_cast<int64_t>(n);
  }

  ScratchLayout sl;
  int64_t at_byte = 0;
  sl.row_partials = take(at_byte, row_partials * 4);
  sl.col_partials = take(at_byte, col_partials * 4);
  sl.tile_partials = take(at_byte, static_cast<int64_t>(tiles.size()) * 16);
  sl.factors = take(at_byte, sharded ? 0 : factors * 4);
  sl.apply = take(at_byte, static_cast<int64_t>(n * sizeof(AdafactorApply)));
  if (device.is_cpu() && !sharded) {  // the CPU's sum of u^2 without a pass (cpu/adafactor.cpp)
    sl.q_partials = take(at_byte, col_partials * 4);
    sl.matrix_u_sq = take(at_byte, static_cast<int64_t>(matrices.size()) * 8);
  }
  sl.total = at_byte;
  at::Tensor scratch = at::empty({sl.total}, at::TensorOptions().dtype(at::kByte).device(device));
  auto* base = static_cast<uint8_t*>(scratch.data_ptr());
  args.row_partials = reinterpret_cast<float*>(base + sl.row_partials);
  args.col_partials = reinterpret_cast<float*>(base + sl.col_partials);
  args.tile_partials = reinterpret_cast<double*>(base + sl.tile_partials);
  args.factors = sharded ? carry->data_ptr<float>() : reinterpret_cast<float*>(base + sl.factors);
  args.apply = reinterpret_cast<AdafactorApply*>(base + sl.apply);
  if (device.is_cpu() && !sharded) {
    args.q_partials = reinterpret_cast<float*>(base + sl.q_partials);
    args.matrix_u_sq = reinterpret_cast<double*>(base + sl.matrix_u_sq);
  }
  args.n_tensors = static_cast<int32_t>(n);
  args.n_tiles = static_cast<int64_t>(tiles.size());
  args.n_matrices = static_cast<int64_t>(matrices.size());

  if (device.is_cpu()) {
    args.tensors = records.data();
    args.tiles = tiles.data();
    args.matrices = matrices.data();
    adafactor_cpu(args);
  } else {
#ifdef FO_WITH_CUDA
    TORCH_CHECK(device.is_cuda(), "fused_optim: unsupported device ", device);
    c10::cuda::CUDAGuard guard(device);
    // Records, then the tiles, then the matrices: one upload, cached by content.
    std::vector<WorkItem> items = tiles;
    items.insert(items.end(), matrices.begin(), matrices.end());
    const DevicePlan plan =
        upload_plan(pack_plan(records, items), records.size() * sizeof(AdafactorTensor),
                    args.n_tensors, device);
    args.tensors = static_cast<const AdafactorTensor*>(plan.records);
    args.tiles = static_cast<const WorkItem*>(plan.items);
    args.matrices = args.tiles + args.n_tiles;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
    // The scratch is freed when this returns: allocated on this stream, it is handed out again
    // only to work queued after these kernels.
    adafactor_cuda(args, stream);
#else
    TORCH_CHECK(false, "fused_optim: this build has no CUDA kernels (device ", device, ")");
#endif
  }
  layouts.finish();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_optim, m) {
  m.def(
      "adafactor_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] row_vars, "
      "Tensor(c!)[] col_vars, Tensor(d!)[] variances, Tensor(e!)[] exp_avgs, Tensor(f!)[] rmss, "
      "Tensor(g!)[] state_steps, *, bool transformers, float lr, Tensor? lr_tensor, float? eps1, "
      "float eps2, float decay, float d, float weight_decay, float? beta1, bool maximize, "
      "bool relative_step, bool scale_parameter, bool warmup_init, Tensor? grad_scale, "
      "Tensor? found_inf, Tensor? clip_coef, int phase=0, int[]? global_numels=None, "
      "int[]? stats_at=None, Tensor(h!)? sums=None, Tensor(i!)? carry=None) -> ()");
}

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("adafactor_", &adafactor_); }

#ifdef FO_WITH_CUDA
TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) { m.impl("adafactor_", &adafactor_); }
#endif

}  // namespace fused_optim

// Global-norm gradient clipping operators: torch.ops.fused_optim.global_norm (the norm and the
// clip coefficient, on the device) and scale_ (in-place multi-tensor scaling).
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "common.h"

namespace fused_optim {
namespace {

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

TORCH_LIBRARY_FRAGMENT(fused_optim, m) {
  m.def(
      "global_norm(Tensor[] tensors, float norm_type, float max_norm, Tensor? grad_scale) "
      "-> (Tensor total_norm, Tensor clip_coef)");
  m.def("scale_(Tensor(a!)[] tensors, Tensor coef) -> ()");
}

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) {
  m.impl("global_norm", &global_norm);
  m.impl("scale_", &scale_);
}

#ifdef FO_WITH_CUDA
TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) {
  m.impl("global_norm", &global_norm);
  m.impl("scale_", &scale_);
}
#endif

}  // namespace fused_optim

// Arguments of one multi-tensor call, as the kernels see them. Torch-free on purpose: the
// CUDA sources include this header and nothing from torch. csrc/ops.cpp fills these structs
// (checks, dtype codes, host work plan); the CPU kernels read them as they are, the CUDA
// binding swaps the plan pointers for device copies before launching.
#pragma once

#include <stdint.h>

#include "fused_optim/math/adafactor.h"
#include "fused_optim/math/clip.h"
#include "fused_optim/math/smmf.h"
#include "fused_optim/multi_tensor.h"

namespace fused_optim {

struct AdamArgs {
  const AdamTensor* tensors = nullptr;
  int32_t n_tensors = 0;
  const WorkItem* items = nullptr;
  int64_t n_items = 0;
  // CUDA only: n_tensors zeroed counters. The last block to finish a tensor writes its step;
  // it resets the counter to zero, so the buffer can be reused (and graph-captured).
  int32_t* done_counters = nullptr;

  DType param_dtype = DType::kFloat32;  // grads have the param dtype
  DType state_dtype = DType::kFloat32;

  double lr = 0.0;
  const void* lr_ptr = nullptr;  // when set, lr is read from here (float32 or float64)
  bool lr_is_f64 = false;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  bool decoupled = false, amsgrad = false, maximize = false;
  bool adax = false;  // per-step scalars from adax_step_scalars instead of adam_step_scalars

  // Optional float32 scalars on the params' device (GradScaler protocol, fused clipping).
  const float* grad_scale = nullptr;
  const float* found_inf = nullptr;  // non-zero: skip the step, touch nothing
  const float* clip_coef = nullptr;
};

// One Adafactor step (math/adafactor.h), run as five phases over one plan: work items of
// `tiles` (tensor, tile) for phases 1, 3 and 5, of `matrices` (tensor, matrix) for phase 2,
// one per tensor for phase 4. The scratch buffers hold the partials between phases.
struct AdafactorArgs {
  const AdafactorTensor* tensors = nullptr;
  int32_t n_tensors = 0;
  const WorkItem* tiles = nullptr;
  int64_t n_tiles = 0;
  const WorkItem* matrices = nullptr;
  int64_t n_matrices = 0;

  DType param_dtype = DType::kFloat32;  // grads have the param dtype
  DType state_dtype = DType::kFloat32;  // row/col/full statistics and exp_avg

  AdafactorHyper hyper;
  double lr = 0.0;
  const void* lr_ptr = nullptr;  // when set, lr is read from here (float32 or float64)
  bool lr_is_f64 = false;
  bool maximize = false;

  const float* grad_scale = nullptr;
  const float* found_inf = nullptr;  // non-zero: skip the step, touch nothing
  const float* clip_coef = nullptr;

  // Scratch, on the params' device.
  float* row_partials = nullptr;
  float* col_partials = nullptr;
  double* tile_partials = nullptr;  // 2 per tile: sum of theta^2 (phase 1), of u^2 (phase 3)
  float* factors = nullptr;
  AdafactorApply* apply = nullptr;  // one per tensor (phase 4 -> phase 5)
  // CPU only (null on CUDA): per [matrix][row tile][col] sums of g^2 / r_i (laid out as
  // col_partials), and per matrix its sum of u^2 from them, or -1 where phase 3 must take it.
  float* q_partials = nullptr;
  double* matrix_u_sq = nullptr;

  // FSDP2 shards: the step as three calls, phase 1, 2, 3 (0: the whole step in one call), the
  // caller all-reducing sums[0, u_sq_at) after phase 1 and sums[u_sq_at, +n_tensors) after 2:
  //   1  stats; the new row statistics (written) and their sums, the column sums of s, the sums
  //      of theta^2 (sums[tensor]) -> sums
  //   2  the factors from the whole sums; the sums of u^2 -> sums[u_sq_at + tensor]
  //   3  the apply scalars from the whole sums; the update
  // `factors` (the caller's, float32) carries the factors from phase 1 to 3.
  int32_t phase = 0;
  double* sums = nullptr;
  int64_t u_sq_at = 0;
};

// One SMMF step (math/smmf.h): pass 1 over `tiles` (tensor, tile), pass 2 over `parts`
// (tensor, part). Dense tensors and empty ones have one part, which only counts the step.
struct SmmfArgs {
  const SmmfTensor* tensors = nullptr;
  int32_t n_tensors = 0;
  const WorkItem* tiles = nullptr;
  int64_t n_tiles = 0;
  const WorkItem* parts = nullptr;
  int64_t n_parts = 0;

  DType param_dtype = DType::kFloat32;  // grads and dense moments have the param dtype

  double lr = 0.0;
  const void* lr_ptr = nullptr;  // when set, lr is read from here (float32 or float64)
  bool lr_is_f64 = false;
  bool momentum = true;  // beta is not None
  double beta = 0.9, eps = 1e-8, weight_decay = 0.0, decay_rate = -0.5, growth_rate = 0.999;
  bool decoupled = true;  // weight_decay_mode 'adamw'

  const float* grad_scale = nullptr;
  const float* found_inf = nullptr;  // non-zero: skip the step, touch nothing
  const float* clip_coef = nullptr;

  // Scratch, on the params' device.
  float* partials = nullptr;      // the row / column partial sums (SmmfTensor::partials)
  double* tile_totals = nullptr;  // 2 per tile: the tile's sum of |M|, of V
  // FSDP2 shards: pass 2 writes the raw sums here instead of the factors (smmf_raw_sums), a
  // buffer of 2 (sums_rows + sums_cols + sums_mats) doubles; null in one process.
  double* sums = nullptr;
  int64_t sums_rows = 0, sums_cols = 0, sums_mats = 0;
};

// Per-work-item partial results of a p-norm, written in double to `partials[item]`.
struct NormPartialsArgs {
  const FlatTensor* tensors = nullptr;
  int32_t n_tensors = 0;
  const WorkItem* items = nullptr;
  int64_t n_items = 0;
  DType dtype = DType::kFloat32;
  NormKind kind = NormKind::kTwo;
  float p = 2.0f;
  double* partials = nullptr;
};

// Reduces partials in a fixed order (deterministic) into the total norm and clip coefficient.
struct NormFinalizeArgs {
  const double* partials = nullptr;
  int64_t n_partials = 0;
  NormKind kind = NormKind::kTwo;
  double p = 2.0;
  double max_norm = 0.0;
  const float* grad_scale = nullptr;  // the norm of grads / grad_scale is reported
  float* total_norm = nullptr;
  float* clip_coef = nullptr;
};

// tensors[i] *= *coef, in place.
struct ScaleArgs {
  const FlatTensor* tensors = nullptr;
  int32_t n_tensors = 0;
  const WorkItem* items = nullptr;
  int64_t n_items = 0;
  DType dtype = DType::kFloat32;
  const float* coef = nullptr;
};

}  // namespace fused_optim

// SMMF math (ALGORITHMS.md section 4), THE one copy for the CPU kernels (csrc/cpu) and the CUDA
// kernels (csrc/cuda); triton_kernels/_smmf.py has the same functions in Triton.
//
// A factorized tensor is viewed row-major as its square-matricized n x m matrix (n >= m). Its
// first moment is the sign bits plus factors (r_M, c_M) of |M|, its second moment factors
// (r_V, c_V) of V. One step is two passes:
//   1 update    per tile of the matrix: per element decompress M~ = ±r_M,i c_M,j and
//               V~ = r_V,i c_V,j, update M and V, update theta from them, write the new sign
//               bit; per tile, the partial row and column sums of |M| and V and their totals
//   2 finalize  per part (a block of rows or of columns of one matrix): the new factors from
//               the partials, added in a fixed order; the column factor is divided by the
//               matrix's total unless it is 0. Part 0 of every tensor advances its step.
// The partials are the double buffer: pass 1 reads the old factors only, pass 2 writes them.
// A dense tensor (vector_reshape=False, squeezed to 1-D) keeps M and V whole: pass 1 updates
// them in place over flat tiles, pass 2 only counts the step.
#pragma once

#include <math.h>
#include <stdint.h>

#include "fused_optim/macros.h"

namespace fused_optim {

// ---- Tiles ---------------------------------------------------------------------------------
// A tile is a block of rows of one matrix, at most `max_cols` columns wide. max_cols is a
// multiple of 32 so that tiles cut a row only at sign-word boundaries: no two tiles (CPU threads,
// CUDA blocks) ever write the same word. The CPU takes whole rows of large tiles (sequential
// memory, few partials); a CUDA tile is 256 columns, eight warps of one word each.
constexpr int64_t kSmmfWordBits = 32;
constexpr int64_t kSmmfCpuTileElems = int64_t{1} << 18;
constexpr int64_t kSmmfCpuMaxCols = int64_t{1} << 16;
constexpr int64_t kSmmfCudaTileElems = 8192;
constexpr int64_t kSmmfCudaMaxCols = 256;
// Rows or columns per finalize part.
constexpr int64_t kSmmfFinalizeChunk = 4096;

FO_HOST_DEVICE int64_t smmf_sign_words(int64_t cols) {
  return (cols + kSmmfWordBits - 1) / kSmmfWordBits;
}

struct SmmfTileShape {
  int64_t rows, cols;
};

FO_HOST_DEVICE constexpr SmmfTileShape smmf_tile_shape(int64_t n, int64_t m, int64_t elems,
                                                       int64_t max_cols) {
  const int64_t cols = m < max_cols ? m : max_cols;
  const int64_t fit = elems / cols > 0 ? elems / cols : 1;
  return SmmfTileShape{n < fit ? n : fit, cols};
}

// ---- Per-step scalars ----------------------------------------------------------------------

struct SmmfScalars {
  float beta_m, one_minus_beta_m;  // first moment: beta * growth^(t - 1)
  float beta_v, one_minus_beta_v;  // second moment: 1 - t^decay_rate
  float lr, eps;
  float decay;  // weight_decay_mode 'adamw': theta *= 1 - lr * wd (exactly 1 without decay)
  float l2;     // 'adam': g += wd * theta (0 in 'adamw' mode)
};

// t is the new (already incremented) step; the powers are taken in double.
FO_HOST_DEVICE SmmfScalars smmf_scalars(double lr, double t, double beta, double growth,
                                        double decay_rate, double eps, double weight_decay,
                                        bool decoupled) {
  SmmfScalars s;
  const double beta_m = beta * pow(growth, t - 1.0);
  const double new_v = pow(t, decay_rate);  // 1 - beta_v
  s.beta_m = static_cast<float>(beta_m);
  s.one_minus_beta_m = static_cast<float>(1.0 - beta_m);
  s.beta_v = static_cast<float>(1.0 - new_v);
  s.one_minus_beta_v = static_cast<float>(new_v);
  s.lr = static_cast<float>(lr);
  s.eps = static_cast<float>(eps);
  s.decay = decoupled && weight_decay != 0.0 ? static_cast<float>(1.0 - lr * weight_decay) : 1.0f;
  s.l2 = decoupled ? 0.0f : static_cast<float>(weight_decay);
  return s;
}

// ---- Per element -----------------------------------------------------------------------------

// The decompressed first moment of column j (0..31) of a sign word: +r c where its bit is set,
// else -(r c). Negating is flipping the float's sign bit (NaNs included, as -x does): an XOR with
// the bit shifted to bit 31, three vector instructions on the CPU against five for a select, 8%
// off the CPU's pass 1 on data in cache.
FO_HOST_DEVICE float smmf_signed(float r, float c, uint32_t word, int j) {
  const uint32_t negate = ~(word << (31 - j)) & 0x80000000u;
  return fo_bit_cast<float>(fo_bit_cast<uint32_t>(r * c) ^ negate);
}

// One element: g is the raw gradient times grad_multiplier, m_old / v_old the decompressed (or
// dense) moments. Writes the new moments to m / v (m = g without momentum) and returns nothing;
// theta is updated in place.
// kL2: s.l2 != 0 ('adam' mode with weight decay), a template flag rather than a test in the loop
// (GCC does not vectorise the loop around a test) nor g + 0 * theta (NaN for an inf theta).
template <bool kMomentum, bool kL2>
FO_HOST_DEVICE void smmf_element(float& theta, float g, float m_old, float v_old,
                                 const SmmfScalars& s, float& m, float& v) {
  if (kL2) g = g + s.l2 * theta;
  theta = theta * s.decay;
  v = s.beta_v * v_old + s.one_minus_beta_v * (g * g);
  m = kMomentum ? s.beta_m * m_old + s.one_minus_beta_m * g : g;
  theta = theta - s.lr * (m / (sqrtf(v) + s.eps));
}

// The sign bit stored for a new first moment (zeros store 0, as the authors' M > 0).
FO_HOST_DEVICE uint32_t smmf_sign_bit(float m) { return m > 0.0f ? 1u : 0u; }

// ---- Finalize -----------------------------------------------------------------------------

// The column factor from its column sum and the matrix's total: divided unless the total is 0.
FO_HOST_DEVICE float smmf_col_factor(double col_sum, double total) {
  return static_cast<float>(total != 0.0 ? col_sum / total : col_sum);
}

}  // namespace fused_optim

// The multi-tensor work plan shared by the CPU and CUDA kernels (DESIGN.md "Multi-tensor work
// plan"). Every tensor is cut into chunks of kChunkSize elements; a work item names one
// (tensor, chunk) pair. An empty tensor still gets one work item, so per-tensor bookkeeping
// (the step counter) happens exactly once for every tensor. Element counts are int64.
#pragma once

#include <stdint.h>

#include "fused_optim/macros.h"
#include "fused_optim/math/smmf.h"  // smmf_col_factor

namespace fused_optim {

constexpr int64_t kChunkSize = int64_t{1} << 16;

// Storage dtypes of params, grads and states. Math is always fp32.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct WorkItem {
  int32_t tensor;
  int32_t chunk;
};

// Addresses of one tensor of an Adam-family call. max_exp_avg_sq is null unless amsgrad.
struct AdamTensor {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  float* step;
  int64_t numel;
};

// One tensor of an Adafactor call (math/adafactor.h). Factored tensors are `batch` matrices of
// rows x cols, cut into tiles of tile_rows x tile_cols; a full (or empty) tensor is cut into
// flat tiles of tile_cols elements. Offsets index the call's scratch buffers (kernel_args.h).
struct AdafactorTensor {
  void* param;
  const void* grad;
  void* row;      // factored: batch * rows row statistics, row-major; else null
  void* col;      // factored: batch * cols column statistics; else null
  void* full;     // full: the second moment, laid out like param; else null
  void* exp_avg;  // transformers' momentum (beta1), laid out like param; else null
  float* rms;     // transformers' RMS state (0-d float32), or null
  float* step;
  int64_t numel;
  int64_t batch, rows, cols;
  int64_t tile_rows, tile_cols;
  int64_t row_tiles, col_tiles;  // tiles per matrix down the rows / across the columns
  int64_t first_tile;            // index of its first tile among the call's tiles
  int64_t row_partials;          // batch * rows * col_tiles floats: [matrix][row][col tile]
  int64_t col_partials;          // batch * row_tiles * cols floats: [matrix][row tile][col]
  int64_t factors;               // batch * rows row factors, then batch * cols column factors
  int64_t first_matrix;          // index of its first matrix among the call's matrices
  // The whole param's numel and rows of each matrix: a rank's shard of an FSDP2 param (Shard(0))
  // holds some of a matrix's rows (ndim 2) or whole matrices (ndim >= 3); in one process these
  // are numel and rows. stats_at: where its first matrix's [sum of r, column sums of s] go in
  // AdafactorArgs::sums, cols + 1 doubles per matrix (-1: none).
  int64_t global_numel, global_rows, stats_at;
  int32_t factored;
};

// One tensor of an SMMF call (math/smmf.h). Factorized: the n x m square-matricized matrix, cut
// into tiles of tile_rows x tile_cols; dense (or empty): flat tiles of tile_cols elements.
// Partial offsets index the call's float scratch: [row][column tile] sums of |M|, then of V,
// then [row tile][column] sums of |M|, then of V.
// A rank's shard of an FSDP2 param holds a run of the matrix's elements that may start and end
// inside a row: `rows` are then the rows it touches from row `row0`, and element (i, j) of them
// is element i * cols + j - skip of the tensor (those outside [0, numel) are held elsewhere).
// In one process row0 = skip = 0 and rows = n.
struct SmmfTensor {
  void* param;
  const void* grad;
  float* row_m;  // factorized, with momentum: r_M [n], c_M [cols], sign words [rows][words]
  float* col_m;
  int32_t* sign;
  float* row_v;  // factorized: r_V [n], c_V [cols]
  float* col_v;
  void* exp_avg;  // dense: M (with momentum) and V, laid out like param
  void* exp_avg_sq;
  float* step;
  int64_t numel, rows, cols, words;
  int64_t row0, skip;
  int64_t tile_rows, tile_cols, row_tiles, col_tiles;
  int64_t first_tile;                   // index of its first tile among the call's tiles
  int64_t partials;                     // offset of its partial sums in the call's scratch
  int64_t row_parts;                    // finalize parts over rows; the column parts follow
  int64_t sum_row, sum_col, sum_index;  // where its raw sums go (SmmfArgs::sums), when they do
  int32_t factored;
};

// Where tile q of an SMMF tensor lies: rows [row0, row0 + n_rows), columns [col0, col0 +
// n_cols); a dense tensor's tile is the flat range of n_cols elements from col0.
struct SmmfTile {
  int64_t row0, n_rows, col0, n_cols;
  int64_t rb, cb;  // its row-tile and column-tile index
};

FO_HOST_DEVICE SmmfTile smmf_tile(const SmmfTensor& t, int64_t q) {
  SmmfTile x{};
  if (!t.factored || t.numel == 0) {
    x.col0 = q * t.tile_cols;
    const int64_t left = t.numel - x.col0;
    x.n_rows = 1;
    x.n_cols = left < 0 ? 0 : (left < t.tile_cols ? left : t.tile_cols);
    return x;
  }
  x.rb = q / t.col_tiles;
  x.cb = q % t.col_tiles;
  x.row0 = x.rb * t.tile_rows;
  x.col0 = x.cb * t.tile_cols;
  x.n_rows = t.rows - x.row0 < t.tile_rows ? t.rows - x.row0 : t.tile_rows;
  x.n_cols = t.cols - x.col0 < t.tile_cols ? t.cols - x.col0 : t.tile_cols;
  return x;
}

// Where a factorized SMMF tensor's partial sums lie in the call's scratch (pass 1 writes them,
// pass 2 reads them): the layout given at SmmfTensor.
struct SmmfPartials {
  float *row_m, *row_v, *col_m, *col_v;
};

FO_HOST_DEVICE SmmfPartials smmf_partials(const SmmfTensor& t, float* scratch) {
  SmmfPartials p;
  p.row_m = scratch + t.partials;
  p.row_v = p.row_m + t.rows * t.col_tiles;
  p.col_m = p.row_v + t.rows * t.col_tiles;
  p.col_v = p.col_m + t.row_tiles * t.cols;
  return p;
}

// Where pass 2 writes a tensor's raw sums in float64 instead of its factors (FSDP2: the caller
// reduces them over the ranks, then divides; fused_optim._reference.smmf.SmmfSums has the
// layout): row_m / row_v from the tensor's row `row0`, all null in one process.
struct SmmfRawSums {
  double *row_m, *row_v, *col_m, *col_v, *total_m, *total_v;
};

// sums: the call's buffer of 2 (R + C + K) doubles (R rows, C columns, K matrices), or null.
FO_HOST_DEVICE SmmfRawSums smmf_raw_sums(const SmmfTensor& t, double* sums, int64_t R, int64_t C,
                                         int64_t K) {
  SmmfRawSums o{};
  if (sums == nullptr) return o;
  o.row_m = sums + t.sum_row + t.row0;
  o.row_v = o.row_m + R;
  o.col_m = sums + 2 * R + t.sum_col;
  o.col_v = o.col_m + C;
  o.total_m = sums + 2 * R + 2 * C + t.sum_index;
  o.total_v = o.total_m + K;
  return o;
}

// Pass 2 for row i (of those the tensor touches): its factors, the sums of its column tiles'
// partials added in tile order; or the raw sums, when they go out.
template <bool kMomentum>
FO_HOST_DEVICE void smmf_finalize_row(const SmmfTensor& t, const SmmfPartials& p,
                                      const SmmfRawSums& out, int64_t i) {
  double m = 0.0, v = 0.0;
  for (int64_t k = 0; k < t.col_tiles; ++k) {
    m += p.row_m[i * t.col_tiles + k];
    v += p.row_v[i * t.col_tiles + k];
  }
  if (out.row_v != nullptr) {
    if (kMomentum) out.row_m[i] = m;
    out.row_v[i] = v;
    return;
  }
  if (kMomentum) t.row_m[i] = static_cast<float>(m);
  t.row_v[i] = static_cast<float>(v);
}

// Pass 2 for column j: its factors from its sums m, v (of |M|, of V) and the matrix's totals; or
// the raw sums, when they go out (the totals too, written once, with column 0).
template <bool kMomentum>
FO_HOST_DEVICE void smmf_finalize_col(const SmmfTensor& t, const SmmfRawSums& out, int64_t j,
                                      double m, double v, double total_m, double total_v) {
  if (out.col_v != nullptr) {
    if (kMomentum) out.col_m[j] = m;
    out.col_v[j] = v;
    if (j == 0) {
      if (kMomentum) *out.total_m = total_m;
      *out.total_v = total_v;
    }
    return;
  }
  if (kMomentum) t.col_m[j] = smmf_col_factor(m, total_m);
  t.col_v[j] = smmf_col_factor(v, total_v);
}

// Addresses of one tensor of a norm or scale call.
struct FlatTensor {
  void* data;
  int64_t numel;
};

// Where work item q of an Adafactor tensor lies: matrix b, rows [row0, row0 + n_rows), columns
// [col0, col0 + n_cols); a full tensor's tile is one row of n_cols elements of its flat range
// starting at col0. Decoded the same way by the CPU and CUDA kernels.
struct AdafactorTile {
  int64_t b, row0, n_rows, col0, n_cols;
  int64_t rb, cb;  // its row-tile and column-tile index within the matrix
};

FO_HOST_DEVICE AdafactorTile adafactor_tile(const AdafactorTensor& t, int64_t q) {
  AdafactorTile x{};
  if (!t.factored) {
    x.col0 = q * t.tile_cols;
    const int64_t left = t.numel - x.col0;
    x.n_rows = 1;
    x.n_cols = left < 0 ? 0 : (left < t.tile_cols ? left : t.tile_cols);
    return x;
  }
  const int64_t per_matrix = t.row_tiles * t.col_tiles;
  x.b = q / per_matrix;
  x.rb = (q % per_matrix) / t.col_tiles;
  x.cb = q % t.col_tiles;
  x.row0 = x.rb * t.tile_rows;
  x.col0 = x.cb * t.tile_cols;
  x.n_rows = t.rows - x.row0 < t.tile_rows ? t.rows - x.row0 : t.tile_rows;
  x.n_cols = t.cols - x.col0 < t.tile_cols ? t.cols - x.col0 : t.tile_cols;
  return x;
}

// Offset in its tensor of element (k, j) of a tile (k: the row within the tile).
FO_HOST_DEVICE int64_t adafactor_offset(const AdafactorTensor& t, const AdafactorTile& x, int64_t k,
                                        int64_t j) {
  return t.factored ? (x.b * t.rows + x.row0 + k) * t.cols + x.col0 + j : x.col0 + j;
}

// Host and device: the CUDA Adam kernel finds the last block of a tensor with it.
FO_HOST_DEVICE int64_t num_chunks(int64_t numel) {
  return numel == 0 ? 1 : (numel + kChunkSize - 1) / kChunkSize;
}

}  // namespace fused_optim

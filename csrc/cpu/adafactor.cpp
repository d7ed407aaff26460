// Adafactor on the CPU: the five phases of math/adafactor.h in one parallel region per call,
// whatever the number of tensors. Deterministic: every partial is computed by one thread in a
// fixed order and partials are combined in a fixed order.
//
// Phases 1, 3 and 5 each read the gradient (1 and 5 the param too), and on this kind of CPU a
// read-only pass is bound by read bandwidth: three passes over memory made the step slower than
// AdamW's single one. So the region runs the phases wave by wave, a wave being consecutive
// tensors whose gradient, param and per-element state fit in half the L3 cache, each thread
// mostly re-reading the tiles it read in phase 1 (class Schedule): phases 3 and 5 then re-read
// from cache, and only a tensor larger than the budget is streamed from memory three times.
//
// Phase 3 is skipped for most matrices: with rr_i^2 = M / r_i (M the mean of the row statistics,
// clamped as the row factor takes it) and no product rr_i rc_j reaching the cap,
//   sum u^2 = sum_ij g_ij^2 rr_i^2 rc_j^2 = M sum_j rc_j^2 q_j,   q_j = sum_i g_ij^2 / r_i,
// and r_i is known at the end of row i in phase 1, so phase 1 gathers q_j from the row it has
// just read (in L1) and phase 2 finishes the sum in O(n + m). A matrix whose rows span column
// tiles, or where the cap binds or a factor is not finite (zero rows, NaN), takes phase 3.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <unistd.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <utility>
#include <vector>

#include "dtype.h"
#include "fused_optim/kernels.h"
#include "fused_optim/math/adafactor.h"
#include "fused_optim/math/adam.h"
#include "isa.h"

namespace fused_optim {
namespace {

// Independent accumulator lanes, so sums vectorise without reassociation (as in norm.cpp).
constexpr int kLanes = 16;
// Phase 1 streams two read-only inputs: prefetching 4 KB ahead measured 44 -> 34 ms on GPT-2
// shapes (in phase 3, the same prefetch stopped GCC from vectorising the loop: not used there).
constexpr int kPrefetch = 1024;

float sum_lanes(const float (&lanes)[kLanes]) {
  float acc = 0.0f;
  for (int l = 0; l < kLanes; ++l) acc += lanes[l];
  return acc;
}

// Phase 1 on one row of a factored tile: s of each element added to its column's accumulator,
// the row's sum of s and of theta^2 returned through row_sum / theta_sq.
#define FO_DEFINE_STATS_ROW(suffix, attrs)                                                     \
  template <typename P>                                                                        \
  attrs void stats_row_##suffix(const P* __restrict__ theta, const P* __restrict__ grad,       \
                                int64_t n, float mult, float add, float* __restrict__ col_acc, \
                                float* row_sum, float* theta_sq) {                             \
    float rows[kLanes] = {}, thetas[kLanes] = {};                                              \
    int64_t j = 0;                                                                             \
    for (; j + kLanes <= n; j += kLanes) {                                                     \
      __builtin_prefetch(grad + j + kPrefetch);                                                \
      __builtin_prefetch(theta + j + kPrefetch);                                               \
      for (int l = 0; l < kLanes; ++l) {                                                       \
        const float s = adafactor_square(static_cast<float>(grad[j + l]) * mult, add);         \
        const float x = static_cast<float>(theta[j + l]);                                      \
        rows[l] += s;                                                                          \
        col_acc[j + l] += s;                                                                   \
        thetas[l] += x * x;                                                                    \
      }                                                                                        \
    }                                                                                          \
    float row = sum_lanes(rows), th = sum_lanes(thetas);                                       \
    for (; j < n; ++j) {                                                                       \
      const float s = adafactor_square(static_cast<float>(grad[j]) * mult, add);               \
      const float x = static_cast<float>(theta[j]);                                            \
      row += s;                                                                                \
      col_acc[j] += s;                                                                         \
      th += x * x;                                                                             \
    }                                                                                          \
    *row_sum = row;                                                                            \
    *theta_sq = th;                                                                            \
  }
FO_CPU_ISA_VARIANTS(FO_DEFINE_STATS_ROW)
#undef FO_DEFINE_STATS_ROW

// Phase 1 again on the row just read (in L1): q_j += g_j^2 / r_i for the closed-form sum of u^2.
#define FO_DEFINE_Q_ROW(suffix, attrs)                                                      \
  template <typename P>                                                                     \
  attrs void q_row_##suffix(const P* __restrict__ grad, int64_t n, float mult, float inv_r, \
                            float* __restrict__ q) {                                        \
    for (int64_t j = 0; j < n; ++j) {                                                       \
      const float g = static_cast<float>(grad[j]) * mult;                                   \
      q[j] += g * g * inv_r;                                                                \
    }                                                                                       \
  }
FO_CPU_ISA_VARIANTS(FO_DEFINE_Q_ROW)
#undef FO_DEFINE_Q_ROW

// Phase 3 on one row: the sum of u^2. Factored: rr = the row's factor, rc = the column
// factors; full: v (rr, rc unused).
#define FO_DEFINE_UNORM_ROW(suffix, attrs)                                                  \
  template <typename P, typename S, bool kFactored>                                         \
  attrs float unorm_row_##suffix(const P* __restrict__ grad, const float* __restrict__ rc,  \
                                 const S* __restrict__ v, float rr, int64_t n, float mult,  \
                                 float cap) {                                               \
    float lanes[kLanes] = {};                                                               \
    int64_t j = 0;                                                                          \
    for (; j + kLanes <= n; j += kLanes) {                                                  \
      for (int l = 0; l < kLanes; ++l) {                                                    \
        const float g = static_cast<float>(grad[j + l]) * mult;                             \
        const float u = kFactored ? adafactor_u_factored(g, rr, rc[j + l], cap)             \
                                  : adafactor_u_full(g, static_cast<float>(v[j + l]), cap); \
        lanes[l] += u * u;                                                                  \
      }                                                                                     \
    }                                                                                       \
    float acc = sum_lanes(lanes);                                                           \
    for (; j < n; ++j) {                                                                    \
      const float g = static_cast<float>(grad[j]) * mult;                                   \
      const float u = kFactored ? adafactor_u_factored(g, rr, rc[j], cap)                   \
                                : adafactor_u_full(g, static_cast<float>(v[j]), cap);       \
      acc += u * u;                                                                         \
    }                                                                                       \
    return acc;                                                                             \
  }
FO_CPU_ISA_VARIANTS(FO_DEFINE_UNORM_ROW)
#undef FO_DEFINE_UNORM_ROW

// Phase 5 on one row: recomputes u and applies the update (and transformers' momentum).
#define FO_DEFINE_APPLY_ROW(suffix, attrs)                                                \
  template <typename P, typename S, bool kFactored, bool kHf, bool kMomentum>             \
  attrs void apply_row_##suffix(P* __restrict__ theta, const P* __restrict__ grad,        \
                                const float* __restrict__ rc, const S* __restrict__ v,    \
                                S* __restrict__ exp_avg, float rr, int64_t n, float mult, \
                                float cap, const AdafactorApply a) {                      \
    for (int64_t j = 0; j < n; ++j) {                                                     \
      const float g = static_cast<float>(grad[j]) * mult;                                 \
      const float u = kFactored ? adafactor_u_factored(g, rr, rc[j], cap)                 \
                                : adafactor_u_full(g, static_cast<float>(v[j]), cap);     \
      float x = static_cast<float>(theta[j]);                                             \
      float m = kMomentum ? static_cast<float>(exp_avg[j]) : 0.0f;                        \
      adafactor_apply<kHf, kMomentum>(x, u, m, a);                                        \
      theta[j] = static_cast<P>(x);                                                       \
      if (kMomentum) exp_avg[j] = static_cast<S>(m);                                      \
    }                                                                                     \
  }
FO_CPU_ISA_VARIANTS(FO_DEFINE_APPLY_ROW)
#undef FO_DEFINE_APPLY_ROW

double read_lr(const AdafactorArgs& a) {
  if (a.lr_ptr == nullptr) return a.lr;
  return a.lr_is_f64 ? *static_cast<const double*>(a.lr_ptr)
                     : static_cast<double>(*static_cast<const float*>(a.lr_ptr));
}

// Consecutive tensors processed phase by phase together, with their tiles and matrices.
struct Wave {
  int32_t tensor0, tensor1;
  int64_t tile0, tile1, matrix0, matrix1;
};

// The L3 cache shared by this core, in bytes, or 0 if unknown. Linux's sysfs reports the cache a
// core shares (32 MB on an EPYC CCX) where sysconf may report the whole socket's (256 MB).
int64_t l3_bytes() {
  if (FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
    long long size = 0;
    char unit = 0;
    const int got = std::fscanf(f, "%lld%c", &size, &unit);
    std::fclose(f);
    if (got >= 1 && size > 0) return unit == 'K' ? size << 10 : unit == 'M' ? size << 20 : size;
  }
#ifdef _SC_LEVEL3_CACHE_SIZE
  const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (l3 > 0) return l3;
#endif
  return 0;
}

// Bytes a wave may hold: FUSED_OPTIM_CPU_WAVE_BYTES when set (a tuning knob; the tests use it to
// force one tensor per wave), else half the L3 cache (the rest for everything else), else 8 MB.
int64_t wave_budget() {
  if (const char* env = std::getenv("FUSED_OPTIM_CPU_WAVE_BYTES")) {
    const long long bytes = std::atoll(env);
    if (bytes > 0) return bytes;
  }
  static const int64_t half_l3 = [] {
    const int64_t l3 = l3_bytes();
    return l3 > 0 ? std::clamp<int64_t>(l3 / 2, int64_t{1} << 20, int64_t{32} << 20)
                  : int64_t{8} << 20;
  }();
  return half_l3;
}

// Thread `tid` of `n`'s share of tiles [begin, end), `upto[w]` being the elements of the tiles
// before w: contiguous, of about equal elements (a wave's tiles range from a bias to 64K), and
// the same for every phase of a wave, so a tile is mostly read by the same thread in phases 1, 3
// and 5.
std::pair<int64_t, int64_t> share_tiles(const std::vector<int64_t>& upto, int64_t begin,
                                        int64_t end, int tid, int n) {
  const auto at = [&](int k) {
    if (k == 0) return begin;
    if (k == n) return end;
    const int64_t goal = upto[begin] + (upto[end] - upto[begin]) * k / n;
    return static_cast<int64_t>(std::lower_bound(upto.begin() + begin, upto.begin() + end, goal) -
                                upto.begin());
  };
  return {at(tid), at(tid + 1)};
}

// The threads in_parallel_region runs: at::get_num_threads(), one when already inside a parallel
// region or built without OpenMP.
int region_threads() {
#ifdef _OPENMP
  return at::in_parallel_region() ? 1 : std::max(at::get_num_threads(), 1);
#else
  return 1;
#endif
}

// Runs body(tid, n) on the threads of one parallel region of n threads (n = region_threads(),
// taken once by the caller, who may have sized per-thread data by it). OpenMP may start fewer:
// tid then does not cover [0, n), and the work has to be shared so that it does not matter.
template <typename Body>
void in_parallel_region(int n, const Body& body) {
#ifdef _OPENMP
  if (n > 1) {
#pragma omp parallel num_threads(n)
    body(omp_get_thread_num(), n);
    return;
  }
#endif
  body(0, 1);
}

// A range of indices taken one at a time from either end by any thread: its owner from one end,
// the others from the other end once their own ranges are used up. A cache line each: the owner
// updates it once per tile.
class alignas(64) TwoEnded {
 public:
  void reset(int64_t begin, int64_t end) {
    base_ = begin;
    ends_.store(pack(0, static_cast<uint32_t>(end - begin)), std::memory_order_relaxed);
  }

  // The next index from the back (or the front), or -1 when none is left.
  int64_t take(bool back) {
    uint64_t v = ends_.load(std::memory_order_relaxed);
    for (;;) {
      const uint32_t f = static_cast<uint32_t>(v), b = static_cast<uint32_t>(v >> 32);
      if (f >= b) return -1;
      if (ends_.compare_exchange_weak(v, back ? pack(f, b - 1) : pack(f + 1, b),
                                      std::memory_order_relaxed)) {
        return base_ + (back ? b - 1 : f);
      }
    }
  }

 private:
  static uint64_t pack(uint32_t front, uint32_t back) { return uint64_t{back} << 32 | front; }
  int64_t base_ = 0;
  std::atomic<uint64_t> ends_{0};  // front in the low half, back in the high half
};

// How a region's threads share each wave's work. Tiles: per phase, one contiguous range per
// thread of about equal elements (share_tiles), the same in every phase so that a tile is
// mostly re-read by the thread that read it; a thread done with its range then takes what is
// left of the others' from their far ends, so that the barrier after the phase does not wait on
// one core while another idles (the two cores here drift apart by 2-6 ms a step over phase 1
// alone). A range whose thread OpenMP did not start is taken by the others. Matrices: one at a
// time to whichever thread asks next.
class Schedule {
 public:
  enum TilePass { kStats, kUnorm, kApply, kTilePasses };

  Schedule(const std::vector<Wave>& waves, const std::vector<int64_t>& upto, int n)
      : n_(n),
        tiles_(new TwoEnded[waves.size() * kTilePasses * n]),
        matrices_(new std::atomic<int64_t>[waves.size()]) {
    for (size_t k = 0; k < waves.size(); ++k) {
      const Wave& wv = waves[k];
      TORCH_CHECK(wv.tile1 - wv.tile0 <= int64_t{UINT32_MAX}, "too many Adafactor tiles in a wave");
      for (int tid = 0; tid < n; ++tid) {
        const auto [t0, t1] = share_tiles(upto, wv.tile0, wv.tile1, tid, n);
        for (int pass = 0; pass < kTilePasses; ++pass) ranges(k, pass)[tid].reset(t0, t1);
      }
      matrices_[k].store(wv.matrix0, std::memory_order_relaxed);
    }
  }

  int threads() const { return n_; }

  // f(w) for every tile w of wave k, over all threads calling it: first the thread's own range
  // (first to last, or last to first), then the rest of the others'.
  template <typename F>
  void each_tile(size_t k, TilePass pass, int tid, bool last_first, const F& f) {
    TwoEnded* r = ranges(k, pass);
    for (int64_t w; (w = r[tid].take(last_first)) >= 0;) f(w);
    for (int i = 1; i < n_; ++i) {
      TwoEnded& other = r[(tid + i) % n_];
      for (int64_t w; (w = other.take(!last_first)) >= 0;) f(w);
    }
  }

  // f(m) for every matrix m of wave k, over all threads calling it.
  template <typename F>
  void each_matrix(const Wave& wv, size_t k, const F& f) {
    for (int64_t m; (m = matrices_[k].fetch_add(1, std::memory_order_relaxed)) < wv.matrix1;) f(m);
  }

 private:
  TwoEnded* ranges(size_t k, int pass) { return &tiles_[(k * kTilePasses + pass) * n_]; }
  int n_;
  std::unique_ptr<TwoEnded[]> tiles_;
  std::unique_ptr<std::atomic<int64_t>[]> matrices_;
};

void barrier() {
#ifdef _OPENMP
#pragma omp barrier
#endif
}

template <typename P, typename S>
struct Phases {
  const AdafactorArgs& a;
  const AdafactorHyper& h;
  float mult, add, cap;
  decltype(&stats_row_base<P>) stats_row =
      pick_isa(stats_row_base<P>, stats_row_avx2<P>, stats_row_avx512<P>);
  decltype(&q_row_base<P>) q_row = pick_isa(q_row_base<P>, q_row_avx2<P>, q_row_avx512<P>);
  decltype(&unorm_row_base<P, S, true>) unorm_fac = pick_isa(
      unorm_row_base<P, S, true>, unorm_row_avx2<P, S, true>, unorm_row_avx512<P, S, true>);
  decltype(&unorm_row_base<P, S, false>) unorm_full = pick_isa(
      unorm_row_base<P, S, false>, unorm_row_avx2<P, S, false>, unorm_row_avx512<P, S, false>);

  explicit Phases(const AdafactorArgs& args)
      : a(args),
        h(args.hyper),
        mult(grad_multiplier(args.maximize, args.grad_scale, args.clip_coef)),
        add(args.hyper.transformers ? static_cast<float>(args.hyper.eps1) : 0.0f),
        cap(adafactor_u_cap(args.hyper.eps1, args.hyper.transformers)) {}

  // Phase 1: per tile, partial row/column sums of s (factored) or v updated in place (full),
  // the partial sum of theta^2, and for matrices of whole-row tiles the partial q_j.
  void stats(int64_t begin, int64_t end, std::vector<float>& col_acc, std::vector<float>& q_acc) {
    for (int64_t w = begin; w < end; ++w) {
      const WorkItem item = a.tiles[w];
      const AdafactorTensor& t = a.tensors[item.tensor];
      const AdafactorTile x = adafactor_tile(t, item.chunk);
      const P* theta = static_cast<const P*>(t.param);
      const P* grad = static_cast<const P*>(t.grad);
      double theta_sq = 0.0;
      if (t.factored) {
        col_acc.assign(static_cast<size_t>(x.n_cols), 0.0f);
        // whole rows: r_i is known at each row's end. One process only: a shard's sum of u^2
        // needs the whole matrix's factors, so the unorm phase takes it.
        const bool closed = t.col_tiles == 1 && a.q_partials != nullptr;
        if (closed) q_acc.assign(static_cast<size_t>(x.n_cols), 0.0f);
        const AdafactorStatWeights sw = adafactor_stat_weights(*t.step + 1.0, h.decay);
        const S* old_rows = static_cast<const S*>(t.row) + x.b * t.rows;
        for (int64_t k = 0; k < x.n_rows; ++k) {
          const int64_t row = x.row0 + k;
          const int64_t e = adafactor_offset(t, x, row - x.row0, 0);
          float row_sum = 0.0f, th = 0.0f;
          stats_row(theta + e, grad + e, x.n_cols, mult, add, col_acc.data(), &row_sum, &th);
          a.row_partials[t.row_partials + (x.b * t.rows + row) * t.col_tiles + x.cb] = row_sum;
          theta_sq += th;
          if (closed) {  // r_i exactly as phase 2 computes it from this one partial
            const float mean =
                static_cast<float>(static_cast<double>(row_sum) / static_cast<double>(t.cols));
            const float r =
                adafactor_stat_update(static_cast<float>(old_rows[row]), mean, sw, h.transformers);
            q_row(grad + e, x.n_cols, mult, 1.0f / r, q_acc.data());
          }
        }
        const int64_t at = (x.b * t.row_tiles + x.rb) * t.cols + x.col0;
        std::copy(col_acc.begin(), col_acc.end(), a.col_partials + t.col_partials + at);
        if (closed) std::copy(q_acc.begin(), q_acc.end(), a.q_partials + t.col_partials + at);
      } else if (x.n_cols > 0) {
        const AdafactorStatWeights sw = adafactor_stat_weights(*t.step + 1.0, h.decay);
        S* v = static_cast<S*>(t.full) + x.col0;
        float thetas[kLanes] = {};
        int64_t j = 0;
        for (; j < x.n_cols; ++j) {
          const float s = adafactor_square(static_cast<float>(grad[x.col0 + j]) * mult, add);
          v[j] = static_cast<S>(
              adafactor_stat_update(static_cast<float>(v[j]), s, sw, h.transformers));
          const float th = static_cast<float>(theta[x.col0 + j]);
          thetas[j % kLanes] += th * th;
        }
        theta_sq = sum_lanes(thetas);
      }
      a.tile_partials[2 * w] = theta_sq;
    }
  }

  // Phase 2 on the rows of matrix b: the new row statistics from their partials, written, and
  // kept in the row factors' slots until the mean is known. Returns their sum.
  double new_rows(const AdafactorTensor& t, int64_t b, AdafactorStatWeights sw) {
    S* row = static_cast<S*>(t.row) + b * t.rows;
    float* rf = a.factors + t.factors + b * t.rows;
    double sum_r = 0.0;
    for (int64_t i = 0; i < t.rows; ++i) {
      const float* p = a.row_partials + t.row_partials + (b * t.rows + i) * t.col_tiles;
      double s = 0.0;
      for (int64_t k = 0; k < t.col_tiles; ++k) s += p[k];
      const float mean = static_cast<float>(s / static_cast<double>(t.cols));
      const float r = adafactor_stat_update(static_cast<float>(row[i]), mean, sw, h.transformers);
      row[i] = static_cast<S>(r);
      rf[i] = r;
      sum_r += r;
    }
    return sum_r;
  }

  void row_factors(const AdafactorTensor& t, int64_t b, float mean_r) {
    float* rf = a.factors + t.factors + b * t.rows;
    const float eps1 = static_cast<float>(h.eps1);
    for (int64_t i = 0; i < t.rows; ++i) {
      rf[i] = adafactor_row_factor(rf[i], mean_r, eps1, h.transformers);
    }
  }

  // Column sums of s of matrix b: the row tiles' partials added in tile order, a row of partials
  // at a time.
  void col_sums(const AdafactorTensor& t, int64_t b, double* out) const {
    std::fill(out, out + t.cols, 0.0);
    const float* p = a.col_partials + t.col_partials + b * t.row_tiles * t.cols;
    for (int64_t k = 0; k < t.row_tiles; ++k) {
      for (int64_t j = 0; j < t.cols; ++j) out[j] += p[k * t.cols + j];
    }
  }

  // The new column statistics of matrix b from its column sums over `rows` rows, written, and
  // their factors.
  void new_cols(const AdafactorTensor& t, int64_t b, AdafactorStatWeights sw, const double* sums,
                int64_t rows) {
    S* col = static_cast<S*>(t.col) + b * t.cols;
    float* cf = a.factors + t.factors + t.batch * t.rows + b * t.cols;
    for (int64_t j = 0; j < t.cols; ++j) {
      const float mean = static_cast<float>(sums[j] / static_cast<double>(rows));
      const float c = adafactor_stat_update(static_cast<float>(col[j]), mean, sw, h.transformers);
      col[j] = static_cast<S>(c);
      cf[j] = adafactor_col_factor(c);
    }
  }

  // Phase 2: per matrix, the row and column statistics from their partials, then the factors.
  void factors(int64_t begin, int64_t end, std::vector<double>& sums) {
    for (int64_t w = begin; w < end; ++w) {
      const WorkItem item = a.matrices[w];
      const AdafactorTensor& t = a.tensors[item.tensor];
      const int64_t b = item.chunk;
      const AdafactorStatWeights sw = adafactor_stat_weights(*t.step + 1.0, h.decay);
      const float mean_r = static_cast<float>(new_rows(t, b, sw) / static_cast<double>(t.rows));
      row_factors(t, b, mean_r);
      sums.resize(static_cast<size_t>(t.cols));
      col_sums(t, b, sums.data());
      new_cols(t, b, sw, sums.data(), t.rows);
      const float* rf = a.factors + t.factors + b * t.rows;
      const float* cf = a.factors + t.factors + t.batch * t.rows + b * t.cols;
      a.matrix_u_sq[w] = t.col_tiles == 1 ? closed_u_sq(t, b, rf, cf, mean_r, sums) : -1.0;
    }
  }

  // Sharded phase 1's part of phase 2: per matrix, the new row statistics and [their sum, the
  // column sums] to the sums, which span ranks.
  void shard_stats(int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const WorkItem item = a.matrices[w];
      const AdafactorTensor& t = a.tensors[item.tensor];
      const int64_t b = item.chunk;
      double* out = a.sums + t.stats_at + b * (t.cols + 1);
      out[0] = new_rows(t, b, adafactor_stat_weights(*t.step + 1.0, h.decay));
      col_sums(t, b, out + 1);
    }
  }

  // Sharded phase 2: per matrix, the factors from the whole sums.
  void shard_factors(int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const WorkItem item = a.matrices[w];
      const AdafactorTensor& t = a.tensors[item.tensor];
      const int64_t b = item.chunk;
      const double* in = a.sums + t.stats_at + b * (t.cols + 1);
      row_factors(t, b, static_cast<float>(in[0] / static_cast<double>(t.global_rows)));
      new_cols(t, b, adafactor_stat_weights(*t.step + 1.0, h.decay), in + 1, t.global_rows);
    }
  }

  int64_t tile_count(int32_t i) const {
    const int64_t next = i + 1 < a.n_tensors ? a.tensors[i + 1].first_tile : a.n_tiles;
    return next - a.tensors[i].first_tile;
  }

  // Sharded phases 1 and 2: per tensor, the sum of its tiles' partials of theta^2 (slot 0) or
  // of u^2 (slot 1) to the sums.
  void tensor_sums(int32_t begin, int32_t end, int slot) {
    for (int32_t i = begin; i < end; ++i) {
      const int64_t first = a.tensors[i].first_tile, count = tile_count(i);
      double acc = 0.0;
      for (int64_t k = 0; k < count; ++k) acc += a.tile_partials[2 * (first + k) + slot];
      a.sums[(slot == 0 ? 0 : a.u_sq_at) + i] = acc;
    }
  }

  // The matrix's sum of u^2 from its q partials (see the top of this file), or -1 where the cap
  // binds somewhere or a factor is not finite: phase 3 then sums u^2 element by element.
  double closed_u_sq(const AdafactorTensor& t, int64_t b, const float* rf, const float* cf,
                     float mean_r, std::vector<double>& q) const {
    float max_rr = 0.0f, max_rc = 0.0f;
    bool finite = true;
    for (int64_t i = 0; i < t.rows; ++i) {
      finite = finite && std::isfinite(rf[i]);
      max_rr = std::max(max_rr, rf[i]);
    }
    for (int64_t j = 0; j < t.cols; ++j) {
      finite = finite && std::isfinite(cf[j]);
      max_rc = std::max(max_rc, cf[j]);
    }
    // fp32 products are monotonic: no rr_i * rc_j exceeds the largest one.
    // (an overflowing product, possible with transformers' infinite cap, is taken by phase 3)
    const float most = max_rr * max_rc;
    if (!finite || !(most <= cap) || !std::isfinite(most)) return -1.0;
    q.assign(static_cast<size_t>(t.cols), 0.0);
    const float* p = a.q_partials + t.col_partials + b * t.row_tiles * t.cols;
    for (int64_t k = 0; k < t.row_tiles; ++k) {
      for (int64_t j = 0; j < t.cols; ++j) q[j] += p[k * t.cols + j];
    }
    double acc = 0.0;
    for (int64_t j = 0; j < t.cols; ++j) acc += q[j] * (static_cast<double>(cf[j]) * cf[j]);
    const float m = h.transformers ? mean_r : clamp_min_nan(mean_r, static_cast<float>(h.eps1));
    return static_cast<double>(m) * acc;
  }

  // Phase 3: per tile, the partial sum of u^2.
  void unorm(int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const WorkItem item = a.tiles[w];
      const AdafactorTensor& t = a.tensors[item.tensor];
      const AdafactorTile x = adafactor_tile(t, item.chunk);
      const P* grad = static_cast<const P*>(t.grad);
      double acc = 0.0;
      if (t.factored && a.matrix_u_sq != nullptr && a.matrix_u_sq[t.first_matrix + x.b] >= 0.0) {
        // phase 2 has the matrix's sum (phase 4 adds it)
      } else if (t.factored) {
        const float* rf = a.factors + t.factors + x.b * t.rows;
        const float* cf = a.factors + t.factors + t.batch * t.rows + x.b * t.cols + x.col0;
        for (int64_t k = 0; k < x.n_rows; ++k) {
          const int64_t row = x.row0 + k;
          acc += unorm_fac(grad + adafactor_offset(t, x, row - x.row0, 0), cf, nullptr, rf[row],
                           x.n_cols, mult, cap);
        }
      } else if (x.n_cols > 0) {
        acc = unorm_full(grad + x.col0, nullptr, static_cast<const S*>(t.full) + x.col0, 0.0f,
                         x.n_cols, mult, cap);
      }
      a.tile_partials[2 * w + 1] = acc;
    }
  }

  // Phase 4: per tensor, the apply scalars from its tiles' partials; advances the step.
  void scalars(int32_t begin, int32_t end, double lr) {
    for (int32_t i = begin; i < end; ++i) {
      const AdafactorTensor& t = a.tensors[i];
      double theta_sq = 0.0, u_sq = 0.0;
      if (a.phase == 3) {  // a shard: the whole param's sums
        theta_sq = a.sums[i];
        u_sq = a.sums[a.u_sq_at + i];
      } else {
        for (int64_t k = 0, count = tile_count(i); k < count; ++k) {
          theta_sq += a.tile_partials[2 * (t.first_tile + k)];
          u_sq += a.tile_partials[2 * (t.first_tile + k) + 1];
        }
        for (int64_t b = 0; t.factored && b < t.batch; ++b) {
          u_sq += std::max(a.matrix_u_sq[t.first_matrix + b], 0.0);
        }
      }
      const float step = *t.step;
      float rms = 0.0f;
      if (t.global_numel > 0) {
        a.apply[i] =
            adafactor_apply_scalars(h, theta_sq, u_sq, t.global_numel, step + 1.0, lr, &rms);
      }
      if (t.rms != nullptr) *t.rms = rms;
      *t.step = step + 1.0f;
    }
  }

  // Phase 5: per tile, the update.
  template <bool kHf, bool kMomentum>
  void apply(int64_t begin, int64_t end) {
    static const auto fac = pick_isa(apply_row_base<P, S, true, kHf, kMomentum>,
                                     apply_row_avx2<P, S, true, kHf, kMomentum>,
                                     apply_row_avx512<P, S, true, kHf, kMomentum>);
    static const auto full = pick_isa(apply_row_base<P, S, false, kHf, kMomentum>,
                                      apply_row_avx2<P, S, false, kHf, kMomentum>,
                                      apply_row_avx512<P, S, false, kHf, kMomentum>);
    for (int64_t w = begin; w < end; ++w) {
      const WorkItem item = a.tiles[w];
      const AdafactorTensor& t = a.tensors[item.tensor];
      const AdafactorTile x = adafactor_tile(t, item.chunk);
      if (x.n_cols == 0 || x.n_rows == 0) continue;
      P* theta = static_cast<P*>(t.param);
      const P* grad = static_cast<const P*>(t.grad);
      S* exp_avg = static_cast<S*>(t.exp_avg);
      const AdafactorApply s = a.apply[item.tensor];
      if (t.factored) {
        const float* rf = a.factors + t.factors + x.b * t.rows;
        const float* cf = a.factors + t.factors + t.batch * t.rows + x.b * t.cols + x.col0;
        for (int64_t k = 0; k < x.n_rows; ++k) {
          const int64_t row = x.row0 + k;
          const int64_t e = adafactor_offset(t, x, row - x.row0, 0);
          fac(theta + e, grad + e, cf, nullptr, kMomentum ? exp_avg + e : nullptr, rf[row],
              x.n_cols, mult, cap, s);
        }
      } else {
        const int64_t e = x.col0;
        full(theta + e, grad + e, nullptr, static_cast<const S*>(t.full) + e,
             kMomentum ? exp_avg + e : nullptr, 0.0f, x.n_cols, mult, cap, s);
      }
    }
  }

  // upto[w]: the elements of tiles [0, w).
  std::vector<int64_t> tile_elements_upto() const {
    std::vector<int64_t> upto(static_cast<size_t>(a.n_tiles) + 1, 0);
    for (int64_t w = 0; w < a.n_tiles; ++w) {
      const WorkItem item = a.tiles[w];
      const AdafactorTile x = adafactor_tile(a.tensors[item.tensor], item.chunk);
      upto[w + 1] = upto[w] + x.n_rows * x.n_cols;
    }
    return upto;
  }

  std::vector<Wave> waves() const {
    const int64_t per_elem =
        2 * int64_t{sizeof(P)} + (h.transformers && h.has_beta1 ? sizeof(S) : 0);
    const int64_t budget = wave_budget();
    std::vector<Wave> out;
    int64_t bytes = 0, matrix = 0;
    for (int32_t i = 0; i < a.n_tensors; ++i) {
      const AdafactorTensor& t = a.tensors[i];
      const int64_t b = t.numel * (per_elem + (t.factored ? 0 : int64_t{sizeof(S)}));
      if (out.empty() || bytes + b > budget) {
        if (!out.empty()) out.back().tensor1 = i;
        out.push_back({i, i, t.first_tile, 0, matrix, 0});
        bytes = 0;
      }
      bytes += b;
      while (matrix < a.n_matrices && a.matrices[matrix].tensor <= i) ++matrix;
      out.back().matrix1 = matrix;
    }
    if (!out.empty()) out.back().tensor1 = a.n_tensors;
    for (size_t k = 0; k < out.size(); ++k) {
      out[k].tile1 = k + 1 < out.size() ? out[k + 1].tile0 : a.n_tiles;
    }
    return out;
  }

  // One of the three calls of a sharded step (kernel_args.h: AdafactorArgs::phase), wave by
  // wave as run() (the sums of a wave's tensors are written by thread 0).
  void run_shard_phase(const std::vector<Wave>& all, Schedule& plan, double lr,
                       void (Phases::*apply_fn)(int64_t, int64_t)) {
    in_parallel_region(plan.threads(), [&](int tid, int) {
      std::vector<float> col_acc, q_acc;
      for (size_t k = 0; k < all.size(); ++k) {
        const Wave& wv = all[k];
        if (a.phase == 1) {
          plan.each_tile(k, Schedule::kStats, tid, false,
                         [&](int64_t w) { stats(w, w + 1, col_acc, q_acc); });
          barrier();
          plan.each_matrix(wv, k, [&](int64_t m) { shard_stats(m, m + 1); });
          if (tid == 0) tensor_sums(wv.tensor0, wv.tensor1, 0);
        } else if (a.phase == 2) {
          plan.each_matrix(wv, k, [&](int64_t m) { shard_factors(m, m + 1); });
          barrier();
          plan.each_tile(k, Schedule::kUnorm, tid, false, [&](int64_t w) { unorm(w, w + 1); });
          barrier();
          if (tid == 0) tensor_sums(wv.tensor0, wv.tensor1, 1);
        } else {
          if (tid == 0) scalars(wv.tensor0, wv.tensor1, lr);
          barrier();
          plan.each_tile(k, Schedule::kApply, tid, true,
                         [&](int64_t w) { (this->*apply_fn)(w, w + 1); });
        }
      }
    });
  }

  void run() {
    const double lr = read_lr(a);
    void (Phases::*apply_fn)(int64_t, int64_t) = !h.transformers ? &Phases::apply<false, false>
                                                 : h.has_beta1   ? &Phases::apply<true, true>
                                                                 : &Phases::apply<true, false>;
    const std::vector<Wave> all = waves();
    Schedule plan(all, tile_elements_upto(), region_threads());
    if (a.phase != 0) {
      run_shard_phase(all, plan, lr, apply_fn);
      return;
    }
    in_parallel_region(plan.threads(), [&](int tid, int) {
      std::vector<float> col_acc, q_acc;
      std::vector<double> col_sums;
      for (size_t k = 0; k < all.size(); ++k) {
        const Wave& wv = all[k];
        plan.each_tile(k, Schedule::kStats, tid, false,
                       [&](int64_t w) { stats(w, w + 1, col_acc, q_acc); });
        barrier();
        plan.each_matrix(wv, k, [&](int64_t m) { factors(m, m + 1, col_sums); });
        barrier();
        plan.each_tile(k, Schedule::kUnorm, tid, false, [&](int64_t w) { unorm(w, w + 1); });
        barrier();
        if (tid == 0) scalars(wv.tensor0, wv.tensor1, lr);
        barrier();
        // No barrier after the update: the next wave touches other tensors and other slots. Last
        // to first: most matrices skip phase 3, and the tiles phase 1 read last are the likeliest
        // to be still in cache when a wave is larger than it (a matrix above the budget always is).
        plan.each_tile(k, Schedule::kApply, tid, true,
                       [&](int64_t w) { (this->*apply_fn)(w, w + 1); });
      }
    });
  }
};

}  // namespace

void adafactor_cpu(const AdafactorArgs& a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // GradScaler: skip the step
  dispatch_dtype(a.param_dtype, [&](auto p_tag) {
    dispatch_dtype(a.state_dtype,
                   [&](auto s_tag) { Phases<decltype(p_tag), decltype(s_tag)>(a).run(); });
  });
}

}  // namespace fused_optim

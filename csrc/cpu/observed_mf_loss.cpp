// CPU kernel of mf_ext::observed_mf_loss_and_grads: the loss and the gradients that are asked
// for, from the observed triples (rows[t], cols[t], values[t]) in any order:
//   e   = values[t] − (p_iᵀ q_j + row_bias[i] + col_bias[j])
//   L  += w_t e²
//   g   = −2 · scale · w_t · e                      (∂L/∂pred)
//   dP[i] += g q_j,  dQ[j] += g p_i,  drow_bias[i] += g,  dcol_bias[j] += g
// Nothing of size nnz × r is ever formed.
//
// P (r, m) and Q (r, n) are first copied once into row layout, (m, r_pad) and (n, r_pad) with
// r zero-padded to whole vectors, so that each triple reads two contiguous r-vectors. In random
// order every triple would read p_i, q_j and read-modify-write dP[i], dQ[j] from outside L2, so
// the triples are first bucketed (a stable counting sort, O(nnz), into small temporaries of one
// index pair, value and weight per triple) by tile: a block of "outer" indices × a block of
// "inner" ones (outer = rows when m ≥ n, else cols; the math is symmetric), each block's rows of
// the factor and its gradient sized to stay in L2. Inside a tile the triples are sorted once
// more by outer index, so p and its gradient stay in registers along each run of one outer index.
//
// Units and determinism (bucketing.h). The inner side is cut into G groups and the outer side
// into K·G, at fixed fractions of nnz; unit (outer group, inner group) holds the tiles of their
// indices, K·G² units in all (2,312 on an ML-20M-sized problem). They run in Latin-square
// rounds (latin_rounds.h): an outer group's units run one after the other, and so do the units
// of one lane (G outer groups) that share an inner group, so each unit adds straight into its
// outer gradient rows and its lane's inner gradient rows. Groups, tiles and all orders
// depend on the shapes and the data only: results are bitwise the same whatever the thread
// count. Extra memory besides the outputs: the padded copies of P and Q and the outer gradient
// rows ((m + n + outer size)·r_pad), K ≤ 4 lanes of inner gradient rows (K·inner size·r_pad) and,
// float32, of double inner bias sums (K·inner size) plus double rows for the inner indices that
// get hot (≤ K·inner size·r_pad doubles, only hot rows touched); the bucketed triples
// (nnz × (4 + sizeof(T)), + sizeof(T) with weights, + 8 with grad_values or grad_weights); per
// pass ≤ 8 segments × (2^16 bins + tiles) counters; K·G² loss partials and flags.
//
// Indices are checked by the first pass over the triples (the histogram), before anything is
// read through them; the lowest bad position is reported (its row if both are bad).
//
// Partition and bucketing: bucketing.h; the rounds: latin_rounds.h; float32 accuracy over long
// sums: compensated_sums.h; vector helpers: simd.h. This file holds the fused pass (run_unit:
// its hot loop is kept whole, see its comments) and the op.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../observed_mf_loss_common.h"
#include "bucketing.h"
#include "compensated_sums.h"
#include "latin_rounds.h"
#include "simd.h"

namespace mf_ext {
namespace {

using simd::dot_row;
using simd::flush_run;
using simd::RowVectors;
using simd::Vec;

// One side of the problem: the rows (P, row_bias) or the cols (Q, col_bias).
template <typename T>
struct Side {
  int64_t size;        // m or n
  const T* factor;     // (size, r_pad)
  const T* bias;       // nullptr: none
  int64_t bias_s;
  T* grad;             // outer: (size, r_pad); inner: (lanes, size, r_pad); or nullptr
};

template <typename T>
struct ObservedProblem {
  int64_t nnz, r_pad;
  Side<T> outer, inner;
  T* grad_outer_bias;           // (outer size,): the output, or nullptr
  double* inner_bias_sums;      // (lanes, inner size), or nullptr
  InnerRowFlusher<T>* flushers;  // (lanes,)
  T scale;          // 1, or 1/nnz for "mean"
  T* grad_values;   // (nnz,) or nullptr
  T* grad_weights;  // (nnz,) or nullptr
};

// The triples of inner block positions kPrefetchAhead on are fetched while this one computes
// (their rows are in L2 by then, most of the time; this brings them to L1).
constexpr int64_t kPrefetchAhead = 4;

// Per-thread buffers of the units: one tile's triples sorted by outer index.
template <typename T>
struct UnitScratch {
  std::unique_ptr<uint32_t[]> run_b;
  std::unique_ptr<T[]> run_v, run_w;
  std::unique_ptr<int64_t[]> run_pos;
  std::vector<int64_t> run_end;
  std::vector<double> run_wide;  // float32 runs longer than kRunFlush add into this double row

  UnitScratch(const Bucketed<T>& bk, int64_t max_tile, int64_t r_pad)
      : run_b(new uint32_t[max_tile]),
        run_v(new T[max_tile]),
        run_w(bk.weights ? new T[max_tile] : nullptr),
        run_pos(bk.positions ? new int64_t[max_tile] : nullptr),
        run_end((int64_t(1) << bk.outer_shift) + 1),
        run_wide(std::is_same_v<T, float> ? r_pad : 0, 0.0) {}
};

// Unit (ga, gb): the tiles of outer group ga × inner group gb. In its first round (gb = ga mod
// G) it zeroes what its group's units add into: the outer group's gradient rows and bias
// entries, and its lane's inner gradient rows and bias sums of group gb.
template <typename T, int NV>
MF_EXT_INLINE double run_unit(const ObservedProblem<T>& pb, const Bucketed<T>& bk, int64_t ga,
                              int64_t gb, UnitScratch<T>& scratch) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  const int64_t r_pad = NV > 0 ? NV * W : pb.r_pad;
  const int64_t nv = r_pad / W;
  const Side<T>& A = pb.outer;
  const Side<T>& B = pb.inner;
  const int64_t G = bk.groups, lane = ga / G;
  const int64_t a_begin = bk.outer_start[ga], a_end = bk.outer_start[ga + 1];
  const int64_t b_begin = bk.inner_start[gb], b_end = bk.inner_start[gb + 1];
  T* dA = A.grad;
  T* dbA = pb.grad_outer_bias;
  T* dB = B.grad ? B.grad + lane * B.size * r_pad : nullptr;
  // The inner bias gradient takes one term per triple: summed in double (per lane), stored at
  // the end, so float32 keeps its accuracy however many triples share an inner index.
  double* dbB_sum = pb.inner_bias_sums ? pb.inner_bias_sums + lane * B.size : nullptr;
  if (gb == ga % G) {
    if (dA) std::fill(dA + a_begin * r_pad, dA + a_end * r_pad, T(0));
    if (dbA) std::fill(dbA + a_begin, dbA + a_end, T(0));
    if (dB) std::fill(dB + b_begin * r_pad, dB + b_end * r_pad, T(0));
    if (dbB_sum) std::fill(dbB_sum + b_begin, dbB_sum + b_end, 0.0);
  }
  // Inner terms are counted only where the lane's flusher counts (see its construction).
  InnerRowFlusher<T>& dB_wide = pb.flushers[lane];

  const int64_t inner_shift = bk.inner_shift;
  const uint32_t inner_mask = (uint32_t(1) << inner_shift) - 1;
  const uint32_t* keys = bk.keys.get();
  const T* values = bk.values.get();
  const T* weights = bk.weights.get();
  const int64_t* positions = bk.positions.get();
  uint32_t* const run_b = scratch.run_b.get();
  T* const run_v = scratch.run_v.get();
  T* const run_w = scratch.run_w.get();
  int64_t* const run_pos = scratch.run_pos.get();
  std::vector<int64_t>& run_end = scratch.run_end;
  std::vector<double>& run_wide = scratch.run_wide;
  const int64_t block_size = int64_t(1) << bk.outer_shift;
  RowVectors<V, NV> p_vec(nv), acc_vec(nv);
  constexpr bool kWideRuns = std::is_same_v<T, float>;
  V* pv = p_vec.data();
  V* acc = acc_vec.data();

  const T coef = T(-2) * pb.scale, scale = pb.scale;
  T* const grad_values = pb.grad_values;
  T* const grad_weights = pb.grad_weights;
  const T* const A_factor = A.factor;
  const T* const A_bias = A.bias;
  const int64_t A_bias_s = A.bias_s;
  const T* const B_bias = B.bias;
  const int64_t B_bias_s = B.bias_s;
  const int64_t row_bytes = r_pad * static_cast<int64_t>(sizeof(T));
  double loss = 0;
  int64_t tile = bk.unit_tile[ga * G + gb];
  for (int64_t a0 = a_begin; a0 < a_end; a0 += block_size) {
    const int64_t a_count = std::min(block_size, a_end - a0);
    for (int64_t b0 = b_begin; b0 < b_end; b0 += int64_t(1) << inner_shift, ++tile) {
      const int64_t s = bk.tile_begin[tile], e = bk.tile_begin[tile + 1];
      if (s == e) continue;
      // Counting sort of the tile by outer index (stable), into the run_* buffers.
      std::fill(run_end.begin(), run_end.begin() + a_count + 1, 0);
      for (int64_t t = s; t < e; ++t) ++run_end[(keys[t] >> inner_shift) + 1];
      for (int64_t k = 0; k < a_count; ++k) run_end[k + 1] += run_end[k];
      for (int64_t t = s; t < e; ++t) {
        const uint32_t key = keys[t];
        const int64_t u = run_end[key >> inner_shift]++;
        run_b[u] = key & inner_mask;
        run_v[u] = values[t];
        if (weights) run_w[u] = weights[t];
        if (positions) run_pos[u] = positions[t];
      }
      const int64_t count = e - s;
      const T* const Bf = B.factor + b0 * r_pad;
      T* const dBt = dB ? dB + b0 * r_pad : nullptr;
      const T* const B_bias_t = B_bias ? B_bias + b0 * B_bias_s : nullptr;
      double* const dbB_sum_t = dbB_sum ? dbB_sum + b0 : nullptr;
      uint8_t* const dB_terms_t = dB_wide.terms(b0);
      int64_t u = 0;
      for (int64_t al = 0; al < a_count; ++al) {
        const int64_t u_end = run_end[al];  // after the scatter: the end of run al
        if (u == u_end) continue;
        const int64_t a = a0 + al;
        const T* p = A_factor + a * r_pad;
#pragma GCC unroll 8
        for (int64_t v = 0; v < nv; ++v) {
          pv[v] = simd::load(p + v * W);
          acc[v] = simd::broadcast<T>(0);
        }
        const T bias_a = A_bias ? A_bias[a * A_bias_s] : T(0);
        // A run can hold every triple of a tile: its bias-gradient sum is kept in double, and
        // its factor-gradient sum leaves the registers every kRunFlush triples (float32: into
        // run_wide, in double), so float32 errors do not grow with the run's length.
        double g_sum = 0;
        int64_t since_flush = 0;
        bool wide_used = false;
        for (; u < u_end; ++u) {
          if (kPrefetchAhead > 0 && u + kPrefetchAhead < count) {
            const int64_t b_ahead = run_b[u + kPrefetchAhead];
            for (int64_t k = 0; k < row_bytes; k += 64) {
              __builtin_prefetch(reinterpret_cast<const char*>(Bf + b_ahead * r_pad) + k, 0, 3);
              if (dBt) {
                __builtin_prefetch(reinterpret_cast<const char*>(dBt + b_ahead * r_pad) + k, 1, 3);
              }
            }
          }
          const int64_t bl = run_b[u];
          const T* q = Bf + bl * r_pad;
          T pred = bias_a + dot_row<T, NV>(pv, q, nv);
          if (B_bias_t) pred += B_bias_t[bl * B_bias_s];
          const T err = run_v[u] - pred;
          const T w = weights ? run_w[u] : T(1);
          loss += static_cast<double>(w) * (static_cast<double>(err) * static_cast<double>(err));
          const T g = coef * (w * err);
          if (grad_values) grad_values[run_pos[u]] = -g;
          if (grad_weights) grad_weights[run_pos[u]] = scale * (err * err);
          const V gv = simd::broadcast(g);
#pragma GCC unroll 8
          for (int64_t v = 0; v < nv; ++v) acc[v] += gv * simd::load(q + v * W);
          if (dBt) {
            T* dq = dBt + bl * r_pad;
#pragma GCC unroll 8
            for (int64_t v = 0; v < nv; ++v) {
              simd::store(dq + v * W, simd::load(dq + v * W) + gv * pv[v]);
            }
            if (dB_terms_t && __builtin_expect(++dB_terms_t[bl] == kRunFlush, 0)) {
              dB_wide.flush(b0 + bl, dq);
            }
          }
          if (dbB_sum_t) dbB_sum_t[bl] += static_cast<double>(g);
          g_sum += static_cast<double>(g);
          if (++since_flush == kRunFlush && dA) {
            if constexpr (kWideRuns) {
              flush_run_wide(run_wide.data(), acc, nv);
              wide_used = true;
            } else {
              flush_run(dA + a * r_pad, acc, nv);
            }
            since_flush = 0;
          }
        }
        if constexpr (kWideRuns) {
          if (dA && wide_used) finish_run_wide(dA + a * r_pad, run_wide.data(), acc, nv);
        }
        if (dA && !wide_used) flush_run(dA + a * r_pad, acc, nv);
        if (dbA) dbA[a] += static_cast<T>(g_sum);
      }
    }
  }
  return loss;
}

template <typename T>
MF_EXT_INLINE double run_unit_nv(const ObservedProblem<T>& pb, const Bucketed<T>& bk, int64_t ga,
                                 int64_t gb, UnitScratch<T>& scratch) {
  constexpr int W = Vec<T>::width;
  switch (pb.r_pad / W) {  // whole rows in registers up to 8 vectors (r ≤ 128 float, 64 double)
    case 1: return run_unit<T, 1>(pb, bk, ga, gb, scratch);
    case 2: return run_unit<T, 2>(pb, bk, ga, gb, scratch);
    case 3: return run_unit<T, 3>(pb, bk, ga, gb, scratch);
    case 4: return run_unit<T, 4>(pb, bk, ga, gb, scratch);
    case 5: return run_unit<T, 5>(pb, bk, ga, gb, scratch);
    case 6: return run_unit<T, 6>(pb, bk, ga, gb, scratch);
    case 7: return run_unit<T, 7>(pb, bk, ga, gb, scratch);
    case 8: return run_unit<T, 8>(pb, bk, ga, gb, scratch);
    default: return run_unit<T, 0>(pb, bk, ga, gb, scratch);
  }
}

// Non-template entry points, so that each can be cloned per instruction set.
MF_EXT_TARGET_CLONES double run_unit_float(const ObservedProblem<float>& pb,
                                           const Bucketed<float>& bk, int64_t ga, int64_t gb,
                                           UnitScratch<float>& scratch) {
  return run_unit_nv(pb, bk, ga, gb, scratch);
}
MF_EXT_TARGET_CLONES double run_unit_double(const ObservedProblem<double>& pb,
                                            const Bucketed<double>& bk, int64_t ga, int64_t gb,
                                            UnitScratch<double>& scratch) {
  return run_unit_nv(pb, bk, ga, gb, scratch);
}
inline double run_unit_any(const ObservedProblem<float>& pb, const Bucketed<float>& bk,
                           int64_t ga, int64_t gb, UnitScratch<float>& scratch) {
  return run_unit_float(pb, bk, ga, gb, scratch);
}
inline double run_unit_any(const ObservedProblem<double>& pb, const Bucketed<double>& bk,
                           int64_t ga, int64_t gb, UnitScratch<double>& scratch) {
  return run_unit_double(pb, bk, ga, gb, scratch);
}

// out (r, count) = Σ_c parts[c] (count, r_pad)ᵀ, parts (lanes) summed in order: back to P's
// layout.
template <typename T>
void reduce_rows_transposed(const T* parts, int64_t lanes, int64_t count, int64_t r,
                            int64_t r_pad, T* out) {
  at::parallel_for(0, count, 256, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(r_pad);
    for (int64_t i = begin; i < end; ++i) {
      std::copy(parts + i * r_pad, parts + (i + 1) * r_pad, acc.begin());
      for (int64_t c = 1; c < lanes; ++c) {
        const T* part = parts + (c * count + i) * r_pad;
        for (int64_t k = 0; k < r_pad; ++k) acc[k] += part[k];
      }
      for (int64_t k = 0; k < r; ++k) out[k * count + i] = acc[k];
    }
  });
}

// out (count,) = Σ_lane sums[lane] (count,), in double, lanes in order, rounded once.
template <typename T>
void reduce_bias_sums(const double* sums, int64_t lanes, int64_t count, T* out) {
  at::parallel_for(0, count, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      double s = sums[i];
      for (int64_t lane = 1; lane < lanes; ++lane) s += sums[lane * count + i];
      out[i] = static_cast<T>(s);
    }
  });
}

// Copies X (r, count), any strides, into a zero-padded row layout (count, r_pad).
at::Tensor to_padded_rows(const at::Tensor& X, int64_t r_pad) {
  at::Tensor rows_layout = at::zeros({X.size(1), r_pad}, X.options());
  rows_layout.narrow(1, 0, X.size(0)).copy_(X.t());
  return rows_layout;
}

// The padded rank of P, Q of rank r, type T.
template <typename T>
int64_t padded_rank(int64_t r) {
  constexpr int64_t W = Vec<T>::width;
  return (r + W - 1) / W * W;
}

[[noreturn]] void raise_bad_index(const BadIndex& bad, int64_t m, int64_t n) {
  if (bad.is_col) observed_index_error("cols", bad.position, bad.value, n, "n, the columns of Q");
  observed_index_error("rows", bad.position, bad.value, m, "m, the columns of P");
}

// Runs the fused pass; fills the defined gradients of `out` (contiguous). Returns the loss.
template <typename T>
double observed_mf_loss_impl(const at::Tensor& rows, const at::Tensor& cols,
                             const at::Tensor& values, const at::Tensor& P, const at::Tensor& Q,
                             const std::optional<at::Tensor>& row_bias,
                             const std::optional<at::Tensor>& col_bias,
                             const std::optional<at::Tensor>& weights, Reduction reduction,
                             const ObservedOutputs& out) {
  const int64_t nnz = values.size(0), r = P.size(0), m = P.size(1), n = Q.size(1);
  if (nnz == 0) {
    for (const at::Tensor* g : {&out.grad_P, &out.grad_Q, &out.grad_row_bias,
                                &out.grad_col_bias}) {
      if (g->defined()) g->zero_();
    }
    return 0.0;
  }
  const int64_t r_pad = padded_rank<T>(r);
  Bucketed<T> bk;
  static_cast<Sides&>(bk) = plan_sides(m, n);
  const bool rows_outer = bk.rows_outer;
  const int64_t na = bk.outer_size, nb = bk.inner_size;
  const bool keep_positions = out.grad_values.defined() || out.grad_weights.defined();
  const BadIndex bad = bucket_triples<T>(rows, cols, values, weights, m, n,
                                         r_pad * static_cast<int64_t>(sizeof(T)), keep_positions,
                                         bk);
  if (bad.position >= 0) raise_bad_index(bad, m, n);
  const int64_t G = bk.groups, lanes = bk.lanes;

  ObservedProblem<T> pb{};
  pb.nnz = nnz;
  pb.r_pad = r_pad;
  const at::Tensor P_rows = to_padded_rows(P, r_pad);
  const at::Tensor Q_rows = to_padded_rows(Q, r_pad);
  const at::Tensor& A_rows = rows_outer ? P_rows : Q_rows;
  const at::Tensor& B_rows = rows_outer ? Q_rows : P_rows;
  const std::optional<at::Tensor>& A_bias = rows_outer ? row_bias : col_bias;
  const std::optional<at::Tensor>& B_bias = rows_outer ? col_bias : row_bias;
  const at::Tensor& A_grad_out = rows_outer ? out.grad_P : out.grad_Q;
  const at::Tensor& B_grad_out = rows_outer ? out.grad_Q : out.grad_P;
  const at::Tensor& A_grad_bias_out = rows_outer ? out.grad_row_bias : out.grad_col_bias;
  const at::Tensor& B_grad_bias_out = rows_outer ? out.grad_col_bias : out.grad_row_bias;

  pb.outer = Side<T>{na, A_rows.const_data_ptr<T>(), nullptr, 0, nullptr};
  pb.inner = Side<T>{nb, B_rows.const_data_ptr<T>(), nullptr, 0, nullptr};
  if (A_bias.has_value()) {
    pb.outer.bias = A_bias->const_data_ptr<T>();
    pb.outer.bias_s = A_bias->stride(0);
  }
  if (B_bias.has_value()) {
    pb.inner.bias = B_bias->const_data_ptr<T>();
    pb.inner.bias_s = B_bias->stride(0);
  }
  pb.scale = reduction == Reduction::Mean ? T(1) / static_cast<T>(nnz) : T(1);
  if (out.grad_values.defined()) pb.grad_values = out.grad_values.mutable_data_ptr<T>();
  if (out.grad_weights.defined()) pb.grad_weights = out.grad_weights.mutable_data_ptr<T>();

  at::Tensor dA_rows, dB_lanes;  // zeroed by the units of their first round
  if (A_grad_out.defined() && r > 0) {
    dA_rows = at::empty({na, r_pad}, P.options());
    pb.outer.grad = dA_rows.mutable_data_ptr<T>();
  }
  if (B_grad_out.defined() && r > 0) {
    dB_lanes = at::empty({lanes, nb, r_pad}, P.options());
    pb.inner.grad = dB_lanes.mutable_data_ptr<T>();
  }
  // The outer bias gradient has one writer per entry: straight into the output.
  if (A_grad_bias_out.defined()) pb.grad_outer_bias = A_grad_bias_out.mutable_data_ptr<T>();
  std::vector<double> inner_bias_sums(B_grad_bias_out.defined() ? lanes * nb : 0);
  if (B_grad_bias_out.defined()) pb.inner_bias_sums = inner_bias_sums.data();
  // Counting inner terms costs the hot loop 5-25%, so a lane counts only where its triples
  // average at least kRunFlush per inner index (tiny or very dense inner sides: thousands of
  // terms per row). Rating data averages ~35 (MovieLens): its popular rows keep float chains
  // of a few hundred.
  std::vector<InnerRowFlusher<T>> flushers;
  for (int64_t lane = 0; lane < lanes; ++lane) {
    int64_t lane_triples = 0;
    for (int64_t u = lane * G * G; u < (lane + 1) * G * G; ++u) lane_triples += bk.unit_triples(u);
    const bool count = pb.inner.grad && lane_triples >= kRunFlush * nb;
    flushers.emplace_back(count ? nb : 0, r_pad);
  }
  pb.flushers = flushers.data();

  int64_t max_tile = 1;
  for (int64_t t = 0; t < bk.tiles(); ++t) {
    max_tile = std::max(max_tile, bk.tile_begin[t + 1] - bk.tile_begin[t]);
  }
  std::vector<double> losses(bk.units());
  run_units(
      G, lanes, [&] { return UnitScratch<T>(bk, max_tile, r_pad); },
      [&](int64_t ga, int64_t gb, UnitScratch<T>& scratch) {
        losses[ga * G + gb] = run_unit_any(pb, bk, ga, gb, scratch);
      });

  double loss = 0;
  for (const double l : losses) loss += l;  // unit order
  if (pb.outer.grad) {
    reduce_rows_transposed<T>(pb.outer.grad, 1, na, r, r_pad, A_grad_out.mutable_data_ptr<T>());
  } else if (A_grad_out.defined()) {
    A_grad_out.zero_();  // r == 0
  }
  if (pb.inner.grad) {
    at::parallel_for(0, lanes, 1, [&](int64_t begin, int64_t end) {
      for (int64_t lane = begin; lane < end; ++lane) {
        flushers[lane].finish(pb.inner.grad + lane * nb * r_pad);
      }
    });
    reduce_rows_transposed<T>(pb.inner.grad, lanes, nb, r, r_pad,
                              B_grad_out.mutable_data_ptr<T>());
  } else if (B_grad_out.defined()) {
    B_grad_out.zero_();
  }
  if (pb.inner_bias_sums) {
    reduce_bias_sums<T>(pb.inner_bias_sums, lanes, nb, B_grad_bias_out.mutable_data_ptr<T>());
  }
  return reduction == Reduction::Mean ? loss / static_cast<double>(nnz) : loss;
}

ObservedResult observed_mf_loss_and_grads_cpu(
    const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& values, const at::Tensor& P,
    const at::Tensor& Q, const std::optional<at::Tensor>& row_bias,
    const std::optional<at::Tensor>& col_bias, const std::optional<at::Tensor>& weights,
    c10::string_view reduction, bool grad_values, bool grad_P, bool grad_Q, bool grad_row_bias,
    bool grad_col_bias, bool grad_weights) {
  const ObservedGradFlags want{grad_values, grad_P, grad_Q, grad_row_bias, grad_col_bias,
                               grad_weights};
  const Reduction red =
      check_observed_call(rows, cols, values, P, Q, row_bias, col_bias, weights, reduction, want);
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble,
                   "mf_ext.observed_mf_loss: the CPU kernel supports float32 and float64, got ",
                   values.scalar_type());
  const ObservedOutputs all = allocate_observed_outputs(values, P, Q, want);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "observed_mf_loss_cpu", [&] {
    const double value = observed_mf_loss_impl<scalar_t>(rows, cols, values, P, Q, row_bias,
                                                         col_bias, weights, red,
                                                         want.wanted(all));
    all.loss.fill_(value);
  });
  return all.as_tuple();
}

// mf_ext::_observed_partition: how the kernel above cuts the problem (rows, cols) of P, Q's
// shapes and dtype, computed by its own planning and counting code, for tests. Flattened:
// [rows_outer, outer block size, inner block size, outer blocks, inner blocks (summed over the
// groups), tiles, G, K, segments, the triples of each segment..., the K·G + 1 outer group
// starts..., the G + 1 inner group starts..., the triples of each of the K·G² units (unit
// order: outer group · G + inner group)...]; no segments, groups or units when there are no
// triples (the kernel does no pass then). Out-of-range indices raise as the op does.
std::vector<int64_t> observed_partition_cpu(const at::Tensor& rows, const at::Tensor& cols,
                                            const at::Tensor& P, const at::Tensor& Q) {
  check_observed_index_tensor(rows, "rows");
  check_observed_index_tensor(cols, "cols");
  TORCH_CHECK_VALUE(rows.size(0) == cols.size(0), "mf_ext._observed_partition: rows and cols "
                    "must have the same length, got ", rows.size(0), " and ", cols.size(0));
  TORCH_CHECK_VALUE(P.dim() == 2 && Q.dim() == 2 && P.size(0) == Q.size(0),
                    "mf_ext._observed_partition: P (r, m) and Q (r, n) must be 2-D of one rank, "
                    "got P ", P.sizes(), ", Q ", Q.sizes());
  TORCH_CHECK_TYPE(P.scalar_type() == Q.scalar_type() &&
                       (P.scalar_type() == at::kFloat || P.scalar_type() == at::kDouble),
                   "mf_ext._observed_partition: P and Q must both be float32 or float64, got ",
                   P.scalar_type(), " and ", Q.scalar_type());
  const int64_t nnz = rows.size(0), r = P.size(0), m = P.size(1), n = Q.size(1);
  const Sides sides = plan_sides(m, n);
  if (nnz == 0) return {sides.rows_outer, 0, 0, 0, 0, 0, 0, 0, 0};
  std::vector<int64_t> out;
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "observed_partition_cpu", [&] {
    Partition pt;
    static_cast<Sides&>(pt) = sides;
    std::vector<int64_t> offsets, tile_begin;
    const int64_t row_bytes = padded_rank<scalar_t>(r) * static_cast<int64_t>(sizeof(scalar_t));
    const BadIndex bad =
        count_triples<scalar_t>(rows, cols, m, n, row_bytes, pt, offsets, tile_begin);
    if (bad.position >= 0) raise_bad_index(bad, m, n);
    const int64_t segments = segment_count(nnz);
    const int64_t sum_outer = std::accumulate(pt.outer_group_blocks.begin(),
                                              pt.outer_group_blocks.end(), int64_t(0));
    const int64_t sum_inner = std::accumulate(pt.inner_group_blocks.begin(),
                                              pt.inner_group_blocks.end(), int64_t(0));
    out = {pt.rows_outer, int64_t(1) << pt.outer_shift, int64_t(1) << pt.inner_shift, sum_outer,
           sum_inner, pt.tiles(), pt.groups, pt.lanes, segments};
    for (int64_t s = 0; s < segments; ++s) {
      out.push_back(segment_begin(nnz, segments, s + 1) - segment_begin(nnz, segments, s));
    }
    out.insert(out.end(), pt.outer_start.begin(), pt.outer_start.end());
    out.insert(out.end(), pt.inner_start.begin(), pt.inner_start.end());
    for (int64_t u = 0; u < pt.units(); ++u) {
      out.push_back(tile_begin[pt.unit_tile[u + 1]] - tile_begin[pt.unit_tile[u]]);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mf_ext, CPU, m) {
  m.impl("observed_mf_loss_and_grads", &observed_mf_loss_and_grads_cpu);
  m.impl("_observed_partition", &observed_partition_cpu);
}

}  // namespace mf_ext

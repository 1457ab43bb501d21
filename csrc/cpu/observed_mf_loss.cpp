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
// Determinism: tiles, units and all orders depend on the shapes and the data only, so results
// are bitwise the same whatever the thread count. Two paths (bucketing.h):
// - "chunks" (below 2^24 triples): one fused pass in at most 8 chunks, runs of outer blocks cut
//   at fixed fractions of nnz; a chunk owns its outer gradient rows outright and writes the
//   inner gradients into its own partial (chunks × inner × r_pad values), summed in chunk order.
// - "units" (large inputs): two passes over the tiles, each in up to 1024 units of about 2^16
//   (first) / 2^17 (second) triples. The first (runs of whole outer blocks, run_chunk) computes
//   the loss and the outer gradients and, when an inner gradient is asked for, leaves each tile
//   sorted by inner index with each triple's ∂L/∂pred in place of its value; the second (ranges
//   of inner indices, observed_inner_pass.h) sums those into the inner gradients. Each unit
//   owns its gradient rows: no partials. Extra memory over path "chunks": per-segment inner
//   histograms while counting (≤ 8 × inner counters) and, per unit in flight, one inner block
//   of counters.
//
// Indices are checked by the bucketing pass, before anything is read through them; the lowest
// bad position is reported (its row if both are bad).
//
// Tiling, bucketing and chunks: bucketing.h; float32 accuracy over long sums:
// compensated_sums.h; vector helpers: simd.h; the row layout copies: observed_problem.h. This
// file holds the fused pass (run_chunk: its hot loop is kept whole, see its comments) and the op.
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
#include "observed_inner_pass.h"
#include "observed_problem.h"
#include "simd.h"

namespace mf_ext {
namespace {

using simd::dot_row;
using simd::flush_run;
using simd::RowVectors;
using simd::Vec;

// Path "units": rewrites the tile starting at bucket position s in place, sorted by inner index
// (stable: outer index order within each), as keys and each triple's ∂L/∂pred in place of its
// value. run_end, run_b, run_g: the tile sorted by outer index (runs of a_count outer indices).
template <typename T>
MF_EXT_INLINE void keep_tile_grad_pred(int64_t s, int64_t count, int64_t a_count,
                                       const int64_t* run_end, const uint32_t* run_b,
                                       const T* run_g, int64_t inner_shift,
                                       std::vector<int64_t>& inner_next, const Bucketed<T>& bk) {
  uint32_t* const keys = bk.keys.get();
  T* const grad_pred = bk.values.get();
  std::fill(inner_next.begin(), inner_next.end(), 0);
  for (int64_t u = 0; u < count; ++u) ++inner_next[run_b[u] + 1];
  for (size_t k = 1; k < inner_next.size(); ++k) inner_next[k] += inner_next[k - 1];
  int64_t u = 0;
  for (int64_t al = 0; al < a_count; ++al) {
    for (; u < run_end[al]; ++u) {
      const int64_t pos = s + inner_next[run_b[u]]++;
      keys[pos] = static_cast<uint32_t>(al << inner_shift) | run_b[u];
      grad_pred[pos] = run_g[u];
    }
  }
}

// One chunk (path "units": a unit of the first pass): zeroes its outer gradient rows and its
// inner partials, then runs its tiles.
// kKeep: pb.keep_grad_pred (a template flag, so that path "chunks" runs the loop without it).
template <typename T, int NV, bool kKeep>
MF_EXT_INLINE double run_chunk(const ObservedProblem<T>& pb, const Bucketed<T>& bk,
                               int64_t chunk) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  const int64_t r_pad = NV > 0 ? NV * W : pb.r_pad;
  const int64_t nv = r_pad / W;
  const Side<T>& A = pb.outer;
  const Side<T>& B = pb.inner;
  const int64_t a_begin = pb.chunk_bounds[chunk], a_end = pb.chunk_bounds[chunk + 1];
  const int64_t block0 = a_begin >> bk.outer_shift;
  const int64_t block1 = a_end > a_begin ? ((a_end - 1) >> bk.outer_shift) + 1 : block0;
  T* dA = A.grad;
  T* dbA = A.grad_bias;
  T* dB = B.grad ? B.grad + chunk * B.size * r_pad : nullptr;
  T* dbB = B.grad_bias ? B.grad_bias + chunk * B.size : nullptr;
  if (dA) std::fill(dA + a_begin * r_pad, dA + a_end * r_pad, T(0));
  if (dbA) std::fill(dbA + a_begin, dbA + a_end, T(0));
  if (dB) std::fill(dB, dB + B.size * r_pad, T(0));
  // The inner bias gradient takes one term per triple of the chunk: summed in double, then
  // stored, so float32 keeps its accuracy however many triples share an inner index.
  std::vector<double> dbB_sum(dbB ? B.size : 0, 0.0);
  // Counting costs the hot loop 5-25%, so it is on only where the chunk's triples average at
  // least kRunFlush per inner index (tiny or very dense inner sides: thousands of terms per row).
  // Rating data averages ~35 (MovieLens): its popular rows keep float chains of a few hundred.
  const int64_t chunk_triples = bk.tile_begin[block1 * bk.inner_blocks] -
                                bk.tile_begin[block0 * bk.inner_blocks];
  const bool count_inner_terms = dB && chunk_triples >= kRunFlush * B.size;
  InnerRowFlusher<T> dB_wide(count_inner_terms ? B.size : 0, r_pad, chunk_triples);

  const int64_t ib = bk.inner_blocks, inner_shift = bk.inner_shift;
  const uint32_t inner_mask = (uint32_t(1) << inner_shift) - 1;
  int64_t max_tile = 0;
  for (int64_t tile = block0 * ib; tile < block1 * ib; ++tile) {
    max_tile = std::max(max_tile, bk.tile_begin[tile + 1] - bk.tile_begin[tile]);
  }
  const uint32_t* keys = bk.keys.get();
  const T* values = bk.values.get();
  const T* weights = bk.weights.get();
  const int64_t* positions = bk.positions.get();
  std::unique_ptr<uint32_t[]> run_b(new uint32_t[max_tile]);
  std::unique_ptr<T[]> run_v(new T[max_tile]);
  std::unique_ptr<T[]> run_w(weights ? new T[max_tile] : nullptr);
  std::unique_ptr<int64_t[]> run_pos(positions ? new int64_t[max_tile] : nullptr);
  // Path "units" with inner gradients asked for: each tile is rewritten in place, sorted by
  // inner index (stable), its values replaced by each triple's ∂L/∂pred, for the second pass.
  std::vector<int64_t> inner_next(kKeep ? (int64_t(1) << inner_shift) + 1 : 0);
  const int64_t block_size = int64_t(1) << bk.outer_shift;
  std::vector<int64_t> run_end(block_size + 1);
  RowVectors<V, NV> p_vec(nv), acc_vec(nv);
  // float32 runs longer than kRunFlush add their register sums into this double row.
  constexpr bool kWideRuns = std::is_same_v<T, float>;
  std::vector<double> run_wide(kWideRuns ? r_pad : 0, 0.0);
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
  for (int64_t block = block0; block < block1; ++block) {
    const int64_t a0 = block << bk.outer_shift;
    const int64_t a_count = std::min(block_size, A.size - a0);
    for (int64_t bb = 0; bb < ib; ++bb) {
      const int64_t tile = block * ib + bb;
      const int64_t s = bk.tile_begin[tile], e = bk.tile_begin[tile + 1];
      if (s == e) continue;
      const int64_t b0 = bb << inner_shift;
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
      double* const dbB_sum_t = dbB ? dbB_sum.data() + b0 : nullptr;
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
          if constexpr (kKeep) run_v[u] = g;  // its value is read: the slot is free
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
      if constexpr (kKeep) keep_tile_grad_pred(s, count, a_count, run_end.data(), run_b.get(),
                                              run_v.get(), inner_shift, inner_next, bk);
    }
  }
  for (int64_t b = 0; b < static_cast<int64_t>(dbB_sum.size()); ++b) {
    dbB[b] = static_cast<T>(dbB_sum[b]);
  }
  dB_wide.finish(dB);
  return loss;
}

template <typename T, bool kKeep>
MF_EXT_INLINE void run_chunks(const ObservedProblem<T>& pb, const Bucketed<T>& bk, int64_t begin,
                              int64_t end, double* losses) {
  constexpr int W = Vec<T>::width;
  for (int64_t c = begin; c < end; ++c) {
    switch (pb.r_pad / W) {  // whole rows in registers up to 8 vectors (r ≤ 128 float, 64 double)
      case 1: losses[c] = run_chunk<T, 1, kKeep>(pb, bk, c); break;
      case 2: losses[c] = run_chunk<T, 2, kKeep>(pb, bk, c); break;
      case 3: losses[c] = run_chunk<T, 3, kKeep>(pb, bk, c); break;
      case 4: losses[c] = run_chunk<T, 4, kKeep>(pb, bk, c); break;
      case 5: losses[c] = run_chunk<T, 5, kKeep>(pb, bk, c); break;
      case 6: losses[c] = run_chunk<T, 6, kKeep>(pb, bk, c); break;
      case 7: losses[c] = run_chunk<T, 7, kKeep>(pb, bk, c); break;
      case 8: losses[c] = run_chunk<T, 8, kKeep>(pb, bk, c); break;
      default: losses[c] = run_chunk<T, 0, kKeep>(pb, bk, c); break;
    }
  }
}

// Non-template entry points, so that each can be cloned per instruction set; one per kKeep,
// each holding one set of the unrolled kernels.
#define MF_EXT_RUN_CHUNKS(name, T, kKeep)                                                  \
  MF_EXT_TARGET_CLONES void name(const ObservedProblem<T>& pb, const Bucketed<T>& bk,    \
                                 int64_t begin, int64_t end, double* losses) {          \
    run_chunks<T, kKeep>(pb, bk, begin, end, losses);                                    \
  }
MF_EXT_RUN_CHUNKS(run_chunks_float, float, false)
MF_EXT_RUN_CHUNKS(run_chunks_double, double, false)
MF_EXT_RUN_CHUNKS(run_chunks_keep_float, float, true)
MF_EXT_RUN_CHUNKS(run_chunks_keep_double, double, true)
#undef MF_EXT_RUN_CHUNKS
inline void run_chunks_any(const ObservedProblem<float>& pb, const Bucketed<float>& bk,
                           int64_t b, int64_t e, double* losses) {
  if (pb.keep_grad_pred) return run_chunks_keep_float(pb, bk, b, e, losses);
  run_chunks_float(pb, bk, b, e, losses);
}
inline void run_chunks_any(const ObservedProblem<double>& pb, const Bucketed<double>& bk,
                           int64_t b, int64_t e, double* losses) {
  if (pb.keep_grad_pred) return run_chunks_keep_double(pb, bk, b, e, losses);
  run_chunks_double(pb, bk, b, e, losses);
}

// The padded rank and the tiling of a problem of nnz triples, P (r, m), Q (r, n) of type T.
template <typename T>
Tiling plan_observed_tiling(int64_t nnz, int64_t r, int64_t m, int64_t n, int64_t& r_pad) {
  constexpr int64_t W = Vec<T>::width;
  r_pad = (r + W - 1) / W * W;
  return plan_tiling(nnz, m, n, r_pad * static_cast<int64_t>(sizeof(T)));
}

[[noreturn]] void raise_bad_index(const BadIndex& bad, int64_t m, int64_t n) {
  if (bad.is_col) observed_index_error("cols", bad.position, bad.value, n, "n, the columns of Q");
  observed_index_error("rows", bad.position, bad.value, m, "m, the columns of P");
}


// Runs the pass(es); fills the defined gradients of `out` (contiguous). Returns the loss.
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
  int64_t r_pad = 0;
  Bucketed<T> bk;
  static_cast<Tiling&>(bk) = plan_observed_tiling<T>(nnz, r, m, n, r_pad);
  const bool rows_outer = bk.rows_outer, units = bk.units;
  const int64_t na = bk.outer_size, nb = bk.inner_size;
  const bool keep_positions = out.grad_values.defined() || out.grad_weights.defined();
  const BadIndex bad = bucket_triples<T>(rows, cols, values, weights, m, n, keep_positions, bk);
  if (bad.position >= 0) raise_bad_index(bad, m, n);
  ObservedProblem<T> pb{};
  pb.nnz = nnz;
  pb.r_pad = r_pad;
  if (units) {
    pb.chunk_bounds = plan_outer_units(nnz, bk, bk.tile_begin);
    pb.inner_bounds = plan_ranges(bk.inner_hist, unit_count(nnz, kInnerUnitTriples));
  } else {
    pb.chunk_bounds = plan_chunks(nnz, bk, bk.tile_begin);
  }
  const int64_t chunks = static_cast<int64_t>(pb.chunk_bounds.size()) - 1;
  const at::Tensor P_rows = padded_rows<T>(P, r_pad);
  const at::Tensor Q_rows = padded_rows<T>(Q, r_pad);
  const at::Tensor& A_rows = rows_outer ? P_rows : Q_rows;
  const at::Tensor& B_rows = rows_outer ? Q_rows : P_rows;
  const std::optional<at::Tensor>& A_bias = rows_outer ? row_bias : col_bias;
  const std::optional<at::Tensor>& B_bias = rows_outer ? col_bias : row_bias;
  const at::Tensor& A_grad_out = rows_outer ? out.grad_P : out.grad_Q;
  const at::Tensor& B_grad_out = rows_outer ? out.grad_Q : out.grad_P;
  const at::Tensor& A_grad_bias_out = rows_outer ? out.grad_row_bias : out.grad_col_bias;
  const at::Tensor& B_grad_bias_out = rows_outer ? out.grad_col_bias : out.grad_row_bias;

  pb.outer = Side<T>{na, A_rows.const_data_ptr<T>(), nullptr, 0, nullptr, nullptr};
  pb.inner = Side<T>{nb, B_rows.const_data_ptr<T>(), nullptr, 0, nullptr, nullptr};
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

  // Zeroed by their chunks or units. Path "units": the inner gradient rows have one writer each
  // (the second pass), and the first pass leaves them alone.
  at::Tensor dA_rows, dB_parts, dbB_parts;
  const int64_t parts = units ? 1 : chunks;
  if (A_grad_out.defined() && r > 0) {
    dA_rows = at::empty({na, r_pad}, P.options());
    pb.outer.grad = dA_rows.mutable_data_ptr<T>();
  }
  Side<T> inner_grads = pb.inner;
  if (B_grad_out.defined() && r > 0) {
    dB_parts = at::empty({parts, nb, r_pad}, P.options());
    inner_grads.grad = dB_parts.mutable_data_ptr<T>();
  }
  // The outer bias gradient has one writer per entry: straight into the output; so has the
  // inner one on path "units".
  if (A_grad_bias_out.defined()) pb.outer.grad_bias = A_grad_bias_out.mutable_data_ptr<T>();
  if (B_grad_bias_out.defined()) {
    if (units) {
      inner_grads.grad_bias = B_grad_bias_out.mutable_data_ptr<T>();
    } else {
      dbB_parts = at::empty({chunks, nb}, values.options());
      inner_grads.grad_bias = dbB_parts.mutable_data_ptr<T>();
    }
  }
  // Path "units": the first pass leaves the inner gradients to the second.
  pb.keep_grad_pred = units && (inner_grads.grad || inner_grads.grad_bias);
  if (!pb.keep_grad_pred) pb.inner = inner_grads;

  std::vector<double> losses(chunks);
  if (units) {
    run_units_any_order(chunks,
                        [&](int64_t c) { run_chunks_any(pb, bk, c, c + 1, losses.data()); });
    if (pb.keep_grad_pred) {
      pb.inner = inner_grads;
      run_units_any_order(static_cast<int64_t>(pb.inner_bounds.size()) - 1,
                          [&](int64_t u) { run_inner_unit_any(pb, bk, u); });
    }
  } else {
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      run_chunks_any(pb, bk, begin, end, losses.data());
    });
  }

  double loss = 0;
  for (const double l : losses) loss += l;
  if (pb.outer.grad) {
    reduce_rows_transposed<T>(pb.outer.grad, 1, na, r, r_pad, A_grad_out.mutable_data_ptr<T>());
  } else if (A_grad_out.defined()) {
    A_grad_out.zero_();  // r == 0
  }
  if (pb.inner.grad) {
    reduce_rows_transposed<T>(pb.inner.grad, parts, nb, r, r_pad,
                              B_grad_out.mutable_data_ptr<T>());
  } else if (B_grad_out.defined()) {
    B_grad_out.zero_();
  }
  if (dbB_parts.defined()) {
    reduce_vectors<T>(pb.inner.grad_bias, chunks, nb, B_grad_bias_out.mutable_data_ptr<T>());
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
// [rows_outer, outer block size, inner block size, outer_blocks, inner_blocks, path (0 chunks,
//  1 units), segments, chunks (path "units": units of the first pass), inner units (of the
//  second pass; 0 on path "chunks"), the triples of each segment..., of each chunk..., of each
//  inner unit...]; no segments or units when there are no triples (the kernel does no pass
// then). Out-of-range indices raise as the op does.
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
  std::vector<int64_t> out;
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "observed_partition_cpu", [&] {
    int64_t r_pad = 0;
    const Tiling tl = plan_observed_tiling<scalar_t>(nnz, r, m, n, r_pad);
    std::vector<int64_t> segment_triples, chunk_triples, inner_triples;
    if (nnz > 0) {
      std::vector<int64_t> offsets, tile_begin, inner_hist;
      const BadIndex bad = count_triples<scalar_t>(rows, cols, m, n, tl, offsets, tile_begin,
                                                   inner_hist);
      if (bad.position >= 0) raise_bad_index(bad, m, n);
      const int64_t segments = segment_count(nnz);
      for (int64_t s = 0; s < segments; ++s) {
        segment_triples.push_back(segment_begin(nnz, segments, s + 1) -
                                  segment_begin(nnz, segments, s));
      }
      const std::vector<int64_t> bounds =
          tl.units ? plan_outer_units(nnz, tl, tile_begin) : plan_chunks(nnz, tl, tile_begin);
      auto first_tile = [&](int64_t a) {  // chunks end at block starts, or at the end
        return a == tl.outer_size ? tl.tiles() : (a >> tl.outer_shift) * tl.inner_blocks;
      };
      for (size_t c = 0; c + 1 < bounds.size(); ++c) {
        chunk_triples.push_back(tile_begin[first_tile(bounds[c + 1])] -
                                tile_begin[first_tile(bounds[c])]);
      }
      if (tl.units) {
        const std::vector<int64_t> inner =
            plan_ranges(inner_hist, unit_count(nnz, kInnerUnitTriples));
        for (size_t u = 0; u + 1 < inner.size(); ++u) {
          inner_triples.push_back(std::accumulate(inner_hist.begin() + inner[u],
                                                  inner_hist.begin() + inner[u + 1], int64_t(0)));
        }
      }
    }
    out = {tl.rows_outer, int64_t(1) << tl.outer_shift, int64_t(1) << tl.inner_shift,
           tl.outer_blocks, tl.inner_blocks, tl.units,
           static_cast<int64_t>(segment_triples.size()),
           static_cast<int64_t>(chunk_triples.size()),
           static_cast<int64_t>(inner_triples.size())};
    for (const auto* list : {&segment_triples, &chunk_triples, &inner_triples}) {
      out.insert(out.end(), list->begin(), list->end());
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

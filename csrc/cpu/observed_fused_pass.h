// The fused pass of the observed CPU kernel (observed_mf_loss.cpp): run_chunk, one chunk of
// path "chunks" or one unit of the first pass of path "units". Its hot loop is kept whole (see
// its comments). Compiled in observed_fused_pass_float.cpp and observed_fused_pass_double.cpp,
// one unit per dtype (observed_kernels.h says why).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "bucketing.h"
#include "compensated_sums.h"
#include "observed_kernels.h"
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

}  // namespace

// The entry points of observed_kernels.h, one per kKeep, each holding one set of the unrolled
// kernels, cloned per instruction set.
#define MF_EXT_RUN_CHUNKS(name, T, kKeep)                                                  \
  MF_EXT_TARGET_CLONES void name(const ObservedProblem<T>& pb, const Bucketed<T>& bk,    \
                                 int64_t begin, int64_t end, double* losses) {          \
    run_chunks<T, kKeep>(pb, bk, begin, end, losses);                                    \
  }

}  // namespace mf_ext

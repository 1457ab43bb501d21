// The second pass of the observed CPU kernel on path "units" (bucketing.h): the inner gradients,
// from each triple's ∂L/∂pred g, which the first pass left in each tile, the tile sorted by
// inner index (stable) with g in place of its value.
//
// Unit u owns the inner indices [inner_bounds[u], inner_bounds[u + 1]) outright: their gradient
// rows and bias entries have no other writer, so no unit needs a partial. For each inner block
// its range overlaps, it goes down that block's column of tiles (outer blocks in order), finds
// its indices' triples in each tile (two binary searches) and sums each index's run Σ g·p_a in
// registers (p_a: rows of the outer factor, in L2 with their tile), added into the inner
// gradient row once per tile (float32: through a double row every kRunFlush triples, as the
// first pass does for outer rows). Inner bias sums are kept in double and rounded once.
// Every order depends on the shapes and the data only.
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

// The p rows here come from anywhere in the outer side (an outer block per tile, little reuse):
// fetched further ahead than in the first pass, where they mostly sit in L2 already.
constexpr int64_t kInnerPrefetchAhead = 12;

template <typename T, int NV>
MF_EXT_INLINE void run_inner_unit(const ObservedProblem<T>& pb, const Bucketed<T>& bk,
                                  int64_t unit) {
  using V = typename simd::Vec<T>::type;
  constexpr int W = simd::Vec<T>::width;
  const int64_t r_pad = NV > 0 ? NV * W : pb.r_pad;
  const int64_t nv = r_pad / W;
  const int64_t b_lo = pb.inner_bounds[unit], b_hi = pb.inner_bounds[unit + 1];
  if (b_lo == b_hi) return;
  T* const dB = pb.inner.grad;
  T* const dbB = pb.inner.grad_bias;
  if (dB) std::fill(dB + b_lo * r_pad, dB + b_hi * r_pad, T(0));
  std::vector<double> dbB_sum(dbB ? b_hi - b_lo : 0, 0.0);

  const int64_t ib = bk.inner_blocks, ob = bk.outer_blocks;
  const int64_t inner_shift = bk.inner_shift, outer_shift = bk.outer_shift;
  const uint32_t inner_mask = (uint32_t(1) << inner_shift) - 1;
  simd::RowVectors<V, NV> acc_vec(nv);
  V* const acc = acc_vec.data();
  constexpr bool kWideRuns = std::is_same_v<T, float>;
  std::vector<double> run_wide(kWideRuns ? r_pad : 0, 0.0);
  const uint32_t* const keys = bk.keys.get();
  const T* const grad_pred = bk.values.get();  // rewritten by the first pass
  const int64_t row_bytes = r_pad * static_cast<int64_t>(sizeof(T));
  // The first position in [s, e) whose inner index is ≥ local (the tile is sorted by it).
  auto seek = [&](int64_t s, int64_t e, uint32_t local) {
    return std::partition_point(keys + s, keys + e,
                                [&](uint32_t key) { return (key & inner_mask) < local; }) - keys;
  };

  for (int64_t bb = b_lo >> inner_shift; bb <= (b_hi - 1) >> inner_shift; ++bb) {
    const int64_t b0 = bb << inner_shift;
    const uint32_t lo = static_cast<uint32_t>(std::max<int64_t>(b_lo - b0, 0));
    const uint32_t hi = static_cast<uint32_t>(std::min<int64_t>(b_hi - b0, inner_mask + 1));
    for (int64_t o = 0; o < ob; ++o) {
      const int64_t tile = o * ib + bb;
      const int64_t s = bk.tile_begin[tile], e = bk.tile_begin[tile + 1];
      if (s == e) continue;
      const int64_t t0 = lo == 0 ? s : seek(s, e, lo);
      const int64_t t1 = hi == inner_mask + 1 ? e : seek(t0, e, hi);
      const T* const Af = pb.outer.factor + (o << outer_shift) * r_pad;
      for (int64_t t = t0; t < t1;) {
        const uint32_t bl = keys[t] & inner_mask;
        const int64_t b = b0 + bl;
#pragma GCC unroll 8
        for (int64_t v = 0; v < nv; ++v) acc[v] = simd::broadcast<T>(0);
        double g_sum = 0;
        int64_t since_flush = 0;
        bool wide_used = false;
        for (; t < t1 && (keys[t] & inner_mask) == bl; ++t) {
          const T g = grad_pred[t];
          g_sum += static_cast<double>(g);
          if (!dB) continue;
          if (t + kInnerPrefetchAhead < t1) {
            const char* ahead = reinterpret_cast<const char*>(
                Af + (keys[t + kInnerPrefetchAhead] >> inner_shift) * r_pad);
            for (int64_t byte = 0; byte < row_bytes; byte += 64) {
              __builtin_prefetch(ahead + byte, 0, 3);
            }
          }
          const T* p = Af + (keys[t] >> inner_shift) * r_pad;
          const V gv = simd::broadcast(g);
#pragma GCC unroll 8
          for (int64_t v = 0; v < nv; ++v) acc[v] += gv * simd::load(p + v * W);
          if (++since_flush == kRunFlush) {
            if constexpr (kWideRuns) {
              flush_run_wide(run_wide.data(), acc, nv);
              wide_used = true;
            } else {
              simd::flush_run(dB + b * r_pad, acc, nv);
            }
            since_flush = 0;
          }
        }
        if (dB) {
          if constexpr (kWideRuns) {
            if (wide_used) finish_run_wide(dB + b * r_pad, run_wide.data(), acc, nv);
          }
          if (!wide_used) simd::flush_run(dB + b * r_pad, acc, nv);
        }
        if (dbB) dbB_sum[b - b_lo] += g_sum;
      }
    }
  }
  for (int64_t i = 0; i < static_cast<int64_t>(dbB_sum.size()); ++i) {
    dbB[b_lo + i] = static_cast<T>(dbB_sum[i]);
  }
}

template <typename T>
MF_EXT_INLINE void run_inner_unit_nv(const ObservedProblem<T>& pb, const Bucketed<T>& bk,
                                     int64_t unit) {
  switch (pb.r_pad / simd::Vec<T>::width) {  // rows in registers up to 8 vectors
    case 1: return run_inner_unit<T, 1>(pb, bk, unit);
    case 2: return run_inner_unit<T, 2>(pb, bk, unit);
    case 3: return run_inner_unit<T, 3>(pb, bk, unit);
    case 4: return run_inner_unit<T, 4>(pb, bk, unit);
    case 5: return run_inner_unit<T, 5>(pb, bk, unit);
    case 6: return run_inner_unit<T, 6>(pb, bk, unit);
    case 7: return run_inner_unit<T, 7>(pb, bk, unit);
    case 8: return run_inner_unit<T, 8>(pb, bk, unit);
    default: return run_inner_unit<T, 0>(pb, bk, unit);
  }
}

}  // namespace
}  // namespace mf_ext

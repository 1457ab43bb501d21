// Compensated float32 sums of the observed CPU kernel: float32 gradient sums that would take
// thousands of terms (a popular row or column) are added, every kRunFlush terms, into double
// sums and rounded to float32 once at the end, so their error grows with kRunFlush +
// terms/kRunFlush rather than with the terms. (float64 needs none of it.)
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace mf_ext {
namespace {

using simd::Vec;

// Terms a register sum (a run's gradient, or an inner gradient row) takes before it leaves for
// memory (float32: for a double sum).
constexpr int64_t kRunFlush = 64;

// The two halves of a float vector, widened to double vectors (in registers: indexing lanes
// would send the run's accumulators through memory for the whole loop).
MF_EXT_INLINE void widen(Vec<float>::type v, Vec<double>::type& lo, Vec<double>::type& hi) {
  typedef float f8 __attribute__((vector_size(32)));
  const f8 l = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const f8 h = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  lo = __builtin_convertvector(l, Vec<double>::type);
  hi = __builtin_convertvector(h, Vec<double>::type);
}

// wide += acc (nv float vectors, summed in double), then acc = 0: a float32 run that has
// passed kRunFlush triples.
MF_EXT_INLINE void flush_run_wide(double* wide, Vec<float>::type* acc, int64_t nv) {
  for (int64_t v = 0; v < nv; ++v) {
    Vec<double>::type lo, hi;
    widen(acc[v], lo, hi);
    simd::store(wide + 16 * v, simd::load(wide + 16 * v) + lo);
    simd::store(wide + 16 * v + 8, simd::load(wide + 16 * v + 8) + hi);
    acc[v] = simd::broadcast<float>(0);
  }
}

// dp += wide + acc, rounded once; then wide = 0 and acc = 0: the end of such a run.
MF_EXT_INLINE void finish_run_wide(float* dp, double* wide, Vec<float>::type* acc,
                                   int64_t nv) {
  const Vec<double>::type zero = simd::broadcast<double>(0);
  for (int64_t v = 0; v < nv; ++v) {
    Vec<double>::type lo, hi, dlo, dhi;
    widen(acc[v], lo, hi);
    widen(simd::load(dp + 16 * v), dlo, dhi);
    lo += dlo + simd::load(wide + 16 * v);
    hi += dhi + simd::load(wide + 16 * v + 8);
    typedef float f8 __attribute__((vector_size(32)));
    const f8 l = __builtin_convertvector(lo, f8), h = __builtin_convertvector(hi, f8);
    simd::store(dp + 16 * v, __builtin_shufflevector(l, h, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                                     12, 13, 14, 15));
    simd::store(wide + 16 * v, zero);
    simd::store(wide + 16 * v + 8, zero);
    acc[v] = simd::broadcast<float>(0);
  }
}

// A chunk's inner gradient row takes one term per triple of that inner index, and one index
// can hold most of the triples (m = 1, say). For float32, a row that reaches kRunFlush terms is
// added into a double copy and zeroed, so its error grows with kRunFlush + terms/kRunFlush
// rather than with its terms; finish() writes the double sums back. Double rows exist only for
// such hot indices (at most triples/kRunFlush of them, so allocated up front: the hot loop makes
// no calls, which would cost it its registers). For float64, or size 0, it does nothing.
template <typename T>
class InnerRowFlusher {
 public:
  InnerRowFlusher(int64_t size, int64_t r_pad, int64_t triples)
      : r_pad_(r_pad), terms_(kWide ? size : 0, 0), slot_(kWide ? size : 0, -1) {
    if (kWide && size > 0) wide_.reset(new double[(triples / kRunFlush + 1) * r_pad]);
  }

  // Term counters of the rows from `first` on, or nullptr when there is nothing to count.
  MF_EXT_INLINE uint8_t* terms(int64_t first) {
    return terms_.empty() ? nullptr : terms_.data() + first;
  }

  // wide[b] += row, row = 0, counter = 0 (row: the chunk's gradient row b, r_pad entries).
  MF_EXT_INLINE void flush(int64_t b, T* row) {
    if (slot_[b] < 0) {
      slot_[b] = hot_++;
      std::fill(wide_.get() + slot_[b] * r_pad_, wide_.get() + (slot_[b] + 1) * r_pad_, 0.0);
    }
    double* w = wide_.get() + slot_[b] * r_pad_;
    for (int64_t k = 0; k < r_pad_; ++k) {
      w[k] += static_cast<double>(row[k]);
      row[k] = T(0);
    }
    terms_[b] = 0;
  }

  // grad (size, r_pad): each hot row becomes its double sum plus what is left in it.
  void finish(T* grad) {
    for (int64_t b = 0; b < static_cast<int64_t>(slot_.size()); ++b) {
      if (slot_[b] < 0) continue;
      const double* w = wide_.get() + slot_[b] * r_pad_;
      T* row = grad + b * r_pad_;
      for (int64_t k = 0; k < r_pad_; ++k) {
        row[k] = static_cast<T>(w[k] + static_cast<double>(row[k]));
      }
    }
  }

 private:
  static constexpr bool kWide = std::is_same_v<T, float>;
  int64_t r_pad_;
  std::vector<uint8_t> terms_;  // since the last flush (≤ 64; 16-bit counters cost the loop 30%)
  std::vector<int64_t> slot_;          // row b's double row in wide_, −1: none yet
  std::unique_ptr<double[]> wide_;     // (triples / kRunFlush + 1, r_pad), rows taken in order
  int64_t hot_ = 0;
};

}  // namespace
}  // namespace mf_ext

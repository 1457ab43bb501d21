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
// Determinism: tiles, chunks and all orders depend on the shapes and the data only. A chunk is a
// run of outer blocks, cut at fixed fractions of nnz; it owns those outer gradient rows outright
// and writes the inner gradients into its own partial (O(r·inner)), summed in chunk order at the
// end. Results are therefore bitwise the same whatever the thread count.
//
// Indices are checked by the bucketing pass, before anything is read through them; the lowest
// bad position is reported (its row if both are bad).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "../observed_mf_loss_checks.h"
#include "simd.h"

namespace mf_ext {
namespace {

using simd::Vec;

// The bucketing pass is cut into at most kMaxSegments segments of at least kMinSegmentTriples.
constexpr int64_t kMaxSegments = 8;
constexpr int64_t kMinSegmentTriples = 1 << 16;
// Chunks (units of parallel work over outer blocks), at most kMaxChunks; a chunk gets at least
// kMinChunkTriples triples and at least 8 per inner index, so that zeroing and summing its
// inner partial (r per inner index) stays small next to its own work (r per triple).
constexpr int64_t kMaxChunks = 8;
constexpr int64_t kMinChunkTriples = 1 << 15;
constexpr int64_t kTriplesPerInner = 8;
// Bytes of factor rows + gradient rows a block covers (both blocks of a tile fit in L2 at once).
constexpr int64_t kOuterBlockBytes = int64_t(1) << 18;
constexpr int64_t kInnerBlockBytes = int64_t(1) << 18;
// Tiles are capped at max(outer blocks, nnz / kMinTileTriples) (huge, very sparse shapes).
constexpr int64_t kMinTileTriples = 64;

MF_EXT_INLINE int64_t load_index(const void* base, bool is_64, int64_t offset) {
  return is_64 ? static_cast<const int64_t*>(base)[offset]
               : static_cast<int64_t>(static_cast<const int32_t*>(base)[offset]);
}

// One side of the problem: the rows (P, row_bias) or the cols (Q, col_bias).
template <typename T>
struct Side {
  int64_t size;        // m or n
  const T* factor;     // (size, r_pad)
  const T* bias;       // nullptr: none
  int64_t bias_s;
  T* grad;             // outer: (size, r_pad); inner: (chunks, size, r_pad); or nullptr
  T* grad_bias;        // outer: (size,); inner: (chunks, size); or nullptr
};

// The triples bucketed by tile, then by outer index inside each tile's processing.
template <typename T>
struct Bucketed {
  int64_t outer_shift, inner_shift, outer_blocks, inner_blocks;
  std::vector<int64_t> tile_begin;  // (tiles + 1,)
  // Per triple, in tile order: (outer − block start) << inner_shift | (inner − block start).
  std::unique_ptr<uint32_t[]> keys;
  std::unique_ptr<T[]> values, weights;   // weights null: all 1
  std::unique_ptr<int64_t[]> positions;   // original t, only for grad_values / grad_weights
};

template <typename T>
struct ObservedProblem {
  int64_t nnz, r_pad;
  Side<T> outer, inner;
  T scale;          // 1, or 1/nnz for "mean"
  T* grad_values;   // (nnz,) or nullptr
  T* grad_weights;  // (nnz,) or nullptr
  std::vector<int64_t> chunk_blocks;  // chunk c: outer blocks [chunk_blocks[c], [c + 1])
};

struct BadIndex {
  int64_t position = -1;  // first triple with an out-of-range index, -1 if none
  int64_t value = 0;
  bool is_col = false;
};

// Sum of the lanes as a fixed pairwise tree (lane l + lane l + W/2, and so on down), kept in
// registers: the per-triple dot product sits on the critical path, and simd::sum_lanes (W
// dependent adds) or a tree through memory costs several times more. The order depends on
// nothing but W.
MF_EXT_INLINE float sum_lanes_tree(Vec<float>::type v) {
  typedef float f8 __attribute__((vector_size(32)));
  typedef float f4 __attribute__((vector_size(16)));
  typedef float f2 __attribute__((vector_size(8)));
  const f8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  const f2 c = __builtin_shufflevector(b, b, 0, 1) + __builtin_shufflevector(b, b, 2, 3);
  return c[0] + c[1];
}

MF_EXT_INLINE double sum_lanes_tree(Vec<double>::type v) {
  typedef double d4 __attribute__((vector_size(32)));
  typedef double d2 __attribute__((vector_size(16)));
  const d4 a = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  const d2 b = __builtin_shufflevector(a, a, 0, 1) + __builtin_shufflevector(a, a, 2, 3);
  return b[0] + b[1];
}

// Counts (kScatter false) or scatters (true) the triples [t0, t1) by tile. Counting also checks
// the indices: it stops at the first bad one and returns it. `next`: the segment's counters, or
// its write positions.
template <bool kScatter, typename T, typename IR, typename IC>
BadIndex bucket_segment(const IR* rows, int64_t rows_s, const IC* cols, int64_t cols_s,
                        const T* values, int64_t values_s, const T* weights, int64_t weights_s,
                        int64_t t0, int64_t t1, int64_t m, int64_t n, bool rows_outer,
                        int64_t outer_shift, int64_t inner_shift, int64_t inner_blocks,
                        int64_t* next, uint32_t* keys, T* sorted_values, T* sorted_weights,
                        int64_t* positions) {
  const uint64_t outer_mask = (uint64_t(1) << outer_shift) - 1;
  const uint64_t inner_mask = (uint64_t(1) << inner_shift) - 1;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t i = static_cast<int64_t>(rows[t * rows_s]);
    const int64_t j = static_cast<int64_t>(cols[t * cols_s]);
    if (!kScatter) {
      const bool row_bad = static_cast<uint64_t>(i) >= static_cast<uint64_t>(m);
      if (row_bad || static_cast<uint64_t>(j) >= static_cast<uint64_t>(n)) {
        return BadIndex{t, row_bad ? i : j, !row_bad};
      }
    }
    const uint64_t a = rows_outer ? i : j, b = rows_outer ? j : i;
    const int64_t tile = static_cast<int64_t>((a >> outer_shift) * inner_blocks + (b >> inner_shift));
    if (!kScatter) {
      ++next[tile];
      continue;
    }
    const int64_t pos = next[tile]++;
    keys[pos] = static_cast<uint32_t>(((a & outer_mask) << inner_shift) | (b & inner_mask));
    sorted_values[pos] = values[t * values_s];
    if (sorted_weights) sorted_weights[pos] = weights[t * weights_s];
    if (positions) positions[pos] = t;
  }
  return BadIndex{};
}

template <bool kScatter, typename T>
BadIndex bucket_segment_any(const at::Tensor& rows, const at::Tensor& cols, const T* values,
                            int64_t values_s, const T* weights, int64_t weights_s, int64_t t0,
                            int64_t t1, int64_t m, int64_t n, bool rows_outer,
                            const Bucketed<T>& bk, int64_t* next, uint32_t* keys,
                            T* sorted_values, T* sorted_weights, int64_t* positions) {
  auto go = [&](auto* rows_p, auto* cols_p) {
    return bucket_segment<kScatter>(rows_p, rows.stride(0), cols_p, cols.stride(0), values,
                                    values_s, weights, weights_s, t0, t1, m, n, rows_outer,
                                    bk.outer_shift, bk.inner_shift, bk.inner_blocks, next, keys,
                                    sorted_values, sorted_weights, positions);
  };
  const bool r64 = rows.scalar_type() == at::kLong, c64 = cols.scalar_type() == at::kLong;
  if (r64 && c64) return go(rows.const_data_ptr<int64_t>(), cols.const_data_ptr<int64_t>());
  if (r64) return go(rows.const_data_ptr<int64_t>(), cols.const_data_ptr<int32_t>());
  if (c64) return go(rows.const_data_ptr<int32_t>(), cols.const_data_ptr<int64_t>());
  return go(rows.const_data_ptr<int32_t>(), cols.const_data_ptr<int32_t>());
}

// Sorts the triples into bk by tile (stable: each tile keeps the triples' order) and checks the
// indices on the way. Segments of the triples are counted and scattered in parallel; the offsets
// are laid out tile-major, segment-minor, so the result is the same whatever the thread count.
template <typename T>
BadIndex bucket_triples(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& values,
                        const std::optional<at::Tensor>& weights, int64_t m, int64_t n,
                        bool rows_outer, bool keep_positions, Bucketed<T>& bk) {
  const int64_t nnz = values.size(0);
  const T* values_p = values.const_data_ptr<T>();
  const int64_t values_s = values.stride(0);
  const T* weights_p = weights.has_value() ? weights->const_data_ptr<T>() : nullptr;
  const int64_t weights_s = weights.has_value() ? weights->stride(0) : 0;

  const int64_t segments = std::clamp<int64_t>(nnz / kMinSegmentTriples, 1, kMaxSegments);
  const int64_t tiles = bk.outer_blocks * bk.inner_blocks;
  std::vector<int64_t> offsets(segments * tiles, 0);  // counts, then write positions
  std::vector<BadIndex> bad(segments);
  at::parallel_for(0, segments, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      bad[s] = bucket_segment_any<false, T>(
          rows, cols, values_p, values_s, weights_p, weights_s, nnz * s / segments,
          nnz * (s + 1) / segments, m, n, rows_outer, bk, offsets.data() + s * tiles, nullptr,
          nullptr, nullptr, nullptr);
    }
  });
  for (const BadIndex& b : bad) {
    if (b.position >= 0) return b;  // segments are in triple order: the lowest bad position
  }
  bk.tile_begin.assign(tiles + 1, 0);
  int64_t total = 0;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    bk.tile_begin[tile] = total;
    for (int64_t s = 0; s < segments; ++s) {
      const int64_t count = offsets[s * tiles + tile];
      offsets[s * tiles + tile] = total;
      total += count;
    }
  }
  bk.tile_begin[tiles] = total;
  bk.keys.reset(new uint32_t[nnz]);  // uninitialized: every entry is written below
  bk.values.reset(new T[nnz]);
  if (weights_p) bk.weights.reset(new T[nnz]);
  if (keep_positions) bk.positions.reset(new int64_t[nnz]);
  at::parallel_for(0, segments, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      bucket_segment_any<true, T>(rows, cols, values_p, values_s, weights_p, weights_s,
                                  nnz * s / segments, nnz * (s + 1) / segments, m, n, rows_outer,
                                  bk, offsets.data() + s * tiles, bk.keys.get(), bk.values.get(),
                                  bk.weights.get(), bk.positions.get());
    }
  });
  return BadIndex{};
}

// Vectors of an r-row: in registers when their count NV is a compile-time constant, else on
// the heap (NV == 0). Both are 64-byte aligned by hand: this file is compiled for the base ISA,
// where a 64-byte vector type is only 16-byte aligned (so std::vector<V> gets 16-byte blocks),
// while the AVX2 / AVX-512 clones of the kernel move V with aligned instructions (a misaligned
// heap block crashed float64 at r > 64 and float32 at r > 128).
constexpr size_t kVectorAlign = 64;
template <typename V, int NV>
struct RowVectors {
  alignas(kVectorAlign) V v[NV];
  explicit RowVectors(int64_t) {}
  MF_EXT_INLINE V* data() { return v; }
};
template <typename V>
struct RowVectors<V, 0> {
  struct Free {
    void operator()(V* p) const { std::free(p); }
  };
  std::unique_ptr<V[], Free> v;
  explicit RowVectors(int64_t count) {
    static_assert(sizeof(V) % kVectorAlign == 0, "aligned_alloc needs a multiple of 64 bytes");
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(V);
    v.reset(static_cast<V*>(std::aligned_alloc(kVectorAlign, bytes)));
    TORCH_CHECK(v != nullptr, "mf_ext.observed_mf_loss: out of memory (", bytes, " bytes)");
    std::memset(static_cast<void*>(v.get()), 0, bytes);
  }
  MF_EXT_INLINE V* data() { return v.get(); }
};

// p · q over nv vectors: products summed as a fixed pairwise tree (shorter latency than a
// chain), then across lanes.
template <typename T, int NV>
MF_EXT_INLINE T dot_row(const typename Vec<T>::type* p, const T* q, int64_t nv) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  if constexpr (NV == 0) {
    V even = simd::broadcast<T>(0), odd = simd::broadcast<T>(0);
    int64_t v = 0;
    for (; v + 1 < nv; v += 2) {
      even += p[v] * simd::load(q + v * W);
      odd += p[v + 1] * simd::load(q + (v + 1) * W);
    }
    if (v < nv) even += p[v] * simd::load(q + v * W);
    return sum_lanes_tree(even + odd);
  } else {
    V prod[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) prod[v] = p[v] * simd::load(q + v * W);
#pragma GCC unroll 8
    for (int width = 1; width < NV; width *= 2) {
#pragma GCC unroll 8
      for (int v = 0; v + width < NV; v += 2 * width) prod[v] += prod[v + width];
    }
    return sum_lanes_tree(prod[0]);
  }
}

// The triples of inner block positions kPrefetchAhead on are fetched while this one computes
// (their rows are in L2 by then, most of the time; this brings them to L1).
constexpr int64_t kPrefetchAhead = 4;

// Triples of one run summed in registers before they are added to the run's gradient row.
constexpr int64_t kRunFlush = 64;

// dp += acc (nv vectors), then acc = 0.
template <typename T>
MF_EXT_INLINE void flush_run(T* dp, typename Vec<T>::type* acc, int64_t nv) {
  constexpr int W = Vec<T>::width;
#pragma GCC unroll 8
  for (int64_t v = 0; v < nv; ++v) {
    simd::store(dp + v * W, simd::load(dp + v * W) + acc[v]);
    acc[v] = simd::broadcast<T>(0);
  }
}

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

// One chunk: zeroes its outer gradient rows and its inner partials, then runs its tiles.
template <typename T, int NV>
MF_EXT_INLINE double run_chunk(const ObservedProblem<T>& pb, const Bucketed<T>& bk,
                               int64_t chunk) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  const int64_t r_pad = NV > 0 ? NV * W : pb.r_pad;
  const int64_t nv = r_pad / W;
  const Side<T>& A = pb.outer;
  const Side<T>& B = pb.inner;
  const int64_t block0 = pb.chunk_blocks[chunk], block1 = pb.chunk_blocks[chunk + 1];
  const int64_t a_begin = std::min(block0 << bk.outer_shift, A.size);
  const int64_t a_end = std::min(block1 << bk.outer_shift, A.size);
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
  for (int64_t b = 0; b < static_cast<int64_t>(dbB_sum.size()); ++b) {
    dbB[b] = static_cast<T>(dbB_sum[b]);
  }
  dB_wide.finish(dB);
  return loss;
}

template <typename T>
MF_EXT_INLINE void run_chunks(const ObservedProblem<T>& pb, const Bucketed<T>& bk, int64_t begin,
                              int64_t end, double* losses) {
  constexpr int W = Vec<T>::width;
  for (int64_t c = begin; c < end; ++c) {
    switch (pb.r_pad / W) {  // whole rows in registers up to 8 vectors (r ≤ 128 float, 64 double)
      case 1: losses[c] = run_chunk<T, 1>(pb, bk, c); break;
      case 2: losses[c] = run_chunk<T, 2>(pb, bk, c); break;
      case 3: losses[c] = run_chunk<T, 3>(pb, bk, c); break;
      case 4: losses[c] = run_chunk<T, 4>(pb, bk, c); break;
      case 5: losses[c] = run_chunk<T, 5>(pb, bk, c); break;
      case 6: losses[c] = run_chunk<T, 6>(pb, bk, c); break;
      case 7: losses[c] = run_chunk<T, 7>(pb, bk, c); break;
      case 8: losses[c] = run_chunk<T, 8>(pb, bk, c); break;
      default: losses[c] = run_chunk<T, 0>(pb, bk, c); break;
    }
  }
}

// Non-template entry points, so that each can be cloned per instruction set.
MF_EXT_TARGET_CLONES void run_chunks_float(const ObservedProblem<float>& pb,
                                           const Bucketed<float>& bk, int64_t begin,
                                           int64_t end, double* losses) {
  run_chunks(pb, bk, begin, end, losses);
}
MF_EXT_TARGET_CLONES void run_chunks_double(const ObservedProblem<double>& pb,
                                            const Bucketed<double>& bk, int64_t begin,
                                            int64_t end, double* losses) {
  run_chunks(pb, bk, begin, end, losses);
}
inline void run_chunks_any(const ObservedProblem<float>& pb, const Bucketed<float>& bk,
                           int64_t b, int64_t e, double* losses) {
  run_chunks_float(pb, bk, b, e, losses);
}
inline void run_chunks_any(const ObservedProblem<double>& pb, const Bucketed<double>& bk,
                           int64_t b, int64_t e, double* losses) {
  run_chunks_double(pb, bk, b, e, losses);
}

// out (r, count) = Σ_c parts[c] (count, r_pad)ᵀ, chunks summed in order: back to P's layout.
template <typename T>
void reduce_rows_transposed(const T* parts, int64_t chunks, int64_t count, int64_t r,
                            int64_t r_pad, T* out) {
  at::parallel_for(0, count, 256, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(r_pad);
    for (int64_t i = begin; i < end; ++i) {
      std::copy(parts + i * r_pad, parts + (i + 1) * r_pad, acc.begin());
      for (int64_t c = 1; c < chunks; ++c) {
        const T* part = parts + (c * count + i) * r_pad;
        for (int64_t k = 0; k < r_pad; ++k) acc[k] += part[k];
      }
      for (int64_t k = 0; k < r; ++k) out[k * count + i] = acc[k];
    }
  });
}

// out (count,) = Σ_c parts[c] (count,), chunks summed in order.
template <typename T>
void reduce_vectors(const T* parts, int64_t chunks, int64_t count, T* out) {
  at::parallel_for(0, count, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T s = parts[i];
      for (int64_t c = 1; c < chunks; ++c) s += parts[c * count + i];
      out[i] = s;
    }
  });
}

// Copies X (r, count), any strides, into a zero-padded row layout (count, r_pad).
at::Tensor to_padded_rows(const at::Tensor& X, int64_t r_pad) {
  at::Tensor rows_layout = at::zeros({X.size(1), r_pad}, X.options());
  rows_layout.narrow(1, 0, X.size(0)).copy_(X.t());
  return rows_layout;
}

struct ObservedOutputs {
  at::Tensor grad_values, grad_P, grad_Q, grad_row_bias, grad_col_bias, grad_weights;
};

// Runs the fused pass; fills the defined gradients of `out` (contiguous). Returns the loss.
template <typename T>
double observed_mf_loss_impl(const at::Tensor& rows, const at::Tensor& cols,
                             const at::Tensor& values, const at::Tensor& P, const at::Tensor& Q,
                             const std::optional<at::Tensor>& row_bias,
                             const std::optional<at::Tensor>& col_bias,
                             const std::optional<at::Tensor>& weights, Reduction reduction,
                             const ObservedOutputs& out) {
  constexpr int64_t W = Vec<T>::width;
  const int64_t nnz = values.size(0), r = P.size(0), m = P.size(1), n = Q.size(1);
  if (nnz == 0) {
    for (const at::Tensor* g : {&out.grad_P, &out.grad_Q, &out.grad_row_bias,
                                &out.grad_col_bias}) {
      if (g->defined()) g->zero_();
    }
    return 0.0;
  }
  const int64_t r_pad = (r + W - 1) / W * W;
  // The longer side is the outer one: its gradient has no per-chunk partials.
  const bool rows_outer = m >= n;
  const int64_t na = rows_outer ? m : n, nb = rows_outer ? n : m;

  Bucketed<T> bk;
  const int64_t row_bytes = std::max<int64_t>(r_pad * static_cast<int64_t>(sizeof(T)), 64);
  auto shift_for = [&](int64_t bytes) {  // log2 of the rows (factor + gradient) in `bytes`
    int64_t shift = 0;
    while ((int64_t(2) << shift) * 2 * row_bytes <= bytes) ++shift;
    return shift;
  };
  auto blocks = [](int64_t size, int64_t shift) { return ((size - 1) >> shift) + 1; };
  bk.outer_shift = shift_for(kOuterBlockBytes);
  bk.inner_shift = shift_for(kInnerBlockBytes);
  bk.outer_blocks = na > 0 ? blocks(na, bk.outer_shift) : 0;
  bk.inner_blocks = nb > 0 ? blocks(nb, bk.inner_shift) : 0;
  const int64_t max_tiles = std::max(bk.outer_blocks, nnz / kMinTileTriples);
  while (bk.outer_blocks * bk.inner_blocks > max_tiles && bk.inner_blocks > 1 &&
         bk.outer_shift + bk.inner_shift < 32) {  // keys hold both local indices
    bk.inner_blocks = blocks(nb, ++bk.inner_shift);
  }
  const bool keep_positions = out.grad_values.defined() || out.grad_weights.defined();
  const BadIndex bad = bucket_triples<T>(rows, cols, values, weights, m, n, rows_outer,
                                         keep_positions, bk);
  if (bad.position >= 0) {
    if (bad.is_col) {
      observed_index_error("cols", bad.position, bad.value, n, "n, the columns of Q");
    }
    observed_index_error("rows", bad.position, bad.value, m, "m, the columns of P");
  }

  // Chunks: runs of outer blocks, cut where the triples before reach c/chunks of nnz.
  const int64_t chunks = std::clamp<int64_t>(
      std::min(nnz / kMinChunkTriples, nnz / std::max<int64_t>(kTriplesPerInner * nb, 1)), 1,
      std::min(kMaxChunks, bk.outer_blocks));
  ObservedProblem<T> pb{};
  pb.nnz = nnz;
  pb.r_pad = r_pad;
  pb.chunk_blocks.assign(chunks + 1, bk.outer_blocks);
  pb.chunk_blocks[0] = 0;
  for (int64_t c = 1; c < chunks; ++c) {
    int64_t lo = pb.chunk_blocks[c - 1], hi = bk.outer_blocks;  // first block starting ≥ target
    const int64_t target = nnz * c / chunks;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (bk.tile_begin[mid * bk.inner_blocks] >= target) hi = mid; else lo = mid + 1;
    }
    pb.chunk_blocks[c] = lo;
  }

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

  at::Tensor dA_rows, dB_parts, dbB_parts;  // zeroed by their chunks
  if (A_grad_out.defined() && r > 0) {
    dA_rows = at::empty({na, r_pad}, P.options());
    pb.outer.grad = dA_rows.mutable_data_ptr<T>();
  }
  if (B_grad_out.defined() && r > 0) {
    dB_parts = at::empty({chunks, nb, r_pad}, P.options());
    pb.inner.grad = dB_parts.mutable_data_ptr<T>();
  }
  // The outer bias gradient has one writer per entry: straight into the output.
  if (A_grad_bias_out.defined()) pb.outer.grad_bias = A_grad_bias_out.mutable_data_ptr<T>();
  if (B_grad_bias_out.defined()) {
    dbB_parts = at::empty({chunks, nb}, values.options());
    pb.inner.grad_bias = dbB_parts.mutable_data_ptr<T>();
  }

  std::vector<double> losses(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    run_chunks_any(pb, bk, begin, end, losses.data());
  });

  double loss = 0;
  for (const double l : losses) loss += l;
  if (pb.outer.grad) {
    reduce_rows_transposed<T>(pb.outer.grad, 1, na, r, r_pad, A_grad_out.mutable_data_ptr<T>());
  } else if (A_grad_out.defined()) {
    A_grad_out.zero_();  // r == 0
  }
  if (pb.inner.grad) {
    reduce_rows_transposed<T>(pb.inner.grad, chunks, nb, r, r_pad,
                              B_grad_out.mutable_data_ptr<T>());
  } else if (B_grad_out.defined()) {
    B_grad_out.zero_();
  }
  if (pb.inner.grad_bias) {
    reduce_vectors<T>(pb.inner.grad_bias, chunks, nb, B_grad_bias_out.mutable_data_ptr<T>());
  }
  return reduction == Reduction::Mean ? loss / static_cast<double>(nnz) : loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
observed_mf_loss_and_grads_cpu(const at::Tensor& rows, const at::Tensor& cols,
                               const at::Tensor& values, const at::Tensor& P,
                               const at::Tensor& Q, const std::optional<at::Tensor>& row_bias,
                               const std::optional<at::Tensor>& col_bias,
                               const std::optional<at::Tensor>& weights,
                               c10::string_view reduction, bool grad_values, bool grad_P,
                               bool grad_Q, bool grad_row_bias, bool grad_col_bias,
                               bool grad_weights) {
  check_observed_mf_loss_args(rows, cols, values, P, Q, row_bias, col_bias, weights);
  check_observed_grad_flags(row_bias, col_bias, weights, grad_row_bias, grad_col_bias,
                            grad_weights);
  const Reduction red =
      parse_observed_reduction(std::string_view(reduction.data(), reduction.size()));
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble,
                   "mf_ext.observed_mf_loss: the CPU kernel supports float32 and float64, got ",
                   values.scalar_type());
  const int64_t nnz = values.size(0), r = P.size(0), m = P.size(1), n = Q.size(1);
  const auto opts = values.options();
  auto maybe = [&](bool wanted, at::IntArrayRef shape) {
    return wanted ? at::empty(shape, opts) : at::empty({0}, opts);
  };
  at::Tensor loss = at::empty({}, opts);
  at::Tensor dvalues = maybe(grad_values, {nnz});
  at::Tensor dP = maybe(grad_P, {r, m});
  at::Tensor dQ = maybe(grad_Q, {r, n});
  at::Tensor drb = maybe(grad_row_bias, {m});
  at::Tensor dcb = maybe(grad_col_bias, {n});
  at::Tensor dweights = maybe(grad_weights, {nnz});
  ObservedOutputs out;
  if (grad_values) out.grad_values = dvalues;
  if (grad_P) out.grad_P = dP;
  if (grad_Q) out.grad_Q = dQ;
  if (grad_row_bias) out.grad_row_bias = drb;
  if (grad_col_bias) out.grad_col_bias = dcb;
  if (grad_weights) out.grad_weights = dweights;

  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "observed_mf_loss_cpu", [&] {
    const double value = observed_mf_loss_impl<scalar_t>(rows, cols, values, P, Q, row_bias,
                                                         col_bias, weights, red, out);
    loss.fill_(value);
  });
  return {loss, dvalues, dP, dQ, drb, dcb, dweights};
}

}  // namespace

TORCH_LIBRARY_IMPL(mf_ext, CPU, m) {
  m.impl("observed_mf_loss_and_grads", &observed_mf_loss_and_grads_cpu);
}

}  // namespace mf_ext

// How the CPU kernel of mf_ext::observed_mf_loss_and_grads cuts its work, all from the shapes
// and the data alone (never the thread count), so its results are bitwise the same on any
// number of threads:
//   tiles     a block of "outer" indices × a block of "inner" ones (outer = rows when m ≥ n,
//             else cols), each block's rows of the factor and its gradient sized to stay in L2;
//   segments  the bucketing pass over the triples, cut into equal runs of triples, counted and
//             scattered in parallel: a stable counting sort of the triples by tile, which also
//             checks every index before anything is read through it;
//   chunks    path "chunks" (below kUnitsMinTriples): the units of parallel work of the one fused
//             pass, runs of whole outer blocks cut at fixed fractions of nnz, at most kMaxChunks;
//   units     path "units" (large inputs): two passes over the same tiles, each in up to
//             kMaxUnits units of about 2^16 / 2^17 triples: runs of whole outer blocks for
//             the first (loss, outer gradients, each triple's ∂L/∂pred kept), then ranges of
//             inner indices for the second (inner gradients), cut on the triples per inner index
//             (taken by the counting pass). Each unit owns its gradient rows: no partials.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

namespace mf_ext {

// The bucketing pass is cut into at most kMaxSegments segments of at least kMinSegmentTriples.
constexpr int64_t kMaxSegments = 8;
constexpr int64_t kMinSegmentTriples = 1 << 16;
// Chunks (units of parallel work over outer blocks), at most kMaxChunks; a chunk gets at least
// kMinChunkTriples triples and at least 8 per inner index, so that zeroing and summing its
// inner partial (r per inner index) stays small next to its own work (r per triple).
constexpr int64_t kMaxChunks = 8;
constexpr int64_t kMinChunkTriples = 1 << 15;
constexpr int64_t kTriplesPerInner = 8;
// Path "units" from kUnitsMinTriples triples (MF_EXT_OBSERVED_PATH=chunks|units forces one):
// about nnz / kUnitTriples units in the first pass, nnz / kInnerUnitTriples in the second, each
// clamped to [1, kMaxUnits]. The second pass's units are wider: each of its triples reads a row
// of the outer factor from anywhere, and wider ranges of inner indices share more of those rows.
constexpr int64_t kUnitsMinTriples = int64_t(1) << 24;
constexpr int64_t kUnitTriples = int64_t(1) << 16;
constexpr int64_t kInnerUnitTriples = int64_t(1) << 17;
constexpr int64_t kMaxUnits = 1024;
// Bytes of factor rows + gradient rows a block covers (both blocks of a tile fit in L2 at once).
constexpr int64_t kOuterBlockBytes = int64_t(1) << 18;
constexpr int64_t kInnerBlockBytes = int64_t(1) << 18;
// Tiles are capped at max(outer blocks, nnz / kMinTileTriples) (huge, very sparse shapes).
constexpr int64_t kMinTileTriples = 64;

// The tiles: outer index a is in outer block a >> outer_shift, inner index b in inner block
// b >> inner_shift; tile = outer block · inner_blocks + inner block.
struct Tiling {
  bool rows_outer;
  bool units;  // path "units" (else "chunks")
  int64_t outer_size, inner_size;  // m and n, or n and m
  int64_t outer_shift, inner_shift, outer_blocks, inner_blocks;

  int64_t tiles() const { return outer_blocks * inner_blocks; }
};

// Path "units" or "chunks": by nnz, unless MF_EXT_OBSERVED_PATH says.
inline bool use_units(int64_t nnz) {
  const char* env = std::getenv("MF_EXT_OBSERVED_PATH");
  if (env == nullptr || *env == 0 || std::strcmp(env, "auto") == 0) {
    return nnz >= kUnitsMinTriples;
  }
  TORCH_CHECK_VALUE(std::strcmp(env, "chunks") == 0 || std::strcmp(env, "units") == 0,
                    "mf_ext.observed_mf_loss: MF_EXT_OBSERVED_PATH must be chunks, units or "
                    "auto, got '", env, "'");
  return env[0] == 'u';
}

// row_bytes: the bytes of one padded row of a factor.
inline Tiling plan_tiling(int64_t nnz, int64_t m, int64_t n, int64_t row_bytes) {
  Tiling tl{};
  // The longer side is the outer one: its gradient has no per-chunk partials.
  tl.rows_outer = m >= n;
  tl.units = use_units(nnz);
  tl.outer_size = tl.rows_outer ? m : n;
  tl.inner_size = tl.rows_outer ? n : m;
  const int64_t na = tl.outer_size, nb = tl.inner_size;
  row_bytes = std::max<int64_t>(row_bytes, 64);
  auto shift_for = [&](int64_t bytes) {  // log2 of the rows (factor + gradient) in `bytes`
    int64_t shift = 0;
    while ((int64_t(2) << shift) * 2 * row_bytes <= bytes) ++shift;
    return shift;
  };
  auto blocks = [](int64_t size, int64_t shift) { return ((size - 1) >> shift) + 1; };
  tl.outer_shift = shift_for(kOuterBlockBytes);
  tl.inner_shift = shift_for(kInnerBlockBytes);
  tl.outer_blocks = na > 0 ? blocks(na, tl.outer_shift) : 0;
  tl.inner_blocks = nb > 0 ? blocks(nb, tl.inner_shift) : 0;
  const int64_t max_tiles = std::max(tl.outer_blocks, nnz / kMinTileTriples);
  while (tl.outer_blocks * tl.inner_blocks > max_tiles && tl.inner_blocks > 1 &&
         tl.outer_shift + tl.inner_shift < 32) {  // keys hold both local indices
    tl.inner_blocks = blocks(nb, ++tl.inner_shift);
  }
  return tl;
}

inline int64_t segment_count(int64_t nnz) {
  return std::clamp<int64_t>(nnz / kMinSegmentTriples, 1, kMaxSegments);
}

// The first triple of segment s (which ends where segment s + 1 begins).
inline int64_t segment_begin(int64_t nnz, int64_t segments, int64_t s) {
  return nnz * s / segments;
}

// The triples bucketed by tile, then by outer index inside each tile's processing.
template <typename T>
struct Bucketed : Tiling {
  std::vector<int64_t> tile_begin;  // (tiles + 1,)
  // Per triple, in tile order: (outer − block start) << inner_shift | (inner − block start).
  std::unique_ptr<uint32_t[]> keys;
  std::unique_ptr<T[]> values, weights;   // weights null: all 1
  std::unique_ptr<int64_t[]> positions;   // original t, only for grad_values / grad_weights
  std::vector<int64_t> inner_hist;  // triples per inner index (path "units" only)
};

struct BadIndex {
  int64_t position = -1;  // first triple with an out-of-range index, -1 if none
  int64_t value = 0;
  bool is_col = false;
};

// Counts (kScatter false) or scatters (true) the triples [t0, t1) by tile. Counting also checks
// the indices: it stops at the first bad one and returns it. `next`: the segment's counters, or
// its write positions. Counting reads no values (they may be null).
template <bool kScatter, bool kHist, typename T, typename IR, typename IC>
BadIndex bucket_segment(const IR* rows, int64_t rows_s, const IC* cols, int64_t cols_s,
                        const T* values, int64_t values_s, const T* weights, int64_t weights_s,
                        int64_t t0, int64_t t1, int64_t m, int64_t n, bool rows_outer,
                        int64_t outer_shift, int64_t inner_shift, int64_t inner_blocks,
                        int64_t* next, uint32_t* keys, T* sorted_values, T* sorted_weights,
                        int64_t* positions, int64_t* inner_hist) {
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
      if constexpr (kHist) ++inner_hist[b];  // path "units": counted per inner index too
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
                            int64_t t1, int64_t m, int64_t n, const Tiling& tl, int64_t* next,
                            uint32_t* keys, T* sorted_values, T* sorted_weights,
                            int64_t* positions, int64_t* inner_hist = nullptr) {
  auto go = [&](auto* rows_p, auto* cols_p) {
    if (!kScatter && inner_hist) {
      return bucket_segment<false, true>(rows_p, rows.stride(0), cols_p, cols.stride(0), values,
                                         values_s, weights, weights_s, t0, t1, m, n,
                                         tl.rows_outer, tl.outer_shift, tl.inner_shift,
                                         tl.inner_blocks, next, keys, sorted_values,
                                         sorted_weights, positions, inner_hist);
    }
    return bucket_segment<kScatter, false>(rows_p, rows.stride(0), cols_p, cols.stride(0), values,
                                    values_s, weights, weights_s, t0, t1, m, n, tl.rows_outer,
                                    tl.outer_shift, tl.inner_shift, tl.inner_blocks, next, keys,
                                    sorted_values, sorted_weights, positions, nullptr);
  };
  const bool r64 = rows.scalar_type() == at::kLong, c64 = cols.scalar_type() == at::kLong;
  if (r64 && c64) return go(rows.const_data_ptr<int64_t>(), cols.const_data_ptr<int64_t>());
  if (r64) return go(rows.const_data_ptr<int64_t>(), cols.const_data_ptr<int32_t>());
  if (c64) return go(rows.const_data_ptr<int32_t>(), cols.const_data_ptr<int64_t>());
  return go(rows.const_data_ptr<int32_t>(), cols.const_data_ptr<int32_t>());
}

// The counting half of the sort: counts the triples of each tile per segment (in parallel) and
// checks the indices. Unless one is bad, then lays out `offsets` (segments × tiles: counts, then
// each segment's first write position in each tile) tile-major, segment-minor, so the sort is
// the same whatever the thread count, and `tile_begin` (tiles + 1: where each tile starts).
// Path "units": also the triples per inner index (`inner_hist`).
// T: the dtype of the values the scatter will move (counting reads none).
template <typename T>
BadIndex count_triples(const at::Tensor& rows, const at::Tensor& cols, int64_t m, int64_t n,
                       const Tiling& tl, std::vector<int64_t>& offsets,
                       std::vector<int64_t>& tile_begin, std::vector<int64_t>& inner_hist) {
  const int64_t nnz = rows.size(0);
  const int64_t segments = segment_count(nnz);
  const int64_t tiles = tl.tiles();
  const int64_t nb = tl.inner_size;
  offsets.assign(segments * tiles, 0);
  // Path "units": per-segment histograms (segments × inner counters), summed below.
  std::vector<int64_t> hists(tl.units ? segments * nb : 0, 0);
  std::vector<BadIndex> bad(segments);
  at::parallel_for(0, segments, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      bad[s] = bucket_segment_any<false, T>(
          rows, cols, nullptr, 0, nullptr, 0, segment_begin(nnz, segments, s),
          segment_begin(nnz, segments, s + 1), m, n, tl, offsets.data() + s * tiles, nullptr,
          nullptr, nullptr, nullptr, tl.units ? hists.data() + s * nb : nullptr);
    }
  });
  for (const BadIndex& b : bad) {
    if (b.position >= 0) return b;  // segments are in triple order: the lowest bad position
  }
  if (tl.units) {
    inner_hist.assign(nb, 0);
    at::parallel_for(0, nb, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        for (int64_t s = 0; s < segments; ++s) inner_hist[k] += hists[s * nb + k];
      }
    });
  }
  tile_begin.assign(tiles + 1, 0);
  int64_t total = 0;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    tile_begin[tile] = total;
    for (int64_t s = 0; s < segments; ++s) {
      const int64_t count = offsets[s * tiles + tile];
      offsets[s * tiles + tile] = total;
      total += count;
    }
  }
  tile_begin[tiles] = total;
  return BadIndex{};
}

// Sorts the triples into bk by tile (stable: each tile keeps the triples' order) and checks the
// indices on the way (count_triples, then the scatter, segments in parallel). bk's tiling must
// be set.
template <typename T>
BadIndex bucket_triples(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& values,
                        const std::optional<at::Tensor>& weights, int64_t m, int64_t n,
                        bool keep_positions, Bucketed<T>& bk) {
  const int64_t nnz = values.size(0);
  const T* values_p = values.const_data_ptr<T>();
  const int64_t values_s = values.stride(0);
  const T* weights_p = weights.has_value() ? weights->const_data_ptr<T>() : nullptr;
  const int64_t weights_s = weights.has_value() ? weights->stride(0) : 0;

  std::vector<int64_t> offsets;  // counts, then write positions
  const BadIndex bad = count_triples<T>(rows, cols, m, n, bk, offsets, bk.tile_begin,
                                        bk.inner_hist);
  if (bad.position >= 0) return bad;
  const int64_t segments = segment_count(nnz);
  const int64_t tiles = bk.tiles();
  bk.keys.reset(new uint32_t[nnz]);  // uninitialized: every entry is written below
  bk.values.reset(new T[nnz]);
  if (weights_p) bk.weights.reset(new T[nnz]);
  if (keep_positions) bk.positions.reset(new int64_t[nnz]);
  at::parallel_for(0, segments, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      bucket_segment_any<true, T>(rows, cols, values_p, values_s, weights_p, weights_s,
                                  segment_begin(nnz, segments, s),
                                  segment_begin(nnz, segments, s + 1), m, n, bk,
                                  offsets.data() + s * tiles, bk.keys.get(), bk.values.get(),
                                  bk.weights.get(), bk.positions.get());
    }
  });
  return BadIndex{};
}

// Path "chunks": chunk c covers outer indices [bounds[c], bounds[c + 1]), runs of whole outer
// blocks cut where the triples before reach c/chunks of nnz (tile_begin: from count_triples).
inline std::vector<int64_t> plan_chunks(int64_t nnz, const Tiling& tl,
                                        const std::vector<int64_t>& tile_begin) {
  const int64_t chunks = std::clamp<int64_t>(
      std::min(nnz / kMinChunkTriples, nnz / std::max<int64_t>(kTriplesPerInner * tl.inner_size, 1)),
      1, std::min(kMaxChunks, tl.outer_blocks));
  std::vector<int64_t> chunk_blocks(chunks + 1, tl.outer_blocks);
  chunk_blocks[0] = 0;
  for (int64_t c = 1; c < chunks; ++c) {
    int64_t lo = chunk_blocks[c - 1], hi = tl.outer_blocks;  // first block starting ≥ target
    const int64_t target = nnz * c / chunks;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (tile_begin[mid * tl.inner_blocks] >= target) hi = mid; else lo = mid + 1;
    }
    chunk_blocks[c] = lo;
  }
  std::vector<int64_t> bounds(chunks + 1);
  for (int64_t c = 0; c <= chunks; ++c) {
    bounds[c] = std::min(chunk_blocks[c] << tl.outer_shift, tl.outer_size);
  }
  return bounds;
}

inline int64_t unit_count(int64_t nnz, int64_t unit_triples = kUnitTriples) {
  return std::clamp<int64_t>(nnz / unit_triples, 1, kMaxUnits);
}

// Path "units", first pass: unit u covers outer indices [bounds[u], bounds[u + 1]), runs of
// whole outer blocks (each tile has one writer). Blocks that average half the target
// nnz / unit_count(nnz) or more are a unit each; smaller ones are grouped, a new unit begun
// before the block that would take it past the target.
inline std::vector<int64_t> plan_outer_units(int64_t nnz, const Tiling& tl,
                                             const std::vector<int64_t>& tile_begin) {
  const int64_t target = std::max<int64_t>(nnz / unit_count(nnz), 1);
  const bool one_per_block = 2 * nnz >= target * tl.outer_blocks;
  const int64_t ib = tl.inner_blocks;
  std::vector<int64_t> bounds{0};
  int64_t start = 0;  // the triples before the current unit
  for (int64_t block = 1; block < tl.outer_blocks; ++block) {
    const int64_t before = tile_begin[block * ib];
    if (one_per_block || (tile_begin[(block + 1) * ib] - start > target && before > start)) {
      bounds.push_back(block << tl.outer_shift);
      start = before;
    }
  }
  bounds.push_back(tl.outer_size);
  return bounds;
}

// Path "units": [bounds[u], bounds[u + 1]) for each unit u of one side: ranges of indices cut
// where the triples before reach u/units of nnz (hist: triples per index), empty ranges dropped.
// A unit holds nnz/units triples give or take one index's (a single index is never split).
inline std::vector<int64_t> plan_ranges(const std::vector<int64_t>& hist, int64_t units) {
  int64_t nnz = 0;
  for (const int64_t c : hist) nnz += c;
  const int64_t size = static_cast<int64_t>(hist.size());
  std::vector<int64_t> bounds{0};
  int64_t before = 0, i = 0;  // before: the triples of indices < i
  for (int64_t u = 1; u < units; ++u) {
    const int64_t target = nnz * u / units;  // the first index i with before(i) ≥ target
    while (i < size && before < target) before += hist[i++];
    if (i > bounds.back() && i < size) bounds.push_back(i);
  }
  if (size > bounds.back() || size == 0) bounds.push_back(size);
  return bounds;
}

}  // namespace mf_ext

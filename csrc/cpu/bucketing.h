// How the CPU kernel of mf_ext::observed_mf_loss_and_grads cuts its work, all from the shapes
// and the data alone (never the thread count), so its results are bitwise the same on any
// number of threads. The "outer" side is the rows when m ≥ n, else the cols (the math is
// symmetric); the other is the "inner" side.
//   segments  the passes over the triples (histogram, count, scatter) are cut into equal runs
//             of triples that run in parallel; the histogram pass also checks every index
//             before anything is read through it;
//   groups    the inner side is cut into G groups, the outer side into K·G ("lanes" of G each),
//             at the histogram bins where the triples before reach fixed fractions of nnz, so
//             groups hold about the same number of triples whatever the data's skew;
//   units     (outer group, inner group): K·G² units of parallel work, run in Latin-square
//             rounds (latin_rounds.h), so no unit needs a partial of its own: the outer
//             gradient rows are owned by their group, the inner ones by their lane (K ≤ 4
//             accumulators, summed in lane order at the end);
//   tiles     inside a unit, blocks of outer × inner indices counted from the groups' starts,
//             each block's rows of the factor and its gradient sized to stay in L2; the
//             triples are bucketed (a stable counting sort) by tile, tiles in unit order.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

namespace mf_ext {
namespace {

// The passes over the triples are cut into at most kMaxSegments segments of at least
// kMinSegmentTriples.
constexpr int64_t kMaxSegments = 8;
constexpr int64_t kMinSegmentTriples = 1 << 16;
// Units: G ≤ kMaxGroups inner groups, G ≈ √(nnz / kMinUnitTriples) (units of fewer triples
// make sparser tiles, which reuse the factor rows they load less: measured slower on
// ML-1M-sized data); then up to kMaxLanes lanes, so that K·G ≥ kTargetConcurrency units can run
// at once where the data allow, each lane's inner accumulator (r per inner index, zeroed and
// summed) costing at most 1/kLaneTriplesPerInner of its triples' work (r per triple).
constexpr int64_t kMaxGroups = 64;
constexpr int64_t kMaxLanes = 4;
constexpr int64_t kTargetConcurrency = 64;
constexpr int64_t kMinUnitTriples = 16384;
constexpr int64_t kLaneTriplesPerInner = 32;
// Histogram bins per side, at most (a bin: 2^bin_shift consecutive indices). Groups start at
// bin boundaries and span kMinBinsPerGroup bins or more, so that their cuts can balance them.
constexpr int64_t kMaxBins = int64_t(1) << 16;
constexpr int64_t kMinBinsPerGroup = 8;
// Bytes of factor rows + gradient rows a block covers (both blocks of a tile fit in L2 at once).
constexpr int64_t kOuterBlockBytes = int64_t(1) << 18;
constexpr int64_t kInnerBlockBytes = int64_t(1) << 18;
// Tiles are capped at max(outer blocks, nnz / kMinTileTriples) (huge, very sparse shapes).
constexpr int64_t kMinTileTriples = 64;

inline int64_t segment_count(int64_t nnz) {
  return std::clamp<int64_t>(nnz / kMinSegmentTriples, 1, kMaxSegments);
}

// The first triple of segment s (which ends where segment s + 1 begins).
inline int64_t segment_begin(int64_t nnz, int64_t segments, int64_t s) {
  return nnz * s / segments;
}

// What the histogram needs: the sides, their bins. From the shapes alone.
struct Sides {
  bool rows_outer;
  int64_t outer_size, inner_size;          // m and n, or n and m
  int64_t outer_bin_shift, inner_bin_shift;
  int64_t outer_bins() const { return bins(outer_size, outer_bin_shift); }
  int64_t inner_bins() const { return bins(inner_size, inner_bin_shift); }
  static int64_t bins(int64_t size, int64_t shift) {
    return size > 0 ? ((size - 1) >> shift) + 1 : 0;
  }
};

inline Sides plan_sides(int64_t m, int64_t n) {
  auto bin_shift = [](int64_t size) {
    int64_t shift = 0;
    while ((size >> shift) > kMaxBins) ++shift;
    return shift;
  };
  Sides s{};
  s.rows_outer = m >= n;  // the longer side is the outer one: no lane accumulators for it
  s.outer_size = s.rows_outer ? m : n;
  s.inner_size = s.rows_outer ? n : m;
  s.outer_bin_shift = bin_shift(s.outer_size);
  s.inner_bin_shift = bin_shift(s.inner_size);
  return s;
}

// The whole partition: groups, units and tiles. Outer index a is in outer group
// outer_group_of_bin[a >> outer_bin_shift], local index a − outer_start[group], local block
// (a − outer_start[group]) >> outer_shift; likewise inner. Tile of unit u = (outer group ·
// groups + inner group), outer local block lo, inner local block li:
// unit_tile[u] + lo · inner_group_blocks[inner group] + li.
struct Partition : Sides {
  int64_t groups = 1, lanes = 1;          // G inner groups; K·G outer groups
  int64_t outer_shift = 0, inner_shift = 0;
  std::vector<int64_t> outer_start, inner_start;             // (K·G + 1,), (G + 1,)
  std::vector<int32_t> outer_group_of_bin, inner_group_of_bin;
  std::vector<int64_t> outer_group_blocks, inner_group_blocks;  // local blocks per group
  std::vector<int64_t> unit_tile;                            // (K·G² + 1,): first tile per unit

  int64_t outer_groups() const { return lanes * groups; }
  int64_t units() const { return outer_groups() * groups; }
  int64_t tiles() const { return unit_tile.back(); }
};

// G and K from the problem's size: enough units for kTargetConcurrency threads on large inputs,
// few enough that each has work (see the constants).
inline void plan_groups(int64_t nnz, Partition& pt) {
  const int64_t units_max = std::max<int64_t>(nnz / kMinUnitTriples, 1);
  pt.groups = std::clamp<int64_t>(static_cast<int64_t>(std::sqrt(static_cast<double>(units_max))),
                                  1, std::clamp<int64_t>(pt.inner_bins() / kMinBinsPerGroup,
                                                         1, kMaxGroups));
  const int64_t lane_cost_cap = nnz / std::max<int64_t>(kLaneTriplesPerInner * pt.inner_size, 1);
  pt.lanes = std::clamp<int64_t>(
      std::min({(kTargetConcurrency + pt.groups - 1) / pt.groups, lane_cost_cap,
                pt.outer_bins() / (kMinBinsPerGroup * pt.groups)}),
      1, kMaxLanes);
}

// Cuts `bins` (triples per bin) into `parts` runs of bins: part p starts at the first bin whose
// predecessors hold at least nnz·p/parts triples. Writes the index starts ((parts + 1,), in
// indices: bin · 2^shift, the last = size) and each bin's part.
inline void cut_bins(const std::vector<int64_t>& bins, int64_t parts, int64_t shift,
                     int64_t size, int64_t nnz, std::vector<int64_t>& start,
                     std::vector<int32_t>& part_of_bin) {
  const int64_t nbins = static_cast<int64_t>(bins.size());
  start.assign(parts + 1, size);
  part_of_bin.assign(nbins, 0);
  start[0] = 0;
  int64_t before = 0, part = 0;
  for (int64_t bin = 0; bin < nbins; ++bin) {
    while (part + 1 < parts && before >= nnz * (part + 1) / parts) start[++part] = bin << shift;
    part_of_bin[bin] = static_cast<int32_t>(part);
    before += bins[bin];
  }
}

// Groups from the histograms, then the tiles: the L2-sized blocks, and, for huge and very
// sparse shapes, wider inner blocks until tiles ≤ max(outer blocks, nnz / kMinTileTriples).
inline void plan_units(int64_t nnz, const std::vector<int64_t>& outer_bins,
                       const std::vector<int64_t>& inner_bins, int64_t row_bytes,
                       Partition& pt) {
  plan_groups(nnz, pt);
  cut_bins(outer_bins, pt.outer_groups(), pt.outer_bin_shift, pt.outer_size, nnz,
           pt.outer_start, pt.outer_group_of_bin);
  cut_bins(inner_bins, pt.groups, pt.inner_bin_shift, pt.inner_size, nnz, pt.inner_start,
           pt.inner_group_of_bin);
  row_bytes = std::max<int64_t>(row_bytes, 64);
  auto shift_for = [&](int64_t bytes) {  // log2 of the rows (factor + gradient) in `bytes`
    int64_t shift = 0;
    while ((int64_t(2) << shift) * 2 * row_bytes <= bytes) ++shift;
    return shift;
  };
  auto group_blocks = [](const std::vector<int64_t>& start, int64_t shift,
                         std::vector<int64_t>& blocks) {
    int64_t total = 0;
    blocks.resize(start.size() - 1);
    for (size_t g = 0; g + 1 < start.size(); ++g) {
      const int64_t size = start[g + 1] - start[g];
      blocks[g] = size > 0 ? ((size - 1) >> shift) + 1 : 0;
      total += blocks[g];
    }
    return total;
  };
  pt.outer_shift = shift_for(kOuterBlockBytes);
  pt.inner_shift = shift_for(kInnerBlockBytes);
  const int64_t outer_blocks = group_blocks(pt.outer_start, pt.outer_shift, pt.outer_group_blocks);
  int64_t inner_blocks = group_blocks(pt.inner_start, pt.inner_shift, pt.inner_group_blocks);
  const int64_t max_tiles = std::max(outer_blocks, nnz / kMinTileTriples);
  while (outer_blocks * inner_blocks > max_tiles && inner_blocks > pt.groups &&
         pt.outer_shift + pt.inner_shift < 32) {  // keys hold both local indices
    inner_blocks = group_blocks(pt.inner_start, ++pt.inner_shift, pt.inner_group_blocks);
  }
  const int64_t G = pt.groups;
  pt.unit_tile.assign(pt.units() + 1, 0);
  for (int64_t u = 0; u < pt.units(); ++u) {
    pt.unit_tile[u + 1] =
        pt.unit_tile[u] + pt.outer_group_blocks[u / G] * pt.inner_group_blocks[u % G];
  }
}

// The triples bucketed by tile (tiles in unit order), then by outer index inside each tile's
// processing.
template <typename T>
struct Bucketed : Partition {
  std::vector<int64_t> tile_begin;  // (tiles + 1,)
  // Per triple, in tile order: (outer − block start) << inner_shift | (inner − block start).
  std::unique_ptr<uint32_t[]> keys;
  std::unique_ptr<T[]> values, weights;   // weights null: all 1
  std::unique_ptr<int64_t[]> positions;   // original t, only for grad_values / grad_weights

  int64_t unit_triples(int64_t u) const {
    return tile_begin[unit_tile[u + 1]] - tile_begin[unit_tile[u]];
  }
};

struct BadIndex {
  int64_t position = -1;  // first triple with an out-of-range index, -1 if none
  int64_t value = 0;
  bool is_col = false;
};

// The three passes over a segment [t0, t1) of the triples.
enum class Pass { Histogram, Count, Scatter };

// Histogram: checks the indices (stops at the first bad one and returns it) and counts the
// triples per outer and inner bin into `next` (outer bins, then inner bins). Count: the triples
// per tile into `next`. Scatter: each triple to next[tile]++, as key, value, weight, position.
// Only Scatter reads values (they may be null otherwise).
template <Pass kPass, typename T, typename IR, typename IC>
BadIndex bucket_segment(const IR* rows, int64_t rows_s, const IC* cols, int64_t cols_s,
                        const T* values, int64_t values_s, const T* weights, int64_t weights_s,
                        int64_t t0, int64_t t1, int64_t m, int64_t n, const Partition& pt,
                        int64_t* next, uint32_t* keys, T* sorted_values, T* sorted_weights,
                        int64_t* positions) {
  // The partition's fields in locals: the stores through `next` could alias them otherwise,
  // and the compiler would reload every one of them for every triple.
  const bool rows_outer = pt.rows_outer;
  const int64_t outer_bin_shift = pt.outer_bin_shift, inner_bin_shift = pt.inner_bin_shift;
  const int64_t outer_shift = pt.outer_shift, inner_shift = pt.inner_shift, G = pt.groups;
  const uint64_t outer_mask = (uint64_t(1) << outer_shift) - 1;
  const uint64_t inner_mask = (uint64_t(1) << inner_shift) - 1;
  const int32_t* const outer_group_of_bin = pt.outer_group_of_bin.data();
  const int32_t* const inner_group_of_bin = pt.inner_group_of_bin.data();
  const int64_t* const outer_start = pt.outer_start.data();
  const int64_t* const inner_start = pt.inner_start.data();
  const int64_t* const unit_tile = pt.unit_tile.data();
  const int64_t* const inner_group_blocks = pt.inner_group_blocks.data();
  int64_t* const inner_hist = next + (kPass == Pass::Histogram ? pt.outer_bins() : 0);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t i = static_cast<int64_t>(rows[t * rows_s]);
    const int64_t j = static_cast<int64_t>(cols[t * cols_s]);
    const int64_t a = rows_outer ? i : j, b = rows_outer ? j : i;
    if constexpr (kPass == Pass::Histogram) {
      const bool row_bad = static_cast<uint64_t>(i) >= static_cast<uint64_t>(m);
      if (row_bad || static_cast<uint64_t>(j) >= static_cast<uint64_t>(n)) {
        return BadIndex{t, row_bad ? i : j, !row_bad};
      }
      ++next[a >> outer_bin_shift];
      ++inner_hist[b >> inner_bin_shift];
      continue;
    }
    const int64_t ga = outer_group_of_bin[a >> outer_bin_shift];
    const int64_t gb = inner_group_of_bin[b >> inner_bin_shift];
    const uint64_t la = a - outer_start[ga], lb = b - inner_start[gb];
    const int64_t tile = unit_tile[ga * G + gb] +
                         static_cast<int64_t>(la >> outer_shift) * inner_group_blocks[gb] +
                         static_cast<int64_t>(lb >> inner_shift);
    if constexpr (kPass == Pass::Count) {
      ++next[tile];
    } else {
      const int64_t pos = next[tile]++;
      keys[pos] = static_cast<uint32_t>(((la & outer_mask) << inner_shift) | (lb & inner_mask));
      sorted_values[pos] = values[t * values_s];
      if (sorted_weights) sorted_weights[pos] = weights[t * weights_s];
      if (positions) positions[pos] = t;
    }
  }
  return BadIndex{};
}

template <Pass kPass, typename T>
BadIndex bucket_segment_any(const at::Tensor& rows, const at::Tensor& cols, const T* values,
                            int64_t values_s, const T* weights, int64_t weights_s, int64_t t0,
                            int64_t t1, int64_t m, int64_t n, const Partition& pt, int64_t* next,
                            uint32_t* keys, T* sorted_values, T* sorted_weights,
                            int64_t* positions) {
  auto go = [&](auto* rows_p, auto* cols_p) {
    return bucket_segment<kPass>(rows_p, rows.stride(0), cols_p, cols.stride(0), values,
                                 values_s, weights, weights_s, t0, t1, m, n, pt, next, keys,
                                 sorted_values, sorted_weights, positions);
  };
  const bool r64 = rows.scalar_type() == at::kLong, c64 = cols.scalar_type() == at::kLong;
  if (r64 && c64) return go(rows.const_data_ptr<int64_t>(), cols.const_data_ptr<int64_t>());
  if (r64) return go(rows.const_data_ptr<int64_t>(), cols.const_data_ptr<int32_t>());
  if (c64) return go(rows.const_data_ptr<int32_t>(), cols.const_data_ptr<int64_t>());
  return go(rows.const_data_ptr<int32_t>(), cols.const_data_ptr<int32_t>());
}

// Runs pass kPass over every segment in parallel, segment s with next + s · stride.
template <Pass kPass, typename T>
std::vector<BadIndex> bucket_segments(const at::Tensor& rows, const at::Tensor& cols,
                                      const T* values, int64_t values_s, const T* weights,
                                      int64_t weights_s, int64_t m, int64_t n,
                                      const Partition& pt, int64_t* next, int64_t stride,
                                      uint32_t* keys, T* sorted_values, T* sorted_weights,
                                      int64_t* positions) {
  const int64_t nnz = rows.size(0), segments = segment_count(nnz);
  std::vector<BadIndex> bad(segments);
  at::parallel_for(0, segments, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      bad[s] = bucket_segment_any<kPass, T>(
          rows, cols, values, values_s, weights, weights_s, segment_begin(nnz, segments, s),
          segment_begin(nnz, segments, s + 1), m, n, pt, next + s * stride, keys, sorted_values,
          sorted_weights, positions);
    }
  });
  return bad;
}

// The histogram and counting passes: checks the indices (returns the lowest bad one, if any),
// plans the partition into pt (its Sides must be set), and lays out `offsets` (segments × tiles:
// each segment's first write position in each tile, tile-major, segment-minor, so the sort is
// the same whatever the thread count) and `tile_begin` (tiles + 1: where each tile starts).
// row_bytes: the bytes of one padded factor row. T: the dtype of the values the scatter will
// move (these passes read none).
template <typename T>
BadIndex count_triples(const at::Tensor& rows, const at::Tensor& cols, int64_t m, int64_t n,
                       int64_t row_bytes, Partition& pt, std::vector<int64_t>& offsets,
                       std::vector<int64_t>& tile_begin) {
  const int64_t nnz = rows.size(0), segments = segment_count(nnz);
  const int64_t bins = pt.outer_bins() + pt.inner_bins();
  std::vector<int64_t> hist(segments * bins, 0);
  for (const BadIndex& b : bucket_segments<Pass::Histogram, T>(
           rows, cols, nullptr, 0, nullptr, 0, m, n, pt, hist.data(), bins, nullptr, nullptr,
           nullptr, nullptr)) {
    if (b.position >= 0) return b;  // segments are in triple order: the lowest bad position
  }
  std::vector<int64_t> outer_hist(pt.outer_bins(), 0), inner_hist(pt.inner_bins(), 0);
  for (int64_t s = 0; s < segments; ++s) {
    const int64_t* h = hist.data() + s * bins;
    for (int64_t k = 0; k < pt.outer_bins(); ++k) outer_hist[k] += h[k];
    for (int64_t k = 0; k < pt.inner_bins(); ++k) inner_hist[k] += h[pt.outer_bins() + k];
  }
  plan_units(nnz, outer_hist, inner_hist, row_bytes, pt);

  const int64_t tiles = pt.tiles();
  offsets.assign(segments * tiles, 0);
  bucket_segments<Pass::Count, T>(rows, cols, nullptr, 0, nullptr, 0, m, n, pt, offsets.data(),
                                  tiles, nullptr, nullptr, nullptr, nullptr);
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

// Checks the indices, plans the partition and sorts the triples into bk by tile (stable: each
// tile keeps the triples' order). bk's Sides must be set.
template <typename T>
BadIndex bucket_triples(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& values,
                        const std::optional<at::Tensor>& weights, int64_t m, int64_t n,
                        int64_t row_bytes, bool keep_positions, Bucketed<T>& bk) {
  const int64_t nnz = values.size(0);
  std::vector<int64_t> offsets;  // write positions
  const BadIndex bad = count_triples<T>(rows, cols, m, n, row_bytes, bk, offsets, bk.tile_begin);
  if (bad.position >= 0) return bad;
  bk.keys.reset(new uint32_t[nnz]);  // uninitialized: every entry is written below
  bk.values.reset(new T[nnz]);
  if (weights.has_value()) bk.weights.reset(new T[nnz]);
  if (keep_positions) bk.positions.reset(new int64_t[nnz]);
  bucket_segments<Pass::Scatter, T>(
      rows, cols, values.const_data_ptr<T>(), values.stride(0),
      weights.has_value() ? weights->const_data_ptr<T>() : nullptr,
      weights.has_value() ? weights->stride(0) : 0, m, n, bk, offsets.data(), bk.tiles(),
      bk.keys.get(), bk.values.get(), bk.weights.get(), bk.positions.get());
  return BadIndex{};
}

}  // namespace
}  // namespace mf_ext

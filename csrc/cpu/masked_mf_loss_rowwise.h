// The rowwise unit of the dense CPU kernel (csrc/cpu/masked_mf_loss.cpp), for small ranks, where
// the op is bound by reading R: the columns of a unit are swept in tiles of kTileCols so that a
// tile's Q and dQ slices (r × kTileCols) stay in cache while the unit's rows pass over them, four
// rows at a time. Per rows and tile:
//   pass 1: pred = p_iᵀ Q[:, tile], e = (R − pred)·observed, the loss and grad_R;
//   pass 2: dP[:, i] += Q[:, tile]·e and dQ[:, tile] += p_i eᵀ (scaled by −2 at the end).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../masked_mf_loss_common.h"
#include "masked_mf_loss_cells.h"
#include "simd.h"

namespace mf_ext {

constexpr int64_t kTileCols = 256;  // columns of a rowwise tile

// Everything a rowwise unit reads and writes, as raw pointers taken once. P and dP have any
// strides (a unit reads a few of P's columns and adds one sum per rank into dP per tile); Q is a
// contiguous copy zero-padded to n_pad columns so every tile is a whole number of 4-vector blocks.
template <typename T>
struct DenseProblem : DenseCells<T> {
  int64_t m, n, n_pad, r;
  const T* P;  // (r, m)
  int64_t P_s0, P_s1;
  const T* Q;  // (r, n_pad)
  T* dP;       // (r, m) or nullptr
  int64_t dP_s0, dP_s1;
  T* dQ;       // (lanes, r, n_pad) or nullptr
  int64_t groups, lanes;
};

// Unit (a, b)'s rows [i0, i1) and columns [j0, j1).
struct TaskCells {
  int64_t i0, i1, j0, j1;
};

// Rowwise unit (a, b) of `groups` column groups (whole 4-vector blocks of the padded columns) and
// lanes · groups row groups.
template <typename T>
MF_EXT_INLINE TaskCells rowwise_cells(int64_t m, int64_t n_pad, int64_t groups, int64_t lanes,
                                      int64_t a, int64_t b) {
  constexpr int64_t kBlock = 4 * simd::Vec<T>::width;
  const Range rows = split(m, lanes * groups, a);
  const Range blocks = split(n_pad / kBlock, groups, b);
  return {rows.begin, rows.end, blocks.begin * kBlock, blocks.end * kBlock};
}

// W entries of a row starting at `p` with stride `stride`, of which only `lanes` exist (the
// rest read as 0).
template <typename T>
MF_EXT_INLINE typename simd::Vec<T>::type load_chunk(const T* p, int64_t stride, int64_t lanes) {
  constexpr int W = simd::Vec<T>::width;
  if (stride == 1 && lanes >= W) return simd::load(p);
  alignas(64) T tmp[W] = {};
  for (int64_t l = 0; l < std::min<int64_t>(lanes, W); ++l) tmp[l] = p[l * stride];
  return simd::load(tmp);
}

template <typename T>
MF_EXT_INLINE typename simd::Vec<T>::type load_mask_chunk(const bool* p, int64_t stride, int64_t lanes) {
  constexpr int W = simd::Vec<T>::width;
  if (stride == 1 && lanes >= W) return simd::load_mask<T>(p);
  alignas(64) bool tmp[W] = {};
  for (int64_t l = 0; l < std::min<int64_t>(lanes, W); ++l) tmp[l] = p[l * stride];
  return simd::load_mask<T>(tmp);
}

template <typename T>
MF_EXT_INLINE void store_chunk(T* p, int64_t stride, int64_t lanes, typename simd::Vec<T>::type v) {
  constexpr int W = simd::Vec<T>::width;
  if (stride == 1 && lanes >= W) return simd::store(p, v);
  for (int64_t l = 0; l < std::min<int64_t>(lanes, W); ++l) p[l * stride] = v[l];
}

// Rows i .. i+NR−1 against one column tile [jt, jt + width). Several rows at once let every
// load of Q and dQ feed NR multiply-adds instead of one.
template <typename T, int NR, bool kGradP, bool kGradQ>
MF_EXT_INLINE void process_rows(const DenseProblem<T>& pb, int64_t i, int64_t jt, int64_t width,
                                T* dP, T* dQ, T* p, T* e_buf, double& loss, int64_t& count) {
  using V = typename simd::Vec<T>::type;
  constexpr int W = simd::Vec<T>::width;
  constexpr int64_t kBlock = 4 * W;
  const int64_t r = pb.r, n_pad = pb.n_pad;
  const int64_t valid = pb.n - jt;  // real columns from jt on
  const V zero = simd::broadcast<T>(0), one = simd::broadcast<T>(1), two = simd::broadcast<T>(2);

  for (int t = 0; t < NR; ++t) {
    for (int64_t k = 0; k < r; ++k) p[t * r + k] = pb.P[k * pb.P_s0 + (i + t) * pb.P_s1];
  }

  // Pass 1: prediction, masked error, loss, grad_R.
  for (int64_t jj = 0; jj < width; jj += kBlock) {
    V pred[NR][4];
    for (int t = 0; t < NR; ++t) {
      for (int u = 0; u < 4; ++u) pred[t][u] = zero;
    }
    const T* q = pb.Q + jt + jj;
    for (int64_t k = 0; k < r; ++k, q += n_pad) {
      V qv[4];
      for (int u = 0; u < 4; ++u) qv[u] = simd::load(q + u * W);
      for (int t = 0; t < NR; ++t) {
        const V pk = simd::broadcast(p[t * r + k]);
        for (int u = 0; u < 4; ++u) pred[t][u] += pk * qv[u];
      }
    }
    for (int t = 0; t < NR; ++t) {
      const int64_t row = i + t;
      const T* R_row = pb.R + row * pb.R_s0 + jt * pb.R_s1;
      const bool* M_row = pb.mask ? pb.mask + row * pb.M_s0 + jt * pb.M_s1 : nullptr;
      T* G_row = pb.grad_R ? pb.grad_R + row * pb.G_s0 + jt * pb.G_s1 : nullptr;
      V loss_v = zero, count_v = zero;
      for (int u = 0; u < 4; ++u) {
        const int64_t col = jj + u * W;
        const int64_t lanes = valid - col;
        const V rv = load_chunk(R_row + col * pb.R_s1, pb.R_s1, lanes);
        const V observed = M_row ? load_mask_chunk<T>(M_row + col * pb.M_s1, pb.M_s1, lanes)
                                 : (rv != zero ? one : zero);
        // Multiply (not select) by the mask, as the reference does: NaN/Inf propagate alike.
        V e = (rv - pred[t][u]) * observed;
        if (lanes < W) {
          for (int l = std::max<int64_t>(lanes, 0); l < W; ++l) e[l] = 0;  // padding
        }
        loss_v += e * e;
        count_v += observed;
        simd::store(e_buf + t * kTileCols + col, e);
        if (G_row) store_chunk(G_row + col * pb.G_s1, pb.G_s1, lanes, two * e);
      }
      loss += static_cast<double>(simd::sum_lanes<T>(loss_v));
      count += static_cast<int64_t>(simd::sum_lanes<T>(count_v));
    }
  }

  // Pass 2: Σ_j e_j q_j into dP[:, i] and e_j p_i into dQ[:, j].
  if constexpr (kGradP || kGradQ) {
    const T* q = pb.Q + jt;
    T* dq = kGradQ ? dQ + jt : nullptr;
    for (int64_t k = 0; k < r; ++k, q += n_pad) {
      V pk[NR], acc[NR];
      for (int t = 0; t < NR; ++t) {
        pk[t] = simd::broadcast(p[t * r + k]);
        acc[t] = zero;
      }
      for (int64_t col = 0; col < width; col += W) {
        const V qv = simd::load(q + col);
        V dqv = kGradQ ? simd::load(dq + col) : zero;
        for (int t = 0; t < NR; ++t) {
          const V e = simd::load(e_buf + t * kTileCols + col);
          if constexpr (kGradP) acc[t] += e * qv;
          if constexpr (kGradQ) dqv += e * pk[t];
        }
        if constexpr (kGradQ) simd::store(dq + col, dqv);
      }
      if constexpr (kGradP) {
        for (int t = 0; t < NR; ++t) {
          dP[k * pb.dP_s0 + (i + t) * pb.dP_s1] += simd::sum_lanes<T>(acc[t]);
        }
      }
      if constexpr (kGradQ) dq += n_pad;
    }
  }
}

// Per-thread buffers of a rowwise unit.
template <typename T>
struct RowwiseScratch {
  static constexpr int kRows = 4;
  std::vector<T> p, e_buf;
  explicit RowwiseScratch(int64_t r) : p(kRows * r), e_buf(kRows * kTileCols) {}
};

template <typename T, bool kGradP, bool kGradQ>
MF_EXT_INLINE void run_task(const DenseProblem<T>& pb, int64_t a, int64_t b,
                            RowwiseScratch<T>& scratch, double& loss, int64_t& count) {
  constexpr int kRows = RowwiseScratch<T>::kRows;
  const auto [i0, i1, j0, j1] = rowwise_cells<T>(pb.m, pb.n_pad, pb.groups, pb.lanes, a, b);
  T* dQ = kGradQ ? pb.dQ + (a / pb.groups) * pb.r * pb.n_pad : nullptr;  // this lane's
  T* p = scratch.p.data();
  T* e_buf = scratch.e_buf.data();
  for (int64_t jt = j0; jt < j1; jt += kTileCols) {
    const int64_t width = std::min(kTileCols, j1 - jt);  // a multiple of kBlock
    int64_t i = i0;
    for (; i + kRows <= i1; i += kRows) {
      process_rows<T, kRows, kGradP, kGradQ>(pb, i, jt, width, pb.dP, dQ, p, e_buf, loss, count);
    }
    for (; i < i1; ++i) {
      process_rows<T, 1, kGradP, kGradQ>(pb, i, jt, width, pb.dP, dQ, p, e_buf, loss, count);
    }
  }
}

// Unit (a, b): adds its cells' Σ e² and count to loss and count.
template <typename T>
MF_EXT_INLINE void run_rowwise_unit(const DenseProblem<T>& pb, int64_t a, int64_t b,
                                    RowwiseScratch<T>& scratch, double& loss, int64_t& count) {
  const bool gP = pb.dP != nullptr, gQ = pb.dQ != nullptr;
  if (gP && gQ) run_task<T, true, true>(pb, a, b, scratch, loss, count);
  else if (gP) run_task<T, true, false>(pb, a, b, scratch, loss, count);
  else if (gQ) run_task<T, false, true>(pb, a, b, scratch, loss, count);
  else run_task<T, false, false>(pb, a, b, scratch, loss, count);
}

}  // namespace mf_ext

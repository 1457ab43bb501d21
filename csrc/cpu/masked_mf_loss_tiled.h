// The tiled unit of the dense CPU kernel (csrc/cpu/masked_mf_loss.cpp), for ranks where the op
// is bound by arithmetic: each tile of R (at most tile_side × kTiledCols cells, tile_side = 128
// or 256 by rank) goes through three single-threaded GEMMs and one elementwise pass, in cache:
//   S   = P_Iᵀ Q_J                    (the prediction tile, written into the tile buffer)
//   E   = (R_IJ − S) · observed_IJ     (in place; the loss, the count and grad_R = 2E from it)
//   dP_I += −2 Q_J E_IJᵀ,  dQ_J += −2 P_I E_IJ   (straight into grad_P and grad_Q)
// Every operand is a view of P, Q, the caller's tile buffer or the gradients, so a unit needs no
// memory besides its tile buffer. P, Q and the gradients may each be row-major ((r, m) tensors)
// or column-major (the .T of (m, r) tables, as nn.Embedding users pass them): the GEMMs read
// either through BLAS's transpose flags.
#pragma once

#include <algorithm>
#include <cstdint>

#include "blas.h"
#include "masked_mf_loss_cells.h"
#include "simd.h"

namespace mf_ext {

constexpr int64_t kTiledCols = 256;  // columns of a tile, at most; rows: TiledProblem::tile_side

// R (m, n) with any strides; P (r, m), Q (r, n) and their gradients (dP.p, dQ.p nullptr: not
// wanted) as BLAS views of either layout; each unit (rows [i0, i1), columns [j0, j1)) adds its
// part of −2·dP, −2·dQ.
template <typename T>
struct TiledProblem : DenseCells<T> {
  int64_t m, n, r;
  blas::Matrix<const T> P, Q;  // (r, m), (r, n)
  blas::Matrix<T> dP, dQ;      // (r, m), (r, n)
  int64_t tile_side;           // rows of a tile, at most (the tile buffer: tile_side × kTiledCols)
  bool lanes_on_cols;          // units of lane k > 0 add dP (else dQ) into lane_sums[k − 1]
  T* lane_sums;                // (lanes − 1, r, m or n), row-major, or nullptr
};

// E (rows × cols, row-major) holds S on entry and the masked error on exit; returns through
// loss / count. Masks are multiplied in (not selected), as the reference does: NaN/Inf
// propagate alike.
template <typename T>
MF_EXT_INLINE void error_tile(const TiledProblem<T>& pb, int64_t ti, int64_t tj, int64_t rows,
                              int64_t cols, T* E, double& loss, int64_t& count) {
  using V = typename simd::Vec<T>::type;
  constexpr int W = simd::Vec<T>::width;
  const V zero = simd::broadcast<T>(0), one = simd::broadcast<T>(1), two = simd::broadcast<T>(2);
  for (int64_t i = 0; i < rows; ++i) {
    const T* R_row = pb.R + (ti + i) * pb.R_s0 + tj * pb.R_s1;
    const bool* M_row = pb.mask ? pb.mask + (ti + i) * pb.M_s0 + tj * pb.M_s1 : nullptr;
    T* G_row = pb.grad_R ? pb.grad_R + (ti + i) * pb.G_s0 + tj * pb.G_s1 : nullptr;
    T* e_row = E + i * cols;
    V loss_v = zero, count_v = zero;
    int64_t j = 0;
    if (pb.R_s1 == 1 && (!M_row || pb.M_s1 == 1)) {
      for (; j + W <= cols; j += W) {
        const V rv = simd::load(R_row + j);
        const V observed = M_row ? simd::load_mask<T>(M_row + j) : (rv != zero ? one : zero);
        const V e = (rv - simd::load(e_row + j)) * observed;
        simd::store(e_row + j, e);
        loss_v += e * e;
        count_v += observed;
        if (G_row) {
          if (pb.G_s1 == 1) {
            simd::store(G_row + j, two * e);
          } else {
            for (int l = 0; l < W; ++l) G_row[(j + l) * pb.G_s1] = 2 * e[l];
          }
        }
      }
    }
    T loss_s = 0, count_s = 0;
    for (; j < cols; ++j) {  // strided rows and the tail
      const T rv = R_row[j * pb.R_s1];
      const T observed = M_row ? static_cast<T>(M_row[j * pb.M_s1]) : static_cast<T>(rv != 0);
      const T e = (rv - e_row[j]) * observed;
      e_row[j] = e;
      loss_s += e * e;
      count_s += observed;
      if (G_row) G_row[j * pb.G_s1] = 2 * e;
    }
    loss += static_cast<double>(simd::sum_lanes<T>(loss_v)) + static_cast<double>(loss_s);
    count += static_cast<int64_t>(simd::sum_lanes<T>(count_v)) + static_cast<int64_t>(count_s);
  }
}

// The number of tiles of at most `side` that cut `length` into equal parts (no thin last tile).
inline int64_t tile_count(int64_t length, int64_t side) { return (length + side - 1) / side; }

// One unit: rows [i0, i1) × columns [j0, j1), in equal tiles. E: a tile_side × kTiledCols buffer.
template <typename T>
MF_EXT_INLINE void run_tiled_unit(const TiledProblem<T>& pb, int64_t i0, int64_t i1, int64_t j0,
                                  int64_t j1, T* E, double& loss, int64_t& count) {
  const int64_t r = pb.r;
  const int64_t row_tiles = tile_count(i1 - i0, pb.tile_side);
  const int64_t col_tiles = tile_count(j1 - j0, kTiledCols);
  for (int64_t it = 0; it < row_tiles; ++it) {
    const int64_t ti = i0 + (i1 - i0) * it / row_tiles;
    const int64_t rows = i0 + (i1 - i0) * (it + 1) / row_tiles - ti;
    const blas::Matrix<const T> P_I = pb.P.from(0, ti);
    for (int64_t jt = 0; jt < col_tiles; ++jt) {
      const int64_t tj = j0 + (j1 - j0) * jt / col_tiles;
      const int64_t cols = j0 + (j1 - j0) * (jt + 1) / col_tiles - tj;
      const blas::Matrix<const T> Q_J = pb.Q.from(0, tj);
      const blas::Matrix<T> E_IJ{E, cols, true};  // rows × cols, row-major
      blas::gemm<T>(rows, cols, r, 1, P_I.t(), Q_J, 0, E_IJ);
      error_tile(pb, ti, tj, rows, cols, E, loss, count);
      if (pb.dP.p) blas::gemm<T>(r, rows, cols, -2, Q_J, E_IJ.t(), 1, pb.dP.from(0, ti));
      if (pb.dQ.p) blas::gemm<T>(r, cols, rows, -2, P_I, E_IJ, 1, pb.dQ.from(0, tj));
    }
  }
}

}  // namespace mf_ext

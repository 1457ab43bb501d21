// CUDA kernel of mf_ext::masked_mf_loss_and_grads: one fused pass over R computes the loss and
// the gradients of R, P and Q that are asked for. Semantics are those of the CPU kernel
// (csrc/cpu/masked_mf_loss.cpp); dtypes float32, float64, float16 and bfloat16. float16 and
// bfloat16 are read, computed and accumulated in float32; the loss and gradients are returned in
// the input dtype, rounded once at the end, except grad_R under "mean": 2e is stored in the input
// dtype and then scaled by 1/|Ω| (known only after the pass), so it is rounded twice there.
//
// Work layout. R is cut into 128 × 128 tiles, and the tiles into a grid of row groups × column
// groups (a function of the shape only, at most a few hundred); one thread block owns one
// group's tiles. Per tile, each of the 256 threads owns an 8 × 8 micro-tile:
//   phase 1: pred = P[:, rows]ᵀ Q[:, cols], from rank chunks of P and Q staged in shared memory;
//   phase 2: e = (R − pred)·observed in registers, the loss, grad_R = 2e;
//   phase 3: per rank k, dP[k, rows] += e q_k (summed over the tile's columns with warp
//            shuffles) and dQ[k, cols] += p_kᵀ e (summed over the tile's rows through shared
//            memory), added into the block's own slice of a per-column-group dP partial and a
//            per-row-group dQ partial.
// A second pass of small kernels sums the partials in a fixed order. No atomics anywhere, so the
// results are bitwise the same from run to run, and the extra memory is O(r·(m + n)), never m·n.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator headers only (see setup.py)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../masked_mf_loss_common.h"
#include "common.cuh"

namespace mf_ext {
namespace {

static_assert(kThreads == 256, "16 × 16 threads, each owning 8 × 8 entries of a tile");
constexpr int kTile = 128;               // rows (and columns) of R per tile
constexpr int kHalfTile = kTile / 2;     // a thread's 8 rows are two runs of 4, 64 rows apart
constexpr int64_t kMaxGroups = 16;       // row (column) groups when both dimensions are large
constexpr int64_t kTargetBlocks = 256;   // about two waves of one block per SM (H200: 132 SMs)

// Four consecutive values, loaded or stored as one vector instruction.
template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

// Rank chunk staged in shared memory per step: 8 for float accumulation, 4 for double, so the
// shared-memory footprint (about 44 KB) is the same for both.
template <typename acc_t>
constexpr int rank_chunk() {
  return static_cast<int>(32 / sizeof(acc_t));
}

// Everything the fused kernel reads and writes, as raw pointers taken once on the host.
template <typename scalar_t, typename acc_t>
struct DenseProblem {
  int64_t m, n, r;
  const scalar_t* R;
  int64_t R_s0, R_s1;
  bool R_vec;  // rows are unit-stride and 4-aligned: 4 entries per load
  const bool* mask;  // nullptr: observed where R != 0
  int64_t M_s0, M_s1;
  bool M_vec;
  scalar_t* grad_R;  // nullptr: not wanted
  int64_t G_s0, G_s1;
  bool G_vec;
  const scalar_t* P;  // (r, m), contiguous
  const scalar_t* Q;  // (r, n), contiguous
  acc_t* dP_parts;    // (col_groups, r, m) or nullptr
  acc_t* dQ_parts;    // (row_groups, r, n) or nullptr
  double* loss_parts;     // (row_groups · col_groups): each block's Σ e²
  int64_t* count_parts;   // (row_groups · col_groups): each block's |Ω ∩ its tiles|
  int64_t tile_rows, tile_cols, row_groups, col_groups;
};

// Tile-local row (or column) of a thread's a-th row (column), a in [0, 8).
__device__ __forceinline__ int local_index(int t, int a) {
  return (a < 4 ? 0 : kHalfTile) + t * 4 + (a & 3);
}

// The thread's 8 values of a 128-wide shared-memory row: two aligned runs of 4.
template <typename acc_t>
__device__ __forceinline__ void load8(const acc_t* row, int t, acc_t (&out)[8]) {
  const Pack4<acc_t> lo = *reinterpret_cast<const Pack4<acc_t>*>(row + t * 4);
  const Pack4<acc_t> hi = *reinterpret_cast<const Pack4<acc_t>*>(row + kHalfTile + t * 4);
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    out[c] = lo.v[c];
    out[c + 4] = hi.v[c];
  }
}

// Stages P[k0 : k0+kc, i0 : i0+128] and Q[k0 : k0+kc, j0 : j0+128] in shared memory as acc_t,
// zero outside the matrices.
template <typename scalar_t, typename acc_t, int KC>
__device__ __forceinline__ void stage_rank_chunk(const DenseProblem<scalar_t, acc_t>& pb,
                                                 int64_t k0, int kc, int64_t i0, int64_t j0,
                                                 acc_t (*Ps)[kTile], acc_t (*Qs)[kTile]) {
  for (int idx = threadIdx.x; idx < kc * kTile; idx += kThreads) {
    const int kk = idx / kTile, t = idx % kTile;
    const int64_t k = k0 + kk, i = i0 + t, j = j0 + t;
    Ps[kk][t] = (k < pb.r && i < pb.m) ? static_cast<acc_t>(pb.P[k * pb.m + i]) : acc_t(0);
    Qs[kk][t] = (k < pb.r && j < pb.n) ? static_cast<acc_t>(pb.Q[k * pb.n + j]) : acc_t(0);
  }
}

// Sums v[0..8) over the 16 lanes of a half-warp (the threads that share these rows) as a
// reduce-scatter in 8 shuffles: each lane returns the total for a = bits 3, 2, 1 of its tx.
template <typename acc_t>
__device__ __forceinline__ acc_t reduce_rows_over_tx(const acc_t (&v)[8], int tx) {
  const bool b3 = tx & 8, b2 = tx & 4, b1 = tx & 2;
  acc_t w[4];
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const acc_t keep = b3 ? v[t + 4] : v[t];
    const acc_t give = b3 ? v[t] : v[t + 4];
    w[t] = keep + __shfl_xor_sync(0xffffffffu, give, 8);
  }
  acc_t x[2];
#pragma unroll
  for (int t = 0; t < 2; ++t) {
    const acc_t keep = b2 ? w[t + 2] : w[t];
    const acc_t give = b2 ? w[t] : w[t + 2];
    x[t] = keep + __shfl_xor_sync(0xffffffffu, give, 4);
  }
  const acc_t keep = b1 ? x[1] : x[0];
  const acc_t give = b1 ? x[0] : x[1];
  const acc_t y = keep + __shfl_xor_sync(0xffffffffu, give, 2);
  return y + __shfl_xor_sync(0xffffffffu, y, 1);
}

// Four entries of a row at columns j..j+3, as stored (T(0) past column n).
template <typename T>
__device__ __forceinline__ void load4(const T* __restrict__ row, int64_t j, int64_t n,
                                      int64_t stride, bool vec, Pack4<T>& out) {
  if (vec && j + 4 <= n) {
    out = *reinterpret_cast<const Pack4<T>*>(row + j);
  } else {
#pragma unroll
    for (int c = 0; c < 4; ++c) out.v[c] = j + c < n ? row[(j + c) * stride] : T(0);
  }
}

// Asks L2 for the tile of R (and of the mask) at (i0, j0) that this block processes next, so
// that DRAM streams it while the current tile is computed: one prefetch per 128-byte line.
template <typename T>
__device__ __forceinline__ void prefetch_tile(const T* base, int64_t s0, bool row_contiguous,
                                              int64_t m, int64_t n, int64_t i0, int64_t j0) {
  if (!row_contiguous) return;  // a hint only; strided tiles are left to the loads
  constexpr int kPerLine = 128 / sizeof(T) > 0 ? static_cast<int>(128 / sizeof(T)) : 1;
  constexpr int kLines = (kTile + kPerLine - 1) / kPerLine;  // lines per tile row
  for (int idx = threadIdx.x; idx < kTile * kLines; idx += kThreads) {
    const int64_t i = i0 + idx / kLines, j = j0 + (idx % kLines) * kPerLine;
    if (i < m && j < n) asm volatile("prefetch.global.L2 [%0];" ::"l"(base + i * s0 + j));
  }
}

// Phase 2 for one tile: turns pred (in `acc`) into e = (R − pred)·observed, in place (0 outside
// the matrix), adds Σ e² and |Ω| to the thread's sums and writes grad_R = 2e. Rows go a few at a
// time, all their loads issued before any arithmetic, so enough bytes of R are in flight.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void masked_error(const DenseProblem<scalar_t, acc_t>& pb, int64_t i0,
                                             int64_t j0, int tx, int ty, acc_t (&acc)[8][8],
                                             acc_t& tile_loss, int64_t& count) {
  const scalar_t* __restrict__ R = pb.R;
  const bool* __restrict__ M = pb.mask;
  scalar_t* __restrict__ G = pb.grad_R;
  constexpr int kRowsPerLoad = sizeof(acc_t) == 4 ? 4 : 2;  // as many as fit without spills
#pragma unroll
  for (int a0 = 0; a0 < 8; a0 += kRowsPerLoad) {
    Pack4<scalar_t> r_raw[kRowsPerLoad][2];
    Pack4<bool> m_raw[kRowsPerLoad][2];
#pragma unroll
    for (int a = 0; a < kRowsPerLoad; ++a) {
      const int64_t i = i0 + local_index(ty, a0 + a);
      const int64_t row = i < pb.m ? i : 0, cols = i < pb.m ? pb.n : 0;  // cols 0: all zero
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t j = j0 + h * kHalfTile + tx * 4;
        load4(R + row * pb.R_s0, j, cols, pb.R_s1, pb.R_vec, r_raw[a][h]);
        if (M) load4(M + row * pb.M_s0, j, cols, pb.M_s1, pb.M_vec, m_raw[a][h]);
      }
    }
#pragma unroll
    for (int a = 0; a < kRowsPerLoad; ++a) {
      const int64_t i = i0 + local_index(ty, a0 + a);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t j = j0 + h * kHalfTile + tx * 4;
        Pack4<scalar_t> twice_e;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const acc_t rv = static_cast<acc_t>(r_raw[a][h].v[c]);
          const bool inside = i < pb.m && j + c < pb.n;
          const bool seen = inside && (M ? m_raw[a][h].v[c] : rv != acc_t(0));
          const acc_t observed = seen ? acc_t(1) : acc_t(0);
          // Multiply (not select) by the mask, as the reference does: NaN/Inf propagate alike;
          // outside the matrix e is 0 (P, Q may hold NaN there too: select, not multiply).
          const acc_t e = inside ? (rv - acc[a0 + a][h * 4 + c]) * observed : acc_t(0);
          acc[a0 + a][h * 4 + c] = e;
          tile_loss += e * e;
          count += seen;
          twice_e.v[c] = static_cast<scalar_t>(acc_t(2) * e);
        }
        if (G && i < pb.m) {
          if (pb.G_vec && j + 4 <= pb.n) {
            *reinterpret_cast<Pack4<scalar_t>*>(G + i * pb.G_s0 + j) = twice_e;
          } else {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              if (j + c < pb.n) G[i * pb.G_s0 + (j + c) * pb.G_s1] = twice_e.v[c];
            }
          }
        }
      }
    }
  }
}

// One resident block per SM: the 8 × 8 micro-tile needs more than 128 registers a thread, and
// forcing two blocks per SM (at most 128) makes ptxas spill.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    masked_mf_loss_fused_kernel(const DenseProblem<scalar_t, acc_t> pb) {
  constexpr int KC = rank_chunk<acc_t>();
  __shared__ __align__(32) acc_t Ps[KC][kTile];
  __shared__ __align__(32) acc_t Qs[KC][kTile];
  __shared__ __align__(32) acc_t dQ_warp[kWarps][KC][kTile];  // per-warp column sums
  __shared__ acc_t dP_rows[KC][kTile];                         // the tile's row sums

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int warp = tid / 32, lane_half = (tid / 16) & 1;
  const int64_t gc = blockIdx.x, gr = blockIdx.y;
  const int64_t r = pb.r;
  const bool want_dP = pb.dP_parts != nullptr, want_dQ = pb.dQ_parts != nullptr;
  const auto [tr0, tr1] = split(pb.tile_rows, pb.row_groups, gr);
  const auto [tc0, tc1] = split(pb.tile_cols, pb.col_groups, gc);

  double loss = 0;
  int64_t count = 0;
  for (int64_t tr = tr0; tr < tr1; ++tr) {
    for (int64_t tc = tc0; tc < tc1; ++tc) {
      const int64_t i0 = tr * kTile, j0 = tc * kTile;
      const bool last_in_row = tc + 1 == tc1;
      if (!last_in_row || tr + 1 < tr1) {
        const int64_t next_i0 = (last_in_row ? tr + 1 : tr) * kTile;
        const int64_t next_j0 = (last_in_row ? tc0 : tc + 1) * kTile;
        prefetch_tile(pb.R, pb.R_s0, pb.R_vec, pb.m, pb.n, next_i0, next_j0);
        if (pb.mask) prefetch_tile(pb.mask, pb.M_s0, pb.M_vec, pb.m, pb.n, next_i0, next_j0);
      }

      // Phase 1: pred = P[:, rows]ᵀ Q[:, cols], rank chunk by rank chunk.
      acc_t acc[8][8];
#pragma unroll
      for (int a = 0; a < 8; ++a) {
#pragma unroll
        for (int c = 0; c < 8; ++c) acc[a][c] = acc_t(0);
      }
      for (int64_t k0 = 0; k0 < r; k0 += KC) {
        const int kc = r - k0 < KC ? static_cast<int>(r - k0) : KC;
        __syncthreads();  // the previous chunk (or tile) is done with Ps, Qs
        stage_rank_chunk<scalar_t, acc_t, KC>(pb, k0, kc, i0, j0, Ps, Qs);
        __syncthreads();
#pragma unroll 2
        for (int kk = 0; kk < kc; ++kk) {
          acc_t p[8], q[8];
          load8(Ps[kk], ty, p);
          load8(Qs[kk], tx, q);
#pragma unroll
          for (int a = 0; a < 8; ++a) {
#pragma unroll
            for (int c = 0; c < 8; ++c) acc[a][c] += p[a] * q[c];
          }
        }
      }

      // Phase 2: e, loss, grad_R.
      acc_t tile_loss = 0;
      masked_error(pb, i0, j0, tx, ty, acc, tile_loss, count);
      loss += static_cast<double>(tile_loss);
      if (!want_dP && !want_dQ) continue;

      // Phase 3: dP[k, rows] += Σ_cols e q_k, dQ[k, cols] += Σ_rows e p_k. The block owns these
      // slices of its partials: the first tile of its row (column) range writes, later ones add.
      // Chunks go last to first: the last one is still staged from phase 1.
      const bool first_col = tc == tc0, first_row = tr == tr0;
      const int64_t last_k0 = (r - 1) / KC * KC;  // r ≥ 1 here: partials exist only then
      for (int64_t k0 = last_k0; k0 >= 0; k0 -= KC) {
        const int kc = r - k0 < KC ? static_cast<int>(r - k0) : KC;
        if (k0 != last_k0) {
          __syncthreads();  // the previous chunk is done with Ps, Qs, dP_rows, dQ_warp
          stage_rank_chunk<scalar_t, acc_t, KC>(pb, k0, kc, i0, j0, Ps, Qs);
        }
        __syncthreads();
#pragma unroll 2
        for (int kk = 0; kk < kc; ++kk) {
          acc_t p[8], q[8];
          load8(Ps[kk], ty, p);
          load8(Qs[kk], tx, q);
          if (want_dP) {
            acc_t dp[8];
#pragma unroll
            for (int a = 0; a < 8; ++a) {
              dp[a] = acc_t(0);
#pragma unroll
              for (int c = 0; c < 8; ++c) dp[a] += acc[a][c] * q[c];
            }
            const acc_t row_sum = reduce_rows_over_tx(dp, tx);
            const int a_own = ((tx >> 3) & 1) * 4 + ((tx >> 2) & 1) * 2 + ((tx >> 1) & 1);
            if ((tx & 1) == 0) dP_rows[kk][local_index(ty, a_own)] = row_sum;  // tx^1: same
          }
          if (want_dQ) {
            acc_t dq[8];
#pragma unroll
            for (int c = 0; c < 8; ++c) {
              dq[c] = acc_t(0);
#pragma unroll
              for (int a = 0; a < 8; ++a) dq[c] += acc[a][c] * p[a];
            }
            // The warp's two ty share columns: add them with one shuffle, each lane keeping
            // one run of 4 columns (lane_half 0: tx*4.., 1: 64 + tx*4..).
            Pack4<acc_t> pair;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const acc_t keep = lane_half ? dq[c + 4] : dq[c];
              const acc_t give = lane_half ? dq[c] : dq[c + 4];
              pair.v[c] = keep + __shfl_xor_sync(0xffffffffu, give, 16);
            }
            *reinterpret_cast<Pack4<acc_t>*>(&dQ_warp[warp][kk][lane_half * kHalfTile + tx * 4]) =
                pair;
          }
        }
        // Add the chunk's sums into the block's partials, coalesced; (kk, t) maps to the same
        // thread in every tile, so each partial entry is only ever touched by one thread.
        __syncthreads();  // dP_rows and every warp's dQ_warp are complete
        for (int idx = tid; idx < kc * kTile; idx += kThreads) {
          const int kk = idx / kTile, t = idx % kTile;
          const int64_t i = i0 + t, j = j0 + t;
          if (want_dP && i < pb.m) {
            acc_t* dst = pb.dP_parts + (gc * r + k0 + kk) * pb.m + i;
            *dst = first_col ? dP_rows[kk][t] : *dst + dP_rows[kk][t];
          }
          if (want_dQ && j < pb.n) {
            acc_t s = dQ_warp[0][kk][t];
#pragma unroll
            for (int w = 1; w < kWarps; ++w) s += dQ_warp[w][kk][t];
            acc_t* dst = pb.dQ_parts + (gr * r + k0 + kk) * pb.n + j;
            *dst = first_row ? s : *dst + s;
          }
        }
      }
    }
  }

  // The block's loss and count, summed in a fixed order.
  const double block_loss = block_sum(loss);
  const int64_t block_count = block_sum(count);
  if (tid == 0) {
    const int64_t block = gr * pb.col_groups + gc;
    pb.loss_parts[block] = block_loss;
    pb.count_parts[block] = block_count;
  }
}

// Sums the blocks' losses and counts in a fixed order, applies the reduction on the device:
// loss_out = Σ e² · scale, scale_out = 1/max(|Ω|, 1) for "mean", 1 for "sum".
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    finalize_loss_kernel(const double* loss_parts, const int64_t* count_parts, int64_t blocks,
                         bool mean, scalar_t* loss_out, double* scale_out) {
  __shared__ double loss_sums[kThreads];
  __shared__ int64_t count_sums[kThreads];
  const double loss = sum_parts(loss_parts, blocks, loss_sums);
  const int64_t count = sum_parts(count_parts, blocks, count_sums);
  if (threadIdx.x == 0) {
    const double scale = mean ? 1.0 / static_cast<double>(count > 0 ? count : 1) : 1.0;
    *loss_out = static_cast<scalar_t>(loss * scale);
    *scale_out = scale;
  }
}

// out[idx] = −2·scale · Σ_g parts[g, idx] (g in order), idx over a (r, cols) contiguous layout.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    reduce_parts_kernel(const acc_t* parts, int64_t groups, int64_t total, const double* scale,
                        scalar_t* out) {
  const acc_t factor = static_cast<acc_t>(-2.0 * *scale);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t s = 0;
    for (int64_t g = 0; g < groups; ++g) s += parts[g * total + idx];
    out[idx] = static_cast<scalar_t>(s * factor);
  }
}

// Row and column groups, from the shape alone (so results do not depend on the GPU): at most
// kMaxGroups of each when both dimensions are large, more of the long one when the other is
// short, so that about kTargetBlocks blocks keep the GPU busy.
void plan_groups(int64_t m, int64_t n, int64_t& tile_rows, int64_t& tile_cols,
                 int64_t& row_groups, int64_t& col_groups) {
  tile_rows = (m + kTile - 1) / kTile;
  tile_cols = (n + kTile - 1) / kTile;
  row_groups = std::min(tile_rows, kMaxGroups);
  col_groups = std::min(tile_cols, kMaxGroups);
  if (row_groups < kMaxGroups) {
    col_groups = std::min(tile_cols, std::max(col_groups, (kTargetBlocks + row_groups - 1) / row_groups));
  }
  if (col_groups < kMaxGroups) {
    row_groups = std::min(tile_rows, std::max(row_groups, (kTargetBlocks + col_groups - 1) / col_groups));
  }
}

bool aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// The partial sums' grid-stride kernel: a thread per entry, at most 8 blocks per SM.
int reduce_grid(int64_t total) {
  return grid_for(total, kThreads, 8);
}

// Runs the fused pass on R (m, n), P (r, m), Q (r, n) (m, n ≥ 1); writes loss, grad_R (if
// defined, any strides), grad_P / grad_Q (contiguous, if defined).
template <typename scalar_t>
void masked_mf_loss_launch(const at::Tensor& R, const at::Tensor& P, const at::Tensor& Q,
                           const std::optional<at::Tensor>& mask, Reduction reduction,
                           const at::Tensor& loss, const at::Tensor& grad_R,
                           const at::Tensor& grad_P, const at::Tensor& grad_Q) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t m = R.size(0), n = R.size(1), r = P.size(0);
  const at::Tensor P_c = P.contiguous(), Q_c = Q.contiguous();  // O(r·(m + n)), not m·n
  const auto acc_opts = R.options().dtype(c10::CppTypeToScalarType<acc_t>::value);

  DenseProblem<scalar_t, acc_t> pb{};
  pb.m = m;
  pb.n = n;
  pb.r = r;
  pb.R = R.const_data_ptr<scalar_t>();
  pb.R_s0 = R.stride(0);
  pb.R_s1 = R.stride(1);
  pb.R_vec = pb.R_s1 == 1 && pb.R_s0 % 4 == 0 && aligned(pb.R, 4 * sizeof(scalar_t));
  if (mask.has_value()) {
    pb.mask = mask->const_data_ptr<bool>();
    pb.M_s0 = mask->stride(0);
    pb.M_s1 = mask->stride(1);
    pb.M_vec = pb.M_s1 == 1 && pb.M_s0 % 4 == 0 && aligned(pb.mask, 4);
  }
  if (grad_R.defined()) {
    pb.grad_R = grad_R.mutable_data_ptr<scalar_t>();
    pb.G_s0 = grad_R.stride(0);
    pb.G_s1 = grad_R.stride(1);
    pb.G_vec = pb.G_s1 == 1 && pb.G_s0 % 4 == 0 && aligned(pb.grad_R, 4 * sizeof(scalar_t));
  }
  pb.P = P_c.const_data_ptr<scalar_t>();
  pb.Q = Q_c.const_data_ptr<scalar_t>();
  plan_groups(m, n, pb.tile_rows, pb.tile_cols, pb.row_groups, pb.col_groups);

  // Partials need no zeroing: each block's first tile in a row (column) range writes its slice.
  at::Tensor dP_parts, dQ_parts;
  if (grad_P.defined() && r > 0) {
    dP_parts = at::empty({pb.col_groups, r, m}, acc_opts);
    pb.dP_parts = dP_parts.mutable_data_ptr<acc_t>();
  }
  if (grad_Q.defined() && r > 0) {
    dQ_parts = at::empty({pb.row_groups, r, n}, acc_opts);
    pb.dQ_parts = dQ_parts.mutable_data_ptr<acc_t>();
  }
  const int64_t blocks = pb.row_groups * pb.col_groups;
  const at::Tensor loss_parts = at::empty({blocks}, R.options().dtype(at::kDouble));
  const at::Tensor count_parts = at::empty({blocks}, R.options().dtype(at::kLong));
  const at::Tensor scale = at::empty({}, R.options().dtype(at::kDouble));  // stays on device
  pb.loss_parts = loss_parts.mutable_data_ptr<double>();
  pb.count_parts = count_parts.mutable_data_ptr<int64_t>();

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(pb.col_groups), static_cast<unsigned>(pb.row_groups));
  masked_mf_loss_fused_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(pb);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  finalize_loss_kernel<scalar_t><<<1, kThreads, 0, stream>>>(
      pb.loss_parts, pb.count_parts, blocks, reduction == Reduction::Mean,
      loss.mutable_data_ptr<scalar_t>(), scale.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (pb.dP_parts) {
    reduce_parts_kernel<scalar_t, acc_t><<<reduce_grid(r * m), kThreads, 0, stream>>>(
        pb.dP_parts, pb.col_groups, r * m, scale.const_data_ptr<double>(),
        grad_P.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (pb.dQ_parts) {
    reduce_parts_kernel<scalar_t, acc_t><<<reduce_grid(r * n), kThreads, 0, stream>>>(
        pb.dQ_parts, pb.row_groups, r * n, scale.const_data_ptr<double>(),
        grad_Q.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // grad_R was written as 2e; "mean" scales it by 1/|Ω|, read on the device (no sync).
  if (grad_R.defined() && reduction == Reduction::Mean) grad_R.mul_(scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_mf_loss_and_grads_cuda(
    const at::Tensor& R, const at::Tensor& P, const at::Tensor& Q,
    const std::optional<at::Tensor>& mask, c10::string_view reduction, bool grad_R, bool grad_P,
    bool grad_Q) {
  // Checks first: with a CPU tensor among CUDA ones the dispatcher lands here, and the device
  // check must speak before the guard does.
  check_masked_mf_loss_args(R, P, Q, mask);
  const Reduction red = parse_reduction("mf_ext.masked_mf_loss", reduction);
  const c10::cuda::CUDAGuard guard(R.device());
  // Contiguous gradients: the kernels write them so.
  MaskedMfOutputs out =
      allocate_masked_outputs(R, P, Q, grad_R, grad_P, grad_Q, /*table_layouts=*/false);
  if (R.numel() == 0) {  // nothing observed: zero loss and gradients, no kernel
    out.loss.zero_();
    out.grad_P.zero_();
    out.grad_Q.zero_();
    return {out.loss, out.grad_R, out.grad_P, out.grad_Q};
  }
  const RowMajorProblem k = orient_rows(R, P, Q, mask, out, grad_R, grad_P, grad_Q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, R.scalar_type(),
                                  "masked_mf_loss_cuda", [&] {
    masked_mf_loss_launch<scalar_t>(k.R, k.P, k.Q, k.mask, red, out.loss, k.grad_R, k.grad_P,
                                    k.grad_Q);
  });
  return {out.loss, out.grad_R, out.grad_P, out.grad_Q};
}

}  // namespace

TORCH_LIBRARY_IMPL(mf_ext, CUDA, m) {
  m.impl("masked_mf_loss_and_grads", &masked_mf_loss_and_grads_cuda);
}

}  // namespace mf_ext

// CUDA kernel of mf_ext::observed_mf_loss_and_grads: one fused pass over the observed triples
// (rows[t], cols[t], values[t]) computes the loss and the gradients that are asked for.
// Semantics are those of the CPU kernel (csrc/cpu/observed_mf_loss.cpp); dtypes float32,
// float64, float16 and bfloat16. float16 and bfloat16 are read, computed and accumulated in
// float32 (acc_t); the loss and gradients are returned in the input dtype, rounded once.
//
// Layout. P (r, m) and Q (r, n) are first transposed once, by a tiled kernel, into row layout
// (m, r_pad) and (n, r_pad) of acc_t, r zero-padded to whole 16-byte vectors (float4 / double2),
// so that a triple reads two contiguous vectors p_i, q_j. The gradients of P and Q are
// accumulated in the same row layout and transposed back at the end. Nothing of size nnz × r is
// ever formed; the extra memory is O(r·(m + n)) (plus, in deterministic mode, O(nnz) for a sort).
// The vectors and the transposes are in row_layout.cuh.
//
// The fused pass. A group of G lanes (a power of two ≤ 32, from r) owns a contiguous chunk of
// triples and walks it in order; each lane holds kVecs vectors of the r-vectors, so G·kVecs
// vectors cover r_pad. Per batch of G triples, the group loads the G triples' indices and
// scalars coalesced (one per lane) into shared memory, then for each triple:
//   e   = values[t] − ((p_iᵀ q_j + row_bias[i]) + col_bias[j])    (dot: shuffle butterfly)
//   L  += w_t e²  (double)           g = −2 · scale · w_t · e     (∂L/∂pred, as the CPU kernel)
//   dP[i] += g q_j, drow_bias[i] += g   in registers while consecutive triples share the row
//                                       (one float4 atomicAdd per vector when the row changes)
//   dQ[j] += g p_i, dcol_bias[j] += g   float4 atomicAdd per vector (dQ is small: L2-resident)
// The next triple's q_j (and p_i when its row differs) is loaded while the current one is
// computed. Triples may come in any order and repeat; rows sorted (or grouped) is fastest,
// since then each row of P is read, and each row of dP written, about once.
// Ranks beyond 32·4 vectors (r > 512 float, > 256 double) take a simpler kernel that loops
// over the vectors of each triple (no register caching).
//
// Determinism. By default dP, dQ and the bias gradients are summed with float atomics: fast,
// but the order of the additions (and so the last bits) varies from run to run. When
// torch.are_deterministic_algorithms_enabled(), the fused pass instead writes each triple's g
// (an nnz vector), and dP/drow_bias and dQ/dcol_bias are segment sums over a stable sort of the
// triples by row and by column: each row's (column's) terms are added in triple order by one
// warp (segment_sums.cuh), so results are bitwise repeatable. The loss is always reduced in a
// fixed order (per-block partials, then one block), so it is bitwise repeatable in both modes.
//
// Index ranges, with no host synchronization. A triple whose row or column is out of range is
// never read through: it is skipped, and the lowest such position is recorded on the device
// (atomicMin). The kernel that finishes the loss then, if there was one, sets the loss to NaN
// and writes the position, the bad value and the range into this device's index report: a few
// words of pinned host memory the kernel writes directly (kept until raised; the first one
// wins). Every call of the op on the device reads that report first, on the host, at no cost,
// and raises the IndexError it holds. So a bad index is raised by the first call on the same
// device whose host code runs after the GPU has finished the bad call (in a training loop, the
// next step or one soon after; right away after torch.cuda.synchronize()), and the bad call's
// own loss is NaN. mf_ext.check_observed_indices validates indices up front, with one sync
// (a direct check, for data that did not come through MatrixFactorization's id maps).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator headers only (see setup.py)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <limits>

#include "../observed_mf_loss_common.h"
#include "common.cuh"
#include "index_report.cuh"
#include "row_layout.cuh"
#include "segment_sums.cuh"

namespace mf_ext {
namespace {

// Vectors per lane the group size aims for: more lanes per triple means more shuffles per
// triple, more vectors per lane means more registers (fewer resident warps). Tunable.
constexpr int kTargetVecsPerLane = 2;
// Beyond 4 (r > 512 float, > 256 double) the registers spill: the wide-rank kernel instead.
constexpr int kMaxVecsPerLane = 4;

// Everything the kernels read and write, as raw pointers taken once on the host.
template <typename scalar_t, typename acc_t>
struct ObservedProblem {
  int64_t nnz, m, n;
  int64_t nvec;   // 16-byte vectors per row of P_rows, Q_rows (r_pad / width)
  int lanes;      // G: lanes per triple, a power of two ≤ 32
  int64_t chunk;  // triples per group, walked in order
  const void* rows;  // int32 or int64, per rows_64
  const void* cols;
  bool rows_64, cols_64;
  int64_t rows_s, cols_s;
  const scalar_t* values;
  int64_t values_s;
  const scalar_t* weights;  // nullptr: all 1
  int64_t weights_s;
  const scalar_t* row_bias;  // nullptr: none
  int64_t row_bias_s;
  const scalar_t* col_bias;
  int64_t col_bias_s;
  const acc_t* P;  // (m, r_pad) row layout
  const acc_t* Q;  // (n, r_pad)
  acc_t scale;     // 1, or 1/nnz for "mean"
  acc_t coef;      // −2 · scale
  scalar_t* grad_values;   // (nnz,) or nullptr
  scalar_t* grad_weights;  // (nnz,) or nullptr
  acc_t* coef_out;         // (nnz,) each triple's g (deterministic mode), or nullptr
  acc_t* dP;               // (m, r_pad) zeroed, atomics; nullptr: not wanted or deterministic
  acc_t* dQ;               // (n, r_pad)
  acc_t* drow_bias;        // (m,) zeroed, atomics; or nullptr
  acc_t* dcol_bias;        // (n,)
  double* loss_parts;      // (blocks,): each block's Σ w e²
  unsigned long long* first_bad;  // lowest position with an out-of-range index
};

// One triple's indices and scalars, as loaded by one lane and shared through shared memory.
template <typename acc_t>
struct Triple {
  int64_t i, j;
  acc_t value, weight, row_bias, col_bias;
  int valid;  // both indices in range
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ Triple<acc_t> load_triple(const ObservedProblem<scalar_t, acc_t>& pb,
                                                     int64_t t, bool report) {
  Triple<acc_t> tr;
  tr.i = load_index(pb.rows, pb.rows_64, t * pb.rows_s);
  tr.j = load_index(pb.cols, pb.cols_64, t * pb.cols_s);
  tr.valid = static_cast<uint64_t>(tr.i) < static_cast<uint64_t>(pb.m) &&
             static_cast<uint64_t>(tr.j) < static_cast<uint64_t>(pb.n);
  if (!tr.valid && report) atomicMin(pb.first_bad, static_cast<unsigned long long>(t));
  tr.value = static_cast<acc_t>(pb.values[t * pb.values_s]);
  tr.weight = pb.weights ? static_cast<acc_t>(pb.weights[t * pb.weights_s]) : acc_t(1);
  // A missing bias adds 0, which leaves the prediction bitwise unchanged.
  tr.row_bias = pb.row_bias && tr.valid ? static_cast<acc_t>(pb.row_bias[tr.i * pb.row_bias_s])
                                        : acc_t(0);
  tr.col_bias = pb.col_bias && tr.valid ? static_cast<acc_t>(pb.col_bias[tr.j * pb.col_bias_s])
                                        : acc_t(0);
  return tr;
}

// A valid triple's error e = value − pred, from its dot product p_iᵀ q_j; `leader` (one lane of
// the triple's lanes) adds w e² to its loss, in double.
template <typename acc_t>
__device__ __forceinline__ acc_t triple_error(const Triple<acc_t>& tr, acc_t dot, bool leader,
                                              double& loss) {
  const acc_t pred = (dot + tr.row_bias) + tr.col_bias;
  const acc_t e = tr.value - pred;
  if (leader) {
    loss += static_cast<double>(tr.weight) * (static_cast<double>(e) * static_cast<double>(e));
  }
  return e;
}

// loss_parts[blockIdx.x] = Σ loss over the block's threads, in a fixed order. Every thread of the
// block must call it.
__device__ __forceinline__ void store_block_loss(double loss, double* loss_parts) {
  const double block_loss = block_sum(loss);
  if (threadIdx.x == 0) loss_parts[blockIdx.x] = block_loss;
}

// The fused pass (see the header). kVecs: vectors of each r-vector held per lane.
template <typename scalar_t, typename acc_t, int kVecs>
__global__ void __launch_bounds__(kThreads)
    observed_fused_kernel(const ObservedProblem<scalar_t, acc_t> pb) {
  using V = typename Vec<acc_t>::type;
  __shared__ Triple<acc_t> batch[kThreads];

  const int G = pb.lanes;
  const int lane = threadIdx.x % 32;
  const int gl = lane & (G - 1);  // lane within the group
  const unsigned mask = G == 32 ? 0xffffffffu : ((1u << G) - 1u) << (lane & ~(G - 1));
  Triple<acc_t>* slots = batch + (threadIdx.x - gl);  // the group's G slots
  const int64_t group = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / G;
  const int64_t c0 = group * pb.chunk;
  const int64_t c1 = c0 + pb.chunk < pb.nnz ? c0 + pb.chunk : pb.nnz;
  const int64_t nvec = pb.nvec;
  const V* __restrict__ P = reinterpret_cast<const V*>(pb.P);
  const V* __restrict__ Q = reinterpret_cast<const V*>(pb.Q);
  V* dP = reinterpret_cast<V*>(pb.dP);
  V* dQ = reinterpret_cast<V*>(pb.dQ);

  // The run: consecutive valid triples of one row share p (loaded once) and dp, drb (summed in
  // registers, added to the row's gradient when the row changes).
  int64_t run_row = -1;
  V p[kVecs], dp[kVecs];
  acc_t drb = 0;
  // Loaded ahead: the current and the next triple's q_j, and p_i for a triple starting a run.
  V q_cur[kVecs], p_cur[kVecs], q_nxt[kVecs], p_nxt[kVecs];
#pragma unroll
  for (int u = 0; u < kVecs; ++u) {
    set_zero(p[u]);
    set_zero(dp[u]);
    set_zero(q_cur[u]);
    set_zero(p_cur[u]);
    set_zero(q_nxt[u]);
    set_zero(p_nxt[u]);
  }
  double loss = 0;

  auto flush_run = [&]() {
    if (run_row < 0) return;
    if (dP) {
#pragma unroll
      for (int u = 0; u < kVecs; ++u) {
        const int64_t v = gl + u * G;
        if (v < nvec) atomic_add_vec(dP + run_row * nvec + v, dp[u]);
      }
    }
    if (pb.drow_bias && gl == 0) atomicAdd(pb.drow_bias + run_row, drb);
  };
  // Issues the loads of triple `tr`: q_j always, p_i when it starts a new run.
  auto load_rows = [&](const Triple<acc_t>& tr, int64_t& expected_row, V (&q)[kVecs],
                       V (&pn)[kVecs]) -> bool {
    if (!tr.valid) return false;
    const bool new_row = tr.i != expected_row;
    expected_row = tr.i;
#pragma unroll
    for (int u = 0; u < kVecs; ++u) {
      const int64_t v = gl + u * G;
      if (v < nvec) {
        q[u] = Q[tr.j * nvec + v];
        if (new_row) pn[u] = P[tr.i * nvec + v];
      }
    }
    return new_row;
  };

  for (int64_t b = c0; b < c1; b += G) {
    const int count = static_cast<int>(c1 - b < G ? c1 - b : G);
    if (gl < count) slots[gl] = load_triple(pb, b + gl, true);
    __syncwarp(mask);

    acc_t my_g = 0, my_e = 0;  // lane s keeps triple b + s's results, for coalesced stores
    int64_t expected_row = run_row;  // the run's row once the loaded triples are processed
    Triple<acc_t> cur = slots[0];
    bool cur_new = load_rows(cur, expected_row, q_cur, p_cur);
    for (int s = 0; s < count; ++s) {
      Triple<acc_t> nxt{};  // valid = 0 past the batch
      bool nxt_new = false;
      if (s + 1 < count) {
        nxt = slots[s + 1];
        nxt_new = load_rows(nxt, expected_row, q_nxt, p_nxt);
      }
      if (cur.valid) {
        if (cur_new) {
          flush_run();
          run_row = cur.i;
          drb = 0;
#pragma unroll
          for (int u = 0; u < kVecs; ++u) {
            p[u] = p_cur[u];
            set_zero(dp[u]);
          }
        }
        acc_t dot = 0;
#pragma unroll
        for (int u = 0; u < kVecs; ++u) dot = dot_add(dot, p[u], q_cur[u]);
        // Butterfly: every lane of the group ends with the same sum (a + b == b + a).
        for (int offset = G / 2; offset > 0; offset /= 2) {
          dot += __shfl_xor_sync(mask, dot, offset);
        }
        const acc_t e = triple_error(cur, dot, gl == 0, loss);
        const acc_t g = pb.coef * (cur.weight * e);
        if (dP) {
#pragma unroll
          for (int u = 0; u < kVecs; ++u) add_scaled(dp[u], g, q_cur[u]);
        }
        drb += g;
        if (dQ) {
#pragma unroll
          for (int u = 0; u < kVecs; ++u) {
            const int64_t v = gl + u * G;
            if (v < nvec) atomic_add_vec(dQ + cur.j * nvec + v, scaled(g, p[u]));
          }
        }
        if (pb.dcol_bias && gl == 0) atomicAdd(pb.dcol_bias + cur.j, g);
        if (gl == s) {
          my_g = g;
          my_e = e;
        }
      }
      cur = nxt;
      cur_new = nxt_new;
#pragma unroll
      for (int u = 0; u < kVecs; ++u) {
        q_cur[u] = q_nxt[u];
        p_cur[u] = p_nxt[u];
      }
    }
    __syncwarp(mask);  // every lane is done reading the slots before the next batch fills them

    if (gl < count) {
      const int64_t t = b + gl;
      if (pb.grad_values) pb.grad_values[t] = static_cast<scalar_t>(-my_g);
      if (pb.grad_weights) pb.grad_weights[t] = static_cast<scalar_t>(pb.scale * (my_e * my_e));
      if (pb.coef_out) pb.coef_out[t] = my_g;
    }
  }
  flush_run();
  store_block_loss(gl == 0 ? loss : 0.0, pb.loss_parts);
}

// Ranks too large to hold in registers: one warp per chunk of triples, each triple's vectors
// looped over from memory (L1/L2), every gradient row updated by atomics per triple.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    observed_wide_rank_kernel(const ObservedProblem<scalar_t, acc_t> pb) {
  using V = typename Vec<acc_t>::type;
  const int lane = threadIdx.x % 32;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int64_t c0 = warp * pb.chunk;
  const int64_t c1 = c0 + pb.chunk < pb.nnz ? c0 + pb.chunk : pb.nnz;
  const int64_t nvec = pb.nvec;
  const V* __restrict__ P = reinterpret_cast<const V*>(pb.P);
  const V* __restrict__ Q = reinterpret_cast<const V*>(pb.Q);
  V* dP = reinterpret_cast<V*>(pb.dP);
  V* dQ = reinterpret_cast<V*>(pb.dQ);
  double loss = 0;
  for (int64_t t = c0; t < c1; ++t) {
    const Triple<acc_t> tr = load_triple(pb, t, lane == 0);
    acc_t g = 0, e = 0;
    if (tr.valid) {
      const V* p = P + tr.i * nvec;
      const V* q = Q + tr.j * nvec;
      acc_t dot = 0;
      for (int64_t v = lane; v < nvec; v += 32) dot = dot_add(dot, p[v], q[v]);
      for (int offset = 16; offset > 0; offset /= 2) {
        dot += __shfl_xor_sync(0xffffffffu, dot, offset);
      }
      e = triple_error(tr, dot, lane == 0, loss);
      g = pb.coef * (tr.weight * e);
      for (int64_t v = lane; v < nvec; v += 32) {
        if (dP) atomic_add_vec(dP + tr.i * nvec + v, scaled(g, q[v]));
        if (dQ) atomic_add_vec(dQ + tr.j * nvec + v, scaled(g, p[v]));
      }
      if (lane == 0) {
        if (pb.drow_bias) atomicAdd(pb.drow_bias + tr.i, g);
        if (pb.dcol_bias) atomicAdd(pb.dcol_bias + tr.j, g);
      }
    }
    if (lane == 0) {
      if (pb.grad_values) pb.grad_values[t] = static_cast<scalar_t>(-g);
      if (pb.grad_weights) pb.grad_weights[t] = static_cast<scalar_t>(pb.scale * (e * e));
      if (pb.coef_out) pb.coef_out[t] = g;
    }
  }
  store_block_loss(loss, pb.loss_parts);
}

// Sums the blocks' losses in a fixed order and divides by `divisor` (nnz for "mean", else 1);
// a call with a bad index gets a NaN loss and its report recorded.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    finalize_loss_kernel(const double* parts, int64_t count, double divisor, scalar_t* out,
                         const ObservedProblem<scalar_t, acc_t> pb, int64_t* report) {
  __shared__ double sums[kThreads];
  const double total = sum_parts(parts, count, sums);
  if (threadIdx.x == 0) {
    const unsigned long long first_bad = *pb.first_bad;
    const double nan = std::numeric_limits<double>::quiet_NaN();
    *out = static_cast<scalar_t>(first_bad == kNoBadIndex ? total / divisor : nan);
    record_bad_index(first_bad, pb.rows, pb.rows_64, pb.rows_s, pb.cols, pb.cols_64, pb.cols_s,
                     pb.m, pb.n, report);
  }
}

// Lanes per triple and vectors per lane for `nvec` vectors per row; kVecs 0: the wide kernel.
void plan_lanes(int64_t nvec, int& lanes, int& vecs) {
  int64_t g = 1;
  while (g < 32 && g * kTargetVecsPerLane < nvec) g *= 2;
  int64_t v = (nvec + g - 1) / g;
  int64_t k = 1;
  while (k < v) k *= 2;
  lanes = static_cast<int>(g);
  vecs = k <= kMaxVecsPerLane ? static_cast<int>(k) : 0;
  if (vecs == 0) lanes = 32;
}

// A gradient accumulator of `count` entries in acc_t: the output itself when it already has
// that dtype (zeroed when atomics add into it), else a buffer copied into it at the end.
at::Tensor bias_accumulator(const at::Tensor& out, at::ScalarType acc, bool zero) {
  if (out.scalar_type() == acc) return zero ? out.zero_() : out;
  return zero ? at::zeros(out.sizes(), out.options().dtype(acc))
              : at::empty(out.sizes(), out.options().dtype(acc));
}

template <typename scalar_t>
void observed_mf_loss_launch(const at::Tensor& rows, const at::Tensor& cols,
                             const at::Tensor& values, const at::Tensor& P, const at::Tensor& Q,
                             const std::optional<at::Tensor>& row_bias,
                             const std::optional<at::Tensor>& col_bias,
                             const std::optional<at::Tensor>& weights, Reduction reduction,
                             const ObservedOutputs& out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t W = Vec<acc_t>::width;
  const int64_t nnz = values.size(0), r = P.size(0), m = P.size(1), n = Q.size(1);
  const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const auto acc_opts = values.options().dtype(acc_type);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool deterministic = at::globalContext().deterministicAlgorithms();

  // Row layout, r padded to whole vectors (at least one, so that r = 0 needs no special case).
  const int64_t r_pad = std::max<int64_t>(W, (r + W - 1) / W * W);
  const at::Tensor P_rows = at::empty({m, r_pad}, acc_opts);
  const at::Tensor Q_rows = at::empty({n, r_pad}, acc_opts);
  launch_transpose<scalar_t, acc_t, acc_t>(P, P_rows.mutable_data_ptr<acc_t>(), m, r_pad, r_pad,
                                           stream);
  launch_transpose<scalar_t, acc_t, acc_t>(Q, Q_rows.mutable_data_ptr<acc_t>(), n, r_pad, r_pad,
                                           stream);

  ObservedProblem<scalar_t, acc_t> pb{};
  pb.nnz = nnz;
  pb.m = m;
  pb.n = n;
  pb.nvec = r_pad / W;
  int vecs = 0;
  plan_lanes(pb.nvec, pb.lanes, vecs);
  // A function of nnz alone, so the loss's reduction tree (and its bits) does not depend on
  // the GPU: long enough chunks for runs of a row to stay in registers, short enough for
  // thousands of groups.
  pb.chunk = std::clamp<int64_t>(nnz / 16384, 1, 256);
  pb.rows = rows.const_data_ptr();
  pb.rows_64 = rows.scalar_type() == at::kLong;
  pb.rows_s = rows.stride(0);
  pb.cols = cols.const_data_ptr();
  pb.cols_64 = cols.scalar_type() == at::kLong;
  pb.cols_s = cols.stride(0);
  pb.values = values.const_data_ptr<scalar_t>();
  pb.values_s = values.stride(0);
  if (weights.has_value()) {
    pb.weights = weights->const_data_ptr<scalar_t>();
    pb.weights_s = weights->stride(0);
  }
  if (row_bias.has_value()) {
    pb.row_bias = row_bias->const_data_ptr<scalar_t>();
    pb.row_bias_s = row_bias->stride(0);
  }
  if (col_bias.has_value()) {
    pb.col_bias = col_bias->const_data_ptr<scalar_t>();
    pb.col_bias_s = col_bias->stride(0);
  }
  pb.P = P_rows.const_data_ptr<acc_t>();
  pb.Q = Q_rows.const_data_ptr<acc_t>();
  // As the CPU kernel: scale and coef in the compute type.
  pb.scale = reduction == Reduction::Mean ? acc_t(1) / static_cast<acc_t>(nnz) : acc_t(1);
  pb.coef = acc_t(-2) * pb.scale;
  if (out.grad_values.defined()) pb.grad_values = out.grad_values.mutable_data_ptr<scalar_t>();
  if (out.grad_weights.defined()) pb.grad_weights = out.grad_weights.mutable_data_ptr<scalar_t>();

  const bool want_dP = out.grad_P.defined() && r > 0, want_dQ = out.grad_Q.defined() && r > 0;
  const bool want_drb = out.grad_row_bias.defined(), want_dcb = out.grad_col_bias.defined();
  // Deterministic mode writes every row by segment sums; atomics need zeros to add into.
  const bool zero = !deterministic;
  at::Tensor dP_rows, dQ_rows, drb, dcb, coef;
  if (want_dP) dP_rows = zero ? at::zeros({m, r_pad}, acc_opts) : at::empty({m, r_pad}, acc_opts);
  if (want_dQ) dQ_rows = zero ? at::zeros({n, r_pad}, acc_opts) : at::empty({n, r_pad}, acc_opts);
  if (want_drb) drb = bias_accumulator(out.grad_row_bias, acc_type, zero);
  if (want_dcb) dcb = bias_accumulator(out.grad_col_bias, acc_type, zero);
  if (deterministic) {
    if (want_dP || want_dQ || want_drb || want_dcb) {
      coef = at::empty({nnz}, acc_opts);
      pb.coef_out = coef.mutable_data_ptr<acc_t>();
    }
  } else {
    if (want_dP) pb.dP = dP_rows.mutable_data_ptr<acc_t>();
    if (want_dQ) pb.dQ = dQ_rows.mutable_data_ptr<acc_t>();
    if (want_drb) pb.drow_bias = drb.mutable_data_ptr<acc_t>();
    if (want_dcb) pb.dcol_bias = dcb.mutable_data_ptr<acc_t>();
  }

  const at::Tensor first_bad = at::full({}, static_cast<int64_t>(kNoBadIndex),
                                        values.options().dtype(at::kLong));
  pb.first_bad = reinterpret_cast<unsigned long long*>(first_bad.mutable_data_ptr<int64_t>());

  const int64_t groups = (nnz + pb.chunk - 1) / pb.chunk;
  const int64_t blocks = (groups * pb.lanes + kThreads - 1) / kThreads;
  const at::Tensor loss_parts = at::empty({blocks}, values.options().dtype(at::kDouble));
  pb.loss_parts = loss_parts.mutable_data_ptr<double>();
  const dim3 grid(static_cast<unsigned>(blocks));
  switch (vecs) {
    case 1: observed_fused_kernel<scalar_t, acc_t, 1><<<grid, kThreads, 0, stream>>>(pb); break;
    case 2: observed_fused_kernel<scalar_t, acc_t, 2><<<grid, kThreads, 0, stream>>>(pb); break;
    case 4: observed_fused_kernel<scalar_t, acc_t, 4><<<grid, kThreads, 0, stream>>>(pb); break;
    default: observed_wide_rank_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(pb);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  finalize_loss_kernel<scalar_t, acc_t><<<1, kThreads, 0, stream>>>(
      pb.loss_parts, blocks, reduction == Reduction::Mean ? static_cast<double>(nnz) : 1.0,
      out.loss.mutable_data_ptr<scalar_t>(), pb, index_report(values).mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (deterministic) {
    if (want_dP || want_drb) {
      launch_segment_sums<acc_t>(rows, m, cols, n, Q_rows, pb.nvec, coef, dP_rows, drb, stream);
    }
    if (want_dQ || want_dcb) {
      launch_segment_sums<acc_t>(cols, n, rows, m, P_rows, pb.nvec, coef, dQ_rows, dcb, stream);
    }
  }

  // Back to P's layout (r, m) and the output dtype.
  if (want_dP) {
    launch_transpose<acc_t, scalar_t, acc_t>(dP_rows.narrow(1, 0, r),
                                             out.grad_P.mutable_data_ptr<scalar_t>(), r, m, m,
                                             stream);
  } else if (out.grad_P.defined()) {
    out.grad_P.zero_();  // r == 0
  }
  if (want_dQ) {
    launch_transpose<acc_t, scalar_t, acc_t>(dQ_rows.narrow(1, 0, r),
                                             out.grad_Q.mutable_data_ptr<scalar_t>(), r, n, n,
                                             stream);
  } else if (out.grad_Q.defined()) {
    out.grad_Q.zero_();
  }
  if (want_drb && !drb.is_same(out.grad_row_bias)) out.grad_row_bias.copy_(drb);
  if (want_dcb && !dcb.is_same(out.grad_col_bias)) out.grad_col_bias.copy_(dcb);

}

ObservedResult observed_mf_loss_and_grads_cuda(
    const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& values, const at::Tensor& P,
    const at::Tensor& Q, const std::optional<at::Tensor>& row_bias,
    const std::optional<at::Tensor>& col_bias, const std::optional<at::Tensor>& weights,
    c10::string_view reduction, bool grad_values, bool grad_P, bool grad_Q, bool grad_row_bias,
    bool grad_col_bias, bool grad_weights) {
  // Checks first: with a CPU tensor among CUDA ones the dispatcher lands here, and the device
  // check must speak before the guard does.
  const ObservedGradFlags want{grad_values, grad_P, grad_Q, grad_row_bias, grad_col_bias,
                               grad_weights};
  const Reduction red =
      check_observed_call(rows, cols, values, P, Q, row_bias, col_bias, weights, reduction, want);
  const c10::cuda::CUDAGuard guard(values.device());
  raise_recorded_bad_index(values);
  const ObservedOutputs all =
      allocate_observed_outputs(values, P, Q, want, /*table_layouts=*/false);
  if (values.size(0) == 0) {  // nothing observed: zero loss and gradients, no kernel
    for (const at::Tensor* t : {&all.loss, &all.grad_P, &all.grad_Q, &all.grad_row_bias,
                                &all.grad_col_bias}) {
      t->zero_();
    }
    return all.as_tuple();
  }
  const ObservedOutputs out = want.wanted(all);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(),
                                  "observed_mf_loss_cuda", [&] {
    observed_mf_loss_launch<scalar_t>(rows, cols, values, P, Q, row_bias, col_bias, weights, red,
                                      out);
  });
  return all.as_tuple();
}

}  // namespace

TORCH_LIBRARY_IMPL(mf_ext, CUDA, m) {
  m.impl("observed_mf_loss_and_grads", &observed_mf_loss_and_grads_cuda);
}

}  // namespace mf_ext

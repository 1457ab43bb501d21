// CPU kernel of mf_ext::masked_mf_loss_and_grads: one fused pass over R computes the loss and
// the gradients of R, P and Q that are asked for.
//
// The matrix is cut into at most 4 × 4 blocks ("tasks"), a number fixed by the shape alone.
// Task (a, b) owns rows of group a and columns of group b; it writes its own slice of a dP
// partial (one per column group) and of a dQ partial (one per row group), and the partials are
// summed in a fixed order at the end. Results are therefore bitwise the same whatever the
// thread count, and the extra memory is at most 4·r·(m + n) values, never m·n.
//
// Inside a task, columns are swept in tiles of kTileCols so that a tile's Q and dQ slices
// (r × kTileCols) stay in cache while every row of the group passes over them. Per row and tile:
//   pass 1: pred = p_iᵀ Q[:, tile], e = (R − pred)·observed, the loss and grad_R;
//   pass 2: dP[:, i] += Q[:, tile]·e and dQ[:, tile] += p_i eᵀ (both scaled by −2 at the end).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../masked_mf_loss_common.h"
#include "simd.h"

namespace mf_ext {
namespace {

using simd::Vec;

constexpr int64_t kTileCols = 256;
constexpr int64_t kMaxGroups = 4;

// Everything a task reads and writes, as raw pointers taken once. P, Q are contiguous; Q is
// zero-padded to n_pad columns so every tile is a whole number of 4-vector blocks.
template <typename T>
struct DenseProblem {
  int64_t m, n, n_pad, r;
  const T* R;
  int64_t R_s0, R_s1;
  const bool* mask;  // nullptr: observed where R != 0
  int64_t M_s0, M_s1;
  T* grad_R;  // nullptr: not wanted
  int64_t G_s0, G_s1;
  const T* P;       // (r, m)
  const T* Q;       // (r, n_pad)
  T* dP_parts;      // (col_groups, r, m) or nullptr
  T* dQ_parts;      // (row_groups, r, n_pad) or nullptr
  int64_t row_groups, col_groups;
};

struct TaskResult {
  double loss = 0;
  int64_t count = 0;
};

// The tasks: row_groups × col_groups, from the shape and dtype alone. Columns are padded to
// n_pad, a whole number of 4-vector blocks, and cut into groups of whole blocks.
struct DenseGroups {
  int64_t n_pad, row_groups, col_groups;
};

template <typename T>
DenseGroups plan_dense_groups(int64_t m, int64_t n) {
  constexpr int64_t kBlock = 4 * Vec<T>::width;
  const int64_t n_pad = (n + kBlock - 1) / kBlock * kBlock;
  return {n_pad, std::clamp<int64_t>((m + 63) / 64, 1, kMaxGroups),
          std::clamp<int64_t>((n_pad / kBlock + 3) / 4, 1, kMaxGroups)};
}

// Task t's rows [i0, i1) and padded columns [j0, j1).
struct TaskCells {
  int64_t i0, i1, j0, j1;
};

template <typename T>
MF_EXT_INLINE TaskCells task_cells(int64_t m, const DenseGroups& g, int64_t task) {
  constexpr int64_t kBlock = 4 * Vec<T>::width;
  const Range rows = split(m, g.row_groups, task / g.col_groups);
  const Range blocks = split(g.n_pad / kBlock, g.col_groups, task % g.col_groups);
  return {rows.begin, rows.end, blocks.begin * kBlock, blocks.end * kBlock};
}

// W entries of a row starting at `p` with stride `stride`, of which only `lanes` exist (the
// rest read as 0).
template <typename T>
MF_EXT_INLINE typename Vec<T>::type load_chunk(const T* p, int64_t stride, int64_t lanes) {
  constexpr int W = Vec<T>::width;
  if (stride == 1 && lanes >= W) return simd::load(p);
  alignas(64) T tmp[W] = {};
  for (int64_t l = 0; l < std::min<int64_t>(lanes, W); ++l) tmp[l] = p[l * stride];
  return simd::load(tmp);
}

template <typename T>
MF_EXT_INLINE typename Vec<T>::type load_mask_chunk(const bool* p, int64_t stride, int64_t lanes) {
  constexpr int W = Vec<T>::width;
  if (stride == 1 && lanes >= W) return simd::load_mask<T>(p);
  alignas(64) bool tmp[W] = {};
  for (int64_t l = 0; l < std::min<int64_t>(lanes, W); ++l) tmp[l] = p[l * stride];
  return simd::load_mask<T>(tmp);
}

template <typename T>
MF_EXT_INLINE void store_chunk(T* p, int64_t stride, int64_t lanes, typename Vec<T>::type v) {
  constexpr int W = Vec<T>::width;
  if (stride == 1 && lanes >= W) return simd::store(p, v);
  for (int64_t l = 0; l < std::min<int64_t>(lanes, W); ++l) p[l * stride] = v[l];
}

// Rows i .. i+NR−1 against one column tile [jt, jt + width). Several rows at once let every
// load of Q and dQ feed NR multiply-adds instead of one.
template <typename T, int NR, bool kGradP, bool kGradQ>
MF_EXT_INLINE void process_rows(const DenseProblem<T>& pb, int64_t i, int64_t jt, int64_t width,
                                T* dP, T* dQ, T* p, T* e_buf, double& loss, int64_t& count) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  constexpr int64_t kBlock = 4 * W;
  const int64_t r = pb.r, m = pb.m, n_pad = pb.n_pad;
  const int64_t valid = pb.n - jt;  // real columns from jt on
  const V zero = simd::broadcast<T>(0), one = simd::broadcast<T>(1), two = simd::broadcast<T>(2);

  for (int t = 0; t < NR; ++t) {
    for (int64_t k = 0; k < r; ++k) p[t * r + k] = pb.P[k * m + i + t];
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
        for (int t = 0; t < NR; ++t) dP[k * m + i + t] += simd::sum_lanes<T>(acc[t]);
      }
      if constexpr (kGradQ) dq += n_pad;
    }
  }
}

template <typename T, bool kGradP, bool kGradQ>
MF_EXT_INLINE void run_task(const DenseProblem<T>& pb, int64_t task, TaskResult& result) {
  constexpr int kRows = 4;
  const int64_t r = pb.r, m = pb.m, n_pad = pb.n_pad;
  const auto [i0, i1, j0, j1] =
      task_cells<T>(m, DenseGroups{n_pad, pb.row_groups, pb.col_groups}, task);
  T* dP = kGradP ? pb.dP_parts + (task % pb.col_groups) * r * m : nullptr;
  T* dQ = kGradQ ? pb.dQ_parts + (task / pb.col_groups) * r * n_pad : nullptr;

  std::vector<T> p(kRows * r);
  std::vector<T> e_buf(kRows * kTileCols);
  double loss = 0;
  int64_t count = 0;
  for (int64_t jt = j0; jt < j1; jt += kTileCols) {
    const int64_t width = std::min(kTileCols, j1 - jt);  // a multiple of kBlock
    int64_t i = i0;
    for (; i + kRows <= i1; i += kRows) {
      process_rows<T, kRows, kGradP, kGradQ>(pb, i, jt, width, dP, dQ, p.data(), e_buf.data(),
                                             loss, count);
    }
    for (; i < i1; ++i) {
      process_rows<T, 1, kGradP, kGradQ>(pb, i, jt, width, dP, dQ, p.data(), e_buf.data(), loss,
                                         count);
    }
  }
  result.loss = loss;
  result.count = count;
}

template <typename T>
MF_EXT_INLINE void run_tasks(const DenseProblem<T>& pb, int64_t begin, int64_t end,
                             TaskResult* results) {
  const bool gP = pb.dP_parts != nullptr, gQ = pb.dQ_parts != nullptr;
  for (int64_t t = begin; t < end; ++t) {
    if (gP && gQ) run_task<T, true, true>(pb, t, results[t]);
    else if (gP) run_task<T, true, false>(pb, t, results[t]);
    else if (gQ) run_task<T, false, true>(pb, t, results[t]);
    else run_task<T, false, false>(pb, t, results[t]);
  }
}

// Non-template entry points, so that each can be cloned per instruction set.
MF_EXT_TARGET_CLONES void run_tasks_float(const DenseProblem<float>& pb, int64_t begin,
                                          int64_t end, TaskResult* results) {
  run_tasks(pb, begin, end, results);
}
MF_EXT_TARGET_CLONES void run_tasks_double(const DenseProblem<double>& pb, int64_t begin,
                                           int64_t end, TaskResult* results) {
  run_tasks(pb, begin, end, results);
}
inline void run_tasks_any(const DenseProblem<float>& pb, int64_t b, int64_t e, TaskResult* r) {
  run_tasks_float(pb, b, e, r);
}
inline void run_tasks_any(const DenseProblem<double>& pb, int64_t b, int64_t e, TaskResult* r) {
  run_tasks_double(pb, b, e, r);
}

// out[k, j] = scale · Σ_g parts[g, k, j] (g in order), for j < cols of a (r, stride) layout.
template <typename T>
void reduce_parts(const T* parts, int64_t groups, int64_t r, int64_t cols, int64_t stride,
                  T scale, T* out) {
  at::parallel_for(0, r * cols, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t k = idx / cols, j = idx % cols;
      T s = 0;
      for (int64_t g = 0; g < groups; ++g) s += parts[(g * r + k) * stride + j];
      out[idx] = s * scale;
    }
  });
}

// Runs the fused pass on R (m, n), P (r, m), Q (r, n); writes grad_R (if defined), and
// grad_P / grad_Q (contiguous, if defined). Returns the loss.
template <typename T>
double masked_mf_loss_impl(const at::Tensor& R, const at::Tensor& P, const at::Tensor& Q,
                           const std::optional<at::Tensor>& mask, Reduction reduction,
                           const at::Tensor& grad_R, const at::Tensor& grad_P,
                           const at::Tensor& grad_Q) {
  const int64_t m = R.size(0), n = R.size(1), r = P.size(0);
  if (grad_P.defined()) grad_P.zero_();
  if (grad_Q.defined()) grad_Q.zero_();
  if (m == 0 || n == 0) return 0.0;

  const DenseGroups groups = plan_dense_groups<T>(m, n);
  const int64_t n_pad = groups.n_pad;
  at::Tensor P_c = P.contiguous();
  at::Tensor Q_pad = at::zeros({r, n_pad}, Q.options());
  Q_pad.narrow(1, 0, n).copy_(Q);

  DenseProblem<T> pb{};
  pb.m = m;
  pb.n = n;
  pb.n_pad = n_pad;
  pb.r = r;
  pb.R = R.const_data_ptr<T>();
  pb.R_s0 = R.stride(0);
  pb.R_s1 = R.stride(1);
  if (mask.has_value()) {
    pb.mask = mask->const_data_ptr<bool>();
    pb.M_s0 = mask->stride(0);
    pb.M_s1 = mask->stride(1);
  }
  if (grad_R.defined()) {
    pb.grad_R = grad_R.mutable_data_ptr<T>();
    pb.G_s0 = grad_R.stride(0);
    pb.G_s1 = grad_R.stride(1);
  }
  pb.P = P_c.const_data_ptr<T>();
  pb.Q = Q_pad.const_data_ptr<T>();
  pb.row_groups = groups.row_groups;
  pb.col_groups = groups.col_groups;
  at::Tensor dP_parts, dQ_parts;
  if (grad_P.defined() && r > 0) {
    dP_parts = at::zeros({pb.col_groups, r, m}, P.options());
    pb.dP_parts = dP_parts.mutable_data_ptr<T>();
  }
  if (grad_Q.defined() && r > 0) {
    dQ_parts = at::zeros({pb.row_groups, r, n_pad}, Q.options());
    pb.dQ_parts = dQ_parts.mutable_data_ptr<T>();
  }

  const int64_t tasks = pb.row_groups * pb.col_groups;
  std::vector<TaskResult> results(tasks);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    run_tasks_any(pb, begin, end, results.data());
  });

  double loss = 0;
  int64_t count = 0;
  for (const TaskResult& t : results) {
    loss += t.loss;
    count += t.count;
  }
  const double scale = reduction == Reduction::Mean ? 1.0 / std::max<int64_t>(count, 1) : 1.0;
  if (pb.dP_parts) {
    reduce_parts<T>(pb.dP_parts, pb.col_groups, r, m, m, static_cast<T>(-2 * scale),
                    grad_P.mutable_data_ptr<T>());
  }
  if (pb.dQ_parts) {
    reduce_parts<T>(pb.dQ_parts, pb.row_groups, r, n, n_pad, static_cast<T>(-2 * scale),
                    grad_Q.mutable_data_ptr<T>());
  }
  if (grad_R.defined() && scale != 1.0) grad_R.mul_(scale);
  return loss * scale;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_mf_loss_and_grads_cpu(
    const at::Tensor& R, const at::Tensor& P, const at::Tensor& Q,
    const std::optional<at::Tensor>& mask, c10::string_view reduction, bool grad_R, bool grad_P,
    bool grad_Q) {
  check_masked_mf_loss_args(R, P, Q, mask);
  const Reduction red = parse_reduction("mf_ext.masked_mf_loss", reduction);
  TORCH_CHECK_TYPE(R.scalar_type() == at::kFloat || R.scalar_type() == at::kDouble,
                   "mf_ext.masked_mf_loss: the CPU kernel supports float32 and float64, got ",
                   R.scalar_type());
  MaskedMfOutputs out = allocate_masked_outputs(R, P, grad_R, grad_P, grad_Q);
  if (grad_R && R.numel() == 0) out.grad_R.zero_();
  const RowMajorProblem k = orient_rows(R, P, Q, mask, out, grad_R, grad_P, grad_Q);
  AT_DISPATCH_FLOATING_TYPES(R.scalar_type(), "masked_mf_loss_cpu", [&] {
    out.loss.fill_(masked_mf_loss_impl<scalar_t>(k.R, k.P, k.Q, k.mask, red, k.grad_R, k.grad_P,
                                                 k.grad_Q));
  });
  return {out.loss, out.grad_R, out.grad_P, out.grad_Q};
}

// mf_ext::_dense_partition: how the kernel above cuts R (m, n) into tasks, computed by its own
// planning code, for tests. In R's coordinates, flattened: [transposed (the kernel reads R
// column-major), row groups, column groups, tasks, then per task in task order its rows
// [begin, end) and columns [begin, end)]; no tasks when R is empty.
std::vector<int64_t> dense_partition_cpu(const at::Tensor& R, const at::Tensor& P,
                                         const at::Tensor& Q) {
  check_masked_mf_loss_args(R, P, Q, std::nullopt);
  TORCH_CHECK_TYPE(R.scalar_type() == at::kFloat || R.scalar_type() == at::kDouble,
                   "mf_ext._dense_partition: R must be float32 or float64, got ",
                   R.scalar_type());
  const bool transposed = read_transposed(R);
  const int64_t m = transposed ? R.size(1) : R.size(0), n = transposed ? R.size(0) : R.size(1);
  std::vector<int64_t> out{transposed, 0, 0, 0};
  if (m == 0 || n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(R.scalar_type(), "dense_partition_cpu", [&] {
    const DenseGroups g = plan_dense_groups<scalar_t>(m, n);
    out[1 + transposed] = g.row_groups;
    out[2 - transposed] = g.col_groups;
    out[3] = g.row_groups * g.col_groups;
    for (int64_t task = 0; task < out[3]; ++task) {
      const TaskCells c = task_cells<scalar_t>(m, g, task);
      const int64_t rows[2] = {c.i0, c.i1}, cols[2] = {c.j0, std::min(c.j1, n)};
      const int64_t* first = transposed ? cols : rows;
      const int64_t* second = transposed ? rows : cols;
      out.insert(out.end(), {first[0], first[1], second[0], second[1]});
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mf_ext, CPU, m) {
  m.impl("masked_mf_loss_and_grads", &masked_mf_loss_and_grads_cpu);
  m.impl("_dense_partition", &dense_partition_cpu);
}

}  // namespace mf_ext

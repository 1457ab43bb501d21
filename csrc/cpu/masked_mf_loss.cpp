// CPU kernel of mf_ext::masked_mf_loss_and_grads: one fused pass over R computes the loss and
// the gradients of R, P and Q that are asked for.
//
// Units and ownership. Columns of R are cut into G groups, rows into K·G groups ("lanes" of G
// row groups each; K ≤ 4 and G ≤ 64 from the shape, rank and dtype alone); unit (a, b) owns
// the cells of row group a × column group b, K·G² units in all. They run in G rounds: round s
// runs, in every lane, the units (a, (a + s) mod G), in parallel. Within a round no two units
// share a row group, nor a column group within a lane, so each adds its dP contribution
// straight into grad_P and its dQ contribution into its lane's accumulator (lane 0: straight
// into grad_Q on the tiled path), with no per-unit partials, and every entry receives its
// contributions in the fixed order of the rounds (lanes are summed in order at the end): results
// are bitwise the same whatever the thread count. The tiled path puts its lanes on the longer
// side: when R has more columns than rows, the roles swap (a: column groups, b: row groups, a
// dP accumulator per lane), so a 500 × 50000 matrix gets as many units at once as 50000 × 500.
// Up to K·G units run at once (on a 4096² matrix: 64 rowwise, 32 tiled, 16 tiled from rank
// 256); the rounds overlap, with no barrier between them (run_units).
//
// Two unit kernels, chosen by rank and shape (plan_dense; MF_EXT_DENSE_PATH=rowwise|tiled
// forces one, for tests and benchmarks):
// - rowwise, for small ranks, where the op is bound by reading R: a unit's rows sweep its
//   columns tile by tile, each tile's Q and dQ slices in cache (csrc/cpu/masked_mf_loss_rowwise.h).
// - tiled, for larger ranks, where it is bound by arithmetic: units of at least 128 × 128 cells
//   (256 × 256 from rank 256, where bigger GEMMs pay most: benchmarks/results/dense_cpu.md), each
//   cut into equal tiles of at most that many rows and 256 columns; each tile goes through three
//   single-threaded BLAS GEMMs and one elementwise pass in cache (csrc/cpu/masked_mf_loss_tiled.h).
// Layouts. P and Q are read in place as (r, m) / (r, n) tensors or as the .T of (m, r) / (n, r)
// tables (nn.Embedding weights); grad_P / grad_Q take the table layout when P / Q has it, so
// autograd hands the table a gradient it keeps, with no copy (allocate_masked_outputs).
// Extra memory besides the outputs: rowwise, a zero-padded copy of Q and K dQ accumulators,
// (1 + K)·r·n_pad ≤ 5·r·n_pad values (n_pad: n rounded up to 64 float32 / 32 float64 columns),
// plus 4·(r + 256) values per thread (P is read with any strides); tiled, copies of P and Q
// only when neither layout holds (r·(m + n) values), K − 1 ≤ 3 lane accumulators of the shorter
// side's gradient ((K − 1)·r·min(m, n) values; K = 1 on square shapes) plus one tile buffer per
// thread (at most 256 × 256 values: 256 KiB float32, 512 KiB float64). Both: K·G² ≤ 4096 loss
// partials and as many flags.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator headers only (see setup.py)
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include "../masked_mf_loss_common.h"
#include "masked_mf_loss_rowwise.h"
#include "masked_mf_loss_tiled.h"
#include "unit_rounds.h"
#include "simd.h"

namespace mf_ext {
namespace {

using simd::Vec;

constexpr int64_t kMaxGroups = 64;         // G (tiled): enough units for 64 threads
constexpr int64_t kMaxRowwiseGroups = 16;  // G (rowwise), times
constexpr int64_t kMaxLanes = 4;           // K lanes: 64 row groups (tiled: K·G ≤ kMaxGroups)
constexpr int64_t kRowwiseMinRows = 32;    // rows of a rowwise unit, at least (where m allows)
constexpr int64_t kTiledMinSide = 128;     // rows and columns of a tiled unit, at least,
constexpr int64_t kTiledWideSide = 256;    // and from this rank on (fewer units at once,
constexpr int64_t kTiledWideMinRank = 256;  // but GEMMs of twice the size: 10-20 % faster)
// The rowwise path below these ranks, tiled from them on (benchmarks/results/dense_cpu.md).
constexpr int64_t kTiledMinRankFloat = 16;
constexpr int64_t kTiledMinRankDouble = 32;

enum class DensePath : int64_t { Rowwise = 0, Tiled = 1 };

struct TaskResult {
  double loss = 0;
  int64_t count = 0;
};

// The path, G and K from the shape, rank and dtype alone (and MF_EXT_DENSE_PATH). Rowwise units
// cut the padded columns into groups of whole 4-vector blocks.
struct DensePlan {
  DensePath path;
  int64_t n_pad;
  int64_t groups;  // G: column groups; rows are cut into lanes · G groups
  int64_t lanes;   // K: each lane of G row groups has its own dQ accumulator
  int64_t side;    // tiled: the least side of a unit, and the most rows of a tile
  bool lanes_on_cols = false;  // tiled, K > 1 and n > m: columns cut into K·G groups, rows G
};

inline const char* forced_dense_path() {
  const char* env = std::getenv("MF_EXT_DENSE_PATH");
  if (env == nullptr || *env == 0 || std::strcmp(env, "auto") == 0) return nullptr;
  TORCH_CHECK_VALUE(std::strcmp(env, "rowwise") == 0 || std::strcmp(env, "tiled") == 0,
                    "mf_ext.masked_mf_loss: MF_EXT_DENSE_PATH must be rowwise, tiled or auto, "
                    "got '", env, "'");
  return env;
}

template <typename T>
DensePlan plan_dense(int64_t m, int64_t n, int64_t r) {
  constexpr int64_t kBlock = 4 * Vec<T>::width;
  const int64_t min_rank = std::is_same_v<T, float> ? kTiledMinRankFloat : kTiledMinRankDouble;
  const char* forced = forced_dense_path();
  const bool tiled = forced ? forced[0] == 't'
                            : r >= min_rank && std::min(m, n) >= 2 * kTiledMinSide &&
                                  blas::has_gemm<T>(std::max({m, n, r}));
  if (tiled) {
    // Wide units only where they still leave two groups a side.
    const int64_t side = r >= kTiledWideMinRank && std::min(m, n) >= 2 * kTiledWideSide
                             ? kTiledWideSide
                             : kTiledMinSide;
    const int64_t groups = std::clamp<int64_t>(std::min(m, n) / side, 1, kMaxGroups);
    const int64_t lanes = std::clamp<int64_t>(
        std::min(std::max(m, n) / (side * groups), kMaxGroups / groups), 1, kMaxLanes);
    return {DensePath::Tiled, n, groups, lanes, side, lanes > 1 && n > m};
  }
  // Rowwise: column groups of at least kTileCols (narrower ones spend more on the per-row
  // sums of dP than on the cells), then as many lanes as give every row group kRowwiseMinRows.
  const int64_t n_pad = (n + kBlock - 1) / kBlock * kBlock;
  const int64_t groups = std::clamp<int64_t>(n_pad / kTileCols, 1, kMaxRowwiseGroups);
  const int64_t lanes = std::clamp<int64_t>(m / (kRowwiseMinRows * groups), 1, kMaxLanes);
  return {DensePath::Rowwise, n_pad, groups, lanes, 0};
}

// Unit (a, b)'s rows [i0, i1) and columns [j0, j1) (rowwise: padded columns).
template <typename T>
MF_EXT_INLINE TaskCells task_cells(int64_t m, const DensePlan& plan, int64_t a, int64_t b) {
  if (plan.path == DensePath::Rowwise) {
    return rowwise_cells<T>(m, plan.n_pad, plan.groups, plan.lanes, a, b);
  }
  if (plan.lanes_on_cols) {
    const Range cols = split(plan.n_pad, plan.lanes * plan.groups, a);
    const Range rows = split(m, plan.groups, b);
    return {rows.begin, rows.end, cols.begin, cols.end};
  }
  const Range rows = split(m, plan.lanes * plan.groups, a);
  const Range cols = split(plan.n_pad, plan.groups, b);
  return {rows.begin, rows.end, cols.begin, cols.end};
}

template <typename T>
MF_EXT_INLINE void run_rowwise(const DenseProblem<T>& pb, int64_t a, int64_t b,
                               RowwiseScratch<T>& scratch, TaskResult& result) {
  double loss = 0;
  int64_t count = 0;
  run_rowwise_unit(pb, a, b, scratch, loss, count);
  result.loss = loss;
  result.count = count;
}

template <typename T>
MF_EXT_INLINE void run_tiled(const TiledProblem<T>& pb, const TaskCells& c, int64_t lane, T* E,
                             TaskResult& result) {
  double loss = 0;
  int64_t count = 0;
  if (lane == 0) {
    run_tiled_unit(pb, c.i0, c.i1, c.j0, c.j1, E, loss, count);
  } else {  // lanes 1, 2, ... add the lane side's gradient into accumulators of their own
    TiledProblem<T> lane_pb = pb;
    blas::Matrix<T>& target = pb.lanes_on_cols ? lane_pb.dP : lane_pb.dQ;
    const int64_t length = pb.lanes_on_cols ? pb.m : pb.n;
    if (target.p) target = {pb.lane_sums + (lane - 1) * pb.r * length, length, true};
    run_tiled_unit(lane_pb, c.i0, c.i1, c.j0, c.j1, E, loss, count);
  }
  result.loss = loss;
  result.count = count;
}

// Non-template entry points, so that each can be cloned per instruction set.
MF_EXT_TARGET_CLONES void run_unit_float(const DenseProblem<float>& pb, int64_t a, int64_t b,
                                         RowwiseScratch<float>& s, TaskResult& result) {
  run_rowwise(pb, a, b, s, result);
}
MF_EXT_TARGET_CLONES void run_unit_double(const DenseProblem<double>& pb, int64_t a, int64_t b,
                                          RowwiseScratch<double>& s, TaskResult& result) {
  run_rowwise(pb, a, b, s, result);
}
MF_EXT_TARGET_CLONES void run_unit_float(const TiledProblem<float>& pb, const TaskCells& c,
                                         int64_t lane, float* E, TaskResult& result) {
  run_tiled(pb, c, lane, E, result);
}
MF_EXT_TARGET_CLONES void run_unit_double(const TiledProblem<double>& pb, const TaskCells& c,
                                          int64_t lane, double* E, TaskResult& result) {
  run_tiled(pb, c, lane, E, result);
}
template <typename... Args>
inline void run_unit_any(const DenseProblem<float>& pb, Args&&... args) {
  run_unit_float(pb, std::forward<Args>(args)...);
}
template <typename... Args>
inline void run_unit_any(const DenseProblem<double>& pb, Args&&... args) {
  run_unit_double(pb, std::forward<Args>(args)...);
}
template <typename... Args>
inline void run_unit_any(const TiledProblem<float>& pb, Args&&... args) {
  run_unit_float(pb, std::forward<Args>(args)...);
}
template <typename... Args>
inline void run_unit_any(const TiledProblem<double>& pb, Args&&... args) {
  run_unit_double(pb, std::forward<Args>(args)...);
}

// The loss (scaled for the mean) and the scale of the gradients, from the units' results in
// unit order.
struct LossAndScale {
  double loss, scale;
};
inline LossAndScale total(const std::vector<TaskResult>& results, Reduction reduction) {
  double loss = 0;
  int64_t count = 0;
  for (const TaskResult& t : results) {
    loss += t.loss;
    count += t.count;
  }
  const double scale = reduction == Reduction::Mean ? 1.0 / std::max<int64_t>(count, 1) : 1.0;
  return {loss * scale, scale};
}

template <typename T>
double rowwise_impl(const at::Tensor& R, const at::Tensor& P, const at::Tensor& Q,
                    const std::optional<at::Tensor>& mask, Reduction reduction,
                    const at::Tensor& grad_R, const at::Tensor& grad_P, const at::Tensor& grad_Q,
                    const DensePlan& plan) {
  const int64_t m = R.size(0), n = R.size(1), r = P.size(0);
  const int64_t n_pad = plan.n_pad;
  at::Tensor Q_pad = at::zeros({r, n_pad}, Q.options());
  Q_pad.narrow(1, 0, n).copy_(Q);

  DenseProblem<T> pb{};
  pb.m = m;
  pb.n = n;
  pb.n_pad = n_pad;
  pb.r = r;
  pb.set(R, mask, grad_R);
  pb.P = P.const_data_ptr<T>();
  pb.P_s0 = P.stride(0);
  pb.P_s1 = P.stride(1);
  pb.Q = Q_pad.const_data_ptr<T>();
  pb.groups = plan.groups;
  pb.lanes = plan.lanes;
  at::Tensor dQ_lanes;
  if (grad_P.defined() && r > 0) {
    pb.dP = grad_P.mutable_data_ptr<T>();  // zeroed
    pb.dP_s0 = grad_P.stride(0);
    pb.dP_s1 = grad_P.stride(1);
  }
  if (grad_Q.defined() && r > 0) {
    dQ_lanes = at::zeros({plan.lanes, r, n_pad}, Q.options());
    pb.dQ = dQ_lanes.mutable_data_ptr<T>();
  }

  const int64_t G = plan.groups;
  std::vector<TaskResult> results(plan.lanes * G * G);
  run_units(
      G, plan.lanes, [&] { return RowwiseScratch<T>(r); },
      [&](int64_t a, int64_t b, RowwiseScratch<T>& scratch) {
        run_unit_any(pb, a, b, scratch, results[a * G + b]);
      });

  const LossAndScale ls = total(results, reduction);
  const T grad_scale = static_cast<T>(-2 * ls.scale);
  if (pb.dP) grad_P.mul_(grad_scale);
  if (pb.dQ) {
    // The lanes in order: dQ = −2·scale·(lane 0 + lane 1 + ...).
    at::Tensor sum = dQ_lanes[0].narrow(1, 0, n);
    for (int64_t lane = 1; lane < plan.lanes; ++lane) {
      sum = sum.add(dQ_lanes[lane].narrow(1, 0, n));
    }
    grad_Q.copy_(sum).mul_(grad_scale);
  }
  if (grad_R.defined() && ls.scale != 1.0) grad_R.mul_(ls.scale);
  return ls.loss;
}

// X (rows × cols) as a BLAS view of `data`, X's data: row-major when X is contiguous,
// column-major when X is the .T of a contiguous table; nullopt in any other layout.
template <typename T>
std::optional<blas::Matrix<T>> blas_view(const at::Tensor& X, T* data) {
  if (X.is_contiguous()) return blas::Matrix<T>{data, X.size(1), true};
  if (X.t().is_contiguous()) return blas::Matrix<T>{data, X.size(0), false};
  return std::nullopt;
}

// P or Q: read in place in either layout, through a contiguous copy (kept in `copy`) in any other.
template <typename T>
blas::Matrix<const T> factor_view(const at::Tensor& X, at::Tensor& copy) {
  if (auto view = blas_view(X, X.const_data_ptr<T>())) return *view;
  copy = X.contiguous();
  return {copy.const_data_ptr<T>(), copy.size(1), true};
}

// grad_P or grad_Q, which allocate_masked_outputs makes in one of the two layouts.
template <typename T>
blas::Matrix<T> gradient_view(const at::Tensor& grad) {
  auto view = blas_view(grad, grad.mutable_data_ptr<T>());
  TORCH_INTERNAL_ASSERT(view.has_value(), "mf_ext.masked_mf_loss: a gradient of strides ",
                        grad.strides());
  return *view;
}

template <typename T>
double tiled_impl(const at::Tensor& R, const at::Tensor& P, const at::Tensor& Q,
                  const std::optional<at::Tensor>& mask, Reduction reduction,
                  const at::Tensor& grad_R, const at::Tensor& grad_P, const at::Tensor& grad_Q,
                  const DensePlan& plan) {
  const int64_t m = R.size(0), n = R.size(1), r = P.size(0);
  TiledProblem<T> pb{};
  pb.m = m;
  pb.n = n;
  pb.r = r;
  pb.set(R, mask, grad_R);
  at::Tensor P_copy, Q_copy;
  pb.P = factor_view<T>(P, P_copy);
  pb.Q = factor_view<T>(Q, Q_copy);
  if (grad_P.defined() && r > 0) pb.dP = gradient_view<T>(grad_P);  // zeroed
  if (grad_Q.defined() && r > 0) pb.dQ = gradient_view<T>(grad_Q);
  pb.tile_side = plan.side;
  pb.lanes_on_cols = plan.lanes_on_cols;
  const at::Tensor& lane_grad = plan.lanes_on_cols ? grad_P : grad_Q;  // the shorter side's
  at::Tensor lane_sums;
  if (plan.lanes > 1 && lane_grad.defined() && r > 0) {
    lane_sums = at::zeros({plan.lanes - 1, r, plan.lanes_on_cols ? m : n}, R.options());
    pb.lane_sums = lane_sums.mutable_data_ptr<T>();
  }

  const int64_t G = plan.groups;
  std::vector<TaskResult> results(plan.lanes * G * G);
  struct Scratch {
    explicit Scratch(int64_t tile_rows) : E(tile_rows * kTiledCols) {}
    std::vector<T> E;
    blas::OneThread one_thread;  // every GEMM of a unit on one thread, whatever the caller's count
  };
  run_units(
      G, plan.lanes, [&] { return std::make_unique<Scratch>(plan.side); },
      [&](int64_t a, int64_t b, std::unique_ptr<Scratch>& scratch) {
        run_unit_any(pb, task_cells<T>(m, plan, a, b), a / G, scratch->E.data(),
                     results[a * G + b]);
      });
  if (lane_sums.defined()) {  // lane 0 (in the gradient) + (lane 1 + lane 2 + ...), in order
    at::Tensor sum = lane_sums[0];
    for (int64_t lane = 2; lane < plan.lanes; ++lane) sum = sum.add(lane_sums[lane - 1]);
    lane_grad.add_(sum);
  }

  const LossAndScale ls = total(results, reduction);
  if (ls.scale != 1.0) {  // the units added −2·(Q Eᵀ) and −2·(P E)
    if (pb.dP.p) grad_P.mul_(ls.scale);
    if (pb.dQ.p) grad_Q.mul_(ls.scale);
    if (grad_R.defined()) grad_R.mul_(ls.scale);
  }
  return ls.loss;
}

// Runs the fused pass on R (m, n), P (r, m), Q (r, n); writes grad_R (if defined), and
// grad_P / grad_Q (if defined; contiguous or the .T of contiguous tables). Returns the loss.
template <typename T>
double masked_mf_loss_impl(const at::Tensor& R, const at::Tensor& P, const at::Tensor& Q,
                           const std::optional<at::Tensor>& mask, Reduction reduction,
                           const at::Tensor& grad_R, const at::Tensor& grad_P,
                           const at::Tensor& grad_Q) {
  const int64_t m = R.size(0), n = R.size(1), r = P.size(0);
  if (grad_P.defined()) grad_P.zero_();
  if (grad_Q.defined()) grad_Q.zero_();
  if (m == 0 || n == 0) return 0.0;
  const DensePlan plan = plan_dense<T>(m, n, r);
  if (plan.path == DensePath::Tiled) {
    return tiled_impl<T>(R, P, Q, mask, reduction, grad_R, grad_P, grad_Q, plan);
  }
  return rowwise_impl<T>(R, P, Q, mask, reduction, grad_R, grad_P, grad_Q, plan);
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
  // grad_P / grad_Q in the layout of a P / Q that is a table's .T: autograd then hands the
  // table a contiguous gradient that it keeps as .grad, instead of a copy.
  MaskedMfOutputs out =
      allocate_masked_outputs(R, P, Q, grad_R, grad_P, grad_Q, /*table_layouts=*/true);
  if (grad_R && R.numel() == 0) out.grad_R.zero_();
  const RowMajorProblem k = orient_rows(R, P, Q, mask, out, grad_R, grad_P, grad_Q);
  AT_DISPATCH_FLOATING_TYPES(R.scalar_type(), "masked_mf_loss_cpu", [&] {
    out.loss.fill_(masked_mf_loss_impl<scalar_t>(k.R, k.P, k.Q, k.mask, red, k.grad_R, k.grad_P,
                                                 k.grad_Q));
  });
  return {out.loss, out.grad_R, out.grad_P, out.grad_Q};
}

// mf_ext::_dense_partition: how the kernel above cuts R (m, n) into units, computed by its own
// planning code, for tests. In R's coordinates, flattened: [transposed (the kernel reads R
// column-major), path (0 rowwise, 1 tiled), row groups, column groups, units, units that can
// run at once, then per unit in unit order (a · G + b: a the group on the lanes' side, rows
// unless the tiled path puts its lanes on the columns, in the kernel's orientation) its rows
// [begin, end) and columns [begin, end)]; no units when R is empty.
std::vector<int64_t> dense_partition_cpu(const at::Tensor& R, const at::Tensor& P,
                                         const at::Tensor& Q) {
  check_masked_mf_loss_args(R, P, Q, std::nullopt);
  TORCH_CHECK_TYPE(R.scalar_type() == at::kFloat || R.scalar_type() == at::kDouble,
                   "mf_ext._dense_partition: R must be float32 or float64, got ",
                   R.scalar_type());
  const bool transposed = read_transposed(R);
  const int64_t m = transposed ? R.size(1) : R.size(0), n = transposed ? R.size(0) : R.size(1);
  std::vector<int64_t> out{transposed, 0, 0, 0, 0, 0};
  if (m == 0 || n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(R.scalar_type(), "dense_partition_cpu", [&] {
    const DensePlan plan = plan_dense<scalar_t>(m, n, P.size(0));
    const int64_t G = plan.groups, lane_groups = plan.lanes * G;
    out[1] = static_cast<int64_t>(plan.path);
    out[2 + transposed] = plan.lanes_on_cols ? G : lane_groups;  // row groups
    out[3 - transposed] = plan.lanes_on_cols ? lane_groups : G;  // column groups
    out[4] = lane_groups * G;
    out[5] = lane_groups;  // units that can run at once: one per group of the lanes' side
    for (int64_t a = 0; a < lane_groups; ++a) {
      for (int64_t b = 0; b < G; ++b) {
        const TaskCells c = task_cells<scalar_t>(m, plan, a, b);
        const int64_t rows[2] = {c.i0, c.i1}, cols[2] = {c.j0, std::min(c.j1, n)};
        const int64_t* first = transposed ? cols : rows;
        const int64_t* second = transposed ? rows : cols;
        out.insert(out.end(), {first[0], first[1], second[0], second[1]});
      }
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

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
// Determinism: tiles, units and all orders depend on the shapes and the data only, so results
// are bitwise the same whatever the thread count. Two paths (bucketing.h):
// - "chunks" (below 2^24 triples): one fused pass in at most 8 chunks, runs of outer blocks cut
//   at fixed fractions of nnz; a chunk owns its outer gradient rows outright and writes the
//   inner gradients into its own partial (chunks × inner × r_pad values), summed in chunk order.
// - "units" (large inputs): two passes over the tiles, each in up to 1024 units of about 2^16
//   (first) / 2^17 (second) triples. The first (runs of whole outer blocks, run_chunk) computes
//   the loss and the outer gradients and, when an inner gradient is asked for, leaves each tile
//   sorted by inner index with each triple's ∂L/∂pred in place of its value; the second (ranges
//   of inner indices, observed_inner_pass.h) sums those into the inner gradients. Each unit
//   owns its gradient rows: no partials. Extra memory over path "chunks": per-segment inner
//   histograms while counting (≤ 8 × inner counters) and, per unit in flight, one inner block
//   of counters.
//
// Indices are checked by the bucketing pass, before anything is read through them; the lowest
// bad position is reported (its row if both are bad).
//
// Tiling, bucketing and chunks: bucketing.h; float32 accuracy over long sums:
// compensated_sums.h; vector helpers: simd.h; the row layout copies: observed_problem.h; the
// fused pass (run_chunk: its hot loop is kept whole, see its comments): observed_fused_pass.h;
// the second pass: observed_inner_pass.h; both compiled apart (observed_kernels.h). This file
// holds the op.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator headers only (see setup.py)
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../observed_mf_loss_common.h"
#include "bucketing.h"
#include "observed_kernels.h"
#include "observed_problem.h"
#include "simd.h"

namespace mf_ext {
namespace {

using simd::Vec;

// The padded rank and the tiling of a problem of nnz triples, P (r, m), Q (r, n) of type T.
template <typename T>
Tiling plan_observed_tiling(int64_t nnz, int64_t r, int64_t m, int64_t n, int64_t& r_pad) {
  constexpr int64_t W = Vec<T>::width;
  r_pad = (r + W - 1) / W * W;
  return plan_tiling(nnz, m, n, r_pad * static_cast<int64_t>(sizeof(T)));
}

[[noreturn]] void raise_bad_index(const BadIndex& bad, int64_t m, int64_t n) {
  if (bad.is_col) observed_index_error("cols", bad.position, bad.value, n, "n, the columns of Q");
  observed_index_error("rows", bad.position, bad.value, m, "m, the columns of P");
}


// Runs the pass(es); fills the defined gradients of `out` (contiguous). Returns the loss.
template <typename T>
double observed_mf_loss_impl(const at::Tensor& rows, const at::Tensor& cols,
                             const at::Tensor& values, const at::Tensor& P, const at::Tensor& Q,
                             const std::optional<at::Tensor>& row_bias,
                             const std::optional<at::Tensor>& col_bias,
                             const std::optional<at::Tensor>& weights, Reduction reduction,
                             const ObservedOutputs& out) {
  const int64_t nnz = values.size(0), r = P.size(0), m = P.size(1), n = Q.size(1);
  if (nnz == 0) {
    for (const at::Tensor* g : {&out.grad_P, &out.grad_Q, &out.grad_row_bias,
                                &out.grad_col_bias}) {
      if (g->defined()) g->zero_();
    }
    return 0.0;
  }
  int64_t r_pad = 0;
  Bucketed<T> bk;
  static_cast<Tiling&>(bk) = plan_observed_tiling<T>(nnz, r, m, n, r_pad);
  const bool rows_outer = bk.rows_outer, units = bk.units;
  const int64_t na = bk.outer_size, nb = bk.inner_size;
  const bool keep_positions = out.grad_values.defined() || out.grad_weights.defined();
  const BadIndex bad = bucket_triples<T>(rows, cols, values, weights, m, n, keep_positions, bk);
  if (bad.position >= 0) raise_bad_index(bad, m, n);
  ObservedProblem<T> pb{};
  pb.nnz = nnz;
  pb.r_pad = r_pad;
  if (units) {
    pb.chunk_bounds = plan_outer_units(nnz, bk, bk.tile_begin);
    pb.inner_bounds = plan_ranges(bk.inner_hist, unit_count(nnz, kInnerUnitTriples));
  } else {
    pb.chunk_bounds = plan_chunks(nnz, bk, bk.tile_begin);
  }
  const int64_t chunks = static_cast<int64_t>(pb.chunk_bounds.size()) - 1;
  const at::Tensor P_rows = padded_rows<T>(P, r_pad);
  const at::Tensor Q_rows = padded_rows<T>(Q, r_pad);
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

  // Zeroed by their chunks or units. Path "units": the inner gradient rows have one writer each
  // (the second pass), and the first pass leaves them alone.
  at::Tensor dA_rows, dB_parts, dbB_parts;
  const int64_t parts = units ? 1 : chunks;
  if (A_grad_out.defined() && r > 0) {
    dA_rows = at::empty({na, r_pad}, P.options());
    pb.outer.grad = dA_rows.mutable_data_ptr<T>();
  }
  Side<T> inner_grads = pb.inner;
  if (B_grad_out.defined() && r > 0) {
    dB_parts = at::empty({parts, nb, r_pad}, P.options());
    inner_grads.grad = dB_parts.mutable_data_ptr<T>();
  }
  // The outer bias gradient has one writer per entry: straight into the output; so has the
  // inner one on path "units".
  if (A_grad_bias_out.defined()) pb.outer.grad_bias = A_grad_bias_out.mutable_data_ptr<T>();
  if (B_grad_bias_out.defined()) {
    if (units) {
      inner_grads.grad_bias = B_grad_bias_out.mutable_data_ptr<T>();
    } else {
      dbB_parts = at::empty({chunks, nb}, values.options());
      inner_grads.grad_bias = dbB_parts.mutable_data_ptr<T>();
    }
  }
  // Path "units": the first pass leaves the inner gradients to the second.
  pb.keep_grad_pred = units && (inner_grads.grad || inner_grads.grad_bias);
  if (!pb.keep_grad_pred) pb.inner = inner_grads;

  std::vector<double> losses(chunks);
  if (units) {
    run_units_any_order(chunks,
                        [&](int64_t c) { run_chunks_any(pb, bk, c, c + 1, losses.data()); });
    if (pb.keep_grad_pred) {
      pb.inner = inner_grads;
      run_units_any_order(static_cast<int64_t>(pb.inner_bounds.size()) - 1,
                          [&](int64_t u) { run_inner_unit_any(pb, bk, u); });
    }
  } else {
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      run_chunks_any(pb, bk, begin, end, losses.data());
    });
  }

  double loss = 0;
  for (const double l : losses) loss += l;
  if (pb.outer.grad) {
    reduce_rows_transposed<T>(pb.outer.grad, 1, na, r, r_pad, A_grad_out);
  } else if (A_grad_out.defined()) {
    A_grad_out.zero_();  // r == 0
  }
  if (pb.inner.grad) {
    reduce_rows_transposed<T>(pb.inner.grad, parts, nb, r, r_pad, B_grad_out);
  } else if (B_grad_out.defined()) {
    B_grad_out.zero_();
  }
  if (dbB_parts.defined()) {
    reduce_vectors<T>(pb.inner.grad_bias, chunks, nb, B_grad_bias_out.mutable_data_ptr<T>());
  }
  return reduction == Reduction::Mean ? loss / static_cast<double>(nnz) : loss;
}

ObservedResult observed_mf_loss_and_grads_cpu(
    const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& values, const at::Tensor& P,
    const at::Tensor& Q, const std::optional<at::Tensor>& row_bias,
    const std::optional<at::Tensor>& col_bias, const std::optional<at::Tensor>& weights,
    c10::string_view reduction, bool grad_values, bool grad_P, bool grad_Q, bool grad_row_bias,
    bool grad_col_bias, bool grad_weights) {
  const ObservedGradFlags want{grad_values, grad_P, grad_Q, grad_row_bias, grad_col_bias,
                               grad_weights};
  const Reduction red =
      check_observed_call(rows, cols, values, P, Q, row_bias, col_bias, weights, reduction, want);
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble,
                   "mf_ext.observed_mf_loss: the CPU kernel supports float32 and float64, got ",
                   values.scalar_type());
  // grad_P / grad_Q in the layout of a P / Q that is a table's .T: the kernel's row layout
  // then reaches them as plain row copies, and autograd hands the table its gradient uncopied.
  const ObservedOutputs all =
      allocate_observed_outputs(values, P, Q, want, /*table_layouts=*/true);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "observed_mf_loss_cpu", [&] {
    const double value = observed_mf_loss_impl<scalar_t>(rows, cols, values, P, Q, row_bias,
                                                         col_bias, weights, red,
                                                         want.wanted(all));
    all.loss.fill_(value);
  });
  return all.as_tuple();
}

// mf_ext::_observed_partition: how the kernel above cuts the problem (rows, cols) of P, Q's
// shapes and dtype, computed by its own planning and counting code, for tests. Flattened:
// [rows_outer, outer block size, inner block size, outer_blocks, inner_blocks, path (0 chunks,
//  1 units), segments, chunks (path "units": units of the first pass), inner units (of the
//  second pass; 0 on path "chunks"), the triples of each segment..., of each chunk..., of each
//  inner unit...]; no segments or units when there are no triples (the kernel does no pass
// then). Out-of-range indices raise as the op does.
std::vector<int64_t> observed_partition_cpu(const at::Tensor& rows, const at::Tensor& cols,
                                            const at::Tensor& P, const at::Tensor& Q) {
  check_observed_index_tensor(rows, "rows");
  check_observed_index_tensor(cols, "cols");
  TORCH_CHECK_VALUE(rows.size(0) == cols.size(0), "mf_ext._observed_partition: rows and cols "
                    "must have the same length, got ", rows.size(0), " and ", cols.size(0));
  TORCH_CHECK_VALUE(P.dim() == 2 && Q.dim() == 2 && P.size(0) == Q.size(0),
                    "mf_ext._observed_partition: P (r, m) and Q (r, n) must be 2-D of one rank, "
                    "got P ", P.sizes(), ", Q ", Q.sizes());
  TORCH_CHECK_TYPE(P.scalar_type() == Q.scalar_type() &&
                       (P.scalar_type() == at::kFloat || P.scalar_type() == at::kDouble),
                   "mf_ext._observed_partition: P and Q must both be float32 or float64, got ",
                   P.scalar_type(), " and ", Q.scalar_type());
  const int64_t nnz = rows.size(0), r = P.size(0), m = P.size(1), n = Q.size(1);
  std::vector<int64_t> out;
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "observed_partition_cpu", [&] {
    int64_t r_pad = 0;
    const Tiling tl = plan_observed_tiling<scalar_t>(nnz, r, m, n, r_pad);
    std::vector<int64_t> segment_triples, chunk_triples, inner_triples;
    if (nnz > 0) {
      std::vector<int64_t> offsets, tile_begin, inner_hist;
      const BadIndex bad = count_triples<scalar_t>(rows, cols, m, n, tl, offsets, tile_begin,
                                                   inner_hist);
      if (bad.position >= 0) raise_bad_index(bad, m, n);
      const int64_t segments = segment_count(nnz);
      for (int64_t s = 0; s < segments; ++s) {
        segment_triples.push_back(segment_begin(nnz, segments, s + 1) -
                                  segment_begin(nnz, segments, s));
      }
      const std::vector<int64_t> bounds =
          tl.units ? plan_outer_units(nnz, tl, tile_begin) : plan_chunks(nnz, tl, tile_begin);
      auto first_tile = [&](int64_t a) {  // chunks end at block starts, or at the end
        return a == tl.outer_size ? tl.tiles() : (a >> tl.outer_shift) * tl.inner_blocks;
      };
      for (size_t c = 0; c + 1 < bounds.size(); ++c) {
        chunk_triples.push_back(tile_begin[first_tile(bounds[c + 1])] -
                                tile_begin[first_tile(bounds[c])]);
      }
      if (tl.units) {
        const std::vector<int64_t> inner =
            plan_ranges(inner_hist, unit_count(nnz, kInnerUnitTriples));
        for (size_t u = 0; u + 1 < inner.size(); ++u) {
          inner_triples.push_back(std::accumulate(inner_hist.begin() + inner[u],
                                                  inner_hist.begin() + inner[u + 1], int64_t(0)));
        }
      }
    }
    out = {tl.rows_outer, int64_t(1) << tl.outer_shift, int64_t(1) << tl.inner_shift,
           tl.outer_blocks, tl.inner_blocks, tl.units,
           static_cast<int64_t>(segment_triples.size()),
           static_cast<int64_t>(chunk_triples.size()),
           static_cast<int64_t>(inner_triples.size())};
    for (const auto* list : {&segment_triples, &chunk_triples, &inner_triples}) {
      out.insert(out.end(), list->begin(), list->end());
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mf_ext, CPU, m) {
  m.impl("observed_mf_loss_and_grads", &observed_mf_loss_and_grads_cpu);
  m.impl("_observed_partition", &observed_partition_cpu);
}

}  // namespace mf_ext

// What the passes of the observed CPU kernel (observed_mf_loss.cpp, observed_inner_pass.h) share:
// the problem as they see it, and the copies between P / Q's (r, size) layout and the kernel's
// row layout (size, r_pad), r zero-padded to whole vectors.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace mf_ext {

// One side of the problem: the rows (P, row_bias) or the cols (Q, col_bias).
template <typename T>
struct Side {
  int64_t size;        // m or n
  const T* factor;     // (size, r_pad)
  const T* bias;       // nullptr: none
  int64_t bias_s;
  T* grad;             // outer: (size, r_pad); inner: (chunks, size, r_pad) on path "chunks",
                       // (size, r_pad) on path "units"; or nullptr
  T* grad_bias;        // outer: (size,); inner: (chunks, size) on path "chunks", the output
                       // (size,) on path "units"; or nullptr
};

template <typename T>
struct ObservedProblem {
  int64_t nnz, r_pad;
  Side<T> outer, inner;
  T scale;          // 1, or 1/nnz for "mean"
  T* grad_values;   // (nnz,) or nullptr
  T* grad_weights;  // (nnz,) or nullptr
  // Path "units" with an inner gradient asked for: the first pass leaves each tile sorted by
  // inner index with each triple's ∂L/∂pred in place of its value, for the second.
  bool keep_grad_pred;
  std::vector<int64_t> chunk_bounds;  // chunk (first-pass unit) c: outer [c], [c + 1])
  std::vector<int64_t> inner_bounds;  // second-pass unit u: inner [u], [u + 1]) (path "units")
};

// The triples kPrefetchAhead positions on have their rows fetched while this one computes
// (they are in L2 by then, most of the time; this brings them to L1).
constexpr int64_t kPrefetchAhead = 4;

// Rows of a transposing copy handled together: their r-vectors stay in L1 while X's rows pass.
constexpr int64_t kTransposeRows = 32;

// A zero-padded row layout (count, r_pad) of X (r, count): X itself (X.t()) when it already is
// one, without padding (the embedding layout, weight.T of a (count, r_pad) table), else a copy.
template <typename T>
at::Tensor padded_rows(const at::Tensor& X, int64_t r_pad) {
  const int64_t r = X.size(0), count = X.size(1);
  if (r > 0 && r == r_pad && (X.stride(0) == 1 || r == 1) && (X.stride(1) == r_pad || count == 1)) {
    return X.t();
  }
  at::Tensor rows_layout = at::empty({count, r_pad}, X.options());
  const T* x = X.const_data_ptr<T>();
  T* out = rows_layout.mutable_data_ptr<T>();
  const int64_t s0 = X.stride(0), s1 = X.stride(1);
  const int64_t blocks = (count + kTransposeRows - 1) / kTransposeRows;
  at::parallel_for(0, blocks, std::max<int64_t>(1, 8192 / std::max<int64_t>(r_pad, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t i0 = blk * kTransposeRows;
      const int64_t i1 = std::min(count, i0 + kTransposeRows);
      for (int64_t k = 0; k < r; ++k) {
        const T* xk = x + k * s0;
        for (int64_t i = i0; i < i1; ++i) out[i * r_pad + k] = xk[i * s1];
      }
      for (int64_t i = i0; i < i1; ++i) std::fill(out + i * r_pad + r, out + (i + 1) * r_pad, T(0));
    }
  });
  return rows_layout;
}

// out (r, count) = Σ_c parts[c] (count, r_pad)ᵀ, chunks summed in order: back to P's shape, in
// out's layout (contiguous, or the .T of a contiguous table: then each row is a plain copy).
template <typename T>
void reduce_rows_transposed(const T* parts, int64_t chunks, int64_t count, int64_t r,
                            int64_t r_pad, const at::Tensor& out_tensor) {
  T* out = out_tensor.mutable_data_ptr<T>();
  const int64_t out_s0 = out_tensor.stride(0), out_s1 = out_tensor.stride(1);
  const int64_t blocks = (count + kTransposeRows - 1) / kTransposeRows;
  at::parallel_for(0, blocks, std::max<int64_t>(1, 8192 / std::max<int64_t>(r_pad, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<T> acc(kTransposeRows * r_pad);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t i0 = blk * kTransposeRows;
      const int64_t rows = std::min(count - i0, kTransposeRows);
      const T* first = parts + i0 * r_pad;
      if (chunks > 1) {
        std::copy(first, first + rows * r_pad, acc.begin());
        for (int64_t c = 1; c < chunks; ++c) {
          const T* part = parts + (c * count + i0) * r_pad;
          for (int64_t e = 0; e < rows * r_pad; ++e) acc[e] += part[e];
        }
        first = acc.data();
      }
      if (out_s0 == 1) {  // a table's .T: row i of the parts is row i of the table
        for (int64_t i = 0; i < rows; ++i) {
          std::copy(first + i * r_pad, first + i * r_pad + r, out + (i0 + i) * out_s1);
        }
      } else {
        for (int64_t k = 0; k < r; ++k) {
          T* out_k = out + k * out_s0 + i0 * out_s1;
          for (int64_t i = 0; i < rows; ++i) out_k[i * out_s1] = first[i * r_pad + k];
        }
      }
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

}  // namespace mf_ext

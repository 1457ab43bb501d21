// The layout of grad_P / grad_Q that the dense and observed ops allocate: contiguous (r, m), or,
// with table_layouts (the CPU kernels), the .T of a contiguous (m, r) table when the input is
// one (an nn.Embedding weight's .T), so that autograd hands the table a gradient it keeps as
// .grad instead of copying it. The fake kernels (mf_ext/ops.py _factor_grad_fake) say the same.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

namespace mf_ext {

// Whether X (r, m) is the .T of a contiguous (m, r) table, and not contiguous itself.
inline bool is_table_transpose(const at::Tensor& X) {
  return !X.is_contiguous() && X.t().is_contiguous();
}

inline at::Tensor allocate_factor_grad(const at::Tensor& X, bool table_layouts,
                                       const at::TensorOptions& opts) {
  if (table_layouts && is_table_transpose(X)) return at::empty({X.size(1), X.size(0)}, opts).t();
  return at::empty({X.size(0), X.size(1)}, opts);
}

}  // namespace mf_ext

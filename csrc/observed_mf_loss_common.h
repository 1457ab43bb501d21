// What the CPU and CUDA kernels of mf_ext::observed_mf_loss_and_grads share: the argument checks
// (so both reject bad input with the same message) and the outputs' allocation. (Index ranges
// are checked by the kernels, in their pass over the triples; see observed_index_error: the
// CPU kernel raises before it computes, the CUDA one at the device's next call.)
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "factor_grad_layout.h"
#include "reduction.h"

namespace mf_ext {

inline void check_observed_index_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1, "mf_ext.observed_mf_loss: ", name,
                    " must be 1-D (nnz,), got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong,
                   "mf_ext.observed_mf_loss: ", name, " must be an int32 or int64 tensor, got ",
                   t.scalar_type());
}

// A per-entry (weights) or per-row/column (biases) vector: 1-D, `expected` long, values' dtype
// and device. `what` says where the expected length comes from.
inline void check_observed_vector(const at::Tensor& t, const char* name, int64_t expected,
                                  const char* what, const at::Tensor& values) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == expected, "mf_ext.observed_mf_loss: ", name,
                    " must have shape (", expected, ",) (", what, "), got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == values.scalar_type(), "mf_ext.observed_mf_loss: ", name,
                   " must have the dtype of values (", values.scalar_type(), "), got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == values.device(), "mf_ext.observed_mf_loss: ", name, " is on ",
                    t.device(), " but values is on ", values.device());
}

inline void check_observed_mf_loss_args(const at::Tensor& rows, const at::Tensor& cols,
                                        const at::Tensor& values, const at::Tensor& P,
                                        const at::Tensor& Q,
                                        const std::optional<at::Tensor>& row_bias,
                                        const std::optional<at::Tensor>& col_bias,
                                        const std::optional<at::Tensor>& weights) {
  check_observed_index_tensor(rows, "rows");
  check_observed_index_tensor(cols, "cols");
  TORCH_CHECK_VALUE(values.dim() == 1, "mf_ext.observed_mf_loss: values must be 1-D (nnz,), got "
                    "shape ", values.sizes());
  TORCH_CHECK_VALUE(rows.size(0) == cols.size(0) && rows.size(0) == values.size(0),
                    "mf_ext.observed_mf_loss: rows, cols and values must have the same length, "
                    "got rows ", rows.size(0), ", cols ", cols.size(0), ", values ",
                    values.size(0));
  TORCH_CHECK_VALUE(P.dim() == 2, "mf_ext.observed_mf_loss: P must be 2-D (r, m), got shape ",
                    P.sizes());
  TORCH_CHECK_VALUE(Q.dim() == 2, "mf_ext.observed_mf_loss: Q must be 2-D (r, n), got shape ",
                    Q.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(values.scalar_type()),
                   "mf_ext.observed_mf_loss: values must be a floating-point tensor, got ",
                   values.scalar_type());
  TORCH_CHECK_TYPE(P.scalar_type() == values.scalar_type() &&
                       Q.scalar_type() == values.scalar_type(),
                   "mf_ext.observed_mf_loss: values, P and Q must have the same dtype, got values ",
                   values.scalar_type(), ", P ", P.scalar_type(), ", Q ", Q.scalar_type());
  TORCH_CHECK_VALUE(P.size(0) == Q.size(0), "mf_ext.observed_mf_loss: P has rank ", P.size(0),
                    " (shape ", P.sizes(), ") but Q has rank ", Q.size(0), " (shape ", Q.sizes(),
                    ")");
  TORCH_CHECK_VALUE(rows.device() == values.device() && cols.device() == values.device() &&
                        P.device() == values.device() && Q.device() == values.device(),
                    "mf_ext.observed_mf_loss: rows, cols, values, P and Q must be on the same "
                    "device, got rows on ", rows.device(), ", cols on ", cols.device(),
                    ", values on ", values.device(), ", P on ", P.device(), ", Q on ",
                    Q.device());
  if (row_bias.has_value()) {
    check_observed_vector(*row_bias, "row_bias", P.size(1), "m, the columns of P", values);
  }
  if (col_bias.has_value()) {
    check_observed_vector(*col_bias, "col_bias", Q.size(1), "n, the columns of Q", values);
  }
  if (weights.has_value()) {
    check_observed_vector(*weights, "weights", values.size(0), "nnz, the length of values",
                          values);
  }
}

// Raised by the kernels for the first (lowest position) index out of [0, size); `context`
// follows the message (the CUDA kernel says which call found it).
[[noreturn]] inline void observed_index_error(const char* name, int64_t position, int64_t value,
                                              int64_t size, const char* what,
                                              const char* context = "") {
  TORCH_CHECK_INDEX(false, "mf_ext.observed_mf_loss: ", name, "[", position, "] = ", value,
                    " is out of range: ", name, " must lie in [0, ", size, ") (", what, ")",
                    context);
  __builtin_unreachable();
}

// The op's seven outputs, in schema order. A gradient that is not wanted is an empty (0,)
// tensor in what the op returns, and an undefined one in what the kernels are given (wanted()).
using ObservedResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct ObservedOutputs {
  at::Tensor loss, grad_values, grad_P, grad_Q, grad_row_bias, grad_col_bias, grad_weights;

  ObservedResult as_tuple() const {
    return {loss, grad_values, grad_P, grad_Q, grad_row_bias, grad_col_bias, grad_weights};
  }
};

struct ObservedGradFlags {
  bool values, P, Q, row_bias, col_bias, weights;

  // out's tensors, the gradients not wanted undefined.
  ObservedOutputs wanted(const ObservedOutputs& out) const {
    auto pick = [](bool flag, const at::Tensor& t) { return flag ? t : at::Tensor(); };
    return {out.loss, pick(values, out.grad_values), pick(P, out.grad_P), pick(Q, out.grad_Q),
            pick(row_bias, out.grad_row_bias), pick(col_bias, out.grad_col_bias),
            pick(weights, out.grad_weights)};
  }
};

// The gradient flags must name inputs that exist.
inline void check_observed_grad_flags(const std::optional<at::Tensor>& row_bias,
                                      const std::optional<at::Tensor>& col_bias,
                                      const std::optional<at::Tensor>& weights,
                                      const ObservedGradFlags& want) {
  TORCH_CHECK_VALUE(!want.row_bias || row_bias.has_value(),
                    "mf_ext.observed_mf_loss: grad_row_bias=True but row_bias is None");
  TORCH_CHECK_VALUE(!want.col_bias || col_bias.has_value(),
                    "mf_ext.observed_mf_loss: grad_col_bias=True but col_bias is None");
  TORCH_CHECK_VALUE(!want.weights || weights.has_value(),
                    "mf_ext.observed_mf_loss: grad_weights=True but weights is None");
}

// The checks both kernels run first, in this order (so both raise the same error for the same
// call); returns the reduction.
inline Reduction check_observed_call(const at::Tensor& rows, const at::Tensor& cols,
                                     const at::Tensor& values, const at::Tensor& P,
                                     const at::Tensor& Q,
                                     const std::optional<at::Tensor>& row_bias,
                                     const std::optional<at::Tensor>& col_bias,
                                     const std::optional<at::Tensor>& weights,
                                     std::string_view reduction, const ObservedGradFlags& want) {
  check_observed_mf_loss_args(rows, cols, values, P, Q, row_bias, col_bias, weights);
  check_observed_grad_flags(row_bias, col_bias, weights, want);
  return parse_reduction("mf_ext.observed_mf_loss", reduction);
}

// Uninitialized outputs on values' device: the loss, and each gradient of its input's shape
// (grad_P (r, m) and grad_Q (r, n) in the layout of factor_grad_layout.h, as the fake kernel
// says) or (0,) if not wanted.
inline ObservedOutputs allocate_observed_outputs(const at::Tensor& values, const at::Tensor& P,
                                                 const at::Tensor& Q,
                                                 const ObservedGradFlags& want,
                                                 bool table_layouts) {
  const int64_t nnz = values.size(0), m = P.size(1), n = Q.size(1);
  const auto opts = values.options();
  auto maybe = [&](bool wanted, at::IntArrayRef shape) {
    return wanted ? at::empty(shape, opts) : at::empty({0}, opts);
  };
  return {at::empty({}, opts),          maybe(want.values, {nnz}),
          want.P ? allocate_factor_grad(P, table_layouts, opts) : at::empty({0}, opts),
          want.Q ? allocate_factor_grad(Q, table_layouts, opts) : at::empty({0}, opts),
          maybe(want.row_bias, {m}),    maybe(want.col_bias, {n}),
          maybe(want.weights, {nnz})};
}

}  // namespace mf_ext

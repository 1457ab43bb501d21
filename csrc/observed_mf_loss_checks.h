// Argument checks of mf_ext::observed_mf_loss_and_grads, shared by the CPU and CUDA kernels so
// both reject bad input with the same message. (Index ranges are checked by the kernels, in
// their pass over the triples; see observed_index_error.)
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>

#include "masked_mf_loss_common.h"  // enum Reduction

namespace mf_ext {

inline Reduction parse_observed_reduction(std::string_view reduction) {
  if (reduction == "sum") return Reduction::Sum;
  if (reduction == "mean") return Reduction::Mean;
  TORCH_CHECK_VALUE(false, "mf_ext.observed_mf_loss: reduction must be \"sum\" or \"mean\", got \"",
                    reduction, "\"");
}

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

// The gradient flags must name inputs that exist.
inline void check_observed_grad_flags(const std::optional<at::Tensor>& row_bias,
                                      const std::optional<at::Tensor>& col_bias,
                                      const std::optional<at::Tensor>& weights,
                                      bool grad_row_bias, bool grad_col_bias, bool grad_weights) {
  TORCH_CHECK_VALUE(!grad_row_bias || row_bias.has_value(),
                    "mf_ext.observed_mf_loss: grad_row_bias=True but row_bias is None");
  TORCH_CHECK_VALUE(!grad_col_bias || col_bias.has_value(),
                    "mf_ext.observed_mf_loss: grad_col_bias=True but col_bias is None");
  TORCH_CHECK_VALUE(!grad_weights || weights.has_value(),
                    "mf_ext.observed_mf_loss: grad_weights=True but weights is None");
}

// Raised by the kernels for the first (lowest position) index out of [0, size).
[[noreturn]] inline void observed_index_error(const char* name, int64_t position, int64_t value,
                                              int64_t size, const char* what) {
  TORCH_CHECK_INDEX(false, "mf_ext.observed_mf_loss: ", name, "[", position, "] = ", value,
                    " is out of range: ", name, " must lie in [0, ", size, ") (", what, ")");
  __builtin_unreachable();
}

}  // namespace mf_ext

// What the CPU and CUDA kernels of mf_ext::implicit_mf_loss_and_grads share: the argument checks
// (so both reject bad input with the same message), the call of the observed-entries op for the
// Σ_t part, and the error for a bad index or weight found in the data.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/ones.h>

#include <cmath>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include "reduction.h"

namespace mf_ext {

inline constexpr const char* kImplicitOp = "mf_ext.implicit_mf_loss";

inline void check_implicit_index_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1, kImplicitOp, ": ", name, " must be 1-D (nnz,), got shape ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, kImplicitOp,
                   ": ", name, " must be an int32 or int64 tensor, got ", t.scalar_type());
}

// values or weights: (nnz,), P's dtype and device.
inline void check_implicit_vector(const std::optional<at::Tensor>& t, const char* name,
                                  int64_t nnz, const at::Tensor& P) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == nnz, kImplicitOp, ": ", name,
                    " must have shape (", nnz, ",) (nnz, the length of rows), got shape ",
                    t->sizes());
  TORCH_CHECK_TYPE(t->scalar_type() == P.scalar_type(), kImplicitOp, ": ", name,
                   " must have the dtype of P (", P.scalar_type(), "), got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->device() == P.device(), kImplicitOp, ": ", name, " is on ", t->device(),
                    " but P is on ", P.device());
}

// The checks both kernels run first, in this order; returns the reduction. Indices and weights
// are checked against the data later (check_implicit_weights, rethrow_as_implicit).
inline Reduction check_implicit_call(const at::Tensor& rows, const at::Tensor& cols,
                                     const at::Tensor& P, const at::Tensor& Q,
                                     const std::optional<at::Tensor>& values,
                                     const std::optional<at::Tensor>& weights,
                                     double unobserved_weight, std::string_view reduction,
                                     bool grad_values, bool grad_weights) {
  const Reduction red = parse_reduction(kImplicitOp, reduction);
  check_implicit_index_tensor(rows, "rows");
  check_implicit_index_tensor(cols, "cols");
  TORCH_CHECK_VALUE(rows.size(0) == cols.size(0), kImplicitOp,
                    ": rows and cols must have the same length, got rows ", rows.size(0),
                    ", cols ", cols.size(0));
  TORCH_CHECK_VALUE(P.dim() == 2, kImplicitOp, ": P must be 2-D (r, m), got shape ", P.sizes());
  TORCH_CHECK_VALUE(Q.dim() == 2, kImplicitOp, ": Q must be 2-D (r, n), got shape ", Q.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(P.scalar_type()), kImplicitOp,
                   ": P must be a floating-point tensor, got ", P.scalar_type());
  TORCH_CHECK_TYPE(Q.scalar_type() == P.scalar_type(), kImplicitOp,
                   ": P and Q must have the same dtype, got P ", P.scalar_type(), ", Q ",
                   Q.scalar_type());
  TORCH_CHECK_VALUE(P.size(0) == Q.size(0), kImplicitOp, ": P has rank ", P.size(0), " (shape ",
                    P.sizes(), ") but Q has rank ", Q.size(0), " (shape ", Q.sizes(), ")");
  TORCH_CHECK_VALUE(rows.device() == P.device() && cols.device() == P.device() &&
                        Q.device() == P.device(),
                    kImplicitOp, ": rows, cols, P and Q must be on the same device, got rows on ",
                    rows.device(), ", cols on ", cols.device(), ", P on ", P.device(), ", Q on ",
                    Q.device());
  check_implicit_vector(values, "values", rows.size(0), P);
  check_implicit_vector(weights, "weights", rows.size(0), P);
  TORCH_CHECK_VALUE(std::isfinite(unobserved_weight) && unobserved_weight >= 0, kImplicitOp,
                    ": unobserved_weight must be a finite number >= 0, got ", unobserved_weight);
  TORCH_CHECK_VALUE(!grad_values || values.has_value(), kImplicitOp,
                    ": grad_values=True but values is None");
  TORCH_CHECK_VALUE(!grad_weights || weights.has_value(), kImplicitOp,
                    ": grad_weights=True but weights is None");
  return red;
}

// Raised for the first (lowest position) weight that is negative or NaN; `where` is appended
// (the CUDA kernel says which earlier call it found it in).
[[noreturn]] inline void implicit_weight_error(int64_t position, double value,
                                               const char* where = "") {
  TORCH_CHECK_VALUE(false, kImplicitOp, ": weights[", position, "] = ", value,
                    " is not allowed: weights must be >= 0 (and not NaN)", where);
  __builtin_unreachable();
}

// Calls `body` (which runs the observed-entries op); an index error it raises is raised again
// with this op's name, so the user reads which public function got the bad index.
template <typename Body>
auto rethrow_as_implicit(Body&& body) {
  try {
    return body();
  } catch (const c10::IndexError& e) {
    std::string message = e.what_without_backtrace();
    const std::string observed = "mf_ext.observed_mf_loss";
    const auto at = message.find(observed);
    if (at != std::string::npos) message.replace(at, observed.size(), kImplicitOp);
    TORCH_CHECK_INDEX(false, message);
    __builtin_unreachable();
  }
}

// The op's five outputs, in schema order (a gradient not wanted is an empty (0,) tensor).
using ImplicitResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using ObservedOpResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Σ_t w_t (v_t − p_iᵀ q_j)² and its gradients, by the registered observed-entries op (through the
// dispatcher, so the kernel of the tensors' device runs). values None: all ones.
inline ObservedOpResult observed_part(const at::Tensor& rows, const at::Tensor& cols,
                                      const at::Tensor& P, const at::Tensor& Q,
                                      const std::optional<at::Tensor>& values,
                                      const std::optional<at::Tensor>& weights,
                                      std::string_view reduction, bool grad_values, bool grad_P,
                                      bool grad_Q, bool grad_weights) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mf_ext::observed_mf_loss_and_grads", "")
          .typed<ObservedOpResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&,
                                  const std::optional<at::Tensor>&,
                                  const std::optional<at::Tensor>&,
                                  const std::optional<at::Tensor>&, c10::string_view, bool, bool,
                                  bool, bool, bool, bool)>();
  const at::Tensor v = values.has_value() ? *values : at::ones({rows.size(0)}, P.options());
  return rethrow_as_implicit([&] {
    return op.call(rows, cols, v, P, Q, std::nullopt, std::nullopt, weights,
                   c10::string_view(reduction.data(), reduction.size()), grad_values, grad_P,
                   grad_Q, false, false, grad_weights);
  });
}

// The factor of the all-cells term: α₀ for "sum", α₀ / max(nnz, 1) for "mean" (the whole loss is
// divided by nnz, and by 1 when there are no triples, as the references' clamp_min(1)).
inline double gram_scale(double unobserved_weight, Reduction red, int64_t nnz) {
  return red == Reduction::Mean ? unobserved_weight / static_cast<double>(std::max<int64_t>(nnz, 1))
                                : unobserved_weight;
}

}  // namespace mf_ext

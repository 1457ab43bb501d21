// What the CPU and CUDA kernels of mf_ext::masked_mf_loss_and_grads share: the argument checks
// (so both reject bad input with the same message), the outputs' allocation, the choice of
// orientation and the even split of rows and columns into groups.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <optional>

#include "factor_grad_layout.h"
#include "reduction.h"

#if defined(__CUDACC__)
#define MF_EXT_HOST_DEVICE __host__ __device__
#else
#define MF_EXT_HOST_DEVICE
#endif

namespace mf_ext {

// [begin, end) of part `index` when `total` is cut into `parts` near-equal parts.
struct Range {
  int64_t begin, end;
};
MF_EXT_HOST_DEVICE inline Range split(int64_t total, int64_t parts, int64_t index) {
  return {total * index / parts, total * (index + 1) / parts};
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "mf_ext.masked_mf_loss: ", name,
                   " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_masked_mf_loss_args(const at::Tensor& R, const at::Tensor& P,
                                      const at::Tensor& Q, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK_VALUE(R.dim() == 2, "mf_ext.masked_mf_loss: R must be 2-D (m, n), got shape ",
                    R.sizes());
  TORCH_CHECK_VALUE(P.dim() == 2, "mf_ext.masked_mf_loss: P must be 2-D (r, m), got shape ",
                    P.sizes());
  TORCH_CHECK_VALUE(Q.dim() == 2, "mf_ext.masked_mf_loss: Q must be 2-D (r, n), got shape ",
                    Q.sizes());
  check_floating(R, "R");
  check_floating(P, "P");
  check_floating(Q, "Q");
  TORCH_CHECK_TYPE(P.scalar_type() == R.scalar_type() && Q.scalar_type() == R.scalar_type(),
                   "mf_ext.masked_mf_loss: R, P and Q must have the same dtype, got R ",
                   R.scalar_type(), ", P ", P.scalar_type(), ", Q ", Q.scalar_type());
  TORCH_CHECK_VALUE(P.size(0) == Q.size(0), "mf_ext.masked_mf_loss: P has rank ", P.size(0),
                    " (shape ", P.sizes(), ") but Q has rank ", Q.size(0), " (shape ", Q.sizes(),
                    ")");
  TORCH_CHECK_VALUE(P.size(1) == R.size(0), "mf_ext.masked_mf_loss: P has ", P.size(1),
                    " columns but R has ", R.size(0), " rows (P ", P.sizes(), ", R ", R.sizes(),
                    ")");
  TORCH_CHECK_VALUE(Q.size(1) == R.size(1), "mf_ext.masked_mf_loss: Q has ", Q.size(1),
                    " columns but R has ", R.size(1), " columns (Q ", Q.sizes(), ", R ",
                    R.sizes(), ")");
  TORCH_CHECK_VALUE(P.device() == R.device() && Q.device() == R.device(),
                    "mf_ext.masked_mf_loss: R, P and Q must be on the same device, got R on ",
                    R.device(), ", P on ", P.device(), ", Q on ", Q.device());
  if (mask.has_value()) {
    const at::Tensor& M = *mask;
    TORCH_CHECK_TYPE(M.scalar_type() == at::kBool,
                     "mf_ext.masked_mf_loss: mask must be a bool tensor, got ", M.scalar_type());
    TORCH_CHECK_VALUE(M.sizes() == R.sizes(), "mf_ext.masked_mf_loss: mask has shape ",
                      M.sizes(), " but R has shape ", R.sizes());
    TORCH_CHECK_VALUE(M.device() == R.device(), "mf_ext.masked_mf_loss: mask is on ",
                      M.device(), " but R is on ", R.device());
  }
}

// The op's outputs; a gradient that is not wanted is an empty (0,) tensor. grad_R has R's
// layout (at::empty_like); grad_P and grad_Q that of factor_grad_layout.h.
struct MaskedMfOutputs {
  at::Tensor loss, grad_R, grad_P, grad_Q;
};

inline MaskedMfOutputs allocate_masked_outputs(const at::Tensor& R, const at::Tensor& P,
                                               const at::Tensor& Q, bool grad_R, bool grad_P,
                                               bool grad_Q, bool table_layouts) {
  const auto opts = R.options();
  return {at::empty({}, opts), grad_R ? at::empty_like(R) : at::empty({0}, opts),
          grad_P ? allocate_factor_grad(P, table_layouts, opts) : at::empty({0}, opts),
          grad_Q ? allocate_factor_grad(Q, table_layouts, opts) : at::empty({0}, opts)};
}

// The problem as the kernels see it, R read along its rows. A column-major R is the transposed
// problem L(Rᵀ, Q, P), which swaps the roles of P and Q (and of their gradients). Gradients not
// wanted are undefined tensors.
struct RowMajorProblem {
  at::Tensor R, P, Q;
  std::optional<at::Tensor> mask;
  at::Tensor grad_R, grad_P, grad_Q;
};

// Whether the kernels see R transposed: when it is column-major, and not unit-stride along its rows.
inline bool read_transposed(const at::Tensor& R) {
  const bool rows_unit = R.size(1) <= 1 || R.stride(1) == 1;
  // One row (m = 1) is never transposed: as an n × 1 problem its dP would be summed in long
  // sequential chains (slow and less accurate) instead of across vector lanes.
  const bool column_major = R.size(0) > 1 && R.stride(0) == 1;
  return !rows_unit && column_major;
}

inline RowMajorProblem orient_rows(const at::Tensor& R, const at::Tensor& P, const at::Tensor& Q,
                                   const std::optional<at::Tensor>& mask,
                                   const MaskedMfOutputs& out, bool grad_R, bool grad_P,
                                   bool grad_Q) {
  const at::Tensor dR = grad_R ? out.grad_R : at::Tensor();
  const at::Tensor dP = grad_P ? out.grad_P : at::Tensor();
  const at::Tensor dQ = grad_Q ? out.grad_Q : at::Tensor();
  if (!read_transposed(R)) return {R, P, Q, mask, dR, dP, dQ};
  std::optional<at::Tensor> mask_t;
  if (mask.has_value()) mask_t = mask->t();
  return {R.t(), Q, P, mask_t, dR.defined() ? dR.t() : dR, dQ, dP};
}

}  // namespace mf_ext

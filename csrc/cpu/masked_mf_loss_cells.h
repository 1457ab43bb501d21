// R, the mask and grad_R of the dense CPU kernel (csrc/cpu/masked_mf_loss.cpp) as raw pointers
// and strides, taken once: what both of its unit kernels (masked_mf_loss_rowwise.h,
// masked_mf_loss_tiled.h) read and write cell by cell.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace mf_ext {

template <typename T>
struct DenseCells {
  const T* R;
  int64_t R_s0, R_s1;
  const bool* mask;  // nullptr: observed where R != 0
  int64_t M_s0, M_s1;
  T* grad_R;  // nullptr: not wanted
  int64_t G_s0, G_s1;

  // Points at R, the mask (if any) and grad_R (if defined).
  void set(const at::Tensor& R_, const std::optional<at::Tensor>& mask_,
           const at::Tensor& grad_R_) {
    R = R_.const_data_ptr<T>();
    R_s0 = R_.stride(0);
    R_s1 = R_.stride(1);
    if (mask_.has_value()) {
      mask = mask_->const_data_ptr<bool>();
      M_s0 = mask_->stride(0);
      M_s1 = mask_->stride(1);
    }
    if (grad_R_.defined()) {
      grad_R = grad_R_.mutable_data_ptr<T>();
      G_s0 = grad_R_.stride(0);
      G_s1 = grad_R_.stride(1);
    }
  }
};

}  // namespace mf_ext

// CUDA kernel of mf_ext::implicit_mf_loss_and_grads:
//   L = Σ_t w_t (v_t − p_iᵀ q_j)² + α₀ Σ_{i<m, j<n} (p_iᵀ q_j)²,
// the first sum by the registered observed-entries op (its CUDA kernel, through the dispatcher),
// the second as α₀ ⟨P Pᵀ, Q Qᵀ⟩ with the r × r Gram matrices (cuBLAS), whose gradients are
// 2α₀ (Q Qᵀ) P and 2α₀ (P Pᵀ) Q: O(nnz·r + (m+n)·r²), nothing of size m × n or nnz × r.
// float16 / bfloat16 inputs are computed in float32 (copies of P and Q, r × m and r × n) and
// rounded once at the end; the inner product of the Gram matrices is summed in float64.
//
// Weights' signs: checked on the device, queued before the observed op and read after it (so the
// host waits once, after all the work is queued, besides the observed op's own index check).
// Under CUDA graph capture, where the host cannot wait, a device-side assert checks them.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../implicit_mf_loss_common.h"

namespace mf_ext {
namespace {

bool stream_is_capturing() {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &capture));
  return capture != cudaStreamCaptureStatusNone;
}

// Raises for the first negative or NaN weight; `all_ok` is weights.ge(0).all() (false for NaN),
// queued earlier.
void check_cuda_weights(const at::Tensor& weights, const at::Tensor& all_ok, bool capturing) {
  if (capturing) {
    at::_assert_async(all_ok, "mf_ext.implicit_mf_loss: weights must be >= 0 (and not NaN)");
    return;
  }
  if (all_ok.item<bool>()) return;
  const int64_t position = weights.ge(0).logical_not().nonzero().select(0, 0).item<int64_t>();
  implicit_weight_error(position, weights.select(0, position).item<double>());
}

ImplicitResult implicit_mf_loss_and_grads_cuda(
    const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& P, const at::Tensor& Q,
    const std::optional<at::Tensor>& values, const std::optional<at::Tensor>& weights,
    double unobserved_weight, c10::string_view reduction, bool grad_values, bool grad_P,
    bool grad_Q, bool grad_weights) {
  // Checks first: with a CPU tensor among CUDA ones the dispatcher lands here, and the device
  // check must speak before the guard does.
  const std::string_view red_name(reduction.data(), reduction.size());
  const Reduction red = check_implicit_call(rows, cols, P, Q, values, weights, unobserved_weight,
                                            red_name, grad_values, grad_weights);
  const c10::cuda::CUDAGuard guard(P.device());
  const bool capturing = stream_is_capturing();
  const bool check_weights = weights.has_value() && weights->numel() > 0;
  const at::Tensor weights_ok = check_weights ? weights->ge(0).all() : at::Tensor();

  auto [loss, d_values, dP, dQ, d_row_bias, d_col_bias, d_weights] = observed_part(
      rows, cols, P, Q, values, weights, red_name, grad_values, grad_P, grad_Q, grad_weights);
  if (unobserved_weight != 0) {  // α₀ = 0: exactly the observed op
    const double scale = gram_scale(unobserved_weight, red, rows.size(0));
    const at::ScalarType acc = at::toOpMathType(P.scalar_type());
    const at::Tensor Pa = P.to(acc), Qa = Q.to(acc);
    const at::Tensor GP = at::mm(Pa, Pa.t()), GQ = at::mm(Qa, Qa.t());
    const at::Tensor inner = (GP.to(at::kDouble) * GQ.to(at::kDouble)).sum();
    loss = (loss.to(at::kDouble) + inner * scale).to(P.scalar_type());
    // d += 2·scale · G · X, accumulated in the compute type
    auto add_gram_product = [&](at::Tensor& d, const at::Tensor& G, const at::Tensor& X) {
      if (d.scalar_type() == acc) {
        d.addmm_(G, X, 1, 2 * scale);
      } else {
        d.copy_(at::addmm(d.to(acc), G, X, 1, 2 * scale));
      }
    };
    if (grad_P) add_gram_product(dP, GQ, Pa);
    if (grad_Q) add_gram_product(dQ, GP, Qa);
  }
  if (check_weights) check_cuda_weights(*weights, weights_ok, capturing);
  return {loss, d_values, dP, dQ, d_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(mf_ext, CUDA, m) {
  m.impl("implicit_mf_loss_and_grads", &implicit_mf_loss_and_grads_cuda);
}

}  // namespace mf_ext

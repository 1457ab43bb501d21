// CUDA kernel of mf_ext::implicit_mf_loss_and_grads:
//   L = Σ_t w_t (v_t − p_iᵀ q_j)² + α₀ Σ_{i<m, j<n} (p_iᵀ q_j)²,
// the first sum by the registered observed-entries op (its CUDA kernel, through the dispatcher),
// the second as α₀ ⟨P Pᵀ, Q Qᵀ⟩ with the r × r Gram matrices (cuBLAS), whose gradients are
// 2α₀ (Q Qᵀ) P and 2α₀ (P Pᵀ) Q: O(nnz·r + (m+n)·r²), nothing of size m × n or nnz × r.
// float16 / bfloat16 inputs are computed in float32 (copies of P and Q, r × m and r × n) and
// rounded once at the end; the inner product of the Gram matrices is summed in float64.
//
// Weights' signs, with no host synchronization, as the observed op checks its indices
// (observed_mf_loss.cu's header): a kernel finds the lowest position of a negative or NaN weight
// (atomicMin); a one-thread kernel queued after the loss then, if there is one, sets the loss to
// NaN and writes the position and the value into this device's weight report (pinned host
// memory, index_report.cuh); the device's next call of this op raises it on the host.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator headers only (see setup.py)
#include <ATen/core/Tensor.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>

#include "../implicit_mf_loss_common.h"
#include "index_report.cuh"

namespace mf_ext {
namespace {

// The lowest t with !(weights[t] >= 0) into *first_bad (kNoBadIndex stays when there is none).
template <typename scalar_t>
__global__ void find_bad_weight_kernel(const scalar_t* weights, int64_t stride, int64_t count,
                                       unsigned long long* first_bad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < count;
       t += step) {
    if (!(static_cast<acc_t>(weights[t * stride]) >= acc_t(0))) {
      atomicMin(first_bad, static_cast<unsigned long long>(t));
    }
  }
}

// One thread: a call with a bad weight gets a NaN loss and, unless the report already holds
// one, its position and value (the double's bits) in the report, the position written last
// since the host reads it first.
template <typename scalar_t>
__global__ void finish_weight_check_kernel(const unsigned long long* first_bad,
                                           const scalar_t* weights, int64_t stride,
                                           scalar_t* loss, volatile int64_t* report) {
  const unsigned long long t = *first_bad;
  if (t == kNoBadIndex) return;
  *loss = static_cast<scalar_t>(std::numeric_limits<double>::quiet_NaN());
  if (report[0] >= 0) return;
  const double value = static_cast<double>(
      static_cast<at::opmath_type<scalar_t>>(weights[static_cast<int64_t>(t) * stride]));
  report[1] = __double_as_longlong(value);
  __threadfence_system();
  report[0] = static_cast<int64_t>(t);
}

// Queues the search for a bad weight; returns the device word it writes.
at::Tensor queue_weight_check(const at::Tensor& weights) {
  at::Tensor first_bad = at::full({}, static_cast<int64_t>(kNoBadIndex),
                                  weights.options().dtype(at::kLong));
  const int64_t count = weights.size(0);
  constexpr int kThreads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((count + kThreads - 1) / kThreads, 1024));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights.scalar_type(),
                                  "implicit_find_bad_weight", [&] {
    find_bad_weight_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        weights.const_data_ptr<scalar_t>(), weights.stride(0), count,
        reinterpret_cast<unsigned long long*>(first_bad.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return first_bad;
}

// Queues the NaN loss and the report for a bad weight found by queue_weight_check.
void queue_weight_report(const at::Tensor& first_bad, const at::Tensor& weights,
                         at::Tensor& loss) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights.scalar_type(),
                                  "implicit_weight_report", [&] {
    finish_weight_check_kernel<scalar_t><<<1, 1, 0, stream>>>(
        reinterpret_cast<const unsigned long long*>(first_bad.const_data_ptr<int64_t>()),
        weights.const_data_ptr<scalar_t>(), weights.stride(0),
        loss.mutable_data_ptr<scalar_t>(),
        device_report(weights, ReportKind::kWeight).mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Raises the bad weight an earlier call on this device recorded, if any (and forgets it).
void raise_recorded_bad_weight(const at::Tensor& like) {
  const at::Tensor report = device_report(like, ReportKind::kWeight);
  volatile int64_t* words = report.mutable_data_ptr<int64_t>();
  const int64_t position = words[0];
  if (position < 0) return;
  wait_for_stream(like);
  const int64_t bits = words[1];
  words[0] = -1;
  double value = 0;
  std::memcpy(&value, &bits, sizeof value);
  const std::string where = std::string(" [found on ") + like.device().str() +
                            " by an earlier call, whose loss was set to NaN]";
  implicit_weight_error(position, value, where.c_str());
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
  raise_recorded_bad_weight(P);
  const bool check_weights = weights.has_value() && weights->numel() > 0;
  const at::Tensor first_bad_weight = check_weights ? queue_weight_check(*weights) : at::Tensor();

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
  if (check_weights) queue_weight_report(first_bad_weight, *weights, loss);
  return {loss, d_values, dP, dQ, d_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(mf_ext, CUDA, m) {
  m.impl("implicit_mf_loss_and_grads", &implicit_mf_loss_and_grads_cuda);
}

}  // namespace mf_ext

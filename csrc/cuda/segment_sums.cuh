// The observed kernel's deterministic mode (torch.are_deterministic_algorithms_enabled()): the
// gradients of P and Q (and the biases) as segment sums over a stable sort of the triples, each
// row's terms added in triple order by one warp, instead of float atomics.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <optional>

#include "common.cuh"
#include "row_layout.cuh"

namespace mf_ext {
namespace {

// Deterministic mode: out_rows[key] = Σ_t coef[t] · other_rows[other[t]] and out_bias[key] =
// Σ_t coef[t] over the triples t of `key`, which are order[offsets[key] : offsets[key + 1]] (a
// stable sort by key, so in triple order), added in that order by one warp. Triples whose other
// index is out of range are skipped (their coef is 0; the op raises for them afterwards).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    segment_sum_kernel(int64_t keys, const int64_t* __restrict__ offsets,
                       const int64_t* __restrict__ order, const void* other, bool other_64,
                       int64_t other_s, int64_t other_count, const acc_t* other_rows,
                       int64_t nvec, const acc_t* __restrict__ coef, acc_t* out_rows,
                       acc_t* out_bias) {
  using V = typename Vec<acc_t>::type;
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  const V* __restrict__ source = reinterpret_cast<const V*>(other_rows);
  V* out = reinterpret_cast<V*>(out_rows);
  for (int64_t key = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32;
       key < keys; key += warps) {
    const int64_t begin = offsets[key], end = offsets[key + 1];
    if (out) {
      for (int64_t v = lane; v < nvec; v += 32) {
        V acc;
        set_zero(acc);
        for (int64_t s = begin; s < end; ++s) {
          const int64_t t = order[s];
          const int64_t o = load_index(other, other_64, t * other_s);
          if (static_cast<uint64_t>(o) >= static_cast<uint64_t>(other_count)) continue;
          add_scaled(acc, coef[t], source[o * nvec + v]);
        }
        out[key * nvec + v] = acc;
      }
    }
    if (out_bias && lane == 0) {
      acc_t sum = 0;
      for (int64_t s = begin; s < end; ++s) sum += coef[order[s]];
      out_bias[key] = sum;
    }
  }
}

// out_rows, out_bias (either may be undefined) from each triple's coef: `key` (rows or cols, of
// `keys` entries) picks the gradient row, `other` (cols or rows) the row of `other_rows` (the
// other factor in row layout, nvec vectors a row) that each term reads.
template <typename acc_t>
void launch_segment_sums(const at::Tensor& key, int64_t keys, const at::Tensor& other,
                         int64_t other_count, const at::Tensor& other_rows, int64_t nvec,
                         const at::Tensor& coef, const at::Tensor& out_rows,
                         const at::Tensor& out_bias, cudaStream_t stream) {
  if (keys == 0) return;
  // (std::optional, so that `true` is not taken for the dim of the other overload)
  const auto [sorted, order] = at::sort(key, std::optional<bool>(true), /*dim=*/0);
  const at::Tensor offsets = at::searchsorted(
      sorted.to(at::kLong), at::arange(keys + 1, key.options().dtype(at::kLong)));
  segment_sum_kernel<acc_t><<<grid_for(keys, kWarps, 16), kThreads, 0, stream>>>(
      keys, offsets.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(),
      other.const_data_ptr(), other.scalar_type() == at::kLong, other.stride(0), other_count,
      other_rows.const_data_ptr<acc_t>(), nvec, coef.const_data_ptr<acc_t>(),
      out_rows.defined() ? out_rows.mutable_data_ptr<acc_t>() : nullptr,
      out_bias.defined() ? out_bias.mutable_data_ptr<acc_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace mf_ext

// What the CUDA kernels of both ops share: the block size, fixed-order block reductions (so that
// every sum is bitwise the same from run to run), grid sizing and the index loads.
#pragma once

#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>

namespace mf_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Σ v over the block in a fixed order: a shuffle tree inside each warp, then the warps in order.
// The total is returned to thread 0 (the other threads get partial sums). Every thread of the
// block must call it; a kernel may call it once per type T.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T warp_sums[kWarps];
  __syncwarp();  // the warp's lanes may have left their loops at different times
  for (int offset = 16; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  T total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
  }
  return total;
}

// Σ parts[0, count) by one block in a fixed order: each thread a strided slice, then a tree
// through `sums` (kThreads entries of shared memory). Every thread gets the total.
template <typename T>
__device__ __forceinline__ T sum_parts(const T* parts, int64_t count, T* sums) {
  T s = 0;
  for (int64_t b = threadIdx.x; b < count; b += kThreads) s += parts[b];
  sums[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) sums[threadIdx.x] += sums[threadIdx.x + stride];
    __syncthreads();
  }
  return sums[0];
}

// Blocks for `work_items` at `per_block` each, capped at `per_sm` blocks per SM (grid-stride
// loops do the rest).
inline int grid_for(int64_t work_items, int64_t per_block, int64_t per_sm) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(
      std::max<int64_t>(1, std::min((work_items + per_block - 1) / per_block, sms * per_sm)));
}

// Entry `offset` of an int32 (is_64 false) or int64 index tensor.
__device__ __forceinline__ int64_t load_index(const void* base, bool is_64, int64_t offset) {
  return is_64 ? static_cast<const int64_t*>(base)[offset]
               : static_cast<int64_t>(static_cast<const int32_t*>(base)[offset]);
}

}  // namespace
}  // namespace mf_ext

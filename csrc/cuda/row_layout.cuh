// The observed kernel's row layout: P (r, m) and Q (r, n) transposed into rows of 16-byte
// vectors, (m, r_pad) and (n, r_pad), the arithmetic on those vectors, and the transposes there
// and back.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>

#include "common.cuh"

namespace mf_ext {
namespace {

// 16-byte vectors of the accumulation type.
template <typename acc_t>
struct Vec;
template <>
struct Vec<float> {
  using type = float4;
  static constexpr int width = 4;
};
template <>
struct Vec<double> {
  using type = double2;
  static constexpr int width = 2;
};

__device__ __forceinline__ void set_zero(float4& a) { a = make_float4(0.f, 0.f, 0.f, 0.f); }
__device__ __forceinline__ void set_zero(double2& a) { a = make_double2(0.0, 0.0); }

__device__ __forceinline__ float dot_add(float s, const float4& a, const float4& b) {
  return s + a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
}
__device__ __forceinline__ double dot_add(double s, const double2& a, const double2& b) {
  return s + a.x * b.x + a.y * b.y;
}

__device__ __forceinline__ void add_scaled(float4& a, float g, const float4& b) {
  a.x += g * b.x;
  a.y += g * b.y;
  a.z += g * b.z;
  a.w += g * b.w;
}
__device__ __forceinline__ void add_scaled(double2& a, double g, const double2& b) {
  a.x += g * b.x;
  a.y += g * b.y;
}

__device__ __forceinline__ float4 scaled(float g, const float4& b) {
  return make_float4(g * b.x, g * b.y, g * b.z, g * b.w);
}
__device__ __forceinline__ double2 scaled(double g, const double2& b) {
  return make_double2(g * b.x, g * b.y);
}

// One 16-byte atomic add where the hardware has it (sm_90+), else one per component.
__device__ __forceinline__ void atomic_add_vec(float4* address, const float4& v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  atomicAdd(&address->x, v.x);
  atomicAdd(&address->y, v.y);
  atomicAdd(&address->z, v.z);
  atomicAdd(&address->w, v.w);
#else
  atomicAdd(address, v);
#endif
}
__device__ __forceinline__ void atomic_add_vec(double2* address, const double2& v) {
  atomicAdd(&address->x, v.x);
  atomicAdd(&address->y, v.y);
}

// dst[a][b] = src[b][a] for b < s0, a < s1, else 0; dst is (d0, d1). 32 × 32 tiles through
// shared memory, so both the reads and the writes are coalesced.
template <typename src_t, typename dst_t, typename tile_t>
__global__ void __launch_bounds__(kThreads)
    transpose_kernel(const src_t* __restrict__ src, int64_t s0, int64_t s1, int64_t src_ld,
                     dst_t* __restrict__ dst, int64_t d0, int64_t d1, int64_t dst_ld) {
  __shared__ tile_t tile[32][33];
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int64_t tiles_a = (d0 + 31) / 32, tiles_b = (d1 + 31) / 32;
  for (int64_t tile_id = blockIdx.x; tile_id < tiles_a * tiles_b; tile_id += gridDim.x) {
    const int64_t a0 = tile_id / tiles_b * 32, b0 = tile_id % tiles_b * 32;
    for (int y = ty; y < 32; y += kWarps) {
      const int64_t b = b0 + y, a = a0 + tx;
      tile[y][tx] = b < s0 && a < s1 ? static_cast<tile_t>(src[b * src_ld + a]) : tile_t(0);
    }
    __syncthreads();
    for (int y = ty; y < 32; y += kWarps) {
      const int64_t a = a0 + y, b = b0 + tx;
      if (a < d0 && b < d1) dst[a * dst_ld + b] = static_cast<dst_t>(tile[tx][y]);
    }
    __syncthreads();
  }
}

// X (s0, s1) → dst (d0, d1) = Xᵀ, zero-padded, cast; any strides of X.
template <typename src_t, typename dst_t, typename tile_t>
void launch_transpose(const at::Tensor& X, dst_t* dst, int64_t d0, int64_t d1, int64_t dst_ld,
                      cudaStream_t stream) {
  if (d0 == 0 || d1 == 0) return;
  // The kernel reads X along its second dimension: make that unit-stride (a size-1 dimension's
  // stride is irrelevant).
  const at::Tensor X_k = X.size(1) <= 1 || X.stride(1) == 1 ? X : X.contiguous();
  const int64_t tiles = ((d0 + 31) / 32) * ((d1 + 31) / 32);
  transpose_kernel<src_t, dst_t, tile_t><<<grid_for(tiles, 1, 16), kThreads, 0, stream>>>(
      X_k.const_data_ptr<src_t>(), X_k.size(0), X_k.size(1), X_k.stride(0), dst, d0, d1,
      dst_ld);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace mf_ext

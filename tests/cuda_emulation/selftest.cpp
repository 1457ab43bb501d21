// Tiny kernels that check the emulator itself (tests/test_cuda_emulated.py, test_emulator_*):
// correct exchanges for shuffles and barriers, and the errors it must report for bad kernels.
// Written as CUDA code on top of cuda_emu.h, as the translated sources are.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "cuda_emu.h"

namespace {

// Per block: [Σ tid (shfl_down tree + shared), butterfly over groups of 4 lanes (partial masks)
// of thread 0's group, the shared array's sum after a __syncwarp'd write by the neighbour lane].
__global__ void good_kernel(double* out) {
  __shared__ double warp_sums[8];
  __shared__ int neighbour[256];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  double v = tid + 1000.0 * blockIdx.x;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  // groups of 4 lanes, each with its own mask: butterfly sum of tid inside the group
  const unsigned mask = 0xfu << (lane & ~3);
  int g = tid;
  for (int offset = 2; offset > 0; offset /= 2) g += __shfl_xor_sync(mask, g, offset);
  neighbour[tid] = tid * 2;
  __syncwarp();
  const int from_neighbour = neighbour[tid ^ 1];
  __syncthreads();
  if (tid == 0) {
    double s = 0;
    for (int w = 0; w < 8; ++w) s += warp_sums[w];
    out[blockIdx.x * 3 + 0] = s;
    out[blockIdx.x * 3 + 1] = g;  // 0 + 1 + 2 + 3
    out[blockIdx.x * 3 + 2] = from_neighbour;  // tid 1's write: 2
  }
}

__global__ void deadlock_kernel(double* out) {
  if (threadIdx.x == 7) return;  // leaves the block before the barrier the others wait at
  __syncthreads();
  out[0] = 1;
}

__global__ void divergent_kernel(double* out) {
  if (threadIdx.x < 128) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[0] = 1;
}

__global__ void exited_lane_kernel(double* out) {
  if (threadIdx.x == 5) return;
  double v = __shfl_xor_sync(0xffffffffu, 1.0, 1);
  if (threadIdx.x == 0) out[0] = v;
}

__global__ void outside_mask_kernel(double* out) {
  const unsigned lane = threadIdx.x % 32;
  const unsigned mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  out[threadIdx.x] = __shfl_xor_sync(mask, 1.0, 16);  // the partner is in the other half
}

__global__ void mixed_collectives_kernel(double* out) {
  if (threadIdx.x % 32 < 16) {
    __syncwarp();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0, 1);
  }
}

__global__ void shared_garbage_kernel(double* out) {
  __shared__ double never_written[256];
  __syncthreads();
  out[threadIdx.x] = never_written[threadIdx.x];
}

__global__ void trap_kernel(double* out) {
  if (blockIdx.x == 1 && threadIdx.x == 3) __trap();
  out[0] = 1;
}

__global__ void misaligned_atomic_kernel(double* out) {
  float4* p = reinterpret_cast<float4*>(reinterpret_cast<char*>(out) + 4);
  if (threadIdx.x == 0) atomicAdd(p, make_float4(1, 1, 1, 1));
}

at::Tensor selftest(c10::string_view which_view) {
  const std::string which(which_view.data(), which_view.size());
  at::Tensor out = at::zeros({1024}, at::kDouble);
  double* o = out.mutable_data_ptr<double>();
  if (which == "good") {
    good_kernel<<<3, 256>>>(o);
    return out.narrow(0, 0, 9);
  }
  if (which == "deadlock") deadlock_kernel<<<2, 256>>>(o);
  else if (which == "divergent") divergent_kernel<<<1, 256>>>(o);
  else if (which == "exited_lane") exited_lane_kernel<<<1, 64>>>(o);
  else if (which == "outside_mask") outside_mask_kernel<<<1, 32>>>(o);
  else if (which == "mixed_collectives") mixed_collectives_kernel<<<1, 32>>>(o);
  else if (which == "shared_garbage") shared_garbage_kernel<<<1, 256>>>(o);
  else if (which == "trap") trap_kernel<<<2, 32>>>(o);
  else if (which == "misaligned_atomic") misaligned_atomic_kernel<<<1, 32>>>(o);
  else if (which == "empty_grid") trap_kernel<<<0, 32>>>(o);
  else TORCH_CHECK(false, "unknown selftest ", which);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mf_ext_emu, m) { m.def("selftest(str which) -> Tensor"); }
TORCH_LIBRARY_IMPL(mf_ext_emu, CompositeExplicitAutograd, m) { m.impl("selftest", &selftest); }

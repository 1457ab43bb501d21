// Tiny kernels that check the emulator itself (tests/test_cuda_emulated.py, test_emulator_*):
// correct exchanges for shuffles and barriers, and the errors it must report for bad kernels.
// Written as CUDA code on top of cuda_emu.h, as the translated sources are.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <string>  // (no blank line above: the tests name line numbers of this file)

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

// The order in which the 64 threads pass three points: after a __syncthreads, after a second
// one, after a __syncwarp (each warp's own). out[64 * point + k] = the k-th thread to pass it.
__global__ void order_kernel(double* out) {
  __shared__ int passed[3];
  const int tid = threadIdx.x;
  if (tid == 0) passed[0] = passed[1] = passed[2] = 0;
  __syncthreads();
  out[atomicAdd(&passed[0], 1)] = tid;
  __syncthreads();
  out[64 + atomicAdd(&passed[1], 1)] = tid;
  __syncwarp();
  out[128 + atomicAdd(&passed[2], 1)] = tid;
}

// The order at block start itself: each thread takes a ticket from a global counter.
__global__ void start_order_kernel(double* out, int* ticket) {
  out[atomicAdd(ticket, 1)] = threadIdx.x;
}

// Lane k reads the slot lane k - 1 wrote, with (good) or without (racy) a __syncwarp between:
// out[k] = k (lane 0 reads nothing), or garbage (-1) where the read came first.
template <bool kSync>
__global__ void neighbour_kernel(double* out) {
  __shared__ int slot[64];
  const int tid = threadIdx.x, lane = tid % 32;
  __syncthreads();  // the race is between fibers released together by a barrier
  slot[tid] = tid + 1;
  if (kSync) __syncwarp();
  out[tid] = lane > 0 ? slot[tid - 1] : 0;
}

at::Tensor selftest(c10::string_view which_view) {
  const std::string which(which_view.data(), which_view.size());
  at::Tensor out = at::zeros({1024}, at::kDouble);
  double* o = out.mutable_data_ptr<double>();
  if (which == "good") {
    good_kernel<<<3, 256>>>(o);
    return out.narrow(0, 0, 9);
  }
  if (which == "order") {  // 4 x 64: block start, after __syncthreads (twice), __syncwarp
    at::Tensor ticket = at::zeros({1}, at::kInt);
    start_order_kernel<<<1, 64>>>(o, ticket.mutable_data_ptr<int>());
    order_kernel<<<1, 64>>>(o + 64);
    return out.narrow(0, 0, 256).view({4, 64});
  }
  if (which == "neighbour_racy" || which == "neighbour_synced") {
    if (which == "neighbour_racy") neighbour_kernel<false><<<2, 64>>>(o);
    else neighbour_kernel<true><<<2, 64>>>(o);
    return out.narrow(0, 0, 64);
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

void set_schedule(c10::string_view name, int64_t seed) {
  ::cuda_emu::set_schedule(std::string(name.data(), name.size()), seed);
}

// The schedule the next launch gets (set_schedule's, else MF_EXT_EMU_SCHEDULE's, else forward).
std::string get_schedule() { return ::cuda_emu::schedule_name(::cuda_emu::current_schedule()); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(mf_ext_emu, m) {
  m.def("selftest(str which) -> Tensor");
  // name: forward | reverse | shuffled (seed: its generator's seed) | "" (back to
  // MF_EXT_EMU_SCHEDULE, else forward). See cuda_emu.h, "schedule". (No tensor arguments:
  // catch-all kernels.)
  m.def("set_schedule(str name, int seed=0) -> ()", &set_schedule);
  m.def("get_schedule() -> str", &get_schedule);
}
TORCH_LIBRARY_IMPL(mf_ext_emu, CompositeExplicitAutograd, m) { m.impl("selftest", &selftest); }

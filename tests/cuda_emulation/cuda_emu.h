// A CPU emulator of the subset of CUDA that csrc/cuda/*.cu uses, so that the unmodified kernels
// (after tests/cuda_emulation/translate.py has rewritten their launches and CUDA-only includes)
// run on the CPU. Header-only, C++17, g++.
//
// Execution model. A launch runs its blocks one after another on the calling OS thread. The
// threads of a block are cooperative user-space fibers (own stacks, switched by a few lines of
// assembly on x86-64, ucontext elsewhere): a fiber runs until it reaches a barrier
// (__syncthreads, __syncwarp) or a warp collective (__shfl_*_sync), where it parks until every
// thread that must take part has arrived. The fibers that become runnable together (all of them
// at block start, those a barrier or collective releases) are queued in the order of a schedule
// chosen at run time (forward, reverse, shuffled: see "schedule" below), so that a missing
// barrier between a write and another thread's read shows under one of them. A barrier that
// can never complete (a thread exited, or waits at another barrier) is reported as a deadlock
// error naming the waiting threads, never a hang. Warp collectives are matched per (warp, mask) and exchange the values of the lanes of
// that mask, with the CUDA rules checked: the caller is in the mask, the source lane is in the
// mask, all lanes of one rendezvous execute the same kind of collective. A __syncthreads reached
// at two different source lines by threads of one block is reported as divergence.
//
// Memory. __shared__ variables are function-local statics (one block runs at a time); the
// translator registers each one so it is filled with 0xFF bytes (NaN for floating types) at the
// start of each block, as uninitialized shared memory would hold garbage. at::empty in the
// translated sources returns tensors filled with 0xFF bytes for the same reason. Atomics are
// plain read-modify-writes (one OS thread), with CUDA's alignment rule checked for the 16-byte
// forms.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Device.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// ---- qualifiers -----------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
// __restrict__ is a g++ keyword already.

// ---- vector and launch types ------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
static_assert(sizeof(float4) == 16 && alignof(float4) == 16, "float4 as CUDA has it");
static_assert(sizeof(double2) == 16 && alignof(double2) == 16, "double2 as CUDA has it");
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline double2 make_double2(double x, double y) { return double2{x, y}; }

struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorLaunchFailure = 719 };
enum cudaStreamCaptureStatus {
  cudaStreamCaptureStatusNone = 0,
  cudaStreamCaptureStatusActive = 1,
  cudaStreamCaptureStatusInvalidated = 2
};
inline cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;  // the emulator never captures graphs
  return cudaSuccess;
}

namespace cuda_emu {

// ---- schedule -------------------------------------------------------------------------------
// The order in which fibers that become runnable together (every thread at block start; the
// threads a barrier or warp collective releases, the one that completed it included) are run:
//   forward   ascending thread index;
//   reverse   descending thread index;
//   shuffled  a pseudo-random permutation, drawn anew at every release from a generator seeded
//             at each launch with `seed` (so one op call is deterministic given the seed).
// Runnable fibers wait in one FIFO queue; a fiber runs until it parks, so a release's fibers run
// after those already queued. Chosen at run time: set_schedule() (the op
// mf_ext_emu::set_schedule), else the environment variable MF_EXT_EMU_SCHEDULE ("forward",
// "reverse", "shuffled" or "shuffled:SEED"), read at every launch, else forward.
enum class Schedule { Forward, Reverse, Shuffled };

struct ScheduleChoice {
  Schedule kind = Schedule::Forward;
  uint64_t seed = 0;
};

struct ScheduleConfig {
  std::mutex mu;
  bool explicit_set = false;  // set_schedule() was called (and not reset with "")
  ScheduleChoice choice;
};

inline ScheduleConfig& schedule_config() {
  static ScheduleConfig c;
  return c;
}

inline ScheduleChoice parse_schedule(const std::string& spec) {
  ScheduleChoice c;
  std::string name = spec;
  const size_t colon = spec.find(':');
  if (colon != std::string::npos) {
    name = spec.substr(0, colon);
    const std::string num = spec.substr(colon + 1);
    char* end = nullptr;
    c.seed = std::strtoull(num.c_str(), &end, 10);
    TORCH_CHECK(!num.empty() && end && *end == '\0' && name == "shuffled",
                "CUDA emulation: bad schedule '", spec, "' (a seed only as shuffled:SEED)");
  }
  if (name == "forward") c.kind = Schedule::Forward;
  else if (name == "reverse") c.kind = Schedule::Reverse;
  else if (name == "shuffled") c.kind = Schedule::Shuffled;
  else TORCH_CHECK(false, "CUDA emulation: unknown schedule '", spec,
                   "' (forward, reverse, shuffled, shuffled:SEED)");
  return c;
}

// The schedule for a launch that starts now.
inline ScheduleChoice current_schedule() {
  ScheduleConfig& c = schedule_config();
  std::lock_guard<std::mutex> lock(c.mu);
  if (c.explicit_set) return c.choice;
  const char* env = std::getenv("MF_EXT_EMU_SCHEDULE");
  if (!env || !*env) return ScheduleChoice{};
  return parse_schedule(env);
}

// name "" returns to the environment's schedule (or forward).
inline void set_schedule(const std::string& name, int64_t seed) {
  ScheduleChoice choice;
  if (!name.empty()) {
    choice = parse_schedule(name);
    TORCH_CHECK(seed == 0 || choice.kind == Schedule::Shuffled,
                "CUDA emulation: a seed is for the shuffled schedule only");
    if (name.find(':') == std::string::npos) choice.seed = static_cast<uint64_t>(seed);
  }
  ScheduleConfig& c = schedule_config();
  std::lock_guard<std::mutex> lock(c.mu);
  c.explicit_set = !name.empty();
  c.choice = choice;
}

inline std::string schedule_name(const ScheduleChoice& c) {
  switch (c.kind) {
    case Schedule::Forward: return "forward";
    case Schedule::Reverse: return "reverse";
    default: return "shuffled:" + std::to_string(c.seed);
  }
}

// splitmix64: small, and the same on every platform (std::shuffle's algorithm is not).
inline uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// ---- runtime state ----------------------------------------------------------------------------
constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;

enum class FiberState { Ready, Waiting, Done };

struct Fiber {
  void* sp = nullptr;  // saved stack pointer (x86-64) while switched out
#if !defined(__x86_64__)
  ucontext_t ctx;
#endif
  char* stack = nullptr;  // lowest usable address (a guard page lies below)
  uint3 tidx{0, 0, 0};
  unsigned linear = 0;
  FiberState state = FiberState::Ready;
  const uint64_t* wait_gen = nullptr;  // parked until *wait_gen != wait_val
  uint64_t wait_val = 0;
  const char* wait_what = "";
  int wait_line = 0;
  unsigned wait_mask = 0;
  std::exception_ptr error;
};

struct WarpBarrier {
  unsigned mask = 0, arrived = 0;
  uint64_t gen = 0;
  int kind = -1, line = 0;
  uint64_t vals[2][32];
};

struct Runtime {
  std::vector<Fiber> fibers;
  char* stacks = nullptr;
  size_t stacks_count = 0;
  void* sched_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t sched_ctx;
#endif
  Fiber* cur = nullptr;
  std::function<void()>* body = nullptr;
  dim3 grid, block;
  uint3 block_idx{0, 0, 0};
  unsigned nthreads = 0;
  // __syncthreads
  unsigned bar_arrived = 0;
  uint64_t bar_gen = 0;
  int bar_line = 0;
  // warp collectives: per warp, one rendezvous per mask in use
  std::vector<std::vector<WarpBarrier>> warps;
  // shared-memory poisoning: address -> block epoch it was last poisoned in
  uint64_t block_epoch = 0;
  std::unordered_map<const void*, uint64_t> shared_epoch;
  bool in_kernel = false;
  uint64_t launches = 0, switches = 0;
  // the run queue (a ring of thread indices; each fiber is in it at most once) and the schedule
  ScheduleChoice schedule;
  uint64_t rng = 0;
  std::vector<unsigned> queue;
  size_t q_head = 0, q_size = 0;
  std::vector<unsigned> released;  // scratch
};

inline Runtime& rt() {
  static thread_local Runtime r;
  return r;
}

inline Fiber* cur_fiber() {
  Fiber* f = rt().cur;
  if (!f) throw std::logic_error("CUDA emulation: device code called outside a kernel launch");
  return f;
}

struct KernelError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void device_error(const std::string& what) { throw KernelError(what); }

// ---- context switching ------------------------------------------------------------------------
#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores the stack pointer in *save,
// switches to `to` and restores what was saved there.
__attribute__((naked, noinline)) inline void ctx_switch(void** /*save*/, void* /*to*/) {
  asm("pushq %rbp\n\t"
      "pushq %rbx\n\t"
      "pushq %r12\n\t"
      "pushq %r13\n\t"
      "pushq %r14\n\t"
      "pushq %r15\n\t"
      "movq %rsp, (%rdi)\n\t"
      "movq %rsi, %rsp\n\t"
      "popq %r15\n\t"
      "popq %r14\n\t"
      "popq %r13\n\t"
      "popq %r12\n\t"
      "popq %rbx\n\t"
      "popq %rbp\n\t"
      "ret\n\t");
}
#endif

#if defined(__SANITIZE_ADDRESS__)
// AddressSanitizer must be told about every stack switch (MF_EXT_EMU_ASAN=1 builds).
inline const void*& asan_sched_bottom() {
  static thread_local const void* b = nullptr;
  return b;
}
inline size_t& asan_sched_size() {
  static thread_local size_t s = 0;
  return s;
}
#endif

[[noreturn]] inline void fiber_entry();

#if !defined(__x86_64__)
inline void fiber_entry_uc() { fiber_entry(); }
#endif

// Scheduler -> fiber f.
inline void resume(Fiber& f) {
  Runtime& R = rt();
  R.cur = &f;
  ++R.switches;
#if defined(__SANITIZE_ADDRESS__)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
#endif
#if defined(__x86_64__)
  ctx_switch(&R.sched_sp, f.sp);
#else
  swapcontext(&R.sched_ctx, &f.ctx);
#endif
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  R.cur = nullptr;
}

// Fiber -> scheduler.
inline void yield_to_scheduler() {
  Runtime& R = rt();
  Fiber* f = R.cur;
#if defined(__SANITIZE_ADDRESS__)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(f->state == FiberState::Done ? nullptr : &fake,
                                 asan_sched_bottom(), asan_sched_size());
#endif
#if defined(__x86_64__)
  ctx_switch(&f->sp, R.sched_sp);
#else
  swapcontext(&f->ctx, &R.sched_ctx);
#endif
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake, &asan_sched_bottom(), &asan_sched_size());
#endif
}

[[noreturn]] inline void fiber_entry() {
  Runtime& R = rt();
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &asan_sched_bottom(), &asan_sched_size());
#endif
  Fiber* f = R.cur;
  try {
    (*R.body)();
  } catch (...) {
    f->error = std::current_exception();
  }
  f->state = FiberState::Done;
  yield_to_scheduler();
  __builtin_trap();  // a finished fiber is never resumed
}

inline void ensure_stacks(size_t count) {
  Runtime& R = rt();
  if (R.stacks_count >= count) return;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t each = kStackBytes + page;  // a guard page below every stack
  if (R.stacks) munmap(R.stacks, R.stacks_count * each);
  void* mem = mmap(nullptr, count * each, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) throw std::runtime_error("CUDA emulation: cannot map fiber stacks");
  R.stacks = static_cast<char*>(mem);
  R.stacks_count = count;
  for (size_t i = 0; i < count; ++i) mprotect(R.stacks + i * each, page, PROT_NONE);
}

inline char* stack_of(size_t i) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return rt().stacks + i * (kStackBytes + page) + page;
}

inline void init_fiber(Fiber& f, char* stack) {
#if defined(__SANITIZE_ADDRESS__)
  // The previous fiber on this stack never returned: its frames' redzones are still poisoned.
  ASAN_UNPOISON_MEMORY_REGION(stack, kStackBytes);
#endif
  f.stack = stack;
  f.state = FiberState::Ready;
  f.error = nullptr;
  f.wait_gen = nullptr;
#if defined(__x86_64__)
  auto* top = reinterpret_cast<uintptr_t*>(
      (reinterpret_cast<uintptr_t>(stack) + kStackBytes) & ~static_cast<uintptr_t>(15));
  uintptr_t* sp = top;
  *--sp = 0;                                             // fiber_entry's (fake) return address
  *--sp = reinterpret_cast<uintptr_t>(&fiber_entry);     // ctx_switch returns here
  for (int k = 0; k < 6; ++k) *--sp = 0;                 // rbp rbx r12 r13 r14 r15
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, &fiber_entry_uc, 0);
#endif
}

// Parks the current fiber until *gen != val.
inline void park(const uint64_t* gen, uint64_t val, const char* what, int line, unsigned mask) {
  Fiber* f = cur_fiber();
  f->state = FiberState::Waiting;
  f->wait_gen = gen;
  f->wait_val = val;
  f->wait_what = what;
  f->wait_line = line;
  f->wait_mask = mask;
  yield_to_scheduler();
}

// Appends `ids` (fibers made runnable together, in ascending thread order) to the run queue in
// the schedule's order.
inline void enqueue_released(std::vector<unsigned>& ids) {
  Runtime& R = rt();
  if (R.schedule.kind == Schedule::Reverse) {
    std::reverse(ids.begin(), ids.end());
  } else if (R.schedule.kind == Schedule::Shuffled) {
    for (size_t i = ids.size(); i > 1; --i) {  // Fisher-Yates
      const size_t j = static_cast<size_t>(splitmix64(R.rng) % i);
      std::swap(ids[i - 1], ids[j]);
    }
  }
  const size_t cap = R.queue.size();
  for (unsigned t : ids) {
    R.fibers[t].state = FiberState::Ready;
    R.queue[(R.q_head + R.q_size) % cap] = t;
    ++R.q_size;
  }
}

// The current fiber completed the barrier whose generation counter is *gen (already advanced):
// the fibers parked on it and the current one become runnable, in the schedule's order, and the
// current one yields so that order decides who runs first. `first`..`last`: the thread indices
// that can be parked on it.
inline void release_and_yield(const uint64_t* gen, unsigned first, unsigned last) {
  Runtime& R = rt();
  Fiber* self = cur_fiber();
  auto& ids = R.released;
  ids.clear();
  for (unsigned t = first; t < last; ++t) {
    const Fiber& f = R.fibers[t];
    if (&f == self || (f.state == FiberState::Waiting && f.wait_gen == gen)) ids.push_back(t);
  }
  enqueue_released(ids);
  yield_to_scheduler();
}

inline std::string where() {
  Runtime& R = rt();
  std::ostringstream s;
  s << "block (" << R.block_idx.x << "," << R.block_idx.y << "," << R.block_idx.z << ")";
  if (R.cur) s << " thread " << R.cur->linear;
  return s.str();
}

// ---- barriers and warp collectives ---------------------------------------------------------------
inline void syncthreads(int line) {
  Runtime& R = rt();
  if (R.bar_arrived == 0) {
    R.bar_line = line;
  } else if (R.bar_line != line) {
    device_error("divergent __syncthreads: " + where() + " reached line " +
                 std::to_string(line) + " while other threads wait at line " +
                 std::to_string(R.bar_line));
  }
  const uint64_t gen = R.bar_gen;
  if (++R.bar_arrived == R.nthreads) {
    R.bar_arrived = 0;
    ++R.bar_gen;
    release_and_yield(&R.bar_gen, 0, R.nthreads);
    return;
  }
  park(&R.bar_gen, gen, "__syncthreads", line, 0);
}

enum Kind { kSyncwarp = 0, kShflXor = 1, kShflDown = 2 };
inline const char* kind_name(int k) {
  return k == kSyncwarp ? "__syncwarp" : k == kShflXor ? "__shfl_xor_sync" : "__shfl_down_sync";
}

// One warp-level rendezvous of the lanes in `mask`; stores this lane's 8-byte value and returns
// the slot (generation) to read the others' values from.
inline WarpBarrier& warp_rendezvous(int kind, int line, unsigned mask, uint64_t value,
                                    uint64_t& gen_out) {
  Runtime& R = rt();
  Fiber* f = cur_fiber();
  const unsigned lane = f->linear % 32, warp = f->linear / 32;
  if (mask == 0 || !(mask >> lane & 1u)) {
    std::ostringstream s;
    s << kind_name(kind) << " at line " << line << ": " << where() << " (lane " << lane
      << ") is not in its own mask 0x" << std::hex << mask;
    device_error(s.str());
  }
  auto& list = R.warps[warp];
  WarpBarrier* b = nullptr;
  for (auto& w : list) {
    if (w.mask == mask) {
      b = &w;
      break;
    }
  }
  if (!b) {
    if (list.size() == list.capacity()) device_error("CUDA emulation: too many warp masks");
    list.emplace_back();
    b = &list.back();
    b->mask = mask;
  }
  if (b->arrived == 0) {
    b->kind = kind;
    b->line = line;
  } else if (b->kind != kind) {
    std::ostringstream s;
    s << "mismatched warp collectives: " << where() << " calls " << kind_name(kind)
      << " (line " << line << ") while lanes of mask 0x" << std::hex << mask << std::dec
      << " wait in " << kind_name(b->kind) << " (line " << b->line << ")";
    device_error(s.str());
  }
  const uint64_t gen = b->gen;
  b->vals[gen & 1][lane] = value;
  b->arrived |= 1u << lane;
  gen_out = gen;
  const uint64_t* genp = &b->gen;
  const size_t index = static_cast<size_t>(b - list.data());
  if (b->arrived == mask) {
    b->arrived = 0;
    ++b->gen;
    const unsigned first = warp * 32;
    release_and_yield(genp, first, std::min(first + 32, R.nthreads));
  } else {
    park(genp, gen, kind_name(kind), line, mask);
  }
  // (the list does not grow while lanes of this mask wait or are queued: reserve(64), and a
  // lane reads its rendezvous' values before it can reach another collective)
  return R.warps[warp][index];
}

inline void syncwarp(int line, unsigned mask = 0xffffffffu) {
  uint64_t gen;
  warp_rendezvous(kSyncwarp, line, mask, 0, gen);
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of <= 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

template <typename T>
inline T shfl(int kind, int line, unsigned mask, T v, int src, int width) {
  if (width != 32) device_error("CUDA emulation: shuffle width other than 32 not emulated");
  uint64_t gen;
  WarpBarrier& b = warp_rendezvous(kind, line, mask, to_bits(v), gen);
  const unsigned lane = cur_fiber()->linear % 32;
  if (src < 0 || src > 31) return v;  // __shfl_down_sync past the warp: the lane's own value
  if (!(mask >> src & 1u)) {
    std::ostringstream s;
    s << kind_name(kind) << " at line " << line << ": " << where() << " (lane " << lane
      << ") reads lane " << src << ", outside its mask 0x" << std::hex << mask
      << " (undefined on a GPU)";
    device_error(s.str());
  }
  return from_bits<T>(b.vals[gen & 1][src]);
}

template <typename T>
inline T shfl_xor(int line, unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = static_cast<int>(cur_fiber()->linear % 32);
  return shfl(kShflXor, line, mask, v, lane ^ lane_mask, width);
}
template <typename T>
inline T shfl_down(int line, unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = static_cast<int>(cur_fiber()->linear % 32);
  const int src = lane + static_cast<int>(delta);
  return shfl(kShflDown, line, mask, v, src > 31 ? -1 : src, width);
}

// ---- shared and global memory -------------------------------------------------------------------
// Called right after each __shared__ declaration: the first thread of a block to get there fills
// the variable with 0xFF bytes (garbage, NaN for floating types); later ones leave it.
inline void shared_poison(const void* p, size_t bytes) {
  Runtime& R = rt();
  auto it = R.shared_epoch.find(p);
  if (it != R.shared_epoch.end() && it->second == R.block_epoch) return;
  R.shared_epoch[p] = R.block_epoch;
  std::memset(const_cast<void*>(p), 0xFF, bytes);
}

// at::empty of the translated sources: CUDA memory is not zeroed, so neither is this.
inline at::Tensor garbage_empty(at::IntArrayRef size, at::TensorOptions options) {
  at::Tensor t = at::empty(size, options);
  if (t.scalar_type() != at::kBool && t.numel() > 0) {
    std::memset(t.mutable_data_ptr(), 0xFF, t.nbytes());
  }
  return t;
}

inline void check_aligned(const void* p, size_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    std::ostringstream s;
    s << what << ": misaligned address " << p << " (needs " << bytes << " bytes) in " << where();
    device_error(s.str());
  }
}

// ---- launch -----------------------------------------------------------------------------------
inline void run_grid(const char* name, dim3 grid, dim3 block, size_t smem,
                     std::function<void()>& body) {
  Runtime& R = rt();
  TORCH_CHECK(!R.in_kernel, "CUDA emulation: kernel launch from device code (", name, ")");
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1,
              "CUDA emulation: invalid configuration (cudaErrorInvalidConfiguration): ", name,
              " launched with grid (", grid.x, ",", grid.y, ",", grid.z, ")");
  TORCH_CHECK(grid.x <= 2147483647u && grid.y <= 65535u && grid.z <= 65535u,
              "CUDA emulation: grid too large for ", name, ": (", grid.x, ",", grid.y, ",",
              grid.z, ")");
  TORCH_CHECK(nthreads >= 1 && nthreads <= kMaxThreads && block.z <= 64,
              "CUDA emulation: invalid block (", block.x, ",", block.y, ",", block.z,
              ") for ", name);
  TORCH_CHECK(smem <= 48 * 1024, "CUDA emulation: dynamic shared memory ", smem, " for ", name);
  ensure_stacks(nthreads);
  R.fibers.resize(nthreads);
  R.grid = grid;
  R.block = block;
  R.nthreads = static_cast<unsigned>(nthreads);
  R.body = &body;
  R.schedule = current_schedule();
  R.rng = R.schedule.seed;
  R.queue.assign(nthreads, 0);
  R.in_kernel = true;
  ++R.launches;
  struct Reset {
    ~Reset() {
      rt().in_kernel = false;
      rt().cur = nullptr;
    }
  } reset;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        R.block_idx = uint3{bx, by, bz};
        ++R.block_epoch;
        R.bar_arrived = 0;
        R.warps.resize((nthreads + 31) / 32);
        for (auto& w : R.warps) {
          w.clear();
          w.reserve(64);  // never reallocated while lanes wait on an entry
        }
        for (unsigned t = 0; t < nthreads; ++t) {
          Fiber& f = R.fibers[t];
          init_fiber(f, stack_of(t));
          f.linear = t;
          f.tidx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
        }
        R.q_head = R.q_size = 0;
        R.released.clear();
        for (unsigned t = 0; t < nthreads; ++t) R.released.push_back(t);
        enqueue_released(R.released);
        unsigned done = 0;
        while (done < nthreads) {
          if (R.q_size == 0) {
            std::ostringstream s;
            s << "CUDA emulation: deadlock in kernel " << name << ", block (" << bx << "," << by
              << "," << bz << "): " << done << " of " << nthreads
              << " threads have exited; waiting:";
            int shown = 0;
            for (unsigned t = 0; t < nthreads && shown < 8; ++t) {
              const Fiber& f = R.fibers[t];
              if (f.state != FiberState::Waiting) continue;
              s << " [thread " << t << " in " << f.wait_what << " at line " << f.wait_line;
              if (f.wait_mask) s << " mask 0x" << std::hex << f.wait_mask << std::dec;
              s << "]";
              ++shown;
            }
            TORCH_CHECK(false, s.str());
          }
          const unsigned t = R.queue[R.q_head];
          R.q_head = (R.q_head + 1) % R.queue.size();
          --R.q_size;
          Fiber& f = R.fibers[t];
          resume(f);
          if (f.error) {
            try {
              std::rethrow_exception(f.error);
            } catch (const std::exception& e) {
              TORCH_CHECK(false, "CUDA emulation: kernel ", name, " failed in block (", bx, ",",
                          by, ",", bz, ") thread ", t, ": ", e.what(), " [schedule ",
                          schedule_name(R.schedule), "]");
            }
          }
          if (f.state == FiberState::Done) ++done;
        }
      }
    }
  }
}

template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
            cudaStream_t /*stream*/, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel argument count");
  // Kernel parameters are copied once at launch, as CUDA does; each thread gets its own copy.
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  std::function<void()> body = [&]() { std::apply(kernel, params); };
  run_grid(name, grid, block, smem, body);
}

inline void launch_check() {}

// The prefetch.global.L2 hint of the dense kernel (an inline-asm statement, rewritten by the
// translator): a no-op, but the address expression is still evaluated.
inline void prefetch_l2(const volatile void*) {}

// ---- the host-side CUDA API the sources use -----------------------------------------------------
struct DeviceProperties {
  int multiProcessorCount = 132;  // an H200
  int warpSize = 32;
  size_t sharedMemPerBlock = 48 * 1024;
};

}  // namespace cuda_emu

#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::cuda_emu::launch_check()
#define C10_CUDA_CHECK(expr)                                                          \
  do {                                                                                \
    const cudaError_t emu_err_ = (expr);                                              \
    TORCH_CHECK(emu_err_ == cudaSuccess, "CUDA emulation: error ", int(emu_err_));    \
  } while (0)

namespace at {
namespace cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
inline ::cuda_emu::DeviceProperties* getCurrentDeviceProperties() {
  static ::cuda_emu::DeviceProperties props;
  return &props;
}
}  // namespace cuda
}  // namespace at

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};
}  // namespace cuda
}  // namespace c10

// ---- device built-ins -------------------------------------------------------------------------
#define threadIdx (::cuda_emu::cur_fiber()->tidx)
#define blockIdx (::cuda_emu::rt().block_idx)
#define blockDim (static_cast<const dim3&>(::cuda_emu::rt().block))
#define gridDim (static_cast<const dim3&>(::cuda_emu::rt().grid))
#define __syncthreads() ::cuda_emu::syncthreads(__LINE__)
#define __syncwarp(...) ::cuda_emu::syncwarp(__LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_xor_sync(...) ::cuda_emu::shfl_xor(__LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::cuda_emu::shfl_down(__LINE__, __VA_ARGS__)

[[noreturn]] inline void __trap() { ::cuda_emu::device_error("__trap() called"); }

inline float atomicAdd(float* a, float v) {
  const float old = *a;
  *a = old + v;
  return old;
}
inline double atomicAdd(double* a, double v) {
  const double old = *a;
  *a = old + v;
  return old;
}
inline int atomicAdd(int* a, int v) {
  const int old = *a;
  *a = old + v;
  return old;
}
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  const unsigned long long old = *a;
  *a = old + v;
  return old;
}
// sm_90's 16-byte vector atomic: the address must be 16-byte aligned.
inline float4 atomicAdd(float4* a, float4 v) {
  ::cuda_emu::check_aligned(a, 16, "atomicAdd(float4*)");
  const float4 old = *a;
  a->x += v.x;
  a->y += v.y;
  a->z += v.z;
  a->w += v.w;
  return old;
}
inline unsigned long long atomicMin(unsigned long long* a, unsigned long long v) {
  ::cuda_emu::check_aligned(a, 8, "atomicMin(unsigned long long*)");
  const unsigned long long old = *a;
  if (v < old) *a = v;
  return old;
}
inline int atomicMin(int* a, int v) {
  const int old = *a;
  if (v < old) *a = v;
  return old;
}

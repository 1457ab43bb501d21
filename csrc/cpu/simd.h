// 64-byte vectors through GCC/Clang vector extensions. The compiler maps them onto AVX-512,
// AVX2 or SSE registers, whichever target the calling function was compiled for (see
// MF_EXT_TARGET_CLONES), so one source gives every x86-64 machine its widest vectors.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

namespace mf_ext::simd {

template <typename T>
struct Vec;

template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
  typedef float unaligned __attribute__((vector_size(64), aligned(4), may_alias));
  typedef uint8_t bytes __attribute__((vector_size(16)));
  static constexpr int width = 16;
};

template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
  typedef double unaligned __attribute__((vector_size(64), aligned(8), may_alias));
  typedef uint8_t bytes __attribute__((vector_size(8)));
  static constexpr int width = 8;
};

#define MF_EXT_INLINE inline __attribute__((always_inline))

template <typename T>
MF_EXT_INLINE typename Vec<T>::type load(const T* p) {
  return *reinterpret_cast<const typename Vec<T>::unaligned*>(p);
}

template <typename T>
MF_EXT_INLINE void store(T* p, typename Vec<T>::type v) {
  *reinterpret_cast<typename Vec<T>::unaligned*>(p) = v;
}

template <typename T>
MF_EXT_INLINE typename Vec<T>::type broadcast(T x) {
  typename Vec<T>::type v = {};
  return v + x;
}

// Sum of the lanes: halves added pairwise (64 → 32 → 16 bytes), then the rest in lane order.
// A fixed order, so results never depend on anything but the inputs.
template <typename T>
MF_EXT_INLINE T sum_lanes(typename Vec<T>::type v) {
  typedef T Half __attribute__((vector_size(32)));
  typedef T Quarter __attribute__((vector_size(16)));
  Half lo, hi;
  __builtin_memcpy(&lo, &v, sizeof(Half));
  __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
  const Half h = lo + hi;
  Quarter qlo, qhi;
  __builtin_memcpy(&qlo, &h, sizeof(Quarter));
  __builtin_memcpy(&qhi, reinterpret_cast<const char*>(&h) + sizeof(Quarter), sizeof(Quarter));
  const Quarter q = qlo + qhi;
  T s = 0;
  for (int l = 0; l < static_cast<int>(sizeof(Quarter) / sizeof(T)); ++l) s += q[l];
  return s;
}

// A bool mask chunk (one byte per entry, 0 or 1) as a vector of 0s and 1s.
template <typename T>
MF_EXT_INLINE typename Vec<T>::type load_mask(const bool* p) {
  typename Vec<T>::bytes b;
  __builtin_memcpy(&b, p, sizeof(b));
  return __builtin_convertvector(b, typename Vec<T>::type);
}

// Sum of the lanes as a fixed pairwise tree (lane l + lane l + W/2, and so on down), kept in
// registers: the per-triple dot product sits on the critical path, and simd::sum_lanes (W
// dependent adds) or a tree through memory costs several times more. The order depends on
// nothing but W.
MF_EXT_INLINE float sum_lanes_tree(Vec<float>::type v) {
  typedef float f8 __attribute__((vector_size(32)));
  typedef float f4 __attribute__((vector_size(16)));
  typedef float f2 __attribute__((vector_size(8)));
  const f8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  const f2 c = __builtin_shufflevector(b, b, 0, 1) + __builtin_shufflevector(b, b, 2, 3);
  return c[0] + c[1];
}

MF_EXT_INLINE double sum_lanes_tree(Vec<double>::type v) {
  typedef double d4 __attribute__((vector_size(32)));
  typedef double d2 __attribute__((vector_size(16)));
  const d4 a = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  const d2 b = __builtin_shufflevector(a, a, 0, 1) + __builtin_shufflevector(a, a, 2, 3);
  return b[0] + b[1];
}

// Vectors of an r-row: in registers when their count NV is a compile-time constant, else on
// the heap (NV == 0). Both are 64-byte aligned by hand: the kernels are compiled for the base ISA,
// where a 64-byte vector type is only 16-byte aligned (so std::vector<V> gets 16-byte blocks),
// while the AVX2 / AVX-512 clones of the kernel move V with aligned instructions (a misaligned
// heap block crashed float64 at r > 64 and float32 at r > 128).
constexpr size_t kVectorAlign = 64;
template <typename V, int NV>
struct RowVectors {
  alignas(kVectorAlign) V v[NV];
  explicit RowVectors(int64_t) {}
  MF_EXT_INLINE V* data() { return v; }
};
template <typename V>
struct RowVectors<V, 0> {
  struct Free {
    void operator()(V* p) const { std::free(p); }
  };
  std::unique_ptr<V[], Free> v;
  explicit RowVectors(int64_t count) {
    static_assert(sizeof(V) % kVectorAlign == 0, "aligned_alloc needs a multiple of 64 bytes");
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(V);
    v.reset(static_cast<V*>(std::aligned_alloc(kVectorAlign, bytes)));
    TORCH_CHECK(v != nullptr, "mf_ext: out of memory (", bytes, " bytes of vector rows)");
    std::memset(static_cast<void*>(v.get()), 0, bytes);
  }
  MF_EXT_INLINE V* data() { return v.get(); }
};

// p · q over nv vectors: products summed as a fixed pairwise tree (shorter latency than a
// chain), then across lanes.
template <typename T, int NV>
MF_EXT_INLINE T dot_row(const typename Vec<T>::type* p, const T* q, int64_t nv) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  if constexpr (NV == 0) {
    V even = simd::broadcast<T>(0), odd = simd::broadcast<T>(0);
    int64_t v = 0;
    for (; v + 1 < nv; v += 2) {
      even += p[v] * simd::load(q + v * W);
      odd += p[v + 1] * simd::load(q + (v + 1) * W);
    }
    if (v < nv) even += p[v] * simd::load(q + v * W);
    return sum_lanes_tree(even + odd);
  } else {
    V prod[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) prod[v] = p[v] * simd::load(q + v * W);
#pragma GCC unroll 8
    for (int width = 1; width < NV; width *= 2) {
#pragma GCC unroll 8
      for (int v = 0; v + width < NV; v += 2 * width) prod[v] += prod[v + width];
    }
    return sum_lanes_tree(prod[0]);
  }
}

// dp += acc (nv vectors), then acc = 0.
template <typename T>
MF_EXT_INLINE void flush_run(T* dp, typename Vec<T>::type* acc, int64_t nv) {
  constexpr int W = Vec<T>::width;
#pragma GCC unroll 8
  for (int64_t v = 0; v < nv; ++v) {
    simd::store(dp + v * W, simd::load(dp + v * W) + acc[v]);
    acc[v] = simd::broadcast<T>(0);
  }
}

}  // namespace mf_ext::simd

// Compile a hot function once per x86-64 level and pick the best at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MF_EXT_TARGET_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MF_EXT_TARGET_CLONES
#endif

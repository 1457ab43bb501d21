// 64-byte vectors through GCC/Clang vector extensions. The compiler maps them onto AVX-512,
// AVX2 or SSE registers, whichever target the calling function was compiled for (see
// MF_EXT_TARGET_CLONES), so one source gives every x86-64 machine its widest vectors.
#pragma once

#include <cstdint>

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

}  // namespace mf_ext::simd

// Compile a hot function once per x86-64 level and pick the best at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MF_EXT_TARGET_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MF_EXT_TARGET_CLONES
#endif

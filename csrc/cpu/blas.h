// Single-threaded BLAS GEMM on raw column-major arrays, or on views of either layout, for
// kernels that run their own parallel loop and need every call to give the same bits whatever
// the thread count.
//
// torch's CPU builds link a BLAS (MKL on x86-64) whose Fortran `sgemm_` / `dgemm_` symbols
// libtorch_cpu exports; they are declared weak, so a torch without them still loads this
// extension and falls back to at::addmm_ on views (correct, slower per call). MKL would use
// several threads for a call made outside a parallel region; MKL_Set_Num_Threads_Local(1)
// pins each call to one thread, so a unit's result never depends on how many threads run.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
// MKL's C interface (the lower-case name is its Fortran one, taking a pointer).
int MKL_Set_Num_Threads_Local(int threads) __attribute__((weak));
}

namespace mf_ext::blas {

// Whether the Fortran GEMM of T is there and every size and leading dimension up to `largest`
// fits its 32-bit integers.
template <typename T>
inline bool has_gemm(int64_t largest) {
  const bool present = std::is_same_v<T, float> ? sgemm_ != nullptr : dgemm_ != nullptr;
  return present && largest < INT_MAX;
}

// While alive, BLAS calls on this thread run on one thread.
class OneThread {
 public:
  OneThread() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~OneThread() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  OneThread(const OneThread&) = delete;
  OneThread& operator=(const OneThread&) = delete;

 private:
  int previous_;
};

// The column-major (rows × cols) matrix at p with leading dimension ld, as a tensor view.
template <typename T>
inline at::Tensor column_major_view(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(p), {cols, rows}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value))
      .t();
}

// C (m × n, ldc) = alpha · op(A) · op(B) + beta · C, column-major, op = transpose when 'T'.
// beta = 0 ignores C's old contents (NaN included), as BLAS does.
template <typename T>
inline void gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                 int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (has_gemm<T>(std::max({m, n, k, lda, ldb, ldc}))) {
    const int M = static_cast<int>(m), N = static_cast<int>(n), K = static_cast<int>(k);
    // BLAS wants leading dimensions ≥ 1 even for empty operands.
    const int LDA = static_cast<int>(std::max<int64_t>(lda, 1));
    const int LDB = static_cast<int>(std::max<int64_t>(ldb, 1));
    const int LDC = static_cast<int>(ldc);
    if constexpr (std::is_same_v<T, float>) {
      sgemm_(&transa, &transb, &M, &N, &K, &alpha, a, &LDA, b, &LDB, &beta, c, &LDC);
    } else {
      dgemm_(&transa, &transb, &M, &N, &K, &alpha, a, &LDA, b, &LDB, &beta, c, &LDC);
    }
    return;
  }
  at::Tensor A = transa == 'T' ? column_major_view(a, k, m, lda).t() : column_major_view(a, m, k, lda);
  at::Tensor B = transb == 'T' ? column_major_view(b, n, k, ldb).t() : column_major_view(b, k, n, ldb);
  column_major_view(c, m, n, ldc).addmm_(A, B, beta, alpha);
}

// A matrix operand as BLAS reads it: column-major with leading dimension ld, or, when
// row_major, row-major with rows ld apart (the transpose of a column-major matrix).
template <typename T>
struct Matrix {
  T* p;
  int64_t ld;
  bool row_major;
  Matrix t() const { return {p, ld, !row_major}; }
  // The submatrix that starts at element (i, j).
  Matrix from(int64_t i, int64_t j) const {
    return {p + (row_major ? i * ld + j : i + j * ld), ld, row_major};
  }
  operator Matrix<const T>() const { return {p, ld, row_major}; }
};

// C (m × n) = alpha · A (m × k) · B (k × n) + beta · C on operands of either layout; a
// row-major C is computed as its transpose, Cᵀ = Bᵀ Aᵀ.
template <typename T>
inline void gemm(int64_t m, int64_t n, int64_t k, T alpha, Matrix<const T> A, Matrix<const T> B,
                 T beta, Matrix<T> C) {
  if (C.row_major) return gemm<T>(n, m, k, alpha, B.t(), A.t(), beta, C.t());
  gemm<T>(A.row_major ? 'T' : 'N', B.row_major ? 'T' : 'N', m, n, k, alpha, A.p, A.ld, B.p, B.ld,
          beta, C.p, C.ld);
}

}  // namespace mf_ext::blas

// CPU kernel of mf_ext::implicit_mf_loss_and_grads:
//   L = Σ_t w_t (v_t − p_iᵀ q_j)² + α₀ Σ_{i<m, j<n} (p_iᵀ q_j)²,
// the first sum by the registered observed-entries op (one fused pass over the triples), the
// second as α₀ ⟨P Pᵀ, Q Qᵀ⟩ with the r × r Gram matrices, whose gradients are 2α₀ (Q Qᵀ) P and
// 2α₀ (P Pᵀ) Q: O(nnz·r + (m+n)·r²), nothing of size m × n or nnz × r.
//
// Determinism: MKL may split a GEMM's long inner dimension (m) across threads, which changes the
// summation order with the thread count. So the columns of P (and Q) are cut into blocks whose
// size depends only on the shape; each block's r × r partial Gram and each block of the
// (r × r)·P product is one single-threaded GEMM, and the partials are summed in block order.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator headers only (see setup.py)
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../implicit_mf_loss_common.h"
#include "blas.h"

namespace mf_ext {
namespace {

constexpr int64_t kMinBlockColumns = 256;  // columns of P per GEMM: enough work per call
constexpr int64_t kMaxBlocks = 64;         // bounds the partials' memory to 64 r² numbers
constexpr int64_t kMinParallelWork = 1 << 20;  // multiply-adds per thread worth waking it for

int64_t block_columns(int64_t m) {
  return std::max(kMinBlockColumns, (m + kMaxBlocks - 1) / kMaxBlocks);
}

// Grain of a parallel loop whose items cost `work` each: small problems stay on this thread.
// (Only the speed depends on it: every item is computed the same way on any thread.)
int64_t grain_for(int64_t work) {
  return std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(work, 1));
}

// A factor (r, m) as column-major BLAS sees it. by_rows: element (k, i) at data[k·ld + i] (the
// (r, m) row-major layout, i.e. Pᵀ column-major m × r); else at data[i·ld + k] (the embedding
// layout weight.T, i.e. P column-major r × m). Other strides are copied once.
template <typename T>
struct Factor {
  at::Tensor storage;
  const T* data;
  int64_t r, m, ld;
  bool by_rows;

  explicit Factor(const at::Tensor& X) : r(X.size(0)), m(X.size(1)) {
    if (X.stride(1) == 1 && (r <= 1 || X.stride(0) >= std::max<int64_t>(m, 1))) {
      storage = X, by_rows = true, ld = r <= 1 ? std::max<int64_t>(m, 1) : X.stride(0);
    } else if (X.stride(0) == 1 && (m <= 1 || X.stride(1) >= std::max<int64_t>(r, 1))) {
      storage = X, by_rows = false, ld = m <= 1 ? std::max<int64_t>(r, 1) : X.stride(1);
    } else {
      storage = X.contiguous(), by_rows = true, ld = std::max<int64_t>(m, 1);
    }
    data = storage.template const_data_ptr<T>();
  }

  // Column i's first element (column i of P is row i of the m × r matrix Pᵀ).
  const T* column(int64_t i) const { return by_rows ? data + i : data + i * ld; }
};

// X Xᵀ (r × r, column-major, symmetric) summed in double over fixed column blocks, in order.
template <typename T>
std::vector<double> gram(const Factor<T>& X) {
  const int64_t r = X.r, width = block_columns(X.m);
  const int64_t blocks = (X.m + width - 1) / width;
  std::vector<T> partials(blocks * r * r);
  at::parallel_for(0, blocks, grain_for(width * r * r), [&](int64_t begin, int64_t end) {
    blas::OneThread one_thread;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t i0 = b * width, count = std::min(width, X.m - i0);
      blas::gemm<T>(X.by_rows ? 'T' : 'N', X.by_rows ? 'N' : 'T', r, r, count, T(1),
                    X.column(i0), X.ld, X.column(i0), X.ld, T(0), partials.data() + b * r * r, r);
    }
  });
  std::vector<double> G(r * r, 0.0);
  at::parallel_for(0, r * r, grain_for(blocks), [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      double s = 0;
      for (int64_t b = 0; b < blocks; ++b) s += partials[b * r * r + e];
      G[e] = s;
    }
  });
  return G;
}

// dX (r, m), contiguous, += scale · G · X, one single-threaded GEMM per column block.
template <typename T>
void add_gram_product(at::Tensor& dX, const Factor<T>& X, const std::vector<double>& G,
                      double scale) {
  const int64_t r = X.r, m = X.m, width = block_columns(m);
  const int64_t blocks = (m + width - 1) / width;
  if (r == 0 || m == 0) return;
  TORCH_INTERNAL_ASSERT(dX.is_contiguous(), "the observed op returns contiguous gradients");
  const std::vector<T> Gt(G.begin(), G.end());
  T* D = dX.mutable_data_ptr<T>();
  // In column-major terms dXᵀ (m × r, ld m) += scale · Xᵀ · G (G is symmetric).
  at::parallel_for(0, blocks, grain_for(width * r * r), [&](int64_t begin, int64_t end) {
    blas::OneThread one_thread;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t i0 = b * width, count = std::min(width, m - i0);
      blas::gemm<T>(X.by_rows ? 'N' : 'T', 'N', count, r, r, static_cast<T>(scale),
                    X.column(i0), X.ld, Gt.data(), r, T(1), D + i0, m);
    }
  });
}

// Raises for the first weight that is negative or NaN (one plain pass: weights.ge(0).all() cost
// ~0.3 ms a call at MovieLens-100K size, a fifth of the whole op).
void check_cpu_weights(const std::optional<at::Tensor>& weights) {
  if (!weights.has_value() || weights->numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES(weights->scalar_type(), "implicit_weights_check", [&] {
    const scalar_t* w = weights->const_data_ptr<scalar_t>();
    const int64_t stride = weights->stride(0), count = weights->size(0);
    for (int64_t t = 0; t < count; ++t) {
      if (!(w[t * stride] >= 0)) implicit_weight_error(t, static_cast<double>(w[t * stride]));
    }
  });
}

ImplicitResult implicit_mf_loss_and_grads_cpu(
    const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& P, const at::Tensor& Q,
    const std::optional<at::Tensor>& values, const std::optional<at::Tensor>& weights,
    double unobserved_weight, c10::string_view reduction, bool grad_values, bool grad_P,
    bool grad_Q, bool grad_weights) {
  const std::string_view red_name(reduction.data(), reduction.size());
  const Reduction red = check_implicit_call(rows, cols, P, Q, values, weights, unobserved_weight,
                                            red_name, grad_values, grad_weights);
  TORCH_CHECK_TYPE(P.scalar_type() == at::kFloat || P.scalar_type() == at::kDouble, kImplicitOp,
                   ": the CPU kernel supports float32 and float64, got ", P.scalar_type());
  auto [loss, d_values, dP, dQ, d_row_bias, d_col_bias, d_weights] = observed_part(
      rows, cols, P, Q, values, weights, red_name, grad_values, grad_P, grad_Q, grad_weights);
  check_cpu_weights(weights);  // after the indices, as on CUDA
  // The observed op gives a table's .T its gradient in the table layout; this op's are
  // contiguous (its fake kernel's contract, and add_gram_product's).
  if (grad_P && !dP.is_contiguous()) dP = dP.contiguous();
  if (grad_Q && !dQ.is_contiguous()) dQ = dQ.contiguous();
  if (unobserved_weight == 0) {  // exactly the observed op, bit for bit
    return {loss, d_values, dP, dQ, d_weights};
  }
  const double scale = gram_scale(unobserved_weight, red, rows.size(0));
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "implicit_mf_loss_cpu", [&] {
    const Factor<scalar_t> FP(P), FQ(Q);
    const std::vector<double> GP = gram(FP), GQ = gram(FQ);
    double inner = 0;  // ⟨P Pᵀ, Q Qᵀ⟩ = Σ_{i,j} (p_iᵀ q_j)²
    for (size_t e = 0; e < GP.size(); ++e) inner += GP[e] * GQ[e];
    loss = at::scalar_tensor(loss.item<double>() + scale * inner, loss.options());
    if (grad_P) add_gram_product(dP, FP, GQ, 2 * scale);
    if (grad_Q) add_gram_product(dQ, FQ, GP, 2 * scale);
  });
  return {loss, d_values, dP, dQ, d_weights};
}

void check_solver_factor(const at::Tensor& X, const char* op, const char* name) {
  TORCH_CHECK_VALUE(X.dim() == 2, op, ": ", name, " must be 2-D (r, m), got shape ", X.sizes());
  TORCH_CHECK_TYPE(X.scalar_type() == at::kFloat || X.scalar_type() == at::kDouble, op, ": ",
                   name, " must be float32 or float64, got ", X.scalar_type());
}

// mf_ext::_gram: X Xᵀ in float64, as the op's kernel computes it.
at::Tensor gram_cpu(const at::Tensor& X) {
  check_solver_factor(X, "mf_ext._gram", "X");
  at::Tensor G = at::empty({X.size(0), X.size(0)}, X.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "mf_ext_gram_cpu", [&] {
    const std::vector<double> g = gram(Factor<scalar_t>(X));
    std::copy(g.begin(), g.end(), G.mutable_data_ptr<double>());
  });
  return G;
}

// mf_ext::_add_gram_product_: out += scale · G X, as the op's kernel adds its all-cells term.
void add_gram_product_cpu(at::Tensor& out, const at::Tensor& G, const at::Tensor& X,
                          double scale) {
  const char* op = "mf_ext._add_gram_product_";
  check_solver_factor(X, op, "X");
  const int64_t r = X.size(0);
  TORCH_CHECK_VALUE(G.dim() == 2 && G.size(0) == r && G.size(1) == r &&
                        G.scalar_type() == at::kDouble,
                    op, ": G must be a float64 (", r, ", ", r, ") tensor, got ", G.scalar_type(),
                    " of shape ", G.sizes());
  TORCH_CHECK_VALUE(out.sizes() == X.sizes() && out.scalar_type() == X.scalar_type() &&
                        out.is_contiguous(),
                    op, ": out must be contiguous, of X's shape ", X.sizes(), " and dtype ",
                    X.scalar_type(), ", got ", out.scalar_type(), " of shape ", out.sizes());
  const at::Tensor Gc = G.contiguous();
  const std::vector<double> g(Gc.const_data_ptr<double>(), Gc.const_data_ptr<double>() + r * r);
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "mf_ext_add_gram_product_cpu", [&] {
    add_gram_product(out, Factor<scalar_t>(X), g, scale);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mf_ext, CPU, m) {
  m.impl("implicit_mf_loss_and_grads", &implicit_mf_loss_and_grads_cpu);
  m.impl("_gram", &gram_cpu);
  m.impl("_add_gram_product_", &add_gram_product_cpu);
}

}  // namespace mf_ext

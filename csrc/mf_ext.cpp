// Every mf_ext operator schema, in one place. Kernels live in csrc/cpu/ and csrc/cuda/;
// autograd and fake (meta) kernels in mf_ext/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty module: importing mf_ext._C only loads this library, whose static initializers
// register the operators below with the dispatcher. No pybind11, so the ops never graph-break.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(mf_ext, m) {
  // Dense form, fused: the loss Σ_Ω (R − PᵀQ)² ("sum") or its mean over Ω ("mean"), and in the
  // same pass the gradients of R, P and Q for which the grad_* flag is set (an empty tensor
  // otherwise). R: (m, n); P: (r, m); Q: (r, n); mask: (m, n) bool, or None for Ω = {R ≠ 0}.
  m.def(
      "masked_mf_loss_and_grads(Tensor R, Tensor P, Tensor Q, Tensor? mask, str reduction, "
      "bool grad_R, bool grad_P, bool grad_Q) -> (Tensor loss, Tensor grad_R, Tensor grad_P, "
      "Tensor grad_Q)");
  // Observed-entries form, fused: Σ_t w_t (values_t − p_iᵀ q_j − row_bias_i − col_bias_j)² with
  // i = rows_t, j = cols_t ("sum"), or that sum divided by nnz ("mean": the unweighted count),
  // and in the same pass the gradients whose grad_* flag is set (an empty tensor otherwise).
  // rows, cols: (nnz,) int32/int64; values, weights: (nnz,); P: (r, m); Q: (r, n);
  // row_bias: (m,); col_bias: (n,). Missing weights are 1, missing biases 0.
  m.def(
      "observed_mf_loss_and_grads(Tensor rows, Tensor cols, Tensor values, Tensor P, Tensor Q, "
      "Tensor? row_bias, Tensor? col_bias, Tensor? weights, str reduction, bool grad_values, "
      "bool grad_P, bool grad_Q, bool grad_row_bias, bool grad_col_bias, bool grad_weights) -> "
      "(Tensor loss, Tensor grad_values, Tensor grad_P, Tensor grad_Q, Tensor grad_row_bias, "
      "Tensor grad_col_bias, Tensor grad_weights)");
  // Implicit (all-cells) form, fused: Σ_t w_t (values_t − p_iᵀ q_j)² + α₀ Σ_{i<m, j<n} (p_iᵀ q_j)²
  // with α₀ = unobserved_weight ≥ 0, the second sum as α₀ ⟨P Pᵀ, Q Qᵀ⟩ ("sum"); "mean" divides
  // the whole loss by max(nnz, 1). The gradients whose grad_* flag is set (an empty tensor
  // otherwise). rows, cols: (nnz,) int32/int64; P: (r, m); Q: (r, n); values, weights: (nnz,)
  // or None (all 1).
  m.def(
      "implicit_mf_loss_and_grads(Tensor rows, Tensor cols, Tensor P, Tensor Q, Tensor? values, "
      "Tensor? weights, float unobserved_weight, str reduction, bool grad_values, bool grad_P, "
      "bool grad_Q, bool grad_weights) -> (Tensor loss, Tensor grad_values, Tensor grad_P, "
      "Tensor grad_Q, Tensor grad_weights)");
  // Internal, for tests: how the CPU kernels cut a problem into units of work, flattened into
  // ints (decoded by mf_ext.ops._observed_partition and _dense_partition). CPU only.
  m.def("_observed_partition(Tensor rows, Tensor cols, Tensor P, Tensor Q) -> int[]");
  m.def("_dense_partition(Tensor R, Tensor P, Tensor Q) -> int[]");
  // Internal, for the implicit model's ALS solver (mf_ext/implicit_solvers.py), the all-cells
  // term's pieces as the CPU kernel of implicit_mf_loss_and_grads computes them (same bits, any
  // thread count): X Xᵀ of X (r, m), an (r, r) float64 tensor; and out += scale · G X for a
  // symmetric (r, r) G and a contiguous out of X's shape and dtype. CPU only.
  m.def("_gram(Tensor X) -> Tensor");
  m.def("_add_gram_product_(Tensor(a!) out, Tensor G, Tensor X, float scale) -> ()");
}

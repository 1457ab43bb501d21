// CPU kernel of mf_ext::observed_mf_loss_and_grads: one fused pass over the observed triples
// (rows[t], cols[t], values[t]) computes the loss and the gradients that are asked for.
//
// P (r, m) and Q (r, n) are first copied once into row layout, (m, r_pad) and (n, r_pad) with
// r zero-padded to whole vectors, so that each triple reads two contiguous r-vectors p_i, q_j:
//   e   = values[t] − (p_iᵀ q_j + row_bias[i] + col_bias[j])
//   L  += w_t e²
//   g   = −2 · scale · w_t · e                      (∂L/∂pred)
//   dP[i] += g q_j,  dQ[j] += g p_i,  drow_bias[i] += g,  dcol_bias[j] += g
// Nothing of size nnz × r is ever formed.
//
// Determinism: the triples are cut into `chunks` contiguous ranges, a number fixed by the shapes
// alone (at most kMaxChunks). Each chunk is processed by one thread, in order, into its own
// partials of dP, dQ and the bias gradients (O(r·(m + n)) each), and the partials are summed in
// chunk order at the end. Results are therefore bitwise the same whatever the thread count, and
// the triples may come in any order (duplicates count once per occurrence).
//
// Indices are checked in the same pass: a triple whose row or column is out of range is never
// read through; the chunk stops and records it, and the lowest such position is reported.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../observed_mf_loss_checks.h"
#include "simd.h"

namespace mf_ext {
namespace {

using simd::Vec;

constexpr int64_t kMaxChunks = 8;
// A chunk gets at least this many triples, and at least 8·(m + n) so that zeroing and summing
// its partials (r·(m + n) each) stays small next to its own work (r per triple).
constexpr int64_t kMinChunkTriples = 4096;
constexpr int64_t kTriplesPerRowOrColumn = 8;

// Everything a chunk reads and writes, as raw pointers taken once.
template <typename T>
struct ObservedProblem {
  int64_t nnz, m, n, r_pad, chunks;
  const void* rows;  // int32 or int64, per rows_64
  const void* cols;
  bool rows_64, cols_64;
  int64_t rows_s, cols_s;
  const T* values;
  int64_t values_s;
  const T* weights;  // nullptr: all 1
  int64_t weights_s;
  const T* row_bias;  // nullptr: none
  int64_t row_bias_s;
  const T* col_bias;
  int64_t col_bias_s;
  const T* P;  // (m, r_pad)
  const T* Q;  // (n, r_pad)
  T scale;     // 1, or 1/nnz for "mean"
  T* grad_values;        // (nnz,) or nullptr
  T* grad_weights;       // (nnz,) or nullptr
  T* dP_parts;           // (chunks, m, r_pad) or nullptr
  T* dQ_parts;           // (chunks, n, r_pad) or nullptr
  T* drow_bias_parts;    // (chunks, m) or nullptr
  T* dcol_bias_parts;    // (chunks, n) or nullptr
};

struct ChunkResult {
  double loss = 0;
  int64_t bad_position = -1;  // first triple with an out-of-range index, -1 if none
  int64_t bad_value = 0;
  bool bad_is_col = false;
};

// [begin, end) of part `index` when `total` is cut into `parts` near-equal parts.
inline std::pair<int64_t, int64_t> split(int64_t total, int64_t parts, int64_t index) {
  return {total * index / parts, total * (index + 1) / parts};
}

MF_EXT_INLINE int64_t load_index(const void* base, bool is_64, int64_t offset) {
  return is_64 ? static_cast<const int64_t*>(base)[offset]
               : static_cast<int64_t>(static_cast<const int32_t*>(base)[offset]);
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

// Triples are visited in random order over rows that do not fit in L2: fetch the rows of the
// triple kPrefetchAhead positions on while this one computes.
constexpr int64_t kPrefetchAhead = 8;

template <int kWrite>
MF_EXT_INLINE void prefetch_row(const void* row, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) {
    __builtin_prefetch(static_cast<const char*>(row) + b, kWrite, 3);
  }
}

template <typename T, bool kGradP, bool kGradQ>
MF_EXT_INLINE void run_chunk(const ObservedProblem<T>& pb, int64_t chunk, ChunkResult& result) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  const int64_t r_pad = pb.r_pad, m = pb.m, n = pb.n;
  const auto [t0, t1] = split(pb.nnz, pb.chunks, chunk);
  // Each chunk zeroes its own partials (in parallel, and first touched by the thread using them).
  T* dP = kGradP ? pb.dP_parts + chunk * m * r_pad : nullptr;
  T* dQ = kGradQ ? pb.dQ_parts + chunk * n * r_pad : nullptr;
  T* drb = pb.drow_bias_parts ? pb.drow_bias_parts + chunk * m : nullptr;
  T* dcb = pb.dcol_bias_parts ? pb.dcol_bias_parts + chunk * n : nullptr;
  if constexpr (kGradP) std::fill(dP, dP + m * r_pad, T(0));
  if constexpr (kGradQ) std::fill(dQ, dQ + n * r_pad, T(0));
  if (drb) std::fill(drb, drb + m, T(0));
  if (dcb) std::fill(dcb, dcb + n, T(0));

  const T coef = T(-2) * pb.scale;
  double loss = 0;
  const int64_t row_bytes = r_pad * static_cast<int64_t>(sizeof(T));
  const int64_t prefetch_end = (m > 0 && n > 0) ? t1 - kPrefetchAhead : t0;
  for (int64_t t = t0; t < t1; ++t) {
    if (t < prefetch_end) {
      // Clamped, so a bad index (reported when reached) is never even prefetched.
      const uint64_t ia = load_index(pb.rows, pb.rows_64, (t + kPrefetchAhead) * pb.rows_s);
      const uint64_t ja = load_index(pb.cols, pb.cols_64, (t + kPrefetchAhead) * pb.cols_s);
      const int64_t i_ahead = static_cast<int64_t>(std::min<uint64_t>(ia, m - 1));
      const int64_t j_ahead = static_cast<int64_t>(std::min<uint64_t>(ja, n - 1));
      prefetch_row<0>(pb.P + i_ahead * r_pad, row_bytes);
      prefetch_row<0>(pb.Q + j_ahead * r_pad, row_bytes);
      if constexpr (kGradP) prefetch_row<1>(dP + i_ahead * r_pad, row_bytes);
      if constexpr (kGradQ) prefetch_row<1>(dQ + j_ahead * r_pad, row_bytes);
    }
    const int64_t i = load_index(pb.rows, pb.rows_64, t * pb.rows_s);
    const int64_t j = load_index(pb.cols, pb.cols_64, t * pb.cols_s);
    if (static_cast<uint64_t>(i) >= static_cast<uint64_t>(m) ||
        static_cast<uint64_t>(j) >= static_cast<uint64_t>(n)) {
      const bool row_bad = static_cast<uint64_t>(i) >= static_cast<uint64_t>(m);
      result.bad_position = t;
      result.bad_value = row_bad ? i : j;
      result.bad_is_col = !row_bad;
      break;
    }
    const T* p = pb.P + i * r_pad;
    const T* q = pb.Q + j * r_pad;
    V acc = simd::broadcast<T>(0);
    for (int64_t k = 0; k < r_pad; k += W) acc += simd::load(p + k) * simd::load(q + k);
    T pred = sum_lanes_tree(acc);
    if (pb.row_bias) pred += pb.row_bias[i * pb.row_bias_s];
    if (pb.col_bias) pred += pb.col_bias[j * pb.col_bias_s];
    const T e = pb.values[t * pb.values_s] - pred;
    const T w = pb.weights ? pb.weights[t * pb.weights_s] : T(1);
    loss += static_cast<double>(w) * (static_cast<double>(e) * static_cast<double>(e));
    const T g = coef * (w * e);
    if (pb.grad_values) pb.grad_values[t] = -g;
    if (pb.grad_weights) pb.grad_weights[t] = pb.scale * (e * e);
    if constexpr (kGradP || kGradQ) {
      const V gv = simd::broadcast(g);
      T* dp = kGradP ? dP + i * r_pad : nullptr;
      T* dq = kGradQ ? dQ + j * r_pad : nullptr;
      for (int64_t k = 0; k < r_pad; k += W) {
        if constexpr (kGradP) simd::store(dp + k, simd::load(dp + k) + gv * simd::load(q + k));
        if constexpr (kGradQ) simd::store(dq + k, simd::load(dq + k) + gv * simd::load(p + k));
      }
    }
    if (drb) drb[i] += g;
    if (dcb) dcb[j] += g;
  }
  result.loss = loss;
}

template <typename T>
MF_EXT_INLINE void run_chunks(const ObservedProblem<T>& pb, int64_t begin, int64_t end,
                              ChunkResult* results) {
  const bool gP = pb.dP_parts != nullptr, gQ = pb.dQ_parts != nullptr;
  for (int64_t c = begin; c < end; ++c) {
    if (gP && gQ) run_chunk<T, true, true>(pb, c, results[c]);
    else if (gP) run_chunk<T, true, false>(pb, c, results[c]);
    else if (gQ) run_chunk<T, false, true>(pb, c, results[c]);
    else run_chunk<T, false, false>(pb, c, results[c]);
  }
}

// Non-template entry points, so that each can be cloned per instruction set.
MF_EXT_TARGET_CLONES void run_chunks_float(const ObservedProblem<float>& pb, int64_t begin,
                                           int64_t end, ChunkResult* results) {
  run_chunks(pb, begin, end, results);
}
MF_EXT_TARGET_CLONES void run_chunks_double(const ObservedProblem<double>& pb, int64_t begin,
                                            int64_t end, ChunkResult* results) {
  run_chunks(pb, begin, end, results);
}
inline void run_chunks_any(const ObservedProblem<float>& pb, int64_t b, int64_t e,
                           ChunkResult* r) {
  run_chunks_float(pb, b, e, r);
}
inline void run_chunks_any(const ObservedProblem<double>& pb, int64_t b, int64_t e,
                           ChunkResult* r) {
  run_chunks_double(pb, b, e, r);
}

// out (r, count) = Σ_c parts[c] (count, r_pad)ᵀ, chunks summed in order: back to P's layout.
template <typename T>
void reduce_rows_transposed(const T* parts, int64_t chunks, int64_t count, int64_t r,
                            int64_t r_pad, T* out) {
  at::parallel_for(0, count, 256, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(r_pad);
    for (int64_t i = begin; i < end; ++i) {
      std::copy(parts + i * r_pad, parts + (i + 1) * r_pad, acc.begin());
      for (int64_t c = 1; c < chunks; ++c) {
        const T* part = parts + (c * count + i) * r_pad;
        for (int64_t k = 0; k < r_pad; ++k) acc[k] += part[k];
      }
      for (int64_t k = 0; k < r; ++k) out[k * count + i] = acc[k];
    }
  });
}

// out (count,) = Σ_c parts[c] (count,), chunks summed in order.
template <typename T>
void reduce_vectors(const T* parts, int64_t chunks, int64_t count, T* out) {
  at::parallel_for(0, count, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T s = parts[i];
      for (int64_t c = 1; c < chunks; ++c) s += parts[c * count + i];
      out[i] = s;
    }
  });
}

// Copies X (r, count), any strides, into a zero-padded row layout (count, r_pad).
at::Tensor to_padded_rows(const at::Tensor& X, int64_t r_pad) {
  at::Tensor rows_layout = at::zeros({X.size(1), r_pad}, X.options());
  rows_layout.narrow(1, 0, X.size(0)).copy_(X.t());
  return rows_layout;
}

struct ObservedOutputs {
  at::Tensor grad_values, grad_P, grad_Q, grad_row_bias, grad_col_bias, grad_weights;
};

// Runs the fused pass; fills the defined gradients of `out` (contiguous). Returns the loss.
template <typename T>
double observed_mf_loss_impl(const at::Tensor& rows, const at::Tensor& cols,
                             const at::Tensor& values, const at::Tensor& P, const at::Tensor& Q,
                             const std::optional<at::Tensor>& row_bias,
                             const std::optional<at::Tensor>& col_bias,
                             const std::optional<at::Tensor>& weights, Reduction reduction,
                             const ObservedOutputs& out) {
  constexpr int64_t W = Vec<T>::width;
  const int64_t nnz = values.size(0), r = P.size(0), m = P.size(1), n = Q.size(1);
  if (nnz == 0) {
    for (const at::Tensor* g : {&out.grad_P, &out.grad_Q, &out.grad_row_bias,
                                &out.grad_col_bias}) {
      if (g->defined()) g->zero_();
    }
    return 0.0;
  }
  const int64_t r_pad = (r + W - 1) / W * W;
  const at::Tensor P_rows = to_padded_rows(P, r_pad);
  const at::Tensor Q_rows = to_padded_rows(Q, r_pad);

  ObservedProblem<T> pb{};
  pb.nnz = nnz;
  pb.m = m;
  pb.n = n;
  pb.r_pad = r_pad;
  pb.chunks = std::clamp<int64_t>(
      std::min(nnz / kMinChunkTriples,
               nnz / std::max<int64_t>(kTriplesPerRowOrColumn * (m + n), 1)),
      1, kMaxChunks);
  pb.rows = rows.const_data_ptr();
  pb.rows_64 = rows.scalar_type() == at::kLong;
  pb.rows_s = rows.stride(0);
  pb.cols = cols.const_data_ptr();
  pb.cols_64 = cols.scalar_type() == at::kLong;
  pb.cols_s = cols.stride(0);
  pb.values = values.const_data_ptr<T>();
  pb.values_s = values.stride(0);
  if (weights.has_value()) {
    pb.weights = weights->const_data_ptr<T>();
    pb.weights_s = weights->stride(0);
  }
  if (row_bias.has_value()) {
    pb.row_bias = row_bias->const_data_ptr<T>();
    pb.row_bias_s = row_bias->stride(0);
  }
  if (col_bias.has_value()) {
    pb.col_bias = col_bias->const_data_ptr<T>();
    pb.col_bias_s = col_bias->stride(0);
  }
  pb.P = P_rows.const_data_ptr<T>();
  pb.Q = Q_rows.const_data_ptr<T>();
  pb.scale = reduction == Reduction::Mean ? T(1) / static_cast<T>(nnz) : T(1);
  if (out.grad_values.defined()) pb.grad_values = out.grad_values.mutable_data_ptr<T>();
  if (out.grad_weights.defined()) pb.grad_weights = out.grad_weights.mutable_data_ptr<T>();

  const int64_t chunks = pb.chunks;
  at::Tensor dP_parts, dQ_parts, drb_parts, dcb_parts;  // zeroed by their chunks
  if (out.grad_P.defined() && r > 0) {
    dP_parts = at::empty({chunks, m, r_pad}, P.options());
    pb.dP_parts = dP_parts.mutable_data_ptr<T>();
  }
  if (out.grad_Q.defined() && r > 0) {
    dQ_parts = at::empty({chunks, n, r_pad}, Q.options());
    pb.dQ_parts = dQ_parts.mutable_data_ptr<T>();
  }
  if (out.grad_row_bias.defined()) {
    drb_parts = at::empty({chunks, m}, values.options());
    pb.drow_bias_parts = drb_parts.mutable_data_ptr<T>();
  }
  if (out.grad_col_bias.defined()) {
    dcb_parts = at::empty({chunks, n}, values.options());
    pb.dcol_bias_parts = dcb_parts.mutable_data_ptr<T>();
  }

  std::vector<ChunkResult> results(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    run_chunks_any(pb, begin, end, results.data());
  });

  double loss = 0;
  for (const ChunkResult& c : results) {
    // Chunks are in triple order, so the first bad chunk holds the lowest bad position.
    if (c.bad_position >= 0) {
      if (c.bad_is_col) {
        observed_index_error("cols", c.bad_position, c.bad_value, n, "n, the columns of Q");
      }
      observed_index_error("rows", c.bad_position, c.bad_value, m, "m, the columns of P");
    }
    loss += c.loss;
  }
  if (pb.dP_parts) {
    reduce_rows_transposed<T>(pb.dP_parts, chunks, m, r, r_pad, out.grad_P.mutable_data_ptr<T>());
  } else if (out.grad_P.defined()) {
    out.grad_P.zero_();  // r == 0
  }
  if (pb.dQ_parts) {
    reduce_rows_transposed<T>(pb.dQ_parts, chunks, n, r, r_pad, out.grad_Q.mutable_data_ptr<T>());
  } else if (out.grad_Q.defined()) {
    out.grad_Q.zero_();
  }
  if (pb.drow_bias_parts) {
    reduce_vectors<T>(pb.drow_bias_parts, chunks, m, out.grad_row_bias.mutable_data_ptr<T>());
  }
  if (pb.dcol_bias_parts) {
    reduce_vectors<T>(pb.dcol_bias_parts, chunks, n, out.grad_col_bias.mutable_data_ptr<T>());
  }
  return reduction == Reduction::Mean ? loss / static_cast<double>(nnz) : loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
observed_mf_loss_and_grads_cpu(const at::Tensor& rows, const at::Tensor& cols,
                               const at::Tensor& values, const at::Tensor& P,
                               const at::Tensor& Q, const std::optional<at::Tensor>& row_bias,
                               const std::optional<at::Tensor>& col_bias,
                               const std::optional<at::Tensor>& weights,
                               c10::string_view reduction, bool grad_values, bool grad_P,
                               bool grad_Q, bool grad_row_bias, bool grad_col_bias,
                               bool grad_weights) {
  check_observed_mf_loss_args(rows, cols, values, P, Q, row_bias, col_bias, weights);
  check_observed_grad_flags(row_bias, col_bias, weights, grad_row_bias, grad_col_bias,
                            grad_weights);
  const Reduction red =
      parse_observed_reduction(std::string_view(reduction.data(), reduction.size()));
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble,
                   "mf_ext.observed_mf_loss: the CPU kernel supports float32 and float64, got ",
                   values.scalar_type());
  const int64_t nnz = values.size(0), r = P.size(0), m = P.size(1), n = Q.size(1);
  const auto opts = values.options();
  auto maybe = [&](bool wanted, at::IntArrayRef shape) {
    return wanted ? at::empty(shape, opts) : at::empty({0}, opts);
  };
  at::Tensor loss = at::empty({}, opts);
  at::Tensor dvalues = maybe(grad_values, {nnz});
  at::Tensor dP = maybe(grad_P, {r, m});
  at::Tensor dQ = maybe(grad_Q, {r, n});
  at::Tensor drb = maybe(grad_row_bias, {m});
  at::Tensor dcb = maybe(grad_col_bias, {n});
  at::Tensor dweights = maybe(grad_weights, {nnz});
  ObservedOutputs out;
  if (grad_values) out.grad_values = dvalues;
  if (grad_P) out.grad_P = dP;
  if (grad_Q) out.grad_Q = dQ;
  if (grad_row_bias) out.grad_row_bias = drb;
  if (grad_col_bias) out.grad_col_bias = dcb;
  if (grad_weights) out.grad_weights = dweights;

  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "observed_mf_loss_cpu", [&] {
    const double value = observed_mf_loss_impl<scalar_t>(rows, cols, values, P, Q, row_bias,
                                                         col_bias, weights, red, out);
    loss.fill_(value);
  });
  return {loss, dvalues, dP, dQ, drb, dcb, dweights};
}

}  // namespace

TORCH_LIBRARY_IMPL(mf_ext, CPU, m) {
  m.impl("observed_mf_loss_and_grads", &observed_mf_loss_and_grads_cpu);
}

}  // namespace mf_ext

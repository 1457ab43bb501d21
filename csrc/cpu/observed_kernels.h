// The hot loops of the observed CPU kernel (observed_mf_loss.cpp), each cloned per x86-64
// level: the fused pass (observed_fused_pass.h) and the second pass of path "units"
// (observed_inner_pass.h). They are compiled in units of their own, one per dtype for the
// fused pass, so that a 2-core build compiles them side by side: in one unit with the op they
// were the build's longest job (~140 of its ~250 CPU-s, benchmarks/results/ci_time.md).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "bucketing.h"
#include "observed_problem.h"

namespace mf_ext {

// Chunks [begin, end) of path "chunks", or units of the first pass of path "units"; the loss of
// chunk c into losses[c]. keep: pb.keep_grad_pred.
void run_chunks_float(const ObservedProblem<float>& pb, const Bucketed<float>& bk,
                      int64_t begin, int64_t end, double* losses);
void run_chunks_double(const ObservedProblem<double>& pb, const Bucketed<double>& bk,
                       int64_t begin, int64_t end, double* losses);
void run_chunks_keep_float(const ObservedProblem<float>& pb, const Bucketed<float>& bk,
                           int64_t begin, int64_t end, double* losses);
void run_chunks_keep_double(const ObservedProblem<double>& pb, const Bucketed<double>& bk,
                            int64_t begin, int64_t end, double* losses);
// Unit `unit` of the second pass of path "units".
void run_inner_unit_float(const ObservedProblem<float>& pb, const Bucketed<float>& bk,
                          int64_t unit);
void run_inner_unit_double(const ObservedProblem<double>& pb, const Bucketed<double>& bk,
                           int64_t unit);

inline void run_chunks_any(const ObservedProblem<float>& pb, const Bucketed<float>& bk,
                           int64_t b, int64_t e, double* losses) {
  if (pb.keep_grad_pred) return run_chunks_keep_float(pb, bk, b, e, losses);
  run_chunks_float(pb, bk, b, e, losses);
}
inline void run_chunks_any(const ObservedProblem<double>& pb, const Bucketed<double>& bk,
                           int64_t b, int64_t e, double* losses) {
  if (pb.keep_grad_pred) return run_chunks_keep_double(pb, bk, b, e, losses);
  run_chunks_double(pb, bk, b, e, losses);
}
inline void run_inner_unit_any(const ObservedProblem<float>& pb, const Bucketed<float>& bk,
                               int64_t unit) {
  run_inner_unit_float(pb, bk, unit);
}
inline void run_inner_unit_any(const ObservedProblem<double>& pb, const Bucketed<double>& bk,
                               int64_t unit) {
  run_inner_unit_double(pb, bk, unit);
}

// fn(u) for every u in [0, count) on torch's threads, each thread taking the next unit as it
// frees up. Units write disjoint outputs (and their own loss slot), so which thread runs which
// changes no result.
template <typename F>
void run_units_any_order(int64_t count, const F& fn) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), count);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t u = next.fetch_add(1); u < count; u = next.fetch_add(1)) fn(u);
  });
}

}  // namespace mf_ext

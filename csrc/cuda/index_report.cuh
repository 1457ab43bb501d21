// The observed CUDA op's index report: how an out-of-range index found on the device reaches
// the host as an IndexError with no host synchronization on the op's path (the scheme is in
// observed_mf_loss.cu's header comment).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "../observed_mf_loss_common.h"
#include "common.cuh"

namespace mf_ext {
namespace {

// first_bad's value when every index is in range.
constexpr unsigned long long kNoBadIndex = std::numeric_limits<long long>::max();

// The index report's words: position (−1: none), bad value, range, 1 if a column.
constexpr int kReportWords = 4;

// The first bad triple of a call, if any, into `report` (host memory), unless it already holds
// one: the position last, since the host reads it first.
__device__ void record_bad_index(unsigned long long first_bad, const void* rows, bool rows_64,
                                 int64_t rows_s, const void* cols, bool cols_64, int64_t cols_s,
                                 int64_t m, int64_t n, volatile int64_t* report) {
  if (first_bad == kNoBadIndex || report[0] >= 0) return;
  const int64_t t = static_cast<int64_t>(first_bad);
  const int64_t i = load_index(rows, rows_64, t * rows_s);
  const bool row_bad = static_cast<uint64_t>(i) >= static_cast<uint64_t>(m);
  report[1] = row_bad ? i : load_index(cols, cols_64, t * cols_s);
  report[2] = row_bad ? m : n;
  report[3] = row_bad ? 0 : 1;
  report[0] = t;
}

// Which of a device's reports: bad indices (the observed op) or bad weights (the implicit op).
enum class ReportKind : int { kIndex = 0, kWeight = 1 };

// This device's report of a kind: pinned host memory, mapped into the device's address space,
// that the kernels write and the host reads without synchronizing (a CPU tensor, as under the
// emulator, is host memory already). One per device and kind, for the life of the process
// (never destroyed: freeing pinned memory after the CUDA runtime has shut down would fail at
// exit).
at::Tensor device_report(const at::Tensor& like, ReportKind kind) {
  static std::mutex mutex;
  static auto* reports = new std::map<std::pair<int, int>, at::Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& report = (*reports)[{like.device().index(), static_cast<int>(kind)}];
  if (!report.defined()) {
    report = at::empty({kReportWords}, at::TensorOptions().dtype(at::kLong).pinned_memory(
                                           like.is_cuda()));
    report.fill_(-1);
  }
  return report;
}

at::Tensor index_report(const at::Tensor& like) { return device_report(like, ReportKind::kIndex); }

// Waits for the current stream's work (the error path only), so that the words a kernel wrote
// before a report's position are in host memory too.
void wait_for_stream(const at::Tensor& like) {
  (void)at::zeros({}, like.options().dtype(at::kLong)).item<int64_t>();
}

// Raises the IndexError an earlier call on this device recorded, if any (and forgets it).
void raise_recorded_bad_index(const at::Tensor& like) {
  const at::Tensor report = index_report(like);
  volatile int64_t* words = report.mutable_data_ptr<int64_t>();
  const int64_t position = words[0];
  if (position < 0) return;
  wait_for_stream(like);
  const int64_t value = words[1], size = words[2];
  const bool is_col = words[3] == 1;
  words[0] = -1;
  const std::string where = std::string(" [found on ") + like.device().str() +
                            " by an earlier call, whose loss was set to NaN]";
  observed_index_error(is_col ? "cols" : "rows", position, value, size,
                       is_col ? "n, the columns of Q" : "m, the columns of P", where.c_str());
}

}  // namespace
}  // namespace mf_ext

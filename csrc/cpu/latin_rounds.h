// The schedule both CPU kernels share to run a grid of units with no per-unit partials and a
// result that does not depend on the thread count: unit (a, b) pairs row group a ∈ [0, K·G)
// (K "lanes" of G row groups each) with column group b ∈ [0, G). They run in G rounds: round s
// runs, in every lane, the units (a, (a mod G + s) mod G). Within a round no two units share a
// row group, nor a column group within a lane, so each may add into its row group's gradient
// rows and its lane's column-group gradient rows directly, and every entry receives its
// contributions in the fixed order of the rounds.
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <thread>

namespace mf_ext {
namespace {

// Runs unit(a, b, scratch) for every unit, in one parallel region, with a per-thread scratch
// from make_scratch(). Threads claim units in round order from a shared counter, and a unit
// starts once the units of round s − 1 that touched its row group and its (lane, column group)
// are done: the same order of additions as running the rounds one after the other, without a
// barrier between rounds. It cannot deadlock: a unit waits only for units claimed before it,
// each run by a thread that is not waiting on it.
template <typename MakeScratch, typename Unit>
void run_units(int64_t groups, int64_t lanes, MakeScratch make_scratch, Unit unit) {
  const int64_t per_round = lanes * groups, total = per_round * groups;
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  std::unique_ptr<std::atomic<bool>[]> done(new std::atomic<bool>[total]);
  for (int64_t u = 0; u < total; ++u) done[u].store(false, std::memory_order_relaxed);
  auto wait_for = [&](int64_t u) {
    for (int spins = 0; !done[u].load(std::memory_order_acquire);) {
      if (failed.load(std::memory_order_relaxed)) throw std::runtime_error("unit failed");
      if (++spins > 64) std::this_thread::yield();
    }
  };
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), per_round);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    try {
      auto scratch = make_scratch();
      for (;;) {
        const int64_t u = next.fetch_add(1, std::memory_order_relaxed);
        if (u >= total) break;
        const int64_t s = u / per_round, a = u % per_round;
        const int64_t lane = a / groups, local = a % groups;
        if (s > 0) {
          wait_for(u - per_round);  // this row group, round s − 1
          wait_for((s - 1) * per_round + lane * groups + (local + 1) % groups);  // this column
        }
        unit(a, (local + s) % groups, scratch);
        done[u].store(true, std::memory_order_release);
      }
    } catch (...) {
      failed.store(true);
      throw;
    }
  });
}

}  // namespace
}  // namespace mf_ext

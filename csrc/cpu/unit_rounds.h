// The dense CPU kernel's scheduler (csrc/cpu/masked_mf_loss.cpp): units of work in Latin-square
// rounds, so that no two units running at once write the same gradient rows and every gradient
// entry receives its contributions in the same order whatever the thread count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <thread>

namespace mf_ext {

// Runs unit(a, b) for every unit, row group a in [0, K·G), column group b in [0, G), in one
// parallel region, with a per-thread scratch from make_scratch(). Threads claim units in round
// order (round s: units (a, (a mod G + s) mod G) for every a) from a shared counter, and a unit
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

}  // namespace mf_ext

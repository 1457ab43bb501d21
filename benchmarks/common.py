"""Shared by the benchmark scripts: machine description and CPU peak-memory measurement."""

from __future__ import annotations

import ctypes
import datetime
import gc
import os
import platform
import statistics
import time

import torch


def cuda_time_ms(fn, warmup: int, reps: int) -> float:
    """Median milliseconds of fn() by CUDA events, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} "
            f"threads), Python {platform.python_version()}, {datetime.date.today().isoformat()}")


def fix_mmap_threshold() -> None:
    """Make glibc serve every block over 128 KiB by mmap and give it back on free, so the
    process's peak RSS measures each call's own peak (see peak_rss_delta). Call it after the
    timings: it makes large allocations slower than torch users normally see."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD; also stops glibc raising it on its own
    except OSError:
        pass


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_delta(fn) -> float:
    """Extra resident memory (MiB) at the peak of one call of fn, above what was resident
    before it. Linux only: resets the high-water mark through /proc/self/clear_refs. Garbage
    is collected and trimmed first: memory freed during the call (an earlier call's leftovers)
    would otherwise hide as much of the call's own."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def alternating_ms(fns: dict, calls: int, warmup: int = 2):
    """Times each of `fns` (name: no-argument callable) `calls` times, calling them in
    alternation, the order reversed every other round, so that all see the same moments of a
    shared machine's load. Returns per name the lists of wall-clock and of process CPU times
    (ms, all threads), in call order (warm-up calls, compilation included, not counted)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    names = list(fns)
    for call in range(calls):
        for name in names[::-1] if call % 2 else names:
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            cpu[name].append((time.process_time() - start_cpu) * 1e3)
            wall[name].append((time.perf_counter() - start) * 1e3)
    return wall, cpu

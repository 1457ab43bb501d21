"""CPU benchmark of mf_ext.observed_mf_loss: forward + backward on a MovieLens-1M-sized synthetic
problem, against the eager pure-PyTorch reference and the torch.compile'd reference, all timed
in the same run. Prints a Markdown table.

    ./dev python benchmarks/bench_observed_cpu.py [--m M] [--n N] [--nnz NNZ] [--rank R]
        [--threads T] [--fused-only] [--per-call [--grad-P-only] [--calls C]]
        [--compare-layouts [--calls C]]

Prints the threads and how the kernel cut the problem (mf_ext.ops._observed_partition: path,
units of each pass and their balance). MF_EXT_OBSERVED_PATH=chunks|units forces a path.
--fused-only skips the references (at ML-20M size the eager one would gather nnz x r values).
--per-call times C calls of the op itself (torch.ops.mf_ext.observed_mf_loss_and_grads, no
autograd), all gradients or, with --grad-P-only, as the implicit ALS solver asks (weights given,
grad_P only), and prints the median and minimum per call: wall time, and CPU time of the calling
thread (with --threads 1 that is all of the work, and other jobs on a shared machine disturb it
less). For an A/B, run it in two checkouts, alternating.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.utils.benchmark as benchmark

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
import mf_ext  # noqa: E402
from mf_ext import observed_mf_loss, observed_mf_loss_reference  # noqa: E402
from mf_ext.ops import _observed_partition  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import alternating_ms  # noqa: E402


def zipf_indices(count: int, size: int, exponent: float, g: torch.Generator) -> torch.Tensor:
    """`count` indices in [0, size) drawn with probability ∝ 1/(rank+1)^exponent, the ranks
    shuffled so popular ids are scattered (as user and item ids are in real data)."""
    popularity = 1.0 / torch.arange(1, size + 1, dtype=torch.float64) ** exponent
    ids = torch.multinomial(popularity, count, replacement=True, generator=g)
    return torch.randperm(size, generator=g)[ids]


def make_problem(m, n, nnz, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = zipf_indices(nnz, m, 0.6, g)
    cols = zipf_indices(nnz, n, 1.0, g)
    values = torch.randint(1, 6, (nnz,), generator=g).to(dtype)
    P = (torch.randn(r, m, generator=g, dtype=dtype) * 0.1).requires_grad_()
    Q = (torch.randn(r, n, generator=g, dtype=dtype) * 0.1).requires_grad_()
    row_bias = (torch.randn(m, generator=g, dtype=dtype) * 0.1).requires_grad_()
    col_bias = (torch.randn(n, generator=g, dtype=dtype) * 0.1).requires_grad_()
    return rows, cols, values, P, Q, row_bias, col_bias


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def per_call(args, rows, cols, values, P, Q, row_bias, col_bias) -> None:
    """Median and minimum per call of the op itself (see the module's docstring)."""
    op = torch.ops.mf_ext.observed_mf_loss_and_grads
    if args.grad_P_only:
        weights = torch.rand(args.nnz, generator=torch.Generator().manual_seed(1)) + 0.5
        call = (rows, cols, values, P, Q, None, None, weights, "sum", False, True, False, False,
                False, False)
    else:
        call = (rows, cols, values, P, Q, row_bias, col_bias, None, "sum", False, True, True,
                True, True, False)
    op(*call)
    wall, cpu = [], []
    for _ in range(args.calls):
        w0, c0 = time.perf_counter(), time.thread_time()
        op(*call)
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    what = "grad_P only, weights" if args.grad_P_only else "all gradients"
    print(f"{args.m} x {args.n}, nnz {args.nnz:,}, r {args.rank}, {what}, {args.threads} "
          f"thread(s), {args.calls} calls: wall median {sorted(wall)[len(wall) // 2] * 1e3:.3f} "
          f"min {min(wall) * 1e3:.3f} ms; calling thread's CPU median "
          f"{sorted(cpu)[len(cpu) // 2] * 1e3:.3f} min {min(cpu) * 1e3:.3f} ms")


def compare_layouts(args, rows, cols, values, P, Q, row_bias, col_bias) -> None:
    """Medians of forward + backward with P, Q as (r, m) leaves and as the .T of (m, r) leaf
    tables (nn.Embedding weights), called in alternation; .grad is reset after each call."""
    tables = (P.detach().T.contiguous().requires_grad_(),
              Q.detach().T.contiguous().requires_grad_())

    def run(factors, leaves):
        def call():
            observed_mf_loss(rows, cols, values, *factors, row_bias, col_bias).backward()
            for t in (*leaves, row_bias, col_bias):
                t.grad = None
        return call

    wall, _ = alternating_ms({"(r, m)": run((P, Q), (P, Q)),
                              "tables": run((tables[0].T, tables[1].T), tables)}, args.calls)
    med = {name: statistics.median(v) for name, v in wall.items()}
    print(f"{args.m} x {args.n}, nnz {args.nnz:,}, r {args.rank}, {args.threads} thread(s), "
          f"{args.calls} calls each: (r, m) {med['(r, m)']:.2f} ms, .T of tables "
          f"{med['tables']:.2f} ms, tables / (r, m) {med['tables'] / med['(r, m)']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=6040)
    parser.add_argument("--n", type=int, default=3706)
    parser.add_argument("--nnz", type=int, default=1_000_209)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--min-run-time", type=float, default=2.0)
    parser.add_argument("--fused-only", action="store_true")
    parser.add_argument("--per-call", action="store_true")
    parser.add_argument("--grad-P-only", action="store_true")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--compare-layouts", action="store_true",
                        help="the fused op on (r, m) factors against the .T of (m, r) tables, "
                             "forward + backward, in alternation (--calls each)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.float32
    rows, cols, values, P, Q, row_bias, col_bias = make_problem(
        args.m, args.n, args.nnz, args.rank, dtype)
    if args.per_call:
        per_call(args, rows, cols, values, P.detach(), Q.detach(), row_bias.detach(),
                 col_bias.detach())
        return
    if args.compare_layouts:
        compare_layouts(args, rows, cols, values, P, Q, row_bias, col_bias)
        return
    params = (P, Q, row_bias, col_bias)
    compiled_reference = torch.compile(observed_mf_loss_reference)

    def step(fn):
        def run():
            loss = fn(rows, cols, values, P, Q, row_bias, col_bias)
            return torch.autograd.grad(loss, params)
        return run

    candidates = {"mf_ext.observed_mf_loss (fused)": step(observed_mf_loss)}
    if not args.fused_only:
        candidates["reference, eager"] = step(observed_mf_loss_reference)
        candidates["reference, torch.compile"] = step(compiled_reference)
    # Agreement first (and the warm-up, compilation included).
    expected = candidates["reference, eager"]() if not args.fused_only else None
    for name, fn in candidates.items():
        if expected is None:
            break
        got = fn()
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-3, msg=name)

    times = {}
    for name, fn in candidates.items():
        fn()
        # num_threads: Timer runs on 1 thread unless told otherwise (it resets torch's count).
        times[name] = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=args.threads) \
            .blocked_autorange(min_run_time=args.min_run_time).median

    # The GEMM rate in the same run, and the compute floor of the fused op at that rate:
    # per triple 2r (dot) + 2r + 2r (the two rank-1 updates) + ~4 (biases, error, loss) flops.
    size = 2048
    A = torch.randn(size, size, dtype=dtype)
    B = torch.randn(size, size, dtype=dtype)
    torch.mm(A, B)
    mm_time = benchmark.Timer("torch.mm(A, B)", globals={"torch": torch, "A": A, "B": B},
                              num_threads=args.threads) \
        .blocked_autorange(min_run_time=args.min_run_time).median
    gemm_rate = 2 * size**3 / mm_time
    flops = (6 * args.rank + 4) * args.nnz
    floor = flops / gemm_rate

    fused = times["mf_ext.observed_mf_loss (fused)"]
    print(f"### observed_mf_loss, forward + backward (P, Q, row_bias, col_bias), CPU\n")
    threads = f"{args.threads} thread" + ("s" if args.threads != 1 else "")
    print(f"{cpu_name()}, {threads}, torch {torch.__version__}, mf_ext "
          f"{mf_ext.__version__}, {dtype}; m = {args.m:,}, n = {args.n:,}, nnz = {args.nnz:,} "
          f"(Zipf-like popularity, unsorted), r = {args.rank}. Median of "
          f"torch.utils.benchmark blocked_autorange.\n")
    part = _observed_partition(rows, cols, P, Q)

    def units(sizes):
        return f"{len(sizes)} (max {max(sizes) * len(sizes) / args.nnz:.2f}x the mean)" \
            if sizes else "none"
    forced = os.environ.get("MF_EXT_OBSERVED_PATH")
    print(f"Threads: {args.threads}. Partition: path \"{part['path']}\""
          f"{' (forced by MF_EXT_OBSERVED_PATH)' if forced not in (None, '', 'auto') else ''}, "
          f"{part['outer_blocks']} x {part['inner_blocks']} tiles, units of the first pass "
          f"{units(part['chunks'])}, of the second {units(part['inner_units'])}.\n")
    print("| implementation | time (ms) | fused is faster by | GFLOP/s at (6r+4)·nnz |")
    print("| --- | ---: | ---: | ---: |")
    for name, t in times.items():
        print(f"| {name} | {t * 1e3:.2f} | {t / fused:.2f}× | {flops / t / 1e9:.1f} |")
    print(f"| compute floor: (6r+4)·nnz = {flops / 1e9:.3f} GFLOP at the torch.mm rate "
          f"({gemm_rate / 1e9:.1f} GFLOP/s, {size}² float32) | {floor * 1e3:.2f} | "
          f"fused is {fused / floor:.1f}× the floor | |")


if __name__ == "__main__":
    main()

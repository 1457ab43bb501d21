"""CPU benchmark of mf_ext.observed_mf_loss: forward + backward on a MovieLens-1M-sized synthetic
problem, against the eager pure-PyTorch reference and the torch.compile'd reference, all timed
in the same run, for each thread count of a sweep; also the fused op with P and Q in the
embedding layout (weight.T of (m, r) / (n, r) tables). Prints a Markdown table and the kernel's
units of parallel work.

    ./dev python benchmarks/bench_observed_cpu.py [--nnz N] [--rank R] [--threads 1,2,4]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch
import torch.utils.benchmark as benchmark

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
import mf_ext  # noqa: E402
from mf_ext import observed_mf_loss, observed_mf_loss_reference  # noqa: E402
from mf_ext.ops import _observed_partition  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=6040)
    parser.add_argument("--n", type=int, default=3706)
    parser.add_argument("--nnz", type=int, default=1_000_209)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--threads", default="1,2",
                        help="comma-separated thread counts to sweep (default 1,2)")
    parser.add_argument("--min-run-time", type=float, default=2.0)
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    dtype = torch.float32
    rows, cols, values, P, Q, row_bias, col_bias = make_problem(
        args.m, args.n, args.nnz, args.rank, dtype)
    # The layout nn.Embedding users hold: P = weight.T of an (m, r) table (a transposed view).
    P_emb = P.detach().t().contiguous().t().requires_grad_()
    Q_emb = Q.detach().t().contiguous().t().requires_grad_()
    compiled_reference = torch.compile(observed_mf_loss_reference)

    def step(fn, P, Q):
        params = (P, Q, row_bias, col_bias)

        def run():
            loss = fn(rows, cols, values, P, Q, row_bias, col_bias)
            return torch.autograd.grad(loss, params)
        return run

    fused_name = "mf_ext.observed_mf_loss (fused)"
    candidates = {
        fused_name: step(observed_mf_loss, P, Q),
        "fused, embedding layout (P = weight.T of (m, r))": step(observed_mf_loss, P_emb, Q_emb),
        "reference, eager": step(observed_mf_loss_reference, P, Q),
        "reference, torch.compile": step(compiled_reference, P, Q),
    }
    # Agreement first (and the warm-up, compilation included).
    expected = candidates["reference, eager"]()
    for name, fn in candidates.items():
        got = fn()
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-3, msg=name)

    # The GEMM rate in the same run, and the compute floor of the fused op at that rate:
    # per triple 2r (dot) + 2r + 2r (the two rank-1 updates) + ~4 (biases, error, loss) flops.
    size = 2048
    A = torch.randn(size, size, dtype=dtype)
    B = torch.randn(size, size, dtype=dtype)
    flops = (6 * args.rank + 4) * args.nnz
    times = {name: {} for name in candidates}
    gemm_rate = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for name, fn in candidates.items():
            fn()
            # num_threads: Timer runs on 1 thread unless told otherwise (it resets torch's count).
            times[name][threads] = benchmark.Timer("fn()", globals={"fn": fn},
                                                   num_threads=threads) \
                .blocked_autorange(min_run_time=args.min_run_time).median
        torch.mm(A, B)
        mm_time = benchmark.Timer("torch.mm(A, B)", globals={"torch": torch, "A": A, "B": B},
                                  num_threads=threads) \
            .blocked_autorange(min_run_time=args.min_run_time).median
        gemm_rate[threads] = 2 * size**3 / mm_time

    part = _observed_partition(rows, cols, P, Q)
    units = part["units"]
    print("### observed_mf_loss, forward + backward (P, Q, row_bias, col_bias), CPU\n")
    print(f"{cpu_name()}, threads {', '.join(map(str, thread_counts))}, torch "
          f"{torch.__version__}, mf_ext {mf_ext.__version__}, {dtype}; m = {args.m:,}, "
          f"n = {args.n:,}, nnz = {args.nnz:,} (Zipf-like popularity, unsorted), "
          f"r = {args.rank}. Median of torch.utils.benchmark blocked_autorange.\n")
    print(f"Kernel partition: {len(units)} units ({part['lanes'] * part['groups']} {part['outer']} "
          f"groups x {part['groups']} groups of the other side, {part['lanes']} lane(s)), "
          f"{part['concurrent']} can run at once; triples per unit {min(units):,}-"
          f"{max(units):,}; {part['tiles']:,} tiles.\n")
    header = " | ".join(f"{t} thr. (ms) | vs fused, {t} thr." for t in thread_counts)
    print(f"| implementation | {header} | GFLOP/s at (6r+4)·nnz, {thread_counts[-1]} thr. |")
    print("| --- |" + " ---: | ---: |" * len(thread_counts) + " ---: |")
    for name, by_threads in times.items():
        cells = " | ".join(
            f"{by_threads[t] * 1e3:.2f} | {by_threads[t] / times[fused_name][t]:.2f}×"
            for t in thread_counts)
        print(f"| {name} | {cells} | {flops / by_threads[thread_counts[-1]] / 1e9:.1f} |")
    cells = " | ".join(f"{flops / gemm_rate[t] * 1e3:.2f} | fused is "
                       f"{times[fused_name][t] * gemm_rate[t] / flops:.1f}× the floor"
                       for t in thread_counts)
    rates = ", ".join(f"{gemm_rate[t] / 1e9:.0f}" for t in thread_counts)
    print(f"| compute floor: (6r+4)·nnz = {flops / 1e9:.3f} GFLOP at the torch.mm rate "
          f"({rates} GFLOP/s, {size}² float32) | {cells} | |")


if __name__ == "__main__":
    main()

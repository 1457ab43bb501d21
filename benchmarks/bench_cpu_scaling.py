"""How the CPU kernels scale with threads (issue 12 §2): forward + backward of the dense op and
of the observed op at each thread count, with the speed-up over 1 thread, the parallel
efficiency, how the kernel cut the problem, and whether every thread count gave the same bits.

    ./dev python benchmarks/bench_cpu_scaling.py [--threads 1,2,4,8,16] [--out FILE]
        [--dense 4096:32,4096:256,512x32768:64] [--observed 138493:26744:20000000:64]

Defaults: a 4096² dense problem (half observed, float32) at r = 32 and r = 256, a 512 × 32768
one at r = 64 (an oblong R, whose long side is cut into lanes), and an ML-20M-sized observed
problem (138,493 × 26,744, 20M Zipf-distributed triples, r = 64, biases), float32, thread counts
up to the machine's cores. scripts/gpu_check.sh runs it on the 16-core GPU
machines; these 2-core machines can only show 1 → 2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
from bench_observed_cpu import make_problem as observed_problem  # noqa: E402
from common import machine_line  # noqa: E402

import mf_ext  # noqa: E402
from mf_ext.ops import _dense_partition, _observed_partition  # noqa: E402


def dense_case(spec: str):
    """"size:r" (a size² matrix) or "MxN:r" (an oblong one: its long side gets the lanes)."""
    shape, r = spec.split(":")
    m, n = (int(x) for x in shape.split("x")) if "x" in shape else (int(shape),) * 2
    r = int(r)
    g = torch.Generator().manual_seed(0)  # as bench_dense_cpu.make_problem, for any m × n
    R = (torch.rand(m, n, generator=g) * 4 + 1) * (torch.rand(m, n, generator=g) < 0.5)
    P = torch.rand(r, m, generator=g).requires_grad_()
    Q = torch.rand(r, n, generator=g).requires_grad_()
    size = f"{m} × {n}" if m != n else f"{m}²"
    part = _dense_partition(R, P.detach(), Q.detach())
    how = f"{part['path']}, {len(part['tasks'])} units, {part['concurrent']} at once"

    def run():
        loss = mf_ext.masked_mf_loss(R, P, Q)
        loss.backward()
        out = (loss.detach(), P.grad, Q.grad)
        P.grad = Q.grad = None
        return out

    return f"dense {size}, r = {r}", how, run


def observed_case(spec: str):
    m, n, nnz, r = (int(x) for x in spec.split(":"))
    rows, cols, values, P, Q, bu, bi = observed_problem(m, n, nnz, r, torch.float32)
    part = _observed_partition(rows, cols, P.detach(), Q.detach())
    how = (f"{part['path']}, {len(part['chunks'])} units"
           + (f" + {len(part['inner_units'])}" if part["inner_units"] else ""))

    def run():
        loss = mf_ext.observed_mf_loss(rows, cols, values, P, Q, bu, bi)
        loss.backward()
        out = (loss.detach(), P.grad, Q.grad, bu.grad, bi.grad)
        P.grad = Q.grad = bu.grad = bi.grad = None
        return out

    return f"observed {m:,} × {n:,}, {nnz:,} triples, r = {r}", how, run


def time_ms(run, calls: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cores = os.cpu_count() or 1
    default_threads = ",".join(str(t) for t in (1, 2, 4, 8, 16, 32, 64) if t <= cores)
    parser.add_argument("--threads", default=default_threads)
    parser.add_argument("--dense", default="4096:32,4096:256,512x32768:64",
                        help="size:rank or MxN:rank, comma-separated")
    parser.add_argument("--observed", default="138493:26744:20000000:64",
                        help="m:n:nnz:rank, comma-separated ('' for none)")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per thread count")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]

    lines = [f"Machine: {machine_line()}, {cores} cores", f"Command: {' '.join(sys.argv)}", "",
             "Forward + backward, float32; median of the timed calls; speed-up and efficiency "
             "against 1 thread; 'same bits': loss and every gradient equal to the 1-thread "
             "run's, bit for bit.", "",
             "| problem | how it is cut | threads | ms | speed-up | efficiency | same bits |",
             "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    cases = [dense_case(s) for s in filter(None, args.dense.split(","))]
    cases += [observed_case(s) for s in filter(None, args.observed.split(","))]
    for name, how, run in cases:
        first_ms, first_out = None, None
        for t in threads:
            torch.set_num_threads(t)
            ms = time_ms(run, args.calls)
            out = run()
            if first_ms is None:
                first_ms, first_out = ms, out
            same = all(torch.equal(a, b) for a, b in zip(out, first_out))
            line = (f"| {name} | {how} | {t} | {ms:.1f} | {first_ms / ms:.2f}× | "
                    f"{first_ms / ms / t:.0%} | {'yes' if same else 'NO'} |")
            print(line, flush=True)
            lines.append(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

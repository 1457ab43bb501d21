"""The fused dense op against torch.compile(reference), call by call in alternation, for the
ratios a shared, noisy machine can still give: both methods see the same moments of load.

    ./dev python benchmarks/bench_dense_interleaved.py --size 2048 --ranks 32,128,256,512
    ./dev python benchmarks/bench_dense_interleaved.py --size 4096 --ranks 256 --reps 10

Per rank: medians and minimums of each method's forward+backward time (float32 unless told
otherwise, P and Q require grad, as bench_dense_cpu.py times them), the ratio of the medians
(compiled / fused: above 1 the fused op is faster) and the median of the per-pair ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_dense_cpu import forward_backward, make_problem  # noqa: E402
from common import alternating_ms, machine_line  # noqa: E402

import mf_ext  # noqa: E402
from mf_ext.reference import masked_mf_loss_reference  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="m (an m x m matrix)")
    parser.add_argument("--ranks", default="32,128,256,512")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--reps", type=int, default=30, help="timed calls of each method")
    args = parser.parse_args()

    methods = {"fused": mf_ext.masked_mf_loss,
               "compiled": torch.compile(masked_mf_loss_reference)}
    print(f"Machine: {machine_line()}\nCommand: {' '.join(sys.argv)}\n")
    print("| size | dtype | r | fused median ms (min) | compiled median ms (min) "
          "| compiled / fused, medians | median of pair ratios |")
    print("|---|---|---|---|---|---|---|")
    for r in (int(x) for x in args.ranks.split(",")):
        R, P, Q = make_problem(args.size, r, getattr(torch, args.dtype))
        ms, _ = alternating_ms({name: (lambda fn=fn: forward_backward(fn, R, P, Q))
                                for name, fn in methods.items()}, args.reps)
        med = {name: statistics.median(v) for name, v in ms.items()}
        pairs = statistics.median(c / f for f, c in zip(ms["fused"], ms["compiled"]))
        print(f"| {args.size}² | {args.dtype} | {r} | {med['fused']:.2f} ({min(ms['fused']):.2f}) "
              f"| {med['compiled']:.2f} ({min(ms['compiled']):.2f}) "
              f"| {med['compiled'] / med['fused']:.2f}× | {pairs:.2f}× |", flush=True)


if __name__ == "__main__":
    main()

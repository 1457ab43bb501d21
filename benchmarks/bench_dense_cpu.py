"""Forward+backward of mf_ext.masked_mf_loss against the eager reference and the
torch.compile'd reference, measured in the same run, float32, about half the entries observed.

    ./dev bench                      # the table of the core issue
    ./dev bench --sizes 1000:2 --out results.md
Prints a Markdown table: time per forward+backward (P and Q require grad), the speed-up of
the fused op over each reference, and each method's peak extra resident memory.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.benchmark import Timer

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import fix_mmap_threshold, machine_line, peak_rss_delta  # noqa: E402

import mf_ext  # noqa: E402
from mf_ext.reference import masked_mf_loss_reference  # noqa: E402

DEFAULT_SIZES = "1000:2,4096:2,4096:32,2048:128,4096:256"


def make_problem(m: int, r: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    R = torch.rand(m, m, generator=g) * 4 + 1
    R *= torch.rand(m, m, generator=g) < 0.5
    P = torch.rand(r, m, generator=g).requires_grad_()
    Q = torch.rand(r, m, generator=g).requires_grad_()
    return R, P, Q


def forward_backward(loss_fn, R, P, Q):
    loss = loss_fn(R, P, Q)
    loss.backward()
    P.grad = None
    Q.grad = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="m:r pairs (m x m matrices)")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()

    methods = {
        "fused": mf_ext.masked_mf_loss,
        "eager": masked_mf_loss_reference,
        "compiled": torch.compile(masked_mf_loss_reference),
    }
    lines = [
        f"Machine: {machine_line()}",
        "",
        "float32, m = n, ~50% observed, forward+backward (P, Q require grad); times are medians of "
        "torch.utils.benchmark blocked_autorange; memory = peak extra RSS of one call.",
        "",
        "| size | r | fused ms | eager ms | compiled ms | vs eager | vs compiled "
        "| fused MiB | eager MiB | compiled MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    sizes = [tuple(int(x) for x in item.split(":")) for item in args.sizes.split(",")]
    times = {}
    for m, r in sizes:
        R, P, Q = make_problem(m, r)
        for name, fn in methods.items():
            forward_backward(fn, R, P, Q)  # warm-up (and compilation)
            # num_threads: Timer runs on 1 thread unless told otherwise (it resets torch's count).
            timer = Timer("forward_backward(fn, R, P, Q)",
                          globals={"forward_backward": forward_backward, "fn": fn, "R": R, "P": P,
                                   "Q": Q}, num_threads=torch.get_num_threads())
            times[m, r, name] = timer.blocked_autorange(min_run_time=args.min_time).median * 1e3
    fix_mmap_threshold()  # after the timings, which must see torch's normal allocation costs
    for m, r in sizes:
        R, P, Q = make_problem(m, r)
        t = {name: times[m, r, name] for name in methods}
        mem = {name: peak_rss_delta(lambda fn=fn: forward_backward(fn, R, P, Q))
               for name, fn in methods.items()}
        row = (f"| {m}x{m} | {r} | {t['fused']:.2f} | {t['eager']:.2f} | {t['compiled']:.2f} | "
               f"{t['eager'] / t['fused']:.1f}x | {t['compiled'] / t['fused']:.1f}x | "
               f"{mem['fused']:.0f} | {mem['eager']:.0f} | {mem['compiled']:.0f} |")
        lines.append(row)
        print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

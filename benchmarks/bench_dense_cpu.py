"""Forward+backward of mf_ext.masked_mf_loss against the eager reference and the
torch.compile'd reference, measured in the same run, about half the entries observed.

    ./dev bench                                          # the whole sweep (long)
    ./dev bench --sizes 2048 --dtypes float32            # one size, one dtype
    ./dev bench --sizes 4096 --ranks 32,256 --out t.md   # chosen rows, table also to a file
    ./dev bench --layout embedding                       # P, Q as .T of (m, r) tables
    ./dev bench --compare-layouts --sizes 2048 --ranks 8,32,128 --dtypes float32
Prints a Markdown table: time per forward+backward (P and Q require grad), the speed-up of the
fused op over each reference, GFLOP/s of each at 6·r·m·n flops, the same run's torch.mm rate
(2·r·m·n flops of the (m × r)(r × m) product), the fused op's path and units (from
mf_ext.ops._dense_partition), and each method's peak extra resident memory.
With --compare-layouts, the fused op alone in both layouts instead: calls alternating between
(r, m) leaves and the .T of (m, r) leaf tables on the same values (a shared machine's load
drifts alike over both), medians of --calls each, wall clock and CPU time (no memory columns:
after the timings this process's heap would serve the calls; run --layout embedding for them).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys

import torch
from torch.utils.benchmark import Timer

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import (alternating_ms, fix_mmap_threshold, machine_line,  # noqa: E402
                    peak_rss_delta)

import mf_ext  # noqa: E402
from mf_ext.ops import _dense_partition  # noqa: E402
from mf_ext.reference import masked_mf_loss_reference  # noqa: E402

RANKS = {2048: [1, 2, 4, 8, 16, 32, 64, 128, 256, 512], 4096: [1, 2, 4, 8, 16, 32, 64, 128, 256]}
MAX_RANK = {"float32": 512, "float64": 128}
LAYOUT = "rm"  # of P and Q: (r, m) tensors, or "embedding": (m, r) tables passed as .T


def make_problem(m: int, r: int, dtype: torch.dtype, seed: int = 0, layout: str = "rm"):
    """R (m, m) about half observed; P, Q (r, m) leaves, or with layout "embedding" the (r, m)
    views .T of (m, r) leaf tables, as nn.Embedding weights are used."""
    g = torch.Generator().manual_seed(seed)
    R = torch.rand(m, m, generator=g) * 4 + 1
    R *= torch.rand(m, m, generator=g) < 0.5
    P = torch.rand(r, m, generator=g).to(dtype)
    Q = torch.rand(r, m, generator=g).to(dtype)
    if layout == "embedding":
        return R.to(dtype), P.T.contiguous().requires_grad_(), Q.T.contiguous().requires_grad_()
    return R.to(dtype), P.requires_grad_(), Q.requires_grad_()


def as_rm(P, Q, layout=None):
    """The op's (r, m) inputs: the leaves themselves, or the transposes of (m, r) tables."""
    return (P.T, Q.T) if (layout or LAYOUT) == "embedding" else (P, Q)


def forward_backward(loss_fn, R, P, Q, layout=None):
    loss = loss_fn(R, *as_rm(P, Q, layout))
    loss.backward()
    P.grad = None
    Q.grad = None


def median_ms(stmt_fn, min_time: float) -> float:
    stmt_fn()  # warm-up (and compilation)
    # num_threads: Timer runs on 1 thread unless told otherwise (it resets torch's count).
    timer = Timer("fn()", globals={"fn": stmt_fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_time).median * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2048,4096", help="m values (m x m matrices)")
    parser.add_argument("--ranks", help="ranks to run (default: 1..512 at 2048, 1..256 at 4096)")
    parser.add_argument("--dtypes", default="float32,float64",
                        help="float32 and/or float64 (float64 up to r = 128)")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory columns")
    parser.add_argument("--layout", choices=("rm", "embedding"), default="rm",
                        help="P, Q as (r, m) tensors, or as the .T of (m, r) embedding tables")
    parser.add_argument("--compare-layouts", action="store_true",
                        help="the fused op alone, (r, m) against embedding, alternating calls "
                             "(no memory columns)")
    parser.add_argument("--calls", type=int, default=15,
                        help="with --compare-layouts: timed calls of each layout")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    global LAYOUT
    LAYOUT = args.layout
    if args.compare_layouts:
        compare_layouts(args)
        return

    compiled = torch.compile(masked_mf_loss_reference)
    methods = {"fused": mf_ext.masked_mf_loss, "eager": masked_mf_loss_reference,
               "compiled": compiled}
    rows = table_rows(args)
    threads = torch.get_num_threads()
    lines = [
        f"Machine: {machine_line()}",
        f"Command: {' '.join(shlex.quote(a) for a in sys.argv)}",
        "",
        f"{threads} threads; m = n, ~50% observed, forward+backward (P, Q require grad; layout "
        f"{LAYOUT}: " + ("(r, m) tensors" if LAYOUT == "rm" else ".T of (m, r) tables") + "); times are "
        "medians of torch.utils.benchmark blocked_autorange; GF/s at 6·r·m·n flops (mm: the same "
        "run's torch.mm, (m × r)(r × m)); units: the fused op's units / how many can run at "
        "once; memory = peak extra RSS of one call (MiB).",
        "",
        "| size | dtype | r | path | units | fused ms | eager ms | compiled ms | vs eager "
        "| vs compiled | fused GF/s | compiled GF/s | mm GF/s | fused / mm | fused MiB "
        "| eager MiB | compiled MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    results = {}
    for m, r, dtype_name in rows:
        dtype = getattr(torch, dtype_name)
        R, P, Q = make_problem(m, r, dtype, layout=LAYOUT)
        t = {name: median_ms(lambda fn=fn: forward_backward(fn, R, P, Q), args.min_time)
             for name, fn in methods.items()}
        A, B = torch.rand(m, r, dtype=dtype), torch.rand(r, m, dtype=dtype)
        mm_ms = median_ms(lambda: torch.mm(A, B), args.min_time)
        part = _dense_partition(R, *as_rm(P, Q))
        results[m, r, dtype_name] = (t, 2 * r * m * m / mm_ms / 1e6, part)
        timed = ", ".join(f"{k} {v:.2f} ms" for k, v in t.items())
        print(f"# timed {m}² {dtype_name} r={r}: {timed}", file=sys.stderr, flush=True)
        if args.no_memory:
            emit(lines, m, r, dtype_name, results[m, r, dtype_name], None)
    if not args.no_memory:
        fix_mmap_threshold()  # after the timings, which must see torch's normal allocation costs
        for m, r, dtype_name in rows:
            R, P, Q = make_problem(m, r, getattr(torch, dtype_name), layout=LAYOUT)
            mem = {name: peak_rss_delta(lambda fn=fn: forward_backward(fn, R, P, Q))
                   for name, fn in methods.items()}
            emit(lines, m, r, dtype_name, results[m, r, dtype_name], mem)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


def table_rows(args):
    """(m, r, dtype name) of every row asked for."""
    rows = []
    for m in (int(x) for x in args.sizes.split(",")):
        ranks = ([int(x) for x in args.ranks.split(",")] if args.ranks
                 else RANKS.get(m, RANKS[4096]))
        for dtype_name in args.dtypes.split(","):
            rows += [(m, r, dtype_name) for r in ranks if r <= MAX_RANK[dtype_name]]
    return rows


def compare_layouts(args) -> None:
    """--compare-layouts: the fused op's forward+backward with (r, m) leaves and with the .T of
    (m, r) leaf tables, timed in alternating calls (which layout goes first alternates too), by
    the wall clock and by the process's CPU time (all threads; steadier on a shared machine)."""
    fused = mf_ext.masked_mf_loss
    layouts = ("rm", "embedding")
    lines = [
        f"Machine: {machine_line()}",
        f"Command: {' '.join(shlex.quote(a) for a in sys.argv)}",
        "",
        f"{torch.get_num_threads()} threads; m = n, ~50% observed; the fused op's forward+backward"
        f" (P, Q leaves requiring grad), medians of {args.calls} calls per layout, alternating; "
        "rm: (r, m) leaves, embedding: the .T of (m, r) leaf tables; ms: wall clock, CPU ms: the "
        "process's CPU time.",
        "",
        "| size | dtype | r | path | (r, m) ms | embedding ms | embedding / (r, m) "
        "| (r, m) CPU ms | embedding CPU ms | embedding / (r, m), CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for m, r, dtype_name in table_rows(args):
        dtype = getattr(torch, dtype_name)
        problems = {layout: make_problem(m, r, dtype, layout=layout) for layout in layouts}
        wall, cpu = alternating_ms(
            {layout: (lambda layout=layout: forward_backward(fused, *problems[layout], layout))
             for layout in layouts}, args.calls, warmup=1)
        ms = {layout: statistics.median(t) for layout, t in wall.items()}
        cpu_ms = {layout: statistics.median(t) for layout, t in cpu.items()}
        R, P, Q = problems["rm"]
        row = (f"| {m}² | {dtype_name} | {r} | {_dense_partition(R, P, Q)['path']} "
               f"| {ms['rm']:.2f} | {ms['embedding']:.2f} | {ms['embedding'] / ms['rm']:.3f} "
               f"| {cpu_ms['rm']:.2f} | {cpu_ms['embedding']:.2f} "
               f"| {cpu_ms['embedding'] / cpu_ms['rm']:.3f} |")
        lines.append(row)
        print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


def emit(lines, m, r, dtype_name, result, mem) -> None:
    t, mm_gflops, part = result
    flops = 6 * r * m * m

    def rate(ms):
        return flops / ms / 1e6

    mem_cells = (f"{mem['fused']:.0f} | {mem['eager']:.0f} | {mem['compiled']:.0f}" if mem
                 else "– | – | –")
    row = (f"| {m}² | {dtype_name} | {r} | {part['path']} | {len(part['tasks'])}/"
           f"{part['concurrent']} | {t['fused']:.2f} | {t['eager']:.2f} | {t['compiled']:.2f} | "
           f"{t['eager'] / t['fused']:.2f}× | {t['compiled'] / t['fused']:.2f}× | "
           f"{rate(t['fused']):.0f} | {rate(t['compiled']):.0f} | {mm_gflops:.0f} | "
           f"{rate(t['fused']) / mm_gflops:.0%} | {mem_cells} |")
    lines.append(row)
    print(row, flush=True)


if __name__ == "__main__":
    main()

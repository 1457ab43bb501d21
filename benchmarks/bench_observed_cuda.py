"""GPU benchmark of the observed-entries op: forward + backward (P, Q and both biases require
grad) of mf_ext.observed_mf_loss against the eager reference and torch.compile(reference), in one
run, on a Netflix-sized synthetic problem.

    python benchmarks/bench_observed_cuda.py [--nnz 100000000] [--fallback-nnz 25000000]
                                             [--rank 128] [--out FILE]

Prints a Markdown table (also written to --out): median time over CUDA-event-timed repetitions
after a warm-up, speed-up over eager, the compulsory traffic achieved (GB/s: indices and values
read once, P, Q read and their gradients written once — a floor on what any implementation
moves) and GFLOP/s (6·r·nnz: the prediction and the two gradient products). The fused op is
timed with the triples in random order and sorted by row (users), the order real rating data
usually comes in and the op's fast case. The references gather (r, nnz) matrices; where they
run out of memory the table says so, and all three are compared again at --fallback-nnz.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # in-place build
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mf_ext  # noqa: E402
from common import cuda_time_ms  # noqa: E402
from mf_ext.reference import observed_mf_loss_reference  # noqa: E402


def make_problem(m, n, nnz, r, dtype, index_dtype, seed=0):
    """Uniformly random users; items skewed (a few popular ones, as in rating data) and
    scattered over the ids; ratings 1..5; factors N(0, 0.1²)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    rows = torch.randint(0, m, (nnz,), generator=g, device="cuda")
    popular_first = (torch.rand(nnz, generator=g, device="cuda") ** 2 * n).long().clamp_max(n - 1)
    cols = torch.randperm(n, generator=g, device="cuda")[popular_first]
    values = torch.randint(1, 6, (nnz,), generator=g, device="cuda").to(dtype)
    P = (torch.randn(r, m, generator=g, device="cuda", dtype=dtype) * 0.1).requires_grad_()
    Q = (torch.randn(r, n, generator=g, device="cuda", dtype=dtype) * 0.1).requires_grad_()
    row_bias = (torch.randn(m, generator=g, device="cuda", dtype=dtype) * 0.1).requires_grad_()
    col_bias = (torch.randn(n, generator=g, device="cuda", dtype=dtype) * 0.1).requires_grad_()
    return [rows.to(index_dtype), cols.to(index_dtype), values, P, Q, row_bias, col_bias]


def step_fn(loss_fn, problem):
    """One training step's worth of work: the loss and the gradients of P, Q and the biases."""
    rows, cols, values, *params = problem

    def step():
        for p in params:
            p.grad = None
        loss = loss_fn(rows, cols, values, *params)
        loss.backward()
        return loss
    return step


def sort_by_row(problem):
    rows, cols, values, *params = problem
    order = torch.sort(rows, stable=True).indices
    return [rows[order], cols[order], values[order], *params]


def measure(name, loss_fn, problem, warmup, reps):
    """(name, ms, loss) or (name, None, reason) when the GPU runs out of memory."""
    try:
        step = step_fn(loss_fn, problem)
        ms = cuda_time_ms(step, warmup, reps)
        loss = step().detach().double().item()
        return name, ms, loss
    except torch.cuda.OutOfMemoryError:
        return name, None, "out of memory"
    finally:
        for p in problem[3:]:
            p.grad = None
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=480_189, help="users (rows of R; Netflix)")
    parser.add_argument("--n", type=int, default=17_770, help="items (columns; Netflix)")
    parser.add_argument("--nnz", type=int, default=100_000_000)
    parser.add_argument("--fallback-nnz", type=int, default=25_000_000,
                        help="size to compare all three at when a reference runs out of memory")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16",
                                                               "bfloat16"])
    parser.add_argument("--index-dtype", default="int64", choices=["int32", "int64"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_observed_cuda: no CUDA device", file=sys.stderr)
        return 1

    dtype, index_dtype = getattr(torch, args.dtype), getattr(torch, args.index_dtype)
    m, n, r = args.m, args.n, args.rank
    elem = torch.empty((), dtype=dtype).element_size()
    idx = torch.empty((), dtype=index_dtype).element_size()
    references = [("eager reference", observed_mf_loss_reference)]
    if not args.no_compile:
        references.append(("torch.compile(reference)",
                           torch.compile(observed_mf_loss_reference, dynamic=False)))
    props = torch.cuda.get_device_properties(0)
    lines = [
        f"### Observed-entries MF loss + gradients of P, Q and biases, forward + backward "
        f"({args.dtype})",
        "",
        f"- device: {torch.cuda.get_device_name()} ({props.multi_processor_count} SMs, "
        f"{props.total_memory / 2**30:.0f} GiB)",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}; date "
        f"{datetime.date.today().isoformat()}; deterministic algorithms: "
        f"{torch.are_deterministic_algorithms_enabled()} (off: atomics)",
        f"- m = {m} users x n = {n} items, rank {r}, {args.index_dtype} indices, random users, "
        f"skewed items, reduction sum; median of {args.reps} CUDA-event-timed runs after warm-up",
        "- compulsory traffic: nnz x (2 indices + value) + 2 x r x (m + n) x dtype (factors read, "
        "gradients written); GFLOP/s counts 6·r·nnz",
        "",
        "| nnz | implementation | triple order | time (ms) | speed-up vs eager | "
        "compulsory GB/s | GFLOP/s |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    notes = []

    def run_size(nnz, with_references):
        problem = make_problem(m, n, nnz, r, dtype, index_dtype)
        results = [(*measure("mf_ext fused", mf_ext.observed_mf_loss, problem, 2, args.reps),
                    "random")]
        sorted_problem = sort_by_row(problem)
        results.append((*measure("mf_ext fused", mf_ext.observed_mf_loss, sorted_problem, 2,
                                 args.reps), "sorted by row"))
        del sorted_problem
        torch.cuda.empty_cache()
        if with_references:
            for name, fn in references:
                results.append((*measure(name, fn, problem, 1, max(2, args.reps // 2)),
                                "random"))
        eager = next((ms for name, ms, _, _ in results if name == "eager reference"), None)
        traffic = nnz * (2 * idx + elem) + 2 * r * (m + n) * elem
        all_fit = True
        for name, ms, loss_or_reason, order in results:
            if ms is None:
                all_fit = False
                row = f"| {nnz:,} | {name} | {order} | {loss_or_reason} | - | - | - |"
            else:
                speedup = f"{eager / ms:.1f}x" if eager is not None else "(eager: OOM)"
                row = (f"| {nnz:,} | {name} | {order} | {ms:.2f} | {speedup} | "
                       f"{traffic / (ms * 1e-3) / 1e9:.0f} | {6 * r * nnz / (ms * 1e-3) / 1e9:.0f} |")
            lines.append(row)
            print(row, flush=True)
        fused_loss = results[0][2]
        for name, ms, loss, _ in results[2:]:
            if ms is not None:
                rel = abs(fused_loss - loss) / max(abs(loss), 1e-300)
                notes.append(f"<!-- nnz={nnz}: fused loss {fused_loss:.9g}, {name} {loss:.9g}, "
                             f"relative difference {rel:.2e} -->")
                print(notes[-1], flush=True)
        del problem
        torch.cuda.empty_cache()
        return all_fit

    if not run_size(args.nnz, True) and args.fallback_nnz and args.fallback_nnz < args.nnz:
        lines.append(f"| | *a reference ran out of memory at nnz = {args.nnz:,}: all three at "
                     f"nnz = {args.fallback_nnz:,}* | | | | | |")
        print(lines[-1], flush=True)
        run_size(args.fallback_nnz, True)
    lines.append("")
    lines += notes
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU benchmark of mf_ext.implicit_mf_loss (the all-cells, iALS loss): forward + backward of P
and Q on a MovieLens-1M-sized synthetic problem, against the eager pure-PyTorch reference that
materializes the m × n prediction (mf_ext.implicit_mf_loss_reference) and its torch.compile'd
version, all timed in the same run, for a few ranks; the fused op also with P and Q in the
embedding layout (weight.T of (m, r) tables). Prints a Markdown table. --device cuda runs the
same on a GPU (scripts/gpu_check.sh).

    .venv/bin/python benchmarks/bench_implicit_op.py [--ranks 16 64 128] [--nnz N] [--threads T]
    .venv/bin/python benchmarks/bench_implicit_op.py --gram-only   # the Gram part vs torch.mm
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.utils.benchmark as benchmark

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
import mf_ext  # noqa: E402
from common import machine_line  # noqa: E402
from mf_ext import implicit_mf_loss, implicit_mf_loss_reference  # noqa: E402


def make_problem(m, n, nnz, r, dtype, seed=0, device="cpu"):
    """Uniformly random triples; values and weights as in Hu et al.'s mapping (README): weights
    c − 1 = α·count, values c / (c − 1); P, Q small Gaussians."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, m, (nnz,), generator=g)
    cols = torch.randint(0, n, (nnz,), generator=g)
    counts = torch.randint(1, 6, (nnz,), generator=g).to(dtype)
    weights = 10 * counts
    values = (weights + 1) / weights
    P = torch.randn(r, m, generator=g, dtype=dtype) * 0.1
    Q = torch.randn(r, n, generator=g, dtype=dtype) * 0.1
    return tuple(x.to(device) for x in (rows, cols, values, weights, P, Q))


def median_ms(stmt, env, threads):
    timer = benchmark.Timer(stmt=stmt, globals=env, num_threads=threads)
    timer.timeit(2)  # warm-up (and compilation)
    return timer.blocked_autorange(min_run_time=2.0).median * 1e3


def rank_rows(m, n, nnz, r, dtype, threads, alpha, device):
    rows, cols, values, weights, P, Q = make_problem(m, n, nnz, r, dtype, device=device)
    P_emb = P.t().contiguous().t()  # (r, m) view of an (m, r) table, as nn.Embedding holds it
    Q_emb = Q.t().contiguous().t()
    compiled = torch.compile(implicit_mf_loss_reference)
    step = ("torch.autograd.grad(f(rows, cols, P, Q, values, weights, alpha), [P, Q])")
    results = []
    for name, f, p, q in (("mf_ext.implicit_mf_loss (fused), P (r, m)", implicit_mf_loss, P, Q),
                          ("mf_ext.implicit_mf_loss (fused), embedding layout", implicit_mf_loss,
                           P_emb, Q_emb),
                          ("reference, eager (m × n prediction)", implicit_mf_loss_reference,
                           P, Q),
                          ("reference, torch.compile", compiled, P, Q)):
        env = dict(torch=torch, f=f, rows=rows, cols=cols, values=values, weights=weights,
                   alpha=alpha, P=p.requires_grad_(), Q=q.requires_grad_())
        results.append((name, median_ms(step, env, threads)))
    return results


def gram_only(m, n, ranks, threads):
    """The op's Gram part alone (no triples, gradients of P and Q) against torch.mm of the same
    four products, median and minimum of 31 calls."""
    op = torch.ops.mf_ext.implicit_mf_loss_and_grads
    none = torch.zeros(0, dtype=torch.long)
    print("| r | Gram part, (r, m) | Gram part, embedding layout | torch.mm, same products |")
    print("| ---: | ---: | ---: | ---: |")
    for r in ranks:
        P, Q = torch.randn(r, m) * 0.1, torch.randn(r, n) * 0.1
        P_emb, Q_emb = P.t().contiguous().t(), Q.t().contiguous().t()
        cells = []
        for stmt, p, q in (("op(none, none, P, Q, None, None, 1.0, 'sum', False, True, True, "
                            "False)", P, Q),
                           ("op(none, none, P, Q, None, None, 1.0, 'sum', False, True, True, "
                            "False)", P_emb, Q_emb),
                           ("(P @ P.T, Q @ Q.T, (Q @ Q.T) @ P, (P @ P.T) @ Q)", P, Q)):
            timer = benchmark.Timer(stmt=stmt, globals=dict(op=op, none=none, P=p, Q=q),
                                    num_threads=threads)
            times = sorted(timer.timeit(1).raw_times[0] for _ in range(31))
            cells.append(f"{times[15] * 1e3:.2f} / {times[0] * 1e3:.2f} ms")
        print(f"| {r} | " + " | ".join(cells) + " |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=6040)
    parser.add_argument("--n", type=int, default=3706)
    parser.add_argument("--nnz", type=int, default=575_000)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--alpha", type=float, default=1.0, help="unobserved_weight")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda")
    parser.add_argument("--gram-only", action="store_true",
                        help="time only the Gram part (median / minimum) against torch.mm")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.gram_only:
        return gram_only(args.m, args.n, args.ranks, args.threads)
    dtype = torch.float32
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"### implicit_mf_loss, forward + backward (P, Q), {where}\n")
    print(f"{machine_line()}, {args.device}, mf_ext {mf_ext.__version__}, {dtype}; m = {args.m:,}, "
          f"n = {args.n:,}, nnz = {args.nnz:,} (uniformly random, unsorted), unobserved_weight "
          f"= {args.alpha}, values and weights given. Median of torch.utils.benchmark "
          f"blocked_autorange, {args.threads} threads.\n")
    print("| r | implementation | time (ms) | fused (r, m) is faster by |")
    print("| ---: | --- | ---: | ---: |")
    for r in args.ranks:
        results = rank_rows(args.m, args.n, args.nnz, r, dtype, args.threads, args.alpha,
                            args.device)
        fused = results[0][1]
        for name, ms in results:
            print(f"| {r} | {name} | {ms:.2f} | {ms / fused:.2f}× |", flush=True)


if __name__ == "__main__":
    main()

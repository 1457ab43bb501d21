"""GPU benchmark of the dense fused op: forward + backward (P, Q require grad) of
mf_ext.masked_mf_loss against the eager reference and torch.compile(reference), in one run.

    python benchmarks/bench_dense_cuda.py [--size 16384] [--ranks 2 32 128] [--out FILE]

Prints a Markdown table (also written to --out): median time over CUDA-event-timed repetitions
after a warm-up, the speed-up over eager, GB/s achieved reading R (and as a share of the
device-to-device copy bandwidth measured in the same run), GFLOP/s (6·r·m·n: the prediction and
the two gradient products) and the peak memory allocated beyond the inputs.
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
from mf_ext.reference import masked_mf_loss_reference  # noqa: E402


def peak_extra_bytes(fn) -> int:
    """Peak memory allocated by one call of fn() beyond what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth_gbs(nbytes: int, reps: int) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), in GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup=3, reps=reps)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def make_problem(m, n, r, dtype, zero_fraction, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    R = torch.rand(m, n, generator=g, device="cuda", dtype=dtype) * 5
    R.masked_fill_(torch.rand(m, n, generator=g, device="cuda") < zero_fraction, 0)
    P = torch.rand(r, m, generator=g, device="cuda", dtype=dtype).requires_grad_(True)
    Q = torch.rand(r, n, generator=g, device="cuda", dtype=dtype).requires_grad_(True)
    return R, P, Q


def step_fn(loss_fn, R, P, Q):
    """One training step's worth of work: the loss and the gradients of P and Q."""
    def step():
        P.grad = None
        Q.grad = None
        loss = loss_fn(R, P, Q)
        loss.backward()
        return loss
    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16384, help="m = n (default 16384)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 32, 128])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16",
                                                               "bfloat16"])
    parser.add_argument("--zero-fraction", type=float, default=0.5,
                        help="share of unobserved (zero) entries of R (default 0.5)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_dense_cuda: no CUDA device", file=sys.stderr)
        return 1

    dtype = getattr(torch, args.dtype)
    m = n = args.size
    elem = torch.empty((), dtype=dtype).element_size()
    copy_gbs = copy_bandwidth_gbs(m * n * elem, args.reps)
    implementations = [("mf_ext fused", mf_ext.masked_mf_loss), ("eager reference",
                                                                 masked_mf_loss_reference)]
    if not args.no_compile:
        implementations.append(("torch.compile(reference)",
                                torch.compile(masked_mf_loss_reference, dynamic=False)))

    lines = [
        f"### Dense masked-MF loss + gradients of P and Q, forward + backward ({args.dtype})",
        "",
        f"- device: {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).multi_processor_count} SMs)",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}; date "
        f"{datetime.date.today().isoformat()}",
        f"- R: {m} x {n} {args.dtype}, about {args.zero_fraction:.0%} zeros (unobserved), "
        f"reduction sum; median of {args.reps} CUDA-event-timed runs after warm-up",
        f"- measured device-to-device copy bandwidth (read + write): {copy_gbs:.0f} GB/s",
        "",
        "| r | implementation | time (ms) | speed-up vs eager | R read (GB/s) | % of copy BW "
        "| GFLOP/s | peak extra memory (MiB) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for r in args.ranks:
        R, P, Q = make_problem(m, n, r, dtype, args.zero_fraction)
        results = []
        for name, loss_fn in implementations:
            step = step_fn(loss_fn, R, P, Q)
            ms = cuda_time_ms(step, warmup=3, reps=args.reps)
            mem = peak_extra_bytes(step)
            results.append((name, ms, mem, step().detach().double().item()))
        eager_ms = results[1][1]
        fused_loss, eager_loss = results[0][3], results[1][3]
        for name, ms, mem, _ in results:
            read_gbs = m * n * elem / (ms * 1e-3) / 1e9
            row = (f"| {r} | {name} | {ms:.3f} | {eager_ms / ms:.2f}x | {read_gbs:.0f} | "
                   f"{100 * read_gbs / copy_gbs:.0f}% | {6 * r * m * n / (ms * 1e-3) / 1e9:.0f} | "
                   f"{mem / 2**20:.0f} |")
            lines.append(row)
            print(row, flush=True)
        rel = abs(fused_loss - eager_loss) / max(abs(eager_loss), 1e-300)
        print(f"<!-- r={r}: fused loss {fused_loss:.9g}, eager {eager_loss:.9g}, "
              f"relative difference {rel:.2e} -->", flush=True)
        del R, P, Q
        torch.cuda.empty_cache()
    lines.append("")
    lines.append("R read: bytes of R / time (the op reads R once; the eager and compiled "
                 "references read it and their temporaries several times).")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Data-parallel MatrixFactorization throughput (ratings·epochs/s) per process count, CPU/gloo.

    ./dev python benchmarks/bench_distributed.py [--configs 1x1,1x2,2x1] [--ratings N] ...

For each configuration PxT it starts P workers (this script with --worker, a file:// rendezvous)
of T threads each, each training full-batch on its shard of one synthetic set. Throughput is
N / (median epoch time over epochs 2…E); epoch 1 (first touches, allocator warm-up) is left out.
It also times the step's all-reduce alone (a flat buffer of the gradients' size). P = 1 is the
plain single-process fit. GPU counts need more than one GPU (not measured here).
Multi-process wall-clock timing, so perf_counter around whole epochs rather than
torch.utils.benchmark (which times one process).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def synthetic(n_ratings: int, m: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    U, V = rng.normal(size=(m, 8)), rng.normal(size=(n, 8))
    users, items = rng.integers(0, m, n_ratings), rng.integers(0, n, n_ratings)
    ratings = np.clip(3 + (U[users] * V[items]).sum(1) / np.sqrt(8)
                      + rng.normal(scale=0.3, size=n_ratings), 1, 5)
    return users, items, ratings


def worker(args) -> None:
    from mf_ext import MatrixFactorization, Ratings
    from mf_ext.distributed import shard_ratings

    world = args.world
    torch.set_num_threads(args.threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{args.rendezvous}",
                                rank=args.worker_rank, world_size=world,
                                timeout=datetime.timedelta(seconds=300))
    rank = args.worker_rank
    dtype = getattr(torch, args.dtype)
    data = shard_ratings(Ratings(*synthetic(args.ratings, args.users, args.items)), rank, world)
    model = MatrixFactorization(rank=args.rank, epochs=args.epochs, dtype=dtype, seed=0)
    model.fit(data)
    epoch_s = statistics.median(h.seconds for h in model.history[1:])
    allreduce_ms = float("nan")
    if world > 1:
        numel = args.rank * (args.users + args.items) + args.users + args.items + 1
        bucket = torch.randn(numel, dtype=dtype)
        times = []
        for _ in range(25):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(bucket)
            times.append(time.perf_counter() - start)
        allreduce_ms = 1e3 * statistics.median(times[5:])
        dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({"epoch_s": epoch_s, "allreduce_ms": allreduce_ms,
                          "threads": torch.get_num_threads(),
                          "train_rmse": model.history[-1].train_rmse}))


def launch(args, world: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, os.path.abspath(__file__), "--worker-rank", "{rank}",
                   "--world", str(world), "--threads", str(threads), "--rendezvous", os.path.join(tmp, "rdzv"),
                   "--ratings", str(args.ratings), "--users", str(args.users), "--items",
                   str(args.items), "--rank", str(args.rank), "--epochs", str(args.epochs),
                   "--dtype", args.dtype]
        env = dict(os.environ, PYTHONPATH=ROOT)
        procs = [subprocess.Popen([c.format(rank=r) for c in command], env=env,
                                  stdout=subprocess.PIPE, text=True) for r in range(world)]
        outputs = [p.communicate(timeout=1800)[0] for p in procs]
        if any(p.returncode for p in procs):
            raise SystemExit(f"a worker failed with {[p.returncode for p in procs]}")
    return json.loads(outputs[0].strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="1x1,1x2,2x1",
                        help="processes x threads each, comma-separated (default 1x1,1x2,2x1)")
    parser.add_argument("--ratings", type=int, default=2_000_000)
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--worker-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--rendezvous", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_rank is not None:
        worker(args)
        return

    from common import machine_line

    bytes_per = torch.finfo(getattr(torch, args.dtype)).bits // 8
    bucket_mb = bytes_per * (args.rank + 1) * (args.users + args.items) / 2**20
    print(f"Machine: {machine_line()}; load average at start "
          f"{os.getloadavg()[0]:.1f} (other jobs share the cores)\n")
    print(f"Synthetic set: N = {args.ratings:,} ratings, m = {args.users:,} users, "
          f"n = {args.items:,} items, r = {args.rank}, {args.dtype}, full batch, "
          f"{args.epochs} epochs (median of epochs 2…{args.epochs}); gradient all-reduce "
          f"{bucket_mb:.2f} MiB per step.\n")
    print("| processes | threads each | s/epoch | ratings·epochs/s | speed-up | "
          "all-reduce ms/step | final train RMSE |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for config in args.configs.split(","):
        world, threads = (int(x) for x in config.split("x"))
        r = launch(args, world, threads)
        rate = args.ratings / r["epoch_s"]
        base = base or rate
        allreduce = "-" if r["allreduce_ms"] != r["allreduce_ms"] else f"{r['allreduce_ms']:.2f}"
        print(f"| {world} | {r['threads']} | {r['epoch_s']:.3f} | {rate:,.0f} | "
              f"{rate / base:.2f}x | {allreduce} | {r['train_rmse']:.4f} |", flush=True)


if __name__ == "__main__":
    main()

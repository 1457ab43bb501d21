"""Data-parallel MatrixFactorization throughput (ratings·epochs/s) per process count, CPU/gloo;
and, with --memory, replicated against sharded factors (shard_factors=True): memory per rank,
bytes sent per rank and step, seconds per epoch.

    ./dev python benchmarks/bench_distributed.py [--configs 1x1,1x2,2x1] [--ratings N] ...
    ./dev python benchmarks/bench_distributed.py --memory --designs sharded --users 6000000 \
        --items 200000 --ratings 15000000 --rank 32 --epochs 3
    ./dev python benchmarks/bench_distributed.py --memory --model implicit --solver als \
        --designs sharded --processes 2 ...   (--processes 1: the whole model in one process)

--memory: P = --processes single-threaded workers, each generating its own share of a uniform
synthetic set (any input split works: the sharded fit moves ratings to their users' owners) and
fitting it full-batch. Each reports its resident memory before the fit and at the fit's peak
(VmHWM, reset before the fit), the bytes its factors (with the SVD++ term's y_j unless
--no-implicit), gradients and Adam moments take (from the tensors it holds), the most item rows
one step gathered, and the bytes it handed to the all-to-alls per step (ShardInfo.bytes_sent).
The cost models they are set against are in docs/distributed.md; the replicated design's
figures are also computed for sizes not run. --model implicit fits
ImplicitMatrixFactorization(shard_factors=True) instead (weights 1), with --solver adam or als;
it has no replicated multi-process design, so its baseline is one process (--processes 1), which
holds every row.

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
import math
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


# The all-to-alls of every step (ShardInfo.bytes_sent's keys); the small all-reduces (the loss,
# the implicit model's r × r Grams) are left out, as are the exchanges once per fit.
STEP_EXCHANGES = ("item-row", "item-gradient", "CG item-row", "CG item-product")


def implicit_als(args) -> bool:
    return args.model == "implicit" and args.solver == "als"


def row_values(args) -> int:
    """Values in one item row that travels: the implicit model's factor column; the explicit
    model's with the bias (and the y_j column with the SVD++ term)."""
    return args.rank if args.model == "implicit" else args.rank * (1 + args.implicit) + 1


def state_copies(args) -> int:
    """The copies of the factors a fit keeps: themselves, their gradients and Adam's two
    moments; ALS keeps no optimizer state (its CG vectors last one half-step)."""
    return 1 if implicit_als(args) else 4


def step_rows(args) -> int:
    """How many times a step sends the rows of the items another rank touches (docs/
    distributed.md): Adam 2 (rows out, gradients back); an implicit ALS sweep with the default 2
    CG steps 7 (the users' half-step's rows, then 3 products with A each way)."""
    return 7 if implicit_als(args) else 2


def memory_worker(args) -> None:
    """One rank of --memory: fit its share of the synthetic set; rank 0 prints every rank's
    figures as JSON."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from common import _status_kib
    from mf_ext import ImplicitMatrixFactorization, MatrixFactorization, Ratings

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{args.rendezvous}",
                            rank=args.worker_rank, world_size=args.world,
                            timeout=datetime.timedelta(seconds=600))
    rank, world = args.worker_rank, args.world
    rng = np.random.default_rng([1, rank])
    share = args.ratings // world + (rank < args.ratings % world)
    users, items = rng.integers(0, args.users, share), rng.integers(0, args.items, share)
    data = Ratings(users, items, rng.integers(1, 6, share).astype(np.float64))
    del users, items
    dtype = getattr(torch, args.dtype)
    if args.model == "implicit":
        model = ImplicitMatrixFactorization(rank=args.rank, epochs=args.epochs, dtype=dtype,
                                            seed=0, solver=args.solver, shard_factors=True)
    else:
        model = MatrixFactorization(rank=args.rank, epochs=args.epochs, dtype=dtype, seed=0,
                                    implicit=args.implicit,
                                    shard_factors=args.design == "sharded")
    rss_before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM from here: the fit's peak
    dist.barrier()
    model.fit(data.users, data.items) if args.model == "implicit" else model.fit(data)
    params = [p for p in (model.P, model.Q, getattr(model, "user_bias", None),
                          getattr(model, "item_bias", None), getattr(model, "Y", None))
              if p is not None]
    held = sum(p.numel() * p.element_size() for p in params)
    shard = model.shard
    row_bytes = row_values(args) * torch.finfo(dtype).bits // 8
    figures = {
        "rank": rank, "rss_before_mib": rss_before / 1024,
        "peak_rss_mib": _status_kib("VmHWM") / 1024,
        "factors_mib": held / 2**20,
        "state_mib": state_copies(args) * held / 2**20,
        "epoch_s": statistics.median(h.seconds for h in model.history[1:]),
        "train_rmse": model.history[-1].train_rmse,
        "m": len(model.user_map), "n": len(model.item_map), "local_ratings": share,
        "users_held": model.P.shape[1], "items_held": model.Q.shape[1],
    }
    if shard is not None:
        per_step = sum(shard.bytes_sent.get(k, 0) for k in STEP_EXCHANGES)
        figures.update(gathered_mib=shard.gathered_rows * row_bytes / 2**20,
                       gathered_rows=shard.gathered_rows,
                       bytes_per_step=per_step / shard.steps,
                       setup_bytes=sum(v for k, v in shard.bytes_sent.items()
                                       if k not in STEP_EXCHANGES))
    rows = [None] * world
    dist.all_gather_object(rows, figures)
    if rank == 0:
        print(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def memory_table(args) -> None:
    """--memory: the workers of each design in turn, then the table."""
    from common import machine_line

    world, r, b = args.processes, args.rank, torch.finfo(getattr(torch, args.dtype)).bits // 8
    N = args.ratings
    if args.model == "implicit" and "replicated" in args.designs.split(","):
        raise SystemExit("--model implicit has no replicated multi-process design: run "
                         "--designs sharded, with --processes 1 for the whole model in one "
                         "process")
    print(f"Machine: {machine_line()}; load average at start {os.getloadavg()[0]:.1f} (other "
          f"jobs share the cores and the memory)\n", flush=True)
    runs = {design: launch_memory(args, design) for design in args.designs.split(",")}
    m, n = next(iter(runs.values()))[0]["m"], next(iter(runs.values()))[0]["n"]
    print(f"Synthetic set: N = {N:,} uniform ratings drawn over {args.users:,} users and "
          f"{args.items:,} items, of which m = {m:,} users and n = {n:,} items drew one (the "
          f"model's), r = {r}, {args.dtype}, full batch, {args.epochs} epochs (s/epoch: median "
          f"of epochs 2…), {world} processes of 1 thread.\n")
    touched = 1 - math.exp(-N / world / n)  # the share of the items one rank's ratings touch
    if args.model == "implicit":
        copies, rows = state_copies(args), step_rows(args)
        replicated_state = copies * b * r * (m + n)  # P, Q (and gradients, Adam moments)
        sharded_step = rows * r * b * n * (world - 1) / world * touched
        print(f"Cost models (docs/distributed.md), ImplicitMatrixFactorization(solver="
              f"{args.solver!r}), weights 1: one process holds {copies}·{b}·r·(m+n) = "
              f"{replicated_state / 2**20:,.0f} MiB of factors"
              f"{'' if copies == 1 else ', gradients and Adam moments'}; sharded 1/P of it (at "
              f"most 1.1/P with the blocks balanced in interactions) plus the gathered item "
              f"rows, {rows}·r·{b}·n·(P−1)/P·(1−e^(−N/(P·n))) = {sharded_step / 2**20:,.2f} MiB "
              f"sent per rank and step.\n")
    else:
        y = r if args.implicit else 0  # the y_j: r more values an item row
        replicated_state = 4 * b * ((r + 1) * (m + n) + y * n)  # parameters, grads, Adam moments
        ring = 2 * (world - 1) / world * b * ((r + 1) * (m + n) + y * n + 1)
        sharded_step = 2 * (r + 1 + y) * b * n * (world - 1) / world * touched
        width = "2r+1" if y else "r+1"
        print(f"Cost models (docs/distributed.md), the SVD++ term {'on' if y else 'off'}: "
              f"replicated factors+gradients+Adam 4·{b}·((r+1)·(m+n){' + r·n' if y else ''}) = "
              f"{replicated_state / 2**20:,.0f} MiB per rank, ring all-reduce "
              f"{ring / 2**20:,.1f} MiB sent per rank and step; sharded "
              f"{replicated_state / world / 2**20:,.0f} MiB per rank (1/P; at most 1.1/P with "
              f"the blocks balanced in ratings) plus the gathered item rows, "
              f"2·({width})·{b}·n·(P−1)/P·(1−e^(−N/(P·n))) = {sharded_step / 2**20:,.2f} MiB "
              f"sent per rank and step.\n")
    print("| design | rank | users, items held | RSS before fit MiB | peak RSS in fit MiB | "
          "factors (+grad+Adam) MiB (share of replicated) | gathered item rows | "
          "MiB sent per step (model) | s/epoch | train RMSE |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for design, rows in runs.items():
        for row in rows:
            if design == "sharded":
                gathered = f"{row['gathered_rows']:,} ({row['gathered_mib']:.1f} MiB)"
                sent = f"{row['bytes_per_step'] / 2**20:.2f} ({sharded_step / 2**20:.2f})"
            else:
                gathered, sent = "-", f"- ({ring / 2**20:.1f})"
            share = row["state_mib"] * 2**20 / replicated_state  # the memory target: ≤ 1.1 / P
            print(f"| {design} | {row['rank']} | {row['users_held']:,}, {row['items_held']:,} | "
                  f"{row['rss_before_mib']:,.0f} | "
                  f"{row['peak_rss_mib']:,.0f} | {row['state_mib']:,.0f} "
                  f"({share:.3f} of {replicated_state / 2**20:,.0f}) | {gathered} | {sent} | "
                  f"{row['epoch_s']:.2f} | {row['train_rmse']:.4f} |")


def launch_memory(args, design: str) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, os.path.abspath(__file__), "--memory-worker", "--design",
                   design, "--worker-rank", "{rank}", "--world", str(args.processes),
                   "--rendezvous", os.path.join(tmp, "rdzv"), "--ratings", str(args.ratings),
                   "--users", str(args.users), "--items", str(args.items), "--rank",
                   str(args.rank), "--epochs", str(args.epochs), "--dtype", args.dtype,
                   "--implicit" if args.implicit else "--no-implicit", "--model", args.model,
                   "--solver", args.solver]
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
        procs = [subprocess.Popen([c.format(rank=r) for c in command], env=env,
                                  stdout=subprocess.PIPE, text=True)
                 for r in range(args.processes)]
        outputs = [p.communicate(timeout=3600)[0] for p in procs]
        if any(p.returncode for p in procs):
            raise SystemExit(f"a {design} worker failed with {[p.returncode for p in procs]}")
    return json.loads(outputs[0].strip().splitlines()[-1])


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
    parser.add_argument("--memory", action="store_true",
                        help="replicated against sharded factors: memory, traffic, s/epoch")
    parser.add_argument("--designs", default="replicated,sharded",
                        help="--memory: which to run, comma-separated")
    parser.add_argument("--processes", type=int, default=2, help="--memory: processes")
    parser.add_argument("--implicit", action=argparse.BooleanOptionalAction, default=True,
                        help="--memory: the SVD++ term (the model's default: on)")
    parser.add_argument("--model", choices=("mf", "implicit"), default="mf",
                        help="--memory: MatrixFactorization or ImplicitMatrixFactorization")
    parser.add_argument("--solver", choices=("adam", "als"), default="als",
                        help="--memory --model implicit: its solver")
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--design", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(args)
        return
    if args.worker_rank is not None:
        worker(args)
        return
    if args.memory:
        memory_table(args)
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

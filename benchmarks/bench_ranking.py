"""Top-N recommendation at MovieLens-1M size: recommend_new (fold-in of a new user) per user,
recommend_batch for every user against scoring the whole users × items matrix at once and
against a loop of one-user recommend() calls, and evaluate_ranking on a per-user hold-out.

The model is MatrixFactorization fitted on a leave_out_split (20%, seed 0) of
../shared/data/ml-1m-half/ratings.dat (ML-1M's users 1-2999: 2,999 × 3,7xx). Timings are
medians (recommend_new: over --users users, each given its own training ratings) or
torch.utils.benchmark's blocked_autorange.

    ./dev python benchmarks/bench_ranking.py [--data F] [--epochs 160] [--users 500] [--out F]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
from torch.utils.benchmark import Timer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line  # noqa: E402

import mf_ext  # noqa: E402
from mf_ext.data import load_ratings  # noqa: E402
from mf_ext.metrics import evaluate_ranking, leave_out_split  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                            "ml-1m-half", "ratings.dat")


def all_at_once(model, k):
    """The plain way: the full users × items score matrix, seen items masked, one topk."""
    with torch.no_grad():
        scores = model.P.T @ model.Q + model.user_bias[:, None] + model.item_bias
        rows = np.repeat(np.arange(len(model.user_map)), np.diff(model._rated_indptr))
        scores[torch.as_tensor(rows), torch.as_tensor(model._rated_indices)] = -torch.inf
        return torch.topk(scores, k, dim=1)


def seconds(fn) -> float:
    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1.0).median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=160)
    parser.add_argument("--users", type=int, default=500, help="users timed in recommend_new")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out", help="also write the tables to this Markdown file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    k = args.k
    train, test = leave_out_split(load_ratings(args.data), 0.2, seed=0)
    start = time.perf_counter()
    model = mf_ext.MatrixFactorization(epochs=args.epochs).fit(train)
    fit_seconds = time.perf_counter() - start
    m, n = len(model.user_map), len(model.item_map)
    users = model.user_map.ids

    # recommend_new: each of the first --users users as if new, from its training ratings
    per_user, solve_only = [], []
    for user in users[:args.users]:
        mine = train.users == user
        items, values = train.items[mine], train.ratings[mine]
        t0 = time.perf_counter()
        model.recommend_new(items, values, k=k)
        t1 = time.perf_counter()
        model._fold_in(model.item_map.index(items), values)
        t2 = time.perf_counter()
        per_user.append(t1 - t0)
        solve_only.append(t2 - t1)
    ratings_per_user = len(train) / m

    batch = seconds(lambda: model.recommend_batch(users, k=k))
    dense = seconds(lambda: all_at_once(model, k))
    loop_users = users[:200]
    loop = seconds(lambda: [model.recommend(u, k=k) for u in loop_users]) * m / len(loop_users)
    # the same lists but where float32 rounding (BLAS blocking) swaps two nearly equal scores
    differ = int((model.recommend_batch(users, k=k)[0] != model.item_map.raw(
        all_at_once(model, k).indices.numpy())).any(axis=1).sum())
    t0 = time.perf_counter()
    metrics = evaluate_ranking(model, test, k=k)
    evaluate_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate_ranking(model, test, k=k, metrics=["recall", "ndcg", "precision", "map"])
    top_only_seconds = time.perf_counter() - t0

    ms = 1000.0
    lines = [
        f"Machine: {machine_line()} (shared with other jobs: noisy; load average "
        f"{os.getloadavg()[0]:.1f} at the end)",
        f"Data: {os.path.basename(args.data)}, leave_out_split 20% seed 0: {m:,} users × "
        f"{n:,} items, {len(train):,} training ratings ({ratings_per_user:.0f} per user), "
        f"{len(test):,} test; MatrixFactorization(epochs={args.epochs}) defaults otherwise "
        f"(rank {model.rank}, float32, CPU), fit {fit_seconds:.1f} s; k = {k}",
        "",
        "| recommend_new (one new user) | median ms | p90 ms |",
        "|---|---:|---:|",
        f"| whole call (fold-in, scores of {n:,} items, top-k) | "
        f"{statistics.median(per_user) * ms:.3f} | {np.percentile(per_user, 90) * ms:.3f} |",
        f"| the fold-in solve alone (`_fold_in`) | {statistics.median(solve_only) * ms:.3f} | "
        f"{np.percentile(solve_only, 90) * ms:.3f} |",
        "",
        f"| top-{k} for all {m:,} users | seconds | µs per user | vs recommend_batch |",
        "|---|---:|---:|---:|",
        f"| recommend_batch (chunks of {model._chunk_rows():,} users) | {batch:.3f} | "
        f"{batch / m * 1e6:.1f} | 1.00x |",
        f"| whole {m:,} × {n:,} matrix at once + torch.topk | {dense:.3f} | "
        f"{dense / m * 1e6:.1f} | {dense / batch:.2f}x |",
        f"| recommend() per user (200 timed, scaled) | {loop:.3f} | {loop / m * 1e6:.1f} | "
        f"{loop / batch:.2f}x |",
        "",
        f"Users whose top-{k} differs between recommend_batch and the whole-matrix topk: "
        f"{differ} of {m:,} (float32 rounding of nearly tied scores)",
        "",
        f"evaluate_ranking (k = {k}, all metrics incl. AUC over full rankings): "
        f"{evaluate_seconds:.2f} s; without AUC: {top_only_seconds:.2f} s. Values (every held-out "
        "rating counts as relevant, whatever its value: a sanity check, not a tuned result): "
        + ", ".join(f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}"
                    for name, value in metrics.items()),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Top-N recommendation (`benchmarks/bench_ranking.py`)\n\n"
                    f"Command: `python benchmarks/bench_ranking.py --epochs {args.epochs} "
                    f"--users {args.users} --k {k} --threads {torch.get_num_threads()} "
                    f"--out {args.out}`\n\n" + text + "\n")


if __name__ == "__main__":
    main()

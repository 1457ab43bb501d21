"""Top-N quality and fit time of ImplicitMatrixFactorization (defaults) on MovieLens-100K as
implicit data, against `implicit`'s AlternatingLeastSquares (tuned) and BPR, in the same run.

Data: ratings >= 4 are the positives; users with fewer than 5 positives are dropped. A per-user
80/20 hold-out (mf_ext.metrics.leave_out_split, seed 0) gives train and test; the same split
of train (seed 1) gives the tuning split (fit on its 80%, score on its 20%). implicit's ALS is
tuned on that split over factors {64, 128} x regularization {0.05, 0.1} x alpha {1, 10, 40},
15 iterations, then refit on all of train and scored on test, like mf_ext's defaults and BPR.
mf_ext's defaults were chosen on the same tuning split (--tune-mf-ext prints that grid).

Leakage: the test pairs are split off first and used only to score (`evaluate`); the tuning
split is carved from train alone, and every fit sees only its stage's training pairs. Each
user's training items are excluded from its ranking (recommend_batch's exclude_seen; the same
mask for implicit's scores), and items no training pair has are no candidates for any model.

    PYTHONPATH=/work/peers/implicit nice -n 10 .venv/bin/python benchmarks/bench_implicit.py \
        [--data ../shared/data/ml-100k/u.data] [--threads 2] [--reps 3] [--tune-mf-ext]
        [--out benchmarks/results/implicit_ml100k.md [--append]]
(`implicit` goes in its own folder: `.venv/bin/python -m pip install --target
/work/peers/implicit implicit`; it is not a dependency. Without it only the mf_ext rows run.)
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line  # noqa: E402

import mf_ext  # noqa: E402
from mf_ext.implicit_model import ImplicitMatrixFactorization  # noqa: E402
from mf_ext.data import Ratings, load_ratings  # noqa: E402
from mf_ext.metrics import leave_out_split, ndcg_at_k, recall_at_k  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ml-100k",
                            "u.data")
K = 20


def positives(path):
    """(users, items) of the ratings >= 4, of users with at least 5 of them; dense indices."""
    data = load_ratings(path)
    keep = data.ratings >= 4
    users, items = data.users[keep], data.items[keep]
    ids, counts = np.unique(users, return_counts=True)
    kept = np.isin(users, ids[counts >= 5])
    return users[kept], items[kept]


def split(users, items, seed):
    """mf_ext.metrics.leave_out_split's per-user 80/20 hold-out, as (train, test) pair arrays."""
    train, test = leave_out_split(Ratings(users, items, np.ones(len(users))), 0.2, seed=seed)
    return (train.users, train.items), (test.users, test.items)


def matrix(pairs, shape):
    u, i = pairs
    return sp.csr_matrix((np.ones(len(u), dtype=np.float32), (u, i)), shape=shape)


def top_k_of_scores(scores, train, k=K):
    """Each user's k best items (dense indices) of an (m, n) score matrix, excluding its
    training items and the items no training pair has (the candidates mf_ext's models have)."""
    scores = np.array(scores, dtype=np.float64)
    scores[train.nonzero()] = -np.inf
    scores[:, np.asarray(train.sum(0)).ravel() == 0] = -np.inf
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), 1), 1)


def evaluate(top, test, k=K):
    """(recall@k, NDCG@k) by mf_ext.metrics, over the users with test items."""
    relevant = [test.indices[test.indptr[u]:test.indptr[u + 1]] for u in range(test.shape[0])]
    return recall_at_k(top, relevant, k), ndcg_at_k(top, relevant, k)


def mf_ext_top_k(model, n_users, k=K):
    """recommend_batch's lists for every user (users absent from training: none)."""
    top = np.full((n_users, k), -1)
    known = model.user_map.ids
    top[known] = model.recommend_batch(known, k=k)[0]
    return top


def fit_mf_ext(train, **settings):
    u, i = train.nonzero()  # the dense indices serve as the raw ids
    start = time.perf_counter()
    model = ImplicitMatrixFactorization(**settings).fit(u, i)
    return model, time.perf_counter() - start


def fit_implicit_als(train, factors, regularization, alpha, seed=0):
    from implicit.cpu.als import AlternatingLeastSquares

    model = AlternatingLeastSquares(factors=factors, regularization=regularization, alpha=alpha,
                                    iterations=15, random_state=seed,
                                    num_threads=torch.get_num_threads())
    return _fit_implicit(model, train)


def fit_implicit_bpr(train, seed=0):
    from implicit.cpu.bpr import BayesianPersonalizedRanking

    model = BayesianPersonalizedRanking(factors=64, iterations=100, random_state=seed,
                                        num_threads=torch.get_num_threads())
    return _fit_implicit(model, train)


def _fit_implicit(model, train):
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):  # implicit's advice: its threads, not BLAS's
        start = time.perf_counter()
        model.fit(train, show_progress=False)
        return model, time.perf_counter() - start


def median_fit(fit, reps):
    """The last model and the median fit seconds of `reps` fits."""
    runs = [fit() for _ in range(reps)]
    return runs[-1][0], statistics.median(s for _, s in runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--out")
    parser.add_argument("--reps", type=int, default=3, help="fits timed per model (median)")
    parser.add_argument("--threads", type=int, default=2, help="for torch and implicit")
    parser.add_argument("--tune-mf-ext", action="store_true")
    parser.add_argument("--append", action="store_true", help="add to --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    users, items = positives(args.data)
    _, u = np.unique(users, return_inverse=True)
    _, i = np.unique(items, return_inverse=True)
    shape = (u.max() + 1, i.max() + 1)
    train_pairs, test_pairs = split(u, i, seed=0)
    fit_pairs, val_pairs = split(*train_pairs, seed=1)
    train, test = matrix(train_pairs, shape), matrix(test_pairs, shape)
    fit_part, val = matrix(fit_pairs, shape), matrix(val_pairs, shape)
    lines = [f"## {args.threads} thread(s)", "",
             f"Machine: {machine_line()}, load average {os.getloadavg()[0]:.1f} at the start "
             f"(shared with other jobs: timings are noisy)", "",
             f"MovieLens-100K, ratings >= 4 as positives, users with >= 5: {shape[0]} users, "
             f"{shape[1]} items, {len(u)} positives; per-user 80/20 hold-out (seed 0): "
             f"{train.nnz} train, {test.nnz} test pairs; tuning split of train (seed 1): "
             f"{fit_part.nnz} / {val.nnz}. recall@{K}, NDCG@{K} over users, training items "
             f"excluded. Fit time: median of {args.reps} fits, {args.threads} thread(s) for both "
             f"libraries (implicit's BLAS at 1 thread, as it advises).", ""]
    rows = []
    have_implicit = True
    try:
        import implicit  # noqa: F401
    except ImportError:
        have_implicit = False
        lines.append("(`implicit` is not installed: its rows are missing.)")
    if have_implicit:
        tuning = ["| factors | regularization | alpha | val recall@20 | val NDCG@20 |",
                  "|---|---|---|---|---|"]
        best = None
        for f, reg, alpha in itertools.product((64, 128), (0.05, 0.1), (1.0, 10.0, 40.0)):
            model, _ = fit_implicit_als(fit_part, f, reg, alpha)
            recall, ndcg = evaluate(top_k_of_scores(model.user_factors @ model.item_factors.T,
                                                    fit_part), val)
            tuning.append(f"| {f} | {reg} | {alpha:g} | {recall:.4f} | {ndcg:.4f} |")
            if best is None or ndcg > best[0]:
                best = (ndcg, f, reg, alpha)
            print(tuning[-1], flush=True)
        _, f, reg, alpha = best
        model, seconds = median_fit(lambda: fit_implicit_als(train, f, reg, alpha), args.reps)
        rows.append((f"implicit ALS, tuned (factors {f}, reg {reg}, alpha {alpha:g}, 15 it.)",
                     *evaluate(top_k_of_scores(model.user_factors @ model.item_factors.T, train),
                               test), seconds))
        model, seconds = median_fit(lambda: fit_implicit_bpr(train), args.reps)
        rows.append(("implicit BPR (factors 64, 100 it., defaults otherwise)",
                     *evaluate(top_k_of_scores(model.user_factors @ model.item_factors.T, train),
                               test), seconds))
    model, seconds = median_fit(lambda: fit_mf_ext(train), args.reps)
    rows.append(("mf_ext ImplicitMatrixFactorization() (defaults)",
                 *evaluate(mf_ext_top_k(model, shape[0]), test), seconds))
    model, seconds = median_fit(lambda: fit_mf_ext(train, solver="adam", epochs=200), args.reps)
    rows.append(("mf_ext ImplicitMatrixFactorization(solver='adam', epochs=200)",
                 *evaluate(mf_ext_top_k(model, shape[0]), test), seconds))
    als_seconds = rows[0][3] if have_implicit else float("nan")
    lines += [f"| method | test recall@{K} | test NDCG@{K} | fit s | fit s / tuned ALS's |",
              "|---|---|---|---|---|"]
    lines += [f"| {name} | {r:.4f} | {n:.4f} | {s:.3f} | {s / als_seconds:.2f} |"
              for name, r, n, s in rows]
    if have_implicit:
        lines += ["", "implicit ALS tuning (fit on the tuning split's 80%, scored on its 20%):",
                  ""] + tuning
    if args.tune_mf_ext:
        lines += ["", "mf_ext tuning (same split):", ""] + tune_mf_ext(fit_part, val, shape)
    print("\n".join(lines))
    if args.out:
        with open(args.out, "a" if args.append else "w") as f:
            f.write("\n".join(lines) + "\n")


def tune_mf_ext(fit_part, val, shape):
    table = ["| rank | alpha | reg | reg_exponent | epochs | val recall@20 | val NDCG@20 | fit s |",
             "|---|---|---|---|---|---|---|---|"]
    for rank, alpha, reg, nu, epochs in itertools.product(
            (64,), (5.0, 10.0, 20.0), (0.0125, 0.02, 0.03, 0.04), (0.0, 1.0), (15,)):
        # cg_steps 2, the default, was then chosen over 3 (same quality, 25% less time)
        model, seconds = fit_mf_ext(fit_part, rank=rank, alpha=alpha, reg=reg, reg_exponent=nu,
                                    epochs=epochs)
        recall, ndcg = evaluate(mf_ext_top_k(model, shape[0]), val)
        table.append(f"| {rank} | {alpha:g} | {reg} | {nu} | {epochs} | {recall:.4f} | "
                     f"{ndcg:.4f} | {seconds:.3f} |")
        print(table[-1], flush=True)
    return table


if __name__ == "__main__":
    main()

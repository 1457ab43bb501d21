"""Accuracy and fit time of MatrixFactorization() with its default settings on MovieLens, next to
Surprise's SVD (defaults), SVD tuned (50 factors, 100 epochs, lr 0.01, reg 0.1) and SVD++
(defaults), all on the same folds and splits in the same run.

    PYTHONPATH=.:/work/peers/surprise OMP_WAIT_POLICY=PASSIVE .venv/bin/python \\
        benchmarks/bench_movielens.py [--ml100k ../shared/data/ml-100k/u.data] \\
        [--ml1m ../shared/data/ml-1m-half/ratings.dat] [--fold-seeds 3,4,5] \\
        [--split-seeds 1,2,3] [--no-svdpp] [--out F]

(2 threads; OMP_WAIT_POLICY=PASSIVE keeps OpenMP from spin-waiting on a shared machine.)

Protocols: MovieLens-100K, 5-fold cross-validation for each fold seed; the ML-1M half, a random
90/10 split of the ratings for each split seed. Surprise is not a dependency: install it into a
folder of its own (`pip install --target /work/peers/surprise scikit-surprise`) and put that
folder on PYTHONPATH; without it only the mf_ext rows are printed.

Leakage: every split is drawn first, from the row positions alone; each model's fit() receives
the training Ratings only (mf_ext's adaptive defaults and the SVD++ term's N(u) are computed
inside fit() from them), and the test Ratings reach nothing but predict()/test() afterwards.
`check_disjoint` asserts that the two index sets of each split are disjoint and cover the data.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line  # noqa: E402

import mf_ext  # noqa: E402
from mf_ext.data import Ratings, kfold, load_ratings, train_test_split  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
ML100K = os.path.join(DATA, "ml-100k", "u.data")
ML1M_HALF = os.path.join(DATA, "ml-1m-half", "ratings.dat")

Split = Tuple[Ratings, Ratings]
# (method name, fit-and-predict function(train, test) -> (test predictions, fit seconds))
Method = Tuple[str, Callable[[Ratings, Ratings], Tuple[np.ndarray, float]]]


def check_disjoint(train_index: np.ndarray, test_index: np.ndarray, n: int) -> None:
    """No test position is a training position, and together they are all n ratings."""
    assert len(np.intersect1d(train_index, test_index)) == 0
    assert len(train_index) + len(test_index) == n


def kfold_splits(data: Ratings, seed: int, folds: int = 5) -> List[Split]:
    out = []
    for train, test in kfold(len(data), folds, seed=seed):
        check_disjoint(train, test, len(data))
        out.append((data.subset(train), data.subset(test)))
    return out


def random_split(data: Ratings, seed: int, test_fraction: float = 0.1) -> Split:
    order = np.random.default_rng(seed).permutation(len(data))
    n_test = int(round(len(data) * test_fraction))
    train, test = np.sort(order[n_test:]), np.sort(order[:n_test])
    check_disjoint(train, test, len(data))
    assert (train_test_split(data, test_fraction, seed)[1].ratings == data.ratings[test]).all()
    return data.subset(train), data.subset(test)


def mf_ext_defaults(train: Ratings, test: Ratings) -> Tuple[np.ndarray, float]:
    start = time.perf_counter()
    model = mf_ext.MatrixFactorization().fit(train)
    seconds = time.perf_counter() - start
    return model.predict(test.users, test.items), seconds


def surprise_method(make: Callable[[], object]) -> Callable[[Ratings, Ratings],
                                                             Tuple[np.ndarray, float]]:
    import pandas as pd
    import surprise

    def run(train: Ratings, test: Ratings) -> Tuple[np.ndarray, float]:
        frame = pd.DataFrame({"u": train.users, "i": train.items, "r": train.ratings})
        scale = (float(train.ratings.min()), float(train.ratings.max()))
        trainset = surprise.Dataset.load_from_df(frame, surprise.Reader(rating_scale=scale)
                                                 ).build_full_trainset()
        algo = make()
        start = time.perf_counter()
        algo.fit(trainset)
        seconds = time.perf_counter() - start
        predictions = algo.test(list(zip(test.users, test.items, test.ratings)))
        return np.array([p.est for p in predictions]), seconds
    return run


def methods(svdpp: bool) -> List[Method]:
    out: List[Method] = [("mf_ext MatrixFactorization() (defaults)", mf_ext_defaults)]
    try:
        import surprise
    except ImportError:
        return out
    out.append(("Surprise SVD() (defaults)", surprise_method(lambda: surprise.SVD(random_state=0))))
    out.append(("Surprise SVD(50 factors, 100 epochs, lr 0.01, reg 0.1) (tuned)",
                surprise_method(lambda: surprise.SVD(n_factors=50, n_epochs=100, lr_all=0.01,
                                                     reg_all=0.1, random_state=0))))
    if svdpp:
        out.append(("Surprise SVDpp() (defaults)",
                    surprise_method(lambda: surprise.SVDpp(random_state=0))))
    return out


def run(splits: Dict[str, List[Split]], svdpp_runs: int, log) -> Dict[str, Dict[str, list]]:
    """{method: {split group: [(rmse, mae, fit s), ...]}}; SVD++ only on the first svdpp_runs
    splits of the first group (it is slow: about 2.5 min a fit on the ML-1M half)."""
    results: Dict[str, Dict[str, list]] = {}
    for name, fit_predict in methods(svdpp_runs > 0):
        results[name] = {}
        for k, (group, group_splits) in enumerate(splits.items()):
            if name.startswith("Surprise SVDpp"):
                group_splits = group_splits[:svdpp_runs] if k == 0 else []
            rows = []
            for train, test in group_splits:
                pred, seconds = fit_predict(train, test)
                error = pred - test.ratings
                rows.append((float(np.sqrt(np.mean(error ** 2))), float(np.mean(np.abs(error))),
                             seconds))
                log(f"  {name} | {group}: RMSE {rows[-1][0]:.4f}, fit {seconds:.2f} s")
            results[name][group] = rows
    return results


def table(results: Dict[str, Dict[str, list]], group: str, per: str) -> List[str]:
    lines = [f"| method | mean RMSE | mean MAE | RMSE per {per} | fit s per {per} "
             "(median / max) | runs |", "|---|---|---|---|---|---|"]
    for name, groups in results.items():
        rows = groups.get(group, [])
        if not rows:
            continue
        rmse, mae, secs = (np.array([r[k] for r in rows]) for k in range(3))
        lines.append(f"| {name} | {rmse.mean():.4f} | {mae.mean():.4f} | "
                     f"{' '.join(f'{x:.4f}' for x in rmse)} | {np.median(secs):.2f} / "
                     f"{secs.max():.2f} | {len(rows)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ml100k", default=ML100K)
    parser.add_argument("--ml1m", default=ML1M_HALF, help="the ML-1M half (or '' to skip)")
    # Not the seeds the defaults were tuned on (ML-100K fold seeds 1 and 2, ML-1M split seed 0)
    parser.add_argument("--fold-seeds", default="3,4,5")
    parser.add_argument("--split-seeds", default="1,2,3")
    parser.add_argument("--no-svdpp", action="store_true",
                        help="skip SVD++ (else: the 5 folds of the first fold seed, the first "
                             "90/10 split)")
    parser.add_argument("--out")
    args = parser.parse_args()
    fold_seeds = [int(s) for s in args.fold_seeds.split(",") if s]
    split_seeds = [int(s) for s in args.split_seeds.split(",") if s]

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    lines = [f"Machine: {machine_line()}", ""]
    if args.ml100k:
        data = load_ratings(args.ml100k)
        splits = {f"fold seed {s}": kfold_splits(data, s) for s in fold_seeds}
        mf_ext.MatrixFactorization(epochs=2).fit(next(iter(splits.values()))[0][0])  # warm-up
        log(f"MovieLens-100K: {len(data)} ratings")
        results = run(splits, 0 if args.no_svdpp else 5, log)
        for group in splits:
            lines += [f"MovieLens-100K ({len(data)} ratings), 5-fold CV, {group}; fit seconds "
                      "per fold.", ""] + table(results, group, "fold") + [""]
    if args.ml1m:
        data = load_ratings(args.ml1m)
        splits = {"90/10 splits": [random_split(data, s) for s in split_seeds]}
        log(f"ML-1M half: {len(data)} ratings")
        results = run(splits, 0 if args.no_svdpp else 1, log)
        lines += [f"ML-1M half ({len(data)} ratings), random 90/10 split for each of the seeds "
                  f"{split_seeds} (SVD++: the first); fit seconds per split.",
                  ""] + table(results, "90/10 splits", "split") + [""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()

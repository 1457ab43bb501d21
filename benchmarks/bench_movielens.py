"""Accuracy and fit time of MatrixFactorization with default settings on MovieLens-100K,
5-fold cross-validation; Surprise's SVD on the same folds when it is installed.

    ./dev python benchmarks/bench_movielens.py [--data ../shared/data/ml-100k/u.data] [--out F]
(`pip install scikit-surprise` in the venv adds the Surprise rows; it is not a dependency.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line  # noqa: E402

import mf_ext  # noqa: E402
from mf_ext.data import kfold, load_ratings  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ml-100k",
                            "u.data")


def run_mf_ext(data, folds):
    rows = []
    for train, test in folds:
        start = time.perf_counter()
        model = mf_ext.MatrixFactorization().fit(data.subset(train))
        seconds = time.perf_counter() - start
        rows.append((model.evaluate(data.subset(test)), seconds))
    return rows


def run_surprise(data, folds):
    try:
        import surprise
    except ImportError:
        return None
    import pandas as pd

    frame = pd.DataFrame({"u": data.users, "i": data.items, "r": data.ratings})
    reader = surprise.Reader(rating_scale=(1, 5))
    rows = []
    for train, test in folds:
        trainset = surprise.Dataset.load_from_df(frame.iloc[train], reader).build_full_trainset()
        algo = surprise.SVD(random_state=0)
        start = time.perf_counter()
        algo.fit(trainset)
        seconds = time.perf_counter() - start
        testset = list(frame.iloc[test].itertuples(index=False, name=None))
        predictions = algo.test(testset)
        err = np.array([p.est - p.r_ui for p in predictions])
        rows.append(({"rmse": float(np.sqrt(np.mean(err ** 2))),
                      "mae": float(np.mean(np.abs(err)))}, seconds))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()

    data = load_ratings(args.data)
    folds = list(kfold(len(data), args.folds, seed=args.seed))
    mf_ext.MatrixFactorization(epochs=2).fit(data.subset(folds[0][0]))  # warm-up (lazy init)
    results = {"mf_ext MatrixFactorization() (defaults)": run_mf_ext(data, folds)}
    surprise_rows = run_surprise(data, folds)
    if surprise_rows is not None:
        results["Surprise SVD() (defaults)"] = surprise_rows
    lines = [f"Machine: {machine_line()}", "",
             f"MovieLens-100K ({len(data)} ratings), {args.folds}-fold CV (seed {args.seed}), "
             "same folds for every method; fit time per fold in seconds.", "",
             "| method | mean RMSE | mean MAE | RMSE per fold | fit s per fold (mean / max) |",
             "|---|---|---|---|---|"]
    for name, rows in results.items():
        rmse = [r["rmse"] for r, _ in rows]
        mae = [r["mae"] for r, _ in rows]
        secs = [s for _, s in rows]
        lines.append(f"| {name} | {np.mean(rmse):.4f} | {np.mean(mae):.4f} | "
                     f"{' '.join(f'{x:.4f}' for x in rmse)} | {np.mean(secs):.2f} / "
                     f"{np.max(secs):.2f} |")
    if surprise_rows is None:
        lines.append("")
        lines.append("(Surprise is not installed: `pip install scikit-surprise` to compare.)")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""`mf-ext fit RATINGS`: train a MatrixFactorization on a ratings file, report test RMSE/MAE,
save the model and the learning curve."""

from __future__ import annotations

import argparse
import time

from mf_ext.commands.errors import CliError
from mf_ext.commands.options import (add_config_options, check_device, config_settings,
                                     fraction, positive_int)
from mf_ext.commands.torchrun import launch
from mf_ext import distributed
from mf_ext.data import FORMATS, load_ratings, train_test_split
from mf_ext.model import MatrixFactorization, MatrixFactorizationConfig
from mf_ext.progress import write_line

HELP = "train a matrix-factorization recommender on a ratings file (u.data, ratings.dat, csv)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ratings", help="ratings file: user item rating [timestamp] lines")
    parser.add_argument("--format", choices=FORMATS, help="default: from the file name")
    add_config_options(parser, MatrixFactorizationConfig, "model (MatrixFactorization settings)")
    parser.add_argument("--test-fraction", type=fraction, default=0.2,
                        help="share of ratings held out for the final test (default 0.2)")
    parser.add_argument("--out", metavar="MODEL", help="where to save the model")
    parser.add_argument("--plot", metavar="PNG", help="where to draw the learning curve")
    parser.add_argument("--log-every", type=positive_int, default=10,
                        help="print the RMSEs every this many epochs (default 10)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    # Under torchrun (RANK, WORLD_SIZE set): every rank reads the file, splits it identically
    # and trains data-parallel on its shard of the training ratings; rank 0 alone prints,
    # tests and writes (docs/distributed.md). With --shard-factors each rank holds a block of
    # the model's rows: the ranks test and write together.
    return launch(_run, args, check_device(args.device), "fit", args.shard_factors)


def _run(args: argparse.Namespace, device, rank: int = 0, world_size: int = 1) -> int:
    main = rank == 0
    try:
        data = load_ratings(args.ratings, args.format)
        train, test = train_test_split(data, args.test_fraction, seed=args.seed)
        settings = config_settings(MatrixFactorizationConfig, args)
        model = MatrixFactorization(**dict(settings, device=str(device)))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if main:
        where = f" ({world_size} processes)" if world_size > 1 else ""
        print(f"{args.ratings}: {len(data)} ratings, {len(set(data.users.tolist()))} users, "
              f"{len(set(data.items.tolist()))} items; training on {len(train)}{where}, "
              f"testing on {len(test)}", flush=True)

    def log(record) -> None:
        if main and (record.epoch % args.log_every == 0 or record.epoch == 1):
            val = "-" if record.val_rmse is None else f"{record.val_rmse:.4f}"
            write_line(f"epoch {record.epoch:4d}  train RMSE {record.train_rmse:.4f}  "
                   f"validation RMSE {val}")

    start = time.perf_counter()
    try:
        model.fit(distributed.shard_ratings(train, rank, world_size),
                  progress=main and not args.no_progress, callback=log)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    seconds = time.perf_counter() - start
    sharded = model.shard is not None  # then evaluate and save are collectives
    if not (main or sharded):
        return 0
    note = " (interrupted: kept the best model so far)" if model.interrupted else ""
    if main:
        print(f"trained {len(model.history)} epochs in {seconds:.2f} s, best epoch "
              f"{model.best_epoch}{note}")
    if len(test):
        scores = model.evaluate(distributed.shard_ratings(test, rank, world_size) if sharded
                                else test)
        if main:
            print(f"test RMSE {scores['rmse']:.4f}  MAE {scores['mae']:.4f}")
    if args.out:
        model.save(args.out)
        if main:
            print(f"model: {args.out}" + (f" (a manifest of {world_size} shard files)"
                                          if sharded else ""))
    if not main:
        return 0
    if args.plot:
        from mf_ext.plot import save_learning_curve

        save_learning_curve([h.train_rmse for h in model.history],
                            [h.val_rmse for h in model.history], args.plot)
        print(f"learning curve: {args.plot}")
    return 0


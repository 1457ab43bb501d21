"""`mf-ext fit-implicit FILE`: train an ImplicitMatrixFactorization on interactions (user item
weight lines), report ranking metrics on a per-user hold-out, save the model; with
--shard-factors under torchrun, across processes that each hold a block of the model's rows."""

from __future__ import annotations

import argparse
import time

import numpy as np

from mf_ext.commands.errors import CliError
from mf_ext.commands.options import (add_config_options, check_device, config_settings,
                                     option_type, positive_int)
from mf_ext.checks import Number
from mf_ext.commands.torchrun import launch
from mf_ext.data import FORMATS, Ratings, load_ratings
from mf_ext.distributed import shard_ratings
from mf_ext.implicit_model import ImplicitMatrixFactorization, ImplicitMatrixFactorizationConfig
from mf_ext.metrics import evaluate_ranking, leave_out_split
from mf_ext.progress import write_line

HELP = "train an implicit-feedback recommender (views, plays, counts) and report recall/NDCG"

_TEST_FRACTION = option_type(Number("a number in [0, 1)", lambda x: 0 <= x < 1), "fraction")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ratings", help="interactions file: user item weight [timestamp] lines "
                                        "(u.data, ratings.dat, csv, tsv)")
    parser.add_argument("--format", choices=FORMATS, help="default: from the file name")
    parser.add_argument("--min-rating", type=float, metavar="R",
                        help="treat the third column as a rating: pairs rated >= R are the "
                             "interactions, each of weight 1 (default: the column is the weight)")
    add_config_options(parser, ImplicitMatrixFactorizationConfig,
                       "model (ImplicitMatrixFactorization settings)")
    parser.add_argument("--test-fraction", type=_TEST_FRACTION, default=0.2,
                        help="share of each user's interactions held out to evaluate on "
                             "(default 0.2; 0: no evaluation)")
    parser.add_argument("-k", type=positive_int, default=20,
                        help="the k of recall@k, NDCG@k, precision@k, MAP@k (default 20)")
    parser.add_argument("--out", metavar="MODEL", help="where to save the model")
    parser.add_argument("--log-every", type=positive_int, default=5,
                        help="print the training loss every this many epochs (default 5)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    device = check_device(args.device)
    if not args.shard_factors:
        return _run(args, device)
    # --shard-factors, under torchrun: every rank reads the file, makes the same split and
    # passes its shard of the training interactions; each holds a block of the model's rows
    # (docs/distributed.md). Rank 0 alone prints; the ranks save together, and rank 0
    # evaluates the saved (whole) model.
    return launch(_run, args, device, "fit-implicit", True)


def _run(args: argparse.Namespace, device, rank: int = 0, world_size: int = 1) -> int:
    main, sharded = rank == 0, args.shard_factors
    try:
        data = load_ratings(args.ratings, args.format)
        if args.min_rating is not None:
            keep = data.ratings >= args.min_rating
            data = Ratings(data.users[keep], data.items[keep], np.ones(int(keep.sum())))
        if len(data) == 0:
            raise ValueError(f"{args.ratings}: no rating >= {args.min_rating}")
        train, test = leave_out_split(data, args.test_fraction, seed=args.seed) \
            if args.test_fraction > 0 else (data, None)
        settings = config_settings(ImplicitMatrixFactorizationConfig, args)
        model = ImplicitMatrixFactorization(**dict(settings, device=str(device)))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if main:
        where = f" ({world_size} processes, sharded factors)" if sharded else ""
        print(f"{args.ratings}: {len(data)} interactions, {len(np.unique(data.users))} users, "
              f"{len(np.unique(data.items))} items; training on {len(train)}{where}, testing "
              f"on {0 if test is None else len(test)}", flush=True)

    def log(record) -> None:
        if main and (record.epoch % args.log_every == 0 or record.epoch == 1):
            write_line(f"epoch {record.epoch:4d}  loss {model.losses[record.epoch - 1]:.6g}")

    start = time.perf_counter()
    share = shard_ratings(train, rank, world_size) if sharded else train
    try:
        model.fit(share.users, share.items, share.ratings,
                  progress=main and not args.no_progress, callback=log)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    note = " (interrupted: kept the model so far)" if model.interrupted else ""
    if main:
        print(f"trained {len(model.history)} epochs in {time.perf_counter() - start:.2f} s{note}")
    if sharded:  # the ranks save together; the metrics need every row: the saved model's
        if args.out:
            model.save(args.out)
        if not main:
            return 0
        if test is not None and len(test):
            if args.out:
                _report(ImplicitMatrixFactorization.load(args.out, str(device)), test, args.k)
            else:
                print("no evaluation: a sharded model is evaluated from its saved file (pass "
                      "--out)")
        if args.out:
            print(f"model: {args.out} (a manifest of {world_size} shard files)")
        return 0
    if test is not None and len(test):
        _report(model, test, args.k)
    if args.out:
        model.save(args.out)
        print(f"model: {args.out}")
    return 0


def _report(model: ImplicitMatrixFactorization, test: Ratings, k: int) -> None:
    """Prints the ranking metrics of `model` on `test`."""
    k = min(k, len(model.item_map))
    try:
        scores = evaluate_ranking(model, test, k=k)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print("  ".join(f"{name} {value:.4f}" for name, value in scores.items()
                    if name not in ("users", "auc_users")) + f"  ({scores['users']} users)")

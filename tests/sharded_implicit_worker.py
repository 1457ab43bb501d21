"""One rank of the sharded implicit-model tests (tests/test_sharded_implicit.py starts 3 at once):

    python tests/sharded_implicit_worker.py RENDEZVOUS_PREFIX RANK OUT_DIR

As tests/sharded_worker.py: every scenario in turn in a gloo group of 3 ranks, then ranks 0 and
1 in a group of 2, ending with a rank that raises. Results go to OUT_DIR/rank{RANK}.pt, the
first unexpected error to OUT_DIR/rank{RANK}.err.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sharded_worker import cli_ratings, main, run_under_torchrun, uneven  # noqa: E402

# name -> model settings; the test fits each single-process on all of interactions()
CASES = {
    "adam": dict(rank=4, solver="adam", epochs=12, lr=0.05, reg=0.03, seed=3,
                 dtype=torch.float64),
    "als": dict(rank=4, solver="als", epochs=4, cg_steps=3, alpha=2.0, scaling="log", reg=0.1,
                reg_exponent=0.5, seed=3, dtype=torch.float64),
}
FLOAT32 = dict(CASES["als"], dtype=torch.float32)
FAILING_EPOCH = 3
INTERRUPT_AT = 2


def interrupt(record):
    if record.epoch == INTERRUPT_AT:
        raise KeyboardInterrupt


def interactions(m=50, n=40, count=700, seed=0):
    """(users, items, weights) as a Ratings: string user ids, integer item ids, and many pairs
    given more than once (fit merges them, also across ranks)."""
    from mf_ext import Ratings

    rng = np.random.default_rng(seed)
    users = np.array([f"u{k}" for k in rng.integers(0, m, count)])
    return Ratings(users, rng.integers(0, n, count) + 100, rng.integers(1, 5, count) * 1.0)


def tiny():
    """2 users, 2 items: with 3 ranks, rank 2 holds no row and no interaction."""
    from mf_ext import Ratings

    return Ratings(np.array(["a", "a", "b"]), np.array([7, 8, 7]), np.array([1.0, 2.0, 3.0]))


def fit(settings, share, **kwargs):
    from mf_ext import ImplicitMatrixFactorization

    return ImplicitMatrixFactorization(shard_factors=True, **settings).fit(
        share.users, share.items, share.ratings, **kwargs)


def state(model) -> dict:
    return {"P": model.P, "Q": model.Q, "losses": list(model.losses), "shard": model.shard,
            "interrupted": model.interrupted}


def scenarios_of_three(rank: int, world: int, out_dir: str) -> dict:
    from mf_ext.distributed import shard_ratings

    out, data = {}, interactions()
    for name, settings in CASES.items():
        model = fit(settings, shard_ratings(data, rank, world))
        out[name] = state(model)
        model.save(os.path.join(out_dir, f"{name}.pt"))
        # rank 0 passes 70 % of the interactions, rank 2 none
        out[f"{name}-uneven"] = state(fit(settings, uneven(data, rank, world)))
        out[f"{name}-tiny"] = state(fit(dict(settings, rank=2), uneven(tiny(), rank, world)))
    out["float32"] = state(fit(FLOAT32, shard_ratings(data, rank, world)))
    # Ctrl-C on every rank (as torchrun passes it on) in the same epoch: the model so far
    interrupted = fit(CASES["als"], shard_ratings(data, rank, world), callback=interrupt)
    out["interrupted"] = state(interrupted)
    interrupted.save(os.path.join(out_dir, "interrupted.pt"))
    try:  # every rank passes nothing
        fit(CASES["adam"], data.subset(np.arange(0)))
        out["empty"] = None
    except ValueError as exc:
        out["empty"] = str(exc)
    return out


CLI_OPTIONS = ["--epochs", "3", "--rank", "4", "-k", "5", "--no-progress"]


def cli(rank: int, world: int, out_dir: str) -> str:
    path = os.path.join(out_dir, f"cli-{rank}.data")  # the same file on every rank
    cli_ratings(path)
    return run_under_torchrun(rank, world, out_dir, [
        "fit-implicit", path, "--shard-factors", *CLI_OPTIONS,
        "--out", os.path.join(out_dir, "cli.pt")])


def scenarios_of_two(rank: int, world: int, out_dir: str) -> dict:
    from mf_ext import ImplicitMatrixFactorization
    from mf_ext.distributed import shard_ratings

    data = interactions()
    out = {name: state(fit(settings, shard_ratings(data, rank, world)))
           for name, settings in CASES.items()}

    def fail(record):
        if rank == 1 and record.epoch == FAILING_EPOCH:
            raise ValueError("rank 1 fails on purpose")

    start = time.perf_counter()
    share = shard_ratings(data, rank, world)
    try:
        ImplicitMatrixFactorization(shard_factors=True, **CASES["als"]).fit(
            share.users, share.items, share.ratings, callback=fail)
        out["failure"] = None
    except Exception as exc:  # the test reads what each rank raised, and when
        out["failure"] = f"{type(exc).__name__}: {exc}"
    out["failure_seconds"] = time.perf_counter() - start
    return out


if __name__ == "__main__":
    sys.exit(main(scenarios_of_three, cli, scenarios_of_two))

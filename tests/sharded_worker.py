"""One rank of the sharded-factors tests (tests/test_sharded.py starts 3 of them at once):

    python tests/sharded_worker.py RENDEZVOUS_PREFIX RANK OUT_DIR

Each process starts torch once and runs every scenario in turn: first in a gloo group of 3
ranks, then ranks 0 and 1 in a new group of 2 (rank 2 leaves), ending with a rank that raises.
Results go to OUT_DIR/rank{RANK}.pt (a dict per scenario), and the first unexpected error to
OUT_DIR/rank{RANK}.err.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distributed_worker import JOIN_TIMEOUT_S, PARITY_CASES, synthetic  # noqa: E402

GROUP_TIMEOUT_S = 5
FLOAT64 = PARITY_CASES["float64"][0]
EARLY_STOPPING = PARITY_CASES["early_stopping"]
INTERRUPT_AT = 7
MINIBATCH = dict(rank=4, epochs=8, lr=0.05, reg=0.01, batch_size=200, seed=0,
                 dtype=torch.float64)  # 5 steps an epoch: each step is 5 collectives
TINY = dict(rank=2, epochs=15, lr=0.05, reg=0.05, seed=2, dtype=torch.float64)
FAILING_EPOCH = 3


def tiny_ratings():
    """2 users and 2 items: with 3 ranks, rank 2 holds no user, no item and no rating."""
    from mf_ext import Ratings

    return Ratings(np.array(["a", "a", "b", "b", "a"]), np.array([7, 8, 7, 8, 7]),
                   np.array([4.0, 2.0, 5.0, 1.0, 3.5]))


def uneven(data, rank: int, world: int):
    """An uneven split of `data`: rank 0 gets 70 %, the last rank nothing, the others the rest."""
    cuts = [0, int(0.7 * len(data))] + [len(data)] * (world - 1)
    return data.subset(np.arange(cuts[rank], cuts[rank + 1]))


def by_owner(data, rank: int, world: int):
    """The ratings of the users rank `rank` owns in a sharded fit of `data` (no hold-out), in
    their order in `data`: the fit moves none of them."""
    from mf_ext.shard_blocks import balanced_blocks

    _, user, counts = np.unique(data.users, return_inverse=True, return_counts=True)
    starts = balanced_blocks(counts, world)
    return data.subset(np.flatnonzero((user >= starts[rank]) & (user < starts[rank + 1])))


def state(model) -> dict:
    """The rows a rank holds, and what the tests compare."""
    return {"P": model.P, "Q": model.Q, "user_bias": model.user_bias,
            "item_bias": model.item_bias, "Y": model.Y, "global_mean": model.global_mean,
            "shard": model.shard, "interrupted": model.interrupted,
            "history": [(h.train_rmse, h.val_rmse) for h in model.history],
            "best_epoch": model.best_epoch}


def fit(settings, data, **kwargs):
    from mf_ext import MatrixFactorization

    return MatrixFactorization(shard_factors=True, **settings).fit(data, **kwargs)


def scenarios_of_three(rank: int, world: int, out_dir: str) -> dict:
    from mf_ext import MatrixFactorization, Ratings
    from mf_ext.distributed import shard_ratings
    from mf_ext.sharded import ShardedFactors

    out = {}
    data = Ratings(*synthetic())
    model = fit(FLOAT64, shard_ratings(data, rank, world))  # with the SVD++ term (the default)
    out["float64"] = state(model)
    out["explicit"] = state(fit(dict(FLOAT64, implicit=False), shard_ratings(data, rank, world)))
    # evaluate, a collective, on any split of other ratings (with unknown users and items)
    test = Ratings(*synthetic(m=70, n=45, seed=5))
    out["evaluate"] = model.evaluate(uneven(test, rank, world))
    model.save(os.path.join(out_dir, "float64.pt"))
    out["early_stopping"] = state(fit(EARLY_STOPPING[0],
                                      shard_ratings(Ratings(*synthetic(**EARLY_STOPPING[1])),
                                                    rank, world)))

    def interrupt(record):
        if record.epoch == INTERRUPT_AT:
            raise KeyboardInterrupt

    interrupted = fit(EARLY_STOPPING[0], shard_ratings(Ratings(*synthetic(**EARLY_STOPPING[1])),
                                                       rank, world), callback=interrupt)
    out["interrupted"] = state(interrupted)
    interrupted.save(os.path.join(out_dir, "interrupted.pt"))
    out["uneven"] = state(fit(FLOAT64, uneven(data, rank, world)))
    out["tiny"] = state(fit(TINY, uneven(tiny_ratings(), rank, world)))
    out["minibatch"] = state(fit(dict(MINIBATCH, implicit=False),
                                 shard_ratings(data, rank, world)))
    # each rank given its own users' ratings: the sharded fit draws the data-parallel batches
    owned = by_owner(data, rank, world)
    out["minibatch_owned"] = (state(fit(MINIBATCH, owned)),
                              state(MatrixFactorization(**MINIBATCH).fit(owned)))
    out["float32"] = state(fit(dict(FLOAT64, dtype=torch.float32), shard_ratings(data, rank,
                                                                                world)))
    # the send/recv transport against all_to_all_single, on rows of uneven counts
    group = ShardedFactors(torch.device("cpu"))
    group._set_layout([0, 3, 6, 10], [0, 3, 6, 10])
    counts = [[0, 3, 1], [2, 0, 4], [5, 1, 0]]
    send = torch.arange(sum(counts[rank]) * 3, dtype=torch.float64).reshape(-1, 3) + 100 * rank
    receive = [counts[k][rank] for k in range(world)]
    got = group._all_to_all(send, counts[rank], receive, "test")
    group.transport = "send_recv"
    out["transport"] = (got, group._all_to_all(send, counts[rank], receive, "test"))
    return out


def cli_ratings(path: str) -> None:
    rng = np.random.default_rng(0)
    lines = [f"{u}\t{i}\t{rng.integers(1, 6)}\t0" for u in range(1, 41)
             for i in rng.choice(np.arange(1, 31), size=12, replace=False)]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def cli_under_torchrun(rank: int, world: int, out_dir: str) -> str:
    """`mf-ext fit --shard-factors` as torchrun would start it on each rank; returns what it
    printed."""
    ratings = os.path.join(out_dir, f"cli-ratings-{rank}.data")  # the same file on every rank
    cli_ratings(ratings)
    # --reg 0.12: the setting this comparison's float32 tolerance was set at
    return run_under_torchrun(rank, world, out_dir, [
        "fit", ratings, "--shard-factors", "--epochs", "4", "--rank", "4", "--reg", "0.12",
        "--no-progress", "--out", os.path.join(out_dir, "cli.pt")])


def run_under_torchrun(rank: int, world: int, out_dir: str, argv: list) -> str:
    """The command line `argv` as torchrun would start it on each rank (the rendezvous from
    RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT); returns "exit STATUS\n" and what it
    printed."""
    import contextlib
    import io
    import socket

    from mf_ext.cli import main as cli

    port_file = os.path.join(out_dir, "cli-port")
    if rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with open(port_file + ".tmp", "w") as f:
            f.write(str(port))
        os.replace(port_file + ".tmp", port_file)
    deadline = time.monotonic() + 60
    while not os.path.exists(port_file) and time.monotonic() < deadline:
        time.sleep(0.05)
    with open(port_file) as f:
        port = f.read()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = cli(argv)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        del os.environ[name]
    return f"exit {status}\n{printed.getvalue()}"


def scenarios_of_two(rank: int, world: int, out_dir: str) -> dict:
    from mf_ext import Ratings
    from mf_ext.distributed import shard_ratings

    out = {"float64": state(fit(FLOAT64, shard_ratings(Ratings(*synthetic()), rank, world))),
           "early_stopping": state(fit(EARLY_STOPPING[0], shard_ratings(
               Ratings(*synthetic(**EARLY_STOPPING[1])), rank, world)))}

    def fail(record):
        if rank == 1 and record.epoch == FAILING_EPOCH:
            raise ValueError("rank 1 fails on purpose")

    start = time.perf_counter()
    try:
        fit(FLOAT64, shard_ratings(Ratings(*synthetic()), rank, world), callback=fail)
        out["failure"] = None
    except Exception as exc:  # the test reads what each rank raised, and when
        out["failure"] = f"{type(exc).__name__}: {exc}"
    out["failure_seconds"] = time.perf_counter() - start
    return out


def join(prefix: str, rank: int, world: int) -> None:
    """Joins with the long rendezvous timeout (start-up skew under load), then sets the short
    one the failure scenarios are timed against."""
    dist.init_process_group("gloo", init_method=f"file://{prefix}-{world}", rank=rank,
                            world_size=world,
                            timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S))
    dist.set_timeout(datetime.timedelta(seconds=GROUP_TIMEOUT_S))


def launch(worker: str, out_dir, timeout_s: float) -> dict:
    """Runs 3 processes of `worker` (a script whose main is this file's, with its own
    scenarios) under a hard timeout; returns {world size: [each rank's results]}."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, worker, os.path.join(out_dir, "rendezvous"),
                               str(rank), str(out_dir)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(3)]
    start, logs = time.perf_counter(), []
    try:
        for p in procs:
            remaining = max(1.0, timeout_s - (time.perf_counter() - start))
            logs.append(p.communicate(timeout=remaining)[0])  # TimeoutExpired fails the tests
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    errors = []
    for path in (os.path.join(out_dir, f"rank{k}.err") for k in range(3)):
        if os.path.exists(path):
            with open(path) as f:
                errors.append(f.read())
    assert not errors and [p.returncode for p in procs] == [0, 0, 0], (errors, logs)
    results = [torch.load(os.path.join(out_dir, f"rank{k}.pt"), weights_only=False)
               for k in range(3)]
    return {3: [r[3] for r in results], 2: [r[2] for r in results[:2]]}


def main(three=scenarios_of_three, cli=cli_under_torchrun, two=scenarios_of_two) -> int:
    """One rank (the command line of the module docstring) of `three` in a group of 3, `cli`
    (which makes its own group), then ranks 0 and 1 of `two` in a group of 2."""
    prefix, rank, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    results = {}
    try:
        join(prefix, rank, 3)
        results[3] = three(rank, 3, out_dir)
        dist.destroy_process_group()
        results[3]["cli"] = cli(rank, 3, out_dir)  # it makes its own group
        if rank < 2:
            join(prefix, rank, 2)
            results[2] = two(rank, 2, out_dir)
    except Exception as exc:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")
        os._exit(1)  # no destroy_process_group: the group may be broken
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    os._exit(0)  # rank 1 leaves at once after failing (rank 0 must notice); the group is broken


if __name__ == "__main__":
    sys.exit(main())

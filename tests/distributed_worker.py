"""One rank of the distributed tests (tests/test_distributed.py starts it as a subprocess):

    python tests/distributed_worker.py SCENARIO RENDEZVOUS_FILE RANK WORLD_SIZE OUT_DIR

Joins a gloo group through a file:// rendezvous, runs SCENARIO, and writes what it got to
OUT_DIR/rank{RANK}.pt, or the error it raised to OUT_DIR/rank{RANK}.err and the seconds from the
group's start to that error to OUT_DIR/rank{RANK}.seconds.
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

from helpers import synthetic_ratings as synthetic  # (tests/ is sys.path[0] for the script)

GROUP_TIMEOUT_S = 5  # the collectives' timeout in the failure scenarios (the stall waits it out)
JOIN_TIMEOUT_S = 120  # the rendezvous's and the parity scenario's: start-up skew under load


# name -> (model settings, data settings); the test fits the same single-process.
PARITY_CASES = {
    "float64": (dict(rank=4, epochs=40, lr=0.05, reg=0.05, bias_reg=0.02, seed=3,
                     dtype=torch.float64), {}),
    "float32": (dict(rank=4, epochs=40, lr=0.05, reg=0.05, seed=3, dtype=torch.float32), {}),
    "early_stopping": (dict(rank=16, epochs=400, lr=0.01, reg=0.02, validation_fraction=0.2,
                            patience=5, seed=1, dtype=torch.float64), dict(noise=0.8)),
}
# Few epochs at a larger step: every step is collectives, slow on a loaded machine (the RMSE
# still falls from 0.92 to about 0.25, test_minibatches_learn's bound is 0.74).
MINIBATCH = dict(rank=4, epochs=10, lr=0.03, reg=0.01, batch_size=64, seed=0,
                 dtype=torch.float64)


def state(model) -> dict:
    return {"P": model.P, "Q": model.Q, "user_bias": model.user_bias,
            "item_bias": model.item_bias, "global_mean": model.global_mean,
            "user_ids": model.user_map.ids, "item_ids": model.item_map.ids,
            "history": [(h.train_rmse, h.val_rmse) for h in model.history],
            "best_epoch": model.best_epoch, "rated": model._rated_indices.size}


def parity_states(rank: int, world: int) -> dict:
    from mf_ext import MatrixFactorization, Ratings
    from mf_ext.distributed import shard_ratings

    out = {}
    for name, (settings, data_settings) in PARITY_CASES.items():
        shard = shard_ratings(Ratings(*synthetic(**data_settings)), rank, world)
        out[name] = state(MatrixFactorization(**settings).fit(shard))
    shard = shard_ratings(Ratings(*synthetic()), rank, world)
    out["minibatch"] = state(MatrixFactorization(**MINIBATCH).fit(shard))
    return out


def parity(rank: int, world: int, rendezvous: str) -> dict:
    """{world size: parity_states}: in this group, then (from 3 ranks) again in a fresh group of
    ranks 0 and 1, so one launch covers both sizes (two fewer interpreter starts)."""
    out = {world: parity_states(rank, world)}
    if world > 2:
        dist.destroy_process_group()
        if rank >= 2:
            return out
        join(f"{rendezvous}-2", rank, 2)
        out[2] = parity_states(rank, 2)
    return out


def failure(rank: int, world: int, how: str) -> dict:
    from mf_ext import MatrixFactorization, Ratings
    from mf_ext.distributed import shard_ratings

    dist.set_timeout(datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    shard = shard_ratings(Ratings(*synthetic()), rank, world)
    if rank == 1:
        if how == "raise":  # bad data on one rank: it raises before the first collective
            shard.ratings[0] = np.nan
        else:  # "stall": alive but never joins the collectives (the test kills it)
            time.sleep(10 * GROUP_TIMEOUT_S)
            return {}
    MatrixFactorization(rank=4, epochs=5, seed=0).fit(shard)
    return {}


def join(rendezvous: str, rank: int, world: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S))


def main() -> int:
    scenario, rendezvous, rank, world, out_dir = sys.argv[1:6]
    rank, world = int(rank), int(world)
    torch.set_num_threads(1)
    import mf_ext  # noqa: F401 (imported before the clock starts: its import time varies with load)

    join(rendezvous, rank, world)
    start = time.perf_counter()
    try:
        if scenario == "parity":
            result = parity(rank, world, rendezvous)
        else:
            result = failure(rank, world, scenario.split("-", 1)[1])
    except Exception as exc:  # reported to the test through the file, and the exit status
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")
        with open(os.path.join(out_dir, f"rank{rank}.seconds"), "w") as f:
            f.write(f"{time.perf_counter() - start}\n")  # from the group's start to the error
        os._exit(1)  # no destroy_process_group: the group is broken
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

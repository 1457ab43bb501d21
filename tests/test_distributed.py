"""Data-parallel MatrixFactorization on the CPU with gloo: 2 and 3 ranks (subprocesses running
tests/distributed_worker.py, one launch for both sizes) against the single-process fit, a
failing rank, and the CLI under torchrun. Every subprocess runs under a hard timeout, so no
test can hang."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from distributed_worker import GROUP_TIMEOUT_S, MINIBATCH, PARITY_CASES
from helpers import synthetic_ratings as synthetic
from mf_ext import MatrixFactorization, Ratings
from mf_ext.distributed import shard_ratings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")
HARD_TIMEOUT_S = 240  # per launch; the parity launch fits both group sizes

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1")


def launch(scenario, world, tmp_path, only_rank_0=False):
    """Runs `world` workers; returns ([exit status], [result dict or None], [error or None],
    [output], [seconds from the group's start to the rank's error, or None]), the seconds timed
    by the worker (Python's and torch's start-up, slow under load, left out). only_rank_0: kill
    the others once rank 0 is done."""
    out = tmp_path / f"{scenario}-{world}"
    out.mkdir()
    rendezvous = tmp_path / f"rendezvous-{scenario}-{world}"  # a fresh file per group
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, WORKER, scenario, str(rendezvous), str(rank),
                               str(world), str(out)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    codes, logs = [], []
    try:
        for p in procs[:1] if only_rank_0 else procs:
            remaining = max(1.0, HARD_TIMEOUT_S - (time.perf_counter() - start))
            logs.append(p.communicate(timeout=remaining)[0])  # TimeoutExpired fails the test
            codes.append(p.returncode)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = [torch.load(out / f"rank{r}.pt", weights_only=False)
               if (out / f"rank{r}.pt").exists() else None for r in range(world)]
    errors, seconds = ([(out / f"rank{r}.{ext}").read_text()
                        if (out / f"rank{r}.{ext}").exists() else None for r in range(world)]
                       for ext in ("err", "seconds"))
    return codes, results, errors, logs, seconds


@pytest.fixture(scope="module")
def single():
    """The single-process fits of the parity cases."""
    return {name: MatrixFactorization(**settings).fit(Ratings(*synthetic(**data)))
            for name, (settings, data) in PARITY_CASES.items()}


@pytest.fixture(scope="module")
def parity_launch(tmp_path_factory):
    """One launch of 3 ranks: the parity cases in a group of 3, then in a group of ranks 0 and 1
    (distributed_worker.parity)."""
    codes, results, errors, logs, _ = launch("parity", 3, tmp_path_factory.mktemp("parity"))
    assert codes == [0] * 3, f"errors: {errors}\nlogs: {logs}"
    return results


@pytest.fixture(scope="module", params=[2, 3])
def ranks(request, parity_launch):
    """The parity results of each rank of a group of 2, then 3."""
    return [result[request.param] for result in parity_launch[:request.param]]


def relative_difference(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_float64_equals_the_single_process_fit(ranks, single):
    ref = single["float64"]
    for got in (result["float64"] for result in ranks):
        for name in ("P", "Q", "user_bias", "item_bias"):
            # ≤ 1e-9 relative on every factor: only the summation order differs
            assert relative_difference(got[name], getattr(ref, name)) <= 1e-9, name
        assert got["P"].shape == ref.P.shape and got["Q"].shape == ref.Q.shape
        assert got["global_mean"] == pytest.approx(ref.global_mean, rel=1e-14)
        assert list(got["user_ids"]) == list(ref.user_map.ids)
        assert list(got["item_ids"]) == list(ref.item_map.ids)
        assert got["rated"] == ref._rated_indices.size  # every rank knows every rated pair
        np.testing.assert_allclose([t for t, _ in got["history"]],
                                   [h.train_rmse for h in ref.history], rtol=1e-9)


def test_float32_within_float32_tolerance(ranks, single):
    ref = single["float32"]
    for got in (result["float32"] for result in ranks):
        for name in ("P", "Q", "user_bias", "item_bias"):
            assert got[name].dtype == torch.float32
            assert relative_difference(got[name], getattr(ref, name)) <= 1e-4, name


def test_all_ranks_end_with_the_same_model(ranks):
    for case in (*PARITY_CASES, "minibatch"):
        for got in ranks[1:]:
            for name in ("P", "Q", "user_bias", "item_bias"):
                assert torch.equal(got[case][name], ranks[0][case][name]), (case, name)


def test_early_stopping_agrees_with_the_single_process_fit(ranks, single):
    ref = single["early_stopping"]
    assert len(ref.history) < PARITY_CASES["early_stopping"][0]["epochs"]  # it does stop early
    for got in (result["early_stopping"] for result in ranks):
        # the same held-out ratings (the global permutation), the same stopping epoch
        assert len(got["history"]) == len(ref.history)
        assert got["best_epoch"] == ref.best_epoch
        np.testing.assert_allclose([v for _, v in got["history"]],
                                   [h.val_rmse for h in ref.history], rtol=1e-9)
        assert relative_difference(got["P"], ref.P) <= 1e-9


def test_minibatches_learn(ranks):
    users, items, ratings = synthetic()
    got = ranks[0]["minibatch"]
    assert got["P"].shape == (MINIBATCH["rank"], len(np.unique(users)))
    assert got["history"][-1][0] < 0.8 * got["history"][0][0]
    assert got["history"][-1][0] < np.std(ratings)


@pytest.mark.parametrize("how", ["raise", "stall"])
def test_a_failing_rank_fails_the_others_clearly(how, tmp_path):
    codes, _, errors, logs, seconds = launch(f"failure-{how}", 2, tmp_path,
                                             only_rank_0=how == "stall")
    assert codes[0] == 1, logs
    assert "rank 0 of 2: the input-size all-gather failed; another rank probably raised an " \
           "error or stopped" in errors[0], errors[0]
    waited = float(seconds[0])
    if how == "raise":  # the peer's exit is noticed at once, not waited out
        assert codes[1] == 1 and "NaN or Inf" in errors[1]
        assert waited < GROUP_TIMEOUT_S and "Timed out" not in errors[0], (waited, errors[0])
    else:  # the group's timeout
        assert "Timed out" in errors[0] or "timeout" in errors[0].lower()
        assert GROUP_TIMEOUT_S <= waited < GROUP_TIMEOUT_S + 25, waited


def test_shard_ratings_is_balanced_and_deterministic():
    data = Ratings(*synthetic())
    for world in (1, 2, 3, 7):
        shards = [shard_ratings(data, r, world) for r in range(world)]
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(data)
        np.testing.assert_array_equal(np.concatenate([s.ratings for s in shards]), data.ratings)
    with pytest.raises(ValueError, match="rank must be in \\[0, 2\\)"):
        shard_ratings(data, 2, 2)
    with pytest.raises(ValueError, match="world_size must be an integer >= 1"):
        shard_ratings(data, 0, 0)


@pytest.fixture
def group_of_one(tmp_path):
    """A one-rank gloo group in this process (torn down after the test)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_distributed_true_with_one_rank_equals_the_plain_fit(group_of_one):
    users, items, ratings = synthetic()
    settings = dict(rank=4, epochs=20, reg=0.05, validation_fraction=0.2, seed=0,
                    dtype=torch.float64)
    auto = MatrixFactorization(**settings).fit(users, items, ratings)  # one rank: plain fit
    forced = MatrixFactorization(**settings).fit(users, items, ratings, distributed=True)
    for name in ("P", "Q", "user_bias", "item_bias"):
        assert relative_difference(getattr(forced, name), getattr(auto, name)) <= 1e-12, name
    assert [h.val_rmse for h in forced.history] == pytest.approx(
        [h.val_rmse for h in auto.history], rel=1e-12)


def test_minibatch_steps_are_equal_across_ranks_and_never_empty(group_of_one):
    from mf_ext.distributed import DataParallel

    sync = DataParallel(torch.device("cpu"))
    sync.rank, sync.train_sizes, sync.n_train = 1, [3, 5, 4], 12  # as if 3 ranks
    steps = sync.batches(5, 1, np.random.default_rng(0))
    assert len(steps) == 5  # ceil(12 / 1) capped at the largest shard: no step empty everywhere
    assert [count for _, count in steps] == [3, 3, 3, 2, 1]  # array_split of 3, 5 and 4 in 5
    assert sorted(torch.cat([index for index, _ in steps]).tolist()) == list(range(5))
    assert sync.batches(5, 100, np.random.default_rng(0)) == [(None, 12)]  # full batch


def test_distributed_true_needs_a_process_group():
    users, items, ratings = synthetic()
    with pytest.raises(RuntimeError, match="no torch.distributed process group is initialized"):
        MatrixFactorization(epochs=1).fit(users, items, ratings, distributed=True)


def test_torchrun_cli(tmp_path):
    rng = np.random.default_rng(0)
    lines = [f"{u}\t{i}\t{rng.integers(1, 6)}\t0" for u in range(1, 41)
             for i in rng.choice(np.arange(1, 31), size=12, replace=False)]
    path = tmp_path / "u.data"
    path.write_text("\n".join(lines) + "\n")
    model_path = tmp_path / "model.pt"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "mf_ext", "fit", str(path), "--epochs", "3", "--rank", "4", "--no-progress",
         "--out", str(model_path)],
        capture_output=True, text=True, env=_env(), timeout=HARD_TIMEOUT_S, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("trained 3 epochs") == 1, run.stdout  # only rank 0 prints
    assert "2 processes" in run.stdout
    got = MatrixFactorization.load(str(model_path))
    from mf_ext import load_ratings, train_test_split
    train, _ = train_test_split(load_ratings(str(path)), 0.2, seed=0)
    ref = MatrixFactorization(rank=4, epochs=3, seed=0).fit(train)
    assert relative_difference(got.P, ref.P) <= 1e-4
    assert relative_difference(got.item_bias, ref.item_bias) <= 1e-4

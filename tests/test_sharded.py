"""MatrixFactorization(shard_factors=True): each rank holds a block of the factors' rows.

One launch of 3 processes (tests/sharded_worker.py) runs every multi-process scenario in turn,
3 ranks then 2, under a hard timeout; the rest runs in this process, in one-rank groups."""

import os
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist

from distributed_worker import synthetic
from mf_ext import MatrixFactorization, Ratings
from mf_ext.distributed import draw_normal
from mf_ext.shard_blocks import ROW_SLACK, balanced_blocks
from helpers import NEEDS_GLOO, group_of_one, launched_ranks, one_thread  # noqa: F401
from sharded_worker import (EARLY_STOPPING, FAILING_EPOCH, FLOAT64, GROUP_TIMEOUT_S,
                            INTERRUPT_AT, MINIBATCH, TINY, tiny_ratings)

ROWS = ("P", "Q", "user_bias", "item_bias", "Y")

pytestmark = NEEDS_GLOO
ranks = launched_ranks("sharded_worker.py", timeout_s=150)


def single(settings, data):
    return MatrixFactorization(**settings).fit(data)


def assert_rows_equal(got, ref, rtol=1e-9):
    """The ranks' rows, joined in rank order, equal the single-process model's (relative to the
    largest entry of each tensor); Y (the SVD++ term's y_j) on both or on neither."""
    for name in ROWS:
        want = getattr(ref, name)
        if name == "Y" and want is None:
            assert all(g[name] is None for g in got)
            continue
        joined = torch.cat([g[name] for g in got], dim=1 if name in "PQY" else 0)
        assert joined.shape == want.shape, name
        scale = want.double().abs().max()
        assert ((joined.double() - want.double()).abs().max() / scale).item() <= rtol, name


@pytest.mark.parametrize("world", [2, 3])
def test_full_batch_float64_equals_the_single_process_fit(ranks, world):
    data = Ratings(*synthetic())
    ref = single(FLOAT64, data)
    assert ref.Y is not None  # the SVD++ term is on by default, sharded or not
    got = ranks[0][world]
    assert_rows_equal([g["float64"] for g in got], ref)
    for g in got:
        np.testing.assert_allclose([t for t, _ in g["float64"]["history"]],
                                   [h.train_rmse for h in ref.history], rtol=1e-9)
        assert g["float64"]["global_mean"] == pytest.approx(ref.global_mean, rel=1e-14)
    # the blocks: contiguous, in rank order, balanced_blocks of the global training counts
    shards = [g["float64"]["shard"] for g in got]
    user_counts = np.unique(data.users, return_counts=True)[1]
    item_counts = np.unique(data.items, return_counts=True)[1]
    assert [s.user_starts for s in shards] == [tuple(balanced_blocks(user_counts, world))] * world
    assert [s.item_starts for s in shards] == [tuple(balanced_blocks(item_counts, world))] * world
    assert [s.users for s in shards] == [s.user_starts[k:k + 2] for k, s in enumerate(shards)]
    assert shards[0].n_users == 60 and shards[0].steps == FLOAT64["epochs"]
    # with the term each rank gathers the rows of all its training items, y_j beside Q's
    assert all(s.gathered_rows == len(np.unique(data.items[np.isin(
        data.users, np.unique(data.users)[slice(*s.users)])])) for s in shards)


def test_without_the_implicit_term(ranks):
    got = [g["explicit"] for g in ranks[0][3]]
    assert all(g["Y"] is None for g in got)
    assert_rows_equal(got, single(dict(FLOAT64, implicit=False), Ratings(*synthetic())))


@pytest.mark.parametrize("world", [2, 3])
def test_early_stopping_agrees_with_the_single_process_fit(ranks, world):
    settings, data = EARLY_STOPPING
    ref = single(settings, Ratings(*synthetic(**data)))
    assert len(ref.history) < settings["epochs"]  # it does stop early
    for g in ranks[0][world]:
        got = g["early_stopping"]
        assert len(got["history"]) == len(ref.history) and got["best_epoch"] == ref.best_epoch
        np.testing.assert_allclose([v for _, v in got["history"]],
                                   [h.val_rmse for h in ref.history], rtol=1e-9)
    assert_rows_equal([g["early_stopping"] for g in ranks[0][world]], ref)


def test_ctrl_c_keeps_the_best_rows_and_they_save_and_load(ranks):
    results, folder = ranks
    settings, data = EARLY_STOPPING

    def interrupt(record):
        if record.epoch == INTERRUPT_AT:
            raise KeyboardInterrupt

    ref = MatrixFactorization(**settings).fit(Ratings(*synthetic(**data)), callback=interrupt)
    got = [g["interrupted"] for g in results[3]]
    assert all(g["interrupted"] and len(g["history"]) == INTERRUPT_AT for g in got)
    assert_rows_equal(got, ref)
    loaded = MatrixFactorization.load(str(folder / "interrupted.pt"))
    assert_rows_equal([{name: getattr(loaded, name) for name in ROWS}], ref)


def test_uneven_input_shards_and_ranks_that_hold_nothing(ranks):
    results = ranks[0][3]
    # rank 2 was given no ratings, rank 0 70 % of them: the fit moves them to their users' owners
    assert_rows_equal([g["uneven"] for g in results], single(FLOAT64, Ratings(*synthetic())))
    # 2 users, 2 items, 3 ranks: rank 1 holds no row and trains on no rating (the cut after
    # user a, 3 of the 5 ratings, is the nearest to both 5/3 and 10/3)
    tiny = [g["tiny"] for g in results]
    assert [g["shard"].users for g in tiny] == [(0, 1), (1, 1), (1, 2)]
    assert tiny[1]["P"].shape == tiny[1]["Y"].shape == (TINY["rank"], 0)
    assert tiny[1]["shard"].items == (1, 1)
    assert_rows_equal(tiny, single(TINY, tiny_ratings()))


def test_float32_and_minibatches(ranks):
    results = ranks[0][3]
    assert_rows_equal([g["float32"] for g in results],
                      single(dict(FLOAT64, dtype=torch.float32), Ratings(*synthetic())),
                      rtol=1e-4)
    # Mini-batches: each rank splits its own ratings into the steps, so the batches are not the
    # single process's ones; the fit still learns, and the ranks agree on every epoch's RMSE.
    users, items, ratings = synthetic()
    history = results[0]["minibatch"]["history"]
    assert all(g["minibatch"]["history"] == history for g in results)
    assert history[-1][0] < 0.5 * history[0][0] and history[-1][0] < 0.5 * np.std(ratings)
    assert len(history) == MINIBATCH["epochs"] and results[0]["minibatch"]["shard"].steps > \
        MINIBATCH["epochs"]


def test_minibatches_equal_data_parallel_given_each_rank_its_users_ratings(ranks):
    # given the same ratings on each rank (their users', so that none moves), the sharded fit
    # takes the data-parallel fit's batches and steps, SVD++ term included: the same model
    owned = [g["minibatch_owned"] for g in ranks[0][3]]
    assert owned[0][0]["Y"] is not None and owned[0][0]["shard"].steps > MINIBATCH["epochs"]
    dp = owned[0][1]
    starts = owned[0][0]["shard"]
    np.testing.assert_allclose([t for t, _ in owned[0][0]["history"]],
                               [t for t, _ in dp["history"]], rtol=1e-9)
    for name, (kind, axis) in {"P": ("user", 1), "Q": ("item", 1), "Y": ("item", 1),
                               "user_bias": ("user", 0), "item_bias": ("item", 0)}.items():
        s = getattr(starts, f"{kind}_starts")
        want = torch.tensor_split(dp[name], list(s[1:-1]), dim=axis)
        for k, (sharded, _) in enumerate(owned):
            assert torch.allclose(sharded[name], want[k], rtol=0,
                                  atol=1e-9 * dp[name].abs().max().item()), (name, k)


def test_evaluate_save_load_predict_and_recommend(ranks, tmp_path):
    results, folder = ranks
    data, test = Ratings(*synthetic()), Ratings(*synthetic(m=70, n=45, seed=5))
    ref = single(FLOAT64, data)
    for g in results[3]:  # each rank passed a different share (one none) of the test ratings
        assert g["evaluate"]["rmse"] == pytest.approx(ref.evaluate(test)["rmse"], rel=1e-9)
        assert g["evaluate"]["mae"] == pytest.approx(ref.evaluate(test)["mae"], rel=1e-9)
    files = sorted(os.listdir(folder))
    assert sum(f.startswith("float64.pt.") for f in files) == 3  # 3 shards beside the manifest
    loaded = MatrixFactorization.load(str(folder / "float64.pt"))
    assert loaded.shard is None and loaded.config == ref.config
    assert torch.allclose(loaded.Y, ref.Y, rtol=0, atol=1e-9 * ref.Y.abs().max().item())
    np.testing.assert_allclose(loaded.predict(test.users, test.items),
                               ref.predict(test.users, test.items), rtol=1e-9)
    for user in ("u0", "u31", "u59"):
        assert [i for i, _ in loaded.recommend(user, 5)] == [i for i, _ in ref.recommend(user, 5)]
    np.testing.assert_array_equal(loaded._rated_indptr, ref._rated_indptr)
    for u in range(0, 60, 7):  # each user's training items, in any order within the user
        def items_of(model):
            return sorted(model._rated_indices[model._rated_indptr[u]:model._rated_indptr[u + 1]])
        assert items_of(loaded) == items_of(ref)
    items, _ = loaded.recommend_batch(["u0", "u31", "u59"], k=5)
    assert items.tolist() == ref.recommend_batch(["u0", "u31", "u59"], k=5)[0].tolist()
    # shards that disagree on holding y_j are refused by name
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in files:
        if name.startswith("float64.pt"):
            shutil.copy(folder / name, copy / name)
    shard = sorted(copy.glob("float64.pt.*.shard1-of-3"))[0]
    torch.save({k: v for k, v in torch.load(shard, weights_only=True).items() if k != "Y"}, shard)
    with pytest.raises(ValueError, match=r"the shards \[1\] of .* hold no 'Y', the others do"):
        MatrixFactorization.load(str(copy / "float64.pt"))


def test_the_cli_under_torchrun_with_three_processes(ranks, tmp_path):
    from mf_ext import load_ratings, train_test_split
    from sharded_worker import cli_ratings

    results, folder = ranks
    printed = [g["cli"] for g in results[3]]
    assert all(p.startswith("exit 0\n") for p in printed), printed
    assert "test RMSE" in printed[0] and "(a manifest of 3 shard files)" in printed[0]
    assert printed[1] == printed[2] == "exit 0\n"  # only rank 0 prints
    cli_ratings(str(tmp_path / "u.data"))
    train, test = train_test_split(load_ratings(str(tmp_path / "u.data")), 0.2, seed=0)
    ref = MatrixFactorization(rank=4, epochs=4, seed=0, reg=0.12).fit(train)
    rmse = float(printed[0].split("test RMSE ")[1].split()[0])
    assert rmse == pytest.approx(ref.evaluate(test)["rmse"], abs=1e-4)
    loaded = MatrixFactorization.load(str(folder / "cli.pt"))
    assert_rows_equal([{name: getattr(loaded, name) for name in ROWS}], ref, rtol=1e-4)


def test_all_to_all_and_its_send_recv_fallback_agree(ranks):
    for rank, g in enumerate(ranks[0][3]):
        by_collective, by_messages = g["transport"]
        assert torch.equal(by_collective, by_messages)
        counts = [[0, 3, 1], [2, 0, 4], [5, 1, 0]]  # as the worker sent them
        assert len(by_collective) == sum(counts[k][rank] for k in range(3))


def test_a_failing_rank_fails_the_others_clearly(ranks):
    rank0, rank1 = ranks[0][2]
    assert rank1["failure"] == "ValueError: rank 1 fails on purpose"
    assert "rank 0 of 2: the item-row all-to-all failed; another rank probably raised an error " \
           "or stopped" in rank0["failure"], rank0["failure"]
    assert rank0["failure_seconds"] < GROUP_TIMEOUT_S + 10
    assert FAILING_EPOCH < FLOAT64["epochs"]


# ---------------------------------------------------------------- in this process

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_draw_normal_gives_the_columns_of_one_draw(dtype):
    for rows, columns, keep, chunk in [(3, 7, range(2, 5), 16), (4, 37, range(0, 37), 16),
                                       (5, 41, range(40, 41), 32), (2, 9, range(3, 3), 16),
                                       (16, 1001, range(333, 667), 64)]:
        whole_gen, part_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        whole = torch.randn(rows, columns, generator=whole_gen, dtype=dtype)
        part = draw_normal(part_gen, rows, columns, keep, dtype, chunk=chunk)
        assert torch.equal(part, whole[:, keep.start:keep.stop])
        # the generator ends where the whole draw leaves it
        assert torch.equal(torch.randn(20, generator=part_gen, dtype=dtype),
                           torch.randn(20, generator=whole_gen, dtype=dtype))


def test_blocks_balance_ratings_with_a_bound_on_rows():
    # equal counts: equal rows; fewer rows than ranks: empty blocks, never more than one row
    assert balanced_blocks(np.ones(60, int), 3).tolist() == [0, 20, 40, 60]
    assert balanced_blocks([5], 3).tolist() == [0, 0, 1, 1]
    assert balanced_blocks([0, 0, 0, 0], 2).tolist() == [0, 2, 4]  # no ratings: equal rows
    # 50 light users then 50 heavy ones: equal ratings would give rank 0 75 rows (1.5 m/P, over
    # the memory target); the cut stops at the cap, 55 = 1.1 m/P
    assert balanced_blocks([1] * 50 + [100] * 50, 2).tolist() == [0, 55, 100]
    rng = np.random.default_rng(0)
    counts = np.ceil(rng.lognormal(1, 1.5, 1000)).astype(np.int64)  # heavy-tailed activity
    cumulative = np.concatenate([[0], np.cumsum(counts)])
    for parts in (2, 3, 4, 5):
        starts = balanced_blocks(counts, parts)
        rows, ratings = np.diff(starts), np.diff(cumulative[starts])
        assert starts[0] == 0 and starts[-1] == 1000
        assert rows.max() <= (1 + ROW_SLACK) * 1000 / parts
        even = np.diff(cumulative[np.linspace(0, 1000, parts + 1).astype(int)])
        assert np.ptp(ratings) < np.ptp(even)  # closer to equal ratings than equal rows are
        for k in range(1, parts):  # a cut the row cap does not move is the nearest one
            nearest = int(np.argmin(np.abs(cumulative * parts - k * cumulative[-1])))
            if max(rows[k - 1], rows[k]) < int((1 + ROW_SLACK) * 1000) // parts:
                assert starts[k] == nearest
    assert [np.ptp(np.diff(cumulative[balanced_blocks(counts, p)])) for p in (3, 4)] == [3, 98]


def test_one_rank_equals_the_plain_fit_and_saves_a_manifest(group_of_one, tmp_path):
    data = Ratings(*synthetic())
    ref = MatrixFactorization(**FLOAT64, implicit=False).fit(data, distributed=False)
    got = MatrixFactorization(shard_factors=True, implicit=False, **FLOAT64).fit(data)
    assert_rows_equal([{name: getattr(got, name) for name in ROWS}], ref, rtol=1e-12)
    with pytest.raises(RuntimeError, match=r"holds only rank 0 of 1's rows of the factors "
                                           r"\(shard_factors=True\); save\(\) it on every rank"):
        got.predict(data.users, data.items)
    path = str(tmp_path / "model.pt")
    got.save(path)
    first = sorted(os.listdir(tmp_path))
    got.save(path)  # a second save replaces the first one's shard file
    second = sorted(os.listdir(tmp_path))
    assert len(first) == len(second) == 3 and first != second  # rendezvous, manifest, shard
    loaded = MatrixFactorization.load(path)
    np.testing.assert_allclose(loaded.predict(data.users, data.items),
                               ref.predict(data.users, data.items), rtol=1e-12)
    os.unlink(str(tmp_path / [f for f in second if ".shard0-of-1" in f][0]))
    with pytest.raises(ValueError, match=r"is a sharded model whose shard file .* is missing"):
        MatrixFactorization.load(path)
    # a validation set with users and items the model does not know
    validation = Ratings(*synthetic(m=70, n=45, seed=5))
    settings = dict(FLOAT64, epochs=8)
    ref = MatrixFactorization(**settings, implicit=False).fit(data, validation=validation,
                                                              distributed=False)
    got = MatrixFactorization(shard_factors=True, implicit=False, **settings).fit(
        data, validation=validation)
    np.testing.assert_allclose([h.val_rmse for h in got.history],
                               [h.val_rmse for h in ref.history], rtol=1e-12)
    dist.destroy_process_group()
    with pytest.raises(RuntimeError, match=r"all 1 ranks of the process group it was fitted in "
                                           r"must save it together"):
        got.save(path)


def test_the_cli_under_a_one_process_torchrun(group_of_one, tmp_path, monkeypatch, capsys):
    from mf_ext.cli import main

    dist.destroy_process_group()  # the command starts its own, from torchrun's variables
    rng = np.random.default_rng(0)
    lines = [f"{u}\t{i}\t{rng.integers(1, 6)}\t0" for u in range(1, 31)
             for i in rng.choice(np.arange(1, 21), size=8, replace=False)]
    (tmp_path / "u.data").write_text("\n".join(lines) + "\n")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(port)).items():
        monkeypatch.setenv(name, value)
    out = str(tmp_path / "model.pt")
    assert main(["fit", str(tmp_path / "u.data"), "--shard-factors", "--epochs", "3",
                 "--rank", "4", "--no-progress", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "test RMSE" in printed and "(a manifest of 1 shard files)" in printed
    assert MatrixFactorization.load(out).P.shape[0] == 4
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name)
    assert main(["fit", str(tmp_path / "u.data"), "--shard-factors"]) == 1
    assert "--shard-factors splits the model across processes: launch with torchrun" in \
        capsys.readouterr().err


def test_the_cli_option():
    from mf_ext.cli import build_parser

    assert build_parser().parse_args(["fit", "r.csv", "--shard-factors"]).shard_factors is True
    assert build_parser().parse_args(["fit", "r.csv"]).shard_factors is False


def test_settings_that_sharding_refuses():
    data = Ratings(*synthetic())
    with pytest.raises(TypeError, match=r"shard_factors must be True or False, got 1"):
        MatrixFactorization(shard_factors=1)
    with pytest.raises(RuntimeError, match=r"shard_factors=True needs an initialized "
                                           r"torch.distributed process group"):
        MatrixFactorization(shard_factors=True, epochs=1).fit(data)
    with pytest.raises(ValueError, match=r"cannot be combined with distributed=False"):
        MatrixFactorization(shard_factors=True, epochs=1).fit(data, distributed=False)


def test_a_setting_sharding_does_not_know_is_refused_by_name(group_of_one):
    from dataclasses import dataclass

    from mf_ext.checks import Bool
    from mf_ext.config import setting
    from mf_ext.model import MatrixFactorizationConfig
    from mf_ext.sharded import sharded_factors

    @dataclass
    class WithImplicitTerm(MatrixFactorizationConfig):  # as a later model option might be
        implicit_term: bool = setting(False, Bool(), "an option sharding was not written for")

    sharded_factors(None, WithImplicitTerm(shard_factors=True, implicit_term=False))  # off: fine
    with pytest.raises(ValueError, match=r"shard_factors=True does not support the setting "
                                         r"implicit_term=True"):
        sharded_factors(None, WithImplicitTerm(shard_factors=True, implicit_term=True))

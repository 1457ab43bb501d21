"""ImplicitMatrixFactorization(shard_factors=True): each rank holds a block of the factors' rows.

One launch of 3 processes (tests/sharded_implicit_worker.py) runs every multi-process scenario
in turn, 3 ranks then 2, under a hard timeout; the rest runs in this process, in one-rank
groups."""

import contextlib
import io
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from mf_ext import ImplicitMatrixFactorization
from mf_ext.distributed import shard_ratings
from mf_ext.interactions import as_interactions
from mf_ext.shard_blocks import balanced_blocks
from sharded_implicit_worker import (CASES, CLI_OPTIONS, FAILING_EPOCH, FLOAT32, INTERRUPT_AT,
                                     interactions, interrupt, tiny)
from helpers import NEEDS_GLOO, group_of_one, launched_ranks, one_thread  # noqa: F401
from sharded_worker import GROUP_TIMEOUT_S, cli_ratings

pytestmark = NEEDS_GLOO
ranks = launched_ranks("sharded_implicit_worker.py", timeout_s=150)


def single(settings, data):
    return ImplicitMatrixFactorization(**settings).fit(data.users, data.items, data.ratings)


def assert_rows_equal(got, ref, rtol=1e-9):
    """The ranks' rows, joined in rank order, equal the single-process model's (relative to the
    largest entry of each factor)."""
    for name in ("P", "Q"):
        joined = torch.cat([g[name] for g in got], dim=1)
        want = getattr(ref, name)
        assert joined.shape == want.shape, name
        error = (joined.double() - want.double()).abs().max() / want.double().abs().max()
        assert error.item() <= rtol, (name, error.item())


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("solver", ["adam", "als"])
def test_float64_equals_the_single_process_fit(ranks, world, solver):
    ref = single(CASES[solver], interactions())
    got = [g[solver] for g in ranks[0][world]]
    assert_rows_equal(got, ref)
    for g in got:  # every rank reports the objective over all ranks
        np.testing.assert_allclose(g["losses"], ref.losses, rtol=1e-9)
    # the blocks: the explicit model's rule (balanced in the interactions as the ranks passed
    # them, each rank's merged once), contiguous, in rank order
    shards = [g["shard"] for g in got]
    data = interactions()
    passed = [as_interactions(s.users, s.items, s.ratings)
              for s in (shard_ratings(data, k, world) for k in range(world))]
    ids = ref.user_map.index(np.concatenate([s.users for s in passed]))
    starts = balanced_blocks(np.bincount(ids, minlength=50), world).tolist()
    assert [s.users for s in shards] == list(zip(starts[:-1], starts[1:]))
    assert shards[0].n_users == 50 and shards[0].n_items == 40
    assert shards[0].steps == CASES[solver]["epochs"]
    # the traffic of docs/distributed.md's cost model: rows of r float64 values; a rank sends
    # its S_k requested rows once per step (Adam) or 1 + (s + 1) times per sweep (ALS) and the
    # G_k rows it gathered back s + 1 times (ALS) or once (Adam); Σ S_k = Σ G_k
    sent = [s.bytes_sent for s in shards]
    row = CASES[solver]["rank"] * 8 * CASES[solver]["epochs"]
    back = "item-gradient" if solver == "adam" else "CG item-product"
    assert sum(b["item-row"] for b in sent) == sum(b[back] for b in sent) // (
        1 if solver == "adam" else CASES["als"]["cg_steps"] + 1) > 0
    for b in sent:
        assert b["item-row"] % row == 0
        if solver == "als":
            assert b["CG item-row"] == (CASES["als"]["cg_steps"] + 1) * b["item-row"]


@pytest.mark.parametrize("solver", ["adam", "als"])
def test_uneven_shards_and_a_rank_that_holds_nothing(ranks, solver):
    results = ranks[0][3]
    # rank 0 passed 70 % of the interactions, rank 2 none: fit moves them to their users' owners
    assert_rows_equal([g[f"{solver}-uneven"] for g in results],
                      single(CASES[solver], interactions()))
    # 2 users, 2 items, 3 ranks: one rank holds no user row (none of its own interactions to
    # train on) and rank 2 passed none
    got = [g[f"{solver}-tiny"] for g in results]
    assert sorted(g["P"].shape[1] for g in got) == [0, 1, 1]
    assert_rows_equal(got, single(dict(CASES[solver], rank=2), tiny()))


def test_float32(ranks):
    assert_rows_equal([g["float32"] for g in ranks[0][3]], single(FLOAT32, interactions()),
                      rtol=1e-4)


def test_ctrl_c_keeps_the_model_so_far_and_it_saves_and_loads(ranks):
    results, folder = ranks
    data = interactions()
    ref = ImplicitMatrixFactorization(**CASES["als"]).fit(data.users, data.items, data.ratings,
                                                          callback=interrupt)
    got = [g["interrupted"] for g in results[3]]
    assert all(g["interrupted"] and len(g["losses"]) == INTERRUPT_AT for g in got)
    assert_rows_equal(got, ref)
    loaded = ImplicitMatrixFactorization.load(str(folder / "interrupted.pt"))
    assert_rows_equal([{"P": loaded.P, "Q": loaded.Q}], ref)
    assert len(loaded.history) == INTERRUPT_AT


def test_no_interactions_on_any_rank_is_an_error(ranks):
    for g in ranks[0][3]:
        assert g["empty"] == ("mf_ext.ImplicitMatrixFactorization.fit: no interactions given on "
                              "any of the 3 ranks (empty input, or every weight is 0)")


@pytest.mark.parametrize("solver", ["adam", "als"])
def test_save_load_and_recommend_from_the_sharded_model(ranks, solver):
    results, folder = ranks
    ref = single(CASES[solver], interactions())
    loaded = ImplicitMatrixFactorization.load(str(folder / f"{solver}.pt"))
    assert loaded.shard is None and loaded.config == ref.config
    assert sum(f.startswith(f"{solver}.pt.") for f in os.listdir(folder)) == 3  # the shards
    assert_rows_equal([{"P": loaded.P, "Q": loaded.Q}], ref)
    np.testing.assert_allclose(loaded.losses, ref.losses, rtol=1e-9)
    np.testing.assert_array_equal(loaded._rated_indptr, ref._rated_indptr)
    np.testing.assert_array_equal(loaded._rated_indices, ref._rated_indices)
    users = ["u0", "u17", "u33", "u49"]
    items, scores = loaded.recommend_batch(users, k=6)
    want_items, want_scores = ref.recommend_batch(users, k=6)
    assert items.tolist() == want_items.tolist()
    np.testing.assert_allclose(scores, want_scores, rtol=1e-9)
    assert loaded.recommend("u17", 3)[0][0] == ref.recommend("u17", 3)[0][0]


def test_the_cli_under_torchrun_with_three_processes(ranks, tmp_path):
    from mf_ext.cli import main

    results, folder = ranks
    printed = [g["cli"] for g in results[3]]
    assert printed[1] == printed[2] == "exit 0\n", printed  # only rank 0 prints
    assert printed[0].startswith("exit 0\n") and "(3 processes, sharded factors)" in printed[0]
    assert "(a manifest of 3 shard files)" in printed[0]
    # the metrics of the saved model are those of the single-process command
    path = str(tmp_path / "cli.data")
    cli_ratings(path)
    single_out = io.StringIO()
    with contextlib.redirect_stdout(single_out):
        assert main(["fit-implicit", path, *CLI_OPTIONS]) == 0
    metrics = [line for line in single_out.getvalue().splitlines() if "recall@5" in line]
    assert len(metrics) == 1 and metrics[0] in printed[0].splitlines(), (metrics, printed[0])
    assert ImplicitMatrixFactorization.load(str(folder / "cli.pt")).P.shape[0] == 4


def test_a_failing_rank_fails_the_others_clearly(ranks):
    rank0, rank1 = ranks[0][2]
    assert rank1["failure"] == "ValueError: rank 1 fails on purpose"
    assert rank0["failure"].startswith("RuntimeError: mf_ext.ImplicitMatrixFactorization.fit: "
                                       "rank 0 of 2: the "), rank0["failure"]
    assert "failed; another rank probably raised an error or stopped" in rank0["failure"]
    assert rank0["failure_seconds"] < GROUP_TIMEOUT_S + 10
    assert FAILING_EPOCH < CASES["als"]["epochs"]


# ---------------------------------------------------------------- in this process

@pytest.mark.parametrize("solver", ["adam", "als"])
def test_one_rank_equals_the_plain_fit_and_saves_a_manifest(group_of_one, tmp_path, solver):
    data = interactions()
    ref = single(CASES[solver], data)
    got = single(dict(CASES[solver], shard_factors=True), data)
    assert_rows_equal([{"P": got.P, "Q": got.Q}], ref, rtol=1e-12)
    for call in (lambda: got.score(["u0"], [100]), lambda: got.recommend("u0"),
                 lambda: got.recommend_batch(["u0"]), lambda: got.recommend_new([100])):
        with pytest.raises(RuntimeError, match=r"holds only rank 0 of 1's rows of the factors "
                                               r"\(shard_factors=True\); save\(\) it on every"):
            call()
    path = str(tmp_path / "model.pt")
    got.save(path)
    loaded = ImplicitMatrixFactorization.load(path)
    np.testing.assert_allclose(loaded.score(data.users, data.items),
                               ref.score(data.users, data.items), rtol=1e-12)
    dist.destroy_process_group()
    with pytest.raises(RuntimeError, match=r"all 1 ranks of the process group it was fitted in "
                                           r"must save it together"):
        got.save(path)


def test_settings_and_input_that_sharding_refuses(group_of_one):
    data = interactions()
    with pytest.raises(TypeError, match=r"shard_factors must be True or False, got 1"):
        ImplicitMatrixFactorization(shard_factors=1)
    with pytest.raises(ValueError, match=r"no interactions given on any of the 1 ranks"):
        ImplicitMatrixFactorization(shard_factors=True).fit([], [])
    with pytest.raises(ValueError, match=r"weights must be finite and >= 0; 1 are not"):
        ImplicitMatrixFactorization(shard_factors=True).fit(["a", "b"], [1, 2], [1.0, -1.0])
    dist.destroy_process_group()
    with pytest.raises(RuntimeError, match=r"mf_ext.ImplicitMatrixFactorization.fit: "
                                           r"shard_factors=True needs an initialized "
                                           r"torch.distributed process group"):
        ImplicitMatrixFactorization(shard_factors=True, epochs=1).fit(data.users, data.items)


def test_a_setting_sharding_does_not_know_is_refused_by_name(group_of_one):
    from dataclasses import dataclass

    from mf_ext.checks import Bool
    from mf_ext.config import setting
    from mf_ext.implicit_model import ImplicitMatrixFactorizationConfig
    from mf_ext.sharded_implicit import group_of

    @dataclass
    class WithNewOption(ImplicitMatrixFactorizationConfig):  # as a later model option might be
        new_option: bool = setting(False, Bool(), "an option sharding was not written for")

    group_of(WithNewOption(shard_factors=True, new_option=False))  # off: fine
    with pytest.raises(ValueError, match=r"ImplicitMatrixFactorization.fit: shard_factors=True "
                                         r"does not support the setting new_option=True"):
        group_of(WithNewOption(shard_factors=True, new_option=True))


def test_the_cli_under_a_one_process_torchrun_without_out(tmp_path):
    from sharded_worker import run_under_torchrun

    path = str(tmp_path / "u.data")
    cli_ratings(path)
    printed = run_under_torchrun(0, 1, str(tmp_path), ["fit-implicit", path, "--shard-factors",
                                                       *CLI_OPTIONS])
    assert printed.startswith("exit 0\n") and "(1 processes, sharded factors)" in printed
    assert "no evaluation: a sharded model is evaluated from its saved file (pass --out)" in \
        printed and "recall@5" not in printed
    assert not dist.is_initialized()  # the command took its process group down


def test_the_cli_option(tmp_path, capsys):
    from mf_ext.cli import build_parser, main

    parse = build_parser().parse_args
    assert parse(["fit-implicit", "r.csv", "--shard-factors"]).shard_factors is True
    assert parse(["fit-implicit", "r.csv"]).shard_factors is False
    path = str(tmp_path / "u.data")
    cli_ratings(path)
    assert main(["fit-implicit", path, "--shard-factors"]) == 1
    assert "--shard-factors splits the model across processes: launch with torchrun (e.g. " \
           "torchrun --nproc_per_node 2 -m mf_ext fit-implicit ...)" in capsys.readouterr().err

"""ImplicitMatrixFactorization on synthetic implicit data the tests plant (never MovieLens)."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from mf_ext.cli import main
from mf_ext.data import Ratings
from mf_ext.implicit_model import ImplicitMatrixFactorization
from mf_ext.implicit_solvers import als_sweep, make_problem
from mf_ext.metrics import evaluate_ranking

M, N, PER_USER = 60, 50, 10


def planted(seed=0, held_per_user=2):
    """Each user's PER_USER best items under a rank-3 score are its positives; `held_per_user`
    of them per user are held out. Returns (train users, train items, held users, held items)."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(M, 3)) @ rng.normal(size=(3, N))
    top = np.argsort(-scores, axis=1)[:, :PER_USER]
    held = np.zeros((M, PER_USER), dtype=bool)
    for u in range(M):
        held[u, rng.choice(PER_USER, held_per_user, replace=False)] = True
    users = np.repeat(np.arange(M), PER_USER).reshape(M, PER_USER)
    return users[~held], top[~held], users[held], top[held]


def small(**kw):
    return ImplicitMatrixFactorization(**{"rank": 4, "epochs": 10, **kw})


def dense_objective(model, users, items, strengths):
    """Hu et al.'s objective over all m·n cells, float64, from the definition."""
    P, Q = model.P.double(), model.Q.double()
    m, n = P.shape[1], Q.shape[1]
    u = torch.as_tensor(model.user_map.index(users))
    i = torch.as_tensor(model.item_map.index(items))
    C, Y = torch.ones(m, n, dtype=torch.float64), torch.zeros(m, n, dtype=torch.float64)
    C[u, i] += model.alpha * torch.as_tensor(strengths, dtype=torch.float64)
    Y[u, i] = 1
    reg_u = model.reg * C.sum(1) ** model.reg_exponent  # Σ_i c_ui, the row's weight
    reg_i = model.reg * C.sum(0) ** model.reg_exponent
    return float((C * (Y - P.T @ Q) ** 2).sum() + (P * P).sum(0) @ reg_u
                 + (Q * Q).sum(0) @ reg_i)


def exact_half_step(Y, rows, cols, w, reg_of):
    """Each user's (column's) exact minimizer with Y fixed, by a dense r × r solve."""
    r, n_cols = Y.shape[0], int(rows.max()) + 1
    X = torch.zeros(r, n_cols, dtype=torch.float64)
    for k in range(n_cols):
        mine = rows == k
        Z, c = Y[:, cols[mine]], w[mine]
        A = Y @ Y.T + (Z * c) @ Z.T + reg_of[k] * torch.eye(r, dtype=torch.float64)
        X[:, k] = torch.linalg.solve(A, Z @ (c + 1))
    return X


# ---------------------------------------------------------------------- what it learns

def test_ranks_held_out_positives_above_negatives():
    users, items, held_u, held_i = planted()
    model = small().fit(users, items)
    scores = evaluate_ranking(model, (held_u, held_i), k=5)
    # 2 held-out positives among 40 candidates: a random ranking has recall@5 = 0.125, AUC 0.5
    assert scores["recall@5"] > 0.8 and scores["auc"] > 0.93  # measured 0.88 and 0.96
    held = model.score(held_u, held_i)
    seen = np.zeros((M, N), dtype=bool)
    seen[users, items] = seen[held_u, held_i] = True
    neg_u, neg_i = np.nonzero(~seen)
    # mean held-out positive score minus mean negative score: measured 0.61
    assert held.mean() - model.score(neg_u, neg_i).mean() > 0.45


def test_losses_are_the_dense_objective_and_decrease():
    users, items, _, _ = planted()
    strengths = np.random.default_rng(1).integers(1, 4, len(users)).astype(float)
    model = small(dtype=torch.float64, reg=0.01).fit(users, items, strengths)
    assert model.losses[-1] == pytest.approx(dense_objective(model, users, items, strengths),
                                             rel=1e-10)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(model.losses, model.losses[1:]))
    assert model.losses[-1] < 0.5 * model.losses[0]
    adam = small(solver="adam", epochs=60, dtype=torch.float64).fit(users, items, strengths)
    assert adam.losses[-1] < 0.5 * adam.losses[0]
    assert [h.train_rmse for h in model.history] == pytest.approx(
        [np.sqrt(x / len(users)) for x in model.losses])


@pytest.mark.parametrize("exponent", [0.0, 1.0])
def test_als_sweep_with_rank_cg_steps_is_the_exact_alternating_solve(exponent):
    users, items, _, _ = planted()
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.as_tensor(users), torch.as_tensor(items)
    w = 5 * torch.rand(len(users), generator=g, dtype=torch.float64) + 0.5
    problem = make_problem(rows, cols, w, M, N, reg=0.7, reg_exponent=exponent)
    P = torch.randn(3, M, generator=g, dtype=torch.float64)
    Q = torch.randn(3, N, generator=g, dtype=torch.float64)
    P_exact = exact_half_step(Q, rows, cols, w, problem.user_reg)
    Q_exact = exact_half_step(P_exact, cols, rows, w, problem.item_reg)
    als_sweep(P, Q, problem, cg_steps=3)  # CG solves an r × r system in r steps
    torch.testing.assert_close(P, P_exact, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(Q, Q_exact, rtol=1e-9, atol=1e-9)


def test_fold_in_is_the_exact_user_solve():
    users, items, _, _ = planted()
    model = small(dtype=torch.float64, reg_exponent=1.0).fit(users, items)
    mine = items[users == 7]
    vector, offset = model._fold_in(model.item_map.index(mine), np.full(len(mine), 2.0))
    w = torch.full((len(mine),), 2.0 * model.alpha, dtype=torch.float64)
    reg = model.reg * (len(model.item_map) + float(w.sum()))  # n: the items in training
    expected = exact_half_step(model.Q, torch.zeros(len(mine), dtype=torch.long),
                               torch.as_tensor(model.item_map.index(mine)), w, [reg])[:, 0]
    torch.testing.assert_close(vector, expected, rtol=1e-10, atol=1e-12)
    assert offset == 0.0
    top, _ = model.recommend_new(mine, k=5)
    assert not set(top) & set(mine)


# ---------------------------------------------------------------------- inputs and state

def test_seed_reproduces_a_run():
    users, items, _, _ = planted()
    a, b = small(seed=3).fit(users, items), small(seed=3).fit(users, items)
    assert torch.equal(a.P, b.P) and torch.equal(a.Q, b.Q) and a.losses == b.losses
    assert not torch.equal(a.P, small(seed=4).fit(users, items).P)


def test_arrays_dataframe_sparse_matrix_and_ratings_give_the_same_model():
    users, items, _, _ = planted()
    counts = np.random.default_rng(2).integers(1, 5, len(users)).astype(float)
    a = small(scaling="log").fit(users, items, counts)
    b = small(scaling="log").fit(pd.DataFrame({"user": users, "item": items, "count": counts}))
    c = small(scaling="log").fit(sp.csr_matrix((counts, (users, items)), shape=(M, N)))
    e = small(scaling="log").fit(Ratings(users, items, counts))  # third column: the weights
    # the same pair twice adds up: (u, i, 1) + (u, i, count - 1) is (u, i, count)
    twice = counts > 1
    d = small(scaling="log").fit(np.r_[users, users[twice]], np.r_[items, items[twice]],
                                 np.r_[np.where(twice, 1, counts), counts[twice] - 1])
    for other in (b, c, d, e):
        assert torch.equal(a.P, other.P) and torch.equal(a.Q, other.Q)


def test_ctrl_c_keeps_the_model_so_far():
    users, items, _, _ = planted()

    def interrupt(record):
        if record.epoch == 2:
            raise KeyboardInterrupt

    model = small().fit(users, items, callback=interrupt)
    assert model.interrupted and len(model.history) == len(model.losses) == 2
    assert len(model.recommend_batch([0], k=3)[0][0]) == 3


def test_string_ids_and_save_load_round_trip(tmp_path):
    users, items, _, _ = planted()
    model = small().fit([f"u{u}" for u in users], [f"item {i}" for i in items])
    path = str(tmp_path / "implicit.pt")
    model.save(path)
    loaded = ImplicitMatrixFactorization.load(path)
    assert torch.equal(loaded.P, model.P) and torch.equal(loaded.Q, model.Q)
    assert loaded.config == model.config and loaded.losses == model.losses
    got, want = loaded.recommend_batch(["u3", "u9"], k=4), model.recommend_batch(["u3", "u9"], k=4)
    assert (got[0] == want[0]).all() and np.array_equal(got[1], want[1])
    assert loaded.recommend("u3", k=4) == model.recommend("u3", k=4)
    assert not set(i for i, _ in model.recommend("u3", k=30)) & {
        f"item {i}" for i in items[users == 3]}


@pytest.mark.gpu
@pytest.mark.parametrize("solver", ["als", "adam"])
def test_cuda_fit_matches_the_cpu_fit(solver):
    """The same seeded float64 fit on the GPU and on the CPU (the CUDA observed op sums with
    atomics, so the last bits differ), and the GPU model recommends like the CPU one."""
    users, items, _, _ = planted()
    strengths = np.random.default_rng(1).integers(1, 4, len(users)).astype(float)
    cpu = small(solver=solver, dtype=torch.float64).fit(users, items, strengths)
    gpu = small(solver=solver, dtype=torch.float64, device="cuda").fit(users, items, strengths)
    assert gpu.P.is_cuda and gpu.Q.is_cuda
    torch.testing.assert_close(gpu.P.cpu(), cpu.P, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gpu.Q.cpu(), cpu.Q, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gpu.losses, cpu.losses, rtol=1e-10)
    got, want = gpu.recommend_batch(np.arange(M), k=5), cpu.recommend_batch(np.arange(M), k=5)
    np.testing.assert_array_equal(got[0], want[0])


def test_bad_inputs_raise_clear_errors():
    users, items, _, _ = planted()
    fit = small(epochs=1).fit
    with pytest.raises(ValueError, match="same length, got 40 and 39"):
        fit(users[:40], items[:39])
    with pytest.raises(ValueError, match=r"weights must be finite and >= 0.*position 2: -1.0"):
        fit(users[:5], items[:5], [1, 1, -1, 1, 1])
    with pytest.raises(ValueError, match="position 0: nan"):
        fit(users[:2], items[:2], [np.nan, 1])
    with pytest.raises(ValueError, match=r"weights must be 1-D with one value per interaction"):
        fit(users[:2], items[:2], [1, 2, 3])
    with pytest.raises(ValueError, match="users must be 1-D"):
        fit(users[:4].reshape(2, 2), items[:4])
    with pytest.raises(ValueError, match="no interactions given"):
        fit(users[:3], items[:3], [0, 0, 0])
    with pytest.raises(TypeError, match="got int"):
        fit(5)
    with pytest.raises(TypeError, match="weights given without items"):
        fit(users, weights=np.ones(len(users)))
    with pytest.raises(ValueError, match=r"needs user and item columns, got \['user'\]"):
        fit(pd.DataFrame({"user": users}))
    with pytest.raises(ValueError, match="alpha must be a finite number > 0, got 0"):
        ImplicitMatrixFactorization(alpha=0)
    with pytest.raises(ValueError, match=r"solver must be \"als\" or \"adam\", got 'sgd'"):
        ImplicitMatrixFactorization(solver="sgd")
    model = fit(users, items)
    with pytest.raises(KeyError, match="unknown user 'nobody'"):
        model.recommend("nobody")
    with pytest.raises(ValueError, match=r"values \(interaction strengths\) must be >= 0"):
        model.recommend_new([1, 2], [1.0, -2.0])
    with pytest.raises(RuntimeError, match="call fit"):
        ImplicitMatrixFactorization().recommend(0)


def test_cli_fit_implicit_then_recommend(tmp_path, capsys):
    users, items, _, _ = planted()
    ratings = np.where(np.arange(len(users)) % 3 == 0, 2, 5)  # a third below --min-rating
    data = tmp_path / "u.data"
    data.write_text("".join(f"{u}\t{i}\t{r}\t0\n" for u, i, r in zip(users, items, ratings)))
    out = str(tmp_path / "model.pt")
    assert main(["fit-implicit", str(data), "--min-rating", "4", "--rank", "4", "--epochs", "3",
                 "-k", "5", "--out", out, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"{(ratings >= 4).sum()} interactions" in printed and "recall@5" in printed
    assert ImplicitMatrixFactorization.load(out).rank == 4
    assert main(["recommend", out, "7", "-k", "3"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    with pytest.raises(SystemExit) as exit_info:
        main(["fit-implicit", str(data), "--alpha", "-1"])
    assert exit_info.value.code == 2
    assert "--alpha: must be a finite number > 0, got '-1'" in capsys.readouterr().err

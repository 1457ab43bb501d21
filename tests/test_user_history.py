"""The SVD++ term (mf_ext/user_history.py) and the data-adaptive defaults of MatrixFactorization,
on small synthetic ratings (never the MovieLens files)."""

import os

import numpy as np
import pytest
import torch

from mf_ext import MatrixFactorization, Ratings
from mf_ext.model import (REFERENCE_RATINGS_PER_ITEM, REG_AT_REFERENCE, REG_EXPONENT,
                          default_reg)
from mf_ext.user_history import UserHistory

from helpers import synthetic_ratings as synthetic

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def dense_history(users, items, m, n):
    """S[u, j] = |N(u)|^-½ for the distinct pairs (u, j), as a dense float64 tensor."""
    S = torch.zeros(m, n, dtype=torch.float64)
    S[torch.as_tensor(users), torch.as_tensor(items)] = 1.0
    return S / S.sum(1, keepdim=True).clamp_min(1).sqrt()


def pairs(m=7, n=5, count=20, seed=0):
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, m - 1, count), rng.integers(0, n, count)  # user m-1: none
    return np.concatenate([users, users[:3]]), np.concatenate([items, items[:3]])  # repeats


# ---------------------------------------------------------------- the term itself

@pytest.mark.parametrize("rank", [1, 3])
def test_term_equals_the_dense_product_and_its_gradient(rank):
    m, n = 7, 5
    users, items = pairs(m, n)
    history = UserHistory(users, items, m, n, torch.device("cpu"), torch.float64)
    S = dense_history(users, items, m, n)
    Y = torch.randn(rank, n, dtype=torch.float64, requires_grad=True)
    got = history.term(Y)
    assert got.shape == (rank, m)
    torch.testing.assert_close(got, Y @ S.T, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[:, m - 1], torch.zeros(rank, dtype=torch.float64))  # no history
    torch.autograd.gradcheck(history.term, (Y,))
    # and a transposed (non-contiguous) Y gives the same
    Yt = Y.detach().T.contiguous().T.requires_grad_()
    torch.testing.assert_close(history.term(Yt), Y @ S.T, rtol=1e-12, atol=1e-12)


def test_term_in_float32_is_within_float32_tolerance():
    # the project's rule: the error against float64 within 2x that of the plain float32
    # computation, plus a few ulps of the output's scale
    m, n = 9, 6
    users, items = pairs(m, n, count=30, seed=1)
    S = dense_history(users, items, m, n)
    Y64, G64 = torch.randn(4, n, dtype=torch.float64), torch.randn(4, m, dtype=torch.float64)
    Y = Y64.float().requires_grad_()
    history = UserHistory(users, items, m, n, torch.device("cpu"), torch.float32)
    out = history.term(Y)
    out.backward(G64.float())
    for got, exact, eager in ((out, Y64 @ S.T, Y64.float() @ S.float().T),
                              (Y.grad, G64 @ S, G64.float() @ S.float())):
        assert got.dtype == torch.float32
        floor = 8 * torch.finfo(torch.float32).eps * exact.abs().max()
        assert (got.double() - exact).abs().max() <= 2 * (eager.double() - exact).abs().max() \
            + floor


# ---------------------------------------------------------------- N(u): training pairs only

def history_during_fit(model, users, items, ratings, **fit_args):
    """The dense S the fit used, read at the end of its first epoch."""
    seen = []
    model.epochs = 1
    model.fit(users, items, ratings, callback=lambda _: seen.append(
        model._history.S.to_dense().double()), **fit_args)
    return seen[0]


def test_history_holds_the_training_pairs_only_with_a_validation_set():
    users, items, ratings = synthetic(m=20, n=12, density=0.5)
    train, held = np.arange(len(ratings)) % 4 != 0, np.arange(len(ratings)) % 4 == 0
    model = MatrixFactorization(rank=2, dtype=torch.float64)
    S = history_during_fit(model, users[train], items[train], ratings[train],
                           validation=Ratings(users[held], items[held], ratings[held]))
    u, i = model.user_map.index(users[train]), model.item_map.index(items[train])
    torch.testing.assert_close(S, dense_history(u, i, len(model.user_map), len(model.item_map)),
                               rtol=0, atol=0)
    # none of the held-out pairs is in N(u)
    hu, hi = model.user_map.index(users[held]), model.item_map.index(items[held])
    known = (hu >= 0) & (hi >= 0)
    assert (S[hu[known], hi[known]] == 0).all()


def test_history_leaves_out_the_held_out_share():
    users, items, ratings = synthetic(m=20, n=12, density=0.5)
    model = MatrixFactorization(rank=2, validation_fraction=0.3, dtype=torch.float64)
    S = history_during_fit(model, users, items, ratings)
    nonzero = int((S != 0).sum())
    assert nonzero == len(ratings) - int(round(len(ratings) * 0.3))  # synthetic's pairs are distinct


def test_fitted_user_vectors_include_the_term():
    users, items, ratings = synthetic()
    model = MatrixFactorization(rank=3, epochs=5, dtype=torch.float64, clip=False)
    raw = []
    model.fit(users, items, ratings, callback=lambda _: raw.append(
        (model.P.detach().clone(), model.Y.detach().clone())))
    P, Y = raw[-1]
    S = dense_history(model.user_map.index(users), model.item_map.index(items),
                      len(model.user_map), len(model.item_map))
    torch.testing.assert_close(model.P, P + Y @ S.T, rtol=1e-12, atol=1e-12)
    assert model._history is None  # N(u) is not kept after the fit
    u, i = model.user_map.index(users), model.item_map.index(items)
    expected = (model.global_mean + model.user_bias[u] + model.item_bias[i]
                + (model.P[:, u] * model.Q[:, i]).sum(0))
    np.testing.assert_allclose(model.predict(users, items), expected.numpy(), rtol=1e-12)


def test_implicit_false_has_no_y():
    users, items, ratings = synthetic()
    model = MatrixFactorization(rank=3, epochs=3, implicit=False).fit(users, items, ratings)
    assert model.Y is None


# ---------------------------------------------------------------- adaptive defaults

@pytest.mark.parametrize("n_ratings, n_items", [(80_000, 1648), (438_885, 3599), (10, 40),
                                                (500, 1)])
def test_default_reg_is_the_documented_function(n_ratings, n_items):
    per_item = max(n_ratings / n_items, 1.0)
    assert default_reg(n_ratings, n_items) == pytest.approx(
        REG_AT_REFERENCE * (per_item / REFERENCE_RATINGS_PER_ITEM) ** -REG_EXPONENT, rel=1e-15)
    assert default_reg(int(REFERENCE_RATINGS_PER_ITEM * 100), 100) == pytest.approx(
        REG_AT_REFERENCE)
    assert default_reg(4 * n_ratings, n_items) <= default_reg(n_ratings, n_items)


def test_fit_uses_default_reg_of_its_training_data_unless_reg_is_given():
    users, items, ratings = synthetic()
    auto = MatrixFactorization(rank=2, epochs=1, validation_fraction=0.25).fit(
        users, items, ratings)
    n_train = len(ratings) - int(round(len(ratings) * 0.25))
    assert auto.reg is None
    assert auto.effective_reg == default_reg(n_train, len(auto.item_map))
    given = MatrixFactorization(rank=2, epochs=1, reg=0.3).fit(users, items, ratings)
    assert given.effective_reg == 0.3


def test_bad_implicit_reg_scale():
    with pytest.raises(ValueError, match=r"^mf_ext\.MatrixFactorization: implicit_reg_scale must "
                                         r"be a finite number >= 0, got -1"):
        MatrixFactorization(implicit_reg_scale=-1)
    with pytest.raises(ValueError, match=r"^mf_ext\.MatrixFactorization: reg must be a finite "
                                         r"number >= 0, got nan"):
        MatrixFactorization(reg=float("nan"))


# ---------------------------------------------------------------- files

def test_save_load_round_trip_keeps_the_term_and_reg(tmp_path):
    users, items, ratings = synthetic()
    model = MatrixFactorization(rank=3, epochs=5).fit(users, items, ratings)
    path = str(tmp_path / "m.pt")
    model.save(path)
    loaded = MatrixFactorization.load(path)
    assert loaded.implicit is None and loaded.Y is not None and loaded.reg is None
    assert loaded.effective_reg == model.effective_reg
    assert torch.equal(loaded.Y, model.Y) and torch.equal(loaded.P, model.P)
    np.testing.assert_array_equal(loaded.predict(users, items), model.predict(users, items))
    assert loaded.recommend(users[0], 3) == model.recommend(users[0], 3)


def test_a_version_1_file_loads_without_the_term():
    model = MatrixFactorization.load(os.path.join(DATA, "model_format1.pt"))
    assert model.implicit is False and model.Y is None
    assert model.effective_reg == model.reg == 0.12

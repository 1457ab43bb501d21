"""Top-N recommendation (mf_ext.ranking's TopN on MatrixFactorization): recommend_batch against a
dense brute-force ranking, the deterministic top-k, chunking, recommend_new's fold-in."""

import math

import numpy as np
import pytest
import torch

import mf_ext.ranking as ranking
from mf_ext import MatrixFactorization
from mf_ext.ranking import top_k
from helpers import synthetic_ratings as synthetic


@pytest.fixture(scope="module")
def data():
    return synthetic(m=30, n=20, density=0.5)


@pytest.fixture(scope="module")
def model(data):
    # cosine decay to a tiny lr: the fit reaches its optimum, which the fold-in test needs
    return MatrixFactorization(rank=3, epochs=600, lr=0.05, reg=0.05, bias_reg=0.5,
                               lr_schedule="cosine", dtype=torch.float64,
                               seed=0).fit(*data)


def dense_scores(model):
    """(m, n) unclipped predictions in numpy, formed independently of the ranking code."""
    P, Q = model.P.numpy(), model.Q.numpy()
    return (model.global_mean + model.user_bias.numpy()[:, None]
            + model.item_bias.numpy()[None, :] + P.T @ Q)


def brute_force_top(scores, k, exclude=None):
    """Best first, equal scores by lower index, excluded items never: via a full lexsort."""
    scores = scores.copy()
    if exclude is not None:
        scores[exclude] = -np.inf
    order = np.lexsort((np.arange(len(scores)), -scores))
    return order[:k]


def seen_mask(model, users, items):
    mask = np.zeros((len(model.user_map), len(model.item_map)), dtype=bool)
    mask[model.user_map.index(users), model.item_map.index(items)] = True
    return mask


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_recommend_batch_is_the_dense_ranking(model, data, exclude_seen):
    users, items, _ = data
    k = 4
    ids = np.unique(users)[::-1]  # any order of users, as given
    got_items, got_scores = model.recommend_batch(ids, k=k, exclude_seen=exclude_seen)
    assert got_items.shape == got_scores.shape == (len(ids), k)
    dense, seen = dense_scores(model), seen_mask(model, users, items)
    for row, user in enumerate(ids):
        u = model.user_map.index(np.array([user]))[0]
        want = brute_force_top(dense[u], k, seen[u] if exclude_seen else None)
        np.testing.assert_array_equal(got_items[row], model.item_map.raw(want))
        # the scores are the predicted ratings, as predict() gives them (clipped)
        np.testing.assert_allclose(got_scores[row], model.predict([user] * k, got_items[row]),
                                   rtol=1e-13)
        if exclude_seen:
            assert not set(got_items[row]) & set(items[users == user])


def test_recommend_batch_agrees_with_recommend(model, data):
    user = data[0][0]
    got_items, got_scores = model.recommend_batch([user], k=5)
    one = model.recommend(user, k=5)
    assert list(got_items[0]) == [item for item, _ in one]
    np.testing.assert_allclose(got_scores[0], [score for _, score in one], rtol=1e-13)


def test_repeated_users_and_no_users(model, data):
    user = data[0][0]
    items, scores = model.recommend_batch([user, user], k=3)
    np.testing.assert_array_equal(items[0], items[1])
    items, scores = model.recommend_batch([], k=3)
    assert items.shape == scores.shape == (0, 3)


@pytest.mark.parametrize("rows", [1, 3, 7])
def test_chunk_size_changes_nothing(model, data, monkeypatch, rows):
    ids = np.unique(data[0])
    big = model.recommend_batch(ids, k=3)
    monkeypatch.setattr(ranking, "CHUNK_BYTES", rows * ranking._BYTES_PER_CELL * 20)
    assert model._chunk_rows() == rows
    small = model.recommend_batch(ids, k=3)
    np.testing.assert_array_equal(small[0], big[0])
    # BLAS may round a product of another row count differently in the last bit
    np.testing.assert_allclose(small[1], big[1], rtol=1e-14)


def test_clipping_ties_are_ranked_by_the_unclipped_prediction(data):
    users, items, ratings = data
    model = MatrixFactorization(rank=2, epochs=5, seed=0).fit(users, items, ratings)
    top = model.rating_range[1]
    with torch.no_grad():  # three items predicted past the top of the range, by 3, 1 and 2
        model.item_bias[[4, 9, 13]] = torch.tensor([3.0, 1.0, 2.0]) + top
    user = model.user_map.ids[0]
    model._rated_indptr = np.zeros(len(model.user_map) + 1, dtype=np.int64)  # nothing seen
    model._rated_indices = np.zeros(0, dtype=np.int64)
    got_items, got_scores = model.recommend_batch([user], k=3)
    np.testing.assert_array_equal(got_items[0], model.item_map.raw([4, 13, 9]))
    np.testing.assert_array_equal(got_scores[0], [top] * 3)  # reported clipped, as predict
    assert model.recommend(user, k=3) == [(item, top) for item in model.item_map.raw([4, 13, 9])]
    # recommend's `exclude`, and fewer than k left
    assert [item for item, _ in model.recommend(user, k=2, exclude=model.item_map.raw([13]))] \
        == list(model.item_map.raw([4, 9]))
    n = len(model.item_map)
    assert len(model.recommend(user, k=n + 5, exclude=model.item_map.raw([1, 2]))) == n - 2
    assert model.recommend(user, k=3, exclude=model.item_map.ids) == []


def test_scoring_leaves_grad_mode_alone(model):
    chunks = model._score_chunks(np.arange(3), exclude_seen=True)
    next(chunks)  # a generator left suspended
    assert torch.is_grad_enabled()


def test_ties_come_in_item_order(model, data):
    tied = MatrixFactorization.__new__(MatrixFactorization)
    tied.__dict__.update(model.__dict__)
    with torch.no_grad():  # items 2, 5, 11 and 17 identical: equal scores for every user
        tied.Q = model.Q.clone()
        tied.item_bias = model.item_bias.clone()
        tied.Q[:, [2, 5, 11, 17]] = 0.0
        tied.item_bias[[2, 5, 11, 17]] = 10.0  # and the best items
        tied.Q[:, 8] = 0.0
        tied.item_bias[8] = 20.0
    tied._rated_indptr = np.zeros(len(model.user_map) + 1, dtype=np.int64)
    tied._rated_indices = np.zeros(0, dtype=np.int64)
    ids = np.unique(data[0])[:3]
    for k, want in [(1, [8]), (3, [8, 2, 5]), (5, [8, 2, 5, 11, 17])]:
        items, _ = tied.recommend_batch(ids, k=k)
        np.testing.assert_array_equal(items, np.tile(model.item_map.raw(want), (3, 1)))


@pytest.mark.parametrize("seed", range(5))
def test_top_k_against_lexsort(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (9, 13), generator=gen).double()  # many ties
    scores[torch.rand(9, 13, generator=gen) < 0.3] = -math.inf
    for k in (1, 4, 13):
        values, index = top_k(scores, k)
        for row in range(9):
            want = brute_force_top(scores[row].numpy(), k)
            np.testing.assert_array_equal(index[row].numpy(), want)
            np.testing.assert_array_equal(values[row].numpy(), scores[row].numpy()[want])


def test_fewer_items_left_than_k(model, data):
    users, items, _ = data
    counts = {u: len(set(items[users == u])) for u in np.unique(users)}
    user = max(counts, key=counts.get)
    n = len(model.item_map)
    left = n - counts[user]
    assert model.recommend_batch([user], k=left)[0].shape == (1, left)
    with pytest.raises(ValueError, match=rf"user {user.item()!r} has only {left} unseen items, "
                                         rf"fewer than k = {left + 1}"):
        model.recommend_batch([user], k=left + 1)
    assert model.recommend_batch([user], k=n, exclude_seen=False)[0].shape == (1, n)


def test_recommend_batch_bad_input(model, data):
    user = data[0][0]
    n = len(model.item_map)
    with pytest.raises(KeyError, match=r"recommend_batch: unknown user 'ghost' \(and 1 more\)"):
        model.recommend_batch([user, "ghost", "nobody"])
    with pytest.raises(ValueError, match=rf"k must be an integer in \[1, {n}\], got 0"):
        model.recommend_batch([user], k=0)
    with pytest.raises(ValueError, match=rf"k must be an integer in \[1, {n}\], got {n + 1}"):
        model.recommend_batch([user], k=n + 1)
    with pytest.raises(TypeError, match=r"k must be an integer, got 2.5"):
        model.recommend_batch([user], k=2.5)
    with pytest.raises(TypeError, match=r"exclude_seen must be True or False, got 'no'"):
        model.recommend_batch([user], exclude_seen="no")
    with pytest.raises(ValueError, match=r"users must be a 1-D array-like of user ids, got "
                                         r"shape \[\]"):
        model.recommend_batch(user)
    with pytest.raises(RuntimeError, match="call fit"):
        MatrixFactorization().recommend_batch([user])
    broken = MatrixFactorization.__new__(MatrixFactorization)
    broken.__dict__.update(model.__dict__)
    broken.P = model.P.clone()
    broken.P[:, 1] = math.nan
    who = model.user_map.ids[1].item()
    with pytest.raises(ValueError, match=rf"scores for user {who!r} are NaN"):
        broken.recommend_batch(model.user_map.ids)


# ---------------------------------------------------------------------- recommend_new

def ridge_by_least_squares(model, item_index, values):
    """The fold-in's minimizer computed another way: least squares of the stacked system
    [Zᵀ; √D] x ≈ [y; 0] (the penalty as extra rows), not the normal equations. With the SVD++
    term t = c^-½ Σ_i y_i (fixed by the items), the user's vector is p + t."""
    Q = model.Q.numpy()[:, item_index]
    c, r = len(item_index), Q.shape[0]
    Z = np.vstack([Q, np.ones(c)])
    t = model.Y.numpy()[:, item_index].sum(1) / np.sqrt(c) if model.Y is not None else np.zeros(r)
    y = values - model.global_mean - model.item_bias.numpy()[item_index] - t @ Q
    penalty = np.sqrt(np.r_[[model.reg * c ** model.factor_count_exponent] * r,
                            model.bias_reg * c ** model.bias_count_exponent])
    x = np.linalg.lstsq(np.vstack([Z.T, np.diag(penalty)]), np.r_[y, np.zeros(r + 1)],
                        rcond=None)[0]
    return x[:r] + t, x[r]


def test_recommend_new_is_the_ridge_fold_in(model):
    item_ids = model.item_map.ids[[1, 4, 6, 7, 15]]
    values = np.array([5.0, 1.0, 4.0, 2.5, 3.0])
    p, b = ridge_by_least_squares(model, model.item_map.index(item_ids), values)
    got_p, got_b = model._fold_in(model.item_map.index(item_ids), values)
    np.testing.assert_allclose(got_p.numpy(), p, rtol=1e-10, atol=1e-12)
    assert got_b == pytest.approx(b, rel=1e-10, abs=1e-12)
    dense = (model.global_mean + b + model.item_bias.numpy()
             + p @ model.Q.numpy())
    exclude = np.zeros(len(dense), dtype=bool)
    exclude[[1, 4, 6, 7, 15]] = True
    want = brute_force_top(dense, 5, exclude)
    items, scores = model.recommend_new(item_ids, values, k=5)
    np.testing.assert_array_equal(items, model.item_map.raw(want))
    np.testing.assert_allclose(scores, np.clip(dense[want], *model.rating_range), rtol=1e-12)


def test_fold_in_without_penalty_is_the_minimum_norm_solution(model):
    # reg = bias_reg = 0 and 2 ratings for r + 1 = 4 unknowns: a singular system, whose
    # minimum-norm least-squares solution is pinv(Zᵀ) y
    index, values = np.array([3, 8]), np.array([4.0, 2.0])
    Z = np.vstack([model.Q.numpy()[:, index], np.ones(2)])
    t = model.Y.numpy()[:, index].sum(1) / np.sqrt(2)  # the SVD++ term, fixed by the items
    want = np.linalg.pinv(Z.T) @ (values - model.global_mean - model.item_bias.numpy()[index]
                                  - t @ Z[:-1])
    want[:-1] += t
    reg, bias_reg = model.reg, model.bias_reg
    try:
        model.reg = model.bias_reg = 0.0
        p, b = model._fold_in(index, values)
    finally:
        model.reg, model.bias_reg = reg, bias_reg
    np.testing.assert_allclose(np.r_[p.numpy(), b], want, rtol=1e-9, atol=1e-12)


def test_fold_in_recovers_a_training_users_own_vector(model, data):
    # At the fit's optimum each user's (p_u, b_u) minimizes the same ridge problem that the
    # fold-in solves, given that user's ratings and the fitted item side.
    users, items, ratings = data
    for user in np.unique(users)[:6]:
        mine = users == user
        p, b = model._fold_in(model.item_map.index(items[mine]), ratings[mine])
        u = model.user_map.index(np.array([user]))[0]
        np.testing.assert_allclose(p.numpy(), model.P[:, u].numpy(), atol=1e-9)
        assert b == pytest.approx(model.user_bias[u].item(), abs=1e-9)
        new_items, new_scores = model.recommend_new(items[mine], ratings[mine], k=3)
        batch_items, batch_scores = model.recommend_batch([user], k=3)
        np.testing.assert_array_equal(new_items, batch_items[0])


def test_recommend_new_with_no_known_item_ranks_by_item_bias(model):
    with pytest.warns(UserWarning, match=r"ignoring 2 item\(s\) the model does not know, "
                                         r"e.g. -7"):
        items, _ = model.recommend_new([-7, -8], [4.0, 5.0], k=4)
    want = brute_force_top(model.item_bias.numpy(), 4)
    np.testing.assert_array_equal(items, model.item_map.raw(want))
    items, _ = model.recommend_new([], [], k=4)
    np.testing.assert_array_equal(items, model.item_map.raw(want))


def test_recommend_new_ignores_unknown_items_but_uses_the_rest(model):
    known = model.item_map.ids[[2, 3]]
    with pytest.warns(UserWarning, match="ignoring 1 item"):
        with_unknown = model.recommend_new([known[0], -5, known[1]], [5.0, 1.0, 2.0], k=5)
    alone = model.recommend_new(known, [5.0, 2.0], k=5)
    np.testing.assert_array_equal(with_unknown[0], alone[0])
    np.testing.assert_array_equal(with_unknown[1], alone[1])


def test_recommend_new_bad_input(model):
    ids = model.item_map.ids[:2]
    n = len(model.item_map)
    who = "mf_ext.MatrixFactorization.recommend_new"
    with pytest.raises(ValueError, match=f"{who}: values .* are needed by the explicit model"):
        model.recommend_new(ids)
    with pytest.raises(ValueError, match="items and values must have the same length, got 2 "
                                         "and 3"):
        model.recommend_new(ids, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"values must be finite, got nan at position 1"):
        model.recommend_new(ids, [1.0, math.nan])
    with pytest.raises(TypeError, match="values must be numbers"):
        model.recommend_new(ids, ["a", "b"])
    with pytest.raises(ValueError, match=r"items must be 1-D, got shape \[1, 2\]"):
        model.recommend_new([ids], [1.0, 2.0])
    with pytest.raises(ValueError, match=rf"k must be an integer in \[1, {n}\], got 0"):
        model.recommend_new(ids, [1.0, 2.0], k=0)
    with pytest.raises(ValueError, match=rf"only {n - 2} items are left .* fewer than k = {n}"):
        model.recommend_new(ids, [1.0, 2.0], k=n)


@pytest.mark.gpu
def test_cuda_model_ranks_like_the_cpu_model(model, data):
    on_gpu = MatrixFactorization.__new__(MatrixFactorization)
    on_gpu.__dict__.update(model.__dict__)
    on_gpu.P, on_gpu.Q = model.P.cuda(), model.Q.cuda()
    on_gpu.user_bias, on_gpu.item_bias = model.user_bias.cuda(), model.item_bias.cuda()
    ids = np.unique(data[0])
    cpu, gpu = model.recommend_batch(ids, k=5), on_gpu.recommend_batch(ids, k=5)
    np.testing.assert_array_equal(gpu[0], cpu[0])
    np.testing.assert_allclose(gpu[1], cpu[1], rtol=1e-12)
    item_ids = model.item_map.ids[[1, 4]]
    np.testing.assert_array_equal(on_gpu.recommend_new(item_ids, [5.0, 1.0], k=5)[0],
                                  model.recommend_new(item_ids, [5.0, 1.0], k=5)[0])


@pytest.mark.parametrize("count", [10, 600])  # einsum's loop below ~2M multiply-adds, BLAS above
def test_fold_in_products_either_way(count):
    from mf_ext.model import _small_products
    rng = np.random.default_rng(count)
    Z, y = rng.normal(size=(65, count)), rng.normal(size=count)
    A, rhs = _small_products(Z, y)
    np.testing.assert_allclose(A, Z @ Z.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rhs, Z @ y, rtol=1e-12, atol=1e-12)

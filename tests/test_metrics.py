"""mf_ext.metrics: each ranking metric on cases worked out by hand, against a brute-force
reference written here from the definitions, evaluate_ranking on a model against a dense
ranking, and leave_out_split's rules."""

import math

import numpy as np
import pytest
import torch

import mf_ext.ranking as ranking
from mf_ext import MatrixFactorization
from mf_ext.data import Ratings
from mf_ext.metrics import (auc, evaluate_ranking, leave_out_split, map_at_k, ndcg_at_k,
                            precision_at_k, recall_at_k)

L2, L3 = math.log2, lambda j: 1 / math.log2(j + 1)  # L3(j): the gain of place j (1-based)


# ---------------------------------------------------------------------- by hand

def test_one_user_by_hand():
    # list 1 2 3 4, relevant {2, 4, 9}: hits at places 2 and 4, |T| = 3
    recommended, relevant = [[1, 2, 3, 4]], [{2, 4, 9}]
    assert precision_at_k(recommended, relevant, 4) == 2 / 4
    assert recall_at_k(recommended, relevant, 4) == pytest.approx(2 / 3)
    # DCG = 1/log2(3) + 1/log2(5); ideal over min(4, 3) = 3 places: 1 + 1/log2(3) + 1/log2(4)
    assert ndcg_at_k(recommended, relevant, 4) == pytest.approx(
        (1 / L2(3) + 1 / L2(5)) / (1 + 1 / L2(3) + 1 / 2))
    # AP = (precision@2 + precision@4) / min(4, 3) = (1/2 + 2/4) / 3
    assert map_at_k(recommended, relevant, 4) == pytest.approx(1 / 3)
    # k = 2: one hit at place 2; ideal over min(2, 3) = 2 places; AP = (1/2) / 2
    assert precision_at_k(recommended, relevant, 2) == 1 / 2
    assert recall_at_k(recommended, relevant, 2) == pytest.approx(1 / 3)
    assert ndcg_at_k(recommended, relevant, 2) == pytest.approx(L3(2) / (1 + L3(2)))
    assert map_at_k(recommended, relevant, 2) == pytest.approx(1 / 4)


def test_mean_over_users_skips_users_without_relevant_items():
    # user 0 as above (k = 4); user 1: list 5 6 7 8, relevant {5}: one hit at place 1
    # (precision 1/4, recall 1, NDCG 1, AP 1); user 2 has no relevant item: skipped
    recommended = [[1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 3, 4]]
    relevant = [{2, 4, 9}, {5}, set()]
    assert precision_at_k(recommended, relevant, 4) == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert recall_at_k(recommended, relevant, 4) == pytest.approx((2 / 3 + 1) / 2)
    assert map_at_k(recommended, relevant, 4) == pytest.approx((1 / 3 + 1) / 2)
    assert ndcg_at_k(recommended, relevant, 4) == pytest.approx(
        ((1 / L2(3) + 1 / L2(5)) / (1 + 1 / L2(3) + 1 / 2) + 1) / 2)


def test_a_short_list_counts_its_missing_places_as_misses():
    # one item, a hit, k = 2: precision 1/2 (k in the denominator), recall 1, AP 1 / min(2, 1)
    assert precision_at_k([["a"]], [["a"]], 2) == 1 / 2
    assert recall_at_k([["a"]], [["a"]], 2) == 1
    assert map_at_k([["a"]], [["a"]], 2) == 1
    assert ndcg_at_k([["a"]], [["a"]], 2) == 1


def test_auc_by_hand():
    # ranking a b c d, relevant {b, d}: pairs (b, a) wrong, (b, c) right, (d, a) and (d, c)
    # wrong: 1 of 4. A second user: x y z, relevant {x}: 2 of 2. A third: all relevant, skipped.
    assert auc([list("abcd")], [{"b", "d"}]) == 1 / 4
    assert auc([list("abcd"), list("xyz"), list("pq")],
               [{"b", "d"}, {"x"}, {"p", "q"}]) == (1 / 4 + 1) / 2
    # relevant items absent from the ranking are ignored
    assert auc([list("abcd")], [{"b", "d", "zz"}]) == 1 / 4


# ---------------------------------------------------------------------- brute force

def reference_metrics(recommended, relevant, k):
    """The module docstring's definitions, one user at a time, in plain Python."""
    values = {"precision": [], "recall": [], "ndcg": [], "map": []}
    for row, wanted in zip(recommended, relevant):
        wanted = set(wanted)
        if not wanted:
            continue
        top = list(row)[:k]
        rel = [1 if item in wanted else 0 for item in top] + [0] * (k - len(top))
        values["precision"].append(sum(rel) / k)
        values["recall"].append(sum(rel) / len(wanted))
        dcg = sum(rel[j] / math.log2(j + 2) for j in range(k))
        ideal = sum(1 / math.log2(j + 2) for j in range(min(k, len(wanted))))
        values["ndcg"].append(dcg / ideal)
        values["map"].append(sum(rel[j] * sum(rel[:j + 1]) / (j + 1) for j in range(k))
                             / min(k, len(wanted)))
    return {name: float(np.mean(v)) for name, v in values.items()}


def reference_auc_of_scores(scores, positives, candidates):
    """Pairs (positive, negative candidate), ties one half."""
    negatives = [j for j in candidates if j not in positives]
    pairs = [1.0 if scores[p] > scores[q] else 0.5 if scores[p] == scores[q] else 0.0
             for p in positives for q in negatives]
    return sum(pairs) / len(pairs)


@pytest.mark.parametrize("seed", range(8))
def test_plain_metrics_against_the_reference(seed):
    rng = np.random.default_rng(seed)
    n_items, users = 12, 7
    recommended = [rng.permutation(n_items)[:rng.integers(1, 9)].tolist() for _ in range(users)]
    relevant = [set(rng.choice(n_items, rng.integers(0, 6), replace=False).tolist())
                for _ in range(users)]
    relevant[0] = {recommended[0][0]}  # at least one user to evaluate
    for k in (1, 3, 8):
        want = reference_metrics(recommended, relevant, k)
        assert precision_at_k(recommended, relevant, k) == pytest.approx(want["precision"],
                                                                         rel=1e-12)
        assert recall_at_k(recommended, relevant, k) == pytest.approx(want["recall"], rel=1e-12)
        assert ndcg_at_k(recommended, relevant, k) == pytest.approx(want["ndcg"], rel=1e-12)
        assert map_at_k(recommended, relevant, k) == pytest.approx(want["map"], rel=1e-12)
    rankings = [rng.permutation(n_items).tolist() for _ in range(users)]
    relevant = [set(r[:1]) | set(rng.choice(n_items, 3).tolist()) for r in rankings]
    want = np.mean([reference_auc_of_scores({item: -place for place, item in enumerate(r)},
                                            wanted, r) for r, wanted in zip(rankings, relevant)])
    assert auc(rankings, relevant) == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------------- a model's rankings

def integer_model(seed, m=9, n=11, r=2, density=0.3):
    """A MatrixFactorization whose scores are small integers (many ties), from fit(epochs=0)
    for its maps and training items, with the factors then set by hand."""
    rng = np.random.default_rng(seed)
    rows, cols = np.nonzero(rng.random((m, n)) < density)
    # plus one pair per user and per item, so that the model knows them all
    users = np.r_[rows, np.arange(m), np.arange(n) % m]
    items = np.r_[cols, np.arange(m) % n, np.arange(n)]
    model = MatrixFactorization(rank=r, epochs=0, dtype=torch.float64).fit(
        users, items, np.ones(len(users)))
    model.P = torch.as_tensor(rng.integers(-1, 2, (r, m)), dtype=torch.float64)
    model.Q = torch.as_tensor(rng.integers(-1, 2, (r, n)), dtype=torch.float64)
    model.user_bias = torch.as_tensor(rng.integers(0, 2, m), dtype=torch.float64)
    model.item_bias = torch.as_tensor(rng.integers(0, 2, n), dtype=torch.float64)
    return model, users, items


def reference_evaluation(model, train_users, train_items, test_users, test_items, k):
    """evaluate_ranking's documented result, from dense scores and full sorts."""
    scores = (model.user_bias.numpy()[:, None] + model.item_bias.numpy()[None, :]
              + model.P.numpy().T @ model.Q.numpy())
    n = scores.shape[1]
    recommended, relevant, aucs = [], [], []
    for user in np.unique(test_users):
        u = model.user_map.index(np.array([user]))[0]
        if u < 0:
            continue
        seen = set(train_items[train_users == user].tolist())
        wanted = set(test_items[test_users == user].tolist()) - seen
        if not wanted:
            continue
        candidates = [j for j in range(n) if model.item_map.ids[j] not in seen]
        order = sorted(candidates, key=lambda j: (-scores[u, j], j))
        recommended.append([model.item_map.ids[j] for j in order])
        relevant.append(wanted)
        positives = [j for j in candidates if model.item_map.ids[j] in wanted]
        if positives and len(positives) < len(candidates):
            aucs.append(reference_auc_of_scores(scores[u], positives, candidates))
    want = {f"{name}@{k}": value
            for name, value in reference_metrics(recommended, relevant, k).items()}
    return {**want, "users": len(recommended), "auc": float(np.mean(aucs)),
            "auc_users": len(aucs)}


@pytest.mark.parametrize("seed", range(6))
def test_evaluate_ranking_against_dense_ranking(seed, monkeypatch):
    model, users, items = integer_model(seed)
    rng = np.random.default_rng(100 + seed)
    test_users = rng.choice(users, 25)
    test_items = rng.integers(0, 11, 25)
    # a repeated test pair, a test pair that is also a training pair (dropped), an item the
    # model does not know (a miss that counts in |T|), a user it does not know (skipped)
    test_users = np.r_[test_users, test_users[0], users[0], users[1], 99]
    test_items = np.r_[test_items, test_items[0], items[0], 57, 3]
    for rows in (1, 4, None):
        if rows is not None:
            monkeypatch.setattr(ranking, "CHUNK_BYTES", rows * ranking._BYTES_PER_CELL * 11)
        for k in (1, 3, 7):
            want = reference_evaluation(model, users, items, test_users, test_items, k)
            with pytest.warns(UserWarning, match=r"skipping 1 test user\(s\) .* e.g. 99"):
                got = evaluate_ranking(model, (test_users, test_items), k=k)
            assert got.keys() == want.keys()
            for name in want:
                assert got[name] == pytest.approx(want[name], rel=1e-12), (name, k, rows)


def test_evaluate_ranking_auc_equals_auc_of_the_full_rankings():
    model, users, items = integer_model(3)
    with torch.no_grad():  # distinct scores: the full ranking is then the score order
        model.item_bias += torch.linspace(0, 0.01, model.Q.shape[1], dtype=torch.float64)
    test = Ratings(np.array([0, 0, 1, 2, 2, 2]), np.array([1, 5, 7, 0, 3, 10]), np.ones(6))
    got = evaluate_ranking(model, test, k=3, metrics=["auc"])
    rankings, relevant = [], []
    for user in (0, 1, 2):
        full, _ = model.recommend_batch([user], k=11 - len(set(items[users == user])))
        rankings.append(full[0].tolist())
        relevant.append(set(test.items[test.users == user]) - set(items[users == user]))
    assert got["auc"] == pytest.approx(auc(rankings, relevant), rel=1e-12)
    assert set(got) == {"auc", "users", "auc_users"}


def test_evaluate_ranking_bad_input():
    model, users, items = integer_model(0)
    who = "mf_ext.metrics.evaluate_ranking"
    test = (users[:3], items[:3] + 0)
    with pytest.raises(ValueError, match=rf"{who}: k must be an integer in \[1, 11\], got 0"):
        evaluate_ranking(model, test, k=0)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 11\], got 12"):
        evaluate_ranking(model, test, k=12)
    with pytest.raises(ValueError, match=r"metrics must be one or more of recall, ndcg, "
                                         r"precision, map, auc, got \['recall', 'hits'\]"):
        evaluate_ranking(model, test, metrics=["recall", "hits"])
    with pytest.raises(ValueError, match=r"metrics must be one or more of .* got \[\]"):
        evaluate_ranking(model, test, metrics=[])
    with pytest.raises(TypeError, match=r"test must be a Ratings or a \(users, items\) pair, "
                                        r"got list"):
        evaluate_ranking(model, [users, items])
    with pytest.raises(ValueError, match=r"test users and items must be 1-D of the same "
                                         r"length, got shapes \[3\] and \[2\]"):
        evaluate_ranking(model, (users[:3], items[:2]))
    with pytest.raises(RuntimeError, match="call fit"):
        evaluate_ranking(MatrixFactorization(), test)
    with pytest.raises(TypeError, match=r"model must be an mf_ext model with top-N "
                                        r"recommendation \(mf_ext.ranking.TopN\), got dict"):
        evaluate_ranking({}, test)
    with pytest.warns(UserWarning, match="skipping 1 test user"):
        with pytest.raises(ValueError, match="no test user the model knows has a test item "
                                             "outside its training items"):
            evaluate_ranking(model, (np.array([77]), np.array([1])))
    with pytest.raises(ValueError, match="no test user the model knows has a test item "
                                         "outside its training items"):
        evaluate_ranking(model, (users[:1], items[:1]))  # a training pair
    with pytest.raises(ValueError, match="AUC is undefined"):
        evaluate_ranking(model, (users[:1], np.array([1234])), metrics=["auc"])


def test_plain_metrics_bad_input():
    for metric in (precision_at_k, recall_at_k, ndcg_at_k, map_at_k):
        who = f"mf_ext.metrics.{metric.__name__}"
        with pytest.raises(ValueError, match=rf"{who}: k must be an integer >= 1, got 0"):
            metric([[1]], [[1]], 0)
        with pytest.raises(TypeError, match=r"k must be an integer, got 1.5"):
            metric([[1]], [[1]], 1.5)
        with pytest.raises(ValueError, match="recommended and relevant must have one entry "
                                             "per user, got 2 and 1"):
            metric([[1], [2]], [[1]], 1)
        with pytest.raises(ValueError, match=r"recommended\[1\] holds item 3 more than once"):
            metric([[1], [3, 4, 3]], [[1], [3]], 3)
        with pytest.raises(ValueError, match="no user has a relevant item"):
            metric([[1], [2]], [[], set()], 1)
        with pytest.raises(TypeError, match="must be sequences with one entry per user"):
            metric("ab", ["a", "b"], 1)
    with pytest.raises(ValueError, match=r"mf_ext.metrics.auc: rankings\[0\] holds item 'a' "
                                         r"more than once"):
        auc([list("aba")], [{"b"}])
    with pytest.raises(ValueError, match="no user has both a relevant and a non-relevant"):
        auc([list("ab")], [{"a", "b"}])
    with pytest.raises(ValueError, match="rankings and relevant must have one entry per user"):
        auc([list("ab")], [])


# ---------------------------------------------------------------------- leave_out_split

def interactions(per_user):
    """Users 0, 1, … with per_user[u] interactions each; the rating is the row number."""
    users = np.repeat(np.arange(len(per_user)), per_user)
    return Ratings(users, np.arange(len(users)) % 7, np.arange(len(users), dtype=float))


@pytest.mark.parametrize("fraction, test_counts", [
    # t_u = min(n_u − 1, max(1, ⌊fraction·n_u + 1/2⌋)) for n_u ≥ 2, else 0; for n_u =
    # 1, 2, 3, 5, 10, 11: fraction 0.2 gives ⌊0.9⌋→1 for n=2, ⌊1.1⌋ n=3, ⌊1.5⌋ n=5, ⌊2.5⌋, ⌊2.7⌋
    (0.2, [0, 1, 1, 1, 2, 2]),
    # 0.5: n=2 → min(1, ⌊1.5⌋), n=3 → min(2, ⌊2⌋), n=5 → ⌊3⌋, n=10 → ⌊5.5⌋, n=11 → ⌊6⌋
    (0.5, [0, 1, 2, 3, 5, 6]),
    # 0.95: everyone but one interaction (n_u − 1 caps it)
    (0.95, [0, 1, 2, 4, 9, 10]),
])
def test_leave_out_split_counts(fraction, test_counts):
    per_user = [1, 2, 3, 5, 10, 11]
    data = interactions(per_user)
    train, test = leave_out_split(data, fraction, seed=3)
    assert np.bincount(test.users, minlength=6).tolist() == test_counts
    assert np.bincount(train.users, minlength=6).tolist() == [
        n - t for n, t in zip(per_user, test_counts)]
    # each interaction (its rating is its row) is in exactly one part, in the input's order
    assert sorted(np.r_[train.ratings, test.ratings].tolist()) == data.ratings.tolist()
    assert np.all(np.diff(train.ratings) > 0) and np.all(np.diff(test.ratings) > 0)
    rows = np.r_[train.ratings, test.ratings].astype(int)
    np.testing.assert_array_equal(np.r_[train.users, test.users], data.users[rows])
    np.testing.assert_array_equal(np.r_[train.items, test.items], data.items[rows])


def test_leave_out_split_is_seeded_and_random_within_users():
    data = interactions([10] * 20)
    a, b = leave_out_split(data, 0.3, seed=5), leave_out_split(data, 0.3, seed=5)
    np.testing.assert_array_equal(a[1].ratings, b[1].ratings)
    others = [leave_out_split(data, 0.3, seed=s)[1].ratings for s in range(6, 10)]
    assert all(not np.array_equal(a[1].ratings, other) for other in others)
    # which of a user's interactions are held out varies: every place is held out somewhere
    places = np.concatenate([leave_out_split(data, 0.3, seed=s)[1].ratings % 10
                             for s in range(10)])
    assert set(places.tolist()) == set(range(10))


def test_leave_out_split_takes_string_ids():
    users = np.array(["b", "a", "b", "a", "c"])
    train, test = leave_out_split(Ratings(users, np.arange(5), np.ones(5)), 0.5, seed=0)
    assert sorted(test.users.tolist()) == ["a", "b"]
    assert sorted(train.users.tolist()) == ["a", "b", "c"]


def test_leave_out_split_bad_input():
    data = interactions([3, 3])
    who = "mf_ext.metrics.leave_out_split"
    for bad in (0, 1, 1.5, -0.1, math.nan):
        with pytest.raises(ValueError, match=rf"{who}: fraction must be a number in \(0, 1\), "
                                             rf"got {bad}"):
            leave_out_split(data, bad)
    with pytest.raises(TypeError, match="fraction must be a number, got '0.2'"):
        leave_out_split(data, "0.2")
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\), got -1"):
        leave_out_split(data, 0.2, seed=-1)
    with pytest.raises(TypeError, match="pass users, items and ratings"):
        leave_out_split([1, 2, 3])

"""Ranking metrics with binary relevance, a per-user hold-out split, and the evaluation of a
model's top-N lists on held-out interactions.

Two ways in:
  - `evaluate_ranking(model, test, k)` for mf_ext's models (anything with mf_ext.ranking.TopN):
    each test user's items ranked by the model, its training items excluded;
  - `recall_at_k(recommended, relevant, k)` and its siblings, and `auc(rankings, relevant)`,
    for rankings made elsewhere: one row of recommended item ids per user, best first, and one
    collection of relevant item ids per user.

Every metric is a mean over users; users with no relevant item are skipped (their metrics are
undefined), and a ValueError is raised when no user is left. For one user with relevant set T
(|T| ≥ 1) and top-k list L (rel_j = 1 when the j-th item of L is in T, j = 1 … k):
    hits@k      = Σ_j rel_j
    precision@k = hits@k / k                    (k, even where L is shorter)
    recall@k    = hits@k / |T|
    DCG@k       = Σ_j rel_j / log2(j + 1),   IDCG@k = Σ_{j=1}^{min(k, |T|)} 1 / log2(j + 1),
    NDCG@k      = DCG@k / IDCG@k
    AP@k        = (1 / min(k, |T|)) Σ_j rel_j · precision@j,   MAP@k = the mean of AP@k
    AUC         = the share of (relevant, non-relevant) pairs of ranked candidates in which the
                  relevant item is ranked higher (ties in scores count one half); users with no
                  relevant or no non-relevant candidate are skipped.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch

from mf_ext.checks import SEED, Number, check_int
from mf_ext.data import Ratings, as_ratings
from mf_ext.ranking import TopN, _plain

METRICS = ("recall", "ndcg", "precision", "map", "auc")
_OPEN_FRACTION = Number("a number in (0, 1)", lambda x: 0 < x < 1)


# ---------------------------------------------------------------------- plain functions

def precision_at_k(recommended: Sequence[Sequence[Any]], relevant: Sequence[Iterable[Any]],
                   k: int) -> float:
    """Mean precision@k = hits / k (module docstring) over users with a relevant item.
    recommended: one sequence of item ids per user, best first (its first k are used; a
    shorter one counts its missing places as misses); relevant: one collection of item ids per
    user, in the same order."""
    hits, n_relevant = _hit_matrix("mf_ext.metrics.precision_at_k", recommended, relevant, k)
    return float(np.mean(_precision(hits)))


def recall_at_k(recommended: Sequence[Sequence[Any]], relevant: Sequence[Iterable[Any]],
                k: int) -> float:
    """Mean recall@k = hits / |user's relevant items| over users with a relevant item
    (arguments as precision_at_k)."""
    hits, n_relevant = _hit_matrix("mf_ext.metrics.recall_at_k", recommended, relevant, k)
    return float(np.mean(_recall(hits, n_relevant)))


def ndcg_at_k(recommended: Sequence[Sequence[Any]], relevant: Sequence[Iterable[Any]],
              k: int) -> float:
    """Mean NDCG@k, gains 1 / log2(position + 1), the ideal DCG over min(k, |relevant|)
    places (module docstring; arguments as precision_at_k)."""
    hits, n_relevant = _hit_matrix("mf_ext.metrics.ndcg_at_k", recommended, relevant, k)
    return float(np.mean(_ndcg(hits, n_relevant)))


def map_at_k(recommended: Sequence[Sequence[Any]], relevant: Sequence[Iterable[Any]],
             k: int) -> float:
    """MAP@k: the mean over users of AP@k = Σ_j rel_j · precision@j / min(k, |relevant|)
    (module docstring; arguments as precision_at_k)."""
    hits, n_relevant = _hit_matrix("mf_ext.metrics.map_at_k", recommended, relevant, k)
    return float(np.mean(_average_precision(hits, n_relevant)))


def auc(rankings: Sequence[Sequence[Any]], relevant: Sequence[Iterable[Any]]) -> float:
    """Mean AUC over users. rankings: per user the full ranking of its candidate items (all
    items it may be recommended, i.e. not its training items), best first, no repeats;
    relevant: per user its relevant items (those absent from its ranking are ignored). A user's
    AUC is the share of (relevant, non-relevant) pairs of its ranking in which the relevant
    item comes first; users with no relevant or no non-relevant ranked item are skipped."""
    who = "mf_ext.metrics.auc"
    _check_lengths(who, rankings, relevant, "rankings")
    values = []
    for user, (ranking, wanted) in enumerate(zip(rankings, relevant)):
        ranking = list(ranking)
        _check_no_repeats(who, "rankings", user, ranking)
        is_relevant = np.array([item in _as_set(wanted) for item in ranking], dtype=bool)
        positives = int(is_relevant.sum())
        negatives = len(ranking) - positives
        if positives == 0 or negatives == 0:
            continue
        # a relevant item at place j has (negatives ranked before it) above it, the rest below
        negatives_above = np.cumsum(~is_relevant)[is_relevant]
        values.append(float((negatives - negatives_above).sum()) / (positives * negatives))
    if not values:
        raise ValueError(f"{who}: no user has both a relevant and a non-relevant ranked item")
    return float(np.mean(values))


# ---------------------------------------------------------------------- per-user values

def _precision(hits: np.ndarray) -> np.ndarray:
    return hits.sum(1) / hits.shape[1]


def _recall(hits: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    return hits.sum(1) / n_relevant


def _ndcg(hits: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    k = hits.shape[1]
    gains = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.cumsum(gains)[np.minimum(k, n_relevant) - 1]
    return (hits * gains).sum(1) / ideal


def _average_precision(hits: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    k = hits.shape[1]
    precision_at_each = np.cumsum(hits, axis=1) / np.arange(1, k + 1)
    return (precision_at_each * hits).sum(1) / np.minimum(k, n_relevant)


_PER_USER = {"recall": _recall, "ndcg": _ndcg, "precision": lambda hits, n: _precision(hits),
             "map": _average_precision}


def _hit_matrix(who: str, recommended: Sequence[Sequence[Any]],
                relevant: Sequence[Iterable[Any]], k: int) -> Tuple[np.ndarray, np.ndarray]:
    """hits (users, k) bool and |relevant| (users,), for the users with a relevant item."""
    k = check_int(who, "k", k, 1)
    _check_lengths(who, recommended, relevant, "recommended")
    rows, counts = [], []
    for user, (row, wanted) in enumerate(zip(recommended, relevant)):
        wanted = _as_set(wanted)
        if not wanted:
            continue
        top = list(row)[:k]
        _check_no_repeats(who, "recommended", user, top)
        rows.append([item in wanted for item in top] + [False] * (k - len(top)))
        counts.append(len(wanted))
    if not rows:
        raise ValueError(f"{who}: no user has a relevant item")
    return np.array(rows, dtype=bool).reshape(-1, k), np.array(counts)


def _as_set(items: Iterable[Any]) -> set:
    return set(np.asarray(items).tolist()) if isinstance(items, np.ndarray) else set(items)


def _check_lengths(who: str, rows: Sequence[Any], relevant: Sequence[Any], name: str) -> None:
    if isinstance(rows, (str, bytes)) or isinstance(relevant, (str, bytes)):
        raise TypeError(f"{who}: {name} and relevant must be sequences with one entry per user")
    if len(rows) != len(relevant):
        raise ValueError(f"{who}: {name} and relevant must have one entry per user, got "
                         f"{len(rows)} and {len(relevant)}")


def _check_no_repeats(who: str, name: str, user: int, items: list) -> None:
    if len(set(items)) != len(items):
        seen: set = set()
        twice = next(item for item in items if item in seen or seen.add(item))
        raise ValueError(f"{who}: {name}[{user}] holds item {twice!r} more than once")


# ---------------------------------------------------------------------- a model's rankings

def evaluate_ranking(model: Any, test: Any, k: int = 10,
                     metrics: Sequence[str] = METRICS) -> Dict[str, float]:
    """Ranking metrics of a fitted mf_ext model on held-out interactions.

    test: a Ratings (its values are ignored: every test pair is relevant) or a pair
    (users, items) of raw-id arrays. For each test user the relevant set T is its test items
    minus its training items (which the ranking excludes, as recommend_batch does); repeated
    pairs count once. Items the model does not know stay in T: no ranking can hold them, so
    they lower recall, NDCG and MAP (as any miss) and are left out of AUC, which needs scores.
    Test users the model does not know are skipped with a UserWarning, and so are users whose
    T is empty. recall/ndcg/precision/map come from the top k (as recommend_batch ranks it;
    where fewer than k items are left the missing places are misses); AUC from each user's
    full ranking of its candidates (all items but its training items), computed by chunks of
    users with ties counted one half (module docstring for the definitions).

    Returns {"recall@k": …, "ndcg@k": …, "precision@k": …, "map@k": …, "auc": …} for the
    `metrics` asked (names from METRICS), plus "users" (users evaluated) and, with AUC,
    "auc_users" (those with a relevant known item and a non-relevant candidate)."""
    who = "mf_ext.metrics.evaluate_ranking"
    if not isinstance(model, TopN):
        raise TypeError(f"{who}: model must be an mf_ext model with top-N recommendation "
                        f"(mf_ext.ranking.TopN), got {type(model).__name__}")
    model._check_fitted()
    n_items = len(model.item_map)
    k = check_int(who, "k", k, 1, n_items)
    metrics = _check_metrics(who, metrics)
    users, relevant_keys, n_relevant = _relevance(who, model, test)
    result: Dict[str, float] = {}
    top_metrics = [name for name in metrics if name != "auc"]
    if top_metrics:
        top, _ = model._top_k_indices(users, k, exclude_seen=True)
        hits = (top >= 0) & np.isin(users[:, None] * n_items + top, relevant_keys)
        for name in top_metrics:
            result[f"{name}@{k}"] = float(np.mean(_PER_USER[name](hits, n_relevant)))
    result["users"] = len(users)
    if "auc" in metrics:
        values = _model_auc(model, users, relevant_keys)
        if len(values) == 0:
            raise ValueError(f"{who}: no test user has both a relevant item the model knows "
                             f"and a non-relevant candidate, AUC is undefined")
        result["auc"], result["auc_users"] = float(values.mean()), len(values)
    return result


def _check_metrics(who: str, metrics: Sequence[str]) -> Tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = tuple(metrics)
    unknown = [name for name in metrics if name not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"{who}: metrics must be one or more of {', '.join(METRICS)}, got "
                         f"{list(metrics)}")
    return metrics


def _relevance(who: str, model: Any, test: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, keys, counts): the evaluated users' indices (sorted), their relevant known items
    as sorted keys user·n + item, and |T| per evaluated user (known and unknown items)."""
    test_users, test_items = _test_pairs(who, test)
    m, n = len(model.user_map), len(model.item_map)
    user_index, item_index = model.user_map.index(test_users), model.item_map.index(test_items)
    unknown_users = user_index < 0
    if unknown_users.any():
        warnings.warn(f"{who}: skipping {len(np.unique(test_users[unknown_users]))} test "
                      f"user(s) the model does not know, e.g. "
                      f"{_plain(test_users[unknown_users][0])!r}", UserWarning, stacklevel=3)
    known = (user_index >= 0) & (item_index >= 0)
    keys = np.unique(user_index[known] * n + item_index[known])
    counts = np.diff(model._rated_indptr)
    training_keys = np.repeat(np.arange(m), counts) * n + model._rated_indices
    keys = keys[~np.isin(keys, training_keys)]
    cold = (user_index >= 0) & (item_index < 0)  # items no ranking holds: misses
    _, cold_codes = np.unique(test_items[cold], return_inverse=True)
    cold_pairs = np.unique(np.stack([user_index[cold], cold_codes.reshape(-1)]), axis=1)
    n_relevant = np.bincount(keys // n, minlength=m) + np.bincount(cold_pairs[0], minlength=m)
    users = np.flatnonzero(n_relevant)
    if len(users) == 0:
        raise ValueError(f"{who}: no test user the model knows has a test item outside its "
                         f"training items")
    return users, keys, n_relevant[users]


def _test_pairs(who: str, test: Any) -> Tuple[np.ndarray, np.ndarray]:
    if isinstance(test, tuple) and len(test) == 2:
        users, items = np.asarray(test[0]), np.asarray(test[1])
        if users.ndim != 1 or users.shape != items.shape:
            raise ValueError(f"{who}: test users and items must be 1-D of the same length, got "
                             f"shapes {list(users.shape)} and {list(items.shape)}")
        return users, items
    if isinstance(test, Ratings):
        return np.asarray(test.users), np.asarray(test.items)
    raise TypeError(f"{who}: test must be a Ratings or a (users, items) pair, got "
                    f"{type(test).__name__}")


def _model_auc(model: Any, users: np.ndarray, relevant_keys: np.ndarray) -> np.ndarray:
    """Per-user AUC (Mann–Whitney with mid-ranks) over each user's candidates, by chunks."""
    n = len(model.item_map)
    values = []
    for start, scores in model._score_chunks(users, exclude_seen=True):
        chunk = users[start:start + scores.shape[0]]
        lo, hi = np.searchsorted(relevant_keys, [chunk * n, (chunk + 1) * n])
        rows = np.repeat(np.arange(len(chunk)), hi - lo)
        items = np.concatenate([relevant_keys[a:b] for a, b in zip(lo, hi)]) % n \
            if len(rows) else np.zeros(0, dtype=np.int64)
        positives = torch.as_tensor(hi - lo, device=scores.device)
        # the positives' scores in a (c, most positives) matrix, padded with +inf (ignored)
        place = np.arange(len(rows)) - np.repeat(np.cumsum(hi - lo) - (hi - lo), hi - lo)
        width = max(int((hi - lo).max()), 1)
        padded = torch.full((len(chunk), width), math.inf, dtype=scores.dtype,
                            device=scores.device)
        r_, i_, p_ = (torch.as_tensor(a, device=scores.device) for a in (rows, items, place))
        padded[r_, p_] = scores[r_, i_]
        ordered = scores.sort(dim=1).values
        excluded = torch.isneginf(scores).sum(1, keepdim=True)  # training items, first
        left = torch.searchsorted(ordered, padded, side="left")
        equal = torch.searchsorted(ordered, padded, side="right") - left  # itself included
        midrank = torch.where(padded.isinf(), 0, (left - excluded + (equal + 1) / 2).double())
        candidates = n - excluded[:, 0]
        negatives = candidates - positives
        u_statistic = midrank.sum(1) - positives * (positives + 1) / 2
        fine = (positives > 0) & (negatives > 0)
        values.append((u_statistic[fine] / (positives[fine] * negatives[fine])).cpu().double())
    return torch.cat(values).numpy() if values else np.zeros(0)


# ---------------------------------------------------------------------- the split

def leave_out_split(data: Any, fraction: float = 0.2, seed: Optional[int] = 0
                    ) -> Tuple[Ratings, Ratings]:
    """A per-user hold-out: (train, test) Ratings. A user with n_u ≥ 2 interactions gives
    t_u = min(n_u − 1, max(1, ⌊fraction·n_u + 1/2⌋)) of them, chosen at random, to test, so it
    keeps at least one in train and has at least one to be evaluated on; a user with one
    interaction keeps it in train. Repeated (user, item) pairs count as separate interactions.
    Both parts keep the input's order. data: a Ratings or what mf_ext.data.as_ratings takes;
    fraction in (0, 1); seed: the same seed gives the same split (None: random)."""
    who = "mf_ext.metrics.leave_out_split"
    fraction = _OPEN_FRACTION(who, "fraction", fraction)
    seed = SEED(who, "seed", seed)
    data = as_ratings(data)
    _, user_codes = np.unique(data.users, return_inverse=True)
    user_codes = user_codes.reshape(-1)
    counts = np.bincount(user_codes)
    n_test = np.where(counts >= 2,
                      np.clip(np.floor(fraction * counts + 0.5), 1, counts - 1), 0).astype(int)
    shuffled = np.random.default_rng(seed).permutation(len(data))
    by_user = shuffled[np.argsort(user_codes[shuffled], kind="stable")]  # random within user
    first_of_user = np.concatenate([[0], np.cumsum(counts)[:-1]])[user_codes[by_user]]
    place = np.arange(len(data)) - first_of_user
    is_test = np.zeros(len(data), dtype=bool)
    is_test[by_user] = place < n_test[user_codes[by_user]]
    return data.subset(np.flatnonzero(~is_test)), data.subset(np.flatnonzero(is_test))


__all__ = ["METRICS", "evaluate_ranking", "recall_at_k", "ndcg_at_k", "precision_at_k",
           "map_at_k", "auc", "leave_out_split"]

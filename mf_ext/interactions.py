"""Implicit-feedback data in: (user, item[, strength]) interactions from arrays, a DataFrame or a
scipy.sparse users × items matrix, checked and with duplicate pairs merged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

from mf_ext.data import Ratings

_WHO = "mf_ext.ImplicitMatrixFactorization.fit"


@dataclass
class Interactions:
    """Distinct (user, item) pairs as equal-length 1-D arrays of raw ids, with the strength of
    each (a count, plays, a rating; 1 where none was given), all > 0."""

    users: np.ndarray
    items: np.ndarray
    strengths: np.ndarray

    def __len__(self) -> int:
        return len(self.strengths)


def as_interactions(users: Any, items: Any = None, weights: Any = None,
                    who: str = _WHO, allow_empty: bool = False) -> Interactions:
    """Interactions from (users, items[, weights]) array-likes, a pandas DataFrame (columns
    user/item, userId/movieId or user_id/item_id, plus an optional weight/count/rating column;
    else the first two or three columns), a scipy.sparse users × items matrix (row index =
    user, column index = item, stored values = strengths; stored zeros are no interaction) or
    an mf_ext.Ratings (from load_ratings or the splits; its ratings are the strengths, as the
    fit-implicit command reads a file's third column).

    Strengths must be finite and >= 0; pairs of strength 0 are dropped (no interaction), and a
    pair given several times counts once with the sum of its strengths. The result is
    ordered by (user, item), so that the order of the input does not change the model. No
    interaction at all is an error unless `allow_empty` (one rank's share of a sharded fit)."""
    if items is None and weights is None:
        if isinstance(users, Ratings):
            users, items, weights = users.users, users.items, users.ratings
        elif hasattr(users, "tocoo") and hasattr(users, "shape"):  # scipy.sparse
            coo = users.tocoo()
            users, items, weights = coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data
        elif hasattr(users, "columns") and hasattr(users, "iloc"):  # pandas DataFrame
            users, items, weights = _frame_columns(users, who)
        else:
            raise TypeError(f"{who}: pass users and items (and optional weights), a DataFrame, "
                            f"a scipy.sparse users x items matrix or an mf_ext.Ratings, got "
                            f"{type(users).__name__}")
    elif items is None:
        raise TypeError(f"{who}: weights given without items")
    users, items = np.asarray(users), np.asarray(items)
    for name, a in (("users", users), ("items", items)):
        if a.ndim != 1:
            raise ValueError(f"{who}: {name} must be 1-D, got shape {list(a.shape)}")
    if len(users) != len(items):
        raise ValueError(f"{who}: users and items must have the same length, got {len(users)} "
                         f"and {len(items)}")
    strengths = _strengths(weights, len(users), who)
    keep = strengths > 0
    users, items, strengths = users[keep], items[keep], strengths[keep]
    if len(strengths) == 0 and not allow_empty:
        raise ValueError(f"{who}: no interactions given (empty input, or every weight is 0)")
    return merge_duplicates(users, items, strengths)


def _strengths(weights: Any, count: int, who: str) -> np.ndarray:
    if weights is None:
        return np.ones(count)
    try:
        values = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{who}: weights must be numbers") from None
    if values.shape != (count,):
        raise ValueError(f"{who}: weights must be 1-D with one value per interaction ({count}), "
                         f"got shape {list(values.shape)}")
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{who}: weights must be finite and >= 0; {int(bad.sum())} are not, the "
                         f"first at position {k}: {values[k]}")
    return values


def merge_duplicates(users: np.ndarray, items: np.ndarray, strengths: np.ndarray
                     ) -> Interactions:
    """One entry per distinct pair, ordered by (user id, item id): the same interactions in any
    order give the same arrays, hence the same model."""
    user_ids, u = np.unique(users, return_inverse=True)
    item_ids, i = np.unique(items, return_inverse=True)
    pair = u.reshape(-1).astype(np.int64) * len(item_ids) + i.reshape(-1)
    distinct, inverse = np.unique(pair, return_inverse=True)
    total = np.bincount(inverse.reshape(-1), weights=strengths, minlength=len(distinct))
    return Interactions(user_ids[distinct // len(item_ids)], item_ids[distinct % len(item_ids)],
                        total)


def _frame_columns(frame, who: str) -> Tuple[Any, Any, Optional[Any]]:
    columns = [str(c) for c in frame.columns]
    for names in (("user", "item"), ("userId", "movieId"), ("user_id", "item_id")):
        if all(n in columns for n in names):
            weight = next((c for c in ("weight", "count", "rating", "strength") if c in columns),
                          None)
            return (frame[names[0]].to_numpy(), frame[names[1]].to_numpy(),
                    None if weight is None else frame[weight].to_numpy())
    if frame.shape[1] < 2:
        raise ValueError(f"{who}: an interactions DataFrame needs user and item columns, got "
                         f"{columns}")
    return (frame.iloc[:, 0].to_numpy(), frame.iloc[:, 1].to_numpy(),
            frame.iloc[:, 2].to_numpy() if frame.shape[1] >= 3 else None)

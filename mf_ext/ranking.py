"""Top-N recommendation for mf_ext's models: the k best items for many users at once
(`recommend_batch`), and for a user the model has never seen (`recommend_new`, a fold-in)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterator, Optional, Tuple

import numpy as np
import torch

from mf_ext.checks import check_int

# A chunk of users is scored at once: at most this many bytes for its (users × items) scores and
# what is made from them, counted as 32 bytes per cell (a float64 score, and at most a sorted
# copy and its int64 indices for AUC, or top-k's bool masks and int32 running count), and at
# least one user per chunk.
CHUNK_BYTES = 64 << 20
_BYTES_PER_CELL = 32

ScoreParts = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]


class TopN:
    """Top-N recommendation, mixed into an Estimator subclass (`class M(TopN, Estimator)`).

    What the model provides (after fit() or load()):
      - `user_map`, `item_map`: mf_ext.data.IdMap of the training users and items (m and n ids);
      - `_rated_indptr` (m + 1,), `_rated_indices`: int64 numpy CSR of the items each user had
        in training (duplicates allowed), the items `exclude_seen` removes;
      - `_score_parts()` → (user_vectors (r, m), item_vectors (r, n), user_offset (m,) or None,
        item_offset (n,) or None), tensors on the model's device, such that the ranking score is
            score(u, i) = user_offset[u] + item_offset[i] + user_vectors[:, u] · item_vectors[:, i]
        (None: no offset). A constant (a global mean) changes no ranking and is left out here;
      - `_fold_in(item_index, values)` → (user_vector (r,) tensor, user_offset float): the
        vector and offset of a new user who has the items `item_index` (int64 numpy array of
        known item indices, possibly empty, duplicates allowed) with `values` (float64 numpy
        array of the same length, or None when the caller gave none), the item side fixed;
      - optionally `_reported_scores(scores)`: maps ranking scores (a tensor, all finite) to the
        scores the user sees (default: unchanged). The explicit model adds the global mean and
        clips to the rating range there, after ranking: clipping would make ties of items
        whose predictions pass the top of the range, so the order always comes from the
        unclipped scores.
      - `_check_fitted()` and `_who` (from Estimator).

    Ties: items of equal score come in increasing item index, i.e. the sorted order of the raw
    item ids (IdMap sorts them), whatever torch.topk does. Scores are computed in the model's
    dtype on the factors' device, in chunks of users bounded by CHUNK_BYTES; a users × items
    matrix for all users is never formed. BLAS rounds a matrix product differently for
    different numbers of rows, so a score may differ in its last bit with the chunk size (and
    the order with it, only between items whose scores agree to rounding).
    """

    # ------------------------------------------------------------------ public API

    def recommend(self, user: Any, k: int = 10, exclude: Any = None) -> list:
        """The k best items for `user` that it did not have in training (nor in `exclude`), as
        [(item id, score), …], best first (fewer when fewer are left). Ranked as recommend_batch
        ranks, equal scores by item id; the scores are reported as recommend_batch reports them
        (for the explicit model, the predicted ratings as predict() gives them)."""
        self._check_fitted()
        k = check_int(self._who, "k", k, 1)
        index = int(self.user_map.index(np.asarray([user]))[0])
        if index < 0:
            raise KeyError(f"{self._who}.recommend: unknown user {user!r}")
        _, scores = next(self._score_chunks(np.array([index]), exclude_seen=True))
        if exclude is not None:
            ex = self.item_map.index(np.asarray(exclude))
            scores[0, torch.as_tensor(ex[ex >= 0], device=scores.device)] = -math.inf
        k = min(k, int(torch.isfinite(scores).sum()))
        if k == 0:
            return []
        items, values = self._finish(scores, k)
        return [(self.item_map.raw(j).item(), float(v)) for j, v in zip(items[0], values[0])]

    def recommend_batch(self, users: Any, k: int = 10, exclude_seen: bool = True
                        ) -> Tuple[np.ndarray, np.ndarray]:
        """The k best items for each of `users` (1-D array-like of raw user ids, repeats
        allowed): `(items, scores)`, numpy arrays of shape (len(users), k), raw item ids best
        first, and their scores (float64; for the explicit model the predicted ratings, as
        `predict` gives them). `exclude_seen`: leave out each user's training items.

        Raises KeyError naming an unknown user, TypeError/ValueError for a bad k (an integer in
        [1, number of items]), and ValueError when some user has fewer than k items left after
        the exclusion (rather than padding with seen items): ask for fewer."""
        self._check_fitted()
        who = f"{self._who}.recommend_batch"
        k = check_int(who, "k", k, 1, len(self.item_map))
        if not isinstance(exclude_seen, (bool, np.bool_)):
            raise TypeError(f"{who}: exclude_seen must be True or False, got {exclude_seen!r}")
        index = self._user_indices(users, who)
        items, scores = self._top_k_indices(index, k, exclude_seen)
        short = (items < 0).any(axis=1)
        if short.any():
            row = int(np.flatnonzero(short)[0])
            left = int((items[row] >= 0).sum())
            raise ValueError(f"{who}: user {_plain(np.asarray(users)[row])!r} has only "
                             f"{left} unseen items, fewer than k = {k}; ask for fewer")
        return self.item_map.raw(items), scores

    def recommend_new(self, items: Any, values: Any = None, k: int = 10
                      ) -> Tuple[np.ndarray, np.ndarray]:
        """The k best items for a user not in the training data, who has `items` (1-D
        array-like of raw item ids) with `values` (their ratings for the explicit model,
        interaction strengths for an implicit one; None where the model allows). The user's
        vector is solved in closed form with the item factors fixed (the model's `_fold_in`;
        no refit), and the given items are excluded. Returns `(items, scores)`, numpy arrays
        of shape (k,), as one row of recommend_batch.

        Item ids the model does not know are ignored with a UserWarning (nothing about them
        was learned); with no known item the user's vector is the fold-in of no data. Raises
        ValueError for a bad shape, non-finite values or fewer than k items left."""
        self._check_fitted()
        who = f"{self._who}.recommend_new"
        k = check_int(who, "k", k, 1, len(self.item_map))
        raw = np.asarray(items)
        if raw.ndim != 1:
            raise ValueError(f"{who}: items must be 1-D, got shape {list(raw.shape)}")
        if values is not None:
            values = _float_array(who, "values", values)
            if values.shape != raw.shape:
                raise ValueError(f"{who}: items and values must have the same length, got "
                                 f"{len(raw)} and {len(values)}")
        index = self.item_map.index(raw)
        known = index >= 0
        if not known.all():
            unknown = raw[~known]
            warnings.warn(f"{who}: ignoring {len(unknown)} item(s) the model does not know, "
                          f"e.g. {_plain(unknown[0])!r}", UserWarning, stacklevel=2)
        index = index[known]
        vector, offset = self._fold_in(index, None if values is None else values[known])
        _, item_vectors, _, item_offset = self._score_parts()
        with torch.no_grad():
            scores = (vector.to(item_vectors) @ item_vectors + offset)[None, :]
            if item_offset is not None:
                scores = scores + item_offset
            scores[0, torch.as_tensor(index, device=scores.device)] = -math.inf
            top_items, top_scores = self._finish(scores, k)
        if (top_items < 0).any():
            raise ValueError(f"{who}: only {int((top_items >= 0).sum())} items are left after "
                             f"excluding the user's, fewer than k = {k}; ask for fewer")
        return self.item_map.raw(top_items[0]), top_scores[0]

    # ------------------------------------------------------------------ the machinery

    def _reported_scores(self, scores: torch.Tensor) -> torch.Tensor:
        return scores

    def _user_indices(self, users: Any, who: str) -> np.ndarray:
        """Dense indices of raw user ids; KeyError naming the first unknown one."""
        raw = np.asarray(users)
        if raw.ndim != 1:
            raise ValueError(f"{who}: users must be a 1-D array-like of user ids, got shape "
                             f"{list(raw.shape)}")
        index = self.user_map.index(raw)
        if (index < 0).any():
            bad = np.flatnonzero(index < 0)
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise KeyError(f"{who}: unknown user {_plain(raw[bad[0]])!r}{more}")
        return index

    def _chunk_rows(self) -> int:
        return max(1, CHUNK_BYTES // (_BYTES_PER_CELL * max(len(self.item_map), 1)))

    def _score_chunks(self, user_index: np.ndarray, exclude_seen: bool
                      ) -> Iterator[Tuple[int, torch.Tensor]]:
        """(start, scores) for consecutive chunks of `user_index`: scores (c, n) are the ranking
        scores of users user_index[start:start + c], -inf at their training items when
        `exclude_seen`. Raises ValueError for NaN scores (a diverged model)."""
        parts = self._score_parts()
        rows = self._chunk_rows()
        for start in range(0, len(user_index), rows):
            yield start, self._chunk_scores(user_index[start:start + rows], parts, exclude_seen)

    @torch.no_grad()  # not around the yield above: that would leave grad off in the caller
    def _chunk_scores(self, chunk: np.ndarray, parts: ScoreParts, exclude_seen: bool
                      ) -> torch.Tensor:
        user_vectors, item_vectors, user_offset, item_offset = parts
        device = item_vectors.device
        u = torch.as_tensor(chunk, device=device)
        scores = user_vectors[:, u].T @ item_vectors
        if user_offset is not None:
            scores += user_offset[u, None]
        if item_offset is not None:
            scores += item_offset
        if torch.isnan(scores).any():
            row = int(torch.isnan(scores).any(1).nonzero()[0, 0])
            raise ValueError(f"{self._who}: the model's scores for user "
                             f"{_plain(self.user_map.raw(chunk[row]))!r} are NaN")
        if exclude_seen:
            seen_rows, seen_items = self._seen_pairs(chunk)
            scores[torch.as_tensor(seen_rows, device=device),
                   torch.as_tensor(seen_items, device=device)] = -math.inf
        return scores

    def _seen_pairs(self, user_index: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(row in user_index, item index) of every training item of those users."""
        starts = self._rated_indptr[user_index]
        counts = self._rated_indptr[user_index + 1] - starts
        rows = np.repeat(np.arange(len(user_index)), counts)
        # position of each pair inside its user's CSR segment, then offset by the segment start
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return rows, self._rated_indices[np.repeat(starts, counts) + within]

    def _top_k_indices(self, user_index: np.ndarray, k: int, exclude_seen: bool
                       ) -> Tuple[np.ndarray, np.ndarray]:
        """(items, scores), (len(user_index), k): item indices best first and their reported
        scores; where a user has fewer than k items left, index -1 and score -inf."""
        items = np.empty((len(user_index), k), dtype=np.int64)
        scores = np.empty((len(user_index), k), dtype=np.float64)
        for start, chunk_scores in self._score_chunks(user_index, exclude_seen):
            stop = start + chunk_scores.shape[0]
            items[start:stop], scores[start:stop] = self._finish(chunk_scores, k)
        return items, scores

    def _finish(self, scores: torch.Tensor, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Top k of each row, then -inf entries as index -1 and the reported scores."""
        values, index = top_k(scores, k)
        missing = torch.isneginf(values)
        reported = torch.where(missing, values, self._reported_scores(
            torch.where(missing, 0, values)))
        index = torch.where(missing, -1, index)
        return index.cpu().numpy(), reported.cpu().double().numpy()


def top_k(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of `scores` (c, n), k <= n: (values, indices), (c, k),
    best first, equal values in increasing index (deterministic, unlike torch.topk alone).

    torch.topk finds each row's k-th value; rows where more than k entries reach it have a tie at
    the boundary, and there the tied entries of lowest index are taken. No NaN allowed."""
    values, index = torch.topk(scores, k, dim=1, sorted=False)
    kth = values.amin(dim=1, keepdim=True)
    tied_rows = ((scores >= kth).sum(1) > k).nonzero()[:, 0]
    if len(tied_rows):
        sub, sub_kth = scores[tied_rows], kth[tied_rows]
        tied = sub == sub_kth
        need = k - (sub > sub_kth).sum(1, keepdim=True)
        take = (sub > sub_kth) | (tied & (tied.cumsum(1, dtype=torch.int32) <= need))
        index[tied_rows] = take.nonzero()[:, 1].view(-1, k)  # row-major: k per row
    # best first, equal scores by index: sort by index, then stably by score
    index = index.sort(dim=1).values
    values = scores.gather(1, index)
    order = values.sort(dim=1, descending=True, stable=True).indices
    return values.gather(1, order), index.gather(1, order)


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value (for messages: 'u1', not np.str_('u1'))."""
    return value.item() if isinstance(value, np.generic) else value


def _float_array(who: str, name: str, values: Any) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{who}: {name} must be numbers") from None
    if array.ndim != 1:
        raise ValueError(f"{who}: {name} must be 1-D, got shape {list(array.shape)}")
    bad = ~np.isfinite(array)
    if bad.any():
        position = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{who}: {name} must be finite, got {array[position]} at position "
                         f"{position}")
    return array

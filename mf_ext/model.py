"""MatrixFactorization: a biased matrix-factorization recommender trained with Adam on the fused
observed-entries op (sklearn/Surprise-like API)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple, Union

import numpy as np
import torch

from mf_ext.checks import (FRACTION, NONNEGATIVE, POSITIVE, SEED, UNIT_INTERVAL, Device, Flag,
                           FloatDType, Integer, OneOf, check_int)
from mf_ext.config import Config, setting
from mf_ext.data import IdMap, Ratings, as_ratings
from mf_ext.distributed import TrainingGroup, training_group
from mf_ext.estimator import EpochRecord, Estimator, ids_from_file, ids_to_file
from mf_ext.ranking import TopN

FORMAT_VERSION = 1


@dataclass
class MatrixFactorizationConfig(Config):
    """MatrixFactorization's settings (its constructor's arguments, in order); see its docstring."""

    WHO: ClassVar[str] = "mf_ext.MatrixFactorization"
    OLD_FILE_DEFAULTS: ClassVar[Dict[str, Any]] = {
        "bias_count_exponent": 1.0,  # files saved before the option: the penalty was n^1
    }

    rank: int = setting(64, Integer(1), "latent dimension r", cli=True)
    epochs: int = setting(160, Integer(0), "maximum passes over the ratings", cli=True)
    lr: float = setting(0.05, POSITIVE, "Adam's learning rate", cli=True)
    reg: float = setting(0.12, NONNEGATIVE, "L2 on the factors", cli=True)
    bias_reg: float = setting(0.25, NONNEGATIVE, "L2 on the biases", cli=True)
    bias_count_exponent: float = setting(
        0.5, UNIT_INTERVAL, "bias penalty weighted by count^this (0..1; see MatrixFactorization)",
        cli=True)
    batch_size: Optional[int] = setting(
        None, Integer(1, optional=True),
        "mini-batches of this many ratings (default: full batch)", cli=True)
    validation_fraction: float = setting(
        0.0, FRACTION, "share of the training ratings used for early stopping", cli=True)
    patience: int = setting(10, Integer(1), "epochs without a better validation RMSE before "
                                            "stopping")
    init_std: float = setting(0.01, NONNEGATIVE, "the factors start as N(0, init_std^2)")
    lr_schedule: str = setting("constant", OneOf(("cosine", "constant")),
                               "constant, or cosine decay to 1% of lr over the epochs")
    clip: bool = setting(True, Flag(), "clip predictions to the training ratings' range")
    seed: Optional[int] = setting(0, SEED, "makes a run reproducible (None: random)", cli=True)
    device: Union[str, torch.device] = setting("cpu", Device(), "where to train", cli=True,
                                               saved=False)
    dtype: torch.dtype = setting(torch.float32, FloatDType(), "float32 or float64", saved=False)


@dataclass
class _TrainingData:
    """The training ratings as tensors, with what the objective needs of them."""

    rows: torch.Tensor           # (N,) user indices
    cols: torch.Tensor           # (N,) item indices
    residual: torch.Tensor       # (N,) rating − global mean
    user_counts: torch.Tensor    # (m,) ratings per user (all ranks), in the model's dtype
    item_counts: torch.Tensor    # (n,)
    bias_weights: Tuple[torch.Tensor, torch.Tensor]  # count^bias_count_exponent, (m,) and (n,)


class MatrixFactorization(TopN, Estimator):
    """r̂(u, i) = μ + b_u + b_i + p_uᵀ q_i, fitted on observed ratings.

    Objective (full batch, mean over the N training ratings):
        (1/N) Σ_(u,i) (r_ui − r̂_ui)² + (reg/N) Σ_u n_u |p_u|² + (reg/N) Σ_i n_i |q_i|²
                                      + (bias_reg/N) (Σ_u n_u^α b_u² + Σ_i n_i^α b_i²)
    where n_u, n_i count each user's and item's training ratings: on the factors, the same
    penalty per rating that SGD recommenders (Surprise's SVD) apply, which keeps rare users'
    factors small. On the biases the counts enter as n^α (α = bias_count_exponent, default 0.5):
    α = 1 is the per-rating penalty, which shrinks every bias by the same factor whatever its
    count; α = 0 is the classic baseline shrinkage b_u ≈ Σ residuals / (n_u + bias_reg); 0.5
    lies between and fitted MovieLens-100K best (benchmarks/results/movielens_100k.md).
    A mini-batch step takes the batch's mean squared error plus the same penalty (over all N
    ratings, not the batch), so full batch and mini-batches minimize the same objective.

    Args (the fields of MatrixFactorizationConfig, which holds their defaults and checks):
        rank: latent dimension r. epochs: maximum passes. lr: Adam's learning rate.
        reg, bias_reg: the L2 weights above. bias_count_exponent: α above, in [0, 1].
        batch_size: None for full-batch Adam (the notebook's optimizer), else mini-batches of
        that many ratings, reshuffled each epoch.
        validation_fraction: share of the training ratings held out for early stopping (0, the
        default, trains on all of them for `epochs`). patience: epochs without a better
        validation RMSE before stopping; the best epoch's parameters are kept. init_std: the
        factors start as N(0, init_std²), the biases at 0. lr_schedule: "constant" or "cosine"
        (decay to 1% of lr over `epochs`). clip: clip predictions to the training ratings'
        range. seed: makes a run reproducible. device, dtype: where and in what precision.
    Bad settings raise TypeError (wrong type) or ValueError (bad value).

    The defaults were tuned on MovieLens-100K (5-fold CV, benchmarks/bench_movielens.py).
    """

    Config = MatrixFactorizationConfig
    FORMAT_VERSION = FORMAT_VERSION

    # ------------------------------------------------------------------ fitting

    def fit(self, users: Any, items: Any = None, ratings: Any = None, *,
            validation: Optional[Ratings] = None, progress: bool = False,
            callback: Optional[Callable[[EpochRecord], None]] = None,
            distributed: Optional[bool] = None) -> "MatrixFactorization":
        """Fit on equal-length array-likes of raw user ids, item ids and ratings (or a
        DataFrame / scipy.sparse matrix / Ratings as the first argument). `validation`
        (Ratings) replaces the held-out share for early stopping. Ctrl-C stops the fit and
        keeps the best parameters so far (`interrupted` is then True).

        distributed: None (default) trains data-parallel when a torch.distributed process
        group with more than one rank is initialized, True requires one, False never. Then
        each rank passes its shard of the ratings (mf_ext.distributed.shard_ratings) and of
        `validation`, and all ranks end with the same model (docs/distributed.md)."""
        data = as_ratings(users, items, ratings)
        group = training_group(distributed, self.device)
        _check_finite(data)
        generator, rng = self._random_sources()
        sizes = group.check_inputs(data, validation)
        train, held_out = data, validation
        if validation is None and self.validation_fraction > 0:
            train, held_out = group.hold_out(data, self.validation_fraction, rng, sizes)
        training = self._prepare(data, train, group)
        params = self._init_parameters(generator)
        optimizer = torch.optim.Adam(params, lr=self.lr,
                                     fused=True if self.device.type == "cuda" else None)
        # Optional cosine decay to 1% of lr over `epochs` (for mini-batches mostly: full-batch
        # Adam at the default lr already converges).
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(self.epochs, 1), eta_min=self.lr * 0.01) \
            if self.lr_schedule == "cosine" else None

        def train_epoch() -> float:
            mse = self._epoch(optimizer, training, rng, group)
            if scheduler is not None:
                scheduler.step()
            return mse

        self._fitted = True
        self._run_epochs(params, train_epoch, lambda: self._validation_rmse(held_out, group),
                         progress, callback)
        return self

    def _random_sources(self) -> Tuple[torch.Generator, np.random.Generator]:
        """The seeded torch generator (initial factors) and numpy generator (hold-out, shuffles)."""
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator, np.random.default_rng(None if self.seed is None else self.seed)

    def _prepare(self, data: Ratings, train: Ratings, group: TrainingGroup) -> _TrainingData:
        """Id maps, rated pairs, global statistics and the training tensors."""
        self.user_map, self.item_map = group.id_maps(train)
        m, n = len(self.user_map), len(self.item_map)
        seen_u, seen_i = self.user_map.index(data.users), self.item_map.index(data.items)
        keep = (seen_u >= 0) & (seen_i >= 0)
        self._set_rated(*group.rated_pairs(seen_u[keep], seen_i[keep]), m)
        dev, dt = self.device, self.dtype
        rows = torch.as_tensor(self.user_map.index(train.users), device=dev)
        cols = torch.as_tensor(self.item_map.index(train.items), device=dev)
        values = torch.as_tensor(train.ratings, dtype=dt, device=dev)
        _, self.global_mean, self.rating_range = group.rating_stats(train.ratings)
        user_counts = torch.bincount(rows, minlength=m)
        item_counts = torch.bincount(cols, minlength=n)
        group.sum_counts(user_counts, item_counts)
        user_counts, item_counts = user_counts.to(dt), item_counts.to(dt)
        # The biases' penalty weights n^α, computed once (0^α is 1 for α = 0: unseen ids have
        # no gradient from the data, so their bias stays 0 either way).
        bias_weights = (user_counts.pow(self.bias_count_exponent),
                        item_counts.pow(self.bias_count_exponent))
        return _TrainingData(rows, cols, values - self.global_mean, user_counts, item_counts,
                             bias_weights)

    def _init_parameters(self, generator: torch.Generator) -> list:
        """P (r, m), Q (r, n) ~ N(0, init_std²) drawn on the CPU (the same start on every device
        and rank), the biases at 0; set on the model and returned as a list."""
        m, n, dev, dt = len(self.user_map), len(self.item_map), self.device, self.dtype
        P = (torch.randn(self.rank, m, generator=generator, dtype=dt) * self.init_std).to(dev)
        Q = (torch.randn(self.rank, n, generator=generator, dtype=dt) * self.init_std).to(dev)
        params = [P.requires_grad_(), Q.requires_grad_(),
                  torch.zeros(m, dtype=dt, device=dev, requires_grad=True),
                  torch.zeros(n, dtype=dt, device=dev, requires_grad=True)]
        self.P, self.Q, self.user_bias, self.item_bias = params
        return params

    def _epoch(self, optimizer: torch.optim.Optimizer, data: _TrainingData,
               rng: np.random.Generator, group: TrainingGroup) -> float:
        """One pass over the training ratings; returns their mean squared error."""
        from mf_ext.ops import observed_mf_loss

        params = [self.P, self.Q, self.user_bias, self.item_bias]
        total = 0.0
        for batch, count in group.batches(data.residual.numel(), self.batch_size, rng):
            r_, c_, v_ = (data.rows, data.cols, data.residual) if batch is None else (
                data.rows[batch], data.cols[batch], data.residual[batch])
            loss = group.batch_loss(
                lambda reduction: observed_mf_loss(r_, c_, v_, *params, reduction=reduction),
                count)
            optimizer.zero_grad(set_to_none=True)
            # The penalty is global: rank 0 alone adds it, so the ranks' sum counts it once.
            (loss + self._penalty(data) / group.n_train if group.rank == 0 else loss).backward()
            total += group.all_reduce_gradients(params, loss, count)
            optimizer.step()
        return total / group.n_train

    def _penalty(self, data: _TrainingData) -> torch.Tensor:
        """The L2 terms of the objective times N (Surprise's per-rating form): factor penalties
        weighted by each user's/item's count, bias penalties by count^bias_count_exponent."""
        return (self.reg * ((self.P * self.P).sum(0) @ data.user_counts
                            + (self.Q * self.Q).sum(0) @ data.item_counts)
                + self.bias_reg * (self.user_bias.square() @ data.bias_weights[0]
                                   + self.item_bias.square() @ data.bias_weights[1]))

    def _validation_rmse(self, held_out: Optional[Ratings], group: TrainingGroup
                         ) -> Optional[float]:
        """RMSE on the held-out ratings; distributed, over all ranks' shards of them."""
        if held_out is None:
            return None
        error = self.predict(held_out.users, held_out.items) - held_out.ratings \
            if len(held_out) else np.zeros(0)
        return group.rmse(float(np.square(error).sum()), len(error))

    # ------------------------------------------------------------------ using the model

    def predict(self, users: Any, items: Any) -> np.ndarray:
        """Predicted ratings for equal-length raw ids. Unknown users or items get the global
        mean plus whichever bias is known (never NaN); clipped to the rating range if clip."""
        self._check_fitted()
        users, items = np.asarray(users), np.asarray(items)
        if users.shape != items.shape or users.ndim != 1:
            raise ValueError(f"mf_ext.MatrixFactorization.predict: users and items must be 1-D "
                             f"of the same length, got shapes {list(users.shape)} and "
                             f"{list(items.shape)}")
        u = torch.as_tensor(self.user_map.index(users), device=self.device)
        i = torch.as_tensor(self.item_map.index(items), device=self.device)
        known_u, known_i = u >= 0, i >= 0
        uc, ic = u.clamp_min(0), i.clamp_min(0)
        with torch.no_grad():
            pred = torch.full(u.shape, self.global_mean, dtype=self.dtype, device=self.device)
            pred += torch.where(known_u, self.user_bias[uc], 0)
            pred += torch.where(known_i, self.item_bias[ic], 0)
            dots = (self.P[:, uc] * self.Q[:, ic]).sum(0)
            pred += torch.where(known_u & known_i, dots, 0)
            if self.clip:
                pred.clamp_(*self.rating_range)
        return pred.cpu().numpy().astype(np.float64)

    def evaluate(self, users: Any, items: Any = None, ratings: Any = None) -> dict:
        """{"rmse": …, "mae": …} on held-out ratings (same inputs as fit)."""
        data = as_ratings(users, items, ratings)
        if len(data) == 0:
            raise ValueError("mf_ext.MatrixFactorization.evaluate: no ratings given")
        error = self.predict(data.users, data.items) - data.ratings
        return {"rmse": float(np.sqrt(np.mean(error ** 2))), "mae": float(np.mean(np.abs(error)))}

    def recommend(self, user: Any, k: int = 10, exclude: Any = None) -> list:
        """The k items with the highest predicted rating for `user` that it has not rated in
        training (nor in `exclude`), as [(item id, predicted rating), …], best first (fewer
        when fewer are left). Ranked as recommend_batch ranks: by the unclipped prediction,
        equal ones by item id; the ratings are reported as predict() gives them."""
        self._check_fitted()
        k = check_int(self._who, "k", k, 1)
        index = int(self.user_map.index(np.asarray([user]))[0])
        if index < 0:
            raise KeyError(f"mf_ext.MatrixFactorization.recommend: unknown user {user!r}")
        _, scores = next(self._score_chunks(np.array([index]), exclude_seen=True))
        if exclude is not None:
            ex = self.item_map.index(np.asarray(exclude))
            scores[0, torch.as_tensor(ex[ex >= 0], device=scores.device)] = -math.inf
        k = min(k, int(torch.isfinite(scores).sum()))
        if k == 0:
            return []
        items, ratings = self._finish(scores, k)
        return [(self.item_map.raw(j).item(), float(s)) for j, s in zip(items[0], ratings[0])]

    def _set_rated(self, user_index: np.ndarray, item_index: np.ndarray, m: int) -> None:
        """What each user rated, as CSR arrays (for recommend to skip)."""
        order = np.argsort(user_index, kind="stable")
        self._rated_indptr = np.concatenate(
            [[0], np.cumsum(np.bincount(user_index, minlength=m))]).astype(np.int64)
        self._rated_indices = item_index[order].astype(np.int64)

    # ------------------------------------------------------------------ top-N (mf_ext.ranking)

    def _score_parts(self):
        """score(u, i) = b_u + b_i + p_uᵀ q_i: the prediction less μ (TopN's contract)."""
        return self.P.detach(), self.Q.detach(), self.user_bias.detach(), self.item_bias.detach()

    def _reported_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """The predicted ratings, as predict() gives them (clipped if clip; ranked unclipped)."""
        scores = scores + self.global_mean
        return scores.clamp(*self.rating_range) if self.clip else scores

    def _fold_in(self, item_index: np.ndarray, values: Optional[np.ndarray]
                 ) -> Tuple[torch.Tensor, float]:
        """(p, b) of a new user who rated the items `item_index` with `values`, Q, the item
        biases and μ fixed: the minimizer of the objective's terms that involve the user,
            Σ_i (y_i − b − pᵀq_i)² + reg·c·|p|² + bias_reg·c^α·b²,   y_i = r_i − μ − b_i,
        over the user's c ratings (c = n_u, α = bias_count_exponent), i.e. the ridge system
            (Z Zᵀ + diag(reg·c, …, reg·c, bias_reg·c^α)) [p; b] = Z y,   Z = [q_i; 1] (r+1, c).
        At the fit's optimum a training user's (p_u, b_u) solves the same system. Solved in
        numpy float64 on the CPU (r+1 unknowns: torch's thread pool costs more than the solve
        here); by least squares (the minimum-norm solution) when reg or bias_reg is 0, where
        the system may be singular."""
        if values is None:
            raise ValueError(f"{self._who}.recommend_new: values (the user's ratings) are "
                             f"needed by the explicit model")
        rank, count = self.P.shape[0], len(item_index)
        if count == 0:
            return torch.zeros(rank, dtype=self.dtype, device=self.device), 0.0
        # index_select: Q[:, index] went through a parallel kernel, 22 ms against 0.1 ms here
        index = torch.as_tensor(item_index, device=self.device)
        Z = np.ones((rank + 1, count))
        Z[:rank] = self.Q.detach().index_select(1, index).cpu().double().numpy()
        y = values - self.global_mean - (
            self.item_bias.detach().index_select(0, index).cpu().double().numpy())
        A, rhs = _small_products(Z, y)
        A[np.arange(rank), np.arange(rank)] += self.reg * count
        A[rank, rank] += self.bias_reg * count ** self.bias_count_exponent
        if self.reg > 0 and self.bias_reg > 0:  # positive definite
            solution = np.linalg.solve(A, rhs)
        else:
            solution = np.linalg.lstsq(A, rhs, rcond=None)[0]
        return (torch.as_tensor(solution[:rank], dtype=self.dtype, device=self.device),
                float(solution[rank]))

    # ------------------------------------------------------------------ persistence

    def _state(self) -> Dict[str, Any]:
        """What a saved model holds beside its config, dtype and history (save())."""
        return {
            "global_mean": self.global_mean,
            "rating_range": self.rating_range,
            "user_ids": ids_to_file(self.user_map.ids),
            "item_ids": ids_to_file(self.item_map.ids),
            "P": self.P.detach().cpu(), "Q": self.Q.detach().cpu(),
            "user_bias": self.user_bias.detach().cpu(), "item_bias": self.item_bias.detach().cpu(),
            "rated_indptr": torch.from_numpy(self._rated_indptr),
            "rated_indices": torch.from_numpy(self._rated_indices),
        }

    def _restore(self, state: Dict[str, Any], device: str) -> None:
        """The inverse of _state (load())."""
        self.user_map = IdMap(ids_from_file(state["user_ids"]))
        self.item_map = IdMap(ids_from_file(state["item_ids"]))
        self.global_mean, self.rating_range = state["global_mean"], tuple(state["rating_range"])
        self.P, self.Q = state["P"].to(device), state["Q"].to(device)
        self.user_bias, self.item_bias = state["user_bias"].to(device), state["item_bias"].to(device)
        self._rated_indptr = state["rated_indptr"].numpy()
        self._rated_indices = state["rated_indices"].numpy()


def _small_products(Z: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Z Zᵀ and Z y. Up to about 2M multiply-adds (r = 64 and 500 ratings) by einsum's own
    loop: BLAS's thread pool costs more than such a product (65 × 130: 24 ms against 0.17 ms
    on a loaded 2-core machine, benchmarks/results/ranking_cpu.md)."""
    if Z.size * Z.shape[0] <= 1 << 21:
        return np.einsum("ik,jk->ij", Z, Z), np.einsum("ik,k->i", Z, y)
    return Z @ Z.T, Z @ y


def _check_finite(data: Ratings) -> None:
    bad = ~np.isfinite(data.ratings)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise ValueError(f"mf_ext.MatrixFactorization.fit: {int(bad.sum())} ratings are NaN "
                         f"or Inf, the first at position {k}: {data.ratings[k]}")

"""MatrixFactorization: a biased matrix-factorization recommender trained with Adam on the fused
observed-entries op (sklearn/Surprise-like API)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple, Union

import numpy as np
import torch

from mf_ext.checks import (FRACTION, NONNEGATIVE, POSITIVE, SEED, UNIT_INTERVAL, Bool, Device,
                           Flag, FloatDType, Integer, Number, OneOf)
from mf_ext.config import Config, setting
from mf_ext.data import IdMap, Ratings, as_ratings
from mf_ext.distributed import TrainingGroup, draw_normal, training_group
from mf_ext.estimator import EpochRecord, Estimator, ids_from_file, ids_to_file
from mf_ext.ranking import TopN
from mf_ext.user_history import UserHistory

# 2: the SVD++ term (implicit: P holds the full user vectors, Y is saved). Version-1 files load
# with implicit=False, which is what they were trained with.
FORMAT_VERSION = 2

# reg's default, a function of the mean number of training ratings per item (d = N / n), for
# the default factor_count_exponent 0.75: fitted on MovieLens-100K (d ≈ 49: 0.42 best of
# 0.28–0.50) and the ML-1M half (d ≈ 122: 0.33 best of 0.22–0.40), on other folds and splits than
# the benchmark's (benchmarks/results/movielens.md). Denser items carry more evidence each, so
# their factors need less shrinkage; the exponent 0.25 is what per-rating scaling gives
# (0.5 at factor_count_exponent 1, where it was fitted before: d^-0.5 · d^(1 - 0.75)).
REG_AT_REFERENCE, REFERENCE_RATINGS_PER_ITEM, REG_EXPONENT = 0.42, 48.5, 0.25


def default_reg(n_ratings: int, n_items: int) -> float:
    """reg when it is not given: REG_AT_REFERENCE · (d / REFERENCE_RATINGS_PER_ITEM)^-REG_EXPONENT
    with d = n_ratings / n_items (at least 1), the training ratings per item."""
    per_item = max(n_ratings / max(n_items, 1), 1.0)
    return REG_AT_REFERENCE * (per_item / REFERENCE_RATINGS_PER_ITEM) ** -REG_EXPONENT


OPTIONAL_NONNEGATIVE = Number("a finite number >= 0", lambda x: math.isfinite(x) and x >= 0,
                              optional=True)


@dataclass
class MatrixFactorizationConfig(Config):
    """MatrixFactorization's settings (its constructor's arguments, in order); see its docstring."""

    WHO: ClassVar[str] = "mf_ext.MatrixFactorization"
    OLD_FILE_DEFAULTS: ClassVar[Dict[str, Any]] = {
        "bias_count_exponent": 1.0,  # files saved before the option: the penalty was n^1
        "implicit": False,           # format version 1 had no SVD++ term
        "factor_count_exponent": 1.0,  # files saved before the option: the penalty was n^1
    }

    rank: int = setting(64, Integer(1), "latent dimension r", cli=True)
    epochs: int = setting(160, Integer(0), "maximum passes over the ratings", cli=True)
    lr: float = setting(0.05, POSITIVE, "Adam's learning rate", cli=True)
    reg: Optional[float] = setting(
        None, OPTIONAL_NONNEGATIVE, "L2 on the factors (default: default_reg of the data)",
        cli=True)
    bias_reg: float = setting(0.8, NONNEGATIVE, "L2 on the biases", cli=True)
    bias_count_exponent: float = setting(
        0.5, UNIT_INTERVAL, "bias penalty weighted by count^this (0..1; see MatrixFactorization)",
        cli=True)
    factor_count_exponent: float = setting(
        0.75, UNIT_INTERVAL, "factor penalty weighted by count^this (0..1; see "
                             "MatrixFactorization)", cli=True)
    implicit: Optional[bool] = setting(
        None, Flag(), "SVD++ term: add |N(u)|^-1/2 sum of y_j over the user's training items "
                      "(None: on)")
    implicit_reg_scale: float = setting(7.0, NONNEGATIVE,
                                        "the L2 on the y_j is reg times this (per count)")
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
    shard_factors: bool = setting(
        False, Bool(), "each torch.distributed rank holds a block of the factors' rows and their "
                       "Adam state (docs/distributed.md)", cli=True, saved=False)


@dataclass
class _TrainingData:
    """The training ratings as tensors, with what the objective needs of them."""

    rows: torch.Tensor           # (N,) user indices
    cols: torch.Tensor           # (N,) item indices
    residual: torch.Tensor       # (N,) rating − global mean
    user_counts: torch.Tensor    # (m,) ratings per user (all ranks), in the model's dtype
    item_counts: torch.Tensor    # (n,)
    bias_weights: Tuple[torch.Tensor, torch.Tensor]  # count^bias_count_exponent, (m,) and (n,)
    factor_weights: Tuple[torch.Tensor, torch.Tensor]  # count^factor_count_exponent
    history: Optional[UserHistory]  # N(u) of the SVD++ term (training pairs only), or None


class MatrixFactorization(TopN, Estimator):
    """r̂(u, i) = μ + b_u + b_i + (p_u + |N(u)|^-½ Σ_{j∈N(u)} y_j)ᵀ q_i, fitted on observed
    ratings; N(u) is the set of items u rated in the TRAINING ratings (SVD++'s implicit term;
    implicit=False drops it and Y).

    Objective (full batch, mean over the N training ratings):
        (1/N) Σ_(u,i) (r_ui − r̂_ui)² + (reg/N) Σ_u n_u^β |p_u|² + (reg/N) Σ_i n_i^β |q_i|²
                                      + (reg·implicit_reg_scale/N) Σ_j n_j^β |y_j|²
                                      + (bias_reg/N) (Σ_u n_u^α b_u² + Σ_i n_i^α b_i²)
    where n_u, n_i count each user's and item's training ratings. On the factors the counts
    enter as n^β (β = factor_count_exponent, default 0.75): β = 1 is the penalty per rating
    that SGD recommenders (Surprise's SVD) apply, which keeps rare users' factors small; 0.75
    shrinks frequent users and items relatively more and fitted both MovieLens sizes better
    (tuning splits: ML-100K 0.9021 → 0.8990, the ML-1M half 0.8513 → 0.8476; with reg's
    default refitted). On the biases the counts enter as n^α (α = bias_count_exponent, default
    0.5): α = 1 is the per-rating penalty, which shrinks every bias by the same factor whatever its
    count; α = 0 is the classic baseline shrinkage b_u ≈ Σ residuals / (n_u + bias_reg); 0.5
    lies between and fitted MovieLens-100K best (benchmarks/results/movielens_100k.md).
    A mini-batch step takes the batch's mean squared error plus the same penalty (over all N
    ratings, not the batch), so full batch and mini-batches minimize the same objective.
    The implicit term for all users is Y Sᵀ with S the (m, n) CSR of |N(u)|^-½
    (mf_ext/user_history.py): two sparse products per step, O(|N| r) each, on top of the fused
    observed-entries op; memory O(|N| + r (m + n)). On the ML-1M half (r = 64, 2 threads) the
    term's forward and backward took 13 ms against the op's 20 ms; a mini-batch step pays the
    whole term too, so with small batches implicit=False is much faster. y_j's penalty is
    implicit_reg_scale (7) times q_j's: with Adam, a weaker one let Y overfit (MovieLens-100K
    0.928 at 1x, 0.903 at 10x with β = 1; with β = 0.75, 7x and bias_reg 0.8 beat 10x and 0.5
    by 0.0008 on ML-100K and tied on ML-1M). After fit, P holds the whole user vectors
    p_u + |N(u)|^-½ Σ y_j (what predict, recommend, the top-N methods and a saved file use) and
    Y the y_j. With shard_factors the y_j are sharded with Q's rows (docs/distributed.md).

    reg (default None) is default_reg(N, n): it shrinks as the items get more ratings each;
    the value a fit used is `effective_reg`.

    Args (the fields of MatrixFactorizationConfig, which holds their defaults and checks):
        rank: latent dimension r. epochs: maximum passes. lr: Adam's learning rate.
        reg, bias_reg: the L2 weights above (reg None: default_reg). bias_count_exponent: α
        above, in [0, 1]. factor_count_exponent: β above, in [0, 1]. implicit: the SVD++ term
        (None, the default: on).
        implicit_reg_scale: y_j's penalty over q_j's.
        batch_size: None for full-batch Adam (the notebook's optimizer), else mini-batches of
        that many ratings, reshuffled each epoch.
        validation_fraction: share of the training ratings held out for early stopping (0, the
        default, trains on all of them for `epochs`). patience: epochs without a better
        validation RMSE before stopping; the best epoch's parameters are kept. init_std: the
        factors start as N(0, init_std²), the biases at 0. lr_schedule: "constant" or "cosine"
        (decay to 1% of lr over `epochs`). clip: clip predictions to the training ratings'
        range. seed: makes a run reproducible. device, dtype: where and in what precision.
        shard_factors: train across the ranks of a torch.distributed process group with each
        rank holding a block of the user and item rows (and their Adam state) instead of a
        full copy; the model then holds its rank's rows only (`shard`): save() on every rank
        writes a file per rank plus a manifest that load() reassembles (docs/distributed.md).
    Bad settings raise TypeError (wrong type) or ValueError (bad value).

    The defaults were tuned on MovieLens-100K (5-fold CV) and half of MovieLens-1M (90/10),
    on other folds and splits than benchmarks/bench_movielens.py reports
    (benchmarks/results/movielens.md).
    """

    Config = MatrixFactorizationConfig
    FORMAT_VERSION = FORMAT_VERSION
    # The saved tensors that a sharded model splits by rows: (which rows, how they join).
    SHARDED_STATE = {"P": ("users", 1), "Q": ("items", 1), "user_bias": ("users", 0),
                     "item_bias": ("items", 0), "Y": ("items", 1),
                     "rated_indptr": ("users", "indptr"), "rated_indices": ("users", 0)}

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
        `validation`, and all ranks end with the same model (docs/distributed.md); with
        shard_factors=True, each with its block of the rows."""
        data = as_ratings(users, items, ratings)
        group = training_group(distributed, self.config)
        _check_finite(data)
        generator, rng = self._random_sources()
        sizes = group.check_inputs(data, validation)
        train, held_out = data, validation
        if validation is None and self.validation_fraction > 0:
            train, held_out = group.hold_out(data, self.validation_fraction, rng, sizes)
        training = self._prepare(data, train, group)
        held_out = group.to_owners(held_out, self)
        self.shard = group.shard_info()
        params = self._init_parameters(generator, group)
        self._history = training.history  # predictions during the fit add the implicit term
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
        # From here on P holds the whole user vectors p_u + |N(u)|^-½ Σ y_j (what predicting and
        # ranking use); N(u) is not needed any more.
        self.P, self._history = self._user_factors(), None
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
        m = len(group.user_rows)  # the users whose rows this process holds (all unless sharded)
        seen_u, seen_i = self.user_map.index(data.users), self.item_map.index(data.items)
        keep = (seen_u >= 0) & (seen_i >= 0)
        self._set_rated(*group.rated_pairs(seen_u[keep], seen_i[keep]), m)
        dev, dt = self.device, self.dtype
        rows, cols, ratings = group.localize(self.user_map.index(train.users),
                                             self.item_map.index(train.items), train.ratings)
        rows, cols = torch.as_tensor(rows, device=dev), torch.as_tensor(cols, device=dev)
        values = torch.as_tensor(ratings, dtype=dt, device=dev)
        n_train, self.global_mean, self.rating_range = group.rating_stats(ratings)
        n = len(self.item_map)
        self.effective_reg = self.reg if self.reg is not None else default_reg(n_train, n)
        user_counts, item_counts = group.sum_counts(
            torch.bincount(rows, minlength=m), torch.bincount(cols, minlength=len(self.item_map)))
        user_counts, item_counts = user_counts.to(dt), item_counts.to(dt)
        # The biases' penalty weights n^α, computed once (0^α is 1 for α = 0: unseen ids have
        # no gradient from the data, so their bias stays 0 either way).
        bias_weights = (user_counts.pow(self.bias_count_exponent),
                        item_counts.pow(self.bias_count_exponent))
        factor_weights = (user_counts.pow(self.factor_count_exponent),
                          item_counts.pow(self.factor_count_exponent))
        # N(u): the training pairs (never `data`'s held-out share, nor a test pair) of every
        # rank, or, sharded, of this rank's users (all of their pairs are here)
        history = group.user_history(rows, cols, m, n, dev, dt) if self._implicit_on() else None
        return _TrainingData(rows, cols, values - self.global_mean, user_counts, item_counts,
                             bias_weights, factor_weights, history)

    def _init_parameters(self, generator: torch.Generator, group: TrainingGroup) -> list:
        """P (r, m), Q (r, n) ~ N(0, init_std²) drawn on the CPU (the same start on every device
        and rank), the biases at 0; of each, the rows this process holds (group.user_rows,
        item_rows: all unless sharded); with `implicit`, Y (r, n) at 0 (Q's gradient starts the
        term). Set on the model and returned as a list."""
        dev, dt, r = self.device, self.dtype, self.rank
        users, items = group.user_rows, group.item_rows
        P = (draw_normal(generator, r, len(self.user_map), users, dt) * self.init_std).to(dev)
        Q = (draw_normal(generator, r, len(self.item_map), items, dt) * self.init_std).to(dev)
        params = [P.requires_grad_(), Q.requires_grad_(),
                  torch.zeros(len(users), dtype=dt, device=dev, requires_grad=True),
                  torch.zeros(len(items), dtype=dt, device=dev, requires_grad=True)]
        self.P, self.Q, self.user_bias, self.item_bias = params
        self.Y = torch.zeros(r, len(items), dtype=dt, device=dev, requires_grad=True) \
            if self._implicit_on() else None
        return params if self.Y is None else params + [self.Y]

    def _epoch(self, optimizer: torch.optim.Optimizer, data: _TrainingData,
               rng: np.random.Generator, group: TrainingGroup) -> float:
        """One pass over the training ratings; returns their mean squared error."""
        from mf_ext.ops import observed_mf_loss

        params = [self.P, self.Q, self.user_bias, self.item_bias]
        leaves = params if self.Y is None else params + [self.Y]
        total = 0.0
        for batch, count in group.batches(data.residual.numel(), self.batch_size, rng):
            r_, c_, v_ = (data.rows, data.cols, data.residual) if batch is None else (
                data.rows[batch], data.cols[batch], data.residual[batch])
            # sharded: fetched from their owners (Y: the rows of every item in N(u))
            c_, Q, item_bias, Y = group.gather_items(c_, self.Q, self.item_bias, self.Y)
            # The user vectors with the implicit term, for all users: O(|N| r) per step
            users = data.history.user_vectors(self.P, Y) if data.history else self.P
            loss = group.batch_loss(
                lambda reduction: observed_mf_loss(r_, c_, v_, users, Q, self.user_bias,
                                                   item_bias, reduction=reduction), count)
            optimizer.zero_grad(set_to_none=True)
            # The penalty is a sum over rows: the ranks that add it (rank 0 when each holds all
            # rows, every rank when sharded) count each row once between them.
            (loss + self._penalty(data) / group.n_train if group.adds_penalty else loss
             ).backward()
            total += group.all_reduce_gradients(leaves, loss, count)
            optimizer.step()
        return total / group.n_train

    def _penalty(self, data: _TrainingData) -> torch.Tensor:
        """The L2 terms of the objective times N: factor penalties weighted by each user's/item's
        count^factor_count_exponent, bias penalties by count^bias_count_exponent."""
        items = (self.Q * self.Q).sum(0) if self.Y is None else (
            (self.Q * self.Q).sum(0) + self.implicit_reg_scale * (self.Y * self.Y).sum(0))
        return (self.effective_reg * ((self.P * self.P).sum(0) @ data.factor_weights[0]
                                      + items @ data.factor_weights[1])
                + self.bias_reg * (self.user_bias.square() @ data.bias_weights[0]
                                   + self.item_bias.square() @ data.bias_weights[1]))

    def _validation_rmse(self, held_out: Optional[Ratings], group: TrainingGroup
                         ) -> Optional[float]:
        """RMSE on the held-out ratings; distributed, over all ranks' shards of them."""
        if held_out is None:
            return None
        error = group.prediction_errors(self, held_out)
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
        return self._predict_indices(u, i, self._user_factors(), self.Q, self.user_bias,
                                     self.item_bias)

    def _predict_indices(self, u: torch.Tensor, i: torch.Tensor, P: torch.Tensor,
                         Q: torch.Tensor, user_bias: torch.Tensor, item_bias: torch.Tensor
                         ) -> np.ndarray:
        """predict on indices into P / user_bias and Q / item_bias (−1: unknown)."""
        known_u, known_i = u >= 0, i >= 0
        uc, ic = u.clamp_min(0), i.clamp_min(0)
        with torch.no_grad():
            pred = torch.full(u.shape, self.global_mean, dtype=self.dtype, device=self.device)
            pred += torch.where(known_u, user_bias[uc], 0)
            pred += torch.where(known_i, item_bias[ic], 0)
            dots = (P[:, uc] * Q[:, ic]).sum(0)
            pred += torch.where(known_u & known_i, dots, 0)
            if self.clip:
                pred.clamp_(*self.rating_range)
        return pred.cpu().numpy().astype(np.float64)

    def evaluate(self, users: Any, items: Any = None, ratings: Any = None) -> dict:
        """{"rmse": …, "mae": …} on held-out ratings (same inputs as fit). On a model fitted with
        shard_factors=True, a collective: each rank passes any share of the ratings."""
        data = as_ratings(users, items, ratings)
        if self.shard is not None:
            from mf_ext.sharded import evaluate_sharded

            return evaluate_sharded(self, data)
        if len(data) == 0:
            raise ValueError("mf_ext.MatrixFactorization.evaluate: no ratings given")
        error = self.predict(data.users, data.items) - data.ratings
        return {"rmse": float(np.sqrt(np.mean(error ** 2))), "mae": float(np.mean(np.abs(error)))}

    def _implicit_on(self) -> bool:
        """implicit resolved: None means on."""
        return self.implicit is not False

    def _user_factors(self) -> torch.Tensor:
        """The user vectors predictions use: P, plus the implicit term during a fit (after it,
        P holds the sum)."""
        history = getattr(self, "_history", None)
        if history is None:
            return self.P
        with torch.no_grad():  # sharded: columns() fetches the y_j of N(u), a collective
            return history.user_vectors(self.P, history.columns(self.Y))

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
            Σ_i (y_i − b − pᵀq_i)² + reg·c^β·|p|² + bias_reg·c^α·b²,   y_i = r_i − μ − b_i,
        over the user's c ratings (c = n_u, α = bias_count_exponent, β = factor_count_exponent),
        i.e. the ridge system
            (Z Zᵀ + diag(reg·c^β, …, reg·c^β, bias_reg·c^α)) [p; b] = Z y,   Z = [q_i; 1].
        At the fit's optimum a training user's (p_u, b_u) solves the same system. With the
        implicit term the user's vector is p + t, t = c^-½ Σ_i y_i fixed by the items: the
        system is solved for p with y_i − tᵀq_i as the targets, and p + t returned. Solved in
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
        implicit = np.zeros(rank)
        if self.Y is not None:
            implicit = self.Y.detach().index_select(1, index).cpu().double().numpy().sum(1) \
                / math.sqrt(len(np.unique(item_index)))
            y = y - implicit @ Z[:rank]
        A, rhs = _small_products(Z, y)
        reg = self.effective_reg if self.reg is None else self.reg  # reg set since: that one
        A[np.arange(rank), np.arange(rank)] += reg * count ** self.factor_count_exponent
        A[rank, rank] += self.bias_reg * count ** self.bias_count_exponent
        if reg > 0 and self.bias_reg > 0:  # positive definite
            solution = np.linalg.solve(A, rhs)
        else:
            solution = np.linalg.lstsq(A, rhs, rcond=None)[0]
        return (torch.as_tensor(solution[:rank] + implicit, dtype=self.dtype, device=self.device),
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
            "Y": None if self.Y is None else self.Y.detach().cpu(),
            "effective_reg": self.effective_reg,
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
        Y = state.get("Y")  # format version 1 has none
        self.Y = None if Y is None else Y.to(device)
        self.effective_reg = state.get("effective_reg", self.reg)  # version 1: reg was given
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

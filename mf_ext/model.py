"""MatrixFactorization: a biased matrix-factorization recommender trained with Adam on the fused
observed-entries op (sklearn/Surprise-like API)."""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from mf_ext.data import IdMap, Ratings, as_ratings
from mf_ext.distributed import data_parallel

FORMAT_VERSION = 1


@dataclass
class EpochRecord:
    epoch: int
    train_rmse: float
    val_rmse: Optional[float]
    seconds: float


class MatrixFactorization:
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

    Args:
        rank: latent dimension r. epochs: maximum passes. lr: Adam's learning rate.
        reg, bias_reg: the L2 weights above. bias_count_exponent: α above, in [0, 1]. batch_size: None for full-batch Adam (the
        notebook's optimizer), else mini-batches of that many ratings, reshuffled each epoch.
        validation_fraction: share of the training ratings held out for early stopping (0, the
        default, trains on all of them for `epochs`). patience: epochs without a better
        validation RMSE before stopping; the best epoch's parameters are kept. init_std: the
        factors start as N(0, init_std²), the biases at 0. lr_schedule: "constant" or "cosine"
        (decay to 1% of lr over `epochs`). clip: clip predictions to the training ratings'
        range. seed: makes a run reproducible. device, dtype: where and in what precision.

    The defaults were tuned on MovieLens-100K (5-fold CV, benchmarks/bench_movielens.py).
    """

    def __init__(
        self,
        rank: int = 64,
        epochs: int = 160,
        lr: float = 0.05,
        reg: float = 0.12,
        bias_reg: float = 0.25,
        bias_count_exponent: float = 0.5,
        batch_size: Optional[int] = None,
        validation_fraction: float = 0.0,
        patience: int = 10,
        init_std: float = 0.01,
        lr_schedule: str = "constant",
        clip: bool = True,
        seed: Optional[int] = 0,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        _check_int("rank", rank, 1)
        _check_int("epochs", epochs, 0)
        _check_int("patience", patience, 1)
        _check_positive("lr", lr)
        _check_nonnegative("reg", reg)
        _check_nonnegative("bias_reg", bias_reg)
        _check_nonnegative("init_std", init_std)
        if isinstance(bias_count_exponent, bool) or not isinstance(
                bias_count_exponent, (int, float)) or not 0 <= bias_count_exponent <= 1:
            raise ValueError(f"mf_ext.MatrixFactorization: bias_count_exponent must be a number "
                             f"in [0, 1], got {bias_count_exponent!r}")
        if batch_size is not None:
            _check_int("batch_size", batch_size, 1)
        if not (isinstance(validation_fraction, (int, float)) and 0 <= validation_fraction < 1):
            raise ValueError(f"mf_ext.MatrixFactorization: validation_fraction must be in "
                             f"[0, 1), got {validation_fraction!r}")
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"mf_ext.MatrixFactorization: lr_schedule must be \"cosine\" or "
                             f"\"constant\", got {lr_schedule!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"mf_ext.MatrixFactorization: dtype must be torch.float32 or "
                            f"torch.float64, got {dtype!r}")
        self.rank, self.epochs, self.lr = rank, epochs, float(lr)
        self.reg, self.bias_reg = float(reg), float(bias_reg)
        self.bias_count_exponent = float(bias_count_exponent)
        self.batch_size, self.validation_fraction = batch_size, float(validation_fraction)
        self.patience, self.init_std, self.clip = patience, float(init_std), clip
        self.lr_schedule = lr_schedule
        self.seed, self.device, self.dtype = seed, torch.device(device), dtype
        self.history: list[EpochRecord] = []
        self.interrupted = False
        self._fitted = False

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
        sync = data_parallel(distributed, self.device)
        if len(data) == 0 and sync is None:
            raise ValueError("mf_ext.MatrixFactorization.fit: no ratings given (empty input)")
        bad = ~np.isfinite(data.ratings)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise ValueError(f"mf_ext.MatrixFactorization.fit: {int(bad.sum())} ratings are NaN "
                             f"or Inf, the first at position {k}: {data.ratings[k]}")
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        rng = np.random.default_rng(None if self.seed is None else self.seed)

        train, held_out = data, validation
        if sync is not None:  # global statistics agreed across ranks (mf_ext/distributed.py)
            sizes = sync.check_inputs(data, validation)
            if held_out is None and self.validation_fraction > 0:
                train, held_out = sync.hold_out(data, self.validation_fraction, rng, sizes)
        elif held_out is None and self.validation_fraction > 0 and len(data) >= 20:
            order = rng.permutation(len(data))
            n_val = max(1, int(round(len(data) * self.validation_fraction)))
            train, held_out = data.subset(np.sort(order[n_val:])), data.subset(np.sort(order[:n_val]))

        self.user_map, self.item_map = (IdMap(train.users), IdMap(train.items)) if sync is None \
            else sync.id_maps(train)
        m, n = len(self.user_map), len(self.item_map)
        seen_u, seen_i = self.user_map.index(data.users), self.item_map.index(data.items)
        keep = (seen_u >= 0) & (seen_i >= 0)
        seen_u, seen_i = (seen_u[keep], seen_i[keep]) if sync is None \
            else sync.rated_pairs(seen_u[keep], seen_i[keep])
        self._set_rated(seen_u, seen_i, m)
        dev, dt = self.device, self.dtype
        rows = torch.as_tensor(self.user_map.index(train.users), device=dev)
        cols = torch.as_tensor(self.item_map.index(train.items), device=dev)
        values = torch.as_tensor(train.ratings, dtype=dt, device=dev)
        if sync is None:
            self.global_mean = float(train.ratings.mean())
            self.rating_range = (float(train.ratings.min()), float(train.ratings.max()))
        else:
            _, self.global_mean, self.rating_range = sync.rating_stats(train.ratings)
        residual = values - self.global_mean
        user_counts = torch.bincount(rows, minlength=m)
        item_counts = torch.bincount(cols, minlength=n)
        if sync is not None:
            sync.sum_counts(user_counts, item_counts)
        user_counts, item_counts = user_counts.to(dt), item_counts.to(dt)
        # The biases' penalty weights n^α, computed once (0^α is 1 for α = 0: unseen ids have
        # no gradient from the data, so their bias stays 0 either way).
        bias_weights = (user_counts.pow(self.bias_count_exponent),
                        item_counts.pow(self.bias_count_exponent))

        P = (torch.randn(self.rank, m, generator=generator, dtype=dt) * self.init_std).to(dev)
        Q = (torch.randn(self.rank, n, generator=generator, dtype=dt) * self.init_std).to(dev)
        params = [P.requires_grad_(), Q.requires_grad_(),
                  torch.zeros(m, dtype=dt, device=dev, requires_grad=True),
                  torch.zeros(n, dtype=dt, device=dev, requires_grad=True)]
        self.P, self.Q, self.user_bias, self.item_bias = params
        optimizer = torch.optim.Adam(params, lr=self.lr,
                                     fused=True if dev.type == "cuda" else None)
        # Optional cosine decay to 1% of lr over `epochs` (for mini-batches mostly: full-batch
        # Adam at the default lr already converges).
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(self.epochs, 1), eta_min=self.lr * 0.01) \
            if self.lr_schedule == "cosine" else None

        self.history, self.interrupted = [], False
        self._fitted = True
        best_rmse, best_state, best_epoch = math.inf, None, 0
        bar = _progress_bar(self.epochs) if progress else None
        try:
            for epoch in range(1, self.epochs + 1):
                start = time.perf_counter()
                train_mse = self._epoch(optimizer, rows, cols, residual, user_counts,
                                        item_counts, bias_weights, rng, sync)
                if scheduler is not None:
                    scheduler.step()
                val_rmse = self._validation_rmse(held_out, sync)
                record = EpochRecord(epoch, math.sqrt(max(train_mse, 0.0)), val_rmse,
                                     time.perf_counter() - start)
                self.history.append(record)
                # The best state first, so that an interrupt in the callback or the progress
                # bar still counts this epoch.
                stop = False
                if val_rmse is not None:
                    if val_rmse < best_rmse - 1e-6:
                        best_rmse, best_epoch = val_rmse, epoch
                        best_state = [p.detach().clone() for p in params]
                    else:
                        stop = epoch - best_epoch >= self.patience
                if callback is not None:
                    callback(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(train=f"{record.train_rmse:.4f}",
                                    val="-" if val_rmse is None else f"{val_rmse:.4f}",
                                    refresh=False)
                if stop:
                    break
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
            if bar is not None:
                bar.close()
        if best_state is not None:
            with torch.no_grad():
                for p, best in zip(params, best_state):
                    p.copy_(best)
        self.best_epoch = best_epoch if best_state is not None else len(self.history)
        for p in params:
            p.requires_grad_(False)
        return self

    def _epoch(self, optimizer, rows, cols, residual, user_counts, item_counts, bias_weights,
               rng, sync=None) -> float:
        """One pass over the training ratings; returns their mean squared error."""
        from mf_ext.ops import observed_mf_loss

        nnz = residual.numel() if sync is None else sync.n_train  # N of the objective
        if sync is not None:
            batches = sync.batches(residual.numel(), self.batch_size, rng)
        elif self.batch_size is None or self.batch_size >= nnz:
            batches = [(None, nnz)]
        else:
            order = torch.as_tensor(rng.permutation(nnz), device=rows.device)
            batches = [(b, len(b)) for b in torch.split(order, self.batch_size)]
        params = [self.P, self.Q, self.user_bias, self.item_bias]
        total = 0.0
        for batch, count in batches:
            r_, c_, v_ = (rows, cols, residual) if batch is None else (
                rows[batch], cols[batch], residual[batch])
            # Distributed: this shard's squared errors over the step's GLOBAL count, so that the
            # all-reduced (summed) gradient is the single-process one.
            data = observed_mf_loss(r_, c_, v_, self.P, self.Q, self.user_bias, self.item_bias,
                                    reduction="mean") if sync is None else (
                observed_mf_loss(r_, c_, v_, self.P, self.Q, self.user_bias, self.item_bias,
                                 reduction="sum") / count)
            # Per-rating L2 (Surprise's form): factor penalties weighted by each user's/item's
            # count, bias penalties by count^bias_count_exponent, scaled like the data term so
            # that full batch and mini-batches agree.
            penalty = (self.reg * ((self.P * self.P).sum(0) @ user_counts
                                   + (self.Q * self.Q).sum(0) @ item_counts)
                       + self.bias_reg * (self.user_bias.square() @ bias_weights[0]
                                          + self.item_bias.square() @ bias_weights[1])) / nnz
            optimizer.zero_grad(set_to_none=True)
            # The penalty is global: rank 0 alone adds it, so the sum counts it once.
            (data + penalty if sync is None or sync.rank == 0 else data).backward()
            if sync is None:
                total += data.item() * v_.numel()
            else:
                total += sync.all_reduce_gradients(params, data.detach() * count)
            optimizer.step()
        return total / nnz

    def _validation_rmse(self, held_out: Optional[Ratings], sync=None) -> Optional[float]:
        """RMSE on the held-out ratings; distributed, over all ranks' shards of them."""
        if held_out is None:
            return None
        if sync is None:
            return self.evaluate(held_out)["rmse"]
        error = self.predict(held_out.users, held_out.items) - held_out.ratings \
            if len(held_out) else np.zeros(0)
        return sync.rmse(float(np.square(error).sum()), len(error))

    # ------------------------------------------------------------------ using the model

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise RuntimeError("mf_ext.MatrixFactorization: call fit() (or load()) first")

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
        training (nor in `exclude`), as [(item id, predicted rating), …], best first."""
        self._check_fitted()
        _check_int("k", k, 1)
        index = int(self.user_map.index(np.asarray([user]))[0])
        if index < 0:
            raise KeyError(f"mf_ext.MatrixFactorization.recommend: unknown user {user!r}")
        with torch.no_grad():
            scores = (self.global_mean + self.user_bias[index] + self.item_bias
                      + self.P[:, index] @ self.Q)
            if self.clip:
                scores = scores.clamp(*self.rating_range)
            scores = scores.cpu().double()
        scores[torch.as_tensor(self._rated_items(index))] = -math.inf
        if exclude is not None:
            ex = self.item_map.index(np.asarray(exclude))
            scores[torch.as_tensor(ex[ex >= 0])] = -math.inf
        k = min(k, int(torch.isfinite(scores).sum()))
        top = torch.topk(scores, k)
        return [(self.item_map.raw(int(j)).item(), float(s))
                for s, j in zip(top.values, top.indices)]

    def _set_rated(self, user_index: np.ndarray, item_index: np.ndarray, m: int) -> None:
        """What each user rated, as CSR arrays (for recommend to skip)."""
        order = np.argsort(user_index, kind="stable")
        self._rated_indptr = np.concatenate(
            [[0], np.cumsum(np.bincount(user_index, minlength=m))]).astype(np.int64)
        self._rated_indices = item_index[order].astype(np.int64)

    def _rated_items(self, user_index: int) -> np.ndarray:
        start, end = self._rated_indptr[user_index], self._rated_indptr[user_index + 1]
        return self._rated_indices[start:end]

    # ------------------------------------------------------------------ persistence

    def save(self, path: str) -> None:
        """Write the model atomically (a temporary file in the same folder, then a rename),
        so an interrupted save never leaves a broken file."""
        self._check_fitted()
        state = {
            "format_version": FORMAT_VERSION,
            "config": {k: _plain(getattr(self, k)) for k in (
                "rank", "epochs", "lr", "reg", "bias_reg", "bias_count_exponent", "batch_size",
                "validation_fraction", "patience", "init_std", "lr_schedule", "clip", "seed")},
            "dtype": str(self.dtype).replace("torch.", ""),
            "global_mean": self.global_mean,
            "rating_range": self.rating_range,
            "user_ids": _ids_to_file(self.user_map.ids),
            "item_ids": _ids_to_file(self.item_map.ids),
            "P": self.P.detach().cpu(), "Q": self.Q.detach().cpu(),
            "user_bias": self.user_bias.detach().cpu(), "item_bias": self.item_bias.detach().cpu(),
            "rated_indptr": torch.from_numpy(self._rated_indptr),
            "rated_indices": torch.from_numpy(self._rated_indices),
            "history": [{k: _plain(v) for k, v in vars(h).items()} for h in self.history],
        }
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".mf_ext-", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str, device: str = "cpu") -> "MatrixFactorization":
        """A model written by save(). Refuses files of another format version clearly. The file
        is read with torch.load(weights_only=True): tensors and plain Python values only, so
        opening an untrusted file cannot run code."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"mf_ext.MatrixFactorization.load: no such file {path!r}") \
                from None
        except Exception as exc:
            raise ValueError(f"mf_ext.MatrixFactorization.load: {path!r} is not an mf_ext model "
                             f"({type(exc).__name__}: {exc})") from None
        if not isinstance(state, dict) or "format_version" not in state:
            raise ValueError(f"mf_ext.MatrixFactorization.load: {path!r} is not an mf_ext model")
        if state["format_version"] != FORMAT_VERSION:
            raise ValueError(f"mf_ext.MatrixFactorization.load: {path!r} has model format "
                             f"version {state['format_version']}, this mf_ext reads version "
                             f"{FORMAT_VERSION}; refit or use a matching mf_ext")
        dtype = {"float32": torch.float32, "float64": torch.float64}.get(state.get("dtype"))
        if dtype is None:
            raise ValueError(f"mf_ext.MatrixFactorization.load: {path!r} has an unknown dtype "
                             f"{state.get('dtype')!r}")
        config = dict(state["config"])
        config.setdefault("bias_count_exponent", 1.0)  # files saved before the option: n^1
        model = cls(**config, device=device, dtype=dtype)
        model.user_map = IdMap(_ids_from_file(state["user_ids"]))
        model.item_map = IdMap(_ids_from_file(state["item_ids"]))
        model.global_mean, model.rating_range = state["global_mean"], tuple(state["rating_range"])
        model.P, model.Q = state["P"].to(device), state["Q"].to(device)
        model.user_bias, model.item_bias = state["user_bias"].to(device), state["item_bias"].to(device)
        model._rated_indptr = state["rated_indptr"].numpy()
        model._rated_indices = state["rated_indices"].numpy()
        model.history = [EpochRecord(**h) for h in state["history"]]
        model._fitted = True
        return model


def _plain(value: Any) -> Any:
    """numpy scalars as Python ones, so that a saved model holds nothing but tensors and plain
    values (what torch.load(weights_only=True) accepts)."""
    return value.item() if isinstance(value, np.generic) else value


def _ids_to_file(ids: np.ndarray):
    """Integer ids as an int64 tensor, any others as a list of str."""
    if ids.dtype.kind in "iu":
        return torch.from_numpy(ids.astype(np.int64))
    return [str(x) for x in ids.tolist()]


def _ids_from_file(ids) -> np.ndarray:
    return ids.numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids, dtype=str)


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"mf_ext.MatrixFactorization: {name} must be an integer >= {low}, "
                         f"got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"mf_ext.MatrixFactorization: {name} must be a finite number > 0, "
                         f"got {value!r}")


def _check_nonnegative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value >= 0):
        raise ValueError(f"mf_ext.MatrixFactorization: {name} must be a finite number >= 0, "
                         f"got {value!r}")


def _progress_bar(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="fit", unit="epoch")

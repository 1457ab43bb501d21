"""Data-parallel training of MatrixFactorization over torch.distributed (docs/distributed.md).

Each rank holds a shard of the ratings and full copies of the factors and biases. The ranks agree
once on the global statistics (id maps, mean rating, rating range, per-user/item counts, N); then
every step each rank computes its shard's gradient of the loss normalized by the GLOBAL rating
count, one bucketed all-reduce sums them (so the sum is the single-process gradient), and every
rank takes the same Adam step: all ranks end with the same model.

    shard = shard_ratings(ratings, rank, world_size)      # contiguous, balanced, deterministic
    model.fit(shard)                                      # inside an initialized process group
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from mf_ext.data import IdMap, Ratings
from mf_ext.user_history import UserHistory

_WHO = "mf_ext.MatrixFactorization.fit"


def shard_ratings(data: Ratings, rank: int, world_size: int) -> Ratings:
    """Rank `rank`'s share of `data`: the rank-th of `world_size` contiguous blocks whose sizes
    differ by at most one (np.array_split's). Deterministic: the same data gives every rank the
    same partition, and the shards concatenated in rank order are `data` again."""
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"mf_ext.shard_ratings: world_size must be an integer >= 1, got "
                         f"{world_size!r}")
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"mf_ext.shard_ratings: rank must be in [0, {world_size}), got {rank!r}")
    start, end = _block(len(data), rank, world_size)
    return data.subset(np.arange(start, end))


def _block(n: int, rank: int, world_size: int) -> Tuple[int, int]:
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def draw_normal(generator: torch.Generator, rows: int, columns: int, keep: range,
                dtype: torch.dtype, chunk: int = 1 << 20) -> torch.Tensor:
    """Columns `keep` of torch.randn(rows, columns, generator=generator, dtype=dtype), leaving
    the generator where that call would: a rank of a sharded fit draws its block of the factors
    with the values a single process draws, without holding the whole matrix. The draw is cut
    into calls of `chunk` values (a multiple of 16; the last call takes the rest, at least 16):
    CPU randn fills 16 values at a time and redraws a short tail, so such calls consume and
    return what one call does (tests/test_sharded.py checks it)."""
    if len(keep) == columns:
        return torch.randn(rows, columns, generator=generator, dtype=dtype)
    out = torch.empty(rows, len(keep), dtype=dtype)
    total, done = rows * columns, 0
    while done < total:
        size = min(chunk, total - done)
        if 0 < total - done - size < 16:
            size = total - done
        values = torch.randn(size, generator=generator, dtype=dtype)
        # the kept positions in [done, done + size): row k's columns keep, at k·columns + keep
        for row in range(done // columns, (done + size - 1) // columns + 1):
            start = max(row * columns + keep.start, done)
            stop = min(row * columns + keep.stop, done + size)
            if start < stop:
                out[row, start - row * columns - keep.start:stop - row * columns - keep.start] \
                    = values[start - done:stop - done]
        done += size
    return out


def data_parallel(distributed: Optional[bool], device: torch.device) -> Optional["DataParallel"]:
    """fit's `distributed` option resolved: None (auto) trains data-parallel when a process group
    is initialized with more than one rank; True requires one (any size); False never."""
    if distributed is None:
        distributed = (dist.is_available() and dist.is_initialized()
                       and dist.get_world_size() > 1)
    if not distributed:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{_WHO}: distributed=True but no torch.distributed process group is "
                           f"initialized; call torch.distributed.init_process_group first (or "
                           f"launch with torchrun)")
    if dist.get_backend() == "nccl" and device.type != "cuda":
        raise ValueError(f"{_WHO}: the process group uses nccl, which needs device=\"cuda\"; got "
                         f"device={str(device)!r} (use gloo for CPU training)")
    return DataParallel(device)


def training_group(distributed: Optional[bool], settings) -> "TrainingGroup":
    """The processes a fit with these settings (a model's Config) trains on: ShardedFactors when
    settings.shard_factors (mf_ext/sharded.py), else DataParallel when `distributed` resolves to
    data-parallel (see data_parallel), else SingleProcess, whose collectives do nothing."""
    device = torch.device(settings.device)
    if getattr(settings, "shard_factors", False):
        from mf_ext.sharded import sharded_factors

        return sharded_factors(distributed, settings)
    return data_parallel(distributed, device) or SingleProcess(device)


class TrainingGroup:
    """The steps of MatrixFactorization.fit that depend on how many processes train together.
    SingleProcess does them for one process; DataParallel agrees on them across ranks, where
    every method is a collective: all ranks call it, in the same order. Both hold every row of
    the factors (the steps below that only sharding needs do nothing here); ShardedFactors
    (mf_ext/sharded.py) holds a block of them."""

    # The ranks that add the L2 penalty (a sum over rows) to their loss: rank 0 alone when every
    # rank holds all the rows, so that the ranks' summed gradients count it once.
    adds_penalty: bool
    who = _WHO  # the fit that a failed collective's error names

    def __init__(self, device: torch.device, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        self.device = device
        self.train_sizes: List[int] = []  # each rank's number of training ratings
        self.n_train = 0                  # their sum, the N of the objective
        self.adds_penalty = rank == 0
        # The user and item indices whose factor rows this process holds: all of them here.
        self.user_rows, self.item_rows = range(0), range(0)

    def _hold_all_rows(self, user_map: IdMap, item_map: IdMap) -> Tuple[IdMap, IdMap]:
        self.user_rows, self.item_rows = range(len(user_map)), range(len(item_map))
        return user_map, item_map

    # ---------------------------------------------------------------- what only sharding changes

    def localize(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The training triples (user index, item index, rating) this process trains on, user
        indices counted from user_rows.start: here the given ones."""
        return rows, cols, values

    def to_owners(self, ratings: Optional[Ratings], model) -> Optional[Ratings]:
        """Held-out ratings (raw ids) in the form prediction_errors takes: here as they are."""
        return ratings

    def gather_items(self, cols: torch.Tensor, *items: Optional[torch.Tensor]
                     ) -> Tuple[Optional[torch.Tensor], ...]:
        """(cols, *items) for the loss op: the item indices of a batch and the item tensors
        they index (Q, item_bias, and Y or None). Here every item is held: the tensors
        themselves."""
        return (cols,) + items

    def user_history(self, rows: torch.Tensor, cols: torch.Tensor, m: int, n: int,
                     device: torch.device, dtype: torch.dtype) -> UserHistory:
        """N(u) of the SVD++ term from the training pairs (rows, cols) of every rank."""
        return UserHistory(*self.rated_pairs(rows.cpu().numpy(), cols.cpu().numpy()), m, n,
                           device, dtype)

    def prediction_errors(self, model, ratings: Ratings) -> np.ndarray:
        """prediction − rating of each held-out rating (to_owners' form) this process holds."""
        if len(ratings) == 0:
            return np.zeros(0)
        return model.predict(ratings.users, ratings.items) - ratings.ratings

    def shard_info(self):
        """What a sharded model records of its rows (mf_ext.sharded.ShardInfo); None here."""
        return None

    def hold_out(self, data: Ratings, fraction: float, rng: np.random.Generator,
                 sizes: Sequence[int]) -> Tuple[Ratings, Optional[Ratings]]:
        """The hold-out rule: a random `fraction` (at least one) of all N ratings, when N >= 20;
        none below. Drawn over the global positions, so with shard_ratings' contiguous shards
        every rank holds out exactly the ratings a single process would. `rng` advances
        identically on every rank. Returns (training ratings, held-out ratings or None)."""
        total, offset = sum(sizes), sum(sizes[:self.rank])
        if total < 20:
            return data, None
        order = rng.permutation(total)
        held = np.zeros(total, dtype=bool)
        held[order[:max(1, int(round(total * fraction)))]] = True
        mine = held[offset:offset + len(data)]
        return data.subset(np.flatnonzero(~mine)), data.subset(np.flatnonzero(mine))


class SingleProcess(TrainingGroup):
    """One process: DataParallel's interface, with statistics taken locally and collectives
    that do nothing."""

    def check_inputs(self, data: Ratings, validation: Optional[Ratings]) -> List[int]:
        """[the number of ratings]; refuses empty training or validation ratings."""
        if len(data) == 0:
            raise ValueError(f"{_WHO}: no ratings given (empty input)")
        if validation is not None and len(validation) == 0:
            raise ValueError(f"{_WHO}: validation= holds no ratings")
        return [len(data)]

    def id_maps(self, train: Ratings) -> Tuple[IdMap, IdMap]:
        return self._hold_all_rows(IdMap(train.users), IdMap(train.items))

    def rated_pairs(self, users: np.ndarray, items: np.ndarray
                    ) -> Tuple[np.ndarray, np.ndarray]:
        return users, items

    def rating_stats(self, values: np.ndarray) -> Tuple[int, float, Tuple[float, float]]:
        """(N, mean, (min, max)) of the training ratings."""
        if len(values) == 0:
            raise ValueError(f"{_WHO}: no ratings left to train on after holding out the "
                             f"validation share")
        self.train_sizes, self.n_train = [len(values)], len(values)
        return self.n_train, float(values.mean()), (float(values.min()), float(values.max()))

    def sum_counts(self, user_counts: torch.Tensor, item_counts: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
        return user_counts, item_counts

    def batches(self, n_local: int, batch_size: Optional[int], rng: np.random.Generator,
                ) -> List[Tuple[Optional[torch.Tensor], int]]:
        """The epoch's batches as (index or None for all, number of ratings): all of them, or
        mini-batches of `batch_size` in an order `rng` shuffles."""
        if batch_size is None or batch_size >= n_local:
            return [(None, n_local)]
        order = torch.as_tensor(rng.permutation(n_local), device=self.device)
        return [(b, len(b)) for b in torch.split(order, batch_size)]

    def batch_loss(self, squared_errors: Callable[[str], torch.Tensor], count: int
                   ) -> torch.Tensor:
        """The batch's mean squared error: `squared_errors(reduction)` is the loss op."""
        return squared_errors("mean")

    def all_reduce_gradients(self, params: Sequence[torch.Tensor], batch_loss: torch.Tensor,
                             count: int) -> float:
        """Nothing to sum; returns the batch's squared-error sum."""
        return batch_loss.item() * count

    def rmse(self, squared_error_sum: float, count: int) -> float:
        return math.sqrt(squared_error_sum / count)


class DataParallel(TrainingGroup):
    """The collectives MatrixFactorization.fit needs, on the default process group. Every method
    is a collective: all ranks call it, in the same order."""

    def __init__(self, device: torch.device):
        super().__init__(device, dist.get_rank(), dist.get_world_size())

    # ---------------------------------------------------------------- agreement, once per fit

    def check_inputs(self, data: Ratings, validation: Optional[Ratings]) -> List[int]:
        """Each rank's number of ratings; the ranks must agree on whether a validation set
        was passed (else they would disagree on the per-epoch collectives)."""
        rows = self._gather_objects((len(data), validation is not None), "input-size all-gather")
        given = [has for _, has in rows]
        if any(given) and not all(given):
            raise ValueError(f"{_WHO}: validation= was given on ranks "
                             f"{[k for k, has in enumerate(given) if has]} but not on the others; "
                             f"pass each rank its shard of the validation set (possibly empty)")
        return [size for size, _ in rows]

    def id_maps(self, train: Ratings) -> Tuple[IdMap, IdMap]:
        """The user and item maps of the union of all ranks' training ids."""
        parts = self._gather_objects((np.unique(train.users), np.unique(train.items)),
                                     "id-map all-gather")
        return self._hold_all_rows(*(IdMap(_concatenate([p[k] for p in parts])) for k in (0, 1)))

    def rated_pairs(self, users: np.ndarray, items: np.ndarray
                    ) -> Tuple[np.ndarray, np.ndarray]:
        """Every rank's (user index, item index) pairs, in rank order (for recommend)."""
        small = np.int32 if max(users.max(initial=0), items.max(initial=0)) < 2**31 else np.int64
        parts = self._gather_objects((users.astype(small), items.astype(small)), "rated-pairs all-gather")
        return tuple(_concatenate([p[k] for p in parts]).astype(np.int64) for k in (0, 1))

    def rating_stats(self, values: np.ndarray) -> Tuple[int, float, Tuple[float, float]]:
        """(N, mean, (min, max)) of all ranks' training ratings. Also records the per-rank
        sizes that mini-batching needs."""
        local = (len(values), float(values.sum()),
                 float(values.min()) if len(values) else math.inf,
                 float(values.max()) if len(values) else -math.inf)
        rows = self._gather_objects(local, "statistics all-gather")
        self.train_sizes = [row[0] for row in rows]
        self.n_train = sum(self.train_sizes)
        if self.n_train == 0:
            raise ValueError(f"{_WHO}: no ratings given on any of the {self.world_size} ranks")
        mean = math.fsum(row[1] for row in rows) / self.n_train
        return self.n_train, mean, (min(r[2] for r in rows), max(r[3] for r in rows))

    def sum_counts(self, user_counts: torch.Tensor, item_counts: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The per-user and per-item rating counts summed over the ranks (one all-reduce)."""
        both = torch.cat([user_counts, item_counts])
        with self._collective("count all-reduce"):
            dist.all_reduce(both)
        return both[:len(user_counts)], both[len(user_counts):]

    # ---------------------------------------------------------------- every epoch / step

    def batches(self, n_local: int, batch_size: Optional[int], rng: np.random.Generator,
                ) -> List[Tuple[Optional[torch.Tensor], int]]:
        """This rank's batches for one epoch as (local index or None for all, global number of
        ratings in that step). Mini-batches: steps = ceil(N / batch_size) on every rank, each
        rank splitting its own shuffled shard into that many near-equal parts, so a step sees
        ~batch_size ratings in all; at most as many steps as the largest shard has ratings, so
        that no step is empty on every rank. `rng` advances identically on every rank."""
        if batch_size is None or batch_size >= self.n_train:
            return [(None, self.n_train)]
        steps = min(math.ceil(self.n_train / batch_size), max(self.train_sizes))
        shuffle = np.random.default_rng([int(rng.integers(2**32)), self.rank])
        parts = np.array_split(shuffle.permutation(n_local), steps)
        counts = [sum(_block(size, k, steps)[1] - _block(size, k, steps)[0]
                      for size in self.train_sizes) for k in range(steps)]
        return [(torch.as_tensor(p, device=self.device), c) for p, c in zip(parts, counts)]

    def batch_loss(self, squared_errors: Callable[[str], torch.Tensor], count: int
                   ) -> torch.Tensor:
        """This shard's squared errors over the step's GLOBAL count, so that the all-reduced
        (summed) gradient is the single-process one."""
        return squared_errors("sum") / count

    def all_reduce_gradients(self, params: Sequence[torch.Tensor], batch_loss: torch.Tensor,
                             count: int) -> float:
        """Sums every rank's gradients of `params` and `batch_loss * count` with ONE all-reduce
        of a flat buffer, writes the sums back into the .grad fields; returns the summed
        squared-error sum."""
        loss_sum = batch_loss.detach() * count
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        bucket = torch.cat([g.reshape(-1) for g in grads]
                           + [loss_sum.detach().reshape(1).to(grads[0].dtype)])
        with self._collective("gradient all-reduce"):
            dist.all_reduce(bucket)
        for p, flat in zip(params, torch.split(bucket[:-1], [g.numel() for g in grads])):
            p.grad = flat.view_as(p)
        return float(bucket[-1])

    def rmse(self, squared_error_sum: float, count: int) -> float:
        """The RMSE over all ranks' held-out ratings (NaN when there are none)."""
        sums = torch.tensor([squared_error_sum, float(count)], dtype=torch.float64,
                            device=self.device)
        with self._collective("validation all-reduce"):
            dist.all_reduce(sums)
        return math.sqrt(sums[0].item() / sums[1].item()) if sums[1].item() > 0 else math.nan

    # ---------------------------------------------------------------- plumbing

    def _gather_objects(self, obj, what: str) -> list:
        out = [None] * self.world_size
        with self._collective(what):
            dist.all_gather_object(out, obj)
        return out

    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        """Turns a collective's failure (a rank raised and left, or the group timed out) into
        one clear error that says so, on the ranks still running."""
        try:
            yield
        except RuntimeError as exc:  # DistBackendError and gloo/nccl errors derive from it
            raise RuntimeError(
                f"{self.who}: rank {self.rank} of {self.world_size}: the {what} failed; another "
                f"rank probably raised an error or stopped (see its output), or the process "
                f"group's timeout expired. ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})"
            ) from exc


def _concatenate(parts: List[np.ndarray]) -> np.ndarray:
    """np.concatenate that ignores empty parts, whose dtype (float64 for an empty shard's
    np.unique) would otherwise turn integer ids into floats."""
    full = [p for p in parts if len(p)]
    return np.concatenate(full) if full else parts[0]


# ---------------------------------------------------------------- the CLI under torchrun

def launched_by_torchrun() -> bool:
    """True when the environment of a torchrun worker is present (RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_environment(device: str, timeout_s: float = 1800.0) -> torch.device:
    """Initializes the default process group from torchrun's environment: nccl for CUDA (one GPU
    per local rank), gloo for the CPU. Returns the device this rank trains on."""
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        backend, target = "nccl", torch.device("cuda", local)
    else:
        backend, target = "gloo", torch.device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return target


__all__ = ["shard_ratings", "draw_normal", "data_parallel", "training_group", "TrainingGroup",
           "SingleProcess", "DataParallel", "launched_by_torchrun", "init_from_environment"]

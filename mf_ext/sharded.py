"""Factors sharded row-wise across torch.distributed ranks: MatrixFactorization(shard_factors=True)
(docs/distributed.md, "Sharded factors").

Rank k of P holds a contiguous block of the user rows and one of the item rows of the factors,
biases and SVD++ item factors y_j (and, through its optimizer, their Adam state): blocks of the
sorted id maps balanced in training ratings with a bound on rows (mf_ext/shard_blocks.py), agreed
from the global counts. The fit moves each rating to its user's owner, so user rows are always
local, and so is each user's history N(u) (its training items). Every step:

  1. each rank asks the owners for the item rows its ratings touch (the ids once per fit for the
     full batch, once per step for mini-batches) and receives them: an all-to-all of (r + 1)-wide
     rows, factor column and bias, (2r + 1)-wide with the y_j column beside; with the SVD++ term
     the rows are those of every item of the rank's training ratings (its users' N(u)), every
     step, the batch's among them;
  2. the fused op runs on the local user block and the gathered item block (indices remapped),
     the user vectors being p_u + |N(u)|^-½ Σ y_j over the gathered y_j;
  3. the gathered rows' gradients go back by the reverse all-to-all, summed at the owner (to the
     gradient of the owner's share of the L2 penalty);
  4. every rank applies Adam to all of its rows.

The transport is all_to_all_single; where the backend lacks it, pairs of isend/irecv carry the
same bytes. A model fitted this way holds its rank's rows only: `save` (a collective) writes one
file per rank plus a manifest that `load` reassembles into a whole model, and `evaluate` is a
collective over the ranks' shares of the ratings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from mf_ext.data import IdMap, Ratings
from mf_ext.distributed import DataParallel
from mf_ext.shard_blocks import balanced_blocks
from mf_ext.user_history import UserHistory

# The settings sharded training is written for. A setting added to the model later is refused
# (named in the error) unless it is off (None, False or 0) until someone adds it here.
SUPPORTED_SETTINGS = frozenset({
    "rank", "epochs", "lr", "reg", "bias_reg", "bias_count_exponent", "factor_count_exponent",
    "batch_size",
    "validation_fraction", "patience", "init_std", "lr_schedule", "clip", "seed", "device",
    "dtype", "shard_factors", "implicit", "implicit_reg_scale"})


def sharded_factors(distributed: Optional[bool], settings, kind: Optional[type] = None
                    ) -> "ShardedFactors":
    """The group of a fit with shard_factors=True: needs an initialized process group (of any
    size), and settings that sharding supports. `kind`: the group's class (default
    ShardedFactors; mf_ext/sharded_implicit.py's for the implicit model), which names the fit
    in errors (`who`) and lists the settings it supports (`supported_settings`)."""
    kind = kind or ShardedFactors
    who = kind.who
    if distributed is False:
        raise ValueError(f"{who}: shard_factors=True trains across torch.distributed ranks; it "
                         f"cannot be combined with distributed=False")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{who}: shard_factors=True needs an initialized torch.distributed "
                           f"process group; call torch.distributed.init_process_group first (or "
                           f"launch with torchrun)")
    for f in fields(settings):
        value = getattr(settings, f.name)
        if f.name not in kind.supported_settings and value not in (None, False, 0):
            raise ValueError(f"{who}: shard_factors=True does not support the setting "
                             f"{f.name}={value!r}; turn it off or train with replicated factors "
                             f"(shard_factors=False)")
    device = torch.device(settings.device)
    if dist.get_backend() == "nccl" and device.type != "cuda":
        raise ValueError(f"{who}: the process group uses nccl, which needs device=\"cuda\"; got "
                         f"device={str(device)!r} (use gloo for CPU training)")
    return kind(device)


@dataclass
class ShardInfo:
    """Which rows of a sharded model this process holds (model.shard), and the traffic of its
    fit: bytes this rank sent to the others, by what they were for."""

    rank: int
    world_size: int
    n_users: int
    n_items: int
    users: Tuple[int, int]            # [start, stop) of the user indices held here
    items: Tuple[int, int]
    user_starts: Tuple[int, ...] = ()  # every rank's first user index, then m (the layout)
    item_starts: Tuple[int, ...] = ()
    steps: int = 0                    # optimizer steps taken
    gathered_rows: int = 0            # the most item rows one step gathered
    bytes_sent: Dict[str, int] = field(default_factory=dict)


@dataclass
class _Plan:
    """Who sends which item rows to whom for one index set (a batch's item indices)."""

    remapped: torch.Tensor        # each index's position in the gathered block (−1 stays −1)
    needed: torch.Tensor          # the gathered block's item indices, sorted
    want_counts: List[int]        # rows this rank receives from each owner
    serve_counts: List[int]       # rows this rank sends to each rank
    serve_index: torch.Tensor     # the local item index of each row served, in send order


@dataclass
class _Owned:
    """Ratings moved to their user's owner, as indices: users counted from the owner's first row
    (−1: not in the model), items global (−1: not in the model)."""

    users: torch.Tensor
    items: torch.Tensor
    ratings: np.ndarray


class ShardedFactors(DataParallel):
    """The collectives of a fit with row-sharded factors (module docstring). Every method is a
    collective: all ranks call it, in the same order."""

    supported_settings = SUPPORTED_SETTINGS

    def __init__(self, device: torch.device, transport: str = "auto"):
        super().__init__(device)
        self.adds_penalty = True   # each rank adds the penalty of the rows it holds
        # nccl moves CUDA tensors, gloo CPU ones: the exchanges run on this device
        self.comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        self.transport = transport  # "auto" (all_to_all_single, else send_recv) or "send_recv"
        self.info: Optional[ShardInfo] = None
        self._plans: Dict[str, Tuple[Any, _Plan]] = {}  # per purpose: (index tensor, its plan)
        self._pending: Optional[tuple] = None           # the last gather, for its gradients
        self._history_cols: Optional[torch.Tensor] = None  # the items of N(u) (SVD++ term)

    @classmethod
    def of_model(cls, model) -> "ShardedFactors":
        """The group of a sharded model after its fit (for evaluate)."""
        info = model.shard
        if not (dist.is_available() and dist.is_initialized()) or (
                dist.get_rank(), dist.get_world_size()) != (info.rank, info.world_size):
            here = (f"rank {dist.get_rank()} of {dist.get_world_size()}" if dist.is_available()
                    and dist.is_initialized() else "no process group")
            raise RuntimeError(f"{model._who}: this model holds rank {info.rank} of "
                               f"{info.world_size}'s shard of the factors, but this process is "
                               f"{here}; save() it on every rank and load() the file")
        group = cls(model.device)
        group._set_layout(info.user_starts, info.item_starts)
        group.info = info
        return group

    # ---------------------------------------------------------------- agreement, once per fit
    # The blocks: balanced in ratings, bounded in rows (mf_ext/shard_blocks.py).

    def id_maps(self, train: Ratings) -> Tuple[IdMap, IdMap]:
        """DataParallel's maps; then the global training counts of every user and item (one
        all-reduce of m + n values) and from them every rank's blocks of users and items. Each
        rank keeps its blocks' counts (sum_counts), not the m + n."""
        user_map, item_map = super().id_maps(train)
        m, n = len(user_map), len(item_map)
        counts = torch.from_numpy(np.concatenate([
            np.bincount(user_map.index(train.users), minlength=m),
            np.bincount(item_map.index(train.items), minlength=n)]).astype(np.int64))
        with self._collective("count all-reduce"):
            dist.all_reduce(counts)
        counts = counts.numpy()
        self._set_layout(balanced_blocks(counts[:m], self.world_size),
                         balanced_blocks(counts[m:], self.world_size))
        self._block_counts = (counts[self.user_rows.start:self.user_rows.stop].copy(),
                              counts[m + self.item_rows.start:m + self.item_rows.stop].copy())
        return user_map, item_map

    def _set_layout(self, user_starts: Sequence[int], item_starts: Sequence[int]) -> None:
        """Rank k holds users [user_starts[k], user_starts[k + 1]) and the items likewise."""
        self.user_starts = np.asarray(user_starts, dtype=np.int64)
        self.item_starts = np.asarray(item_starts, dtype=np.int64)
        self.user_rows = range(*self.user_starts[self.rank:self.rank + 2].tolist())
        self.item_rows = range(*self.item_starts[self.rank:self.rank + 2].tolist())
        self.info = ShardInfo(self.rank, self.world_size, int(self.user_starts[-1]),
                              int(self.item_starts[-1]),
                              (self.user_rows.start, self.user_rows.stop),
                              (self.item_rows.start, self.item_rows.stop),
                              tuple(self.user_starts.tolist()), tuple(self.item_starts.tolist()))

    def shard_info(self) -> ShardInfo:
        return self.info

    def rated_pairs(self, users: np.ndarray, items: np.ndarray
                    ) -> Tuple[np.ndarray, np.ndarray]:
        """The (user, item) index pairs of the users this rank holds, user indices counted from
        user_rows.start (for recommend)."""
        users, items = self._route(self._user_owner(users), [users, items], "rated-pairs")
        return users - self.user_rows.start, items

    def localize(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Moves each training rating to its user's owner."""
        rows, cols, values = self._route(self._user_owner(rows), [rows, cols, values], "rating")
        return rows - self.user_rows.start, cols, values

    def sum_counts(self, user_counts: torch.Tensor, item_counts: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The counts of this rank's users and items, summed over the ranks in id_maps (the
        local bincounts given here are not needed)."""
        users, items = self._block_counts
        return (torch.as_tensor(users, device=user_counts.device),
                torch.as_tensor(items, device=item_counts.device))

    def user_history(self, rows: torch.Tensor, cols: torch.Tensor, m: int, n: int,
                     device: torch.device, dtype: torch.dtype) -> UserHistory:
        """N(u) of this rank's users: their training pairs, all here (localize moved them), with
        the items counted in the block of rows the SVD++ term gathers (those of `cols`, every
        step). Plans that exchange once per fit (a collective)."""
        self._history_cols = cols
        plan = self._plan("train", cols)
        return _GatheredHistory(self, plan, rows.cpu().numpy(), plan.remapped.cpu().numpy(),
                                m, len(plan.needed), device, dtype)

    def to_owners(self, ratings: Optional[Ratings], model) -> Optional[_Owned]:
        """Ratings (raw ids) moved to their user's owner; those of unknown users stay here."""
        if ratings is None:
            return None
        users = model.user_map.index(ratings.users)
        items = model.item_map.index(ratings.items)
        owner = np.where(users >= 0, self._user_owner(np.maximum(users, 0)), self.rank)
        users, items, values = self._route(owner, [users, items, ratings.ratings], "held-out")
        users = np.where(users >= 0, users - self.user_rows.start, -1)
        return _Owned(torch.as_tensor(users, device=self.device),
                      torch.as_tensor(items, device=self.device), values)

    # ---------------------------------------------------------------- every step

    def gather_items(self, cols: torch.Tensor, *items: Optional[torch.Tensor]
                     ) -> Tuple[Optional[torch.Tensor], ...]:
        """The item rows the batch's `cols` touch, fetched from their owners: (cols remapped to
        the gathered block, then each of `items` (Q (r, n), item_bias (n,), and Y (r, n) or
        None) at the gathered rows), leaves that collect the batch's gradients for
        all_reduce_gradients to send back. With the SVD++ term (user_history called) the block
        is every item of this rank's training ratings, whatever the batch: N(u) needs them."""
        if self._history_cols is not None:
            plan = self._plan("train", self._history_cols)
            remapped = plan.remapped if cols is self._history_cols else \
                torch.searchsorted(plan.needed, cols)  # a mini-batch's items, all in the block
        else:
            plan = self._plan("train", cols)
            remapped = plan.remapped
        owned = [t for t in items if t is not None]
        gathered = self._fetch(plan, owned)
        for t in gathered:
            t.requires_grad_(True)
        self._pending = (plan, gathered, owned)
        self.info.gathered_rows = max(self.info.gathered_rows, len(plan.needed))
        found = iter(gathered)
        return (remapped,) + tuple(None if t is None else next(found) for t in items)

    def all_reduce_gradients(self, params: Sequence[torch.Tensor], batch_loss: torch.Tensor,
                             count: int) -> float:
        """Sends the gathered rows' gradients back to their owners, which add them to their
        rows' gradients; returns the step's squared-error sum over all ranks."""
        plan, gathered, owned = self._pending
        self._pending = None
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in gathered]
        back = self._all_to_all(_as_rows(grads), plan.want_counts, plan.serve_counts,
                                "item-gradient")
        for param, grad in zip(owned, _from_rows(back, owned)):
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            param.grad.index_add_(param.dim() - 1, plan.serve_index, grad)
        loss_sum = (batch_loss.detach() * count).to(self.comm_device, torch.float64).reshape(1)
        with self._collective("loss all-reduce"):
            dist.all_reduce(loss_sum)
        self.info.steps += 1
        return float(loss_sum)

    def prediction_errors(self, model, ratings: _Owned) -> np.ndarray:
        """prediction − rating of the held-out ratings this rank holds (to_owners' form), with
        the item rows fetched from their owners (and, during a fit with the SVD++ term, the
        y_j of N(u), by model._user_factors)."""
        plan = self._plan("predict", ratings.items)
        Q_g, bias_g = self._fetch(plan, [model.Q, model.item_bias], "predict")
        # A rank may hold no users, or need no items: one zero row to index stands in (unknown
        # ids index row 0 and are masked out).
        P, user_bias = _never_empty(model._user_factors(), model.user_bias)
        Q_g, bias_g = _never_empty(Q_g, bias_g)
        predicted = model._predict_indices(ratings.users, plan.remapped, P, Q_g, user_bias,
                                           bias_g)
        return predicted - ratings.ratings

    # ---------------------------------------------------------------- the item-row exchange

    def _plan(self, purpose: str, cols: torch.Tensor) -> _Plan:
        """The exchange plan of `cols` (item indices, −1 for none). A tensor seen last time for
        the same purpose (the full batch, the held-out set) reuses its plan: its ids travel
        once per fit."""
        cached = self._plans.get(purpose)
        if cached is not None and cached[0] is cols:
            return cached[1]
        known = cols >= 0
        needed, inverse = torch.unique(cols[known], sorted=True, return_inverse=True)
        remapped = torch.full_like(cols, -1)
        remapped[known] = inverse
        bounds = torch.as_tensor(self.item_starts, device=needed.device)
        want = torch.diff(torch.searchsorted(needed, bounds)).tolist()
        serve = self._exchange_counts(want, "item-id")
        requested = self._all_to_all(needed.reshape(-1, 1), want, serve, "item-id").reshape(-1)
        plan = _Plan(remapped, needed, want, serve,
                     requested.to(self.device) - self.item_rows.start)
        self._plans[purpose] = (cols, plan)
        return plan

    def _fetch(self, plan: _Plan, owned: Sequence[torch.Tensor], purpose: str = "item-row"
               ) -> List[torch.Tensor]:
        """The planned item rows of each of `owned` (this rank's block of an (r, n) factor or an
        (n,) bias) from their owners, in the same forms: (r, g) and (g,)."""
        with torch.no_grad():
            rows = _as_rows([t.index_select(t.dim() - 1, plan.serve_index) for t in owned])
        got = self._all_to_all(rows, plan.serve_counts, plan.want_counts, purpose)
        return _from_rows(got, owned)

    # ---------------------------------------------------------------- transport

    def _user_owner(self, users: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.user_starts, users, side="right") - 1

    def _route(self, owner: np.ndarray, columns: List[np.ndarray], what: str
               ) -> List[np.ndarray]:
        """Sends entry t of each column to rank owner[t]; returns the columns of the entries
        this rank received, in source-rank order (each source's in its own order). Integer
        columns travel as int64, float ones as float64 (bit-exact, packed in the same rows)."""
        order = np.argsort(owner, kind="stable")
        counts = np.bincount(owner, minlength=self.world_size).tolist()
        packed = np.empty((len(owner), len(columns)), dtype=np.int64)
        floats = [c.dtype.kind == "f" for c in columns]
        for k, column in enumerate(columns):
            packed[:, k] = (column.astype(np.float64).view(np.int64) if floats[k]
                            else column.astype(np.int64))[order]
        receive = self._exchange_counts(counts, what)
        got = self._all_to_all(torch.from_numpy(packed), counts, receive, what).cpu().numpy()
        return [got[:, k].copy().view(np.float64) if floats[k] else got[:, k].copy()
                for k in range(len(columns))]

    def _exchange_counts(self, counts: List[int], what: str) -> List[int]:
        """How many rows each rank will send to this one, given how many this one sends each."""
        ones = [1] * self.world_size
        send = torch.as_tensor(counts, dtype=torch.int64).reshape(-1, 1)
        return self._all_to_all(send, ones, ones, f"{what} count").reshape(-1).tolist()

    def _all_to_all(self, send: torch.Tensor, send_counts: List[int], receive_counts: List[int],
                    what: str) -> torch.Tensor:
        """Rows send[...] (in blocks of send_counts[j] rows for rank j) to their ranks; returns
        the rows received (blocks of receive_counts[j] from rank j), on self.device."""
        send = send.to(self.comm_device).contiguous()
        out = torch.empty((sum(receive_counts),) + tuple(send.shape[1:]), dtype=send.dtype,
                          device=self.comm_device)
        row_bytes = math.prod(send.shape[1:]) * send.element_size()
        sent = (sum(send_counts) - send_counts[self.rank]) * row_bytes
        self.info.bytes_sent[what] = self.info.bytes_sent.get(what, 0) + sent
        with self._collective(f"{what} all-to-all"):
            if self.transport != "send_recv":
                try:
                    dist.all_to_all_single(out, send, receive_counts, send_counts)
                    return out.to(self.device)
                except RuntimeError as exc:
                    if not _unsupported(exc):
                        raise
                    self.transport = "send_recv"  # the same on every rank: a backend property
            _send_receive(out, send, send_counts, receive_counts, self.rank)
        return out.to(self.device)


def _never_empty(factors: torch.Tensor, bias: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    if len(bias):
        return factors, bias
    return factors.new_zeros(factors.shape[0], 1), bias.new_zeros(1)


def _as_rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(r, g) factors and (g,) biases side by side as g rows, one all-to-all's payload."""
    return torch.cat([t.T if t.dim() == 2 else t[:, None] for t in tensors], 1)


def _from_rows(rows: torch.Tensor, like: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """_as_rows undone: the columns of `rows` as tensors of the forms of `like`."""
    out, at = [], 0
    for t in like:
        width = t.shape[0] if t.dim() == 2 else 1
        part = rows[:, at:at + width]
        out.append(part.T.contiguous() if t.dim() == 2 else part[:, 0].contiguous())
        at += width
    return out


class _GatheredHistory(UserHistory):
    """N(u) of a rank's users with the items counted in the gathered block of its training
    items: its term takes y_j gathered with Q's rows (the step), and `columns` fetches them
    for the predictions of the fit (a collective)."""

    def __init__(self, group: ShardedFactors, plan: _Plan, users: np.ndarray,
                 items: np.ndarray, m: int, g: int, device: torch.device, dtype: torch.dtype):
        super().__init__(users, items, m, g, device, dtype)
        self._group, self._plan = group, plan

    def columns(self, Y: torch.Tensor) -> torch.Tensor:
        return self._group._fetch(self._plan, [Y], "implicit-row")[0]


def _unsupported(exc: RuntimeError) -> bool:
    text = str(exc).lower()
    return "not supported" in text or "does not support" in text or "unsupported" in text


def _send_receive(out: torch.Tensor, send: torch.Tensor, send_counts: List[int],
                  receive_counts: List[int], rank: int) -> None:
    """all_to_all_single from point-to-point messages: one isend and one irecv per peer with
    rows to exchange (the same bytes, P − 1 messages each way)."""
    send_at = np.concatenate([[0], np.cumsum(send_counts)]).tolist()
    receive_at = np.concatenate([[0], np.cumsum(receive_counts)]).tolist()
    requests = []
    for peer in range(len(send_counts)):
        mine = send[send_at[peer]:send_at[peer + 1]]
        theirs = out[receive_at[peer]:receive_at[peer + 1]]
        if peer == rank:
            theirs.copy_(mine)
            continue
        if len(mine):
            requests.append(dist.isend(mine, peer))
        if len(theirs):
            requests.append(dist.irecv(theirs, peer))
    for request in requests:
        request.wait()


def evaluate_sharded(model, data: Ratings) -> Dict[str, float]:
    """model.evaluate of a sharded model: a collective where each rank passes any share of the
    ratings; every rank gets the RMSE and MAE over all of them."""
    group = ShardedFactors.of_model(model)
    errors = group.prediction_errors(model, group.to_owners(data, model))
    sums = torch.tensor([np.square(errors).sum(), np.abs(errors).sum(), len(errors)],
                        dtype=torch.float64, device=group.comm_device)
    with group._collective("evaluation all-reduce"):
        dist.all_reduce(sums)
    squared, absolute, count = sums.tolist()
    if count == 0:
        raise ValueError(f"{model._who}.evaluate: no ratings given on any of the "
                         f"{group.world_size} ranks")
    return {"rmse": math.sqrt(squared / count), "mae": absolute / count}

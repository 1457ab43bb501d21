"""Factors sharded row-wise across torch.distributed ranks: MatrixFactorization(shard_factors=True)
(docs/distributed.md, "Sharded factors").

Rank k of P holds a contiguous block of the user rows and one of the item rows of the factors and
biases (and, through its optimizer, their Adam state): the users with indices in
[m·k/P, m·(k+1)/P) of the sorted id map (np.array_split's blocks), the items likewise. The fit
moves each rating to its user's owner, so user rows are always local. Every step:

  1. each rank asks the owners for the item rows its ratings touch (the ids once per fit for the
     full batch, once per step for mini-batches) and receives them: an all-to-all of (r + 1)-wide
     rows, factor column and bias;
  2. the fused op runs on the local user block and the gathered item block (indices remapped);
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
from mf_ext.distributed import DataParallel, _block

# The settings sharded training is written for. A setting added to the model later is refused
# (named in the error) unless it is off (None, False or 0) until someone adds it here.
SUPPORTED_SETTINGS = frozenset({
    "rank", "epochs", "lr", "reg", "bias_reg", "bias_count_exponent", "factor_count_exponent",
    "batch_size",
    "validation_fraction", "patience", "init_std", "lr_schedule", "clip", "seed", "device",
    "dtype", "shard_factors", "implicit_reg_scale"})  # the last: no effect without implicit


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
    steps: int = 0                    # optimizer steps taken
    gathered_rows: int = 0            # the most item rows one step gathered
    bytes_sent: Dict[str, int] = field(default_factory=dict)


@dataclass
class _Plan:
    """Who sends which item rows to whom for one index set (a batch's item indices)."""

    remapped: torch.Tensor        # each index's position in the gathered block (−1 stays −1)
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
        group._set_layout(info.n_users, info.n_items)
        group.info = info
        return group

    # ---------------------------------------------------------------- agreement, once per fit

    def id_maps(self, train: Ratings) -> Tuple[IdMap, IdMap]:
        """DataParallel's maps; then this rank's blocks of users and items."""
        user_map, item_map = super().id_maps(train)
        self._set_layout(len(user_map), len(item_map))
        return user_map, item_map

    def _set_layout(self, m: int, n: int) -> None:
        world = self.world_size
        self.user_starts = np.array([_block(m, k, world)[0] for k in range(world)] + [m])
        self.item_starts = np.array([_block(n, k, world)[0] for k in range(world)] + [n])
        self.user_rows = range(*self.user_starts[self.rank:self.rank + 2].tolist())
        self.item_rows = range(*self.item_starts[self.rank:self.rank + 2].tolist())
        self.info = ShardInfo(self.rank, world, m, n, (self.user_rows.start, self.user_rows.stop),
                              (self.item_rows.start, self.item_rows.stop))

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
        """user_counts (this rank's users) are complete, as their ratings are all here;
        item_counts (all items) are summed over the ranks and cut to this rank's items."""
        with self._collective("count all-reduce"):
            dist.all_reduce(item_counts)
        return user_counts, item_counts[self.item_rows.start:self.item_rows.stop].clone()

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

    def gather_items(self, cols: torch.Tensor, Q: torch.Tensor, item_bias: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The item rows the batch's `cols` touch, fetched from their owners: (cols remapped to
        the gathered block, its factor columns (r, g), its biases (g,)), both leaves that
        collect the batch's gradients for all_reduce_gradients to send back."""
        plan = self._plan("train", cols)
        Q_g, bias_g = self._fetch(plan, Q, item_bias)
        Q_g.requires_grad_(True)
        bias_g.requires_grad_(True)
        self._pending = (plan, Q_g, bias_g, Q, item_bias)
        self.info.gathered_rows = max(self.info.gathered_rows, len(bias_g))
        return plan.remapped, Q_g, bias_g

    def all_reduce_gradients(self, params: Sequence[torch.Tensor], batch_loss: torch.Tensor,
                             count: int) -> float:
        """Sends the gathered rows' gradients back to their owners, which add them to their
        rows' gradients; returns the step's squared-error sum over all ranks."""
        plan, Q_g, bias_g, Q, item_bias = self._pending
        self._pending = None
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in (Q_g, bias_g)]
        back = self._all_to_all(torch.cat([grads[0].T, grads[1][:, None]], 1),
                                plan.want_counts, plan.serve_counts, "item-gradient")
        for param in (Q, item_bias):
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        Q.grad.index_add_(1, plan.serve_index, back[:, :-1].T)
        item_bias.grad.index_add_(0, plan.serve_index, back[:, -1])
        loss_sum = (batch_loss.detach() * count).to(self.comm_device, torch.float64).reshape(1)
        with self._collective("loss all-reduce"):
            dist.all_reduce(loss_sum)
        self.info.steps += 1
        return float(loss_sum)

    def prediction_errors(self, model, ratings: _Owned) -> np.ndarray:
        """prediction − rating of the held-out ratings this rank holds (to_owners' form), with
        the item rows fetched from their owners."""
        plan = self._plan("predict", ratings.items)
        Q_g, bias_g = self._fetch(plan, model.Q, model.item_bias, "predict")
        # A rank may hold no users, or need no items: one zero row to index stands in (unknown
        # ids index row 0 and are masked out).
        P, user_bias = _never_empty(model.P, model.user_bias)
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
        plan = _Plan(remapped, want, serve,
                     requested.to(self.device) - self.item_rows.start)
        self._plans[purpose] = (cols, plan)
        return plan

    def _fetch(self, plan: _Plan, Q: torch.Tensor, item_bias: torch.Tensor,
               purpose: str = "item-row") -> Tuple[torch.Tensor, torch.Tensor]:
        """The planned item rows from their owners: (factor columns (r, g), biases (g,))."""
        with torch.no_grad():
            rows = torch.cat([Q[:, plan.serve_index].T, item_bias[plan.serve_index, None]], 1)
        got = self._all_to_all(rows, plan.serve_counts, plan.want_counts, purpose)
        return got[:, :-1].T.contiguous(), got[:, -1].contiguous()

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

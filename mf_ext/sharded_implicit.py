"""ImplicitMatrixFactorization(shard_factors=True): the factors sharded row-wise across
torch.distributed ranks (docs/distributed.md, "The implicit model, sharded").

Rank k of P holds the k-th block of the user columns of P and of the item columns of Q (the
blocks of mf_ext/sharded.py, whose exchanges this module reuses) and, with solver="adam", their
Adam state. fit moves each interaction to its user's owner and merges a pair given on several
ranks, so a user's interactions, its λ_u and its rows are all local; λ_i's masses are one
all-reduce of n values. The objective falls into three parts, each computed where its data is:

  - the observed part Σ_t w_t (v_t − p_uᵀ q_i)²: the fused op with unobserved_weight 0 on the
    local users and the item rows the local interactions touch, fetched from their owners (an
    all-to-all; the ids travel once per fit); what the op gives for those rows (a gradient, a
    CG matvec) goes back by the reverse all-to-all and is summed at the owners;
  - the all-cells part ⟨P Pᵀ, Q Qᵀ⟩ = ⟨G_P, G_Q⟩, G_P = Σ_k P_k P_kᵀ over the ranks' blocks:
    an all-reduce of r × r Grams; its gradient in P_k is 2 G_Q P_k, local;
  - the penalties Σ λ |x|²: each rank those of its rows.

CG's per-column dot products and step lengths are local to the column's owner; the objective's
sums over the ranks are float64 all-reduces of scalars. Full batch, so float64 fits equal the
single process's to rounding (tests/test_sharded_implicit.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from mf_ext.implicit_solvers import ImplicitProblem, _cg_half_step, _gram, _HalfStepOperator, \
    frequency_reg
from mf_ext.interactions import Interactions, merge_duplicates
from mf_ext.sharded import ShardedFactors, _as_rows, _from_rows, _Plan, sharded_factors

WHO = "mf_ext.ImplicitMatrixFactorization.fit"


@dataclass
class ShardedProblem:
    """This rank's share of the training interactions, with what the objective needs of them."""

    local: ImplicitProblem   # rows: local user indices; cols: positions in the gathered block;
    #                          user_reg (m_k,), item_reg (n_k,): this rank's rows'; constant: its
    #                          interactions' share
    plan: _Plan              # who sends which item rows to whom (once per fit)
    count: int               # N: the interactions of all ranks
    constant: float          # the objective's constant Σ_t c_t / (c_t − 1) over all ranks


class ShardedImplicit(ShardedFactors):
    """The collectives of a sharded implicit fit (module docstring). Every method is a
    collective: all ranks call it, in the same order."""

    who = WHO
    # The settings this is written for; one added to the model later is refused unless it is off.
    supported_settings = frozenset({
        "rank", "solver", "epochs", "alpha", "scaling", "epsilon", "reg", "reg_exponent",
        "cg_steps", "lr", "init_std", "seed", "device", "dtype", "shard_factors"})

    # ---------------------------------------------------------------- once per fit

    def prepare(self, model, data: Interactions) -> ShardedProblem:
        """Agreed id maps (set on `model`, with this rank's users' seen items), the interactions
        moved to their user's owner and merged, and the problem of this rank's share."""
        model.user_map, model.item_map = self.id_maps(data)
        m, n = len(model.user_map), len(model.item_map)
        rows, cols, strengths = self.localize(model.user_map.index(data.users),
                                              model.item_map.index(data.items),
                                              data.strengths.astype(np.float64))
        # a pair given on several ranks meets here: one interaction with the summed strength,
        # ordered by (user, item) as a single process orders them
        merged = merge_duplicates(rows, cols, strengths)
        rows, cols = merged.users.astype(np.int64), merged.items.astype(np.int64)
        count = int(self.sum_floats([len(rows)])[0])  # (exact in float64 below 2^53)
        if count == 0:
            raise ValueError(f"{WHO}: no interactions given on any of the {self.world_size} "
                             f"ranks (empty input, or every weight is 0)")
        model._set_rated(rows, cols, len(self.user_rows))
        dev, dt = model.device, model.dtype
        w = torch.as_tensor(model.alpha * model._strength(merged.strengths), dtype=dt,
                            device=dev)
        rows_t, cols_t = torch.as_tensor(rows, device=dev), torch.as_tensor(cols, device=dev)
        user_mass = torch.zeros(len(self.user_rows), dtype=dt, device=dev).index_add_(0, rows_t, w)
        item_mass = self._all_reduce(torch.zeros(n, dtype=dt, device=dev).index_add_(0, cols_t, w),
                                     "item-mass")[self.item_rows.start:self.item_rows.stop]
        values = (w + 1) / w
        plan = self._plan("train", cols_t)
        local = ImplicitProblem(
            rows_t, plan.remapped, w, values, torch.zeros_like(w), float(values.double().sum()),
            frequency_reg(user_mass, n, model.reg, model.reg_exponent),
            frequency_reg(item_mass, m, model.reg, model.reg_exponent))
        return ShardedProblem(local, plan, count, self.sum_floats([local.constant])[0])

    # ---------------------------------------------------------------- every step

    def gather(self, plan: _Plan, X: torch.Tensor, what: str = "item-row") -> torch.Tensor:
        """The columns of the item-side X (r, n_k: this rank's items) that this rank's
        interactions touch, fetched from their owners: (r, g), in the plan's order."""
        self.info.gathered_rows = max(self.info.gathered_rows, len(plan.needed))
        return self._fetch(plan, [X], what)[0]

    def send_back(self, plan: _Plan, gathered: torch.Tensor, owned: torch.Tensor,
                  what: str = "item-gradient") -> torch.Tensor:
        """The reverse of gather: each rank's (r, g) columns go to their owners, which sum them
        into an (r, n_k) tensor like `owned`."""
        back = self._all_to_all(_as_rows([gathered]), plan.want_counts, plan.serve_counts, what)
        return torch.zeros_like(owned).index_add_(1, plan.serve_index,
                                                   _from_rows(back, [owned])[0])

    def gram(self, *blocks: torch.Tensor) -> List[torch.Tensor]:
        """Σ over the ranks of X_k X_kᵀ for each of `blocks` (this rank's (r, ·) columns), in
        float64 (the op's Gram): one all-reduce of r × r matrices."""
        return list(self._all_reduce(torch.stack([_gram(X) for X in blocks]), "Gram"))

    def sum_floats(self, values: List[float]) -> List[float]:
        """Every rank's `values` summed, in float64."""
        return self._all_reduce(torch.tensor(values, dtype=torch.float64), "loss").tolist()

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """A scalar tensor summed over the ranks, in float64 (a 0-dim tensor)."""
        return self._all_reduce(value.double().reshape(1), "loss")[0]

    def _all_reduce(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """Sums `tensor` over the ranks; bytes_sent counts its size (a ring sends about
        2 (P − 1) / P of it)."""
        out = tensor.to(self.comm_device)
        key = f"{what} all-reduce"
        self.info.bytes_sent[key] = self.info.bytes_sent.get(key, 0) + \
            out.numel() * out.element_size()
        with self._collective(f"{what} all-reduce"):
            dist.all_reduce(out)
        return out.to(tensor.device)


def group_of(settings) -> ShardedImplicit:
    """The group of a fit with these settings (ImplicitMatrixFactorizationConfig): needs an
    initialized process group and settings that sharding supports (sharded_factors)."""
    return sharded_factors(None, settings, ShardedImplicit)


def epoch(model, group: ShardedImplicit, problem: ShardedProblem) -> Callable[[], float]:
    """One epoch of `model.solver` on the ranks' shares; returns the objective."""
    if model.solver == "adam":
        return adam_epoch(model, group, problem)
    return lambda: als_sweep(model.P, model.Q, group, problem, model.cg_steps)


def adam_epoch(model, group: ShardedImplicit, problem: ShardedProblem
               ) -> Callable[[], float]:
    """One full-batch Adam step on the objective / N over all ranks; returns the objective
    (before the step). Each rank's optimizer holds its rows' state."""
    optimizer = torch.optim.Adam([model.P, model.Q], lr=model.lr,
                                 fused=True if model.device.type == "cuda" else None)
    p, N = problem.local, problem.count

    @torch.no_grad()
    def step() -> float:
        P, Q = model.P, model.Q
        Q_g = group.gather(problem.plan, Q)
        loss, _, grad_P, grad_Qg, _ = torch.ops.mf_ext.implicit_mf_loss_and_grads(
            p.rows, p.cols, P, Q_g, p.values, p.weights, 0.0, "sum", False, True, True, False)
        G_P, G_Q = group.gram(P, Q)
        grad_Q = group.send_back(problem.plan, grad_Qg, Q)
        P.grad = (grad_P + 2 * (G_Q.to(P.dtype) @ P) + 2 * p.user_reg * P) / N
        Q.grad = (grad_Q + 2 * (G_P.to(Q.dtype) @ Q) + 2 * p.item_reg * Q) / N
        penalty = (P * P).sum(0) @ p.user_reg + (Q * Q).sum(0) @ p.item_reg
        total = group.sum_floats([float(loss) - p.constant + float(penalty)])[0]
        optimizer.step()
        group.info.steps += 1
        return total + float((G_P * G_Q).sum())
    return step


def als_sweep(P: torch.Tensor, Q: torch.Tensor, group: ShardedImplicit, problem: ShardedProblem,
              cg_steps: int) -> float:
    """One ALS sweep of mf_ext.implicit_solvers.als_sweep on the ranks' blocks: the users'
    half-step on the local users with the item rows their interactions touch (fetched once),
    then the items' half-step, whose every product with A goes through the items' owners
    (_ShardedHalfStep). Returns the objective over all ranks."""
    p = problem.local
    users = _ShardedHalfStep(group, problem, P, Q, group.gather(problem.plan, Q), p.rows, p.cols,
                             p.user_reg)
    _cg_half_step(P, users, cg_steps)
    items = _ShardedHalfStep(group, problem, Q, P, P, p.cols, p.rows, p.item_reg, problem.plan)
    penalty = group.total((P * P).sum(0) @ p.user_reg)
    loss = float(_cg_half_step(Q, items, cg_steps, fixed_penalty=penalty))
    group.info.steps += 1
    return loss


class _ShardedHalfStep(_HalfStepOperator):
    """A half-step's system (mf_ext.implicit_solvers._HalfStepOperator) for the block X of the
    free side's columns that this rank holds, the other side fixed:

      - the Gram term uses Y Yᵀ summed over the ranks (with X0 Xᵀ0, for the loss: one
        all-reduce of two r × r matrices per half-step);
      - the observed part runs on this rank's interactions against `Y_op`: for the users, the
        local users' rows against the gathered item rows; for the items (`plan` given), the
        fetched columns of the item-side argument against the local user rows, the result sent
        back and summed at the items' owners (two all-to-alls per product with A);
      - the objective's sums over columns and the observed loss are summed over the ranks."""

    def __init__(self, group: ShardedImplicit, problem: ShardedProblem, X: torch.Tensor,
                 Y_held: torch.Tensor, Y_op: torch.Tensor, rows: torch.Tensor,
                 cols: torch.Tensor, reg: torch.Tensor, plan: Optional[_Plan] = None) -> None:
        self.group, self.X0, self.Y_held, self.plan = group, X, Y_held, plan
        super().__init__(Y_op, rows, cols, problem.local, reg)
        self.constant = problem.constant

    def _fixed_gram(self) -> torch.Tensor:
        self.gram_X0, gram_Y = self.group.gram(self.X0, self.Y_held)
        return gram_Y

    def total(self, value: torch.Tensor) -> torch.Tensor:
        return self.group.total(value)

    def _cells(self, X: torch.Tensor) -> torch.Tensor:
        # asked once, at the half-step's start X0, whose Gram came with Y's
        return (self.gram_X0 * self.gram_Y).sum()

    def _observed(self, X: torch.Tensor, values: torch.Tensor
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.plan is None:
            return super()._observed(X, values)
        gathered, loss = super()._observed(self.group.gather(self.plan, X, "CG item-row"),
                                           values)
        return self.group.send_back(self.plan, gathered, X, "CG item-product"), loss

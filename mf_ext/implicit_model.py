"""ImplicitMatrixFactorization: an implicit-feedback recommender (Hu, Koren & Volinsky 2008's
weighted all-cells objective) trained on the fused all-cells op, by ALS with conjugate-gradient
half-steps or by full-batch Adam."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple, Union

import numpy as np
import torch

from mf_ext.checks import NONNEGATIVE, POSITIVE, SEED, UNIT_INTERVAL, Bool, Device, \
    FloatDType, Integer, OneOf
from mf_ext.config import Config, setting
from mf_ext.data import IdMap
from mf_ext.distributed import draw_normal
from mf_ext.estimator import EpochRecord, Estimator, ids_from_file, ids_to_file
from mf_ext.implicit_solvers import ImplicitProblem, als_sweep, make_problem, objective
from mf_ext.interactions import Interactions, as_interactions
from mf_ext.ranking import TopN

FORMAT_VERSION = 1


@dataclass
class ImplicitMatrixFactorizationConfig(Config):
    """ImplicitMatrixFactorization's settings (its constructor's arguments, in order); see its
    docstring."""

    WHO: ClassVar[str] = "mf_ext.ImplicitMatrixFactorization"

    rank: int = setting(64, Integer(1), "latent dimension r", cli=True)
    solver: str = setting("als", OneOf(("als", "adam")),
                          "als (conjugate-gradient half-steps) or adam (full batch)", cli=True)
    epochs: int = setting(15, Integer(0), "ALS sweeps, or Adam steps", cli=True)
    alpha: float = setting(5.0, POSITIVE, "confidence c = 1 + alpha * strength", cli=True)
    scaling: str = setting("linear", OneOf(("linear", "log")),
                           "strength = weight, or log(1 + weight / epsilon)", cli=True)
    epsilon: float = setting(1.0, POSITIVE, "epsilon of the log scaling", cli=True)
    reg: float = setting(0.03, NONNEGATIVE, "L2 weight (see reg_exponent)", cli=True)
    reg_exponent: float = setting(
        1.0, UNIT_INTERVAL, "lambda = reg * (row weight)^this (0: plain L2)", cli=True)
    cg_steps: int = setting(2, Integer(1), "conjugate-gradient steps per ALS half-step",
                            cli=True)
    lr: float = setting(0.05, POSITIVE, "Adam's learning rate (solver adam)", cli=True)
    init_std: float = setting(0.01, NONNEGATIVE, "the factors start as N(0, init_std^2)")
    seed: Optional[int] = setting(0, SEED, "makes a run reproducible (None: random)", cli=True)
    device: Union[str, torch.device] = setting("cpu", Device(), "where to train", cli=True,
                                               saved=False)
    dtype: torch.dtype = setting(torch.float32, FloatDType(), "float32 or float64", saved=False)
    shard_factors: bool = setting(
        False, Bool(), "each torch.distributed rank holds a block of the factors' rows (and "
                       "their Adam state; docs/distributed.md)", cli=True, saved=False)


class ImplicitMatrixFactorization(TopN, Estimator):
    """score(u, i) = p_uᵀ q_i, fitted on implicit feedback (views, clicks, plays, purchases).

    Objective (Hu, Koren & Volinsky 2008), over all m · n cells:
        Σ_{u,i} c_ui (y_ui − p_uᵀ q_i)²  +  Σ_u λ_u |p_u|²  +  Σ_i λ_i |q_i|²
    with y_ui = 1 and c_ui = 1 + alpha · s_ui on the interacted pairs, y = 0 and c = 1 on all
    others. The strength s is the pair's weight (a count, plays; 1 when fit gets none; repeated
    pairs add up) with scaling="linear", or log(1 + weight / epsilon) with scaling="log" (Hu et
    al.'s alternative for heavy-tailed counts). `implicit`'s ALS uses c = alpha · weight.
    The regularization is frequency-scaled (Rendle et al. 2021, "Revisiting the performance of
    iALS"): λ_u = reg · (Σ_i c_ui)^reg_exponent = reg · (n + Σ_i (c_ui − 1))^reg_exponent, the
    weight of the user's row of n cells; λ_i alike over the m users. reg_exponent = 1 is
    Rendle's λ (|I_u| + α₀ |I|) in these units, which keeps reg's meaning across data sizes; 0 is
    a plain L2.

    The objective is the fused op mf_ext.implicit_mf_loss with weights w = c − 1, values
    v = c / (c − 1) and unobserved_weight 1, minus a constant (w (v − s)² + s² = c (1 − s)² +
    c / (c − 1)); its cost is O(N·r + (m + n)·r²) per evaluation, never m · n.

    Solvers: "als" (default): each epoch one ALS sweep, the users' then the items' closed-form
    half-step, each solved approximately by `cg_steps` conjugate-gradient steps warm-started at
    the current factors (Takács et al. 2011, as `implicit` does), every CG step one call of the
    op (mf_ext/implicit_solvers.py). "adam": each epoch one full-batch Adam step on the
    objective / N.

    Args (the fields of ImplicitMatrixFactorizationConfig, which holds their defaults and
    checks): rank, solver, epochs, alpha, scaling, epsilon, reg, reg_exponent, cg_steps, lr
    (Adam only), init_std (the factors start as N(0, init_std²)), seed, device, dtype,
    shard_factors (train across the ranks of an initialized torch.distributed process group,
    each rank holding a block of the user and item rows; the model then holds its rank's rows
    only (`shard`): save() on every rank writes a file per rank plus a manifest that load()
    reassembles; mf_ext/sharded_implicit.py, docs/distributed.md).
    After fit, `losses` holds the objective after each epoch (Adam: at the step) and
    history[k].train_rmse is √(losses[k] / N). Bad settings raise TypeError or ValueError.

    The defaults were tuned on a validation split of MovieLens-100K as implicit data
    (benchmarks/bench_implicit.py, benchmarks/results/implicit_ml100k.md).
    """

    Config = ImplicitMatrixFactorizationConfig
    FORMAT_VERSION = FORMAT_VERSION
    # The saved tensors that a sharded model splits by rows: (which rows, how they join).
    SHARDED_STATE = {"P": ("users", 1), "Q": ("items", 1), "rated_indptr": ("users", "indptr"),
                     "rated_indices": ("users", 0)}

    # ------------------------------------------------------------------ fitting

    def fit(self, users: Any, items: Any = None, weights: Any = None, *, progress: bool = False,
            callback: Optional[Callable[[EpochRecord], None]] = None
            ) -> "ImplicitMatrixFactorization":
        """Fit on equal-length array-likes of raw user ids and item ids, with optional
        interaction strengths `weights` (counts, plays; >= 0, 0 meaning no interaction), or a
        DataFrame or a scipy.sparse users × items matrix of counts as the first argument (see
        mf_ext.interactions.as_interactions). Ctrl-C stops the fit and keeps the factors so far
        (`interrupted` is then True). With shard_factors=True, a collective: every rank of the
        process group passes its share of the interactions (any split, possibly empty; e.g.
        mf_ext.distributed.shard_ratings) and keeps its block of the rows
        (mf_ext/sharded_implicit.py)."""
        group = None
        if self.shard_factors:
            from mf_ext import sharded_implicit

            group = sharded_implicit.group_of(self.config)
        data = as_interactions(users, items, weights, allow_empty=group is not None)
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        if group is None:
            problem, count = self._prepare(data), len(data)
            users_held, items_held = range(len(self.user_map)), range(len(self.item_map))
        else:  # each rank: its block of the users and items, and its users' interactions
            problem = group.prepare(self, data)
            count, users_held, items_held = problem.count, group.user_rows, group.item_rows
        self.shard = None if group is None else group.info
        m, n, dev, dt = len(self.user_map), len(self.item_map), self.device, self.dtype
        # Drawn on the CPU: the same start on every device (and, of its rows, on every rank).
        self.P = (draw_normal(generator, self.rank, m, users_held, dt) * self.init_std).to(dev)
        self.Q = (draw_normal(generator, self.rank, n, items_held, dt) * self.init_std).to(dev)
        self.losses = []
        if group is not None:
            step = sharded_implicit.epoch(self, group, problem)
        elif self.solver == "adam":
            step = self._adam_epoch(problem, count)
        else:
            step = self._als_epoch(problem)

        def train_epoch() -> float:
            loss = step()
            self.losses.append(loss)
            return loss / count

        self._fitted = True
        self._run_epochs([self.P, self.Q], train_epoch, lambda: None, progress, callback)
        self.losses = self.losses[:len(self.history)]
        return self

    def _prepare(self, data: Interactions) -> ImplicitProblem:
        """Id maps, the seen pairs (for exclude_seen) and the op's inputs."""
        self.user_map, self.item_map = IdMap(data.users), IdMap(data.items)
        m, n = len(self.user_map), len(self.item_map)
        u, i = self.user_map.index(data.users), self.item_map.index(data.items)
        self._set_rated(u, i, m)
        strength = self._strength(data.strengths)
        dev, dt = self.device, self.dtype
        return make_problem(torch.as_tensor(u, device=dev), torch.as_tensor(i, device=dev),
                            torch.as_tensor(self.alpha * strength, dtype=dt, device=dev),
                            m, n, self.reg, self.reg_exponent)

    def _als_epoch(self, problem: ImplicitProblem) -> Callable[[], float]:
        return lambda: als_sweep(self.P, self.Q, problem, self.cg_steps)

    def _adam_epoch(self, problem: ImplicitProblem, count: int) -> Callable[[], float]:
        self.P.requires_grad_()
        self.Q.requires_grad_()
        optimizer = torch.optim.Adam([self.P, self.Q], lr=self.lr,
                                     fused=True if self.device.type == "cuda" else None)

        def step() -> float:
            loss = objective(self.P, self.Q, problem)
            optimizer.zero_grad(set_to_none=True)
            (loss / count).backward()
            optimizer.step()
            return float(loss.detach())
        return step

    # ------------------------------------------------------------------ using the model

    def score(self, users: Any, items: Any) -> np.ndarray:
        """p_uᵀ q_i for equal-length raw ids; 0 where the user or the item is unknown."""
        self._check_fitted()
        users, items = np.asarray(users), np.asarray(items)
        if users.shape != items.shape or users.ndim != 1:
            raise ValueError(f"{self._who}.score: users and items must be 1-D of the same "
                             f"length, got shapes {list(users.shape)} and {list(items.shape)}")
        u = torch.as_tensor(self.user_map.index(users), device=self.device)
        i = torch.as_tensor(self.item_map.index(items), device=self.device)
        with torch.no_grad():
            dots = (self.P[:, u.clamp_min(0)] * self.Q[:, i.clamp_min(0)]).sum(0)
            dots = torch.where((u >= 0) & (i >= 0), dots, 0)
        return dots.cpu().numpy().astype(np.float64)

    def _score_parts(self) -> Tuple[torch.Tensor, torch.Tensor, None, None]:
        """For mf_ext.ranking.TopN: score(u, i) = p_uᵀ q_i, no offsets."""
        return self.P, self.Q, None, None

    def _fold_in(self, item_index: np.ndarray, values: Optional[np.ndarray]
                 ) -> Tuple[torch.Tensor, float]:
        """(p, 0) of a new user who has the items `item_index` with strengths `values` (None:
        1 each; repeated items add up; 0 is no interaction), Q fixed: the exact minimizer of the
        objective's terms that involve the user, i.e. the ALS half-step's system for one user
            (Q Qᵀ + Σ_i (c_i − 1) q_i q_iᵀ + λ I) p = Σ_i c_i q_i,
        λ = reg · (n + Σ_i (c_i − 1))^reg_exponent. Solved in float64 on the CPU (r
        unknowns); least squares where it is singular (reg = 0)."""
        who = f"{self._who}.recommend_new"
        strengths = np.ones(len(item_index)) if values is None else values
        if (strengths < 0).any():
            k = int(np.flatnonzero(strengths < 0)[0])
            raise ValueError(f"{who}: values (interaction strengths) must be >= 0, got "
                             f"{strengths[k]} at position {k}")
        n = len(self.item_map)
        total = np.bincount(item_index, weights=strengths, minlength=n)
        items = np.flatnonzero(total > 0)
        w = torch.as_tensor(self.alpha * self._strength(total[items]), dtype=torch.float64)
        Q = self.Q.detach().cpu().double()
        Z = Q[:, torch.as_tensor(items)]
        reg = self.reg * (n + float(w.sum())) ** self.reg_exponent
        A = Q @ Q.T + (Z * w) @ Z.T + reg * torch.eye(Q.shape[0], dtype=torch.float64)
        b = Z @ (w + 1)
        solution, info = torch.linalg.solve_ex(A, b)
        if info != 0 or not torch.isfinite(solution).all():
            solution = torch.linalg.lstsq(A, b[:, None], driver="gelsd").solution[:, 0]
        return solution.to(self.device, self.dtype), 0.0

    def _strength(self, weights: np.ndarray) -> np.ndarray:
        """Interaction weights (> 0) as strengths s, by `scaling`."""
        return weights if self.scaling == "linear" else np.log1p(weights / self.epsilon)

    def _set_rated(self, user_index: np.ndarray, item_index: np.ndarray, m: int) -> None:
        """What each user interacted with in training, as CSR arrays."""
        order = np.argsort(user_index, kind="stable")
        self._rated_indptr = np.concatenate(
            [[0], np.cumsum(np.bincount(user_index, minlength=m))]).astype(np.int64)
        self._rated_indices = item_index[order].astype(np.int64)

    # ------------------------------------------------------------------ persistence

    def _state(self) -> Dict[str, Any]:
        return {
            "model": "ImplicitMatrixFactorization",  # which class reads it (mf-ext recommend)
            "user_ids": ids_to_file(self.user_map.ids),
            "item_ids": ids_to_file(self.item_map.ids),
            "P": self.P.detach().cpu(), "Q": self.Q.detach().cpu(),
            "losses": [float(x) for x in self.losses],
            "rated_indptr": torch.from_numpy(self._rated_indptr),
            "rated_indices": torch.from_numpy(self._rated_indices),
        }

    def _restore(self, state: Dict[str, Any], device: str) -> None:
        if state.get("model") != "ImplicitMatrixFactorization":
            raise ValueError(f"{self._who}.load: the file holds another kind of model "
                             f"({state.get('model', 'MatrixFactorization')})")
        self.user_map = IdMap(ids_from_file(state["user_ids"]))
        self.item_map = IdMap(ids_from_file(state["item_ids"]))
        self.P, self.Q = state["P"].to(device), state["Q"].to(device)
        self.losses = list(state["losses"])
        self._rated_indptr = state["rated_indptr"].numpy()
        self._rated_indices = state["rated_indices"].numpy()

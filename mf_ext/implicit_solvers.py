"""The implicit-feedback objective and its two solvers, on the fused all-cells op
(mf_ext.implicit_mf_loss): closed-form ALS half-steps solved by a few conjugate-gradient steps
(as the `implicit` library does), and full-batch Adam.

The ALS half-step for the users minimizes, with Q fixed, the convex quadratic
    Σ_t w_t (v_t − p_{u_t}ᵀ q_{i_t})² + ⟨P Pᵀ, Q Qᵀ⟩ + Σ_u λ_u |p_u|²
whose normal equations A_u p_u = b_u are, per user,
    A_u = Σ_{t: u_t = u} w_t q_{i_t} q_{i_t}ᵀ + Q Qᵀ + λ_u I,    b_u = Σ_{t: u_t = u} w_t v_t q_{i_t}.
Half the op's gradient in P is A P − b for all users at once, and with values 0 it is A P without
b: each CG step is one call of the fused pieces of the op (the observed-entries op for the
corrections, in one pass over the triples, plus Q Qᵀ P with Q Qᵀ, the r × r Gram of the fixed
side, computed once per half-step), never a per-user r × r matrix nor an nnz × r temporary.
On the CPU the pieces are the op's own (torch.ops.mf_ext._gram / _add_gram_product_), so a
half-step gives the bits that calling the whole op for each step gave, on any thread count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple, Union

import torch

from mf_ext.ops import implicit_mf_loss


@dataclass
class ImplicitProblem:
    """The training interactions as the op's inputs, with what the objective adds to them."""

    rows: torch.Tensor       # (N,) user indices
    cols: torch.Tensor       # (N,) item indices
    weights: torch.Tensor    # (N,) w_t = c_t − 1 = alpha · strength_t (> 0)
    values: torch.Tensor     # (N,) v_t = c_t / (c_t − 1): w (v − s)² + s² = c (1 − s)² + const
    zeros: torch.Tensor      # (N,) values 0: the op's gradient is then A x alone
    constant: float          # Σ_t c_t / (c_t − 1): the op's loss minus this is Hu et al.'s
    user_reg: torch.Tensor   # (m,) λ_u
    item_reg: torch.Tensor   # (n,) λ_i


def make_problem(rows: torch.Tensor, cols: torch.Tensor, confidence_minus_one: torch.Tensor,
                 m: int, n: int, reg: float, reg_exponent: float) -> ImplicitProblem:
    """λ_u = reg · (n + Σ_{t: u_t = u} w_t)^reg_exponent (and λ_i alike with m): the total weight
    of user u's n cells (each weighs 1, plus w_t where observed), to a power. Exponent 1 is
    Rendle et al. 2021's frequency-scaled regularization λ (|I_u| + α₀ |I|) in units where an
    unobserved cell weighs 1; 0 is a plain L2 (implicit's)."""
    w = confidence_minus_one
    user_mass = torch.zeros(m, dtype=w.dtype, device=w.device).index_add_(0, rows, w)
    item_mass = torch.zeros(n, dtype=w.dtype, device=w.device).index_add_(0, cols, w)
    values = (w + 1) / w
    return ImplicitProblem(
        rows, cols, w, values, torch.zeros_like(w), float(values.double().sum()),
        frequency_reg(user_mass, n, reg, reg_exponent),
        frequency_reg(item_mass, m, reg, reg_exponent))


def frequency_reg(mass: torch.Tensor, cells: int, reg: float, reg_exponent: float
                  ) -> torch.Tensor:
    """λ = reg · (cells + mass)^reg_exponent for rows of `cells` cells whose observed ones add
    `mass` (Σ w_t) to their weight (make_problem)."""
    return reg * (cells + mass).pow(reg_exponent)


def objective(P: torch.Tensor, Q: torch.Tensor, problem: ImplicitProblem) -> torch.Tensor:
    """Hu et al.'s Σ_{all cells} c_ui (p_ui − p_uᵀ q_i)² (p = 1 on the N observed pairs, c = 1
    elsewhere) plus the penalty, through the fused op."""
    return (implicit_mf_loss(problem.rows, problem.cols, P, Q, problem.values, problem.weights)
            - problem.constant
            + (P * P).sum(0) @ problem.user_reg + (Q * Q).sum(0) @ problem.item_reg)


def als_sweep(P: torch.Tensor, Q: torch.Tensor, problem: ImplicitProblem, cg_steps: int) -> float:
    """One ALS sweep in place: the users' half-step with Q fixed, then the items' with P fixed,
    each `cg_steps` conjugate-gradient steps warm-started at the current factors. Returns the
    objective at the new (P, Q), taken from the items' half-step's own op calls (no extra one);
    read on the host once, at the end (on a GPU, the sweep's one synchronization)."""
    p = problem
    _cg_half_step(P, _HalfStepOperator(Q, p.rows, p.cols, p, p.user_reg), cg_steps)
    return float(_cg_half_step(Q, _HalfStepOperator(P, p.cols, p.rows, p, p.item_reg), cg_steps,
                               fixed_penalty=(P * P).sum(0) @ p.user_reg))


def _gram(X: torch.Tensor) -> torch.Tensor:
    """X Xᵀ, (r, r) float64: the op's all-cells Gram term."""
    if X.device.type == "cpu":
        return torch.ops.mf_ext._gram(X)
    wide = X.to(torch.promote_types(X.dtype, torch.float32))
    return (wide @ wide.T).double()


class _HalfStepOperator:
    """One half-step's system with X's side free and Y's fixed, doubled: A' = 2A and b' = 2b, so
    that A' X − b' is the op's own gradient and needs no halving (CG's iterates are the same for
    A'x = b' as for Ax = b). Y Yᵀ is computed once per half-step.

    What the CG loop reads of it: residual_and_loss, apply, `constant` and `reg` (the objective's
    constant and X's λ) and total (a sum over the processes that hold X's columns: the value
    itself here; mf_ext/sharded_implicit.py's operators, for row-sharded factors, override
    gram_Y's source, _observed, total and _cells)."""

    def __init__(self, Y: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                 p: ImplicitProblem, reg: torch.Tensor) -> None:
        self.Y, self.rows, self.cols, self.p = Y, rows, cols, p
        self.reg, self.reg2, self.constant = reg, 2 * reg, p.constant
        self.gram_Y = self._fixed_gram()

    def _fixed_gram(self) -> torch.Tensor:
        return _gram(self.Y)

    def total(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def _observed(self, X: torch.Tensor, values: torch.Tensor
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(∂/∂X of the observed part Σ w (v − xᵀy)², that part): 2 Σ w (xᵀy − v) y."""
        # The observed op without autograd: it computes ∂/∂X in its forward pass anyway.
        loss, _, grad, _, _, _, _ = torch.ops.mf_ext.observed_mf_loss_and_grads(
            self.rows, self.cols, values, X, self.Y, None, None, self.p.weights, "sum", False,
            True, False, False, False, False)
        return grad, loss

    def _cells(self, X: torch.Tensor) -> torch.Tensor:
        """The all-cells part ⟨X Xᵀ, Y Yᵀ⟩ of the op's loss, float64."""
        return (_gram(X) * self.gram_Y).sum()

    def _gradient(self, X: torch.Tensor, values: torch.Tensor
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(∂/∂X of the op's loss with unobserved weight 1 plus the L2 term Σ λ |x|², the observed
        part of the op's loss): 2 Σ w (xᵀy − v) y + 2 Y Yᵀ x + 2 λ x for every column x of X."""
        grad, loss = self._observed(X, values)
        if grad.device.type == "cpu":
            torch.ops.mf_ext._add_gram_product_(grad, self.gram_Y, X, 2.0)
        else:
            grad.addmm_(self.gram_Y.to(X.dtype), X, alpha=2.0)
        return grad.addcmul_(self.reg2, X), loss

    def residual_and_loss(self, X: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(b' − A' X, the op's loss at X in float64): the op's loss is the observed part plus
        ⟨X Xᵀ, Y Yᵀ⟩."""
        gradient, observed = self._gradient(X, self.p.values)
        return gradient.neg_(), self.total(observed.double()) + self._cells(X)

    def apply(self, D: torch.Tensor) -> torch.Tensor:
        """A' D: the gradient with values 0 has no b' part."""
        return self._gradient(D, self.p.zeros)[0]


@torch.no_grad()
def _cg_half_step(X: torch.Tensor, system: _HalfStepOperator, steps: int,
                  fixed_penalty: Union[torch.Tensor, float] = 0.0) -> torch.Tensor:
    """`steps` CG steps on A_k x_k = b_k (`system`) for every column k of X at once (one step
    length per column), starting from X; X is updated in place. Every column's step is its own,
    so the loop runs on any block of the columns (the rows a process holds); the objective's
    sums over columns go through system.total. Returns the objective at the new X (with
    `fixed_penalty`, the other side's L2 term) as a float64 tensor (no host synchronization).
    The objective is f(X) = ⟨X, A X − 2b⟩ + const,
    so with δ the update, f(X0 + δ) − f(X0) = ⟨δ, A δ − 2 r0⟩ (r0 = b − A X0), and A δ = r0 − r
    for the final residual r = r0 − Σ step · A d: the change is −⟨δ, r0 + r⟩ (halved: the
    residuals here are of the doubled system)."""
    residual, loss = system.residual_and_loss(X)
    start = loss - system.constant + system.total(((X * X).sum(0) @ system.reg).double()) \
        + fixed_penalty
    first_residual = residual.clone()
    delta = torch.zeros_like(X)
    direction = residual.clone()
    norm = torch.linalg.vecdot(residual, residual, dim=0)
    tiny = torch.finfo(X.dtype).tiny
    for _ in range(steps):
        a_direction = system.apply(direction)
        curvature = torch.linalg.vecdot(direction, a_direction, dim=0)
        # A column that has converged (residual 0) has curvature 0: it takes no step.
        step = torch.where(curvature > 0, norm / curvature.clamp_min(tiny), 0)
        delta.addcmul_(step, direction)
        residual.addcmul_(step, a_direction, value=-1)
        new_norm = torch.linalg.vecdot(residual, residual, dim=0)
        direction = torch.addcmul(residual, torch.where(norm > 0, new_norm / norm.clamp_min(tiny),
                                                        0), direction)
        norm = new_norm
    X.add_(delta)
    return start - 0.5 * system.total(torch.linalg.vecdot(
        delta.double(), first_residual.double().add_(residual.double()), dim=0).sum())

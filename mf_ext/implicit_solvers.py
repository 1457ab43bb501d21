"""The implicit-feedback objective and its two solvers, on the fused all-cells op
(mf_ext.implicit_mf_loss): closed-form ALS half-steps solved by a few conjugate-gradient steps
(as the `implicit` library does), and full-batch Adam.

The ALS half-step for the users minimizes, with Q fixed, the convex quadratic
    Σ_t w_t (v_t − p_{u_t}ᵀ q_{i_t})² + ⟨P Pᵀ, Q Qᵀ⟩ + Σ_u λ_u |p_u|²
whose normal equations A_u p_u = b_u are, per user,
    A_u = Σ_{t: u_t = u} w_t q_{i_t} q_{i_t}ᵀ + Q Qᵀ + λ_u I,    b_u = Σ_{t: u_t = u} w_t v_t q_{i_t}.
Half the op's gradient in P is A P − b for all users at once, and with values 0 it is A P without
b: each CG step is one call of the fused op (the observed corrections in one pass over the
triples, Q Qᵀ as the r × r Gram term), never a per-user r × r matrix nor an nnz × r temporary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

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
        reg * (n + user_mass).pow(reg_exponent), reg * (m + item_mass).pow(reg_exponent))


def objective(P: torch.Tensor, Q: torch.Tensor, problem: ImplicitProblem) -> torch.Tensor:
    """Hu et al.'s Σ_{all cells} c_ui (p_ui − p_uᵀ q_i)² (p = 1 on the N observed pairs, c = 1
    elsewhere) plus the penalty, through the fused op."""
    return (implicit_mf_loss(problem.rows, problem.cols, P, Q, problem.values, problem.weights)
            - problem.constant
            + (P * P).sum(0) @ problem.user_reg + (Q * Q).sum(0) @ problem.item_reg)


def als_sweep(P: torch.Tensor, Q: torch.Tensor, problem: ImplicitProblem, cg_steps: int) -> float:
    """One ALS sweep in place: the users' half-step with Q fixed, then the items' with P fixed,
    each `cg_steps` conjugate-gradient steps warm-started at the current factors. Returns the
    objective at the new (P, Q), taken from the items' half-step's own op calls (no extra one)."""
    p = problem
    _cg_half_step(P, Q, p.rows, p.cols, p, p.user_reg, cg_steps)
    return _cg_half_step(Q, P, p.cols, p.rows, p, p.item_reg, cg_steps,
                         fixed_penalty=float((P * P).sum(0) @ p.user_reg))


def _half_gradient(X: torch.Tensor, Y: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                   values: torch.Tensor, weights: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """(½ ∂/∂X of the op's loss with Y fixed, the loss): the gradient is
    Σ w (xᵀy − v) y + Y Yᵀ x for every column x of X."""
    # The op itself, without autograd: it computes ∂/∂X in its forward pass anyway, and the
    # autograd round trip cost ~20 % of a call at MovieLens-100K size.
    loss, _, grad, _, _ = torch.ops.mf_ext.implicit_mf_loss_and_grads(
        rows, cols, X, Y, values, weights, 1.0, "sum", False, True, False, False)
    return grad * 0.5, float(loss)


@torch.no_grad()
def _cg_half_step(X: torch.Tensor, Y: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                  p: ImplicitProblem, reg: torch.Tensor, steps: int, fixed_penalty: float = 0.0
                  ) -> float:
    """`steps` CG steps on A_k x_k = b_k for every column k of X at once (one step length per
    column), starting from X; X is updated in place. Returns the objective at the new X (with
    `fixed_penalty`, the other side's L2 term): the objective is quadratic in X, so
    f(X0 + δ) = f(X0) + 2⟨δ, A X0 − b⟩ + ⟨δ, A δ⟩, and A δ adds up from the steps' A d."""
    half_gradient, loss = _half_gradient(X, Y, rows, cols, p.values, p.weights)
    start = loss - p.constant + float((X * X).sum(0) @ reg) + fixed_penalty
    residual = -(half_gradient + reg * X)
    first_residual = residual.clone()
    delta, a_delta = torch.zeros_like(X), torch.zeros_like(X)
    direction = residual.clone()
    norm = (residual * residual).sum(0)
    for _ in range(steps):
        a_direction = _half_gradient(direction, Y, rows, cols, p.zeros, p.weights)[0] \
            + reg * direction
        curvature = (direction * a_direction).sum(0)
        # A column that has converged (residual 0) has curvature 0: it takes no step.
        step = torch.where(curvature > 0, norm / curvature.clamp_min(torch.finfo(X.dtype).tiny),
                           0)
        delta.add_(step * direction)
        a_delta.add_(step * a_direction)
        residual.sub_(step * a_direction)
        new_norm = (residual * residual).sum(0)
        direction = residual + torch.where(norm > 0, new_norm / norm.clamp_min(
            torch.finfo(X.dtype).tiny), 0) * direction
        norm = new_norm
    X.add_(delta)
    return start + float((delta * (a_delta - 2 * first_residual)).sum(dtype=torch.float64))

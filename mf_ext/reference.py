"""The pure-PyTorch reference: the notebook's formulas, kept readable rather than fast.

Every kernel in mf_ext is tested against these functions (loss and every gradient, through
autograd), and the benchmarks time them as the "eager" and "compiled" baselines.
"""

from __future__ import annotations

from typing import Optional

import torch


def masked_mf_loss_reference(
    R: torch.Tensor,
    P: torch.Tensor,
    Q: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """Σ_Ω (R − PᵀQ)², exactly as the notebook writes it.

    R: (m, n); P: (r, m); Q: (r, n); mask: (m, n) bool or None (then Ω = {R ≠ 0}).
    reduction "sum" is the notebook's; "mean" divides by |Ω| (0 when Ω is empty).
    """
    observed = (R != 0) if mask is None else mask
    filtered = (R - P.T @ Q) * observed
    loss = torch.sum(torch.square(filtered))
    if reduction == "mean":
        loss = loss / observed.sum().clamp_min(1)
    return loss


def adam_reference_loop(
    R: torch.Tensor,
    P0: torch.Tensor,
    Q0: torch.Tensor,
    steps: int = 100,
    lr: float = 0.05,
    mask: Optional[torch.Tensor] = None,
    reduction: str = "sum",
):
    """The notebook's training loop: autograd + torch.optim.Adam. Returns (P, Q, losses)."""
    P = P0.detach().clone().requires_grad_(True)
    Q = Q0.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([P, Q], lr=lr)
    losses = []
    for _ in range(steps):
        loss = masked_mf_loss_reference(R, P, Q, mask, reduction)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return P.detach(), Q.detach(), losses


def observed_mf_loss_reference(
    rows: torch.Tensor,
    cols: torch.Tensor,
    values: torch.Tensor,
    P: torch.Tensor,
    Q: torch.Tensor,
    row_bias: Optional[torch.Tensor] = None,
    col_bias: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """Σ_t w_t (values_t − P[:, rows_t]·Q[:, cols_t] − row_bias[rows_t] − col_bias[cols_t])².

    rows, cols: (nnz,) integer; values, weights: (nnz,); P: (r, m); Q: (r, n); row_bias: (m,);
    col_bias: (n,). reduction "mean" divides by nnz, the unweighted count (0 when nnz == 0).
    Gathers the (r, nnz) columns of P and Q, so its memory grows as nnz·r.
    """
    rows, cols = rows.long(), cols.long()
    pred = (P[:, rows] * Q[:, cols]).sum(0)
    if row_bias is not None:
        pred = pred + row_bias[rows]
    if col_bias is not None:
        pred = pred + col_bias[cols]
    squared = torch.square(values - pred)
    if weights is not None:
        squared = squared * weights
    loss = torch.sum(squared)
    if reduction == "mean":
        loss = loss / max(values.shape[0], 1)
    return loss


def implicit_mf_loss_reference(
    rows: torch.Tensor,
    cols: torch.Tensor,
    P: torch.Tensor,
    Q: torch.Tensor,
    values: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    unobserved_weight: float = 1.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """Σ_t w_t (v_t − (PᵀQ)[rows_t, cols_t])² + α₀ Σ_{all i, j} (PᵀQ)_ij², α₀ = unobserved_weight.

    rows, cols: (nnz,) integer; P: (r, m); Q: (r, n); values, weights: (nnz,) or None (all 1).
    reduction "mean" divides the whole loss by max(nnz, 1). Builds the dense m × n prediction:
    small sizes only (and the "eager" baseline of the benchmark).
    """
    prediction = P.T @ Q
    observed = prediction[rows.long(), cols.long()]
    residual = (1 if values is None else values) - observed
    squared = torch.square(residual)
    if weights is not None:
        squared = squared * weights
    loss = torch.sum(squared) + unobserved_weight * torch.sum(torch.square(prediction))
    if reduction == "mean":
        loss = loss / max(rows.shape[0], 1)
    return loss

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

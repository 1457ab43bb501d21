"""TEMPORARY pure-torch stand-in for mf_ext.implicit_mf_loss (branch implicit-op), same
signature and math; deleted once the fused op lands."""

import torch


def implicit_mf_loss(rows, cols, P, Q, values=None, weights=None, unobserved_weight=1.0,
                     reduction="sum"):
    pred = (P[:, rows] * Q[:, cols]).sum(0)
    err = (1.0 if values is None else values) - pred
    sq = err * err if weights is None else weights * err * err
    loss = sq.sum() + unobserved_weight * ((P @ P.T) * (Q @ Q.T)).sum()
    return loss / rows.numel() if reduction == "mean" else loss

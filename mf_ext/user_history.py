"""The SVD++ implicit term: each user's vector gains |N(u)|^-½ Σ_{j ∈ N(u)} y_j, where N(u) is
the set of items the user rated in TRAINING (never a pair being predicted).

For all users at once the term is Y Sᵀ, an (r, m) tensor, with S the (m, n) CSR matrix
S[u, j] = |N(u)|^-½ for j ∈ N(u). Forward is one sparse product S Yᵀ and backward one sparse
product Sᵀ G (Sᵀ is kept as its own CSR, so neither direction transposes a sparse matrix per
step): each costs O(|N|·r) time, where |N| is the number of distinct training pairs, and the
memory is S and Sᵀ, O(|N|), plus the (r, m) result; no |N| × r tensor is ever built. The
training loss then goes through the fused observed-entries op with P + Y Sᵀ as the user factors.
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch


class UserHistory:
    """S and Sᵀ for users × items of one training set, on one device and dtype.

    users, items: (N,) dense indices of the training pairs (a repeated pair counts once);
    m, n: the numbers of users and items. A user with no training pair gets a zero term."""

    def __init__(self, users: np.ndarray, items: np.ndarray, m: int, n: int,
                 device: torch.device, dtype: torch.dtype):
        pairs = np.unique(np.asarray(users, dtype=np.int64) * n + np.asarray(items, np.int64))
        u, j = pairs // n, pairs % n  # sorted by user, then item: CSR order
        counts = np.bincount(u, minlength=m)
        weights = 1.0 / np.sqrt(np.maximum(counts, 1))[u]
        self.shape = (m, n)
        self.S = _csr(u, j, weights, m, n, device, dtype)
        order = np.lexsort((u, j))  # by item, then user: the CSR order of Sᵀ
        self.S_t = _csr(j[order], u[order], weights[order], n, m, device, dtype)

    def term(self, Y: torch.Tensor) -> torch.Tensor:
        """Y Sᵀ: (r, m), column u = |N(u)|^-½ Σ_{j ∈ N(u)} Y[:, j], for Y (r, n); differentiable
        in Y."""
        return _HistoryProduct.apply(Y, self.S, self.S_t)

    def user_vectors(self, P: torch.Tensor, Y: Optional[torch.Tensor]) -> torch.Tensor:
        """P + Y Sᵀ, or P itself when there is no implicit term (Y None)."""
        return P if Y is None else P + self.term(Y)

    def columns(self, Y: torch.Tensor) -> torch.Tensor:
        """The columns of a model's Y that S's columns index: all of Y here (a sharded fit's
        history indexes the item rows its rank gathers, mf_ext/sharded.py)."""
        return Y


def _csr(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, m: int, n: int,
         device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A CSR tensor from (rows, cols, values) already sorted by row, then column."""
    crow = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=m))])
    with warnings.catch_warnings():  # torch's "sparse CSR support is in beta" notice
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(torch.as_tensor(crow, dtype=torch.int64),
                                       torch.as_tensor(cols, dtype=torch.int64),
                                       torch.as_tensor(values, dtype=dtype), size=(m, n),
                                       check_invariants=False).to(device)


class _HistoryProduct(torch.autograd.Function):
    """Y ↦ (S Yᵀ)ᵀ with the backward G ↦ (Sᵀ Gᵀ)ᵀ: two sparse products of cost O(|N| r)."""

    @staticmethod
    def forward(ctx, Y: torch.Tensor, S: torch.Tensor, S_t: torch.Tensor) -> torch.Tensor:
        ctx.S_t = S_t
        return torch.sparse.mm(S, Y.t().contiguous()).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return torch.sparse.mm(ctx.S_t, grad.t().contiguous()).t(), None, None


__all__ = ["UserHistory"]

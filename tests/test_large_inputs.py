"""Sizes past 2^31, where 32-bit index arithmetic would overflow. Opt-in (MF_EXT_SLOW=1).

observed_mf_loss with nnz·r past 2^31 (17M triples, rank 128; about 4 GB peak, minutes on 2
cores): the loss against a float64 sum in blocks, the gradients of a few rows of P and columns
of Q against float64 sums over their triples. masked_mf_loss with m·n past 2^31 (a 46,341² R):
8.6 GB, ~15 s."""

from __future__ import annotations

import os

import pytest
import torch

from mf_ext import masked_mf_loss, observed_mf_loss

pytestmark = pytest.mark.skipif(os.environ.get("MF_EXT_SLOW") != "1",
                                reason="slow and memory-hungry: set MF_EXT_SLOW=1")

NNZ, R_RANK, M, N = 17_000_000, 128, 6_000, 4_000


def test_nnz_times_rank_beyond_2_pow_31():
    assert NNZ * R_RANK > 2**31
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, M, (NNZ,), generator=g, dtype=torch.int32)
    cols = torch.randint(0, N, (NNZ,), generator=g, dtype=torch.int32)
    values = torch.rand(NNZ, generator=g) * 4 + 1
    P = (torch.rand(R_RANK, M, generator=g) * 0.2).requires_grad_()
    Q = (torch.rand(R_RANK, N, generator=g) * 0.2).requires_grad_()
    loss = observed_mf_loss(rows, cols, values, P, Q, reduction="mean")
    loss.backward()

    P64, Q64 = P.detach().double(), Q.detach().double()

    def errors(select):
        r, c = rows[select].long(), cols[select].long()
        return r, c, values[select].double() - (P64[:, r] * Q64[:, c]).sum(0)

    total = 0.0
    for start in range(0, NNZ, 1 << 20):
        total += errors(slice(start, start + (1 << 20)))[2].square().sum().item()
    torch.testing.assert_close(loss.item(), total / NNZ, rtol=1e-5, atol=0)

    for i in (0, 1, M // 2, M - 1):  # dP[:, i] = -2/nnz Σ_{t: rows_t = i} e_t q_{cols_t}
        _, c, e = errors(rows == i)
        expected = -2.0 / NNZ * (Q64[:, c] * e).sum(1)
        torch.testing.assert_close(P.grad[:, i].double(), expected, rtol=1e-4, atol=1e-10)
    for j in (0, N - 1):
        r, _, e = errors(cols == j)
        expected = -2.0 / NNZ * (P64[:, r] * e).sum(1)
        torch.testing.assert_close(Q.grad[:, j].double(), expected, rtol=1e-4, atol=1e-10)


DENSE_SIDE = 46_341  # DENSE_SIDE² = 2^31 + 88,209 entries: row·stride offsets pass 2^31


def test_dense_m_times_n_beyond_2_pow_31():
    """masked_mf_loss over a 46,341² float32 R (8.6 GB): every entry observed, R = 2, r = 1,
    P = Q = 1, so e = 1 everywhere and the exact answers are known: loss = m·n,
    ∂L/∂P = −2n per row, ∂L/∂Q = −2m per column (all sums of integers, exact in float32)."""
    m = n = DENSE_SIDE
    assert m * n > 2**31
    R = torch.full((m, n), 2.0)
    P = torch.ones(1, m, requires_grad=True)
    Q = torch.ones(1, n, requires_grad=True)
    loss = masked_mf_loss(R, P, Q)
    loss.backward()
    assert loss.item() == float(torch.tensor(float(m * n), dtype=torch.float32))
    assert torch.all(P.grad == -2.0 * n) and torch.all(Q.grad == -2.0 * m)

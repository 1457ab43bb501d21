"""Property-based parity of both ops with mf_ext/reference.py (hypothesis).

Random shapes (0 and 1 included), dtypes, reductions, masks, and memory layouts: each tensor is
a view (transposed, sliced with steps and an offset) of a larger leaf whose gaps hold NaN (or
out-of-range indices), so a kernel that reads outside the view fails loudly. Gradients are taken
with respect to the views themselves, so the kernels see the strided layouts (cloning would make
them contiguous). Example counts come from the hypothesis profile (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from helpers import GRADS, assert_close_to_reference, loss_and_grads, stepped, transposed
from mf_ext import masked_mf_loss, observed_mf_loss

LAYOUTS_2D = ("contiguous", "transposed", "stepped", "transposed_stepped")
LAYOUTS_1D = ("contiguous", "stepped")
DTYPES = (torch.float32, torch.float64)


def laid_out(x: torch.Tensor, layout: str, fill) -> torch.Tensor:
    """x's values as a view in `layout` (stepped: every second row and third column, or every
    third element, after an offset of 1); the rest of the underlying storage holds `fill`."""
    if layout in ("contiguous", "transposed"):
        return x.clone() if layout == "contiguous" else transposed(x)
    if layout == "transposed_stepped":  # 2-D only
        return stepped(x.t(), 2, 3, offset=1, fill=fill).t()
    return stepped(x, 2, 3, offset=1, fill=fill)


def random_matrix(g, shape, dtype, density=1.0, low=-2.0, high=2.0):
    x = torch.rand(shape, generator=g, dtype=torch.float64) * (high - low) + low
    if density < 1.0:
        x = x * (torch.rand(shape, generator=g, dtype=torch.float64) < density)
    return x.to(dtype)


sizes = st.one_of(st.integers(0, 3), st.integers(0, 140))
ranks = st.one_of(st.integers(0, 2), st.integers(0, 40), st.integers(60, 270))  # >64, >128: heap rows


@given(m=sizes, n=st.one_of(sizes, st.integers(250, 300)), r=ranks,
       dtype=st.sampled_from(DTYPES), reduction=st.sampled_from(("sum", "mean")),
       density=st.sampled_from((0.0, 0.3, 1.0)), with_mask=st.booleans(),
       layouts=st.tuples(*[st.sampled_from(LAYOUTS_2D)] * 4), grad_R=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_masked_mf_loss_matches_reference(m, n, r, dtype, reduction, density, with_mask,
                                          layouts, grad_R, seed):
    g = torch.Generator().manual_seed(seed)
    R0 = random_matrix(g, (m, n), dtype, density, 1.0, 5.0)
    P0 = random_matrix(g, (r, m), dtype)
    Q0 = random_matrix(g, (r, n), dtype)
    M0 = (torch.rand((m, n), generator=g) < 0.6) if with_mask else None
    R, P, Q = (laid_out(x, lay, float("nan")) for x, lay in zip((R0, P0, Q0), layouts))
    M = None if M0 is None else laid_out(M0, layouts[3], True)
    wanted = ("R", "P", "Q") if grad_R else ("P", "Q")
    # detach() in loss_and_grads keeps the views' strides: the kernels see these layouts
    got = loss_and_grads(masked_mf_loss, dict(R=R, P=P, Q=Q, mask=M), reduction, wanted)
    assert_close_to_reference(got, dict(R=R0, P=P0, Q=Q0, mask=M0), reduction, wanted)


@st.composite
def observed_problems(draw):
    side = st.integers(0, 3) | st.integers(1, 60)
    m, n = draw(side), draw(side)
    nnz = 0 if m * n == 0 else draw(st.integers(0, 8) | st.integers(0, 400)
                                    | st.integers(8192, 20000))
    r = draw(ranks)
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    rows = torch.randint(0, max(m, 1), (nnz,), generator=g)
    cols = torch.randint(0, max(n, 1), (nnz,), generator=g)
    order = draw(st.sampled_from(("random", "sorted", "reversed", "one_pair")))
    if order == "one_pair":  # every triple a duplicate of the first
        rows, cols = rows[:1].expand(nnz).clone(), cols[:1].expand(nnz).clone()
    elif order != "random":
        perm = torch.argsort(rows * max(n, 1) + cols, stable=True)
        perm = perm if order == "sorted" else perm.flip(0)
        rows, cols = rows[perm], cols[perm]
    float_values = dict(
        values=random_matrix(g, (nnz,), dtype, 1.0, 1.0, 5.0), P=random_matrix(g, (r, m), dtype),
        Q=random_matrix(g, (r, n), dtype),
        row_bias=random_matrix(g, (m,), dtype) if draw(st.booleans()) else None,
        col_bias=random_matrix(g, (n,), dtype) if draw(st.booleans()) else None,
        weights=random_matrix(g, (nnz,), dtype, 0.9, 0.5, 1.5) if draw(st.booleans()) else None)
    args = dict(rows=rows.to(draw(st.sampled_from((torch.int32, torch.int64)))),
                cols=cols.to(draw(st.sampled_from((torch.int32, torch.int64)))), **float_values)
    views = {}
    for k, v in args.items():
        if v is None:
            views[k] = None
            continue
        layout = draw(st.sampled_from(LAYOUTS_2D if v.dim() == 2 else LAYOUTS_1D))
        # Gaps of index tensors hold an index out of range: reading one raises IndexError.
        fill = float("nan") if v.dtype.is_floating_point else 2**31 - 1
        views[k] = laid_out(v, layout, fill)
    present = [k for k in GRADS["observed"] if args[k] is not None]
    wanted = tuple(k for k in present if draw(st.booleans()))
    return args, views, wanted, draw(st.sampled_from(("sum", "mean")))


@given(problem=observed_problems())
def test_observed_mf_loss_matches_reference(problem):
    args, views, wanted, reduction = problem
    got = loss_and_grads(observed_mf_loss, views, reduction, wanted)
    assert_close_to_reference(got, args, reduction, wanted)

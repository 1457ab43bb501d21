"""factorize: the notebook's Adam loop on the fused op, checked step for step against
mf_ext.reference.adam_reference_loop, plus seeding and every argument check."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import pytest
import torch

from mf_ext import factorize, masked_mf_loss
from mf_ext.reference import adam_reference_loop

NOTEBOOK_R = [[1.0, 1, 0, 3], [2, 5, 0, 5], [3, 1, 2, 2], [0, 1, 3, 0], [1, 0, 3, 1]]


def make_problem(m: int, n: int, r: int, dtype=torch.float64, seed: int = 0,
                 zeros: float = 0.3) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """R (m, n) in [0, 5) with a fraction `zeros` of unobserved zeros; P0 (r, m); Q0 (r, n)."""
    g = torch.Generator().manual_seed(seed)
    R = 5 * torch.rand(m, n, generator=g, dtype=dtype)
    R[torch.rand(m, n, generator=g) < zeros] = 0
    P0 = torch.rand(r, m, generator=g, dtype=dtype)
    Q0 = torch.rand(r, n, generator=g, dtype=dtype)
    return R, P0, Q0


def random_mask(m: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(m, n, generator=torch.Generator().manual_seed(seed)) < 0.6


def assert_follows_reference(R, P0, Q0, steps, mask: Optional[torch.Tensor] = None,
                             reduction: str = "sum", loss_rtol: float = 1e-10,
                             factor_tol: float = 1e-8) -> None:
    result = factorize(R, steps=steps, init=(P0, Q0), mask=mask, reduction=reduction)
    P, Q, losses = adam_reference_loop(R, P0, Q0, steps=steps, mask=mask, reduction=reduction)
    assert len(result.losses) == len(losses) == steps
    for k, (got, want) in enumerate(zip(result.losses, losses)):
        assert got == pytest.approx(want, rel=loss_rtol, abs=0), f"loss before step {k}"
    torch.testing.assert_close(result.P, P, rtol=factor_tol, atol=factor_tol)
    torch.testing.assert_close(result.Q, Q, rtol=factor_tol, atol=factor_tol)


# ------------------------------------------------------------------ parity with the reference

def test_notebook_matrix_follows_reference_for_100_steps():
    R = torch.tensor(NOTEBOOK_R, dtype=torch.float64)
    P0, Q0 = torch.rand(2, 5, dtype=torch.float64), torch.rand(2, 4, dtype=torch.float64)
    assert_follows_reference(R, P0, Q0, steps=100)


@pytest.mark.parametrize("m, n, r", [(1, 1, 1), (3, 7, 2), (17, 9, 3), (40, 33, 5)])
@pytest.mark.parametrize("masked, reduction", [(False, "sum"), (True, "sum"), (False, "mean"),
                                                (True, "mean")])
def test_follows_reference_float64(m, n, r, masked, reduction):
    R, P0, Q0 = make_problem(m, n, r)
    mask = random_mask(m, n) if masked else None
    assert_follows_reference(R, P0, Q0, steps=40, mask=mask, reduction=reduction)


def test_follows_reference_with_transposed_R():
    R, P0, Q0 = make_problem(11, 6, 3)
    R_t = R.t().contiguous().t()  # same values, column-major strides
    assert not R_t.is_contiguous()
    assert_follows_reference(R_t, P0, Q0, steps=30)


def test_all_unobserved_keeps_the_start():
    R, P0, Q0 = make_problem(4, 5, 2)
    mask = torch.zeros(4, 5, dtype=torch.bool)
    result = factorize(R, steps=5, init=(P0, Q0), mask=mask, reduction="mean")
    assert result.losses == [0.0] * 5
    torch.testing.assert_close(result.P, P0, rtol=0, atol=0)


def test_float32_close_to_reference():
    R, P0, Q0 = make_problem(9, 7, 2, dtype=torch.float32)
    result = factorize(R, steps=50, init=(P0, Q0))
    P, Q, losses = adam_reference_loop(R, P0, Q0, steps=50)
    assert result.P.dtype == result.Q.dtype == torch.float32
    np.testing.assert_allclose(result.losses, losses, rtol=1e-4)
    torch.testing.assert_close(result.P, P, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(result.Q, Q, rtol=1e-4, atol=1e-4)


def test_dtype_argument_converts():
    result = factorize(NOTEBOOK_R, steps=3, seed=0, dtype=torch.float32)
    assert result.P.dtype == torch.float32
    assert factorize(np.array(NOTEBOOK_R, dtype=np.int64), steps=1, seed=0).P.dtype == torch.float64


def test_losses_are_the_loss_before_each_step():
    R = torch.tensor(NOTEBOOK_R, dtype=torch.float64)
    result = factorize(R, steps=4, seed=5)
    start = factorize(R, steps=0, seed=5)
    assert start.losses == []
    assert result.losses[0] == pytest.approx(float(masked_mf_loss(R, start.P, start.Q)), rel=1e-15)
    assert all(b < a for a, b in zip(result.losses, result.losses[1:]))  # Adam descends here
    torch.testing.assert_close(result.reconstruction(), result.P.T @ result.Q)


def test_unobserved_nan_with_explicit_mask_is_ignored():
    R, P0, Q0 = make_problem(6, 5, 2)
    mask = random_mask(6, 5)
    R_nan = R.masked_fill(~mask, float("nan"))
    result = factorize(R_nan, steps=10, init=(P0, Q0), mask=mask)
    _, _, losses = adam_reference_loop(R.masked_fill(~mask, 0), P0, Q0, steps=10, mask=mask)
    assert all(math.isfinite(v) for v in result.losses)
    np.testing.assert_allclose(result.losses, losses, rtol=1e-10)


# --------------------------------------------------------------------------- initialisation

def test_seed_reproduces_the_run():
    a = factorize(NOTEBOOK_R, steps=10, seed=123)
    b = factorize(NOTEBOOK_R, steps=10, seed=123)
    c = factorize(NOTEBOOK_R, steps=10, seed=124)
    assert a.losses == b.losses
    assert torch.equal(a.P, b.P) and torch.equal(a.Q, b.Q)
    assert not torch.equal(a.P, c.P)


def test_seeded_start_is_uniform_from_a_torch_generator():
    g = torch.Generator().manual_seed(7)
    P0 = torch.rand(3, 5, generator=g, dtype=torch.float64)
    Q0 = torch.rand(3, 4, generator=g, dtype=torch.float64)
    start = factorize(NOTEBOOK_R, rank=3, steps=0, seed=7)
    assert torch.equal(start.P, P0) and torch.equal(start.Q, Q0)


def test_init_is_the_start_and_gives_the_rank():
    P0, Q0 = torch.rand(3, 5, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64)
    start = factorize(NOTEBOOK_R, steps=0, init=(P0, Q0))
    assert torch.equal(start.P, P0) and torch.equal(start.Q, Q0)
    assert start.P is not P0  # a copy: the caller's tensors are not trained in place
    assert factorize(NOTEBOOK_R, steps=2, init=(P0.numpy(), Q0.numpy())).P.shape == (3, 5)


def test_default_rank_is_2():
    assert factorize(NOTEBOOK_R, steps=0, seed=0).P.shape == (2, 5)


# --------------------------------------------------------------------------- argument checks

R54 = torch.tensor(NOTEBOOK_R, dtype=torch.float64)
NAN_R = R54.clone()
NAN_R[1, 2] = float("nan")
INF_R = R54.clone()
INF_R[4, 3] = float("inf")


@pytest.mark.parametrize("kwargs, error, match", [
    ({"rank": 0}, ValueError, r"rank must be an integer >= 1, got 0"),
    ({"rank": -3}, ValueError, r"rank must be an integer >= 1, got -3"),
    ({"rank": 1.5}, TypeError, r"rank must be an integer, got 1\.5"),
    ({"rank": True}, TypeError, r"rank must be an integer, got True"),
    ({"steps": -1}, ValueError, r"steps must be an integer >= 0, got -1"),
    ({"steps": 2.0}, TypeError, r"steps must be an integer, got 2\.0"),
    ({"lr": 0}, ValueError, r"lr must be a finite number > 0, got 0"),
    ({"lr": -0.1}, ValueError, r"lr must be a finite number > 0, got -0\.1"),
    ({"lr": float("nan")}, ValueError, r"lr must be a finite number > 0, got nan"),
    ({"lr": float("inf")}, ValueError, r"lr must be a finite number > 0, got inf"),
    ({"lr": "0.1"}, TypeError, r"lr must be a number, got '0\.1'"),
    ({"seed": -1}, ValueError, r"seed must be an integer in \[0, 18446744073709551615\], got -1"),
    ({"seed": 1.0}, TypeError, r"seed must be an integer, got 1\.0"),
    ({"R": NAN_R}, ValueError, r"R has 1 NaN or Inf observed entries, the first at \(1, 2\): nan"),
    ({"R": INF_R}, ValueError, r"R has 1 NaN or Inf observed entries, the first at \(4, 3\): inf"),
    ({"R": NAN_R, "mask": torch.ones(5, 4, dtype=torch.bool)}, ValueError,
     r"R has 1 NaN or Inf observed entries, the first at \(1, 2\)"),
    ({"R": torch.ones(5)}, ValueError, r"R must be 2-D \(m, n\), got shape \[5\]"),
    ({"R": torch.ones(2, 2, dtype=torch.complex64)}, TypeError, r"R must hold real numbers"),
    ({"R": [[1.0, 2.0], [3.0]]}, TypeError, r"R must be a 2-D array of numbers"),
    ({"mask": torch.ones(4, 5, dtype=torch.bool)}, ValueError,
     r"mask has shape \[4, 5\] but R has shape \[5, 4\]"),
    ({"mask": torch.ones(5, 4)}, TypeError, r"mask must be a bool tensor, got torch\.float32"),
    ({"init": (torch.rand(2, 4), torch.rand(2, 4))}, ValueError,
     r"init must be \(P0 of shape \[r, 5\], Q0 of shape \[r, 4\]\) for R of shape \[5, 4\], "
     r"got \[2, 4\] and \[2, 4\]"),
    ({"init": (torch.rand(2, 5), torch.rand(3, 4))}, ValueError,
     r"init must be .* got \[2, 5\] and \[3, 4\]"),
    ({"init": (torch.rand(5), torch.rand(4))}, ValueError, r"init must be .* got \[5\] and \[4\]"),
    ({"init": (torch.rand(2, 5),)}, TypeError, r"init must be a pair \(P0, Q0\), got tuple"),
    ({"init": (torch.rand(2, 5), torch.rand(2, 4)), "rank": 3}, ValueError,
     r"rank is 3 but init has rank 2"),
    ({"init": (torch.full((2, 5), float("nan")), torch.rand(2, 4))}, ValueError,
     r"init P0 contains NaN or Inf"),
    ({"reduction": "max"}, ValueError, r'reduction must be "sum" or "mean", got \'max\''),
    ({"dtype": torch.float16}, TypeError, r"dtype must be torch\.float32 or torch\.float64, "
                                          r"got torch\.float16"),
    ({"device": "gpu"}, ValueError, r"device must be a torch device .* got 'gpu'"),
])
def test_argument_errors(kwargs, error, match):
    kwargs = dict(kwargs)
    R = kwargs.pop("R", R54)
    kwargs.setdefault("steps", 1)
    with pytest.raises(error, match=r"^mf_ext\.factorize: " + match):
        factorize(R, **kwargs)

"""The CPU kernels on problems they cut into several units of work: several chunks, bucketing
segments, outer and inner blocks (observed op), several row and column groups (dense op). The
cuts are read from the kernels' own partition functions (mf_ext.ops._observed_partition,
_dense_partition) and asserted, so a shape that stops reaching these paths fails here instead of
passing silently. Loss and every gradient are checked against mf_ext/reference.py, and 1 and 2
threads must agree bitwise."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close_to_reference as assert_dense_close_to_reference
from helpers import random_problem
from mf_ext.ops import _dense_partition, _observed_partition
from mf_ext.reference import observed_mf_loss_reference

OBSERVED = torch.ops.mf_ext.observed_mf_loss_and_grads
DENSE = torch.ops.mf_ext.masked_mf_loss_and_grads
FLOATS = ("values", "P", "Q", "row_bias", "col_bias", "weights")
NAMES = ("loss", *(f"d_{name}" for name in FLOATS))

# (m, n, r, nnz): 140,000 triples make 2 bucketing segments (a segment holds at least 65,536);
# the larger side spans 3 blocks of 2,048 indices, the smaller 2. Asserted below.
ROWS_OUTER = (4500, 2300, 5, 140_000)
COLS_OUTER = (2300, 4500, 5, 140_000)


def observed_problem(m, n, r, nnz, dtype, seed=0):
    """The op's arguments: nnz random (row, col) pairs (repeats included, in no order), values
    in [1, 5), P (r, m), Q (r, n), biases and positive weights."""
    g = torch.Generator().manual_seed(seed)
    args = dict(rows=torch.randint(0, m, (nnz,), generator=g),
                cols=torch.randint(0, n, (nnz,), generator=g),
                values=torch.rand(nnz, generator=g, dtype=torch.float64) * 4 + 1,
                P=torch.rand(r, m, generator=g, dtype=torch.float64),
                Q=torch.rand(r, n, generator=g, dtype=torch.float64),
                row_bias=torch.randn(m, generator=g, dtype=torch.float64),
                col_bias=torch.randn(n, generator=g, dtype=torch.float64),
                weights=torch.rand(nnz, generator=g, dtype=torch.float64) + 0.5)
    return {k: v.to(dtype) if k in FLOATS else v for k, v in args.items()}


def run_observed(args, reduction, threads):
    torch.set_num_threads(threads)
    return OBSERVED(*args.values(), reduction, *([True] * 6))


def reference_outputs(args, reduction):
    """The reference's loss and gradients (autograd) in the arguments' dtype."""
    leaves = {k: v.detach().requires_grad_(k in FLOATS) for k, v in args.items()}
    loss = observed_mf_loss_reference(**leaves, reduction=reduction)
    return [loss.detach(), *torch.autograd.grad(loss, [leaves[k] for k in FLOATS])]


def assert_observed_close_to_reference(got, args, reduction):
    """float64: within 1e-12. float32: the kernel's error against the float64 reference within
    2x the float32 reference's own error, plus a floor of 8 ulps of the output's scale and one
    eps of the scale of its terms (the rule of the other parity tests)."""
    dtype = args["values"].dtype
    double = {k: v.double() if k in FLOATS else v for k, v in args.items()}
    exact = reference_outputs(double, reduction)
    if dtype == torch.float64:
        for name, a, b in zip(NAMES, got, exact):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * (1 + b.abs().max().item()),
                                       msg=lambda s, name=name: f"{name}: {s}")
        return
    eager = reference_outputs(args, reduction)
    # Every term with its magnitude: the reference then returns each output's scale of terms.
    absolute = {k: v.abs() if k in FLOATS else v for k, v in double.items()}
    absolute["values"] = -absolute["values"]
    scale = reference_outputs(absolute, reduction)
    eps = torch.finfo(dtype).eps
    for name, a, e, b, s in zip(NAMES, got, eager, exact, scale):
        assert a.dtype == dtype and a.shape == b.shape, name
        err_kernel = (a.double() - b).abs().max().item()
        err_eager = (e.double() - b).abs().max().item()
        floor = eps * (8 * (1 + b.abs().max().item()) + s.abs().max().item())
        assert err_kernel <= 2 * err_eager + floor, (
            f"{name}: kernel error {err_kernel:.3g} > 2 x eager error {err_eager:.3g} + {floor:.3g}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,outer", [(ROWS_OUTER, "rows"), (COLS_OUTER, "cols")],
                         ids=["rows-outer", "cols-outer"])
def test_observed_several_chunks_segments_and_blocks(shape, outer, dtype):
    args = observed_problem(*shape, dtype)
    part = _observed_partition(args["rows"], args["cols"], args["P"], args["Q"])
    assert part["outer"] == outer
    assert len(part["segments"]) >= 2 and len(part["chunks"]) >= 2, part
    assert part["outer_blocks"] >= 2 and part["inner_blocks"] >= 2, part
    assert part["tiles"] == part["outer_blocks"] * part["inner_blocks"]
    assert sum(part["segments"]) == sum(part["chunks"]) == shape[3]
    assert min(part["chunks"]) > 0

    got = run_observed(args, "sum", threads=1)
    assert_observed_close_to_reference(got, args, "sum")
    for a, b, name in zip(got, run_observed(args, "sum", threads=2), NAMES):
        assert torch.equal(a, b), f"{name}: 1 and 2 threads differ"


@pytest.mark.parametrize("shape", [ROWS_OUTER, COLS_OUTER], ids=["rows-outer", "cols-outer"])
def test_observed_several_units_mean(shape):
    args = observed_problem(*shape, torch.float64, seed=1)
    assert len(_observed_partition(args["rows"], args["cols"], args["P"], args["Q"])["chunks"]) >= 2
    assert_observed_close_to_reference(run_observed(args, "mean", threads=2), args, "mean")


def test_observed_partition_ignores_threads():
    """The partition, hence the order of every sum, depends on the shapes and the data only."""
    args = observed_problem(*ROWS_OUTER, torch.float32)
    parts = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        parts.append(_observed_partition(args["rows"], args["cols"], args["P"], args["Q"]))
    assert parts[0] == parts[1]
    # The data decides where the chunks end: with every triple in the first outer block, the
    # first chunk takes them all.
    args["rows"] = args["rows"] % parts[0]["outer_block_size"]
    crowded = _observed_partition(args["rows"], args["cols"], args["P"], args["Q"])
    assert crowded["chunks"][0] == ROWS_OUTER[3] and crowded["segments"] == parts[0]["segments"]


def test_observed_partition_checks_indices():
    args = observed_problem(50, 40, 3, 100, torch.float64)
    args["cols"][17] = 40
    with pytest.raises(IndexError, match=r"cols\[17\] = 40 is out of range"):
        _observed_partition(args["rows"], args["cols"], args["P"], args["Q"])
    empty = _observed_partition(args["rows"][:0], args["cols"][:0], args["P"], args["Q"])
    assert empty["segments"] == [] and empty["chunks"] == []


# (m, n, r): several groups of rows and of columns (groups of 64 rows, of whole blocks of 32
# float64 or 64 float32 columns) whichever way the kernel reads R; asserted below.
DENSE_SHAPE = (330, 450, 7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["row-major", "column-major"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_dense_several_row_and_column_groups(layout, dtype, reduction):
    R, P, Q, _ = random_problem(*DENSE_SHAPE, dtype=dtype, seed=3).values()
    if layout == "column-major":
        R = R.t().contiguous().t()
    part = _dense_partition(R, P, Q)
    assert part["transposed"] == (layout == "column-major")
    assert part["row_groups"] >= 2 and part["col_groups"] >= 2, part
    assert len(part["tasks"]) == part["row_groups"] * part["col_groups"]
    assert sum(part["tasks"]) == R.numel() and min(part["tasks"]) > 0
    covered = torch.zeros(R.shape, dtype=torch.int64)
    for i0, i1, j0, j1 in part["task_ranges"]:
        covered[i0:i1, j0:j1] += 1
    assert bool((covered == 1).all()), "the tasks must cover R exactly once"

    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        runs.append(DENSE(R, P, Q, None, reduction, True, True, True))
    assert_dense_close_to_reference(runs[0], dict(R=R, P=P, Q=Q, mask=None), reduction)
    for a, b, name in zip(*runs, ("loss", "dR", "dP", "dQ")):
        assert torch.equal(a, b), f"{name}: 1 and 2 threads differ"


def test_dense_partition_ignores_threads():
    R, P, Q, _ = random_problem(*DENSE_SHAPE, dtype=torch.float32).values()
    parts = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        parts.append(_dense_partition(R, P, Q))
    assert parts[0] == parts[1]
    assert _dense_partition(R[:0], P[:, :0], Q)["tasks"] == []

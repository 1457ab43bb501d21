"""The CPU kernels on problems they cut into several units of work: several chunks, bucketing
segments, outer and inner blocks, and both passes of path "units" (observed op); several row
and column groups, on each of the dense op's paths (rowwise and tiled, chosen by the kernel and
forced). The cuts are read from the kernels' own partition functions
(mf_ext.ops._observed_partition, _dense_partition) and asserted, so a shape that stops reaching
these paths fails here instead of passing silently. Loss and every gradient are checked against
mf_ext/reference.py, and 1 and 2 threads must agree bitwise."""

from __future__ import annotations

import pytest
import torch

from helpers import (GRADS, OBSERVED_ORDER, assert_close_to_reference, loss_and_grads,
                     random_problem, random_triples)
from mf_ext.ops import _dense_partition, _observed_partition
from mf_ext.reference import masked_mf_loss_reference

OBSERVED = torch.ops.mf_ext.observed_mf_loss_and_grads
DENSE = torch.ops.mf_ext.masked_mf_loss_and_grads
NAMES = ("loss", *(f"d_{name}" for name in GRADS["observed"]))

# (m, n, r, nnz): 140,000 triples make 2 bucketing segments (a segment holds at least 65,536);
# the larger side spans 3 blocks of 2,048 indices, the smaller 2. Asserted below.
ROWS_OUTER = (4500, 2300, 5, 140_000)
COLS_OUTER = (2300, 4500, 5, 140_000)


def observed_problem(m, n, r, nnz, dtype, seed=0):
    """nnz random triples with values, biases and weights (helpers.random_triples)."""
    return random_triples(m, n, r, nnz, dtype=dtype, seed=seed, biases=True, weights=True)


def run_observed(args, reduction, threads):
    torch.set_num_threads(threads)
    return OBSERVED(*(args[k] for k in OBSERVED_ORDER), reduction, *([True] * 6))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,outer", [(ROWS_OUTER, "rows"), (COLS_OUTER, "cols")],
                         ids=["rows-outer", "cols-outer"])
def test_observed_several_chunks_segments_and_blocks(shape, outer, dtype):
    args = observed_problem(*shape, dtype)
    part = _observed_partition(args["rows"], args["cols"], args["P"], args["Q"])
    assert part["outer"] == outer and part["path"] == "chunks" and part["inner_units"] == []
    assert len(part["segments"]) >= 2 and len(part["chunks"]) >= 2, part
    assert part["outer_blocks"] >= 2 and part["inner_blocks"] >= 2, part
    assert part["tiles"] == part["outer_blocks"] * part["inner_blocks"]
    assert sum(part["segments"]) == sum(part["chunks"]) == shape[3]
    assert min(part["chunks"]) > 0

    got = run_observed(args, "sum", threads=1)
    assert_close_to_reference(got, args, "sum")
    for a, b, name in zip(got, run_observed(args, "sum", threads=2), NAMES):
        assert torch.equal(a, b), f"{name}: 1 and 2 threads differ"


@pytest.mark.parametrize("shape", [ROWS_OUTER, COLS_OUTER], ids=["rows-outer", "cols-outer"])
def test_observed_several_units_mean(shape):
    args = observed_problem(*shape, torch.float64, seed=1)
    assert len(_observed_partition(args["rows"], args["cols"], args["P"], args["Q"])["chunks"]) >= 2
    assert_close_to_reference(run_observed(args, "mean", threads=2), args, "mean")


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


# Path "units" (inputs of 2^24 triples and more, or MF_EXT_OBSERVED_PATH=units): two passes, the
# first in runs of whole outer blocks, the second in ranges of inner indices. (m, n, r, nnz):
# r = 16 gives blocks of 512 indices (float64) / 2048 (float32), so the outer side spans 10 / 3
# blocks, each a unit of its own; 600,000 triples make 4 inner ranges, which end inside inner
# blocks. Asserted below.
UNITS_ROWS_OUTER = (5000, 2600, 16, 600_000)
UNITS_COLS_OUTER = (2600, 5000, 16, 600_000)
ALL_FLAGS = (True,) * 6


def units_case(shape, dtype, monkeypatch, seed=4):
    monkeypatch.setenv("MF_EXT_OBSERVED_PATH", "units")
    args = observed_problem(*shape, dtype, seed=seed)
    part = _observed_partition(args["rows"], args["cols"], args["P"], args["Q"])
    assert part["path"] == "units"
    assert len(part["chunks"]) == part["outer_blocks"] >= 3, part
    assert len(part["inner_units"]) == 4 and part["inner_blocks"] >= 2, part
    assert sum(part["chunks"]) == sum(part["inner_units"]) == shape[3]
    assert min(part["chunks"]) > 0 and min(part["inner_units"]) > 0
    return args


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [UNITS_ROWS_OUTER, UNITS_COLS_OUTER],
                         ids=["rows-outer", "cols-outer"])
def test_observed_units_path(shape, dtype, reduction, monkeypatch):
    """Path "units" against the reference (float64 1e-12, float32 within 2x eager's own error),
    bitwise the same on 1, 2 and 3 threads."""
    args = units_case(shape, dtype, monkeypatch)
    runs = [run_observed(args, reduction, threads) for threads in (1, 2, 3)]
    assert_close_to_reference(runs[0], args, reduction)
    for run in runs[1:]:
        for a, b, name in zip(runs[0], run, NAMES):
            assert torch.equal(a, b), f"{name}: thread counts differ"


@pytest.mark.parametrize("flags", [
    (False, False, True, False, False, False), (False, False, False, False, True, False),
    (False, True, False, True, False, False), (False, False, False, False, False, False)],
    ids=["Q", "col_bias", "P-row_bias", "loss"])
def test_observed_units_path_gradients_asked_alone(flags, monkeypatch):
    """The second pass runs only when an inner gradient is asked for; each output asked alone is
    bitwise what the call asking for everything returns."""
    args = units_case(UNITS_ROWS_OUTER, torch.float32, monkeypatch)
    order = [args[k] for k in OBSERVED_ORDER]
    everything = OBSERVED(*order, "sum", *ALL_FLAGS)
    alone = OBSERVED(*order, "sum", *flags)
    assert torch.equal(alone[0], everything[0])
    for flag, a, b, name in zip(flags, alone[1:], everything[1:], NAMES[1:]):
        assert torch.equal(a, b) if flag else a.numel() == 0, name


def power_law_indices(size, nnz, exponent, g):
    """nnz indices in [0, size), index k taking its expected share under a power law of that
    exponent (a random id per rank, as user and item ids are), in random order."""
    weights = torch.arange(1, size + 1, dtype=torch.float64) ** -exponent
    counts = (weights * (nnz / weights.sum())).floor().long()
    counts[:nnz - int(counts.sum())] += 1
    ids = torch.randperm(size, generator=g).int()
    return ids.repeat_interleave(counts)


def test_observed_partition_has_work_for_many_threads():
    """An ML-20M-sized problem (138,493 x 26,744, 20M triples, r = 64, float32; power-law
    popularity with ML-20M's heaviest user and movie, about 27k and 62k triples): path "units",
    at least 256 units in the first pass and 128 in the second (for 64 threads), each pass
    balanced: no unit above 1.5x its pass's mean."""
    m, n, nnz = 138_493, 26_744, 20_000_000
    g = torch.Generator().manual_seed(0)
    rows = power_law_indices(m, nnz, 0.5, g)
    cols = power_law_indices(n, nnz, 0.5, g)[torch.randperm(nnz, generator=g)]
    P, Q = torch.empty(64, m), torch.empty(64, n)
    part = _observed_partition(rows, cols, P, Q)
    assert part["path"] == "units" and part["outer"] == "rows"
    for units, least in ((part["chunks"], 256), (part["inner_units"], 128)):
        assert len(units) >= least and sum(units) == nnz, part
        assert max(units) <= 1.5 * nnz / len(units), (max(units), nnz / len(units))
    del rows, cols


def test_observed_path_variable(monkeypatch):
    args = observed_problem(*ROWS_OUTER, torch.float32)
    assert _observed_partition(args["rows"], args["cols"], args["P"], args["Q"])["path"] == \
        "chunks"
    monkeypatch.setenv("MF_EXT_OBSERVED_PATH", "fastest")
    with pytest.raises(ValueError, match="MF_EXT_OBSERVED_PATH must be chunks, units or auto, "
                                         "got 'fastest'"):
        run_observed(args, "sum", threads=1)


# The dense op. Its kernel picks a unit kernel ("path") by rank and shape: rowwise for small
# ranks, tiled (BLAS GEMMs on tiles) from r = 16 (float32) / 32 (float64) when both sides are at
# least 256; MF_EXT_DENSE_PATH forces one. Each case below names the path it must reach, and
# whether it gets there by itself or forced, and whether it has lanes. Shapes: rowwise cuts
# columns into groups of 256 and rows into up to 4 lanes of those. Tiled units are at least
# 128 x 128 cells (256 x 256 from r = 256 where both sides have room for two), cut into equal
# tiles of at most 128 (256) rows and 256 columns; the longer side of an oblong R is cut into
# up to 4 lanes of groups, each with its own accumulator of the other factor's gradient: the
# "tiled" units (130 x 135) have no lanes and take 2 x 1 tiles, the "tiled-lanes" ones
# (150 x 137; lanes on the columns, or on the rows when R is read column-major) 2 x 1, the
# "tiled-wide" ones (300 x 275, 2 lanes) 2 x 2.
DENSE_CASES = {  # id: (m, n, r, path, forced, lanes)
    "rowwise": (520, 600, 7, "rowwise", False, True),
    "rowwise-forced": (520, 600, 40, "rowwise", True, True),
    "tiled": (520, 540, 40, "tiled", False, False),
    "tiled-lanes": (300, 1100, 40, "tiled", False, True),
    "tiled-forced": (300, 1100, 7, "tiled", True, True),
    "tiled-wide": (600, 1100, 256, "tiled", False, True),
}
# (reduction, explicit mask, grad_R)
DENSE_VARIANTS = {"sum": ("sum", False, True), "mean-mask": ("mean", True, True),
                  "sum-mask-no-dR": ("sum", True, False)}


def dense_case(case, dtype, layout, mask, monkeypatch, seed=3):
    """The problem of DENSE_CASES[case] with R (and the mask) laid out as asked, the path forced
    if the case says so; asserts through _dense_partition that the kernel reaches that path with
    several row and column groups, several units able to run at once, the units covering R once
    and balanced."""
    m, n, r, path, forced, lanes = DENSE_CASES[case]
    R, P, Q, M = random_problem(m, n if layout != "strided" else 2 * n, r, dtype=dtype, seed=seed,
                                mask=mask).values()
    if layout == "strided":  # every other column of a wider matrix: no unit stride anywhere
        R, Q = R[:, ::2], Q[:, : n]
        M = M[:, ::2] if mask else None
    elif layout == "column-major":
        R = R.t().contiguous().t()
        M = M.t().contiguous().t() if mask else None
    elif layout == "embedding":  # P, Q: the .T of (m, r) and (n, r) tables, read in place
        P, Q = P.t().contiguous().t(), Q.t().contiguous().t()
    monkeypatch.delenv("MF_EXT_DENSE_PATH", raising=False)
    assert (_dense_partition(R, P, Q)["path"] == path) != forced, "the automatic choice changed"
    if forced:
        monkeypatch.setenv("MF_EXT_DENSE_PATH", path)
    part = _dense_partition(R, P, Q)
    assert part["path"] == path
    assert part["transposed"] == (layout == "column-major")
    assert part["row_groups"] >= 2 and part["col_groups"] >= 2, part
    assert part["concurrent"] >= 2, part
    fewer_groups = min(part["row_groups"], part["col_groups"])
    assert (part["concurrent"] > fewer_groups) == lanes, part  # lanes: more at once than that
    assert len(part["tasks"]) == part["row_groups"] * part["col_groups"]
    assert sum(part["tasks"]) == R.numel() and max(part["tasks"]) <= 1.5 * min(part["tasks"])
    if path == "tiled":  # units of at least 128 x 128 cells, 256 x 256 from r = 256
        side = 256 if r >= 256 else 128
        assert all(min(i1 - i0, j1 - j0) >= side for i0, i1, j0, j1 in part["task_ranges"])
    covered = torch.zeros(R.shape, dtype=torch.int64)
    for i0, i1, j0, j1 in part["task_ranges"]:
        covered[i0:i1, j0:j1] += 1
    assert bool((covered == 1).all()), "the units must cover R exactly once"
    return R, P, Q, M


def run_dense(R, P, Q, M, reduction, grad_R, threads):
    torch.set_num_threads(threads)
    out = DENSE(R, P, Q, M, reduction, grad_R, True, True)
    return (out[0], out[1] if grad_R else None, out[2], out[3])


@pytest.mark.parametrize("variant", DENSE_VARIANTS)
@pytest.mark.parametrize("layout", ["row-major", "column-major", "strided", "embedding"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", DENSE_CASES)
def test_dense_paths(case, dtype, layout, variant, monkeypatch):
    """Every path, automatic and forced, against the reference (float64 1e-12, float32 within 2x
    eager's own error), 1 and 2 threads bitwise; with embedding tables, dP and dQ in their
    layout."""
    reduction, mask, grad_R = DENSE_VARIANTS[variant]
    R, P, Q, M = dense_case(case, dtype, layout, mask, monkeypatch)
    runs = [run_dense(R, P, Q, M, reduction, grad_R, threads) for threads in (1, 2)]
    assert_close_to_reference(runs[0], dict(R=R, P=P, Q=Q, mask=M), reduction,
                              wanted=None if grad_R else ("P", "Q"))
    if layout == "embedding":
        assert runs[0][2].stride() == P.stride() and runs[0][3].stride() == Q.stride()
    for a, b, name in zip(*runs, ("loss", "dR", "dP", "dQ")):
        assert (a is None and b is None) or torch.equal(a, b), f"{name}: 1 and 2 threads differ"


@pytest.mark.parametrize("case", DENSE_CASES)
def test_dense_paths_propagate_nan_and_inf(case, monkeypatch):
    """A NaN of R where the mask is False and an Inf in P reach the loss and the gradients
    exactly where they reach the reference's (the mask is multiplied in, not selected)."""
    R, P, Q, M = dense_case(case, torch.float64, "row-major", True, monkeypatch, seed=5)
    M[7, 11] = False
    R[7, 11] = float("nan")
    P[2, 40] = float("inf")
    got = run_dense(R, P, Q, M, "sum", True, threads=2)
    expected = loss_and_grads(masked_mf_loss_reference, dict(R=R, P=P, Q=Q, mask=M), "sum")
    assert torch.isnan(got[0])
    for name, a, b in zip(("loss", "dR", "dP", "dQ"), got, expected):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{name}: NaNs differ"
        assert torch.equal(torch.isposinf(a), torch.isposinf(b)), f"{name}: +Infs differ"
        assert torch.equal(torch.isneginf(a), torch.isneginf(b)), f"{name}: -Infs differ"
        finite = torch.isfinite(b)
        if finite.any():
            scale = b[finite].abs().max().item()
            torch.testing.assert_close(a[finite], b[finite], rtol=1e-12, atol=1e-12 * (1 + scale),
                                       msg=lambda s, name=name: f"{name}: {s}")
    assert torch.isfinite(got[2]).any(), "dP: the rows away from the NaN and the Inf stay finite"


def test_dense_path_threads_beyond_the_core_count(monkeypatch):
    """More threads than units of a round, and than cores: the same bits."""
    for case in ("rowwise", "tiled", "tiled-lanes", "tiled-wide"):
        R, P, Q, M = dense_case(case, torch.float32, "row-major", True, monkeypatch)
        runs = [run_dense(R, P, Q, M, "mean", True, threads) for threads in (1, 3, 8)]
        for run in runs[1:]:
            for a, b, name in zip(runs[0], run, ("loss", "dR", "dP", "dQ")):
                assert torch.equal(a, b), f"{case} {name}: thread counts differ"


SQUARE = (4096, 4096)


@pytest.mark.parametrize("dtype,r,path,shape,at_once", [
    (torch.float32, 8, "rowwise", SQUARE, 64), (torch.float32, 128, "tiled", SQUARE, 32),
    (torch.float32, 256, "tiled", SQUARE, 16), (torch.float64, 8, "rowwise", SQUARE, 64),
    (torch.float64, 128, "tiled", SQUARE, 32), (torch.float32, 64, "tiled", (512, 32768), 16),
    (torch.float32, 64, "tiled", (32768, 512), 16)])
def test_dense_partition_has_work_for_many_threads(dtype, r, path, shape, at_once, monkeypatch):
    """A 4096 x 4096 problem: at least 256 balanced units whichever path runs, and as many of
    them able to run at once as the path allows: 64 rowwise; tiled, whose units are at least
    128 x 128 so that each GEMM stays efficient, 32, and 16 from r = 256 (units of 256 x 256).
    An oblong one (either way round): its 4 groups on the short side times 4 lanes on the long."""
    monkeypatch.delenv("MF_EXT_DENSE_PATH", raising=False)
    R = torch.empty(*shape, dtype=dtype)
    P, Q = torch.empty(r, shape[0], dtype=dtype), torch.empty(r, shape[1], dtype=dtype)
    part = _dense_partition(R, P, Q)
    assert part["path"] == path
    assert len(part["tasks"]) >= (256 if shape[0] == shape[1] else 64), part
    assert max(part["tasks"]) <= 1.05 * min(part["tasks"]), part
    assert part["concurrent"] == at_once, part


def test_dense_path_variable_is_checked(monkeypatch):
    R, P, Q, _ = random_problem(40, 30, 3).values()
    monkeypatch.setenv("MF_EXT_DENSE_PATH", "fastest")
    with pytest.raises(ValueError,
                       match="MF_EXT_DENSE_PATH must be rowwise, tiled or auto, got 'fastest'"):
        DENSE(R, P, Q, None, "sum", False, True, True)


def test_dense_partition_ignores_threads(monkeypatch):
    monkeypatch.delenv("MF_EXT_DENSE_PATH", raising=False)
    for case in ("rowwise", "tiled"):
        m, n, r, *_ = DENSE_CASES[case]
        R, P, Q, _ = random_problem(m, n, r, dtype=torch.float32).values()
        parts = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            parts.append(_dense_partition(R, P, Q))
        assert parts[0] == parts[1]
    assert _dense_partition(R[:0], P[:, :0], Q)["tasks"] == []

"""The CUDA kernels (csrc/cuda/*.cu), unmodified, run on the CPU by the emulator in
tests/cuda_emulation/ (see its README): index math, tiling, shared-memory reductions, warp
shuffles, partial-sum passes, strides, masks and dtypes of the kernels and of their host-side
launch code, checked against mf_ext/reference.py by the rules of the CPU tests and against the
real CPU kernels, under the forward schedule and (a subset) under the reverse and shuffled
ones. Not a substitute for a GPU run (no memory model, no real scheduling or
atomics ordering, no resource limits).

The emulated ops are torch.ops.mf_ext_emu.* (CPU dispatch key, schemas taken from
csrc/mf_ext.cpp). Building them takes about 30 s on 2 cores (cached under
build/cuda_emulation/ afterwards); a build failure fails every test here.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

import mf_ext  # noqa: F401  (registers torch.ops.mf_ext.*, the CPU kernels compared against)
from helpers import assert_close_to_reference, random_problem
from mf_ext.reference import masked_mf_loss_reference
from test_observed_mf_loss import NAMES as OBS_NAMES
from test_observed_mf_loss import _layouts as observed_layouts
from test_observed_mf_loss import assert_close_to_reference as observed_assert_close
from test_observed_mf_loss import random_triples

ORDER = ("rows", "cols", "values", "P", "Q", "row_bias", "col_bias", "weights")
FLOATS = ("values", "P", "Q", "row_bias", "col_bias", "weights")
HALF = [torch.float16, torch.bfloat16]


def _have_compiler():
    from torch.utils.cpp_extension import get_cxx_compiler
    try:
        return shutil.which(get_cxx_compiler()) is not None
    except Exception:  # noqa: BLE001
        return shutil.which("c++") is not None or shutil.which("g++") is not None


@pytest.fixture(scope="module")
def emu():
    """torch.ops.mf_ext_emu, built from the translated sources (a build error fails the test)."""
    if not _have_compiler():
        pytest.skip("no C++ compiler: the CUDA emulation cannot be built")
    prebuilt = os.environ.get("MF_EXT_EMU_LIBRARY")
    if prebuilt:  # a library built elsewhere (mutation testing: see cuda_emulation/README.md)
        torch.ops.load_library(prebuilt)
        return torch.ops.mf_ext_emu
    sys.path.insert(0, str(Path(__file__).parent))
    from cuda_emulation import translate
    translate.load()
    return torch.ops.mf_ext_emu


# ---------------------------------------------------------------------------------------------
# The emulator itself: it exchanges correctly, and it reports what a GPU would do wrong.

# Schedules (cuda_emu.h, "schedule"): the order in which the fibers a barrier or collective
# releases (and all of them at block start) run. forward is the default; the tests below that
# take `schedule` also run under the others, where a missing barrier between one thread's
# shared-memory write and another's read shows (README, "Schedules").
SCHEDULES = ["forward", "reverse", "shuffled"]
OTHER_SCHEDULES = ["reverse", "shuffled"]
SHUFFLE_SEED = 20261128


@pytest.fixture
def schedule(request, emu):
    """Runs the test under the schedule named by indirect parametrization, then returns to the
    default (MF_EXT_EMU_SCHEDULE, else forward)."""
    name = request.param
    emu.set_schedule(name, SHUFFLE_SEED if name == "shuffled" else 0)
    assert emu.get_schedule() == (f"shuffled:{SHUFFLE_SEED}" if name == "shuffled" else name)
    yield name
    emu.set_schedule("", 0)


@pytest.mark.parametrize("schedule", SCHEDULES, indirect=True)
def test_emulator_exchanges(emu, schedule):
    out = emu.selftest("good").tolist()
    for b in range(3):
        assert out[3 * b:3 * b + 3] == [32640 + 256 * 1000 * b, 6, 2]


@pytest.mark.parametrize("case,message", [
    ("deadlock", r"deadlock in kernel deadlock_kernel.*1 of 256 threads have exited.*"
                 r"__syncthreads at line 42"),
    ("exited_lane", r"deadlock in kernel exited_lane_kernel.*__shfl_xor_sync"),
    ("divergent", r"divergent __syncthreads"),
    ("outside_mask", r"reads lane \d+, outside its mask 0xffff"),
    ("mixed_collectives", r"mismatched warp collectives"),
    ("trap", r"block \(1,0,0\) thread 3: __trap\(\) called"),
    ("misaligned_atomic", r"atomicAdd\(float4\*\): misaligned"),
    ("empty_grid", r"cudaErrorInvalidConfiguration"),
])
@pytest.mark.parametrize("schedule", SCHEDULES, indirect=True)
def test_emulator_reports_bad_kernels(emu, case, message, schedule):
    with pytest.raises(RuntimeError, match=message):
        emu.selftest(case)


def test_emulator_schedules_are_applied(emu):
    """The order in which 64 threads pass block start, two __syncthreads and a __syncwarp:
    ascending (forward), descending (reverse), a permutation drawn anew at every release and
    fixed by the seed (shuffled)."""
    ascending = torch.arange(64).expand(4, 64)
    try:
        emu.set_schedule("forward", 0)
        assert emu.get_schedule() == "forward"
        assert torch.equal(emu.selftest("order").long(), ascending)
        emu.set_schedule("reverse", 0)
        assert emu.get_schedule() == "reverse"
        assert torch.equal(emu.selftest("order").long(), ascending.flip(1))
        emu.set_schedule("shuffled", 1)
        assert emu.get_schedule() == "shuffled:1"
        a = emu.selftest("order").long()
        assert torch.equal(emu.selftest("order").long(), a)  # deterministic given the seed
        emu.set_schedule("shuffled", 2)
        b = emu.selftest("order").long()
        assert not torch.equal(a, b)
        for order in (a, b):
            for row in order:
                assert torch.equal(row.sort().values, torch.arange(64))
                assert not torch.equal(row, ascending[0])
                assert not torch.equal(row, ascending[0].flip(0))
            assert len({tuple(row) for row in order.tolist()}) == 4  # re-drawn at each release
        emu.set_schedule("shuffled:5", 0)
        assert emu.get_schedule() == "shuffled:5"
        with pytest.raises(RuntimeError, match="unknown schedule"):
            emu.set_schedule("backward", 0)
        with pytest.raises(RuntimeError, match="for the shuffled schedule only"):
            emu.set_schedule("reverse", 3)
    finally:
        emu.set_schedule("", 0)


def test_emulator_schedule_from_environment(emu, monkeypatch):
    """Without set_schedule, MF_EXT_EMU_SCHEDULE is read at every launch."""
    ascending = torch.arange(64).expand(4, 64)
    emu.set_schedule("", 0)
    monkeypatch.setenv("MF_EXT_EMU_SCHEDULE", "reverse")
    assert emu.get_schedule() == "reverse"
    assert torch.equal(emu.selftest("order").long(), ascending.flip(1))
    monkeypatch.setenv("MF_EXT_EMU_SCHEDULE", "shuffled:9")
    assert emu.get_schedule() == "shuffled:9"
    monkeypatch.delenv("MF_EXT_EMU_SCHEDULE")
    assert emu.get_schedule() == "forward"
    assert torch.equal(emu.selftest("order").long(), ascending)


def test_emulator_missing_barrier_shows(emu):
    """Lane k reads the shared slot lane k - 1 wrote. Without a __syncwarp between, forward
    runs the writer first (the right answer by luck); reverse runs every reader first (all
    garbage), shuffled some. With the barrier, right under every schedule."""
    want = torch.tensor([0.0] + list(range(1, 32)) + [0.0] + list(range(33, 64)))
    try:
        for name, seed in [("forward", 0), ("reverse", 0), ("shuffled", SHUFFLE_SEED)]:
            emu.set_schedule(name, seed)
            assert torch.equal(emu.selftest("neighbour_synced"), want), name
            racy = emu.selftest("neighbour_racy")
            if name == "forward":
                assert torch.equal(racy, want)
            elif name == "reverse":
                assert (racy[want != 0] == -1).all()  # 0xFF garbage, every read
            else:
                assert (racy != want).any()
    finally:
        emu.set_schedule("", 0)


def test_emulator_shared_memory_starts_as_garbage(emu):
    assert emu.selftest("shared_garbage")[:256].isnan().all()


def test_planted_stride_bug_is_caught(emu):
    """A translated variant of masked_mf_loss.cu whose scalar load path ignores the column
    stride (tests/cuda_emulation/translate.py, MUTATION): right on contiguous R, wrong on a
    column-stepped R, so the strided tests below can fail."""
    mutant = torch.ops.mf_ext_emu_mutant.masked_mf_loss_and_grads
    R, P, Q, _ = random_problem(37, 70, 3)
    flags = ("sum", True, True, True)
    good = emu.masked_mf_loss_and_grads(R, P, Q, None, *flags)
    for a, b in zip(mutant(R, P, Q, None, *flags), good):
        assert torch.equal(a, b)
    stepped = torch.zeros(37, 140, dtype=R.dtype)
    stepped[:, ::2] = R
    stepped = stepped[:, ::2]
    got = mutant(stepped, P, Q, None, *flags)
    assert not torch.allclose(got[0], good[0])


def test_translator_fails_loudly():
    """A source change the translator does not understand stops the build with a message
    instead of leaving something untranslated (or unregistered, so silently untested)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from cuda_emulation import translate as T
    text = (T.CSRC / "cuda" / "observed_mf_loss.cu").read_text()
    T.translate(text, "observed_mf_loss.cu")  # as it is: fine
    broken = {
        "unknown intrinsic": text.replace("const int lane = threadIdx.x % 32;",
                                          "const int lane = __lanemask_lt() & 31;", 1),
        "no registration": text.replace("TORCH_LIBRARY_IMPL(mf_ext, CUDA, m)",
                                        "TORCH_LIBRARY_IMPL(mf_ext, CUDA, mm)"),
        "CUDA include": text.replace("#include <c10/cuda/CUDAGuard.h>", ""),
        "shared": text.replace("__shared__ double sums[kThreads];",
                               "__shared__ double sums[kThreads], more[2];"),
        "inline asm": text.replace("__syncwarp(mask);  // every", "asm(\"bar.warp.sync -1;\");"
                                   "  // every"),
    }
    for what, src in broken.items():
        assert src != text, what
        with pytest.raises(T.TranslationError):
            T.translate(src, "observed_mf_loss.cu")


# ---------------------------------------------------------------------------------------------
# Dense op: masked_mf_loss_and_grads.

def masked(emu, R, P, Q, mask=None, reduction="sum", grads=(True, True, True)):
    return emu.masked_mf_loss_and_grads(R, P, Q, mask, reduction, *grads)


# (m, n, r): single entries, one row / one column, odd sizes across 128-wide tiles and several
# row / column groups (plan_groups), ranks beyond a staged chunk (8 float, 4 double), rank 0,
# n % 4 == 0 (vector loads) and not.
MASKED_SHAPES = [(1, 1, 1), (3, 5, 2), (1, 257, 5), (257, 1, 3), (130, 3, 1), (130, 259, 5),
                 (130, 260, 5), (257, 257, 33), (300, 129, 17), (64, 70, 0)]


def _mask_case(kind, R, seed=0):
    m, n = R.shape
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return R, None
    if kind == "random":
        return R, torch.rand(m, n, generator=g) < 0.6
    if kind == "all_masked":
        return R, torch.zeros(m, n, dtype=torch.bool)
    if kind == "empty_rows_cols":  # rows and columns with nothing observed, R ≠ 0 there
        M = torch.rand(m, n, generator=g) < 0.7
        M[::3] = False
        M[:, 1::4] = False
        return R, M
    if kind == "default_empty_rows_cols":
        R = R.clone()
        R[1::3] = 0
        R[:, ::5] = 0
        return R, None
    raise ValueError(kind)


MASKS = ["none", "random", "all_masked", "empty_rows_cols", "default_empty_rows_cols"]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("m,n,r", MASKED_SHAPES)
def test_masked_float64(emu, m, n, r, reduction, deterministic):
    """Tight against the reference, and against the real CPU kernel. (Deterministic mode makes
    torch fill every at::empty with NaN, the outputs too: an entry left unwritten shows.)"""
    for kind in MASKS if m * n > 1 else ["none", "all_masked"]:
        R, P, Q, _ = random_problem(m, n, r, seed=m + n + r)
        R, M = _mask_case(kind, R)
        got = masked(emu, R, P, Q, M, reduction)
        assert_close_to_reference(got, R, P, Q, M, reduction)
        cpu = torch.ops.mf_ext.masked_mf_loss_and_grads(R, P, Q, M, reduction, True, True, True)
        for name, a, b in zip(("loss", "dR", "dP", "dQ"), got, cpu):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"{kind} {name}")


@pytest.mark.parametrize("dtype", [torch.float32] + HALF, ids=str)
@pytest.mark.parametrize("m,n,r", [(3, 5, 2), (130, 259, 5), (257, 257, 33), (300, 129, 17)])
def test_masked_low_precision(emu, m, n, r, dtype):
    for kind, reduction in [("none", "sum"), ("random", "mean"), ("empty_rows_cols", "sum")]:
        R, P, Q, _ = random_problem(m, n, r, dtype=dtype, seed=r)
        R, M = _mask_case(kind, R)
        got = masked(emu, R, P, Q, M, reduction)
        assert all(t.dtype == dtype for t in got)
        assert_close_to_reference(got, R, P, Q, M, reduction)


def _layout_variants(R, M):
    """R (and mask) in other memory layouts: transposed storage, column-stepped, offset by one
    row and column (unaligned for vector loads)."""
    m, n = R.shape

    def stepped(t):
        wide = torch.zeros(m, 2 * n + 1, dtype=t.dtype)
        wide[:, 1::2] = t
        return wide[:, 1::2]

    def offset(t):
        big = torch.zeros(m + 1, n + 3, dtype=t.dtype)
        big[1:, 1:n + 1] = t
        return big[1:, 1:n + 1]

    yield "transposed", R.t().contiguous().t(), None if M is None else M.t().contiguous().t()
    yield "column-stepped", stepped(R), None if M is None else stepped(M)
    yield "offset", offset(R), None if M is None else offset(M)
    yield "R stepped, mask transposed", stepped(R), None if M is None else M.t().contiguous().t()

    def both(t):
        big = torch.zeros(2 * m, 3 * n, dtype=t.dtype)
        big[::2, ::3] = t
        return big[::2, ::3]

    yield "rows and columns stepped", both(R), None if M is None else both(M)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("m,n,r", [(5, 4, 2), (1, 257, 3), (257, 1, 3), (130, 259, 5),
                                   (257, 132, 9)])
@pytest.mark.parametrize("mask", [False, True])
def test_masked_layouts(emu, m, n, r, mask, dtype, deterministic):
    """Any strides of R and the mask, and non-contiguous P, Q: the reference's answer (by the
    dtype's rule), grad_R in R's layout."""
    R, P, Q, M = random_problem(m, n, r, dtype=dtype, seed=7, mask=mask)
    Pt, Qt = P.t().contiguous().t(), torch.cat([Q, Q], 1)[:, :n]
    for name, Rl, Ml in _layout_variants(R, M):
        for reduction in ("sum", "mean"):
            got = masked(emu, Rl, Pt, Qt, Ml, reduction)
            assert got[1].stride() == torch.empty_like(Rl).stride(), name
            assert_close_to_reference(got, Rl, Pt, Qt, Ml, reduction)


@pytest.mark.parametrize("m,n,r", [(130, 259, 5), (257, 132, 9)])
def test_masked_grad_flags(emu, m, n, r, deterministic):
    """Every combination of grad flags: the requested outputs bitwise as with all flags, the
    others empty."""
    R, P, Q, M = random_problem(m, n, r, seed=3, mask=True)
    for reduction in ("sum", "mean"):
        full = masked(emu, R, P, Q, M, reduction)
        for flags in itertools.product([False, True], repeat=3):
            got = masked(emu, R, P, Q, M, reduction, flags)
            assert torch.equal(got[0], full[0])
            for want, a, b in zip(flags, got[1:], full[1:]):
                if want:
                    assert torch.equal(a, b), (reduction, flags)
                else:
                    assert a.shape == (0,), (reduction, flags)


def test_masked_nan_inf_propagate_as_the_reference(emu):
    """The error is multiplied by the mask (not selected): NaN / Inf in R propagate even at
    unobserved entries, as in the reference and the CPU kernel."""
    R, P, Q, M = random_problem(130, 259, 5, seed=2, mask=True)
    R[3, 7] = float("nan")
    R[100, 200] = float("inf")
    M[3, 7] = False
    for mask in (M, None):
        got = masked(emu, R, P, Q, mask, "sum")
        cpu = torch.ops.mf_ext.masked_mf_loss_and_grads(R, P, Q, mask, "sum", True, True, True)
        ref = R.detach(), P.detach().requires_grad_(), Q.detach().requires_grad_()
        loss = masked_mf_loss_reference(ref[0], ref[1], ref[2], mask)
        dP, dQ = torch.autograd.grad(loss, ref[1:])
        for name, a, b, c in zip(("loss", "dP", "dQ"), (got[0], got[2], got[3]),
                                 (cpu[0], cpu[2], cpu[3]), (loss, dP, dQ)):
            assert torch.equal(a.isnan(), c.isnan()) and torch.equal(a.isinf(), c.isinf()), name
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, equal_nan=True, msg=name)


def test_masked_bitwise_repeatable(emu):
    R, P, Q, M = random_problem(257, 259, 11, dtype=torch.float32, seed=5, mask=True)
    a = masked(emu, R, P, Q, M, "mean")
    b = masked(emu, R, P, Q, M, "mean")
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_masked_empty(emu):
    for m, n, r in [(0, 4, 2), (3, 0, 2), (0, 0, 0)]:
        R, P, Q, _ = random_problem(m, n, r)
        got = masked(emu, R, P, Q, None, "mean")
        assert got[0].item() == 0 and got[1].shape == (m, n)
        assert not got[2].any() and not got[3].any()


def test_masked_blocks_with_several_tiles(emu):
    """More than 16 tile rows and columns: the blocks of plan_groups own several tiles (the
    partials are written by the first tile of a range and added to by the others)."""
    R, P, Q, _ = random_problem(2200, 2100, 2, dtype=torch.float64, seed=1)
    got = masked(emu, R, P, Q, None, "sum")
    assert_close_to_reference(got, R, P, Q, None, "sum")


# ---------------------------------------------------------------------------------------------
# Observed-entries op: observed_mf_loss_and_grads.

def observed(emu, args, reduction="sum", grads=None):
    if grads is None:
        grads = tuple(args[k] is not None for k in FLOATS)
    return emu.observed_mf_loss_and_grads(*(args[k] for k in ORDER), reduction, *grads)


def as_named(out, args):
    """The op's outputs as test_observed_mf_loss's helpers want them (None for absent args)."""
    return [out[0]] + [None if args[k] is None else g for k, g in zip(FLOATS, out[1:])]


# (m, n, r, nnz): as the CUDA twin's SHAPES. Lanes per triple and vectors per lane follow r
# (plan_lanes): r ≤ 8 one lane, 17 four lanes, 33 eight / sixteen, 64 sixteen (float32),
# 128 thirty-two (float64); nnz ≥ 32768 gives chunks of several triples per group.
OBS_SHAPES = [(1, 1, 1, 1), (5, 4, 2, 12), (7, 13, 1, 50), (3, 5, 8, 20), (37, 53, 3, 500),
              (64, 65, 17, 3000), (200, 90, 33, 9000), (30, 20, 64, 40000), (41, 23, 128, 2000)]
# float64 from r > 256 and float32 from r > 512 take the wide-rank kernel; r 300 float32 four
# vectors per lane.
OBS_WIDE = [(13, 11, 300, 400), (9, 14, 700, 300)]


@pytest.fixture(params=[False, True], ids=["atomics", "deterministic"])
def mode(request):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param)
    yield request.param
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("m,n,r,nnz", OBS_SHAPES + OBS_WIDE)
def test_observed_parity(emu, m, n, r, nnz, dtype, mode):
    for (biases, weights), reduction in zip([(False, False), (True, False), (False, True),
                                             (True, True)], ["sum", "mean", "mean", "sum"]):
        args = random_triples(m, n, r, nnz, dtype, seed=m * n + r, biases=biases,
                              weights=weights)
        got = as_named(observed(emu, args, reduction), args)
        observed_assert_close(got, args, reduction)


@pytest.mark.parametrize("m,n,r,nnz", [(5, 4, 2, 12), (64, 65, 17, 3000), (200, 90, 33, 9000),
                                       (30, 20, 64, 40000), (41, 23, 128, 2000),
                                       (13, 11, 300, 400)])
def test_observed_agrees_with_cpu_kernel(emu, m, n, r, nnz, mode):
    args = random_triples(m, n, r, nnz, seed=11, biases=True, weights=True)
    got = observed(emu, args, "mean")
    cpu = torch.ops.mf_ext.observed_mf_loss_and_grads(*(args[k] for k in ORDER), "mean",
                                                      *([True] * 6))
    for name, a, b in zip(OBS_NAMES, got, cpu):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("m,n,r,nnz", [(5, 4, 2, 12), (37, 53, 3, 500), (41, 23, 128, 2000)])
def test_observed_half_precision(emu, m, n, r, nnz, dtype, mode):
    args = random_triples(m, n, r, nnz, dtype, seed=2, biases=True, weights=True)
    got = as_named(observed(emu, args, "mean"), args)
    assert all(g is None or g.dtype == dtype for g in got)
    observed_assert_close(got, args, "mean")


@pytest.mark.parametrize("layout", ["sorted by row", "sorted by column", "shuffled"])
def test_observed_runs_and_hot_rows(emu, layout, mode):
    """Long runs of one row in each group's chunk (chunks of 4 triples at this nnz), runs that
    cross batch and chunk boundaries, many triples on few rows (atomics on the same dP/dQ
    rows), and the same triples shuffled."""
    args = random_triples(3, 40, 24, 70_000, torch.float64, seed=4, biases=True, weights=True)
    if layout == "sorted by row":
        perm = torch.sort(args["rows"] * 40 + args["cols"]).indices
    elif layout == "sorted by column":
        perm = torch.sort(args["cols"] * 3 + args["rows"]).indices
    else:
        perm = torch.randperm(70_000, generator=torch.Generator().manual_seed(1))
    permuted = dict(args, rows=args["rows"][perm], cols=args["cols"][perm],
                    values=args["values"][perm], weights=args["weights"][perm])
    observed_assert_close(as_named(observed(emu, permuted, "mean"), permuted), permuted, "mean")


def test_observed_one_hot_index(emu, mode):
    """Every triple on one row (m = 1) and on one column (n = 1)."""
    for m, n in [(1, 50), (50, 1)]:
        args = random_triples(m, n, 9, 5000, torch.float32, seed=9, biases=True, weights=True)
        observed_assert_close(as_named(observed(emu, args), args), args, "sum")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_observed_duplicates(emu, reduction, mode):
    args = random_triples(6, 5, 3, 1, biases=True)
    one = observed(emu, args, "sum")
    triple = dict(args, rows=args["rows"].repeat(3), cols=args["cols"].repeat(3),
                  values=args["values"].repeat(3))
    got = observed(emu, triple, reduction)
    observed_assert_close(as_named(got, triple), triple, reduction)
    factor = 3.0 if reduction == "sum" else 1.0
    torch.testing.assert_close(got[0], one[0] * factor, rtol=1e-14, atol=0)
    torch.testing.assert_close(got[2], one[2] * factor, rtol=1e-14, atol=0)


@pytest.mark.parametrize("m,n,r", [(4, 3, 2), (0, 0, 3), (5, 2, 0)])
def test_observed_empty_and_rank_zero(emu, m, n, r, mode):
    for nnz in (0, 7) if m else (0,):
        args = random_triples(m, n, r, nnz, biases=True, weights=True)
        for reduction in ("sum", "mean"):
            got = observed(emu, args, reduction)
            observed_assert_close(as_named(got, args), args, reduction)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("m,n,r,nnz", [(5, 4, 2, 12), (67, 131, 5, 1000), (30, 20, 19, 40000)])
def test_observed_strided_inputs(emu, m, n, r, nnz, index_dtype, mode):
    """Strided vectors, transposed and sliced P, Q: bitwise the contiguous result."""
    args = random_triples(m, n, r, nnz, seed=3, biases=True, weights=True,
                          index_dtype=index_dtype)
    contiguous = observed(emu, args, "mean")
    for name, strided in observed_layouts(args):
        got = observed(emu, strided, "mean")
        for what, a, b in zip(OBS_NAMES, got, contiguous):
            assert torch.equal(a, b), f"{name}: {what}"
    observed_assert_close(as_named(contiguous, args), args, "mean")


def test_observed_grad_flags(emu, mode):
    args = random_triples(23, 17, 4, 3000, biases=True, weights=True)
    full = observed(emu, args, "mean")
    for flags in itertools.product([False, True], repeat=6):
        got = observed(emu, args, "mean", flags)
        assert torch.equal(got[0], full[0])
        for want, a, b in zip(flags, got[1:], full[1:]):
            if want:
                assert torch.equal(a, b), flags
            else:
                assert a.shape == (0,), flags


def test_observed_bitwise_repeatable(emu, mode):
    args = random_triples(50, 40, 24, 40_000, torch.float32, seed=8, biases=True, weights=True)
    a, b = observed(emu, args, "mean"), observed(emu, args, "mean")
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("which", ["rows", "cols"])
def test_observed_bad_index(emu, which, mode):
    """The first out-of-range position across chunks, with the CPU kernel's message."""
    args = random_triples(30, 20, 5, 40_000, seed=6)
    bad = args[which].clone()
    bad[33_001] = -1
    bad[39_999] = 10_000
    args[which] = bad
    cpu_error = None
    try:
        torch.ops.mf_ext.observed_mf_loss_and_grads(*(args[k] for k in ORDER), "sum",
                                                    *([True] * 3), False, False, False)
    except IndexError as e:
        cpu_error = str(e).splitlines()[0]
    assert cpu_error and "[33001] = -1" in cpu_error
    with pytest.raises(IndexError, match=re.escape(cpu_error)):
        observed(emu, args)


# ---------------------------------------------------------------------------------------------
# The same kernels under other schedules (a representative subset: the whole file under each
# would triple its time; MF_EXT_EMU_SCHEDULE=reverse or shuffled:SEED runs all of it so).

@pytest.mark.parametrize("schedule", OTHER_SCHEDULES, indirect=True)
@pytest.mark.parametrize("m,n,r,dtype", [(3, 5, 2, torch.float64), (1, 257, 5, torch.float64),
                                         (257, 1, 3, torch.float32),
                                         (130, 259, 5, torch.float64),
                                         (257, 257, 33, torch.float64),
                                         (300, 129, 17, torch.float32)], ids=str)
def test_masked_schedules(emu, m, n, r, dtype, schedule, deterministic):
    for kind, reduction in [("random", "mean"), ("empty_rows_cols", "sum")]:
        R, P, Q, _ = random_problem(m, n, r, dtype=dtype, seed=m + n + r)
        R, M = _mask_case(kind, R)
        got = masked(emu, R, P, Q, M, reduction)
        assert_close_to_reference(got, R, P, Q, M, reduction)
        if dtype == torch.float64:
            cpu = torch.ops.mf_ext.masked_mf_loss_and_grads(R, P, Q, M, reduction,
                                                            True, True, True)
            for name, a, b in zip(("loss", "dR", "dP", "dQ"), got, cpu):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"{kind} {name}")


@pytest.mark.parametrize("schedule", OTHER_SCHEDULES, indirect=True)
def test_masked_blocks_with_several_tiles_schedules(emu, schedule):
    R, P, Q, _ = random_problem(2200, 2100, 2, dtype=torch.float64, seed=1)
    got = masked(emu, R, P, Q, None, "sum")
    assert_close_to_reference(got, R, P, Q, None, "sum")


@pytest.mark.parametrize("schedule", OTHER_SCHEDULES, indirect=True)
@pytest.mark.parametrize("m,n,r,nnz", [(37, 53, 3, 500), (64, 65, 17, 3000),
                                       (200, 90, 33, 9000), (30, 20, 64, 40000),
                                       (41, 23, 128, 2000)] + OBS_WIDE)
def test_observed_schedules(emu, m, n, r, nnz, schedule, mode):
    """OBS_SHAPES' lane counts (1 to 32 lanes per triple), several batches per group (nnz
    40000), the wide-rank kernel."""
    cases = [((True, True), "mean", torch.float32)]
    if nnz < 40000:
        cases.append(((False, False), "sum", torch.float64))
    for (biases, weights), reduction, dtype in cases:
        args = random_triples(m, n, r, nnz, dtype, seed=m * n + r, biases=biases,
                              weights=weights)
        got = as_named(observed(emu, args, reduction), args)
        observed_assert_close(got, args, reduction)


@pytest.mark.parametrize("schedule", OTHER_SCHEDULES, indirect=True)
def test_observed_hot_rows_schedules(emu, schedule, mode):
    """test_observed_runs_and_hot_rows's sorted-by-row case: runs across batches and chunks."""
    args = random_triples(3, 40, 24, 70_000, torch.float64, seed=4, biases=True, weights=True)
    perm = torch.sort(args["rows"] * 40 + args["cols"]).indices
    permuted = dict(args, rows=args["rows"][perm], cols=args["cols"][perm],
                    values=args["values"][perm], weights=args["weights"][perm])
    observed_assert_close(as_named(observed(emu, permuted, "mean"), permuted), permuted, "mean")

"""The CUDA emulator itself (tests/cuda_emulation/, see its README; not a substitute for a GPU
run): it exchanges correctly, reports what a GPU would do wrong, applies its schedules, refuses
sources it cannot translate. The CUDA kernels' parity tests run on it
as the `emulated` backend (conftest.py); the end of this file runs some under other schedules.
"""

from __future__ import annotations

import pytest
import torch

from helpers import Backend, check, random_problem, random_triples, with_mask_kind

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


def test_translator_fails_loudly():
    """A source change the translator does not understand stops the build with a message
    instead of leaving something untranslated (or unregistered, so silently untested)."""
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
# Parity under the other schedules (a representative subset: all of the parity tests under each
# would triple their time; MF_EXT_EMU_SCHEDULE=reverse or shuffled:SEED runs all of them so).

@pytest.mark.parametrize("schedule", OTHER_SCHEDULES, indirect=True)
@pytest.mark.parametrize("m,n,r,dtype", [(3, 5, 2, torch.float64), (1, 257, 5, torch.float64),
                                         (257, 1, 3, torch.float32),
                                         (130, 259, 5, torch.float64),
                                         (257, 257, 33, torch.float64),
                                         (300, 129, 17, torch.float32),
                                         (2200, 2100, 2, torch.float64)], ids=str)
def test_masked_schedules(emu, m, n, r, dtype, schedule, deterministic):
    """Dense parity at several shapes, blocks owning several tiles (2200 x 2100) included."""
    cases = [("none", "sum")] if m == 2200 else [("random", "mean"), ("empty_rows_cols", "sum")]
    for kind, reduction in cases:
        args = with_mask_kind(random_problem(m, n, r, dtype, seed=m + n + r), kind)
        check(Backend("emulated", "cpu", emu), args, reduction)


@pytest.mark.parametrize("schedule", OTHER_SCHEDULES, indirect=True)
@pytest.mark.parametrize("m,n,r,nnz", [(37, 53, 3, 500), (64, 65, 17, 3000),
                                       (200, 90, 33, 9000), (30, 20, 64, 40000),
                                       (41, 23, 128, 2000), (13, 11, 300, 400),
                                       (9, 14, 700, 300), (3, 40, 24, 70_000)])
def test_observed_schedules(emu, m, n, r, nnz, schedule, mode):
    """Every lane count (1 to 32 lanes per triple), several batches per group (nnz 40000), the
    wide-rank kernel, and runs of one row across batches and chunks (sorted, 70000 triples)."""
    cases = [((True, True), "mean", torch.float32)]
    if nnz < 40000:
        cases.append(((False, False), "sum", torch.float64))
    if m == 3:
        cases = [((True, True), "mean", torch.float64)]
    for (biases, weights), reduction, dtype in cases:
        args = random_triples(m, n, r, nnz, dtype, seed=4 if m == 3 else m * n + r,
                              biases=biases, weights=weights)
        if m == 3:
            order = torch.argsort(args["rows"] * n + args["cols"])
            args = {k: v[order] if k in ("rows", "cols", "values", "weights") else v
                    for k, v in args.items()}
        check(Backend("emulated", "cpu", emu), args, reduction)

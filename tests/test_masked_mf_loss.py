"""mf_ext.masked_mf_loss on every backend (cpu, cuda, emulated cuda: conftest.py) against the
notebook's pure-PyTorch reference, then what only the CPU (threads, errors) or only a GPU
(mixed devices, factorize on CUDA) shows."""

from functools import partial

import pytest
import torch

import mf_ext
from helpers import (DTYPES, KINDS, assert_agrees_with_cpu_kernel, assert_close_to_reference,
                     assert_equal, cases, check, flat_offset, random_problem, sliced,
                     stepped, transposed, with_mask_kind)
from mf_ext import masked_mf_loss
from mf_ext.ops import _dense_partition
from mf_ext.reference import adam_reference_loop

F64, F32, F16 = torch.float64, torch.float32, torch.float16
OP = torch.ops.mf_ext.masked_mf_loss_and_grads.default
needs_cuda = pytest.mark.gpu  # skipped without one (conftest.py)

# (m, n, r): the notebook's, single entries, rank > min(m, n), rank 0, tall and wide, odd sizes
# across the CUDA kernel's 128-wide tiles and row / column groups, ranks beyond a staged chunk
# (8 float, 4 double), n % 4 == 0 (its vector loads) and not.
EMULATED_SHAPES = [(1, 1, 1), (3, 5, 2), (1, 257, 5), (257, 1, 3), (130, 3, 1), (130, 259, 5),
                   (130, 260, 5), (257, 257, 33), (300, 129, 17), (64, 70, 0)]
SHAPES = EMULATED_SHAPES + [
    (5, 4, 2), (7, 13, 1), (3, 5, 8), (37, 53, 3), (64, 65, 10), (2, 1000, 5), (1000, 3, 4),
    (130, 290, 33), (257, 300, 64), (257, 390, 40), (257, 392, 40), (30, 40, 4), (9, 70, 3),
    (45, 140, 6), (70, 150, 4), (33, 140, 3), (140, 270, 11)]
EMPTY = {"empty_rows_cols": (slice(None, None, 3), slice(1, None, 4)),
         "default_empty_rows_cols": (slice(1, None, 3), slice(None, None, 5))}


def kinds(backend, m, n, r, dtype, reduction):
    """Every kind but where it is slow: the emulator runs all but all_zero in float64, fewer in
    lower precision (and there only on a few shapes); the CPU two on its biggest shapes."""
    if backend.emulated:
        if dtype == F64:
            return KINDS[:3] + KINDS[4:]
        return ["none", "empty_rows_cols"] if reduction == "sum" else ["random"]
    return ["none", "random"] if backend.name == "cpu" and m * n * r > 300_000 else KINDS


@cases(lambda backend, m, n, r, dtype, **_: backend != "emulated" or (m, n, r) in (
    EMULATED_SHAPES if dtype == F64 else [(3, 5, 2), (130, 259, 5), (257, 257, 33),
                                          (300, 129, 17)]))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,r", SHAPES)
def test_parity(backend, m, n, r, dtype, reduction, deterministic):
    """Every kind of observed set; empty rows and columns get zero gradients."""
    problem = random_problem(m, n, r, dtype, seed=m + n + r, device=backend.device)
    for kind in kinds(backend, m, n, r, dtype, reduction):
        args = with_mask_kind(problem, kind)
        got = check(backend, args, reduction)
        assert_agrees_with_cpu_kernel(backend, got, args, reduction)
        if kind in ("all_masked", "all_zero"):
            assert got[0].item() == 0 and not any(g.any() for g in got[1:]), kind
        if kind in EMPTY and m * n > 1:
            rows, cols = EMPTY[kind]
            assert not got[2][:, rows].any() and not got[3][:, cols].any(), kind


_offset = partial(stepped, rows=1, cols=1, offset=1)  # one row and column in: unaligned


def _emu(layout_R, layout_mask):
    return lambda R, P, Q, M: (layout_R(R), transposed(P), sliced(Q), layout_mask(M))


LAYOUTS = {  # name: (R, P, Q, mask) -> the same values in other memory layouts
    "R transposed": lambda R, P, Q, M: (transposed(R), P, Q, M),
    "R and mask transposed": lambda R, P, Q, M: (transposed(R), P, Q, transposed(M)),
    "mask transposed": lambda R, P, Q, M: (R, P, Q, transposed(M)),
    "mask stepped": lambda R, P, Q, M: (R, P, Q, stepped(M)),
    "P, Q transposed": lambda R, P, Q, M: (R, transposed(P), transposed(Q), M),
    "all transposed": lambda R, P, Q, M: tuple(map(transposed, (R, P, Q, M))),
    "R stepped rows and columns": lambda R, P, Q, M: (stepped(R, 2, 3), P, Q, M),
    "R column-stepped": lambda R, P, Q, M: (stepped(R), P, Q, M),
    "R offset by one": lambda R, P, Q, M: (flat_offset(R), P, Q, M),
    "Q column-stepped": lambda R, P, Q, M: (R, P, stepped(Q), M),
    # The emulator's set: P in transposed storage and Q sliced as well.
    "emu: transposed": _emu(transposed, transposed),
    "emu: column-stepped": _emu(lambda t: stepped(t, offset=1), lambda t: stepped(t, offset=1)),
    "emu: offset": _emu(_offset, _offset),
    "emu: R stepped, mask transposed": _emu(lambda t: stepped(t, offset=1), transposed),
    "emu: rows and columns stepped": _emu(lambda t: stepped(t, 2, 3), lambda t: stepped(t, 2, 3)),
}


EMULATED_LAYOUT_SHAPES = [(5, 4, 2), (1, 257, 3), (257, 1, 3), (130, 259, 5), (257, 132, 9)]


def layout_cases(backend, layout, m, n, r, dtype, with_mask, **_):
    """The emulator's layouts on its shapes (on every backend), the others on the rest and the
    smallest; mask layouts with a mask."""
    emu_layout, emu_shape = layout.startswith("emu"), (m, n, r) in EMULATED_LAYOUT_SHAPES
    if backend == "emulated" and (not emu_layout or dtype not in (F64, F32)):
        return False
    return (with_mask or "mask" not in layout) and (
        emu_shape if emu_layout else not emu_shape or (m, n, r) == (5, 4, 2))


def factor_grad_strides(backend, X):
    """The strides grad_P / grad_Q must have: on the CPU those of an X (r, m) that is the .T of
    a contiguous table (an nn.Embedding weight's), so that autograd hands the table its gradient
    without a copy; contiguous otherwise, and always on CUDA."""
    table = not X.is_contiguous() and X.t().is_contiguous()
    return (X if backend.name == "cpu" and table else X.contiguous()).stride()


def assert_strides(t, strides):
    """t has these strides in every dimension of more than one entry."""
    assert all(a == b for a, b, size in zip(t.stride(), strides, t.shape) if size > 1), (
        t.stride(), strides)


@cases(layout_cases)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("m,n,r", [(67, 131, 5), (200, 90, 17), (132, 76, 5), (5, 4, 2),
                                   *EMULATED_LAYOUT_SHAPES[1:]])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(backend, layout, m, n, r, with_mask, dtype, deterministic):
    """Any strides: the reference's answer, grad_R in R's layout, dP and dQ contiguous or (CPU)
    in the layout of a table's .T (factor_grad_strides)."""
    args = random_problem(m, n, r, dtype, seed=7, mask=with_mask, device=backend.device)
    R, P, Q, M = LAYOUTS[layout](args["R"], args["P"], args["Q"], args["mask"])
    for reduction in ("sum", "mean"):
        got = check(backend, dict(R=R, P=P, Q=Q, mask=M), reduction)
        assert_strides(got[1], torch.empty_like(R).stride())  # grad_R in R's layout
        assert_strides(got[2], factor_grad_strides(backend, P))
        assert_strides(got[3], factor_grad_strides(backend, Q))


@cases(lambda backend, m, dtype, with_mask, **_: backend != "emulated" or (
    m != 150 and dtype == F64 and with_mask))
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("m,n,r", [(150, 90, 9), (130, 259, 5), (257, 132, 9)])
def test_grad_flags(backend, m, n, r, with_mask, dtype, deterministic):
    """Every combination of grad flags: the requested outputs bitwise as with all flags (which
    match the reference), the others empty."""
    args = random_problem(m, n, r, dtype, seed=3, mask=with_mask, device=backend.device)
    for reduction in ("sum", "mean"):
        full = backend.raw(args, reduction, (True, True, True))
        assert_close_to_reference(full, args, reduction)
        for flags in [(a, b, c) for a in (False, True) for b in (False, True) for c in (0, 1)]:
            got = backend.raw(args, reduction, flags)
            assert torch.equal(got[0], full[0])
            for want, a, b in zip(flags, got[1:], full[1:]):
                assert torch.equal(a, b) if want else a.shape == (0,), (reduction, flags)


@pytest.mark.parametrize("m,n,r", [(0, 5, 2), (5, 0, 2), (4, 0, 2), (0, 4, 2), (3, 0, 2),
                                   (0, 0, 3), (0, 0, 0), (4, 6, 0)])
def test_empty_shapes(backend, m, n, r):
    args = random_problem(m, n, r, F32, device=backend.device)
    for reduction in ("sum", "mean"):
        got = check(backend, args, reduction)
        assert got[0].item() == 0 or m * n > 0


@cases(lambda backend, m, n, r, dtype, reduction, **_: backend == "cuda" or backend == "cpu" and
       dtype == F64 or (m, n, r) == (2200, 2100, 2) and dtype == F64 and reduction == "sum")
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("m,n,r", [(2200, 2100, 2), (2200, 2100, 3), (5000, 7, 3), (3, 6000, 2)])
def test_large_grids(backend, m, n, r, dtype, reduction):
    """More than 16 tile rows and columns: the CUDA kernel's blocks own several tiles (the
    partials are written by the first tile of a range and added to by the others)."""
    check(backend, random_problem(m, n, r, dtype, seed=1, device=backend.device), reduction)


@cases(lambda backend, m, dtype, **_: backend != "emulated" or (m == 257 and dtype == F32))
@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("m,n,r", [(300, 260, 10), (2200, 2100, 8), (257, 259, 11)])
def test_bitwise_repeatable(backend, m, n, r, dtype):
    args = random_problem(m, n, r, dtype, mask=True, device=backend.device)
    first = backend.raw(args, "mean", (True, True, True))
    for _ in range(3):
        assert_equal(backend.raw(args, "mean", (True, True, True)), first)


def test_nan_inf_propagate_as_the_reference(backend):
    """The error is multiplied by the mask (not selected): NaN / Inf in R propagate even at
    unobserved entries; an Inf in P makes the loss Inf, as in the reference."""
    args = random_problem(130, 259, 5, seed=2, mask=True)
    R, M = args["R"], args["mask"]
    R[3, 7], R[100, 200], M[3, 7] = float("nan"), float("inf"), False
    P = args["P"].clone()
    P[0, 1] = float("inf")
    for case in [dict(args, mask=M), dict(args, mask=None),
                 dict(args, R=torch.ones_like(R), P=P, mask=None)]:  # R clean: only P not finite
        got = check(backend, backend.to(case))
        assert not got[0].isfinite()
    assert got[0].item() == float("inf")


@cases(lambda backend, **_: backend != "emulated")
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_gradcheck(backend, reduction, with_mask):
    args = random_problem(6, 9, 3, mask=with_mask, seed=11, device=backend.device)
    # Without a mask, nudging a zero of R changes Ω: R's gradient is checked with a mask only.
    inputs = (args["R"].requires_grad_(with_mask), args["P"].requires_grad_(),
              args["Q"].requires_grad_())
    assert torch.autograd.gradcheck(
        lambda R, P, Q: backend.masked_mf_loss(R, P, Q, args["mask"], reduction), inputs)


@cases(lambda backend, **_: backend != "emulated")  # no fake kernels for the emulated ops
@pytest.mark.parametrize("flags", [(False, False, False), (True, True, True), (False, True, False)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "R transposed"])
def test_opcheck(backend, flags, layout):
    args = random_problem(9, 70, 3, mask=True, device=backend.device)
    R, P, Q, M = args["R"], args["P"], args["Q"], args["mask"]
    if layout != "contiguous":
        R, M = transposed(R), transposed(M)
    if layout == "transposed":
        P, Q = transposed(P), transposed(Q)
    for mask in (None, M):
        for reduction in ("sum", "mean"):
            tensors = [t.clone().requires_grad_(f) for t, f in zip((R, P, Q), flags)]
            torch.library.opcheck(OP, (*tensors, mask, reduction, *flags))


# ----------------------------------------------------------------------------------- CPU only

def test_single_row_layout_does_not_change_the_result():
    """A one-row R read with a column step must run as the same row problem as a contiguous one
    (bitwise), not as an n × 1 transposed problem summed in long sequential chains: a hypothesis
    example (m=1, n=263, float32) once failed the 2x-eager rule that way."""
    args = random_problem(1, 263, 1, F32, observed=1.0, seed=11)
    flags = (False, True, True)
    contiguous = OP(args["R"], args["P"], args["Q"], None, "sum", *flags)
    strided = OP(stepped(args["R"], 1, 3), args["P"], args["Q"], None, "sum", *flags)
    assert_equal(contiguous[::2], strided[::2])  # loss and dP (dQ has no sum to reorder)


@pytest.mark.parametrize("path", ["rowwise", "tiled"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("m,n,r,R_layout", [
    (300, 290, 33, "row-major"), (257, 300, 7, "row-major"), (290, 300, 20, "column-major")])
def test_embedding_tables_on_both_paths(path, dtype, m, n, r, R_layout, monkeypatch):
    """nn.Embedding users pass P = table_P.T, Q = table_Q.T ((m, r) and (n, r) leaves): either
    path gives the reference's answer and gradients in the tables' layout, which autograd keeps
    as the tables' .grad (the same memory, not a copy). A column-major R swaps P's and Q's roles
    in the kernel."""
    monkeypatch.setenv("MF_EXT_DENSE_PATH", path)
    args = random_problem(m, n, r, dtype, seed=m + r, mask=True)
    R = args["R"] if R_layout == "row-major" else transposed(args["R"])
    tables = [args[k].t().contiguous().requires_grad_() for k in "PQ"]
    P, Q = (table.t() for table in tables)
    assert _dense_partition(R, P, Q)["path"] == path
    received = {}  # the op's gradients of P and Q, as autograd passes them on to the tables
    for name, view in (("P", P), ("Q", Q)):
        view.register_hook(lambda g, name=name: received.update({name: (g.data_ptr(),
                                                                        g.stride())}))
    for reduction in ("sum", "mean"):
        for table in tables:
            table.grad = None
        loss = masked_mf_loss(R, P, Q, args["mask"], reduction)
        loss.backward()
        assert_close_to_reference([loss.detach(), None, tables[0].grad.t(), tables[1].grad.t()],
                                  dict(args, R=R), reduction, wanted=("P", "Q"))
        assert received["P"][1] == P.stride() and received["Q"][1] == Q.stride()
        assert tables[0].grad.data_ptr() == received["P"][0], "P's table got a copy"
        assert tables[1].grad.data_ptr() == received["Q"][0], "Q's table got a copy"


def test_no_grad_computes_no_gradients():
    args = random_problem(20, 30, 3)
    loss = OP(args["R"], args["P"], args["Q"], None, "sum", False, False, True)[0]
    with torch.no_grad():
        nograd = masked_mf_loss(args["R"], args["P"].requires_grad_(), args["Q"].requires_grad_())
    assert nograd.item() == loss.item() and not nograd.requires_grad


def test_double_backward_is_refused():
    args = random_problem(4, 5, 2)
    P = args["P"].requires_grad_()
    (g,) = torch.autograd.grad(masked_mf_loss(args["R"], P, args["Q"]), (P,), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|differentiable"):
        g.sum().backward()


def test_raw_op_with_missing_grad_flag_refuses_backward():
    args = random_problem(4, 5, 2)
    loss = OP(args["R"], args["P"].requires_grad_(), args["Q"], None, "sum", False, False, False)[0]
    with pytest.raises(RuntimeError, match="P requires grad but the op was called with grad_P=False"):
        loss.backward()


# ---------------------------------------------------------------------------------- CUDA only

@needs_cuda
def test_factorize_on_cuda_matches_cpu():
    R = random_problem(23, 31, 3, observed=0.6)["R"]
    cpu = mf_ext.factorize(R, rank=3, steps=60, seed=4)
    gpu = mf_ext.factorize(R, rank=3, steps=60, seed=4, device="cuda")
    assert gpu.P.device.type == "cuda"
    torch.testing.assert_close(torch.tensor(gpu.losses), torch.tensor(cpu.losses), rtol=1e-9,
                               atol=1e-9)
    torch.testing.assert_close(gpu.P.cpu(), cpu.P, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(gpu.Q.cpu(), cpu.Q, rtol=1e-8, atol=1e-8)
    gen = torch.Generator().manual_seed(4)
    P0 = torch.rand(3, 23, generator=gen, dtype=torch.float64)
    Q0 = torch.rand(3, 31, generator=gen, dtype=torch.float64)
    _, _, losses = adam_reference_loop(R, P0, Q0, steps=60)
    torch.testing.assert_close(torch.tensor(gpu.losses), torch.tensor(losses), rtol=1e-8,
                               atol=1e-8)


@needs_cuda
@pytest.mark.parametrize("which", ["R", "P", "Q", "mask"])
def test_mixed_devices_error(which):
    args = random_problem(6, 7, 2, torch.float32, mask=True, device="cuda")
    args[which] = args[which].cpu()
    match = "mask is on" if which == "mask" else "must be on the same device"
    with pytest.raises(ValueError, match=f"mf_ext.masked_mf_loss: .*{match}"):
        torch.ops.mf_ext.masked_mf_loss_and_grads(*args.values(), "sum", True, True, True)
    with pytest.raises(ValueError, match="mf_ext.masked_mf_loss:"):
        mf_ext.masked_mf_loss(args["R"], args["P"].requires_grad_(True), args["Q"], args["mask"])

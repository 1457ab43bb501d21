"""The CUDA kernel of mf_ext::observed_mf_loss_and_grads against the float64 reference.

Numeric rule (as tests/test_observed_mf_loss.py, after flash-attention): float64 must match the
reference tightly; in float32 / float16 / bfloat16 the kernel's largest error against the float64
reference must be within 2x the error of the eager reference run in that dtype on the GPU, plus
a floor of a few ulps. Every test skips without a GPU.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import mf_ext
from mf_ext import observed_mf_loss
from test_observed_mf_loss import (ERRORS, FLOAT_ARGS, NAMES, assert_close_to_reference,
                                   loss_and_grads, random_triples)

# Every test is collected and skipped without a GPU (a module-level skip would leave pytest with
# nothing collected, exit status 5, when this is the only test file selected).
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

OP = torch.ops.mf_ext.observed_mf_loss_and_grads.default
CUDA = torch.device("cuda")
ORDER = ("rows", "cols", "values", "P", "Q", "row_bias", "col_bias", "weights")


def cuda_triples(*args, **kwargs):
    """random_triples (made on the CPU, so the same seed gives the same problem), on the GPU."""
    return {k: (v.to(CUDA) if v is not None else None)
            for k, v in random_triples(*args, **kwargs).items()}


def to_device(args, device):
    return {k: (v.to(device) if v is not None else None) for k, v in args.items()}


# (m, n, r, nnz): lanes per triple and vectors per lane follow r (csrc/cuda/observed_mf_loss.cu,
# plan_lanes): r 1..8 one lane, 17 four lanes, 64 sixteen (float32), 128 thirty-two (float64);
# 200 (float64) / 300 (float32) four vectors per lane; 600, 700, 1100 the wide-rank kernel
# (float64 from r > 256, float32 from r > 512). nnz ≥ 32768 gives chunks of several triples
# per group.
SHAPES = [
    (1, 1, 1, 1), (5, 4, 2, 12), (7, 13, 1, 50), (3, 5, 8, 20), (37, 53, 3, 500),
    (64, 65, 17, 3000), (200, 90, 33, 9000), (30, 20, 64, 40000), (41, 23, 128, 2000),
]
WIDE_SHAPES = [(13, 11, 300, 400), (10, 9, 200, 300), (9, 14, 700, 300), (8, 10, 1100, 200),
               (12, 7, 600, 150)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("biases,weights", [(False, False), (True, False), (False, True),
                                            (True, True)])
@pytest.mark.parametrize("m,n,r,nnz", SHAPES)
def test_parity(m, n, r, nnz, biases, weights, reduction, dtype):
    args = cuda_triples(m, n, r, nnz, dtype, seed=m * n + r, biases=biases, weights=weights)
    got = loss_and_grads(observed_mf_loss, args, reduction)
    assert all(g is None or g.device.type == CUDA.type for g in got)
    assert_close_to_reference(got, args, reduction)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("m,n,r,nnz", WIDE_SHAPES)
def test_parity_large_ranks(m, n, r, nnz, dtype):
    args = cuda_triples(m, n, r, nnz, dtype, seed=r, biases=True, weights=True)
    assert_close_to_reference(loss_and_grads(observed_mf_loss, args, "mean"), args, "mean")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,n,r,nnz", [(5, 4, 2, 12), (37, 53, 3, 500), (41, 23, 128, 2000)])
def test_parity_half_precision(m, n, r, nnz, dtype):
    args = cuda_triples(m, n, r, nnz, dtype, seed=2, biases=True, weights=True)
    assert_close_to_reference(loss_and_grads(observed_mf_loss, args, "mean"), args, "mean")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["sorted by row", "sorted by column", "shuffled"])
def test_runs_of_rows(layout, dtype):
    """Long runs of one row inside each group's chunk (gradients summed in registers across the
    run) and the same triples shuffled give the reference's answer."""
    args = cuda_triples(50, 40, 24, 200_000, dtype, seed=4, biases=True, weights=True)
    if layout == "sorted by row":
        perm = torch.sort(args["rows"] * 40 + args["cols"]).indices
    elif layout == "sorted by column":
        perm = torch.sort(args["cols"] * 50 + args["rows"]).indices
    else:
        perm = torch.randperm(200_000, generator=torch.Generator().manual_seed(1)).to(CUDA)
    permuted = dict(args, rows=args["rows"][perm], cols=args["cols"][perm],
                    values=args["values"][perm], weights=args["weights"][perm])
    assert_close_to_reference(loss_and_grads(observed_mf_loss, permuted, "mean"), permuted,
                              "mean")


@pytest.mark.parametrize("rows_dtype,cols_dtype", [(torch.int32, torch.int32),
                                                   (torch.int32, torch.int64),
                                                   (torch.int64, torch.int32)])
def test_int32_indices(rows_dtype, cols_dtype, deterministic):
    args = cuda_triples(41, 29, 6, 700, biases=True, weights=True)
    got64 = loss_and_grads(observed_mf_loss, args)
    args32 = dict(args, rows=args["rows"].to(rows_dtype), cols=args["cols"].to(cols_dtype))
    got32 = loss_and_grads(observed_mf_loss, args32)
    for name, a, b in zip(NAMES, got64, got32):
        assert torch.equal(a, b), name
    assert_close_to_reference(got32, args32, "sum")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_duplicates_count_once_per_occurrence(reduction):
    args = cuda_triples(6, 5, 3, 1, biases=True)
    one = loss_and_grads(observed_mf_loss, args, "sum")
    triple = dict(args, rows=args["rows"].repeat(3), cols=args["cols"].repeat(3),
                  values=args["values"].repeat(3))
    got = loss_and_grads(observed_mf_loss, triple, reduction)
    assert_close_to_reference(got, triple, reduction)
    factor = 3.0 if reduction == "sum" else 1.0
    torch.testing.assert_close(got[0], one[0] * factor, rtol=1e-14, atol=0)
    torch.testing.assert_close(got[2], one[2] * factor, rtol=1e-14, atol=0)


def test_heavy_duplicates():
    """Thousands of copies of a few triples: many atomics on the same rows of dP and dQ."""
    args = cuda_triples(3, 2, 40, 50_000, biases=True, weights=True)
    assert_close_to_reference(loss_and_grads(observed_mf_loss, args, "sum"), args, "sum")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("m,n,r", [(4, 3, 2), (0, 0, 3), (5, 2, 0)])
def test_empty(m, n, r, reduction):
    args = cuda_triples(m, n, r, 0, biases=True, weights=True)
    got = loss_and_grads(observed_mf_loss, args, reduction)
    assert got[0].item() == 0.0
    for name, g, t in zip(NAMES[1:], got[1:], (args[k] for k in FLOAT_ARGS)):
        assert g.shape == t.shape and g.device.type == CUDA.type and not g.any(), name
    assert_close_to_reference(got, args, reduction)


def test_rank_zero():
    args = cuda_triples(6, 7, 0, 30, biases=True)
    got = loss_and_grads(observed_mf_loss, args)
    assert got[2].shape == (0, 6) and got[3].shape == (0, 7)
    assert_close_to_reference(got, args, "sum")


def _layouts(args):
    """The same values in other memory layouts, made on the GPU."""
    def spread(t, step=3):
        wide = torch.zeros(t.shape[0] * step, dtype=t.dtype, device=t.device)
        wide[::step] = t
        return wide[::step]

    yield "P, Q transposed", dict(args, P=args["P"].t().contiguous().t(),
                                  Q=args["Q"].t().contiguous().t())
    yield "P, Q sliced", dict(args, P=torch.cat([args["P"], args["P"]], 1)[:, : args["P"].shape[1]],
                              Q=torch.cat([args["Q"], args["Q"]], 0)[: args["Q"].shape[0]])
    yield "P, Q column-strided", dict(args, P=torch.stack([args["P"], args["P"]], 2)[:, :, 0],
                                      Q=torch.stack([args["Q"], args["Q"]], 2)[:, :, 1])
    yield "vectors strided", {k: (spread(v) if v is not None and v.dim() == 1 else v)
                              for k, v in args.items()}
    yield "all", {k: (spread(v, 2) if v is not None and v.dim() == 1 else
                      v.t().contiguous().t() if v is not None else None)
                  for k, v in args.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("m,n,r,nnz", [(5, 4, 2, 12), (67, 131, 5, 1000), (30, 20, 19, 40000)])
def test_parity_strided_inputs(m, n, r, nnz, index_dtype, dtype, deterministic):
    """Deterministic mode, so that every layout must give bitwise the same result."""
    args = cuda_triples(m, n, r, nnz, dtype, seed=3, biases=True, weights=True,
                        index_dtype=index_dtype)
    contiguous = loss_and_grads(observed_mf_loss, args, "mean")
    for name, strided in _layouts(args):
        assert not all(v.is_contiguous() for v in strided.values() if v is not None), name
        got = loss_and_grads(observed_mf_loss, strided, "mean")
        for what, a, b in zip(NAMES, got, contiguous):
            assert torch.equal(a, b), f"{name}: {what}"
    assert_close_to_reference(contiguous, args, "mean")


@pytest.mark.parametrize("grad", [(), ("P",), ("Q",), ("P", "Q"), ("row_bias", "weights"),
                                  ("values", "col_bias")])
@pytest.mark.parametrize("determinism", [False, True])
def test_only_requested_gradients(grad, determinism):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(determinism)
    try:
        args = cuda_triples(23, 17, 4, 300, biases=True, weights=True)
        got = loss_and_grads(observed_mf_loss, args, "sum", grad)
        assert_close_to_reference(got, args, "sum", grad)
        flags = [k in grad for k in FLOAT_ARGS]
        out = OP(*[args[k] for k in ORDER], "sum", *flags)
        for name, flag, g in zip(NAMES[1:], flags, out[1:]):
            assert flag or g.shape == (0,), name
        # the loss does not depend on which gradients are computed
        assert torch.equal(out[0], OP(*[args[k] for k in ORDER], "sum", *([False] * 6))[0])
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("m,n,r,nnz,dtype", [
    (30, 20, 64, 40000, torch.float64), (30, 20, 64, 40000, torch.float32),
    (301, 97, 13, 70001, torch.float32), (301, 97, 13, 70001, torch.float16),
    (8, 10, 1100, 3000, torch.float32),  # the wide-rank kernel
])
def test_deterministic_mode_is_bitwise_repeatable(m, n, r, nnz, dtype, deterministic):
    args = cuda_triples(m, n, r, nnz, dtype, biases=True, weights=True)
    runs = [loss_and_grads(observed_mf_loss, args, "mean") for _ in range(3)]
    for run in runs[1:]:
        for name, a, b in zip(NAMES, runs[0], run):
            assert torch.equal(a, b), name
    assert_close_to_reference(runs[0], args, "mean")


def test_deterministic_and_atomic_paths_agree():
    args = cuda_triples(301, 97, 13, 70001, torch.float64, biases=True, weights=True)
    atomic = loss_and_grads(observed_mf_loss, args, "mean")
    torch.use_deterministic_algorithms(True)
    try:
        ordered = loss_and_grads(observed_mf_loss, args, "mean")
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(atomic[0], ordered[0])  # the loss is reduced in a fixed order in both
    for name, a, b in zip(NAMES, atomic, ordered):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)


def test_loss_is_bitwise_repeatable_with_atomics():
    args = cuda_triples(30, 20, 64, 40000, torch.float32, biases=True)
    losses = [OP(*[args[k] for k in ORDER], "sum", *([True] * 5), False)[0] for _ in range(3)]
    assert all(torch.equal(losses[0], x) for x in losses[1:])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cpu_and_cuda_agree(dtype):
    args = random_triples(140, 270, 11, 20000, dtype, seed=8, biases=True, weights=True)
    for reduction in ("sum", "mean"):
        cpu = loss_and_grads(observed_mf_loss, args, reduction)
        gpu = loss_and_grads(observed_mf_loss, to_device(args, CUDA), reduction)
        rtol = 1e-10 if dtype == torch.float64 else 1e-4
        for name, a, b in zip(NAMES, cpu, gpu):  # sums in other orders: atol from the scale
            atol = rtol * (a.abs().max().item() if a.numel() else 0.0) + 1e-12
            torch.testing.assert_close(b.cpu(), a, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
def test_gradcheck(reduction, index_dtype):
    args = cuda_triples(5, 4, 3, 17, biases=True, weights=True, index_dtype=index_dtype)
    rows, cols = args["rows"], args["cols"]
    inputs = tuple(args[k].clone().requires_grad_() for k in FLOAT_ARGS)

    def f(values, P, Q, row_bias, col_bias, weights):
        return observed_mf_loss(rows, cols, values, P, Q, row_bias, col_bias, weights, reduction)

    # Atomics may add in another order from one backward to the next: allow last-bit changes.
    assert torch.autograd.gradcheck(f, inputs, nondet_tol=1e-12)


def _opcheck_samples():
    a = cuda_triples(7, 5, 3, 30, biases=True, weights=True)
    b = cuda_triples(9, 11, 4, 25, torch.float32, index_dtype=torch.int32)
    c = cuda_triples(4, 3, 2, 0, biases=True)
    d = cuda_triples(30, 20, 5, 40000, weights=True)
    for args, reduction, grad in ((a, "sum", FLOAT_ARGS), (a, "mean", ("P", "col_bias")),
                                  (b, "sum", ("P", "Q")), (c, "mean", ("P", "row_bias")),
                                  (d, "sum", ("P", "Q", "weights")), (a, "sum", ())):
        tensors = [args[k].clone().requires_grad_(k in grad) if k in FLOAT_ARGS and args[k]
                   is not None else args[k] for k in ORDER]
        flags = [k in grad and args[k] is not None for k in FLOAT_ARGS]
        yield (*tensors, reduction, *flags)


@pytest.mark.parametrize("index", range(6))
def test_opcheck(index):
    torch.library.opcheck(OP, list(_opcheck_samples())[index])


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_torch_compile_fullgraph(mode):
    """Inductor, and CUDA graphs ("reduce-overhead": the op runs under stream capture, where it
    skips its host-side index check)."""
    torch._dynamo.reset()
    args = cuda_triples(33, 21, 5, 600, torch.float32, biases=True, weights=True)

    @torch.compile(fullgraph=True, mode=mode)
    def step(rows, cols, values, P, Q, row_bias, col_bias, weights):
        return observed_mf_loss(rows, cols, values, P, Q, row_bias, col_bias, weights,
                                "mean") * 2

    want = loss_and_grads(lambda reduction, **a: observed_mf_loss(**a, reduction=reduction) * 2,
                          args, "mean")
    for _ in range(3):  # reduce-overhead records a CUDA graph on a later call, then replays it
        got = loss_and_grads(lambda reduction, **a: step(**a), args)
        for name, a, b in zip(NAMES, got, want):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------ errors

def _good(**overrides):
    args = cuda_triples(5, 4, 3, 6, biases=True, weights=True)
    args.update({k: v.to(CUDA) for k, v in overrides.items()})
    return args


@pytest.mark.parametrize("overrides,exc,match", ERRORS)
def test_error_messages(overrides, exc, match):
    """The CPU kernel's messages, index errors included (position, value and range)."""
    with pytest.raises(exc, match=match):
        observed_mf_loss(**_good(**overrides))


@pytest.mark.parametrize("determinism", [False, True])
def test_index_error_reports_the_first_bad_position(determinism):
    args = cuda_triples(30, 20, 4, 40000, biases=True)
    args["rows"][35000] = 99
    args["cols"][20001] = 20
    args["rows"][30000] = -3
    args["cols"][30000] = -5  # the row is reported first at one position, as on the CPU
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(determinism)
    try:
        with pytest.raises(IndexError, match=re.escape("cols[20001] = 20 is out of range: "
                                                       "cols must lie in [0, 20)")):
            loss_and_grads(observed_mf_loss, args)
        args["cols"][20001] = 3
        with pytest.raises(IndexError, match=re.escape("rows[30000] = -3 is out of range: "
                                                       "rows must lie in [0, 30)")):
            loss_and_grads(observed_mf_loss, args)
    finally:
        torch.use_deterministic_algorithms(before)
    # The error is raised on the host, not by a device assert: the GPU is still usable.
    good = cuda_triples(30, 20, 4, 400)
    assert_close_to_reference(loss_and_grads(observed_mf_loss, good), good, "sum")


def test_index_error_with_no_rows():
    args = cuda_triples(0, 3, 2, 2)
    with pytest.raises(IndexError, match=re.escape("rows[0] = 0 is out of range: rows must lie "
                                                   "in [0, 0)")):
        observed_mf_loss(**args)


@pytest.mark.parametrize("which", ORDER)
def test_mixed_devices_error(which):
    args = _good()
    args[which] = args[which].cpu()
    if which in ("row_bias", "col_bias", "weights"):
        match = rf"mf_ext.observed_mf_loss: {which} is on cpu but values is on cuda"
    elif which == "values":
        match = r"mf_ext.observed_mf_loss: .*(must be on the same device|is on cuda)"
    else:
        match = r"mf_ext.observed_mf_loss: rows, cols, values, P and Q must be on the same device"
    with pytest.raises(ValueError, match=match):
        observed_mf_loss(**args)
    args = {k: (v.requires_grad_() if k in FLOAT_ARGS and v is not None else v)
            for k, v in args.items()}
    with pytest.raises(ValueError, match="mf_ext.observed_mf_loss:"):
        observed_mf_loss(**args)


@pytest.mark.parametrize("index,name", [(12, "row_bias"), (13, "col_bias"), (14, "weights")])
def test_grad_flag_without_input(index, name):
    args = cuda_triples(5, 4, 3, 6)
    flags = [False] * 6
    flags[index - 9] = True
    with pytest.raises(ValueError, match=rf"mf_ext.observed_mf_loss: grad_{name}=True but "
                                         rf"{name} is None"):
        OP(*[args[k] for k in ORDER], "sum", *flags)


# ------------------------------------------------------------------------------------- model

def test_matrix_factorization_fits_on_cuda():
    """The recommender on the GPU: fits a small synthetic low-rank set, and follows the CPU
    fit's trajectory (float64, so the kernels' different summation orders stay invisible)."""
    rng = np.random.default_rng(0)
    users, items, rank = 80, 60, 3
    U, V = rng.normal(size=(users, rank)), rng.normal(size=(items, rank))
    u = rng.integers(0, users, 3000)
    i = rng.integers(0, items, 3000)
    ratings = 3 + (U[u] * V[i]).sum(1) + 0.05 * rng.normal(size=3000)
    fits = {}
    for device in ("cpu", "cuda"):
        model = mf_ext.MatrixFactorization(rank=rank, epochs=150, lr=0.05, reg=0.0, bias_reg=0.0,
                                           init_std=0.1, device=device, dtype=torch.float64)
        fits[device] = model.fit(u, i, ratings)
    gpu, cpu = fits["cuda"], fits["cpu"]
    assert gpu.P.device.type == "cuda" and gpu.user_bias.device.type == "cuda"
    first, last = gpu.history[0].train_rmse, gpu.history[-1].train_rmse
    assert last < 0.25 * first, (first, last)
    assert gpu.evaluate(u, i, ratings)["rmse"] < 0.5
    np.testing.assert_allclose([h.train_rmse for h in gpu.history],
                               [h.train_rmse for h in cpu.history], rtol=1e-6)
    np.testing.assert_allclose(gpu.predict(u[:50], i[:50]), cpu.predict(u[:50], i[:50]),
                               rtol=1e-6, atol=1e-8)

"""mf_ext.observed_mf_loss on the CPU against the pure-PyTorch reference."""

from __future__ import annotations

import re

import pytest
import torch

import mf_ext
from mf_ext import observed_mf_loss, observed_mf_loss_reference

OP = torch.ops.mf_ext.observed_mf_loss_and_grads.default
NAMES = ("loss", "d_values", "dP", "dQ", "d_row_bias", "d_col_bias", "d_weights")


@pytest.fixture(autouse=True)
def _restore_threads():
    """Tests that change torch's thread count must not leak it into the others."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def random_triples(m, n, r, nnz, dtype=torch.float64, seed=0, biases=False, weights=False,
                   index_dtype=torch.int64):
    """A dict of op arguments: nnz uniformly random (row, col) pairs (so with duplicates when
    nnz is large, in no particular order), values in [1, 5), P (r, m), Q (r, n), optional
    biases and positive weights."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, max(m, 1), (nnz,), generator=g).to(index_dtype)
    cols = torch.randint(0, max(n, 1), (nnz,), generator=g).to(index_dtype)
    values = torch.rand(nnz, generator=g, dtype=torch.float64) * 4 + 1
    P = torch.rand(r, m, generator=g, dtype=torch.float64)
    Q = torch.rand(r, n, generator=g, dtype=torch.float64)
    row_bias = torch.randn(m, generator=g, dtype=torch.float64) if biases else None
    col_bias = torch.randn(n, generator=g, dtype=torch.float64) if biases else None
    w = torch.rand(nnz, generator=g, dtype=torch.float64) + 0.5 if weights else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return dict(rows=rows, cols=cols, values=cast(values), P=cast(P), Q=cast(Q),
                row_bias=cast(row_bias), col_bias=cast(col_bias), weights=cast(w))


FLOAT_ARGS = ("values", "P", "Q", "row_bias", "col_bias", "weights")


def loss_and_grads(fn, args, reduction="sum", grad=FLOAT_ARGS):
    """fn's loss and its gradients w.r.t. the float inputs named in `grad` (None for the
    others and for missing optional inputs), in the order of NAMES."""
    args = {k: (v.detach().requires_grad_(k in grad) if k in FLOAT_ARGS and v is not None
                else v) for k, v in args.items()}
    loss = fn(**args, reduction=reduction)
    wanted = [args[k] for k in FLOAT_ARGS if args[k] is not None and args[k].requires_grad]
    grads = iter(torch.autograd.grad(loss, wanted) if wanted else ())
    out = [loss.detach()]
    for k in FLOAT_ARGS:
        out.append(next(grads) if args[k] is not None and args[k].requires_grad else None)
    return out


def to_double(args):
    return {k: (v.double() if k in FLOAT_ARGS and v is not None else v) for k, v in args.items()}


def magnitudes(args):
    """float64 arguments under which every term of every sum in the loss and its gradients
    enters with its magnitude (values negated, the rest absolute): the reference then returns,
    per output, the sum of |terms|, the scale that float rounding errors grow with."""
    out = {k: (v.double().abs() if k in FLOAT_ARGS and v is not None else v)
           for k, v in args.items()}
    out["values"] = -out["values"]
    return out


def assert_close_to_reference(got, args, reduction, grad=FLOAT_ARGS):
    """float64: tight. float32: the error against the float64 reference must be within 2x of the
    eager reference's own float32 error (flash-attention's rule), plus a floor for outputs where
    the eager error happens to be ~0: 8 ulps of the output's scale and one eps of the scale of
    its terms (sums that cancel, such as thousands of copies of one triple, keep an error of
    that size from the rounding of each term, however they are summed)."""
    dtype = args["values"].dtype
    exact = loss_and_grads(observed_mf_loss_reference, to_double(args), reduction, grad)
    if dtype == torch.float64:
        for name, a, b in zip(NAMES, got, exact):
            assert (a is None) == (b is None), name
            if b is None:
                continue
            scale = b.abs().max().item() if b.numel() else 0.0
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * (1 + scale),
                                       msg=lambda s, name=name: f"{name}: {s}")
        return
    eager = loss_and_grads(observed_mf_loss_reference, args, reduction, grad)
    scale = loss_and_grads(observed_mf_loss_reference, magnitudes(args), reduction, grad)
    eps = torch.finfo(dtype).eps
    for name, a, e, b, s in zip(NAMES, got, eager, exact, scale):
        assert (a is None) == (b is None), name
        if b is None:
            continue
        assert a.dtype == dtype and a.shape == b.shape, name
        err_kernel = (a.double() - b).abs().max().item() if b.numel() else 0.0
        err_eager = (e.double() - b).abs().max().item() if b.numel() else 0.0
        floor = (eps * (8 * (1 + b.abs().max().item()) + s.abs().max().item())
                 if b.numel() else 0.0)
        assert err_kernel <= 2 * err_eager + floor, (
            f"{name}: kernel error {err_kernel:.3g} > 2 x eager error {err_eager:.3g} + {floor:.3g}")


SHAPES = [  # (m, n, r, nnz)
    (1, 1, 1, 1), (5, 4, 2, 12), (7, 13, 1, 50), (3, 5, 8, 20),  # rank > min(m, n)
    (37, 53, 3, 500), (64, 65, 17, 3000), (200, 90, 33, 9000),  # 2 chunks
    (30, 20, 64, 40000),  # 8 chunks, many duplicates
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("biases,weights", [(False, False), (True, False), (False, True),
                                            (True, True)])
@pytest.mark.parametrize("m,n,r,nnz", SHAPES)
def test_parity(m, n, r, nnz, biases, weights, reduction, dtype):
    args = random_triples(m, n, r, nnz, dtype, seed=m * n + r, biases=biases, weights=weights)
    got = loss_and_grads(observed_mf_loss, args, reduction)
    assert_close_to_reference(got, args, reduction)


# Ranks past 8 vectors (64 float64 / 128 float32 values) keep the factor rows on the heap, not
# in registers. Many ranks, so many allocation sizes and alignments: a heap block only 16-byte
# aligned once crashed the AVX2 / AVX-512 code (aligned vector moves) on some of them.
@pytest.mark.parametrize("dtype,ranks", [(torch.float64, range(65, 140, 3)),
                                         (torch.float32, range(129, 270, 5))])
def test_wide_ranks(dtype, ranks):
    for r in ranks:
        args = random_triples(7, 6, r, 40, dtype, seed=r, biases=True)
        got = loss_and_grads(observed_mf_loss, args, "mean")
        assert_close_to_reference(got, args, "mean")


@pytest.mark.parametrize("rows_dtype,cols_dtype", [(torch.int32, torch.int32),
                                                   (torch.int32, torch.int64),
                                                   (torch.int64, torch.int32)])
def test_int32_indices(rows_dtype, cols_dtype):
    args = random_triples(41, 29, 6, 700, biases=True, weights=True)
    got64 = loss_and_grads(observed_mf_loss, args)
    args32 = dict(args, rows=args["rows"].to(rows_dtype), cols=args["cols"].to(cols_dtype))
    got32 = loss_and_grads(observed_mf_loss, args32)
    for name, a, b in zip(NAMES, got64, got32):
        assert torch.equal(a, b), name
    assert_close_to_reference(got32, args32, "sum")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_duplicates_count_once_per_occurrence(reduction):
    args = random_triples(6, 5, 3, 1, biases=True)
    one = loss_and_grads(observed_mf_loss, args, "sum")
    triple = dict(args, rows=args["rows"].repeat(3), cols=args["cols"].repeat(3),
                  values=args["values"].repeat(3))
    got = loss_and_grads(observed_mf_loss, triple, reduction)
    assert_close_to_reference(got, triple, reduction)
    factor = 3.0 if reduction == "sum" else 1.0
    torch.testing.assert_close(got[0], one[0] * factor, rtol=1e-14, atol=0)
    torch.testing.assert_close(got[2], one[2] * factor, rtol=1e-14, atol=0)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("r", [1, 17])
@pytest.mark.parametrize("m,n", [(1, 2), (2, 1), (1, 1), (3, 300)])
def test_float32_many_triples_on_one_index(m, n, r, reduction):
    """Tens of thousands of triples share one row (or column): each float32 gradient entry is a
    sum of that many terms, whichever side the kernel keeps in registers. Every output must be
    within 2 eps of the sum of its terms' magnitudes, as if each term were rounded twice and
    then summed exactly; a float chain along the index misses that by 3-12x here. (A hypothesis
    example like this, m=1 n=2, once broke the 2x-eager rule for dP; the eager rule alone does
    not pin it down, as eager's own float32 error here changes from run to run.)"""
    args = random_triples(m, n, r, 40000, torch.float32, seed=m + n + r, biases=True)
    got = loss_and_grads(observed_mf_loss, args, reduction)
    assert_close_to_reference(got, args, reduction)
    exact = loss_and_grads(observed_mf_loss_reference, to_double(args), reduction)
    scale = loss_and_grads(observed_mf_loss_reference, magnitudes(args), reduction)
    eps = torch.finfo(torch.float32).eps
    for name, a, b, s in zip(NAMES, got, exact, scale):
        if b is not None:
            err = (a.double() - b).abs().max().item()
            assert err <= 2 * eps * s.abs().max().item(), f"{name}: error {err:.3g}"


def test_unsorted_order_does_not_matter():
    args = random_triples(50, 40, 7, 20000, biases=True, weights=True)
    order = torch.sort(args["rows"] * 40 + args["cols"]).indices
    shuffled = torch.randperm(len(order), generator=torch.Generator().manual_seed(1))
    results = []
    for perm in (order, shuffled):
        permuted = dict(args, rows=args["rows"][perm], cols=args["cols"][perm],
                        values=args["values"][perm], weights=args["weights"][perm])
        got = loss_and_grads(observed_mf_loss, permuted)
        assert_close_to_reference(got, permuted, "sum")
        results.append(got)
    for name, a, b in zip(NAMES, *results):
        if name in ("d_values", "d_weights"):
            continue  # per-triple, so permuted
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("m,n,r", [(4, 3, 2), (0, 0, 3), (5, 2, 0)])
def test_empty(m, n, r, reduction):
    args = random_triples(m, n, r, 0, biases=True, weights=True)
    got = loss_and_grads(observed_mf_loss, args, reduction)
    assert got[0].item() == 0.0
    for name, g, t in zip(NAMES[1:], got[1:], (args[k] for k in FLOAT_ARGS)):
        assert g.shape == t.shape and not g.any(), name
    assert_close_to_reference(got, args, reduction)


def test_rank_zero():
    args = random_triples(6, 7, 0, 30, biases=True)
    got = loss_and_grads(observed_mf_loss, args)
    assert got[2].shape == (0, 6) and got[3].shape == (0, 7)
    assert_close_to_reference(got, args, "sum")


def _layouts(args):
    """The same values in other memory layouts."""
    def spread(t, step=3):
        wide = torch.zeros(t.shape[0] * step, dtype=t.dtype)
        wide[::step] = t
        return wide[::step]

    yield "P, Q transposed", dict(args, P=args["P"].t().contiguous().t(),
                                  Q=args["Q"].t().contiguous().t())
    yield "P, Q sliced", dict(args, P=torch.cat([args["P"], args["P"]], 1)[:, : args["P"].shape[1]],
                              Q=torch.cat([args["Q"], args["Q"]], 0)[: args["Q"].shape[0]])
    yield "vectors strided", {k: (spread(v) if v is not None and v.dim() == 1 else v)
                              for k, v in args.items()}
    yield "all", {k: (spread(v, 2) if v is not None and v.dim() == 1 else
                      v.t().contiguous().t() if v is not None else None)
                  for k, v in args.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("m,n,r,nnz", [(5, 4, 2, 12), (67, 131, 5, 1000), (30, 20, 19, 40000)])
def test_parity_strided_inputs(m, n, r, nnz, index_dtype, dtype):
    args = random_triples(m, n, r, nnz, dtype, seed=3, biases=True, weights=True,
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
def test_only_requested_gradients(grad):
    args = random_triples(23, 17, 4, 300, biases=True, weights=True)
    got = loss_and_grads(observed_mf_loss, args, "sum", grad)
    assert_close_to_reference(got, args, "sum", grad)
    flags = [k in grad for k in FLOAT_ARGS]
    out = OP(*[args[k] for k in ("rows", "cols", "values", "P", "Q", "row_bias", "col_bias",
                                 "weights")], "sum", *flags)
    for name, flag, g in zip(NAMES[1:], flags, out[1:]):
        assert flag or g.shape == (0,), name
    # the loss does not depend on which gradients are computed
    assert torch.equal(out[0], OP(*[args[k] for k in ("rows", "cols", "values", "P", "Q",
                                                       "row_bias", "col_bias", "weights")],
                                  "sum", *([False] * 6))[0])


def test_no_grad_computes_no_gradients():
    args = random_triples(9, 8, 3, 40, biases=True)
    args = {k: (v.requires_grad_() if k in FLOAT_ARGS and v is not None else v)
            for k, v in args.items()}
    with torch.no_grad():
        loss = observed_mf_loss(**args)
    assert not loss.requires_grad


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_gradcheck(reduction, index_dtype):
    args = random_triples(5, 4, 3, 17, biases=True, weights=True, index_dtype=index_dtype)
    rows, cols = args["rows"], args["cols"]
    inputs = tuple(args[k].clone().requires_grad_() for k in FLOAT_ARGS)

    def f(values, P, Q, row_bias, col_bias, weights):
        return observed_mf_loss(rows, cols, values, P, Q, row_bias, col_bias, weights, reduction)

    assert torch.autograd.gradcheck(f, inputs)


def _opcheck_samples():
    a = random_triples(7, 5, 3, 30, biases=True, weights=True)
    b = random_triples(9, 11, 4, 25, torch.float32, index_dtype=torch.int32)
    c = random_triples(4, 3, 2, 0, biases=True)
    d = random_triples(30, 20, 5, 40000, weights=True)
    order = ("rows", "cols", "values", "P", "Q", "row_bias", "col_bias", "weights")
    for args, reduction, grad in ((a, "sum", FLOAT_ARGS), (a, "mean", ("P", "col_bias")),
                                  (b, "sum", ("P", "Q")), (c, "mean", ("P", "row_bias")),
                                  (d, "sum", ("P", "Q", "weights")), (a, "sum", ())):
        tensors = [args[k].clone().requires_grad_(k in grad) if k in FLOAT_ARGS and args[k]
                   is not None else args[k] for k in order]
        flags = [k in grad and args[k] is not None for k in FLOAT_ARGS]
        yield (*tensors, reduction, *flags)


@pytest.mark.parametrize("sample", list(_opcheck_samples()))
def test_opcheck(sample):
    torch.library.opcheck(OP, sample)


def test_opcheck_transposed_P_Q():
    args = random_triples(8, 6, 3, 40, biases=True)
    sample = (args["rows"], args["cols"], args["values"],
              args["P"].t().contiguous().t().requires_grad_(),
              args["Q"].t().contiguous().t().requires_grad_(),
              args["row_bias"], args["col_bias"], None, "sum",
              False, True, True, False, False, False)
    torch.library.opcheck(OP, sample)


def test_torch_compile_fullgraph():
    args = random_triples(33, 21, 5, 600, biases=True, weights=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(rows, cols, values, P, Q, row_bias, col_bias, weights):
        return observed_mf_loss(rows, cols, values, P, Q, row_bias, col_bias, weights, "mean")

    compiled = loss_and_grads(lambda reduction, **a: step(**a), args)
    eager = loss_and_grads(observed_mf_loss, args, "mean")
    for name, a, b in zip(NAMES, compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_torch_compile_inductor():
    args = random_triples(12, 10, 4, 100, torch.float32, biases=True)

    @torch.compile(fullgraph=True)
    def step(rows, cols, values, P, Q, row_bias, col_bias):
        loss = observed_mf_loss(rows, cols, values, P, Q, row_bias, col_bias)
        return loss * 2

    P = args["P"].clone().requires_grad_()
    loss = step(args["rows"], args["cols"], args["values"], P, args["Q"], args["row_bias"],
                args["col_bias"])
    loss.backward()
    P2 = args["P"].clone().requires_grad_()
    ref = observed_mf_loss_reference(**dict(args, P=P2, weights=None)) * 2
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(P.grad, P2.grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("m,n,r,nnz", [(30, 20, 64, 40000), (301, 97, 13, 70001)])
def test_bitwise_deterministic_across_thread_counts(m, n, r, nnz, dtype):
    args = random_triples(m, n, r, nnz, dtype, biases=True, weights=True)
    runs = []
    for threads in (1, 2, 1, 3, 4):
        torch.set_num_threads(threads)
        runs.append(loss_and_grads(observed_mf_loss, args, "sum"))
    for run in runs[1:]:
        for name, a, b in zip(NAMES, runs[0], run):
            assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------ errors

def _good(**overrides):
    args = random_triples(5, 4, 3, 6, biases=True, weights=True)
    args.update(overrides)
    return args


ERRORS = [  # (overrides, exception, message regex)
    (dict(rows=torch.zeros(6, 1, dtype=torch.long)), ValueError,
     r"mf_ext.observed_mf_loss: rows must be 1-D \(nnz,\), got shape \[6, 1\]"),
    (dict(cols=torch.zeros(6, dtype=torch.float32)), TypeError,
     r"mf_ext.observed_mf_loss: cols must be an int32 or int64 tensor, got (Float|torch.float32)"),
    (dict(rows=torch.zeros(6, dtype=torch.int16)), TypeError,
     r"mf_ext.observed_mf_loss: rows must be an int32 or int64 tensor, got (Short|torch.int16)"),
    (dict(values=torch.ones(6, 1, dtype=torch.float64)), ValueError,
     r"mf_ext.observed_mf_loss: values must be 1-D \(nnz,\), got shape \[6, 1\]"),
    (dict(cols=torch.zeros(5, dtype=torch.long)), ValueError,
     r"mf_ext.observed_mf_loss: rows, cols and values must have the same length, "
     r"got rows 6, cols 5, values 6"),
    (dict(values=torch.ones(7, dtype=torch.float64)), ValueError,
     r"rows, cols and values must have the same length, got rows 6, cols 6, values 7"),
    (dict(P=torch.ones(3, 5, 1, dtype=torch.float64)), ValueError,
     r"mf_ext.observed_mf_loss: P must be 2-D \(r, m\), got shape \[3, 5, 1\]"),
    (dict(Q=torch.ones(12, dtype=torch.float64)), ValueError,
     r"mf_ext.observed_mf_loss: Q must be 2-D \(r, n\), got shape \[12\]"),
    (dict(values=torch.ones(6, dtype=torch.int64)), TypeError,
     r"mf_ext.observed_mf_loss: values must be a floating-point tensor, got (Long|torch.int64)"),
    (dict(P=torch.ones(3, 5, dtype=torch.float32)), TypeError,
     r"mf_ext.observed_mf_loss: values, P and Q must have the same dtype, got values "
     r"(Double|torch.float64), P (Float|torch.float32), Q (Double|torch.float64)"),
    (dict(Q=torch.ones(2, 4, dtype=torch.float64)), ValueError,
     r"mf_ext.observed_mf_loss: P has rank 3 \(shape \[3, 5\]\) but Q has rank 2 "
     r"\(shape \[2, 4\]\)"),
    (dict(row_bias=torch.ones(4, dtype=torch.float64)), ValueError,
     r"mf_ext.observed_mf_loss: row_bias must have shape \(5,\) \(m, the columns of P\), "
     r"got shape \[4\]"),
    (dict(col_bias=torch.ones(4, 1, dtype=torch.float64)), ValueError,
     r"mf_ext.observed_mf_loss: col_bias must have shape \(4,\) \(n, the columns of Q\), "
     r"got shape \[4, 1\]"),
    (dict(weights=torch.ones(5, dtype=torch.float64)), ValueError,
     r"mf_ext.observed_mf_loss: weights must have shape \(6,\) \(nnz, the length of values\), "
     r"got shape \[5\]"),
    (dict(weights=torch.ones(6, dtype=torch.float32)), TypeError,
     r"mf_ext.observed_mf_loss: weights must have the dtype of values "
     r"\((Double|torch.float64)\), got (Float|torch.float32)"),
    (dict(col_bias=torch.ones(4, dtype=torch.float32)), TypeError,
     r"mf_ext.observed_mf_loss: col_bias must have the dtype of values"),
    (dict(rows=torch.tensor([0, 1, 2, 5, 4, 0])), IndexError,
     r"mf_ext.observed_mf_loss: rows\[3\] = 5 is out of range: rows must lie in \[0, 5\) "
     r"\(m, the columns of P\)"),
    (dict(rows=torch.tensor([0, 1, -1, 2, 4, 0], dtype=torch.int32)), IndexError,
     r"mf_ext.observed_mf_loss: rows\[2\] = -1 is out of range: rows must lie in \[0, 5\)"),
    (dict(cols=torch.tensor([0, 1, 2, 3, 3, 4])), IndexError,
     r"mf_ext.observed_mf_loss: cols\[5\] = 4 is out of range: cols must lie in \[0, 4\) "
     r"\(n, the columns of Q\)"),
    (dict(cols=torch.tensor([0, -7, 2, 3, 3, 1])), IndexError,
     r"cols\[1\] = -7 is out of range: cols must lie in \[0, 4\)"),
]


@pytest.mark.parametrize("overrides,exc,match", ERRORS)
def test_error_messages(overrides, exc, match):
    with pytest.raises(exc, match=match):
        observed_mf_loss(**_good(**overrides))


@pytest.mark.parametrize("overrides,exc,match", [e for e in ERRORS if e[1] is not IndexError])
def test_error_messages_fake(overrides, exc, match):
    """The fake kernel (meta tensors, torch.compile) raises the same errors."""
    args = {k: (v.to("meta") if v is not None else None) for k, v in _good(**overrides).items()}
    with pytest.raises(exc, match=match):
        observed_mf_loss(**args)


def test_index_error_reports_the_first_bad_position_across_chunks():
    args = random_triples(30, 20, 4, 40000)
    args["rows"][35000] = 99
    args["cols"][20001] = 20
    args["rows"][30000] = -3
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with pytest.raises(IndexError, match=re.escape("cols[20001] = 20 is out of range: "
                                                       "cols must lie in [0, 20)")):
            observed_mf_loss(**args)


def test_index_error_with_no_rows():
    args = random_triples(0, 3, 2, 2)
    with pytest.raises(IndexError, match=re.escape("rows[0] = 0 is out of range: rows must lie "
                                                   "in [0, 0)")):
        observed_mf_loss(**args)


def test_device_mismatch():
    args = _good()
    args["P"] = args["P"].to("meta")
    with pytest.raises(ValueError, match=r"mf_ext.observed_mf_loss: rows, cols, values, P and Q "
                                         r"must be on the same device, got rows on cpu, cols on "
                                         r"cpu, values on cpu, P on meta, Q on cpu"):
        observed_mf_loss(**args)
    args = _good()
    args["weights"] = args["weights"].to("meta")
    with pytest.raises(ValueError, match=r"mf_ext.observed_mf_loss: weights is on meta but "
                                         r"values is on cpu"):
        observed_mf_loss(**args)


@pytest.mark.parametrize("reduction,exc,match", [
    ("avg", ValueError, r'mf_ext.observed_mf_loss: reduction must be "sum" or "mean", got "avg"'),
    (1, TypeError, r"mf_ext.observed_mf_loss: reduction must be a str, got <class 'int'>"),
])
def test_bad_reduction(reduction, exc, match):
    with pytest.raises(exc, match=match):
        observed_mf_loss(**_good(), reduction=reduction)


def test_half_is_rejected_on_cpu():
    args = {k: (v.half() if k in FLOAT_ARGS and v is not None else v) for k, v in _good().items()}
    with pytest.raises(TypeError, match=r"mf_ext.observed_mf_loss: the CPU kernel supports "
                                        r"float32 and float64, got Half"):
        observed_mf_loss(**args)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("index,name", [(12, "row_bias"), (13, "col_bias"), (14, "weights")])
def test_grad_flag_without_input(index, name, device):
    args = random_triples(5, 4, 3, 6)
    sample = [args[k].to(device) if args[k] is not None else None
              for k in ("rows", "cols", "values", "P", "Q", "row_bias", "col_bias", "weights")]
    flags = [False] * 6
    flags[index - 9] = True
    with pytest.raises(ValueError, match=rf"mf_ext.observed_mf_loss: grad_{name}=True but "
                                         rf"{name} is None"):
        OP(*sample, "sum", *flags)


def test_flag_off_but_requires_grad():
    args = random_triples(5, 4, 3, 6)
    P = args["P"].requires_grad_()
    loss = OP(args["rows"], args["cols"], args["values"], P, args["Q"], None, None, None, "sum",
              False, False, False, False, False, False)[0]
    with pytest.raises(RuntimeError, match=r"mf_ext.observed_mf_loss: P requires grad but the op "
                                           r"was called with grad_P=False"):
        loss.backward()


def test_exported():
    assert mf_ext.observed_mf_loss is observed_mf_loss
    assert "observed_mf_loss" in mf_ext.__all__ and "observed_mf_loss_reference" in mf_ext.__all__

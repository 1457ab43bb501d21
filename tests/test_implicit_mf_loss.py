"""mf_ext.implicit_mf_loss (the all-cells, iALS loss) on the cpu and cuda backends against the
dense float64 reference, its relation to observed_mf_loss, its layouts, autograd and bad inputs
(torch.compile: tests/test_torch_compile.py). The CUDA emulator does not run this op (its CUDA
kernel calls the observed op through the dispatcher under the mf_ext namespace, which the
emulator does not translate), so the emulated cases are deselected."""

from __future__ import annotations

import pytest
import torch

from helpers import IMPLICIT_FLOATS as FLOATS
from helpers import assert_equal, cases, sliced, stepped, transposed
from helpers import implicit_loss_and_grads as loss_and_grads
from helpers import implicit_problem as problem
from mf_ext import implicit_mf_loss, implicit_mf_loss_reference, observed_mf_loss

F64, F32 = torch.float64, torch.float32
OP = torch.ops.mf_ext.implicit_mf_loss_and_grads.default
# (a test's own `cases` marker replaces this one: it must leave "emulated" out too)
pytestmark = cases(lambda backend=None, **_: backend != "emulated")


def assert_matches_reference(args, alpha, reduction):
    """The op against the float64 reference: to 1e-12 in float64; in float32 within 2x the eager
    float32 reference's own error plus a floor of 8 ulps of the output's scale (helpers.py's
    rule)."""
    got = loss_and_grads(implicit_mf_loss, args, alpha, reduction)
    cpu64 = {k: None if v is None else v.cpu().double() if v.is_floating_point() else v.cpu()
             for k, v in args.items()}
    exact = loss_and_grads(implicit_mf_loss_reference, cpu64, alpha, reduction)
    eager = loss_and_grads(implicit_mf_loss_reference, args, alpha, reduction)
    dtype = args["P"].dtype
    for name, a, e, b in zip(("loss", *FLOATS), got, eager, exact):
        assert (a is None) == (b is None), name
        if b is None:
            continue
        assert a.dtype == dtype and a.shape == b.shape and a.device == args["P"].device, name
        size = b.abs().max().item() if b.numel() else 0.0
        if dtype == F64:
            torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-12 * (1 + size))
            continue
        err = (a.cpu().double() - b).abs().max().item() if b.numel() else 0.0
        err_eager = (e.cpu().double() - b).abs().max().item() if b.numel() else 0.0
        floor = 8 * torch.finfo(dtype).eps * (1 + size)
        assert err <= 2 * err_eager + floor, \
            f"{name}: {err:.3g} > 2 x {err_eager:.3g} + {floor:.3g}"
    return got


# (m, n, r, nnz, skip_rows, skip_cols): duplicates (nnz 300 on 20 cells), empty rows and columns,
# rank above min(m, n), one cell, no triples, no rows, rank 0, more than one Gram block (m > 256).
SHAPES = [(5, 4, 2, 300, 1, 1), (17, 13, 3, 40, 3, 4), (3, 5, 8, 20, 1, 1), (1, 1, 1, 1, 1, 1),
          (6, 7, 3, 0, 1, 1), (0, 3, 2, 0, 1, 1), (3, 4, 0, 5, 1, 1), (520, 300, 5, 700, 2, 1)]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("m,n,r,nnz,skip_rows,skip_cols", SHAPES)
def test_parity_with_dense_reference(backend, m, n, r, nnz, skip_rows, skip_cols, dtype, alpha,
                                     reduction):
    args = problem(m, n, r, nnz, dtype, seed=m + r, device=backend.device, skip_rows=skip_rows,
                   skip_cols=skip_cols)
    assert_matches_reference(args, alpha, reduction)


@pytest.mark.parametrize("values,weights", [(False, False), (True, False), (False, True)])
def test_values_and_weights_none(backend, values, weights):
    args = problem(9, 8, 3, 50, values=values, weights=weights, device=backend.device)
    got = assert_matches_reference(args, 0.5, "mean")
    # None means all ones
    ones = torch.ones(50, dtype=F64, device=backend.device)
    filled = dict(args, values=args["values"] if values else ones,
                  weights=args["weights"] if weights else ones)
    torch.testing.assert_close(got[:3], loss_and_grads(implicit_mf_loss, filled, 0.5, "mean")[:3],
                               rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
def test_zero_unobserved_weight_is_observed_mf_loss(backend, dtype, reduction):
    args = problem(11, 7, 4, 60, dtype, device=backend.device)
    got = loss_and_grads(implicit_mf_loss, args, 0.0, reduction)
    ordered = {k: v.detach().requires_grad_(k in FLOATS) if k in FLOATS else v
               for k, v in args.items()}
    loss = observed_mf_loss(ordered["rows"], ordered["cols"], ordered["values"], ordered["P"],
                            ordered["Q"], weights=ordered["weights"], reduction=reduction)
    want = [loss.detach(), *torch.autograd.grad(loss, [ordered[k] for k in FLOATS])]
    assert_equal(got, want)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "stepped", "embedding_rank1"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
def test_layouts(backend, layout, dtype):
    """weight.T of an (m, r) embedding table, a slice of a wider matrix, a view with gaps."""
    r = 1 if layout == "embedding_rank1" else 6
    args = problem(300, 41, r, 400, dtype, device=backend.device)
    change = {"transposed": transposed, "sliced": sliced, "stepped": stepped,
              "embedding_rank1": lambda t: torch.cat([t.T] * 3, 1)[:, :1].T}[layout]
    strided = dict(args, P=change(args["P"]), Q=change(args["Q"]))
    assert not strided["P"].is_contiguous()
    assert_matches_reference(strided, 0.7, "sum")


def test_gradcheck(backend):
    args = problem(5, 4, 3, 17, device=backend.device)
    inputs = tuple(args[k].clone().requires_grad_() for k in FLOATS)
    for reduction in ("sum", "mean"):
        def f(P, Q, values, weights, reduction=reduction):
            return implicit_mf_loss(args["rows"], args["cols"], P, Q, values, weights, 0.6,
                                    reduction)
        assert torch.autograd.gradcheck(f, inputs, nondet_tol=1e-12)


def _opcheck_samples(device):
    a = problem(7, 5, 3, 30, device=device)
    b = problem(9, 11, 4, 25, F32, index_dtype=torch.int32, values=False, device=device)
    c = problem(4, 3, 2, 0, weights=False, device=device)
    d = dict(a, P=transposed(a["P"]), Q=transposed(a["Q"]))
    for args, alpha, reduction, grad in ((a, 0.5, "sum", FLOATS), (a, 1.0, "mean", ("P",)),
                                         (b, 2.0, "sum", ("Q", "weights")),
                                         (c, 1.0, "mean", ("P", "Q")), (d, 0.0, "sum", ("P", "Q")),
                                         (a, 1.0, "sum", ())):
        tensors = {k: v.clone().requires_grad_(k in grad) if k in FLOATS and v is not None else v
                   for k, v in args.items()}
        yield (tensors["rows"], tensors["cols"], tensors["P"], tensors["Q"], tensors["values"],
               tensors["weights"], alpha, reduction,
               *(k in grad and args[k] is not None for k in ("values", "P", "Q", "weights")))


@pytest.mark.parametrize("sample", range(6))
def test_opcheck(backend, sample):
    torch.library.opcheck(OP, list(_opcheck_samples(backend.device))[sample])


def test_hu_koren_volinsky_confidence_form(backend):
    """Σ_obs c (1 − x)² + Σ_unobs x² equals the op with w = c − 1, v = c / (c − 1), α₀ = 1, up to
    the constant Σ_obs (c − c² / (c − 1)) = −Σ_obs c / (c − 1); so the gradients are equal."""
    m, n, r = 9, 7, 3
    g = torch.Generator().manual_seed(3)
    cells = torch.randperm(m * n, generator=g)[:20]  # distinct observed cells
    rows, cols = cells // n, cells % n
    strength = torch.rand(20, generator=g, dtype=F64) * 5 + 0.1  # r_ui > 0
    c = 1 + 40 * strength  # confidence, alpha = 40
    P = (torch.rand(r, m, generator=g, dtype=F64) - 0.5).requires_grad_()
    Q = (torch.rand(r, n, generator=g, dtype=F64) - 0.5).requires_grad_()
    observed = torch.zeros(m, n, dtype=torch.bool)
    observed[rows, cols] = True
    confidence = torch.ones(m, n, dtype=F64)
    confidence[rows, cols] = c
    hu = (confidence * torch.square(observed.double() - P.T @ Q)).sum()
    dev = backend.device
    ours = implicit_mf_loss(rows.to(dev), cols.to(dev), P.to(dev), Q.to(dev),
                            values=(c / (c - 1)).to(dev), weights=(c - 1).to(dev),
                            unobserved_weight=1.0)
    constant = -(c / (c - 1)).sum()
    torch.testing.assert_close(ours.cpu() + constant, hu, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, [P, Q]), torch.autograd.grad(hu, [P, Q])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------ CPU only

@cases(lambda backend, **_: backend == "cpu")
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("embedding", [False, True], ids=["r_by_m", "embedding"])
def test_bitwise_deterministic_across_thread_counts(backend, dtype, embedding):
    """Several Gram blocks (m, n > 256), a partial last block, and blocks worth threads (r 64)."""
    args = problem(1500, 701, 64, 5000, dtype)
    if embedding:
        args = dict(args, P=transposed(args["P"]), Q=transposed(args["Q"]))
    runs = []
    for threads in (1, 2, 3, 1):
        torch.set_num_threads(threads)
        runs.append([x for red in ("sum", "mean")
                     for x in loss_and_grads(implicit_mf_loss, args, 0.8, red)])
    for run in runs[1:]:
        assert_equal(run, runs[0])


@cases(lambda backend, **_: backend == "cpu")
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
def test_solver_pieces_give_the_ops_bits(backend, dtype):
    """The ALS solver's _gram / _add_gram_product_ (mf_ext/implicit_solvers.py) are the op's all-
    cells term: observed-op gradient + 2 (Q Qᵀ) P is the op's ∂/∂P bit for bit, and ⟨P Pᵀ, Q Qᵀ⟩
    its loss's second term; several Gram blocks (m, n > 256) on 1 and 2 threads."""
    args = problem(700, 1300, 24, 3000, dtype)
    P, Q = args["P"], args["Q"].T.contiguous().T  # Q in the embedding layout
    args = dict(args, Q=Q)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        loss, _, want, _, _ = torch.ops.mf_ext.implicit_mf_loss_and_grads(
            args["rows"], args["cols"], P, Q, args["values"], args["weights"], 1.0, "sum",
            False, True, False, False)
        observed, _, got, *_ = torch.ops.mf_ext.observed_mf_loss_and_grads(
            args["rows"], args["cols"], args["values"], P, Q, None, None, args["weights"], "sum",
            False, True, False, False, False, False)
        gram_P, gram_Q = torch.ops.mf_ext._gram(P), torch.ops.mf_ext._gram(Q)
        torch.ops.mf_ext._add_gram_product_(got, gram_Q, P, 2.0)
        assert_equal(got, want)
        torch.testing.assert_close(gram_P, P.double() @ P.double().T, rtol=1e-6, atol=1e-9)
        inner = float((gram_P * gram_Q).sum())
        assert float(loss) == pytest.approx(float(observed) + inner, rel=1e-12 if dtype == F64
                                            else 1e-6)
    with pytest.raises(ValueError, match=r"_gram: X must be 2-D \(r, m\), got shape \[3\]"):
        torch.ops.mf_ext._gram(torch.zeros(3))
    with pytest.raises(ValueError, match=r"_add_gram_product_: G must be a float64 \(24, 24\)"):
        torch.ops.mf_ext._add_gram_product_(got, gram_Q.float(), P, 1.0)
    with pytest.raises(ValueError, match=r"_add_gram_product_: out must be contiguous, of X's "
                                         r"shape \[24, 700\]"):
        torch.ops.mf_ext._add_gram_product_(got.T.contiguous().T, gram_Q, P, 1.0)


@cases(lambda backend, **_: backend == "cpu")
def test_cpu_refuses_half(backend):
    args = problem(4, 3, 2, 5, torch.float16)
    with pytest.raises(TypeError, match=r"implicit_mf_loss: the CPU kernel supports float32 and "
                                        r"float64, got Half"):
        implicit_mf_loss(**args)


# ------------------------------------------------------------------------------------ errors

def _long(*v):
    return torch.tensor(v, dtype=torch.long)


ERRORS = [  # (overrides of problem(4, 3, 2, 5), exception, message regex)
    (dict(rows=_long(0, 1, 9, 2, 0)), IndexError,
     r"^mf_ext\.implicit_mf_loss: rows\[2\] = 9 is out of range: rows must lie in \[0, 4\)"),
    (dict(cols=_long(0, 1, 2, -1, 0)), IndexError,
     r"^mf_ext\.implicit_mf_loss: cols\[3\] = -1 is out of range: cols must lie in \[0, 3\)"),
    (dict(unobserved_weight=-0.5), ValueError,
     r"unobserved_weight must be a finite number >= 0, got -0\.5"),
    (dict(unobserved_weight=float("nan")), ValueError,
     r"unobserved_weight must be a finite number >= 0, got nan"),
    (dict(unobserved_weight=float("inf")), ValueError,
     r"unobserved_weight must be a finite number >= 0, got inf"),
    (dict(unobserved_weight="1"), TypeError, r"unobserved_weight must be a float, got str"),
    (dict(weights=torch.tensor([1.0, 0.0, -2.0, 1.0, -1.0], dtype=F64)), ValueError,
     r"weights\[2\] = -2 is not allowed: weights must be >= 0"),
    (dict(weights=torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0], dtype=F64)), ValueError,
     r"weights\[1\] = nan is not allowed"),
    (dict(reduction="max"), ValueError, r'reduction must be "sum" or "mean", got "max"'),
    (dict(reduction=None), TypeError, r"reduction must be a str"),
    (dict(rows=torch.zeros(5, 1, dtype=torch.long)), ValueError,
     r"rows must be 1-D \(nnz,\), got shape \[5, 1\]"),
    (dict(cols=torch.zeros(5)), TypeError, r"cols must be an int32 or int64 tensor, got Float"),
    (dict(cols=_long(0, 1)), ValueError, r"rows and cols must have the same length, got rows 5, "
                                         r"cols 2"),
    (dict(P=torch.rand(2, 4, 1, dtype=F64)), ValueError, r"P must be 2-D \(r, m\), got shape"),
    (dict(Q=torch.rand(3, 3, dtype=F64)), ValueError, r"P has rank 2 .* but Q has rank 3"),
    (dict(P=torch.ones(2, 4, dtype=torch.long)), TypeError,
     r"P must be a floating-point tensor, got Long"),
    (dict(Q=torch.rand(2, 3, dtype=F32)), TypeError,
     r"P and Q must have the same dtype, got P Double, Q Float"),
    (dict(values=torch.rand(4, dtype=F64)), ValueError,
     r"values must have shape \(5,\) \(nnz, the length of rows\), got shape \[4\]"),
    (dict(weights=torch.rand(5, dtype=F32)), TypeError,
     r"weights must have the dtype of P \(Double\), got Float"),
    (dict(values=torch.rand(5, dtype=F64, device="meta")), ValueError,
     r"values is on meta but P is on cpu"),
    (dict(Q=torch.rand(2, 3, dtype=F64, device="meta")), ValueError,
     r"rows, cols, P and Q must be on the same device, got .* Q on meta"),
]


@cases(lambda backend, **_: backend == "cpu")
@pytest.mark.parametrize("overrides,exc,message", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_bad_input(backend, overrides, exc, message):
    args = dict(problem(4, 3, 2, 5), unobserved_weight=1.0, reduction="sum")
    args.update(overrides)
    with pytest.raises(exc, match=message) as info:
        implicit_mf_loss(**args)
    assert "mf_ext.implicit_mf_loss" in str(info.value)
    assert "c10::" not in str(info.value) and "Exception raised from" not in str(info.value)


@cases(lambda backend, **_: backend == "cuda")
@pytest.mark.parametrize("bad", [-2.0, float("nan")])
def test_cuda_bad_weight_raises_from_the_next_call(backend, bad):
    """No host synchronization per call: a negative or NaN weight gives the call a NaN loss and is
    raised, with its position and value, by the device's next call; the call after that runs."""
    args = problem(4, 3, 2, 5, device=backend.device)
    args["weights"][3] = bad
    assert torch.isnan(implicit_mf_loss(**args))
    torch.cuda.synchronize()
    good = problem(4, 3, 2, 5, device=backend.device)
    with pytest.raises(ValueError, match=rf"weights\[3\] = {bad:g} is not allowed.* \[found on "
                                         r"cuda(:\d+)? by an earlier call, whose loss was set "
                                         r"to NaN\]"):
        implicit_mf_loss(**good)
    assert torch.isfinite(implicit_mf_loss(**good))


@cases(lambda backend, **_: backend == "cpu")
def test_fake_kernel_checks_match_the_kernel(backend):
    """The fake kernel (meta tensors) raises what the CPU kernel raises, for the checks that need
    no data."""
    for overrides, exc, message in ERRORS:
        args = dict(problem(4, 3, 2, 5), unobserved_weight=1.0, reduction="sum")
        args.update(overrides)
        if exc is IndexError or "not allowed" in message or "meta" in message:
            continue  # needs the data (indices, weights' signs), or is already a device mix
        meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        with pytest.raises(exc, match=message):
            implicit_mf_loss(**meta)

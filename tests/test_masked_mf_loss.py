"""mf_ext.masked_mf_loss on the CPU against the notebook's pure-PyTorch reference."""

import pytest
import torch

from mf_ext import masked_mf_loss, masked_mf_loss_reference
from helpers import assert_close_to_reference, loss_and_grads, random_problem

OP = torch.ops.mf_ext.masked_mf_loss_and_grads.default

SHAPES = [  # (m, n, r)
    (1, 1, 1), (5, 4, 2), (7, 13, 1), (3, 5, 8),  # rank > min(m, n)
    (37, 53, 3), (64, 65, 10), (2, 1000, 5), (1000, 3, 4), (130, 290, 33), (257, 300, 64),
]


def fused(R, P, Q, mask, reduction):
    return masked_mf_loss(R, P, Q, mask, reduction)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("m,n,r", SHAPES)
def test_parity_contiguous(m, n, r, reduction, dtype):
    R, P, Q, _ = random_problem(m, n, r, dtype, seed=m * n + r)
    got = loss_and_grads(fused, R, P, Q, None, reduction)
    assert_close_to_reference(got, R, P, Q, None, reduction)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("m,n,r", [(5, 4, 2), (37, 53, 3), (130, 290, 33)])
def test_parity_explicit_mask(m, n, r, reduction, dtype):
    R, P, Q, M = random_problem(m, n, r, dtype, mask=True, seed=7)
    got = loss_and_grads(fused, R, P, Q, M, reduction)
    assert_close_to_reference(got, R, P, Q, M, reduction)


def _layouts(R, P, Q, M):
    """The same values in other memory layouts."""
    yield "R transposed", R.t().contiguous().t(), P, Q, M
    yield "P, Q transposed", R, P.t().contiguous().t(), Q.t().contiguous().t(), M
    wide = torch.zeros(R.shape[0] * 2, R.shape[1] * 3, dtype=R.dtype)
    wide[::2, ::3] = R
    yield "R sliced with steps", wide[::2, ::3], P, Q, M
    if M is not None:
        wide_m = torch.zeros(M.shape[0], M.shape[1] * 2, dtype=torch.bool)
        wide_m[:, ::2] = M
        yield "mask sliced", R, P, Q, wide_m[:, ::2]
        yield "mask transposed", R, P, Q, M.t().contiguous().t()
    yield "all transposed", R.t().contiguous().t(), P.t().contiguous().t(), \
        Q.t().contiguous().t(), None if M is None else M.t().contiguous().t()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("m,n,r", [(5, 4, 2), (67, 131, 5), (200, 90, 17)])
def test_parity_strided_inputs(m, n, r, with_mask, dtype):
    R0, P0, Q0, M0 = random_problem(m, n, r, dtype, mask=with_mask, seed=3)
    for name, R, P, Q, M in _layouts(R0, P0, Q0, M0):
        for reduction in ("sum", "mean"):
            got = loss_and_grads(fused, R, P, Q, M, reduction)
            assert_close_to_reference(got, R0, P0, Q0, M0, reduction)
            assert got[1].shape == R.shape, name


def test_single_row_layout_does_not_change_the_result():
    """A one-row R read with a column step must run as the same row problem as a contiguous one
    (bitwise), not as an n × 1 transposed problem summed in long sequential chains: a hypothesis
    example (m=1, n=263, float32) once failed the 2x-eager rule that way."""
    R, P, Q, _ = random_problem(1, 263, 1, torch.float32, observed=1.0, seed=11)
    stepped = torch.full((1, 3 * 263), float("nan"))
    stepped[:, ::3] = R
    contiguous = loss_and_grads(fused, R, P, Q, None, "sum", grad_R=False)
    strided = loss_and_grads(fused, stepped[:, ::3], P, Q, None, "sum", grad_R=False)
    for a, b in zip(contiguous[::2], strided[::2]):  # loss and dP (dQ has no sum to reorder)
        assert torch.equal(a, b)
    assert_close_to_reference(strided, R, P, Q, None, "sum", grad_R=False)


def test_grad_R_keeps_layout_of_R():
    R, P, Q, _ = random_problem(40, 70, 3)
    Rt = R.t().contiguous().t().requires_grad_()
    masked_mf_loss(Rt, P, Q).backward()
    assert Rt.grad.stride() == Rt.stride()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_empty_rows_and_columns(reduction):
    R, P, Q, _ = random_problem(30, 40, 4)
    R[3] = 0
    R[:, 7] = 0
    R[:, 39] = 0
    got = loss_and_grads(fused, R, P, Q, None, reduction)
    assert_close_to_reference(got, R, P, Q, None, reduction)
    assert torch.all(got[2][:, 3] == 0) and torch.all(got[3][:, [7, 39]] == 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_all_masked(reduction, dtype):
    R, P, Q, _ = random_problem(9, 70, 3, dtype)
    for R_, M in ((torch.zeros_like(R), None), (R, torch.zeros(R.shape, dtype=torch.bool))):
        loss, dR, dP, dQ = loss_and_grads(fused, R_, P, Q, M, reduction)
        assert loss.item() == 0.0
        assert not dR.any() and not dP.any() and not dQ.any()


@pytest.mark.parametrize("m,n,r", [(0, 5, 2), (5, 0, 2), (0, 0, 3), (4, 6, 0)])
def test_empty_shapes(m, n, r):
    R, P, Q, _ = random_problem(m, n, r)
    for reduction in ("sum", "mean"):
        got = loss_and_grads(fused, R, P, Q, None, reduction)
        assert_close_to_reference(got, R, P, Q, None, reduction)


def test_notebook_matrix_with_R_requiring_grad():
    """The notebook's exact set-up: float64, R itself requires grad."""
    R = torch.tensor([[1., 1, 0, 3], [2, 5, 0, 5], [3, 1, 2, 2], [0, 1, 3, 0], [1, 0, 3, 1]],
                     dtype=torch.float64)
    P = torch.rand(2, 5, dtype=torch.float64)
    Q = torch.rand(2, 4, dtype=torch.float64)
    got = loss_and_grads(fused, R, P, Q)
    assert_close_to_reference(got, R, P, Q, None, "sum")


def test_only_some_inputs_require_grad():
    R, P, Q, _ = random_problem(20, 30, 3)
    Pg = P.clone().requires_grad_()
    loss = masked_mf_loss(R, Pg, Q)
    loss.backward()
    ref = P.clone().requires_grad_()
    masked_mf_loss_reference(R, ref, Q).backward()
    torch.testing.assert_close(Pg.grad, ref.grad, rtol=1e-12, atol=1e-12)


def test_unrequested_gradients_are_not_computed():
    R, P, Q, _ = random_problem(20, 30, 3)
    loss, dR, dP, dQ = OP(R, P, Q, None, "sum", False, False, True)
    assert dR.numel() == 0 and dP.numel() == 0 and dQ.shape == (3, 30)
    with torch.no_grad():
        nograd = masked_mf_loss(R, P.requires_grad_(), Q.requires_grad_())
    assert nograd.item() == loss.item() and not nograd.requires_grad


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_gradcheck(reduction, with_mask):
    R, P, Q, M = random_problem(6, 9, 3, mask=with_mask, seed=11)
    # Without a mask, nudging a zero of R changes Ω: R's gradient is checked with a mask only.
    inputs = (R.requires_grad_(with_mask), P.requires_grad_(), Q.requires_grad_())
    assert torch.autograd.gradcheck(lambda r, p, q: masked_mf_loss(r, p, q, M, reduction), inputs)


def test_double_backward_is_refused():
    R, P, Q, _ = random_problem(4, 5, 2)
    P.requires_grad_()
    (g,) = torch.autograd.grad(masked_mf_loss(R, P, Q), (P,), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|differentiable"):
        g.sum().backward()


def test_raw_op_with_missing_grad_flag_refuses_backward():
    R, P, Q, _ = random_problem(4, 5, 2)
    P.requires_grad_()
    loss = OP(R, P, Q, None, "sum", False, False, False)[0]
    with pytest.raises(RuntimeError, match="P requires grad but the op was called with grad_P=False"):
        loss.backward()


@pytest.mark.parametrize("flags", [(False, False, False), (True, True, True), (False, True, False)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_opcheck(flags, layout):
    R, P, Q, M = random_problem(9, 70, 3, mask=True)
    if layout == "transposed":
        R, P, Q, M = R.t().contiguous().t(), P.t().contiguous().t(), Q.t().contiguous().t(), \
            M.t().contiguous().t()
    for mask in (None, M):
        for reduction in ("sum", "mean"):
            R_ = R.clone().requires_grad_(flags[0])
            P_ = P.clone().requires_grad_(flags[1])
            Q_ = Q.clone().requires_grad_(flags[2])
            torch.library.opcheck(OP, (R_, P_, Q_, mask, reduction, *flags))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_compile_fullgraph(dtype):
    R, P, Q, M = random_problem(33, 47, 5, dtype, mask=True)

    def step(R, P, Q, M):
        return masked_mf_loss(R, P, Q) + 0.5 * masked_mf_loss(R, P, Q, M, "mean")

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    for _ in range(2):  # the second call reuses the compiled graph
        Pc, Qc = P.clone().requires_grad_(), Q.clone().requires_grad_()
        loss_c = compiled(R, Pc, Qc, M)
        loss_c.backward()
    Pe, Qe = P.clone().requires_grad_(), Q.clone().requires_grad_()
    loss_e = step(R, Pe, Qe, M)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(Pc.grad, Pe.grad)
    torch.testing.assert_close(Qc.grad, Qe.grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bitwise_deterministic_across_thread_counts(dtype):
    # Big enough for the maximal 4 x 4 task grid, odd so that tails are exercised.
    R, P, Q, M = random_problem(301, 1203, 7, dtype, mask=True)
    results = []
    for threads in (1, 2, 3, 4):
        torch.set_num_threads(threads)
        for mask in (None, M):
            results.append(OP(R, P, Q, mask, "mean", True, True, True))
    for i in range(2):
        for other in results[2 + i::2]:
            for a, b in zip(results[i], other):
                assert torch.equal(a, b)


def test_nan_propagates_like_the_reference():
    R, P, Q, _ = random_problem(6, 7, 2)
    M = R != 0
    R[0, 0] = float("nan")
    M[0, 0] = False  # NaN at an unobserved entry: the reference multiplies it by 0 -> NaN
    assert torch.isnan(masked_mf_loss(R, P, Q, M)).item()
    assert torch.isnan(masked_mf_loss_reference(R, P, Q, M)).item()
    P2 = P.clone()
    P2[0, 1] = float("inf")
    assert torch.isnan(masked_mf_loss(R * 0 + 1, P2, Q)) == torch.isnan(
        masked_mf_loss_reference(R * 0 + 1, P2, Q))


# ------------------------------------------------------------------------ bad input

def _ok():
    return random_problem(5, 4, 2)[:3]


@pytest.mark.parametrize("make, exc, match", [
    (lambda R, P, Q: (R[0], P, Q), ValueError, r"R must be 2-D \(m, n\), got shape \[4\]"),
    (lambda R, P, Q: (R, P[0], Q), ValueError, r"P must be 2-D \(r, m\), got shape \[5\]"),
    (lambda R, P, Q: (R, P, Q[None]), ValueError, r"Q must be 2-D \(r, n\), got shape \[1, 2, 4\]"),
    (lambda R, P, Q: (R, P, Q[:1]), ValueError, r"P has rank 2 \(shape \[2, 5\]\) but Q has rank 1"),
    (lambda R, P, Q: (R, P[:, :4], Q), ValueError, r"P has 4 columns but R has 5 rows"),
    (lambda R, P, Q: (R, P, Q[:, :3]), ValueError, r"Q has 3 columns but R has 4 columns"),
    (lambda R, P, Q: (R.float(), P, Q), TypeError, r"R, P and Q must have the same dtype, got R Float, P Double, Q Double"),
    (lambda R, P, Q: (R.long(), P.long(), Q.long()), TypeError, r"R must be a floating-point tensor, got Long"),
    (lambda R, P, Q: (R.to(torch.complex128), P, Q), TypeError, r"R must be a floating-point tensor, got ComplexDouble"),
    (lambda R, P, Q: (R.half(), P.half(), Q.half()), TypeError, r"the CPU kernel supports float32 and float64, got Half"),
])
def test_bad_tensors(make, exc, match):
    with pytest.raises(exc, match="mf_ext.masked_mf_loss: " + match):
        masked_mf_loss(*make(*_ok()))


@pytest.mark.parametrize("mask, exc, match", [
    (torch.ones(5, 3, dtype=torch.bool), ValueError, r"mask has shape \[5, 3\] but R has shape \[5, 4\]"),
    (torch.ones(5, 4), TypeError, r"mask must be a bool tensor, got Float"),
])
def test_bad_mask(mask, exc, match):
    with pytest.raises(exc, match="mf_ext.masked_mf_loss: " + match):
        masked_mf_loss(*_ok(), mask=mask)


def test_bad_reduction():
    with pytest.raises(ValueError, match=r'reduction must be "sum" or "mean", got "avg"'):
        masked_mf_loss(*_ok(), reduction="avg")
    with pytest.raises(TypeError, match="reduction must be a str"):
        masked_mf_loss(*_ok(), reduction=None)


def test_mixed_devices():
    R, P, Q = _ok()
    with pytest.raises(ValueError, match=r"R, P and Q must be on the same device, got R on cpu, P on meta"):
        masked_mf_loss(R, P.to("meta"), Q)


def test_bad_input_under_compile_names_the_argument():
    R, P, Q = _ok()
    compiled = torch.compile(masked_mf_loss, fullgraph=True)
    with pytest.raises(Exception, match=r"P has 4 columns but R has 5 rows"):
        compiled(R, P[:, :4], Q)

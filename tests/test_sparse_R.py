"""mf_ext.masked_mf_loss with a sparse R (COO, CSR, CSC): the same function as for R.to_dense(),
computed over R's stored entries by the observed-entries kernel, R never densified. The
references: mf_ext.reference.masked_mf_loss_reference (helpers' numeric rule) and the dense op,
both on R.to_dense().
"""

import pytest
import torch

from helpers import assert_close_to_reference, dense_problem, sparse_R
from mf_ext import masked_mf_loss, observed_mf_loss
from mf_ext.reference import masked_mf_loss_reference

pytestmark = pytest.mark.filterwarnings(
    "ignore:Sparse CSR tensor support is in beta state",
    "ignore:Sparse invariant checks are implicitly disabled",
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LAYOUTS = ["coo", "coo_uncoalesced", "csr", "csc"]
SHAPES = [  # (m, n, r)
    (1, 1, 1), (5, 4, 2), (7, 13, 1), (3, 5, 8), (37, 53, 3), (64, 65, 10), (2, 300, 5),
    (300, 3, 4), (130, 290, 33),
]


# ------------------------------------------------------------------------ problems

def loss_and_grads(fn, R, P, Q, reduction="sum", flags=(True, True, True)):
    """fn's loss and the gradients w.r.t. (R, P, Q) that `flags` ask for (None for the others);
    dR dense (a sparse dR densified), through torch.autograd.grad."""
    R = R.detach().requires_grad_(flags[0])
    P = P.detach().requires_grad_(flags[1])
    Q = Q.detach().requires_grad_(flags[2])
    loss = fn(R, P, Q, reduction=reduction)
    wanted = [t for t, f in zip((R, P, Q), flags) if f]
    grads = iter(torch.autograd.grad(loss, wanted) if wanted else ())
    out = [next(grads) if f else None for f in flags]
    if out[0] is not None:
        assert out[0].layout == R.layout, (out[0].layout, R.layout)
        out[0] = out[0].to_dense()
    return (loss.detach(), *out)


def check_against_reference(got, R_dense, P, Q, reduction, flags=(True, True, True)):
    wanted = [name for name, flag in zip("RPQ", flags) if flag]
    assert_close_to_reference(got, dict(R=R_dense, P=P, Q=Q, mask=None), reduction, wanted)


def check_sparse(Rs, P, Q, reduction, flags=(True, True, True)):
    """The sparse op against the reference and the dense op, both on Rs.to_dense()."""
    R_dense = Rs.detach().to_dense()
    got = loss_and_grads(masked_mf_loss, Rs, P, Q, reduction, flags)
    check_against_reference(got, R_dense, P, Q, reduction, flags)
    dense = loss_and_grads(masked_mf_loss, R_dense, P, Q, reduction, flags)
    check_against_reference(dense, R_dense, P, Q, reduction, flags)
    if P.dtype == torch.float64:
        for name, a, b in zip(("loss", "dR", "dP", "dQ"), got, dense):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, equal_nan=True,
                                           msg=lambda s, name=name: f"{name} vs dense op: {s}")
    return got


# ------------------------------------------------------------------------ parity

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m,n,r", SHAPES)
def test_parity(m, n, r, layout, reduction, dtype, device):
    R, stored, P, Q = dense_problem(m, n, r, dtype, seed=m * n + r, device=device)
    check_sparse(sparse_R(R, stored, layout, seed=m + n), P, Q, reduction)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", [
    "no_stored_entries", "all_stored_zero", "all_stored", "one_entry", "empty_rows_only",
])
def test_special_patterns(case, layout, reduction):
    m, n, r = 6, 5, 3
    R, stored, P, Q = dense_problem(m, n, r, seed=3, observed=0.6)
    if case == "no_stored_entries":
        stored[:] = False
    elif case == "all_stored_zero":
        R[:] = 0
        stored[::2] = True
    elif case == "all_stored":
        R = R + 0.5
        stored[:] = True
    elif case == "one_entry":
        R[:] = 0
        R[4, 3] = 2.5
        stored = R != 0
    else:  # every row empty but one
        R[1:] = 0
        stored = R != 0
    got = check_sparse(sparse_R(R, stored, layout), P, Q, reduction)
    if case in ("no_stored_entries", "all_stored_zero"):  # Ω empty: 0 and zero gradients
        for t in got:
            assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("m,n", [(0, 4), (5, 0), (0, 0)])
def test_empty_shapes(m, n, reduction):
    R, stored, P, Q = dense_problem(m, n, 2)
    for layout in LAYOUTS:
        check_sparse(sparse_R(R, stored, layout), P, Q, reduction)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rank_zero(layout, reduction):
    R, stored, P, Q = dense_problem(6, 7, 1)
    check_sparse(sparse_R(R, stored, layout), P[:0], Q[:0], reduction)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_transposed_and_strided_inputs(reduction):
    R, stored, P, Q = dense_problem(23, 41, 4, seed=5)
    # R.t() of a COO is an uncoalesced COO; of a CSR, a CSC; of a CSC, a CSR
    for layout in ("coo", "csr", "csc"):
        Rt = sparse_R(R, stored, layout).t()
        assert Rt.shape == (41, 23)
        # P and Q as transposed views of (n, r) / (m, r) embedding tables (non-contiguous)
        Pt, Qt = Q.t().contiguous().t(), P.t().contiguous().t()
        assert not Pt.is_contiguous()
        check_sparse(Rt, Pt, Qt, reduction)
    # a sliced, non-contiguous P
    wide = torch.rand(4, 2 * 23, dtype=torch.float64)
    check_sparse(sparse_R(R, stored, "csr"), wide[:, ::2], Q, reduction)


# ------------------------------------------------------------------------ the observed set

def test_uncoalesced_duplicates_add_up_and_a_zero_sum_is_not_observed():
    indices = torch.tensor([[0, 2, 0, 1, 1, 3], [1, 3, 1, 0, 0, 2]])
    values = torch.tensor([1.0, 5.0, 2.0, 3.0, -3.0, 0.0], dtype=torch.float64)
    Rs = torch.sparse_coo_tensor(indices, values, (4, 4)).requires_grad_(True)
    R = torch.zeros(4, 4, dtype=torch.float64)
    R[0, 1], R[2, 3] = 3.0, 5.0  # (1, 0) sums to 0, (3, 2) is a stored 0: neither observed
    P = torch.rand(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    Q = torch.rand(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    pred = P.t() @ Q
    expected = (3 - pred[0, 1]) ** 2 + (5 - pred[2, 3]) ** 2
    for reduction, divisor in (("sum", 1), ("mean", 2)):
        Rs.grad = None
        loss = masked_mf_loss(Rs, P, Q, reduction=reduction)
        torch.testing.assert_close(loss, expected / divisor, rtol=1e-14, atol=0)
        torch.testing.assert_close(loss, masked_mf_loss(R, P, Q, reduction=reduction),
                                   rtol=1e-14, atol=0)
        loss.backward()
        dR = torch.zeros_like(R)
        dR[0, 1], dR[2, 3] = 2 * (3 - pred[0, 1]) / divisor, 2 * (5 - pred[2, 3]) / divisor
        assert Rs.grad.layout == torch.sparse_coo
        torch.testing.assert_close(Rs.grad.to_dense(), dR, rtol=1e-14, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mean_divides_by_the_non_zero_stored_entries(layout):
    R, stored, P, Q = dense_problem(9, 11, 3, seed=4, stored_zeros=0.3)
    Rs = sparse_R(R, stored, layout)
    observed = int((R != 0).sum())
    assert int(stored.sum()) > observed > 0
    total = masked_mf_loss(Rs, P, Q)
    torch.testing.assert_close(masked_mf_loss(Rs, P, Q, reduction="mean"), total / observed,
                               rtol=1e-15, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mean_without_stored_zeros_is_the_observed_ops_mean_bitwise(dtype):
    R, stored, P, Q = dense_problem(17, 19, 3, dtype, seed=6, stored_zeros=0)
    Rs = sparse_R(R, stored, "coo")
    idx = Rs.indices()
    assert torch.equal(
        masked_mf_loss(Rs, P, Q, reduction="mean"),
        observed_mf_loss(idx[0], idx[1], Rs.values(), P, Q,
                         weights=torch.ones_like(Rs.values()), reduction="mean"))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_stored_nan_is_observed_like_the_dense_op(layout, reduction):
    R, stored, P, Q = dense_problem(6, 7, 2, seed=8)
    R[0, 0], stored[0, 0] = float("nan"), True
    got = check_sparse(sparse_R(R, stored, layout), P, Q, reduction)
    assert torch.isnan(got[0])
    assert torch.isnan(got[1][0, 0]) and torch.isfinite(got[1][1:]).all()
    assert torch.isnan(got[2][:, 0]).all() and torch.isfinite(got[2][:, 1:]).all()


def test_non_finite_prediction_where_R_stores_nothing_is_not_read():
    """Documented difference: the dense op multiplies every error by the mask (NaN·0 = NaN);
    the sparse route reads only the stored entries."""
    R, stored, P, Q = dense_problem(5, 6, 2, seed=9)
    stored[1] = False  # row 1 stores nothing
    P[:, 1] = float("inf")
    Rs = sparse_R(R, stored, "csr")
    assert torch.isfinite(masked_mf_loss(Rs, P, Q))
    assert torch.isnan(masked_mf_loss(Rs.to_dense(), P, Q))
    stored[1, 0] = True  # a stored 0 in that row: not observed, but its error is NaN·0
    assert torch.isnan(masked_mf_loss(sparse_R(R, stored, "csr"), P, Q))


# ------------------------------------------------------------------------ gradients

FLAGS = [(a, b, c) for a in (False, True) for b in (False, True) for c in (False, True)]


@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_grad_flags(layout, flags):
    R, stored, P, Q = dense_problem(13, 8, 3, seed=10)
    Rs = sparse_R(R, stored, layout)
    check_sparse(Rs, P, Q, "mean", flags)
    loss = masked_mf_loss(Rs.detach().requires_grad_(flags[0]), P.requires_grad_(flags[1]),
                          Q.requires_grad_(flags[2]))
    assert loss.requires_grad == any(flags)


@pytest.mark.parametrize("layout", ["coo", "coo_uncoalesced", "csr"])
def test_backward_fills_the_grad_of_a_sparse_leaf(layout):
    R, stored, P, Q = dense_problem(7, 9, 2, seed=11)
    Rs = sparse_R(R, stored, layout).requires_grad_(True)
    P.requires_grad_(True)
    masked_mf_loss(Rs, P, Q).backward()
    Rd = R.clone().requires_grad_(True)
    Pd = P.detach().clone().requires_grad_(True)
    masked_mf_loss(Rd, Pd, Q).backward()
    assert Rs.grad.layout == Rs.layout
    torch.testing.assert_close(Rs.grad.to_dense(), Rd.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(P.grad, Pd.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("to_layout", ["to_sparse", "to_sparse_csr", "to_sparse_csc"])
def test_gradient_reaches_a_dense_tensor_made_sparse_in_the_graph(to_layout):
    """A sparse R computed from a dense X: X.grad is the dense op's dR (CSC included, since
    the CSC tensor is not a leaf here)."""
    R, _, P, Q = dense_problem(9, 6, 2, seed=15)
    X = R.clone().requires_grad_(True)
    masked_mf_loss(getattr(X, to_layout)(), P, Q, reduction="mean").backward()
    Xd = R.clone().requires_grad_(True)
    masked_mf_loss(Xd, P, Q, reduction="mean").backward()
    torch.testing.assert_close(X.grad, Xd.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_grad(layout):
    R, stored, P, Q = dense_problem(8, 6, 2, seed=12)
    Rs = sparse_R(R, stored, layout).requires_grad_(True)
    P.requires_grad_(True)
    with torch.no_grad():
        loss = masked_mf_loss(Rs, P, Q, reduction="mean")
    assert not loss.requires_grad
    torch.testing.assert_close(loss, masked_mf_loss_reference(R, P.detach(), Q, reduction="mean"),
                               rtol=1e-12, atol=0)


def test_double_backward_is_refused():
    R, stored, P, Q = dense_problem(4, 5, 2)
    P.requires_grad_(True)
    (dP,) = torch.autograd.grad(masked_mf_loss(sparse_R(R, stored, "coo"), P, Q), P,
                                create_graph=True)
    with pytest.raises(RuntimeError):
        dP.sum().backward()


# ------------------------------------------------------------------------ bad input

def _ok():
    R, stored, P, Q = dense_problem(5, 4, 2, seed=13)
    return sparse_R(R, stored, "coo"), P, Q


def _hybrid(R, P, Q):
    # sparse_dim 1, dense_dim 1: rows stored whole
    return torch.sparse_coo_tensor(torch.tensor([[0, 3]]), torch.ones(2, 4, dtype=R.dtype),
                                   (5, 4)), P, Q


def _batched_csr(R, P, Q):
    return torch.stack([R.to_dense()] * 2).to_sparse_csr(), P, Q


@pytest.mark.parametrize("make, exc, match", [
    (lambda R, P, Q: (R, P.to_sparse(), Q), TypeError,
     r"P must be a dense \(strided\) tensor, got layout torch.sparse_coo"),
    (lambda R, P, Q: (R, P, Q.to_sparse_csr()), TypeError,
     r"Q must be a dense \(strided\) tensor, got layout torch.sparse_csr"),
    (lambda R, P, Q: (R, P[:, :4], Q), ValueError, r"P has 4 columns but R has 5 rows"),
    (lambda R, P, Q: (R, P, Q[:, :3]), ValueError, r"Q has 3 columns but R has 4 columns"),
    (lambda R, P, Q: (R.t(), P, Q), ValueError, r"P has 5 columns but R has 4 rows"),
    (lambda R, P, Q: (R, P, Q[:1]), ValueError, r"P has rank 2 \(shape \[2, 5\]\) but Q has rank 1"),
    (lambda R, P, Q: (R, P, Q[0]), ValueError, r"Q must be 2-D \(r, n\), got shape \[4\]"),
    (lambda R, P, Q: (R.float(), P, Q), TypeError,
     r"R, P and Q must have the same dtype, got R torch.float32, P torch.float64"),
    (lambda R, P, Q: (R.long(), P, Q), TypeError, r"R must be a floating-point tensor, got torch.int64"),
    (lambda R, P, Q: (R.half(), P.half(), Q.half()), TypeError,
     r"the CPU kernel supports float32 and float64, got torch.float16"),
    (lambda R, P, Q: (R, P.to("meta"), Q), ValueError,
     r"R, P and Q must be on the same device, got R on cpu, P on meta"),
    (_hybrid, ValueError, r"a sparse R must be a plain 2-D \(m, n\) matrix, got shape \[5, 4\] "
                          r"with layout torch.sparse_coo \(1 sparse and 1 dense dimensions\)"),
    (_batched_csr, ValueError, r"a sparse R must be a plain 2-D \(m, n\) matrix, got shape "
                               r"\[2, 5, 4\] with layout torch.sparse_csr \(2 sparse and 0 dense"),
    (lambda R, P, Q: (R.to_dense()[None].to_sparse(), P, Q), ValueError,
     r"a sparse R must be a plain 2-D \(m, n\) matrix, got shape \[1, 5, 4\] with layout "
     r"torch.sparse_coo \(3 sparse and 0 dense"),
    (lambda R, P, Q: (R.to_dense().to_sparse_bsr((1, 1)), P, Q), TypeError,
     r"R must be a dense \(strided\) tensor or a sparse COO, CSR or CSC tensor, got layout "
     r"torch.sparse_bsr"),
])
def test_bad_tensors(make, exc, match):
    with pytest.raises(exc, match="mf_ext.masked_mf_loss: " + match):
        masked_mf_loss(*make(*_ok()))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mask_with_a_sparse_R_is_refused(layout):
    R, stored, P, Q = dense_problem(5, 4, 2)
    Rs = sparse_R(R, stored, layout)
    with pytest.raises(ValueError, match=r"mf_ext.masked_mf_loss: mask must be None when R is "
                                         r"sparse \(torch.sparse_c..\): R's stored non-zero "
                                         r"entries are the observed set; got a mask of shape "
                                         r"\[5, 4\]"):
        masked_mf_loss(Rs, P, Q, mask=stored)


def test_bad_reduction_with_a_sparse_R():
    with pytest.raises(ValueError, match=r'mf_ext.masked_mf_loss: reduction must be "sum" or '
                                         r'"mean", got "avg"'):
        masked_mf_loss(*_ok(), reduction="avg")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("layout", ["csr", "csc"])
def test_int32_compressed_indices(layout, reduction):
    R, stored, P, Q = dense_problem(11, 14, 3, seed=14)
    Rs = sparse_R(R, stored, layout)
    if layout == "csr":
        R32 = torch.sparse_csr_tensor(Rs.crow_indices().int(), Rs.col_indices().int(),
                                      Rs.values(), Rs.shape)
    else:
        R32 = torch.sparse_csc_tensor(Rs.ccol_indices().int(), Rs.row_indices().int(),
                                      Rs.values(), Rs.shape)
    check_sparse(R32, P, Q, reduction)

"""Shared test helpers: the backends, random problems for both ops and their memory layouts,
and the one numeric rule. A problem is a dict of an op's keyword arguments: masked (R, P, Q,
mask), observed (rows, cols, values, P, Q, row_bias, col_bias, weights). Results are lists: the
loss, then the gradient of each floating-point argument (GRADS order; None if not asked for)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import mf_ext
from mf_ext.reference import masked_mf_loss_reference, observed_mf_loss_reference

HALF = (torch.float16, torch.bfloat16)
DTYPES = (torch.float64, torch.float32, *HALF)  # the CPU backend runs the first two (conftest)
GRADS = {"masked": ("R", "P", "Q"),
         "observed": ("values", "P", "Q", "row_bias", "col_bias", "weights")}
OBSERVED_ORDER = ("rows", "cols", "values", "P", "Q", "row_bias", "col_bias", "weights")


def op_of(args):
    return "masked" if "R" in args else "observed"


# ------------------------------------------------------------------------------------ backends

@dataclass(frozen=True)
class Backend:
    """Where the kernels run: "cpu" (csrc/cpu), "cuda" (csrc/cuda on a GPU) or "emulated"
    (csrc/cuda on the CPU, tests/cuda_emulation). `ops` holds the raw *_and_grads ops; the
    loss functions take the public API's arguments and give autograd the fused gradients."""
    name: str
    device: str
    ops: object

    @property
    def emulated(self):
        return self.name == "emulated"

    def masked_mf_loss(self, R, P, Q, mask=None, reduction="sum"):
        if not self.emulated:
            return mf_ext.masked_mf_loss(R, P, Q, mask, reduction)
        flags = (torch.is_grad_enabled() and t.requires_grad for t in (R, P, Q))
        return self.ops.masked_mf_loss_and_grads(R, P, Q, mask, reduction, *flags)[0]

    def observed_mf_loss(self, rows, cols, values, P, Q, row_bias=None, col_bias=None,
                         weights=None, reduction="sum"):
        args = (rows, cols, values, P, Q, row_bias, col_bias, weights)
        if not self.emulated:
            return mf_ext.observed_mf_loss(*args, reduction)
        flags = (torch.is_grad_enabled() and t is not None and t.requires_grad for t in args[2:])
        return self.ops.observed_mf_loss_and_grads(*args, reduction, *flags)[0]

    def loss(self, args):
        """The loss function of args' op."""
        return self.masked_mf_loss if op_of(args) == "masked" else self.observed_mf_loss

    def raw(self, args, reduction, flags):
        """The raw op on args with explicit grad flags: (loss, *grads), empty where not asked."""
        if op_of(args) == "masked":
            return self.ops.masked_mf_loss_and_grads(args["R"], args["P"], args["Q"],
                                                     args["mask"], reduction, *flags)
        return self.ops.observed_mf_loss_and_grads(*(args[k] for k in OBSERVED_ORDER),
                                                   reduction, *flags)

    def to(self, args):
        return to_device(args, self.device)


def cases(predicate):
    """Marks a test to run only the parametrized cases (parameters as keywords, the backend's
    name included) for which predicate is true; conftest.py deselects the others."""
    return pytest.mark.cases.with_args(predicate)


def register_emulated_autograd(ns):
    """The real ops' autograd (mf_ext/ops.py) for the emulated ones in namespace `ns`."""
    from mf_ext import ops
    for spec in (ops._MASKED_AUTOGRAD, ops._OBSERVED_AUTOGRAD):
        ops._register_autograd(**spec, namespace=ns)


# ------------------------------------------------------------------------------------ problems

def to_device(args, device):
    return {k: None if v is None else v.to(device) for k, v in args.items()}


def random_problem(m, n, r, dtype=torch.float64, observed=0.5, seed=0, mask=False,
                   device="cpu"):
    """Masked: R (m, n) with about `observed` of its entries in [1, 5), the rest 0; P (r, m),
    Q (r, n) uniform [0, 1) as in the notebook; an optional mask (which also marks some zeros
    as observed). Made on the CPU, so a seed gives the same problem on every backend."""
    g = torch.Generator().manual_seed(seed)
    R = (torch.rand(m, n, generator=g, dtype=torch.float64) * 4 + 1)
    R = R * (torch.rand(m, n, generator=g) < observed)
    P = torch.rand(r, m, generator=g, dtype=torch.float64)
    Q = torch.rand(r, n, generator=g, dtype=torch.float64)
    M = (torch.rand(m, n, generator=g) < 0.6) if mask else None
    return to_device(dict(R=R.to(dtype), P=P.to(dtype), Q=Q.to(dtype), mask=M), device)


KINDS = ["none", "random", "all_masked", "all_zero", "empty_rows_cols", "default_empty_rows_cols"]


def with_mask_kind(args, kind, seed=0):
    """args with Ω of the given kind: R ≠ 0, a random mask, nothing observed (by the mask or an
    all-zero R), rows and columns with nothing observed (by the mask, or zeros of R)."""
    R = args["R"].clone()
    m, n = R.shape
    g = torch.Generator().manual_seed(seed)
    M = None
    if kind == "random":
        M = torch.rand(m, n, generator=g) < 0.6
    elif kind == "all_masked":
        M = torch.zeros(m, n, dtype=torch.bool)
    elif kind == "all_zero":
        R.zero_()
    elif kind == "empty_rows_cols":  # R ≠ 0 there, the mask says unobserved
        M = torch.rand(m, n, generator=g) < 0.7
        M[::3] = False
        M[:, 1::4] = False
    elif kind == "default_empty_rows_cols":
        R[1::3] = 0
        R[:, ::5] = 0
    return dict(args, R=R, mask=None if M is None else M.to(R.device))


def random_triples(m, n, r, nnz, dtype=torch.float64, seed=0, biases=False, weights=False,
                   index_dtype=torch.int64, device="cpu"):
    """Observed: nnz uniformly random (row, col) pairs (so with duplicates when nnz is large,
    in no particular order), values in [1, 5), P (r, m), Q (r, n), optional biases and
    positive weights."""
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
    return to_device(dict(rows=rows, cols=cols, values=cast(values), P=cast(P), Q=cast(Q),
                          row_bias=cast(row_bias), col_bias=cast(col_bias), weights=cast(w)),
                     device)


def launched_ranks(worker: str, timeout_s: float):
    """A module fixture `ranks`: ({world size: [each rank's results]}, the folder they wrote
    in), from one launch of tests/`worker` (sharded_worker.launch)."""
    @pytest.fixture(scope="module")
    def ranks(tmp_path_factory):
        from sharded_worker import launch

        out = tmp_path_factory.mktemp(worker.split(".")[0])
        return launch(os.path.join(os.path.dirname(os.path.abspath(__file__)), worker), out,
                      timeout_s), out
    return ranks


NEEDS_GLOO = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available")


@pytest.fixture
def group_of_one(tmp_path):
    """A gloo process group of one rank (this process) for the test."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Module-scoped, autouse where a test module imports it: tiny single-process references
    run on one thread (OpenMP threads would only wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_ratings(m=60, n=40, rank=3, density=0.4, seed=0, noise=0.1):
    """Ratings for the model's tests: (users, items, ratings) of about density * m * n ratings
    from a rank-`rank` model plus noise, clipped to [1, 5]; string user ids, integer item ids."""
    rng = np.random.default_rng(seed)
    U, V = rng.normal(size=(m, rank)), rng.normal(size=(n, rank))
    full = 3 + U @ V.T / np.sqrt(rank) + rng.normal(scale=noise, size=(m, n))
    rows, cols = np.nonzero(rng.random((m, n)) < density)
    users = np.array([f"u{r}" for r in rows])
    return users, cols + 100, np.clip(full[rows, cols], 1, 5)


def transposed(t):
    """t's values in transposed storage (column-major for a matrix)."""
    return None if t is None else t.t().contiguous().t()


def sliced(t):
    """t's values as the left half of a matrix twice as wide (rows a stride apart)."""
    return None if t is None else torch.cat([t, t], 1)[:, :t.shape[1]]


def flat_offset(t):
    """t's values, contiguous, one element into their storage (unaligned for vector loads)."""
    return torch.cat([t.new_zeros(1), t.flatten()])[1:].view(t.shape)


def stepped(t, rows=1, cols=2, offset=0, fill=0):
    """t's values as a view that steps over gaps (holding `fill`), after an offset."""
    if t is None:
        return None
    steps = (slice(offset, None, cols),) if t.dim() == 1 else \
        (slice(offset, None, rows), slice(offset, None, cols))
    shape = [offset + step.step * size for step, size in zip(steps, t.shape)]
    wide = torch.full(shape, fill, dtype=t.dtype, device=t.device)
    wide[steps] = t
    return wide[steps]


# ----------------------------------------------------------------------------- the numeric rule

def loss_and_grads(fn, args, reduction="sum", wanted=None):
    """fn(**args, reduction)'s loss and its gradients, through autograd, w.r.t. the floating-point
    arguments named in `wanted` (default: all present); None for the others."""
    keys = GRADS[op_of(args)]
    wanted = [k for k in (keys if wanted is None else wanted) if args.get(k) is not None]
    # detach() keeps the layout (clone() would make sliced views contiguous)
    args = {k: v.detach().requires_grad_(k in wanted) if k in keys and v is not None else v
            for k, v in args.items()}
    loss = fn(**args, reduction=reduction)
    grads = dict(zip(wanted, torch.autograd.grad(loss, [args[k] for k in wanted])
                     if wanted else ()))
    return [loss.detach(), *(grads.get(k) for k in keys)]


def magnitudes(args):
    """float64 arguments under which every term of every sum in the loss and its gradients
    enters with its magnitude (R / values negated, the other floats absolute; zeros, hence the
    default mask, unchanged): the reference then returns, per output, the sum of |terms|, the
    scale of rounding errors."""
    keys = GRADS[op_of(args)]
    return {k: (-v.abs() if k in ("R", "values") else v.abs()) if k in keys and v is not None
            else v for k, v in args.items()}


def _max_err(x, ref):
    """Largest |x - ref|; inf where x overflowed or is NaN (then only an eager result that
    overflowed in the same dtype can excuse it)."""
    if not ref.numel():
        return 0.0
    return (x.detach().cpu().double() - ref).abs().nan_to_num(nan=float("inf")).max().item()


def assert_close_to_reference(got, args, reduction="sum", wanted=None):
    """got (loss_and_grads's list) against mf_ext/reference.py. float64: to 1e-12. Lower
    precision: the error against the float64 reference (on the CPU, from the same rounded
    inputs) must be within 2x of the eager reference's own error in that dtype on the same
    device (flash-attention's rule), plus a floor for outputs where the eager error happens to
    be ~0: 8 ulps of the output's scale and one eps of the scale of its terms (magnitudes(): a
    sum that cancels keeps an error of that size from the rounding of each term)."""
    reference = masked_mf_loss_reference if op_of(args) == "masked" else \
        observed_mf_loss_reference
    dtype = args["R" if op_of(args) == "masked" else "values"].dtype
    cpu64 = {k: None if v is None else v.detach().cpu().double() if v.is_floating_point()
             else v.cpu() for k, v in args.items()}
    exact = loss_and_grads(reference, cpu64, reduction, wanted)
    eager = loss_and_grads(reference, args, reduction, wanted) if dtype != torch.float64 \
        else exact
    scale = loss_and_grads(reference, magnitudes(cpu64), reduction, wanted) \
        if dtype != torch.float64 else exact
    eps = torch.finfo(dtype).eps
    names = ("loss", *("d" + k for k in GRADS[op_of(args)]))
    for name, a, e, b, s in zip(names, got, eager, exact, scale):
        assert (a is None) == (b is None), name
        if b is None:
            continue
        assert a.dtype == dtype and a.shape == b.shape, name
        finite = b[b.isfinite()]
        size = finite.abs().max().item() if finite.numel() else 0.0
        if dtype == torch.float64:
            torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-12 * (1 + size),
                                       equal_nan=True, msg=lambda m, name=name: f"{name}: {m}")
            continue
        floor = eps * (8 * (1 + size) + (s.abs().max().item() if b.numel() else 0.0))
        err_kernel, err_eager = _max_err(a, b), _max_err(e, b)
        assert err_kernel <= 2 * err_eager + floor, (
            f"{name}: kernel error {err_kernel:.3g} > 2 x eager's {err_eager:.3g} + {floor:.3g}")


def check(backend, args, reduction="sum", wanted=None):
    """The backend's loss and gradients on args, asserted against the reference; returned."""
    got = loss_and_grads(backend.loss(args), args, reduction, wanted)
    assert all(g is None or g.device.type == torch.device(backend.device).type for g in got)
    assert_close_to_reference(got, args, reduction, wanted)
    return got


def assert_agrees_with_cpu_kernel(backend, got, args, reduction):
    """The CUDA kernels (on a GPU or emulated) against the CPU kernel in float32 / float64: the
    same numbers up to the summation order."""
    dtype = args["R" if op_of(args) == "masked" else "values"].dtype
    if backend.name == "cpu" or dtype in HALF:
        return
    cpu = Backend("cpu", "cpu", torch.ops.mf_ext)
    want = cpu.raw(cpu.to(args), reduction, [args.get(k) is not None for k in GRADS[op_of(args)]])
    rtol = 1e-10 if dtype == torch.float64 else 1e-5 if op_of(args) == "masked" else 1e-4
    for a, b in zip(got, want):
        if a is None:
            continue
        atol = rtol * (b.abs().max().item() if b.numel() else 0.0) + 1e-12
        torch.testing.assert_close(a.cpu(), b, rtol=rtol, atol=atol, equal_nan=True)


def assert_equal(a_list, b_list, what=""):
    """Bitwise equal results (None where both are None)."""
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        assert (a is None and b is None) or torch.equal(a, b), f"{what} output {i}"


# The implicit op's problems (tests/test_implicit_mf_loss.py, tests/test_torch_compile.py)

IMPLICIT_FLOATS = ("P", "Q", "values", "weights")


def implicit_problem(m, n, r, nnz, dtype=torch.float64, seed=0, values=True, weights=True,
                     device="cpu", index_dtype=torch.int64, skip_rows=1, skip_cols=1):
    """Random triples (with duplicates when nnz is large), P (r, m), Q (r, n), values in [1, 5),
    weights in [0.5, 1.5) (or None). skip_rows / skip_cols > 1: only every such row / column
    has triples (the others are empty)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, max(-(-m // skip_rows), 1), (nnz,), generator=g) * skip_rows
    cols = torch.randint(0, max(-(-n // skip_cols), 1), (nnz,), generator=g) * skip_cols
    floats = dict(P=torch.rand(r, m, generator=g, dtype=torch.float64) - 0.3,
                  Q=torch.rand(r, n, generator=g, dtype=torch.float64) - 0.3,
                  values=(torch.rand(nnz, generator=g, dtype=torch.float64) * 4 + 1
                          if values else None),
                  weights=(torch.rand(nnz, generator=g, dtype=torch.float64) + 0.5
                           if weights else None))
    args = dict(rows=rows.to(index_dtype).to(device), cols=cols.to(index_dtype).to(device))
    args.update({k: None if v is None else v.to(dtype).to(device) for k, v in floats.items()})
    return args


def implicit_loss_and_grads(fn, args, alpha=1.0, reduction="sum"):
    """fn's loss and the gradients of the floats that are present (None for the others)."""
    args = {k: v.detach().requires_grad_(k in IMPLICIT_FLOATS) if v is not None else v
            for k, v in args.items()}
    loss = fn(**args, unobserved_weight=alpha, reduction=reduction)
    present = [k for k in IMPLICIT_FLOATS if args[k] is not None]
    grads = dict(zip(present, torch.autograd.grad(loss, [args[k] for k in present])))
    return [loss.detach(), *(grads.get(k) for k in IMPLICIT_FLOATS)]


# A sparse R and its dense twin (tests/test_sparse_R.py, tests/test_torch_compile.py)

def dense_problem(m, n, r, dtype=torch.float64, seed=0, observed=0.5, stored_zeros=0.15,
                  device="cpu"):
    """R (m, n) with about `observed` non-zero entries, row 1 and column 2 empty (where they
    exist); `stored` (m, n) bool: the non-zeros plus about `stored_zeros` explicit zeros;
    P (r, m), Q (r, n)."""
    g = torch.Generator().manual_seed(seed)
    R = (torch.rand(m, n, generator=g, dtype=torch.float64) * 4 + 1)
    R = R * (torch.rand(m, n, generator=g) < observed)
    if m > 1:
        R[1] = 0
    if n > 2:
        R[:, 2] = 0
    stored = (R != 0) | (torch.rand(m, n, generator=g) < stored_zeros)
    P = torch.rand(r, m, generator=g, dtype=torch.float64)
    Q = torch.rand(r, n, generator=g, dtype=torch.float64)
    return (R.to(dtype=dtype, device=device), stored.to(device), P.to(dtype=dtype, device=device),
            Q.to(dtype=dtype, device=device))


def sparse_R(R, stored, layout, seed=0):
    """R's entries at `stored` (explicit zeros included) as a sparse tensor of `layout`.
    "coo_uncoalesced": each entry split in two duplicates (a quarter and the rest, so their
    sum is exact), in a shuffled order."""
    indices = stored.nonzero().t()
    values = R[stored]
    coo = torch.sparse_coo_tensor(indices, values, R.shape).coalesce()
    assert coo.values().numel() == int(stored.sum())  # explicit zeros really stored
    if layout == "coo":
        return coo
    if layout == "csr":
        return coo.to_sparse_csr()
    if layout == "csc":
        return coo.to_sparse_csc()
    assert layout == "coo_uncoalesced"
    quarter = values * 0.25
    order = torch.randperm(2 * values.numel(), generator=torch.Generator().manual_seed(seed))
    both_indices = torch.cat([indices, indices], 1)[:, order.to(indices.device)]
    both_values = torch.cat([quarter, values - quarter])[order.to(values.device)]
    unc = torch.sparse_coo_tensor(both_indices, both_values, R.shape)
    assert not unc.is_coalesced() or not values.numel()
    return unc

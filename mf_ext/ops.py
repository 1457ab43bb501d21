"""The operators' Python face: the only module that touches torch.library.

For each op in csrc/mf_ext.cpp it registers a fake kernel (shapes only, for torch.compile and
meta tensors) and autograd, and exposes the public function.
"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Optional

import torch
from torch.autograd.function import once_differentiable


def _check_build_matches(build_info, torch_version: str) -> None:
    """Refuses kernels built against another torch (their C++ ABI differs: loading them can fail
    with an undefined symbol, or worse). build_info: mf_ext/_build_info.py, written by setup.py;
    None for builds that predate it."""
    built = getattr(build_info, "TORCH_VERSION", None)
    if built is not None and built != str(torch_version):
        raise ImportError(
            f"mf_ext: the compiled kernels were built against torch {built}, but torch "
            f"{torch_version} is installed. Rebuild mf_ext with this torch: `python setup.py "
            "build_ext --inplace` in a source checkout (or `./dev build`), or "
            "`pip install --no-build-isolation --force-reinstall --no-deps .`")


try:
    _build_info = importlib.import_module("mf_ext._build_info")
except ImportError:
    _build_info = None
_check_build_matches(_build_info, torch.__version__)

try:
    from mf_ext import _C  # noqa: F401  (loading the library registers the kernels)
except ImportError as exc:  # pragma: no cover - exercised only by broken installs
    raise ImportError(
        f"mf_ext: the compiled kernels (mf_ext._C) could not be loaded: {exc}\n"
        f"They must be built against the torch in use (torch {torch.__version__}). Rebuild with "
        "`python setup.py build_ext --inplace` (or `pip install --no-build-isolation .`)."
    ) from exc

_REDUCTIONS = ("sum", "mean")


# Whether the running backward pass keeps the graph (retain_graph / create_graph): a private
# torch function; without it every gradient is scaled into a new tensor, as before.
_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def _may_scale_saved_in_place(grad_loss: torch.Tensor, saved: torch.Tensor) -> bool:
    """Whether backward may scale a saved gradient in place and hand that tensor on, sparing a
    copy of every gradient (2·r·(m + n) values for the dense op). Only in plain eager autograd
    with the graph not kept: autograd then frees the saved tensors right after this backward,
    so nothing reads them again. Never while tracing (torch.compile, make_fx, fake or functional
    tensors), where a mutation of a backward input would be recorded or refused."""
    return (_keep_graph is not None
            and type(grad_loss) is torch.Tensor and type(saved) is torch.Tensor
            and not torch.compiler.is_compiling()
            and torch.utils._python_dispatch._get_current_dispatch_mode() is None
            and not _keep_graph())


def _register_autograd(op: str, grad_inputs, first_flag: int, num_inputs: int,
                       namespace: str = "mf_ext") -> None:
    """Autograd for <namespace>::<op>_and_grads (the tests' emulated CUDA ops use another namespace), whose outputs are (loss, *gradients): the forward
    pass computes the gradient of each input of `grad_inputs` ((position, name) pairs, in the
    order of the op's grad_* flags, which start at input `first_flag`) when its flag is set, an
    empty tensor otherwise; the backward only scales the saved gradients by the incoming one
    (in place when no one can see them again: _may_scale_saved_in_place). The raw op's gradient
    outputs are those saved tensors, so a caller of torch.ops.mf_ext.*_and_grads who keeps them
    sees them scaled by the loss's gradient after an eager backward; mf_ext's functions never
    hand them out."""

    def setup_context(ctx, inputs, output):
        ctx.grad_flags = tuple(inputs[first_flag:first_flag + len(grad_inputs)])
        ctx.save_for_backward(*output[1:])
        ctx.mark_non_differentiable(*output[1:])
        # The gradient outputs get no incoming gradient: without this, autograd would fill a
        # zero tensor of each one's size (2·r·(m + n) values) just to hand it to backward.
        ctx.set_materialize_grads(False)

    @once_differentiable  # the saved gradients are constants: a second derivative would be wrong
    def backward(ctx, grad_loss, *_grad_outputs):
        grads = [None] * num_inputs
        if grad_loss is None:  # not materialized (see setup_context): no gradient reaches the loss
            return tuple(grads)
        for (index, name), flag, g in zip(grad_inputs, ctx.grad_flags, ctx.saved_tensors):
            if not ctx.needs_input_grad[index]:
                continue
            if not flag:
                raise RuntimeError(
                    f"mf_ext.{op}: {name} requires grad but the op was called with "
                    f"grad_{name}=False; call mf_ext.{op}, which sets the flags")
            grads[index] = (g.mul_(grad_loss) if _may_scale_saved_in_place(grad_loss, g)
                            else grad_loss * g)
        return tuple(grads)

    torch.library.register_autograd(f"{namespace}::{op}_and_grads", backward,
                                    setup_context=setup_context)


# ---------------------------------------------------------------- masked_mf_loss (dense form)

def _check_masked_mf_loss_args(R, P, Q, mask, reduction) -> None:
    """The same checks, with the same messages, as csrc/masked_mf_loss_common.h; run here for
    fake tensors (torch.compile, meta), where the C++ kernel does not run."""
    op = "mf_ext.masked_mf_loss"
    if reduction not in _REDUCTIONS:
        raise ValueError(f'{op}: reduction must be "sum" or "mean", got "{reduction}"')
    for name, t, dims in (("R", R, "(m, n)"), ("P", P, "(r, m)"), ("Q", Q, "(r, n)")):
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D {dims}, got shape {list(t.shape)}")
    for name, t in (("R", R), ("P", P), ("Q", Q)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if not (P.dtype == R.dtype == Q.dtype):
        raise TypeError(f"{op}: R, P and Q must have the same dtype, got R {R.dtype}, "
                        f"P {P.dtype}, Q {Q.dtype}")
    if P.shape[0] != Q.shape[0]:
        raise ValueError(f"{op}: P has rank {P.shape[0]} (shape {list(P.shape)}) but Q has rank "
                         f"{Q.shape[0]} (shape {list(Q.shape)})")
    if P.shape[1] != R.shape[0]:
        raise ValueError(f"{op}: P has {P.shape[1]} columns but R has {R.shape[0]} rows")
    if Q.shape[1] != R.shape[1]:
        raise ValueError(f"{op}: Q has {Q.shape[1]} columns but R has {R.shape[1]} columns")
    if not (P.device == R.device == Q.device):
        raise ValueError(f"{op}: R, P and Q must be on the same device, got R on {R.device}, "
                         f"P on {P.device}, Q on {Q.device}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"{op}: mask must be a bool tensor, got {mask.dtype}")
        if mask.shape != R.shape:
            raise ValueError(f"{op}: mask has shape {list(mask.shape)} but R has shape "
                             f"{list(R.shape)}")
        if mask.device != R.device:
            raise ValueError(f"{op}: mask is on {mask.device} but R is on {R.device}")


def _factor_grad_fake(R, X):
    """grad_P / grad_Q as the dense and observed kernels allocate them (csrc/factor_grad_layout.h;
    R: any tensor of the outputs' dtype and device): on the CPU, the .T of a contiguous table when
    X (r, m) is one (an nn.Embedding weight's .T), so that autograd hands the table its gradient
    without a copy; contiguous otherwise."""
    r, m = X.shape
    if X.device.type == "cpu" and not X.is_contiguous() and X.t().is_contiguous():
        return R.new_empty((m, r)).t()
    return R.new_empty((r, m))


@torch.library.register_fake("mf_ext::masked_mf_loss_and_grads")
def _masked_mf_loss_and_grads_fake(R, P, Q, mask, reduction, grad_R, grad_P, grad_Q):
    _check_masked_mf_loss_args(R, P, Q, mask, reduction)
    none = R.new_empty((0,))
    return (
        R.new_empty(()),
        torch.empty_like(R) if grad_R else none,  # the kernels use at::empty_like(R) too
        _factor_grad_fake(R, P) if grad_P else none.clone(),
        _factor_grad_fake(R, Q) if grad_Q else none.clone(),
    )


_MASKED_AUTOGRAD = dict(op="masked_mf_loss", grad_inputs=((0, "R"), (1, "P"), (2, "Q")),
                        first_flag=5, num_inputs=8)
_register_autograd(**_MASKED_AUTOGRAD)


def masked_mf_loss(
    R: torch.Tensor,
    P: torch.Tensor,
    Q: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """Σ_Ω (R − PᵀQ)² and, in the same fused pass, the gradients autograd will need.

    R: (m, n); P: (r, m); Q: (r, n), one dtype and device, any strides: float32 or float64 on
    the CPU; on CUDA also float16 and bfloat16 (computed in float32, returned in the input dtype).
    P = table_P.T, Q = table_Q.T of (m, r) / (n, r) tables (nn.Embedding weights) are read in
    place, and on the CPU the tables receive their gradients without a copy.
    mask: (m, n) bool, or None for Ω = {R ≠ 0} (the notebook's rule).
    reduction: "sum" (the notebook's) or "mean" over Ω (0 when Ω is empty).
    Returns a 0-dim tensor of R's dtype. Gradients flow to whichever of R, P, Q require grad
    (first derivatives only). NaN or Inf in the inputs propagate exactly as in the reference:
    the error is multiplied by the mask, so a NaN even at an unobserved entry gives a NaN loss.

    R may also be a sparse COO, CSR or CSC tensor (m, n): its stored entries go through the
    observed-entries kernel and R is never densified; see `_sparse_masked_mf_loss`.
    """
    if not isinstance(reduction, str):
        raise TypeError(f"mf_ext.masked_mf_loss: reduction must be a str, got {type(reduction)}")
    if R.layout != torch.strided:  # static: a dense R runs and traces exactly as before
        return _sparse_masked_mf_loss(R, P, Q, mask, reduction)
    grad = torch.is_grad_enabled()
    loss, _, _, _ = torch.ops.mf_ext.masked_mf_loss_and_grads(
        R, P, Q, mask, reduction,
        grad and R.requires_grad, grad and P.requires_grad, grad and Q.requires_grad,
    )
    return loss


# ---------------------------------------------------------------- masked_mf_loss with a sparse R

_SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc)


def _sparse_entries(R: torch.Tensor):
    """(rows, cols, values) of a sparse R's stored entries, values differentiable w.r.t. R.

    An uncoalesced COO R is coalesced first: torch's meaning of repeated indices is their sum
    (R.to_dense() adds them up), so the loss sees one entry per position, as the dense op does.
    CSR / CSC must hold torch's invariants (sorted, unique indices per row / column), which
    torch itself assumes; repeated positions there would each count once per occurrence.
    """
    if R.layout == torch.sparse_coo:
        if not R.is_coalesced():
            R = R.coalesce()
        indices = R.indices()
        return indices[0], indices[1], R.values()
    if R.layout == torch.sparse_csr:
        compressed, plain, size = R.crow_indices(), R.col_indices(), R.shape[0]
    else:
        compressed, plain, size = R.ccol_indices(), R.row_indices(), R.shape[1]
    values = R.values()
    # output_size is known on the host, so this expansion does not wait for the device
    expanded = torch.repeat_interleave(
        torch.arange(size, dtype=compressed.dtype, device=compressed.device),
        compressed.diff(), output_size=values.shape[0])
    if R.layout == torch.sparse_csr:
        return expanded, plain, values
    return plain, expanded, values


def _eager_only(fn):
    """torch.compiler.disable(fn), applied at the first call rather than at import: disabling
    imports torch._dynamo, about half the cost of `import mf_ext` (~2 s of CPU here), which every
    CLI start and subprocess would pay even when nothing is compiled."""
    disabled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return call


# Dynamo refuses sparse tensors, and tracing this route's dense pieces after that graph break
# hit an internal Dynamo error (torch 2.14): it always runs eagerly.
@_eager_only
def _sparse_masked_mf_loss(R, P, Q, mask, reduction) -> torch.Tensor:
    """masked_mf_loss for a sparse R (m, n): the same function as for R.to_dense(), computed by
    the observed-entries kernel over R's stored entries, without an m×n tensor.

    Ω = the stored entries whose value is not 0 (a stored 0 is not observed, a stored NaN is):
    every stored entry goes to the kernel with weight (value ≠ 0), so the shapes never depend on
    the data (no boolean indexing, no host sync added to the kernel's own; only coalescing an
    uncoalesced COO waits for the device). "mean" divides by |Ω|, 0 when Ω is empty.
    The gradient w.r.t. R is a sparse tensor of R's layout holding the dense op's ∂L/∂R at the
    stored positions (an uncoalesced COO R gets it coalesced). torch 2.14 cannot accumulate a
    gradient into a CSC leaf's .grad (its AccumulateGrad raises): use torch.autograd.grad there,
    or COO / CSR. Only R's stored entries are read: a NaN/Inf in PᵀQ at a position R does not
    store leaves the loss finite, where the dense op (which multiplies every error by the mask)
    would give NaN. torch.compile: Dynamo refuses sparse tensors (with fullgraph=True it raises
    its "does not support sparse Tensors"; otherwise the call runs eagerly); the dense path
    compiles as before, with no guard or graph break added.
    """
    op = "mf_ext.masked_mf_loss"
    if R.layout not in _SPARSE_LAYOUTS:
        raise TypeError(f"{op}: R must be a dense (strided) tensor or a sparse COO, CSR or CSC "
                        f"tensor, got layout {R.layout}")
    if R.dense_dim() != 0 or R.dim() != 2:
        raise ValueError(f"{op}: a sparse R must be a plain 2-D (m, n) matrix, got shape "
                         f"{list(R.shape)} with layout {R.layout} ({R.sparse_dim()} sparse and "
                         f"{R.dense_dim()} dense dimensions)")
    if mask is not None:
        raise ValueError(f"{op}: mask must be None when R is sparse ({R.layout}): R's stored "
                         f"non-zero entries are the observed set; got a mask of shape "
                         f"{list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask)}")
    for name, t in (("P", P), ("Q", Q)):
        if t.layout != torch.strided:
            raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got layout "
                            f"{t.layout}")
    _check_masked_mf_loss_args(R, P, Q, None, reduction)
    if R.device.type == "cpu" and R.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: the CPU kernel supports float32 and float64, got {R.dtype}")
    rows, cols, values = _sparse_entries(R)
    observed = values != 0
    loss = observed_mf_loss(rows, cols, values, P, Q, weights=observed.to(values.dtype),
                            reduction=reduction)
    if reduction == "mean":
        # The kernel's mean divides by the stored count (in its float32/float64 accumulator,
        # so float16 sums cannot overflow); rescale to |Ω|, by exactly 1 when no stored 0.
        scale = values.shape[0] / observed.sum().clamp_min(1).double()
        loss = (loss.double() * scale).to(loss.dtype)
    return loss


# ---------------------------------------------------------------- observed_mf_loss (triples)

def _check_observed_mf_loss_args(rows, cols, values, P, Q, row_bias, col_bias, weights,
                                 reduction) -> None:
    """The same checks, with the same messages, as csrc/observed_mf_loss_common.h; run here for
    fake tensors (torch.compile, meta), where the C++ kernel does not run. Index ranges need the
    data, so only the kernels check them."""
    op = "mf_ext.observed_mf_loss"
    if reduction not in _REDUCTIONS:
        raise ValueError(f'{op}: reduction must be "sum" or "mean", got "{reduction}"')
    for name, t in (("rows", rows), ("cols", cols)):
        if t.dim() != 1:
            raise ValueError(f"{op}: {name} must be 1-D (nnz,), got shape {list(t.shape)}")
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: {name} must be an int32 or int64 tensor, got {t.dtype}")
    if values.dim() != 1:
        raise ValueError(f"{op}: values must be 1-D (nnz,), got shape {list(values.shape)}")
    if not (rows.shape[0] == cols.shape[0] == values.shape[0]):
        raise ValueError(f"{op}: rows, cols and values must have the same length, got rows "
                         f"{rows.shape[0]}, cols {cols.shape[0]}, values {values.shape[0]}")
    for name, t, dims in (("P", P, "(r, m)"), ("Q", Q, "(r, n)")):
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D {dims}, got shape {list(t.shape)}")
    if not values.dtype.is_floating_point:
        raise TypeError(f"{op}: values must be a floating-point tensor, got {values.dtype}")
    if not (P.dtype == values.dtype == Q.dtype):
        raise TypeError(f"{op}: values, P and Q must have the same dtype, got values "
                        f"{values.dtype}, P {P.dtype}, Q {Q.dtype}")
    if P.shape[0] != Q.shape[0]:
        raise ValueError(f"{op}: P has rank {P.shape[0]} (shape {list(P.shape)}) but Q has rank "
                         f"{Q.shape[0]} (shape {list(Q.shape)})")
    if not (rows.device == cols.device == values.device == P.device == Q.device):
        raise ValueError(f"{op}: rows, cols, values, P and Q must be on the same device, got "
                         f"rows on {rows.device}, cols on {cols.device}, values on "
                         f"{values.device}, P on {P.device}, Q on {Q.device}")
    for name, t, expected, what in (
        ("row_bias", row_bias, P.shape[1], "m, the columns of P"),
        ("col_bias", col_bias, Q.shape[1], "n, the columns of Q"),
        ("weights", weights, values.shape[0], "nnz, the length of values"),
    ):
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != expected:
            raise ValueError(f"{op}: {name} must have shape ({expected},) ({what}), got shape "
                             f"{list(t.shape)}")
        if t.dtype != values.dtype:
            raise TypeError(f"{op}: {name} must have the dtype of values ({values.dtype}), got "
                            f"{t.dtype}")
        if t.device != values.device:
            raise ValueError(f"{op}: {name} is on {t.device} but values is on {values.device}")


@torch.library.register_fake("mf_ext::observed_mf_loss_and_grads")
def _observed_mf_loss_and_grads_fake(rows, cols, values, P, Q, row_bias, col_bias, weights,
                                     reduction, grad_values, grad_P, grad_Q, grad_row_bias,
                                     grad_col_bias, grad_weights):
    _check_observed_mf_loss_args(rows, cols, values, P, Q, row_bias, col_bias, weights,
                                 reduction)
    for flag, name, t in ((grad_row_bias, "row_bias", row_bias),
                          (grad_col_bias, "col_bias", col_bias), (grad_weights, "weights", weights)):
        if flag and t is None:
            raise ValueError(f"mf_ext.observed_mf_loss: grad_{name}=True but {name} is None")
    nnz, m, n = values.shape[0], P.shape[1], Q.shape[1]

    def maybe(wanted, shape):
        return values.new_empty(shape if wanted else (0,))

    return (
        values.new_empty(()),
        maybe(grad_values, (nnz,)),
        _factor_grad_fake(values, P) if grad_P else maybe(False, ()),
        _factor_grad_fake(values, Q) if grad_Q else maybe(False, ()),
        maybe(grad_row_bias, (m,)),
        maybe(grad_col_bias, (n,)),
        maybe(grad_weights, (nnz,)),
    )


# The inputs that can carry a gradient, by position, in the order of their grad_* flags.
_OBSERVED_AUTOGRAD = dict(op="observed_mf_loss", grad_inputs=(
    (2, "values"), (3, "P"), (4, "Q"), (5, "row_bias"), (6, "col_bias"), (7, "weights")),
    first_flag=9, num_inputs=15)
_register_autograd(**_OBSERVED_AUTOGRAD)


def observed_mf_loss(
    rows: torch.Tensor,
    cols: torch.Tensor,
    values: torch.Tensor,
    P: torch.Tensor,
    Q: torch.Tensor,
    row_bias: Optional[torch.Tensor] = None,
    col_bias: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """Σ_t w_t (values_t − P[:, i]ᵀQ[:, j] − row_bias[i] − col_bias[j])², i = rows_t, j = cols_t,
    computed with its gradients in one fused pass over the triples.

    rows, cols: (nnz,) int32 or int64, each in [0, m) / [0, n). Out of range raises IndexError:
    on the CPU from this call; on CUDA, with no host sync, from the next call on the same device
    that starts after the GPU has finished this one (this call's loss is NaN and the bad triples
    are skipped); check_observed_indices raises it at once.
    values: (nnz,); P: (r, m); Q: (r, n); row_bias: (m,) or None; col_bias: (n,) or None;
    weights: (nnz,) or None (all 1). Floats are float32 or float64 (on CUDA also float16 and
    bfloat16, accumulated in float32), all of one dtype and device; any strides. The triples
    may come in any order; a repeated (i, j) counts once per occurrence. On CUDA the gradients
    are summed with atomics (last bits may vary) unless torch.use_deterministic_algorithms(True).
    reduction: "sum", or "mean", which divides by nnz — the unweighted count of triples, not the
    sum of the weights — and gives 0 when nnz == 0.
    Returns a 0-dim tensor of values' dtype. Gradients flow to whichever of values, P, Q,
    row_bias, col_bias, weights require grad (first derivatives only).
    """
    if not isinstance(reduction, str):
        raise TypeError(f"mf_ext.observed_mf_loss: reduction must be a str, got {type(reduction)}")
    grad = torch.is_grad_enabled()

    def wants(t):
        return grad and t is not None and t.requires_grad

    loss = torch.ops.mf_ext.observed_mf_loss_and_grads(
        rows, cols, values, P, Q, row_bias, col_bias, weights, reduction,
        wants(values), wants(P), wants(Q), wants(row_bias), wants(col_bias), wants(weights),
    )[0]
    return loss


def check_observed_indices(rows: torch.Tensor, cols: torch.Tensor, m: int, n: int) -> None:
    """Raises the IndexError observed_mf_loss raises for these indices (the lowest bad position;
    its row when both are bad), at once on any device, with one host sync. For triples that did
    not come through MatrixFactorization's id maps (in range by construction): on CUDA the op
    itself reports a bad index only at the device's next call. rows, cols: (nnz,) int tensors;
    m, n: the columns of P and of Q."""
    bad_rows = (rows < 0) | (rows >= m)
    bad = bad_rows | (cols < 0) | (cols >= n)
    positions = torch.nonzero(bad).flatten()  # the one sync
    if positions.numel() == 0:
        return
    t = int(positions[0])
    name, value, size, what = (("rows", rows, m, "m, the columns of P") if bool(bad_rows[t])
                               else ("cols", cols, n, "n, the columns of Q"))
    raise IndexError(f"mf_ext.observed_mf_loss: {name}[{t}] = {int(value[t])} is out of range: "
                     f"{name} must lie in [0, {size}) ({what})")


# ---------------------------------------------------------------- partitions (internal, for tests)

def _observed_partition(rows: torch.Tensor, cols: torch.Tensor, P: torch.Tensor,
                        Q: torch.Tensor) -> dict:
    """How the CPU kernel of observed_mf_loss cuts the triples (rows, cols) for P (r, m), Q (r, n)
    (their shapes and dtype, and MF_EXT_OBSERVED_PATH): {"outer": "rows" or "cols",
    "outer_block_size", "inner_block_size" (indices per block), "outer_blocks", "inner_blocks",
    "tiles" (ints), "path" ("chunks": one fused pass; "units": two passes, for large inputs),
    "segments" (triples per bucketing segment), "chunks" (triples per unit of parallel work of
    the (first) pass), "inner_units" (triples per unit of the second pass; [] on path
    "chunks")}, computed by the kernel's own code. Out-of-range indices raise IndexError."""
    flat = torch.ops.mf_ext._observed_partition(rows, cols, P, Q)
    (rows_outer, outer_size, inner_size, outer_blocks, inner_blocks, units, segments, chunks,
     inner_units) = flat[:9]
    lists = flat[9:]
    return {
        "outer": "rows" if rows_outer else "cols",
        "outer_block_size": outer_size,
        "inner_block_size": inner_size,
        "outer_blocks": outer_blocks,
        "inner_blocks": inner_blocks,
        "tiles": outer_blocks * inner_blocks,
        "path": "units" if units else "chunks",
        "segments": list(lists[:segments]),
        "chunks": list(lists[segments:segments + chunks]),
        "inner_units": list(lists[segments + chunks:segments + chunks + inner_units]),
    }


def _dense_partition(R: torch.Tensor, P: torch.Tensor, Q: torch.Tensor) -> dict:
    """How the CPU kernel of masked_mf_loss cuts R (m, n) (its shape, strides and dtype, P's rank,
    and MF_EXT_DENSE_PATH) into units: {"transposed" (the kernel reads R column-major), "path"
    ("rowwise" or "tiled": the unit kernel that runs), "row_groups", "col_groups" (of R's rows
    and columns), "tasks" (cells per unit, in unit order), "task_ranges" (each unit's
    (row_begin, row_end, col_begin, col_end) in R), "concurrent" (how many units can run at once:
    units that share a row group, or a column group and its gradient accumulator, run one after
    the other in a fixed order)}, computed by the kernel's own code."""
    flat = torch.ops.mf_ext._dense_partition(R, P, Q)
    transposed, path, row_groups, col_groups, tasks, concurrent = flat[:6]
    cells = [tuple(flat[6 + 4 * t:10 + 4 * t]) for t in range(tasks)]
    return {
        "transposed": bool(transposed),
        "path": ("rowwise", "tiled")[path],
        "row_groups": row_groups,
        "col_groups": col_groups,
        "tasks": [(i1 - i0) * (j1 - j0) for i0, i1, j0, j1 in cells],
        "task_ranges": cells,
        "concurrent": concurrent,
    }


# ---------------------------------------------------------------- implicit_mf_loss (all cells)

def _cpp_name(dtype: torch.dtype) -> str:
    """A dtype as the C++ checks print it (Float, Double, ...), so both raise one message."""
    return {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
            torch.bfloat16: "BFloat16", torch.int32: "Int", torch.int64: "Long"}.get(dtype,
                                                                                  str(dtype))


def _check_implicit_mf_loss_args(rows, cols, P, Q, values, weights, unobserved_weight,
                                 reduction, grad_values, grad_weights) -> None:
    """The same checks, in the same order and with the same messages, as
    csrc/implicit_mf_loss_common.h; run here for fake tensors (torch.compile, meta), where the
    C++ kernel does not run. Index ranges and weights' signs need the data: the kernels check
    them."""
    op = "mf_ext.implicit_mf_loss"
    if reduction not in _REDUCTIONS:
        raise ValueError(f'{op}: reduction must be "sum" or "mean", got "{reduction}"')
    for name, t in (("rows", rows), ("cols", cols)):
        if t.dim() != 1:
            raise ValueError(f"{op}: {name} must be 1-D (nnz,), got shape {list(t.shape)}")
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: {name} must be an int32 or int64 tensor, got "
                            f"{_cpp_name(t.dtype)}")
    if rows.shape[0] != cols.shape[0]:
        raise ValueError(f"{op}: rows and cols must have the same length, got rows "
                         f"{rows.shape[0]}, cols {cols.shape[0]}")
    for name, t, dims in (("P", P, "(r, m)"), ("Q", Q, "(r, n)")):
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D {dims}, got shape {list(t.shape)}")
    if not P.dtype.is_floating_point:
        raise TypeError(f"{op}: P must be a floating-point tensor, got {_cpp_name(P.dtype)}")
    if Q.dtype != P.dtype:
        raise TypeError(f"{op}: P and Q must have the same dtype, got P {_cpp_name(P.dtype)}, "
                        f"Q {_cpp_name(Q.dtype)}")
    if P.shape[0] != Q.shape[0]:
        raise ValueError(f"{op}: P has rank {P.shape[0]} (shape {list(P.shape)}) but Q has rank "
                         f"{Q.shape[0]} (shape {list(Q.shape)})")
    if not (rows.device == cols.device == P.device == Q.device):
        raise ValueError(f"{op}: rows, cols, P and Q must be on the same device, got rows on "
                         f"{rows.device}, cols on {cols.device}, P on {P.device}, Q on "
                         f"{Q.device}")
    nnz = rows.shape[0]
    for name, t in (("values", values), ("weights", weights)):
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != nnz:
            raise ValueError(f"{op}: {name} must have shape ({nnz},) (nnz, the length of rows), "
                             f"got shape {list(t.shape)}")
        if t.dtype != P.dtype:
            raise TypeError(f"{op}: {name} must have the dtype of P ({_cpp_name(P.dtype)}), got "
                            f"{_cpp_name(t.dtype)}")
        if t.device != P.device:
            raise ValueError(f"{op}: {name} is on {t.device} but P is on {P.device}")
    if not (math.isfinite(unobserved_weight) and unobserved_weight >= 0):
        raise ValueError(f"{op}: unobserved_weight must be a finite number >= 0, got "
                         f"{unobserved_weight}")
    for flag, name, t in ((grad_values, "values", values), (grad_weights, "weights", weights)):
        if flag and t is None:
            raise ValueError(f"{op}: grad_{name}=True but {name} is None")
    if P.device.type == "cpu" and P.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: the CPU kernel supports float32 and float64, got "
                        f"{_cpp_name(P.dtype)}")


@torch.library.register_fake("mf_ext::implicit_mf_loss_and_grads")
def _implicit_mf_loss_and_grads_fake(rows, cols, P, Q, values, weights, unobserved_weight,
                                     reduction, grad_values, grad_P, grad_Q, grad_weights):
    _check_implicit_mf_loss_args(rows, cols, P, Q, values, weights, unobserved_weight, reduction,
                                 grad_values, grad_weights)
    nnz, r, m, n = rows.shape[0], P.shape[0], P.shape[1], Q.shape[1]

    def maybe(wanted, shape):
        return P.new_empty(shape if wanted else (0,))

    return (P.new_empty(()), maybe(grad_values, (nnz,)), maybe(grad_P, (r, m)),
            maybe(grad_Q, (r, n)), maybe(grad_weights, (nnz,)))


_register_autograd("implicit_mf_loss", ((4, "values"), (2, "P"), (3, "Q"), (5, "weights")),
                   first_flag=8, num_inputs=12)


def implicit_mf_loss(
    rows: torch.Tensor,
    cols: torch.Tensor,
    P: torch.Tensor,
    Q: torch.Tensor,
    values: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    unobserved_weight: float = 1.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """The implicit-feedback (all-cells, iALS) loss, with its gradients in one fused pass:

        L = Σ_t w_t (v_t − P[:, i]ᵀQ[:, j])² + α₀ Σ_{i<m, j<n} (P[:, i]ᵀQ[:, j])²,

    i = rows_t, j = cols_t, α₀ = unobserved_weight. The second sum runs over all m·n cells but is
    computed as α₀ ⟨P Pᵀ, Q Qᵀ⟩ with the r × r Gram matrices: the cost is O(nnz·r + (m+n)·r²)
    and nothing of size m × n or nnz × r is formed. The first sum is observed_mf_loss's.

    rows, cols: (nnz,) int32 or int64, in [0, m) / [0, n) (out of range raises IndexError);
    P: (r, m); Q: (r, n), any strides (the embedding layout `weight.T` of an (m, r) table is as
    fast as (r, m)); values: (nnz,) or None (all 1); weights: (nnz,), ≥ 0, or None (all 1); a
    negative or NaN weight raises ValueError. Floats: float32 or float64 (on CUDA also float16 and
    bfloat16, accumulated in float32), one dtype and device. A repeated (i, j) counts once per
    occurrence in the first sum. unobserved_weight: a finite number ≥ 0; 0 gives exactly
    observed_mf_loss (bit for bit).
    reduction: "sum", or "mean", which divides the whole L (both sums) by nnz, the unweighted
    count of triples, or by 1 when nnz == 0 (then L is the all-cells term alone); with
    unobserved_weight=0 both reductions equal observed_mf_loss's.
    Returns a 0-dim tensor of P's dtype. Gradients flow to whichever of P, Q, values, weights
    require grad (first derivatives only). The CPU kernel gives bitwise the same result for any
    thread count. On CUDA, checking the weights' signs costs one host synchronization (besides
    the observed op's index check).

    Hu, Koren & Volinsky's confidence form Σ_obs c (1 − x)² + Σ_unobs x² (c = 1 + α·r_ui) is,
    up to a constant, weights = c − 1, values = c / (c − 1), unobserved_weight = 1 (README).
    """
    op = "mf_ext.implicit_mf_loss"
    if not isinstance(reduction, str):
        raise TypeError(f"{op}: reduction must be a str, got {type(reduction)}")
    if isinstance(unobserved_weight, bool) or not isinstance(unobserved_weight, (int, float)):
        raise TypeError(f"{op}: unobserved_weight must be a float, got "
                        f"{type(unobserved_weight).__name__}")
    grad = torch.is_grad_enabled()

    def wants(t):
        return grad and t is not None and t.requires_grad

    return torch.ops.mf_ext.implicit_mf_loss_and_grads(
        rows, cols, P, Q, values, weights, float(unobserved_weight), reduction,
        wants(values), wants(P), wants(Q), wants(weights),
    )[0]

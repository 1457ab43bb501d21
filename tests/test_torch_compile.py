"""torch.compile of the ops: fullgraph traces (Dynamo, the fake kernels, autograd) through
aot_eager, Inductor, on CUDA CUDA graphs, and the sparse-R path under Dynamo.

In one module so that one xdist worker pays torch.compile's start-up once (`--dist loadscope`
runs a module on one worker): Dynamo's first trace costs seconds, Inductor's first C++ compile
in a process about 10 CPU-s with a cold cache, and a later graph only about 2."""

from __future__ import annotations

import pytest
import torch

from helpers import (cases, dense_problem, implicit_loss_and_grads, implicit_problem,
                     loss_and_grads, random_problem, random_triples, sparse_R)
from mf_ext import implicit_mf_loss, masked_mf_loss, observed_mf_loss

F64, F32 = torch.float64, torch.float32
# test_sparse_R.py's filters: its sparse tensors warn that sparse CSR support is in beta
SPARSE_WARNINGS = pytest.mark.filterwarnings(
    "ignore:Sparse CSR tensor support is in beta state",
    "ignore:Sparse invariant checks are implicitly disabled")


# ------------------------------------------------------------------------ masked_mf_loss

@cases(lambda backend, mode, **_: backend == "cuda" or backend == "cpu" and mode is None)
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
def test_masked_fullgraph(backend, dtype, mode):
    """Inductor; on CUDA also CUDA graphs (reduce-overhead records one on a later call, then
    replays it). The CPU's float32 case through aot_eager: the same fullgraph trace (fake kernel,
    autograd) without a second cold Inductor C++ compile, the slowest step of this test."""
    torch._dynamo.reset()
    args = random_problem(33, 47, 5, dtype, mask=True, device=backend.device)

    def step(R, P, Q, M):
        return masked_mf_loss(R, P, Q) + 0.5 * masked_mf_loss(R, P, Q, M, "mean")

    def masked_loss_and_grads(fn):
        P, Q = (args[k].clone().requires_grad_() for k in "PQ")
        loss = fn(args["R"], P, Q, args["mask"])
        loss.backward()
        return [loss.detach(), P.grad, Q.grad]

    inductor = backend.name != "cpu" or dtype == F64
    compiled = torch.compile(step, fullgraph=True, mode=mode,
                             backend="inductor" if inductor else "aot_eager")
    want = masked_loss_and_grads(step)
    for _ in range(3):
        for a, b in zip(masked_loss_and_grads(compiled), want):
            torch.testing.assert_close(a, b)


def test_bad_input_under_compile_names_the_argument():
    """(The eager errors: tests/bad_input_cases.py.)"""
    R, P, Q, _ = random_problem(5, 4, 2).values()
    compiled = torch.compile(masked_mf_loss, fullgraph=True)
    with pytest.raises(Exception, match=r"P has 4 columns but R has 5 rows"):
        compiled(R, P[:, :4], Q)


# ------------------------------------------------------------------------ observed_mf_loss

@cases(lambda backend, compiler, **_: backend == "cuda" or backend == "cpu" and
       compiler != "reduce-overhead")
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor", "reduce-overhead"])
def test_observed_fullgraph(backend, compiler):
    """aot_eager (bitwise the eager result), inductor, and on CUDA CUDA graphs ("reduce-overhead":
    the op runs under stream capture, where it skips its host-side index check; it records a
    graph on a later call, then replays it)."""
    torch._dynamo.reset()
    args = random_triples(33, 21, 5, 600, F32, biases=True, weights=True, device=backend.device)
    kwargs = dict(backend="aot_eager") if compiler == "aot_eager" else \
        dict(mode="reduce-overhead" if compiler == "reduce-overhead" else None)

    @torch.compile(fullgraph=True, **kwargs)
    def step(rows, cols, values, P, Q, row_bias, col_bias, weights):
        return observed_mf_loss(rows, cols, values, P, Q, row_bias, col_bias, weights, "mean") * 2

    want = loss_and_grads(lambda reduction, **a: observed_mf_loss(**a, reduction=reduction) * 2,
                          args, "mean")
    tolerance = dict(rtol=0, atol=0) if compiler == "aot_eager" else dict(rtol=1e-5, atol=1e-6)
    for _ in range(3):
        got = loss_and_grads(lambda reduction, **a: step(**a), args)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **tolerance)


# ------------------------------------------------------------------------ implicit_mf_loss

# inductor on the CPU compiles C++ for half a minute: CUDA only, to keep the suite fast
@cases(lambda backend, compiler, **_: backend == "cuda" or backend == "cpu" and
       compiler == "aot_eager")
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_implicit_fullgraph(backend, compiler):
    torch._dynamo.reset()
    args = implicit_problem(33, 21, 5, 600, F32, device=backend.device)
    kwargs = dict(backend="aot_eager") if compiler == "aot_eager" else {}

    @torch.compile(fullgraph=True, **kwargs)
    def step(rows, cols, P, Q, values, weights, unobserved_weight, reduction):
        return implicit_mf_loss(rows, cols, P, Q, values, weights, unobserved_weight,
                                reduction) * 2

    def eager(**a):
        return implicit_mf_loss(**a) * 2

    want = implicit_loss_and_grads(eager, args, 0.4, "mean")
    tolerance = dict(rtol=0, atol=0) if compiler == "aot_eager" else dict(rtol=1e-5, atol=1e-6)
    for _ in range(2):
        got = implicit_loss_and_grads(step, args, 0.4, "mean")
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **tolerance)


# ------------------------------------------------------------------------ masked_mf_loss, sparse R

@SPARSE_WARNINGS
def test_dense_path_still_compiles_fullgraph():
    R, stored, P, Q = dense_problem(9, 7, 2)
    compiled = torch.compile(masked_mf_loss, fullgraph=True, backend="eager")
    P.requires_grad_(True)
    loss = compiled(R, P, Q, reduction="mean")
    (dP,) = torch.autograd.grad(loss, P)
    (dP_eager,) = torch.autograd.grad(masked_mf_loss(R, P, Q, reduction="mean"), P)
    torch.testing.assert_close(dP, dP_eager, rtol=0, atol=0)


@SPARSE_WARNINGS
def test_sparse_R_under_torch_compile():
    """Dynamo refuses sparse tensors (torch 2.14): fullgraph=True raises torch's own error;
    without fullgraph the call runs eagerly and gives the eager result."""
    R, stored, P, Q = dense_problem(9, 7, 2)
    Rs = sparse_R(R, stored, "csr")
    with pytest.raises(Exception, match="sparse"):
        torch.compile(masked_mf_loss, fullgraph=True, backend="eager")(Rs, P, Q)
    got = torch.compile(masked_mf_loss, backend="eager")(Rs, P, Q, reduction="mean")
    assert torch.equal(got, masked_mf_loss(Rs, P, Q, reduction="mean"))


# ------------------------------------------------------------------------ backward scaling

def test_compiled_backward_scales_the_saved_gradients_as_eager():
    """Eager backward scales the saved gradients in place (mf_ext/ops.py
    _may_scale_saved_in_place); a traced backward must scale them all the same."""
    dense = random_problem(13, 11, 3, seed=1)
    triples = random_triples(9, 7, 3, 40, seed=2)
    runs = {
        "masked": (lambda P, Q: masked_mf_loss(dense["R"], P, Q), dense),
        "observed": (lambda P, Q: observed_mf_loss(triples["rows"], triples["cols"],
                                                   triples["values"], P, Q), triples),
        "implicit": (lambda P, Q: implicit_mf_loss(triples["rows"], triples["cols"], P, Q,
                                                   triples["values"], unobserved_weight=0.3),
                     triples),
    }
    for name, (fn, args) in runs.items():
        grads = []
        for run in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
            P, Q = (args[k].detach().requires_grad_() for k in "PQ")
            (2.5 * run(P, Q)).backward()
            grads.append((P.grad, Q.grad))
        for eager, compiled in zip(*grads):
            torch.testing.assert_close(compiled, eager, rtol=1e-14, atol=0, msg=name)

"""The ops' backward scales the gradients saved by the forward pass by the loss's incoming
gradient. In plain eager autograd with the graph not kept it does so in place and hands that
tensor on (no copy: mf_ext/ops.py _may_scale_saved_in_place); a kept graph must still give the
same gradients on every backward. (Under torch.compile: tests/test_torch_compile.py.)"""

import pytest
import torch

from helpers import random_problem, random_triples
from mf_ext import implicit_mf_loss, masked_mf_loss, observed_mf_loss


def dense():
    args = random_problem(13, 11, 3, seed=1)
    P, Q = args["P"].requires_grad_(), args["Q"].requires_grad_()
    return (lambda: masked_mf_loss(args["R"], P, Q)), (P, Q)


def observed():
    args = random_triples(9, 7, 3, 40, seed=2, biases=True)
    leaves = [args[k].requires_grad_() for k in ("P", "Q", "row_bias", "col_bias")]
    return (lambda: observed_mf_loss(args["rows"], args["cols"], args["values"], *leaves)), leaves


def implicit():
    args = random_triples(9, 7, 3, 40, seed=3)
    P, Q = args["P"].requires_grad_(), args["Q"].requires_grad_()
    return (lambda: implicit_mf_loss(args["rows"], args["cols"], P, Q, args["values"],
                                     unobserved_weight=0.3)), (P, Q)


OPS = {"masked": dense, "observed": observed, "implicit": implicit}


def grads_of(loss, leaves, scale, **kwargs):
    for leaf in leaves:
        leaf.grad = None
    (scale * loss).backward(**kwargs)
    return [leaf.grad.clone() for leaf in leaves]


@pytest.mark.parametrize("op", OPS)
def test_a_kept_graph_gives_the_same_gradients_on_every_backward(op):
    loss_fn, leaves = OPS[op]()
    unscaled = torch.autograd.grad(loss_fn(), leaves)
    loss = loss_fn()
    first = grads_of(loss, leaves, 3.0, retain_graph=True)
    (3.0 * loss).backward()  # the saved gradients must not have been scaled by the first pass
    for leaf, g, u in zip(leaves, first, unscaled):
        assert torch.equal(g, 3.0 * u)
        assert torch.equal(leaf.grad, 3.0 * u + 3.0 * u)


@pytest.mark.parametrize("op", OPS)
def test_a_freed_graph_hands_on_the_saved_gradients_scaled(op):
    """Scaled in place: the same bits as grad_loss * g, and the leaves' .grad is the memory the
    forward pass saved (no copy)."""
    loss_fn, leaves = OPS[op]()
    unscaled = torch.autograd.grad(loss_fn(), leaves)
    saved = []  # addresses of the tensors the forward pass saves for backward
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.data_ptr()) or t,
                                                  lambda t: t):
        loss = loss_fn()
    for leaf, g, u in zip(leaves, grads_of(loss, leaves, 0.5), unscaled):
        assert torch.equal(g, 0.5 * u)
        assert leaf.grad.data_ptr() in saved, "the leaf got a copy of the op's gradient"

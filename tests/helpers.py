"""Shared test helpers: random problems and the numeric comparison rule."""

from __future__ import annotations

import torch

from mf_ext.reference import masked_mf_loss_reference


def random_problem(m, n, r, dtype=torch.float64, observed=0.5, seed=0, mask=False):
    """R (m, n) with about `observed` of its entries non-zero, P (r, m), Q (r, n), optional
    explicit mask (which also marks some zeros as observed)."""
    g = torch.Generator().manual_seed(seed)
    R = (torch.rand(m, n, generator=g, dtype=torch.float64) * 4 + 1)
    R = R * (torch.rand(m, n, generator=g) < observed)
    P = torch.rand(r, m, generator=g, dtype=torch.float64)
    Q = torch.rand(r, n, generator=g, dtype=torch.float64)
    M = (torch.rand(m, n, generator=g) < 0.6) if mask else None
    return R.to(dtype), P.to(dtype), Q.to(dtype), M


def loss_and_grads(fn, R, P, Q, mask=None, reduction="sum", grad_R=True):
    """fn's loss and its gradients w.r.t. (R, P, Q) through autograd (None where not asked)."""
    # detach() keeps the layout (clone() would make sliced views contiguous)
    R = R.detach().requires_grad_(grad_R)
    P = P.detach().requires_grad_(True)
    Q = Q.detach().requires_grad_(True)
    loss = fn(R, P, Q, mask, reduction)
    inputs = (R, P, Q) if grad_R else (P, Q)
    grads = torch.autograd.grad(loss, inputs)
    if not grad_R:
        grads = (None, *grads)
    return (loss.detach(), *grads)


def magnitudes(R, P, Q):
    """float64 (R, P, Q) under which every term of every sum in the loss and its gradients enters
    with its magnitude (R negated, P and Q absolute; zeros, hence the default mask, unchanged):
    the reference then returns, per output, the sum of |terms|, the scale of rounding errors."""
    return -R.double().abs(), P.double().abs(), Q.double().abs()


def assert_close_to_reference(got, R, P, Q, mask, reduction, grad_R=True):
    """float64: tight. Lower precision: the error against the float64 reference must be within
    2x of the eager reference's own error in that dtype (flash-attention's rule), plus a floor
    for outputs where the eager error happens to be ~0: 8 ulps of the output's scale and one eps
    of the scale of its terms (magnitudes(): a sum that cancels keeps an error of that size
    from the rounding of each term, however it is summed)."""
    dtype = R.dtype
    exact = loss_and_grads(masked_mf_loss_reference, R.double(), P.double(), Q.double(),
                           mask, reduction, grad_R)
    if dtype == torch.float64:
        for name, a, b in zip(("loss", "dR", "dP", "dQ"), got, exact):
            if b is None:
                continue
            scale = b.abs().max().item() if b.numel() else 0.0
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * (1 + scale),
                                       msg=lambda s, name=name: f"{name}: {s}")
        return
    eager = loss_and_grads(masked_mf_loss_reference, R, P, Q, mask, reduction, grad_R)
    scale = loss_and_grads(masked_mf_loss_reference, *magnitudes(R, P, Q), mask, reduction,
                           grad_R)
    eps = torch.finfo(dtype).eps
    for name, a, e, b, s in zip(("loss", "dR", "dP", "dQ"), got, eager, exact, scale):
        if b is None:
            continue
        err_kernel = (a.double() - b).abs().max().item() if b.numel() else 0.0
        err_eager = (e.double() - b).abs().max().item() if b.numel() else 0.0
        floor = (eps * (8 * (1 + b.abs().max().item()) + s.abs().max().item())
                 if b.numel() else 0.0)
        assert err_kernel <= 2 * err_eager + floor, (
            f"{name}: kernel error {err_kernel:.3g} > 2 x eager error {err_eager:.3g} + {floor:.3g}")

"""The CUDA kernel of mf_ext::masked_mf_loss_and_grads against the float64 reference.

Numeric rule (as flash-attention's tests): in float32 / float16 / bfloat16 the kernel's largest
error against the float64 reference (computed on the CPU from the same rounded inputs) must be
within 2x the error of the eager reference run in that dtype on the GPU, plus a tiny floor. In
float64 the kernel must match to ~1e-10. The whole module skips without a GPU.
"""

from __future__ import annotations

import pytest
import torch

import mf_ext
from mf_ext.reference import adam_reference_loop, masked_mf_loss_reference

# Every test is collected and skipped without a GPU (a module-level skip would leave pytest with
# nothing collected, exit status 5, when this is the only test file selected).
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

OP = torch.ops.mf_ext.masked_mf_loss_and_grads
CUDA = torch.device("cuda")
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# (m, n, r): the notebook's, single entries, odd sizes across 128-wide tiles, ranks beyond a
# staged chunk (8), rank 0; n % 4 == 0 takes the vector-load path, other n the scalar one.
# BIG_SHAPES: blocks that own several tiles (> 16 tile rows and columns), tall, wide.
SHAPES = [(5, 4, 2), (1, 1, 1), (37, 53, 3), (130, 259, 5), (130, 260, 5), (300, 129, 17),
          (257, 390, 40), (257, 392, 40), (64, 70, 0)]
BIG_SHAPES = [(2200, 2100, 3), (5000, 7, 3), (3, 6000, 2)]


def make_inputs(m, n, r, dtype, seed=0, zero_fraction=0.5, device=CUDA):
    """R with about `zero_fraction` zeros (unobserved), P, Q uniform [0, 1) as the notebook."""
    g = torch.Generator().manual_seed(seed)
    R = torch.rand(m, n, generator=g, dtype=torch.float64) * 5
    R[torch.rand(m, n, generator=g) < zero_fraction] = 0
    P = torch.rand(r, m, generator=g, dtype=torch.float64)
    Q = torch.rand(r, n, generator=g, dtype=torch.float64)
    return (t.to(device=device, dtype=dtype) for t in (R, P, Q))


def run_op(R, P, Q, mask=None, reduction="sum", grads=(True, True, True)):
    return OP(R, P, Q, mask, reduction, *grads)


def reference_with_grads(R, P, Q, mask=None, reduction="sum"):
    """Loss, grad_R, grad_P, grad_Q of the pure-PyTorch reference, through autograd, on the
    device and dtype of the inputs."""
    R, P, Q = (t.detach().requires_grad_(True) for t in (R, P, Q))  # keeps the layout
    loss = masked_mf_loss_reference(R, P, Q, mask, reduction)
    gR, gP, gQ = torch.autograd.grad(loss, (R, P, Q), allow_unused=True)
    zeros = torch.zeros_like
    return (loss.detach(), gR if gR is not None else zeros(R), gP if gP is not None else zeros(P),
            gQ if gQ is not None else zeros(Q))


def reference64(R, P, Q, mask=None, reduction="sum"):
    cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
    return reference_with_grads(cpu(R).double(), cpu(P).double(), cpu(Q).double(), cpu(mask),
                                reduction)


def max_err(x, ref):
    """Largest |x - ref|; inf where x overflowed or is NaN (then only an overflowing eager
    result in the same dtype can excuse it)."""
    if not ref.numel():
        return 0.0
    diff = (x.detach().cpu().double() - ref).abs()
    return diff.nan_to_num(nan=float("inf")).max().item()


def assert_matches_reference(R, P, Q, mask=None, reduction="sum", grads=(True, True, True)):
    """The kernel's loss and requested grads against the float64 reference, by the rule above."""
    out = run_op(R, P, Q, mask, reduction, grads)
    want = reference64(R, P, Q, mask, reduction)
    flags = (True,) + tuple(grads)
    if R.dtype == torch.float64:
        for name, flag, got, ref in zip(("loss", "grad_R", "grad_P", "grad_Q"), flags, out, want):
            if flag:
                torch.testing.assert_close(got.cpu(), ref, rtol=1e-10, atol=1e-12, msg=name)
        return out
    eager = reference_with_grads(R, P, Q, mask, reduction)
    eps = torch.finfo(R.dtype).eps
    for name, flag, got, ref, base in zip(("loss", "grad_R", "grad_P", "grad_Q"), flags, out,
                                          want, eager):
        if not flag:
            continue
        assert got.dtype == R.dtype and got.shape == ref.shape, name
        scale = ref.abs().max().item() if ref.numel() else 0.0
        floor = 2 * eps * (1.0 + scale) if R.dtype == torch.float32 else eps * (1.0 + scale)
        kernel_err, eager_err = max_err(got, ref), max_err(base, ref)
        assert kernel_err <= 2 * eager_err + floor, (
            f"{name}: kernel error {kernel_err:.3g} > 2 x eager error {eager_err:.3g} + {floor:.3g}")
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_parity_with_reference(shape, dtype, reduction):
    R, P, Q = make_inputs(*shape, dtype)
    assert_matches_reference(R, P, Q, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", BIG_SHAPES, ids=str)
def test_parity_large_grids(shape, dtype):
    R, P, Q = make_inputs(*shape, dtype, seed=1)
    assert_matches_reference(R, P, Q, reduction="mean")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_explicit_mask(dtype, reduction):
    R, P, Q = make_inputs(45, 140, 6, dtype, zero_fraction=0.2)
    mask = torch.rand(45, 140, generator=torch.Generator().manual_seed(3)) < 0.4
    assert_matches_reference(R, P, Q, mask.to(CUDA), reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_rows_and_columns(dtype):
    R, P, Q = make_inputs(70, 150, 4, dtype)
    R[3] = 0
    R[:, 140:] = 0
    R[:, 0] = 0
    assert_matches_reference(R, P, Q, reduction="mean")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_all_masked(dtype, reduction):
    R, P, Q = make_inputs(33, 140, 3, dtype)
    mask = torch.zeros(33, 140, dtype=torch.bool, device=CUDA)
    loss, gR, gP, gQ = assert_matches_reference(R, P, Q, mask, reduction)
    assert loss.item() == 0 and not gR.any() and not gP.any() and not gQ.any()
    loss, *_ = run_op(torch.zeros_like(R), P, Q, None, reduction)
    assert loss.item() == 0


@pytest.mark.parametrize("shape", [(0, 5, 2), (4, 0, 2), (0, 0, 0)], ids=str)
def test_empty_matrix(shape):
    R, P, Q = make_inputs(*shape, torch.float32)
    loss, gR, gP, gQ = run_op(R, P, Q, None, "mean")
    assert loss.item() == 0 and gR.shape == R.shape
    assert gP.shape == P.shape and not gP.any() and gQ.shape == Q.shape and not gQ.any()


def _layouts(m, n, r, dtype):
    """(name, R, P, Q, mask) with non-contiguous, transposed and strided operands."""
    R, P, Q = make_inputs(m, n, r, dtype, seed=5)
    mask = (torch.rand(m, n, generator=torch.Generator().manual_seed(6)) < 0.5).to(CUDA)
    wide_R = torch.zeros(m, 2 * n, dtype=dtype, device=CUDA)
    wide_R[:, ::2] = R
    return [
        ("R transposed", R.t().contiguous().t(), P, Q, None),
        ("R and mask transposed", R.t().contiguous().t(), P, Q, mask.t().contiguous().t()),
        ("R column-strided", wide_R[:, ::2], P, Q, None),
        ("R offset by one", torch.cat([R.new_zeros(1), R.flatten()])[1:].view(m, n), P, Q, None),
        ("P, Q transposed", R, P.t().contiguous().t(), Q.t().contiguous().t(), mask),
        ("Q strided", R, P, torch.stack([Q, Q], dim=2)[:, :, 0], None),
        ("mask transposed", R, P, Q, mask.t().contiguous().t()),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index", range(7))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_layouts(dtype, index, reduction):
    name, R, P, Q, mask = _layouts(132, 76, 5, dtype)[index]  # both orientations 4-aligned
    loss, gR, gP, gQ = assert_matches_reference(R, P, Q, mask, reduction)
    assert gR.stride() == torch.empty_like(R).stride(), name
    assert gP.is_contiguous() and gQ.is_contiguous(), name


@pytest.mark.parametrize("grads", [(True, False, False), (False, True, False),
                                   (False, False, True), (False, False, False),
                                   (False, True, True)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_grad_flags(grads, dtype):
    R, P, Q = make_inputs(150, 90, 9, dtype)
    out = assert_matches_reference(R, P, Q, None, "mean", grads)
    for flag, g in zip(grads, out[1:]):
        if not flag:
            assert g.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cpu_and_cuda_agree(dtype):
    R, P, Q = make_inputs(140, 270, 11, dtype, device="cpu")
    mask = torch.rand(140, 270, generator=torch.Generator().manual_seed(8)) < 0.5
    for m in (None, mask):
        for reduction in ("sum", "mean"):
            cpu = run_op(R, P, Q, m, reduction)
            gpu = run_op(R.to(CUDA), P.to(CUDA), Q.to(CUDA),
                         None if m is None else m.to(CUDA), reduction)
            rtol = 1e-10 if dtype == torch.float64 else 1e-5
            for a, b in zip(cpu, gpu):  # sums in different orders: atol relative to the scale
                atol = rtol * (a.abs().max().item() if a.numel() else 0.0) + 1e-12
                torch.testing.assert_close(b.cpu(), a, rtol=rtol, atol=atol)


def test_nan_propagates_like_the_reference():
    R, P, Q = make_inputs(20, 30, 2, torch.float32)
    mask = torch.ones(20, 30, dtype=torch.bool, device=CUDA)
    mask[4, 5] = False
    R[4, 5] = float("nan")  # unobserved, yet NaN · 0 = NaN, as in the reference
    loss, *_ = run_op(R, P, Q, mask, "sum")
    assert torch.isnan(loss).item()
    assert torch.isnan(masked_mf_loss_reference(R, P, Q, mask)).item()


@pytest.mark.parametrize("shape", [(300, 260, 10), (2200, 2100, 8)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_deterministic(shape, dtype):
    R, P, Q = make_inputs(*shape, dtype)
    first = run_op(R, P, Q, None, "mean")
    for _ in range(3):
        again = run_op(R, P, Q, None, "mean")
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_opcheck(dtype):
    R, P, Q = make_inputs(37, 150, 5, dtype)
    mask = (torch.rand(37, 150, generator=torch.Generator().manual_seed(2)) < 0.5).to(CUDA)
    for args in [(R, P, Q, None, "sum", True, True, True),
                 (R.t().contiguous().t(), P, Q, mask, "mean", True, True, True),
                 (R, P, Q, None, "mean", False, True, False)]:
        torch.library.opcheck(OP.default, args)


def test_gradcheck():
    R, P, Q = make_inputs(9, 11, 3, torch.float64)
    mask = (torch.rand(9, 11, generator=torch.Generator().manual_seed(1)) < 0.6).to(CUDA)
    R, P, Q = (t.requires_grad_(True) for t in (R, P, Q))
    # An explicit mask: with Ω = {R != 0} a perturbed zero of R would change Ω.
    assert torch.autograd.gradcheck(lambda R, P, Q: mf_ext.masked_mf_loss(R, P, Q, mask, "mean"),
                                    (R, P, Q))


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_torch_compile(mode):
    torch._dynamo.reset()
    R, P, Q = make_inputs(100, 130, 4, torch.float32)

    def loss_fn(R, P, Q):
        return mf_ext.masked_mf_loss(R, P, Q, None, "mean")

    def loss_and_grads(fn):
        P1, Q1 = P.clone().requires_grad_(True), Q.clone().requires_grad_(True)
        loss = fn(R, P1, Q1)
        loss.backward()
        return [loss.detach().clone(), P1.grad.clone(), Q1.grad.clone()]

    compiled = torch.compile(loss_fn, fullgraph=True, mode=mode)
    want = loss_and_grads(loss_fn)
    for _ in range(3):  # reduce-overhead records a CUDA graph on a later call, then replays it
        for a, b in zip(loss_and_grads(compiled), want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_factorize_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    R = torch.rand(23, 31, generator=g, dtype=torch.float64) * 5
    R[torch.rand(23, 31, generator=g) < 0.4] = 0
    cpu = mf_ext.factorize(R, rank=3, steps=60, seed=4)
    gpu = mf_ext.factorize(R, rank=3, steps=60, seed=4, device="cuda")
    assert gpu.P.device.type == "cuda"
    torch.testing.assert_close(torch.tensor(gpu.losses), torch.tensor(cpu.losses), rtol=1e-9,
                               atol=1e-9)
    torch.testing.assert_close(gpu.P.cpu(), cpu.P, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(gpu.Q.cpu(), cpu.Q, rtol=1e-8, atol=1e-8)
    gen = torch.Generator().manual_seed(4)
    P0 = torch.rand(3, 23, generator=gen, dtype=torch.float64)
    Q0 = torch.rand(3, 31, generator=gen, dtype=torch.float64)
    _, _, losses = adam_reference_loop(R, P0, Q0, steps=60)
    torch.testing.assert_close(torch.tensor(gpu.losses), torch.tensor(losses), rtol=1e-8,
                               atol=1e-8)


@pytest.mark.parametrize("which", ["R", "P", "Q", "mask"])
def test_mixed_devices_error(which):
    R, P, Q = make_inputs(6, 7, 2, torch.float32)
    mask = torch.ones(6, 7, dtype=torch.bool, device=CUDA)
    args = {"R": R, "P": P, "Q": Q, "mask": mask}
    args[which] = args[which].cpu()
    match = "mask is on" if which == "mask" else "must be on the same device"
    with pytest.raises(ValueError, match=f"mf_ext.masked_mf_loss: .*{match}"):
        run_op(args["R"], args["P"], args["Q"], args["mask"], "sum")
    with pytest.raises(ValueError, match="mf_ext.masked_mf_loss:"):
        mf_ext.masked_mf_loss(args["R"], args["P"].requires_grad_(True), args["Q"], args["mask"])

"""What only a GPU shows for the dense op: mixed devices, and factorize on CUDA. The parity
tests run on CUDA as a backend of test_masked_mf_loss.py. Every test skips without a GPU."""

from __future__ import annotations

import pytest
import torch

import mf_ext
from helpers import random_problem
from mf_ext.reference import adam_reference_loop

# Collected and skipped without a GPU (a module-level skip would leave pytest with nothing
# collected, exit status 5, when this is the only test file selected).
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_factorize_on_cuda_matches_cpu():
    R = random_problem(23, 31, 3, observed=0.6)["R"]
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
    args = random_problem(6, 7, 2, torch.float32, mask=True, device="cuda")
    args[which] = args[which].cpu()
    match = "mask is on" if which == "mask" else "must be on the same device"
    with pytest.raises(ValueError, match=f"mf_ext.masked_mf_loss: .*{match}"):
        torch.ops.mf_ext.masked_mf_loss_and_grads(*args.values(), "sum", True, True, True)
    with pytest.raises(ValueError, match="mf_ext.masked_mf_loss:"):
        mf_ext.masked_mf_loss(args["R"], args["P"].requires_grad_(True), args["Q"], args["mask"])

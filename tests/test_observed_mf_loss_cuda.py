"""What only a GPU shows for the observed-entries op: mixed devices, and the recommender on
CUDA. The parity tests run on CUDA as a backend of test_observed_mf_loss.py. Every test skips
without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mf_ext
from helpers import GRADS, random_triples
from mf_ext import observed_mf_loss

# Collected and skipped without a GPU (a module-level skip would leave pytest with nothing
# collected, exit status 5, when this is the only test file selected).
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("which", ["rows", "cols", "values", "P", "Q", "row_bias", "col_bias",
                                   "weights"])
def test_mixed_devices_error(which):
    args = random_triples(5, 4, 3, 6, biases=True, weights=True, device="cuda")
    args[which] = args[which].cpu()
    if which in ("row_bias", "col_bias", "weights"):
        match = rf"mf_ext.observed_mf_loss: {which} is on cpu but values is on cuda"
    elif which == "values":
        match = r"mf_ext.observed_mf_loss: .*(must be on the same device|is on cuda)"
    else:
        match = r"mf_ext.observed_mf_loss: rows, cols, values, P and Q must be on the same device"
    with pytest.raises(ValueError, match=match):
        observed_mf_loss(**args)
    args = {k: v.requires_grad_() if k in GRADS["observed"] else v for k, v in args.items()}
    with pytest.raises(ValueError, match="mf_ext.observed_mf_loss:"):
        observed_mf_loss(**args)


def test_matrix_factorization_fits_on_cuda():
    """The recommender on the GPU: fits a small synthetic low-rank set, and follows the CPU
    fit's trajectory (float64, so the kernels' different summation orders stay invisible)."""
    rng = np.random.default_rng(0)
    users, items, rank = 80, 60, 3
    U, V = rng.normal(size=(users, rank)), rng.normal(size=(items, rank))
    u = rng.integers(0, users, 3000)
    i = rng.integers(0, items, 3000)
    ratings = 3 + (U[u] * V[i]).sum(1) + 0.05 * rng.normal(size=3000)
    fits = {}
    for device in ("cpu", "cuda"):
        model = mf_ext.MatrixFactorization(rank=rank, epochs=150, lr=0.05, reg=0.0, bias_reg=0.0,
                                           init_std=0.1, device=device, dtype=torch.float64)
        fits[device] = model.fit(u, i, ratings)
    gpu, cpu = fits["cuda"], fits["cpu"]
    assert gpu.P.device.type == "cuda" and gpu.user_bias.device.type == "cuda"
    first, last = gpu.history[0].train_rmse, gpu.history[-1].train_rmse
    assert last < 0.25 * first, (first, last)
    assert gpu.evaluate(u, i, ratings)["rmse"] < 0.5
    np.testing.assert_allclose([h.train_rmse for h in gpu.history],
                               [h.train_rmse for h in cpu.history], rtol=1e-6)
    np.testing.assert_allclose(gpu.predict(u[:50], i[:50]), cpu.predict(u[:50], i[:50]),
                               rtol=1e-6, atol=1e-8)

"""The notebook's Adam loop, on the fused op."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch

from mf_ext.ops import masked_mf_loss

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[Sequence[float]]]


@dataclass
class Factorization:
    """The result of `factorize`: R ≈ PᵀQ on the observed entries.

    P: (r, m); Q: (r, n); losses: the loss before each Adam step (as the notebook records it);
    observed: (m, n) bool, the entries that were fitted.
    """

    P: torch.Tensor
    Q: torch.Tensor
    losses: list = field(default_factory=list)
    observed: Optional[torch.Tensor] = None

    def reconstruction(self) -> torch.Tensor:
        """PᵀQ, shape (m, n): the fitted values and the predictions for unobserved entries."""
        return self.P.T @ self.Q

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


def _as_matrix(R: ArrayLike, dtype: Optional[torch.dtype], device) -> torch.Tensor:
    if not isinstance(R, torch.Tensor):
        try:
            R = torch.as_tensor(np.asarray(R))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"mf_ext.factorize: R must be a 2-D array of numbers: {exc}") from None
    if R.dim() != 2:
        raise ValueError(f"mf_ext.factorize: R must be 2-D (m, n), got shape {list(R.shape)}")
    if R.dtype.is_complex or R.dtype == torch.bool:
        raise TypeError(f"mf_ext.factorize: R must hold real numbers, got {R.dtype}")
    if dtype is None:
        dtype = R.dtype if R.dtype in (torch.float32, torch.float64) else torch.float64
    return R.detach().to(device=device, dtype=dtype)


def factorize(
    R: ArrayLike,
    rank: Optional[int] = None,
    steps: int = 100,
    lr: float = 0.05,
    mask: Optional[torch.Tensor] = None,
    seed: Optional[int] = None,
    init: Optional[tuple] = None,
    reduction: str = "sum",
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    progress: bool = False,
) -> Factorization:
    """Fit R ≈ PᵀQ on the observed entries with Adam, as the reference notebook does.

    R: (m, n) tensor, numpy array or nested lists; zeros are "not observed" unless `mask`
    (m, n) bool says otherwise. rank: r (default 2, or the rank of `init`). steps, lr: Adam's.
    init: (P0 (r, m), Q0 (r, n)) to start from; otherwise uniform [0, 1) factors drawn from a
    torch.Generator seeded with `seed` (random when None), on the CPU so a seed gives the same
    start on every device. dtype: float32 or float64 (default: R's, float64 for integers).
    Returns a Factorization with P, Q and the loss before each step.
    """
    device = torch.device(device) if device is not None else (
        R.device if isinstance(R, torch.Tensor) else torch.device("cpu"))
    R = _as_matrix(R, dtype, device)
    m, n = R.shape
    if rank is None:
        rank = init[0].shape[0] if init is not None else 2
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"mf_ext.factorize: rank must be an integer >= 1, got {rank!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"mf_ext.factorize: steps must be an integer >= 0, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"mf_ext.factorize: lr must be a finite number > 0, got {lr!r}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            mask = torch.as_tensor(np.asarray(mask))
        if mask.dtype != torch.bool or mask.shape != R.shape:
            raise ValueError(f"mf_ext.factorize: mask must be a bool tensor of R's shape "
                             f"{list(R.shape)}, got {mask.dtype} {list(mask.shape)}")
        mask = mask.to(device)
    observed = (R != 0) if mask is None else mask
    bad = observed & ~torch.isfinite(R)
    if bool(bad.any()):
        i, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"mf_ext.factorize: R has {int(bad.sum())} NaN or Inf observed "
                         f"entries, the first at ({i}, {j}): {R[i, j].item()}")

    if init is not None:
        P0, Q0 = (torch.as_tensor(x) for x in init)
        if P0.shape != (rank, m) or Q0.shape != (rank, n):
            raise ValueError(f"mf_ext.factorize: init must be (P0 of shape {[rank, m]}, Q0 of "
                             f"shape {[rank, n]}), got {list(P0.shape)} and {list(Q0.shape)}")
    else:
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        P0 = torch.rand(rank, m, generator=generator, dtype=R.dtype)
        Q0 = torch.rand(rank, n, generator=generator, dtype=R.dtype)
    P = P0.detach().to(device=device, dtype=R.dtype).clone().requires_grad_(True)
    Q = Q0.detach().to(device=device, dtype=R.dtype).clone().requires_grad_(True)

    # torch's fused Adam where it has one on this device; the default (foreach) on the CPU,
    # which is what the reference loop uses, so the CPU trajectory matches it step for step.
    fused = True if device.type == "cuda" else None
    optimizer = torch.optim.Adam([P, Q], lr=lr, fused=fused)
    losses = []
    bar = _progress_bar(steps) if progress else None
    for _ in range(steps):
        loss = masked_mf_loss(R, P, Q, mask, reduction)
        losses.append(loss.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
    if bar is not None:
        bar.close()
    history = torch.stack(losses).tolist() if losses else []
    return Factorization(P.detach(), Q.detach(), history, observed)


def _progress_bar(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is optional
        return None
    return tqdm(total=total, desc="factorize", unit="step")

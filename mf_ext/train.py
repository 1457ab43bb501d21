"""The notebook's Adam loop, on the fused op."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from mf_ext.checks import check_int, check_positive
from mf_ext.ops import masked_mf_loss
from mf_ext.progress import progress_bar

_WHO = "mf_ext.factorize"

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[Sequence[float]]]


@dataclass
class Factorization:
    """The result of `factorize`: R ≈ PᵀQ on the observed entries.

    P: (r, m); Q: (r, n); losses: the loss before each Adam step (as the notebook records it);
    observed: (m, n) bool, the entries that were fitted.
    """

    P: torch.Tensor
    Q: torch.Tensor
    losses: list[float] = field(default_factory=list)
    observed: Optional[torch.Tensor] = None

    def reconstruction(self) -> torch.Tensor:
        """PᵀQ, shape (m, n): the fitted values and the predictions for unobserved entries."""
        return self.P.T @ self.Q

    @property
    def final_loss(self) -> float:
        """The last recorded loss: the one *before* the last step (NaN when steps == 0)."""
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


def _as_device(device: Union[str, torch.device]) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"mf_ext.factorize: device must be a torch device such as 'cpu' or "
                         f"'cuda', got {device!r}") from exc


def _as_init(init, m: int, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """init = (P0, Q0) as two finite tensors of shapes (r, m) and (r, n)."""
    if not isinstance(init, (tuple, list)) or len(init) != 2:
        raise TypeError(f"mf_ext.factorize: init must be a pair (P0, Q0), got "
                        f"{type(init).__name__}")
    try:
        P0, Q0 = (torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
                  for x in init)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"mf_ext.factorize: init must hold two 2-D arrays of numbers: {exc}"
                        ) from None
    if (P0.dim() != 2 or Q0.dim() != 2 or P0.shape[0] != Q0.shape[0]
            or P0.shape[1] != m or Q0.shape[1] != n):
        raise ValueError(f"mf_ext.factorize: init must be (P0 of shape [r, {m}], Q0 of shape "
                         f"[r, {n}]) for R of shape [{m}, {n}], got {list(P0.shape)} and "
                         f"{list(Q0.shape)}")
    for name, t in (("P0", P0), ("Q0", Q0)):
        if t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"mf_ext.factorize: init {name} must hold real numbers, got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"mf_ext.factorize: init {name} contains NaN or Inf")
    if P0.shape[0] < 1:
        raise ValueError(f"mf_ext.factorize: init must have rank >= 1, got {list(P0.shape)} "
                         f"and {list(Q0.shape)}")
    return P0, Q0


def _as_mask(mask, R: torch.Tensor) -> torch.Tensor:
    """mask as a bool tensor of R's shape (m, n)."""
    if not isinstance(mask, torch.Tensor):
        try:
            mask = torch.as_tensor(np.asarray(mask))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"mf_ext.factorize: mask must be a bool array: {exc}") from None
    if mask.dtype != torch.bool:
        raise TypeError(f"mf_ext.factorize: mask must be a bool tensor, got {mask.dtype}")
    if mask.shape != R.shape:
        raise ValueError(f"mf_ext.factorize: mask has shape {list(mask.shape)} but R has shape "
                         f"{list(R.shape)}")
    return mask


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
    reduction: "sum" (the notebook's) or "mean" over the observed entries.
    Returns a Factorization with P (r, m), Q (r, n) and the loss before each step (`steps`
    values). NaN/Inf at unobserved entries (possible with an explicit mask) are ignored.

    Raises TypeError for arguments of the wrong type and ValueError for bad values (rank < 1,
    steps < 0, lr <= 0 or not finite, NaN/Inf among the observed entries, init shapes that do
    not fit R, a mask not of R's shape), each message naming the argument and the value.
    """
    R_device = R.device if isinstance(R, torch.Tensor) else torch.device("cpu")
    device = _as_device(device) if device is not None else R_device
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise TypeError(f"mf_ext.factorize: dtype must be torch.float32 or torch.float64, "
                        f"got {dtype!r}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f'mf_ext.factorize: reduction must be "sum" or "mean", got {reduction!r}')
    R = _as_matrix(R, dtype, device)
    m, n = R.shape
    if init is not None:
        P0, Q0 = _as_init(init, m, n)
        if rank is None:
            rank = P0.shape[0]
    rank = check_int(_WHO, "rank", 2 if rank is None else rank, 1)
    steps = check_int(_WHO, "steps", steps, 0)
    lr = check_positive(_WHO, "lr", lr)
    if seed is not None:
        seed = check_int(_WHO, "seed", seed, 0, 2**64 - 1)
    if mask is not None:
        mask = _as_mask(mask, R).to(device)
    observed = (R != 0) if mask is None else mask
    bad = observed & ~torch.isfinite(R)
    if bool(bad.any()):
        i, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"mf_ext.factorize: R has {int(bad.sum())} NaN or Inf observed "
                         f"entries, the first at ({i}, {j}): {R[i, j].item()}")
    if mask is not None and not bool(torch.isfinite(R).all()):
        # The op multiplies the error by the mask, so NaN * 0 would poison the loss; the
        # unobserved values do not enter the loss, so zeroing them changes nothing else.
        R = R.masked_fill(~mask, 0)

    if init is not None:
        if P0.shape[0] != rank:
            raise ValueError(f"mf_ext.factorize: rank is {rank} but init has rank "
                             f"{P0.shape[0]} (P0 {list(P0.shape)}, Q0 {list(Q0.shape)})")
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

    # torch's fused Adam where it has one on this device; on the CPU torch's default, which is
    # what the reference loop uses, so the CPU trajectory matches it step for step.
    fused = True if device.type == "cuda" else None
    optimizer = torch.optim.Adam([P, Q], lr=lr, fused=fused)
    losses = []
    bar = progress_bar(steps, "factorize", "step", enabled=progress)
    for _ in range(steps):
        loss = masked_mf_loss(R, P, Q, mask, reduction)
        losses.append(loss.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.update(1)
        if progress:  # .item() synchronizes with the device: only for a real bar
            bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
    bar.close()
    history = torch.stack(losses).tolist() if losses else []
    return Factorization(P.detach(), Q.detach(), history, observed)


"""Text views of a factorization: R and its reconstruction PᵀQ side by side."""

from __future__ import annotations

from typing import List

import numpy as np

NOT_OBSERVED = "."  # stands for an unobserved entry of R
PREDICTED = "*"     # follows a reconstructed value at an unobserved entry


def format_side_by_side(
    R: np.ndarray,
    reconstruction: np.ndarray,
    observed: np.ndarray,
    max_rows: int = 20,
    max_cols: int = 10,
) -> str:
    """R (m, n) on the left, with `.` where not observed; PᵀQ (m, n) on the right, with `*`
    after the values that are predictions (unobserved in R). observed: (m, n) bool. Only the
    top-left max_rows × max_cols corner is shown, with a note when that cuts anything."""
    m, n = R.shape
    rows, cols = min(m, max_rows), min(n, max_cols)
    R_part = R[:rows, :cols]
    fit_part = reconstruction[:rows, :cols]
    seen = observed[:rows, :cols]
    number = _number_format(np.concatenate([R_part[seen], fit_part.ravel()]))
    left = [[number(v) if o else NOT_OBSERVED for v, o in zip(r, s)] for r, s in zip(R_part, seen)]
    right = [[number(v) for v in r] for r in fit_part]
    width = max(len(cell) for row in left + right for cell in row)

    def line(cells: List[str], marks: List[bool]) -> str:
        return " ".join(c.rjust(width) + (PREDICTED if mark else " ")
                        for c, mark in zip(cells, marks))

    blank = [False] * cols
    left_lines = [line(cells, blank) for cells in left]
    right_lines = [line(cells, list(~s)) for cells, s in zip(right, seen)]
    left_title = f"R ({NOT_OBSERVED} = not observed)"
    right_title = f"P^T Q ({PREDICTED} = predicted, not observed)"
    pad = max(len(left_title), len(left_lines[0]) if left_lines else 0)
    out = [f"{left_title.ljust(pad)}   |  {right_title}"]
    out += [f"{a.ljust(pad)}   |  {b}".rstrip() for a, b in zip(left_lines, right_lines)]
    if (rows, cols) != (m, n):
        out.append(f"(showing rows 1-{rows} of {m}, columns 1-{cols} of {n})")
    return "\n".join(out)


def _number_format(values: np.ndarray):
    """Fixed point with 3 decimals, or scientific when the magnitudes call for it."""
    finite = np.abs(values[np.isfinite(values)])
    largest = float(finite.max()) if finite.size else 0.0
    if largest >= 1e5 or 0 < largest < 1e-2:
        return lambda v: f"{v:.3e}"
    return lambda v: f"{v:.3f}"

"""The row blocks of a sharded fit (shard_factors=True): which users (and which items) each rank
owns, balanced in ratings with a bound on rows (docs/distributed.md, "Who holds what").

The rule, for rows 0…m−1 in the sorted id order with training-rating counts c_i (N in all) and P
ranks: block k is [b_k, b_(k+1)), with b_0 = 0, b_P = m, and for k = 1…P−1 in turn

    b_k = the cut nearest to k·N/P ratings (the i minimizing |c_0 + … + c_(i−1) − k·N/P|,
          the smaller i on a tie), moved the least needed to keep every block within
          cap = max(⌈m/P⌉, ⌊(1 + ROW_SLACK)·m/P⌋) rows: clipped to
          [max(b_(k−1), m − (P−k)·cap), b_(k−1) + cap].

Why both: the step's compute grows with a rank's ratings (the fused op, and the user-history
term), so the cut is at equal shares of them; its memory grows with its rows (factors, gradients
and Adam's moments are 4·b·(r+1) bytes a row), so a pure ratings cut that gave one rank most of
the light users' rows would break the memory target (within 10 % of 1/P of the replicated
design). The cap keeps each rank's rows within ROW_SLACK of m/P; where it binds, ratings give
way. The blocks are a function of the counts alone, which every rank holds after one
all-reduce: the same on every rank, whatever the input split or the timing.
"""

from __future__ import annotations

import numpy as np

ROW_SLACK = 0.1  # the most a rank's rows may exceed m/P (the memory target's 10 %)


def balanced_blocks(counts: np.ndarray, parts: int) -> np.ndarray:
    """The P + 1 block starts (b_0 = 0 … b_P = m) of rows with these rating counts (module
    docstring). Integer arithmetic throughout: no rounding decides a cut. Without any rating
    (all counts 0) the cuts are those of equal rows."""
    counts = np.asarray(counts, dtype=np.int64)
    m = len(counts)
    if counts.sum() == 0:
        counts = np.ones(m, dtype=np.int64)
    cumulative = np.concatenate([[0], np.cumsum(counts)])  # ratings before row i, i = 0…m
    total = int(cumulative[-1])
    cap = max(-(-m // parts), int((1 + ROW_SLACK) * m) // parts)
    starts = [0]
    for k in range(1, parts):
        # the nearest cut: cumulative[i] · P against k · N, compared in integers
        i = int(np.searchsorted(cumulative * parts, k * total, side="left"))
        if i > 0 and k * total - cumulative[i - 1] * parts <= cumulative[i] * parts - k * total:
            i -= 1
        low, high = max(starts[-1], m - (parts - k) * cap), starts[-1] + cap
        starts.append(min(max(i, low), high))
    return np.array(starts + [m], dtype=np.int64)


__all__ = ["balanced_blocks", "ROW_SLACK"]

"""Both ops called from several Python threads at once give, bitwise, the single-threaded
answers (loss and gradients). Thread-count determinism (torch.set_num_threads) is tested next
to each op, in test_masked_mf_loss.py and test_observed_mf_loss.py."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers import loss_and_grads, random_problem, random_triples
from mf_ext import masked_mf_loss, observed_mf_loss

THREADS = 4
CALLS_PER_THREAD = 30


def _masked_cases():
    for i, (m, n, r, mask) in enumerate([(5, 4, 2, False), (67, 131, 5, True),
                                         (301, 900, 7, True)]):  # the last: a 4 x 4 task grid
        for dtype in (torch.float64, torch.float32):
            args = random_problem(m, n, r, dtype, mask=mask, seed=i)
            yield lambda args=args: loss_and_grads(masked_mf_loss, args, "mean")


def _observed_cases():
    for i, (m, n, r, nnz) in enumerate([(5, 4, 2, 12), (67, 131, 5, 1000),
                                        (301, 97, 13, 70001)]):
        for dtype in (torch.float64, torch.float32):
            args = random_triples(m, n, r, nnz, dtype, seed=i, biases=True, weights=True,
                                  index_dtype=torch.int32 if i % 2 else torch.int64)
            yield lambda args=args: loss_and_grads(observed_mf_loss, args, "sum")


@pytest.mark.parametrize("cases", [_masked_cases, _observed_cases], ids=["masked", "observed"])
def test_concurrent_calls_match_single_threaded(cases):
    cases = list(cases())
    expected = [case() for case in cases]

    def worker(seed):
        order = torch.randperm(CALLS_PER_THREAD, generator=torch.Generator().manual_seed(seed))
        return [(int(k) % len(cases), cases[int(k) % len(cases)]()) for k in order]

    with ThreadPoolExecutor(THREADS) as pool:
        results = [item for run in pool.map(worker, range(THREADS)) for item in run]
    assert len(results) == THREADS * CALLS_PER_THREAD
    for index, got in results:
        for a, b in zip(got, expected[index]):
            assert (a is None and b is None) or torch.equal(a, b), f"case {index}"

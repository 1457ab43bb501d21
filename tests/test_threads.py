"""The CPU kernels and threads: both ops give bitwise the same answers (loss and gradients)
whatever torch.set_num_threads says, and when called from several Python threads at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers import assert_equal, loss_and_grads, random_problem, random_triples, transposed
from mf_ext import masked_mf_loss, observed_mf_loss

THREADS = 4
CALLS_PER_THREAD = 30


def _masked_cases():
    for i, (m, n, r, mask) in enumerate([(5, 4, 2, False), (67, 131, 5, True),
                                         (301, 900, 7, True)]):  # the last: a 4 x 4 task grid
        for dtype in (torch.float64, torch.float32):
            yield masked_mf_loss, random_problem(m, n, r, dtype, mask=mask, seed=i), "mean"


def _observed_cases():
    for i, (m, n, r, nnz) in enumerate([(5, 4, 2, 12), (67, 131, 5, 1000),
                                        (301, 97, 13, 70001)]):
        for dtype in (torch.float64, torch.float32):
            yield observed_mf_loss, random_triples(
                m, n, r, nnz, dtype, seed=i, biases=True, weights=True,
                index_dtype=torch.int32 if i % 2 else torch.int64), "sum"


@pytest.mark.parametrize("cases", [_masked_cases, _observed_cases], ids=["masked", "observed"])
def test_concurrent_calls_match_single_threaded(cases):
    cases = [lambda case=case: loss_and_grads(*case) for case in cases()]
    expected = [case() for case in cases]

    def worker(seed):
        order = torch.randperm(CALLS_PER_THREAD, generator=torch.Generator().manual_seed(seed))
        return [(int(k) % len(cases), cases[int(k) % len(cases)]()) for k in order]

    with ThreadPoolExecutor(THREADS) as pool:
        results = [item for run in pool.map(worker, range(THREADS)) for item in run]
    assert len(results) == THREADS * CALLS_PER_THREAD
    for index, got in results:
        assert_equal(got, expected[index], f"case {index}")


def embedding_tables(args):
    """args with P, Q as nn.Embedding users pass them: the .T of (m, r) and (n, r) tables (the
    dense op's rowwise path at r = 7, its tiled path at r = 40, in float32 and float64)."""
    return dict(args, P=transposed(args["P"]), Q=transposed(args["Q"]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("op,args", [  # odd shapes, so that tails are exercised
    (masked_mf_loss, lambda dtype: random_problem(301, 1203, 7, dtype, mask=True)),
    (masked_mf_loss, lambda dtype: random_problem(301, 1203, 7, dtype)),
    (masked_mf_loss, lambda dtype: embedding_tables(random_problem(301, 1203, 7, dtype))),
    (masked_mf_loss, lambda dtype: embedding_tables(random_problem(301, 1203, 40, dtype))),
    (observed_mf_loss, lambda dtype: random_triples(30, 20, 64, 40000, dtype, biases=True,
                                                    weights=True)),
    (observed_mf_loss, lambda dtype: random_triples(301, 97, 13, 70001, dtype, biases=True,
                                                    weights=True))],
    ids=["masked-mask", "masked-nonzero", "masked-embedding-rowwise", "masked-embedding-tiled",
         "observed-hot-rows", "observed-odd"])
def test_bitwise_deterministic_across_thread_counts(op, args, dtype):
    args = args(dtype)
    runs = []
    for threads in (1, 2, 1, 3, 4):
        torch.set_num_threads(threads)
        runs.append([g for red in ("sum", "mean") for g in loss_and_grads(op, args, red)])
    for run in runs[1:]:
        assert_equal(run, runs[0])

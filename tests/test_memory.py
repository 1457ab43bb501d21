"""Resident memory stays flat over many forward + backward calls of each op (a leak of 5 KB or
more per call would show: an output tensor, a saved context). Linux only: it reads VmRSS from
/proc/self/status."""

from __future__ import annotations

import gc
import sys

import pytest
import torch

from helpers import random_problem, random_triples
from mf_ext import masked_mf_loss, observed_mf_loss

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads VmRSS from /proc/self/status")

CALLS = 3_000
WARM_UP = 300
MAX_GROWTH_MIB = 15  # 5 KB per call


def resident_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # the line reads "VmRSS:  123456 kB"
    raise AssertionError("no VmRSS line in /proc/self/status")


@pytest.mark.parametrize("op,args", [
    (masked_mf_loss, random_problem(9, 7, 3, torch.float32, mask=True)),
    (observed_mf_loss, random_triples(9, 7, 3, 20, torch.float32, biases=True, weights=True))],
    ids=["masked", "observed"])
def test_resident_memory_stays_flat(op, args):
    args = {k: v.requires_grad_() if v is not None and v.is_floating_point() else v
            for k, v in args.items()}

    def step():
        op(**args, reduction="mean").backward()

    for _ in range(WARM_UP):
        step()
    gc.collect()
    before = resident_mib()
    for _ in range(CALLS):
        step()  # .grad accumulates in place: no allocation that outlives the call
    gc.collect()
    growth = resident_mib() - before
    assert growth < MAX_GROWTH_MIB, f"resident memory grew {growth:.1f} MiB over {CALLS} calls"

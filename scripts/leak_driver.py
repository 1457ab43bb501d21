"""Calls each op (forward + backward, both dtypes, all optional inputs) CALLS times; run by
scripts/sanitize.sh under LeakSanitizer. Usage: leak_driver.py CALLS"""

import sys

import torch

from mf_ext import masked_mf_loss, observed_mf_loss

calls = int(sys.argv[1])
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float64):
    R = torch.rand(9, 70, generator=g, dtype=dtype).requires_grad_()
    P = torch.rand(3, 9, generator=g, dtype=dtype).requires_grad_()
    Q = torch.rand(3, 70, generator=g, dtype=dtype).requires_grad_()
    mask = torch.rand(9, 70, generator=g) < 0.5
    rows = torch.randint(0, 9, (300,), generator=g)
    cols = torch.randint(0, 70, (300,), generator=g, dtype=torch.int64).int()
    values, weights = torch.rand(300, dtype=dtype), torch.rand(300, dtype=dtype)
    biases = (torch.rand(9, dtype=dtype), torch.rand(70, dtype=dtype))
    for t in (values, weights, *biases):
        t.requires_grad_()
    for _ in range(calls):
        masked_mf_loss(R, P, Q, mask, "mean").backward()
        observed_mf_loss(rows, cols, values, P, Q, *biases, weights).backward()
        try:
            observed_mf_loss(rows + 100, cols, values, P, Q)  # the error path frees too
        except IndexError:
            pass
print("ok", calls)

"""The progress bar (mf_ext/progress.py) as the training loops use it: with tqdm, without it,
and switched off; it never changes a result."""

import sys

import numpy as np
import pytest
import torch

from mf_ext import MatrixFactorization, factorize
from mf_ext.progress import progress_bar, write_line


def ratings():
    rng = np.random.default_rng(0)
    return rng.integers(0, 8, 60), rng.integers(0, 6, 60), rng.uniform(1, 5, 60)


@pytest.fixture
def no_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # `from tqdm.auto import ...` fails


def test_fit_and_factorize_show_a_bar_and_give_the_same_result(capsys):
    pytest.importorskip("tqdm")
    quiet = MatrixFactorization(rank=2, epochs=4).fit(*ratings())
    shown = MatrixFactorization(rank=2, epochs=4).fit(*ratings(), progress=True)
    assert torch.equal(quiet.P, shown.P)
    err = capsys.readouterr().err
    assert "fit" in err and "4/4" in err and "epoch" in err
    R = torch.tensor([[1.0, 0, 3], [2, 5, 0]], dtype=torch.float64)
    a, b = factorize(R, steps=5, seed=0), factorize(R, steps=5, seed=0, progress=True)
    assert torch.equal(a.P, b.P) and a.losses == b.losses
    assert "factorize" in capsys.readouterr().err


def test_without_tqdm_a_do_nothing_bar_stands_in(no_tqdm, capsys):
    bar = progress_bar(3, "fit", "epoch")
    bar.update(1)
    bar.set_postfix(train="1.0", refresh=False)
    bar.close()
    MatrixFactorization(rank=2, epochs=2).fit(*ratings(), progress=True)
    write_line("epoch 1")
    assert capsys.readouterr().err == "epoch 1\n"


def test_progress_off_is_silent(capsys):
    MatrixFactorization(rank=2, epochs=2).fit(*ratings())
    bar = progress_bar(3, "fit", "epoch", enabled=False)
    bar.update(1)
    bar.close()
    assert capsys.readouterr().err == ""

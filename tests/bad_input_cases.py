"""Bad inputs for every public entry point, run in a subprocess by test_errors_subprocess.py
(so a segfault or abort fails one test instead of killing the run).

Each case: (name, expected exception type, fragments its message must contain, call). Run as a
script with a scratch folder, it prints one JSON line per case: name, type and message of what
was raised (type "none" if nothing was).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys

import numpy as np
import torch

import mf_ext
from mf_ext.cli import main as cli_main
from mf_ext import (MatrixFactorization, factorize, load_matrix, load_ratings, masked_mf_loss,
                    observed_mf_loss)

NAN, INF = float("nan"), float("inf")


def t(*shape, dtype=torch.float64, device="cpu"):
    return torch.rand(*shape, dtype=dtype).to(device)


def idx(*values, dtype=torch.int64):
    return torch.tensor(values, dtype=dtype)


def masked(R=None, P=None, Q=None, mask=None, reduction="sum"):
    return lambda: masked_mf_loss(t(4, 3) if R is None else R, t(2, 4) if P is None else P,
                                  t(2, 3) if Q is None else Q, mask, reduction)


def observed(**overrides):
    args = dict(rows=idx(0, 1, 3), cols=idx(0, 2, 1), values=t(3), P=t(2, 4), Q=t(2, 3))
    args.update(overrides)
    return lambda: observed_mf_loss(**args)


def fitted_model():
    return MatrixFactorization(rank=2, epochs=1, validation_fraction=0).fit(
        [1, 2, 3], [1, 2, 1], [3.0, 4.0, 5.0])


class CliExit(Exception):
    """A CLI run that exited with a non-zero status; the message is its stderr."""


def cli(*argv):
    def call():
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                status = cli_main(list(argv))
            except SystemExit as exc:  # argparse errors exit
                status = exc.code
        if status:
            raise CliExit(f"exit {status}: {stderr.getvalue()}")
    return call


def in_dir(name, text):
    """A file `name` with `text` (str, or bytes) in the scratch folder."""
    path = os.path.join(SCRATCH, name)
    with open(path, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    return path


SCRATCH = sys.argv[1] if __name__ == "__main__" else "."
M, O, F, MF = "mf_ext.masked_mf_loss", "mf_ext.observed_mf_loss", "mf_ext.factorize", \
    "mf_ext.MatrixFactorization"

CASES = [
    # ---- masked_mf_loss
    ("masked: R 1-D", ValueError, [M, "R must be 2-D", "[4]"], masked(R=t(4))),
    ("masked: R int", TypeError, [M, "R must be a floating-point", "Long"],
     masked(R=torch.ones(4, 3, dtype=torch.long))),
    ("masked: R complex", TypeError, [M, "R must be a floating-point tensor, got ComplexDouble"],
     masked(R=t(4, 3).to(torch.complex128))),
    ("masked: P 1-D", ValueError, [M, "P must be 2-D (r, m), got shape [4]"], masked(P=t(4))),
    ("masked: Q 3-D", ValueError, [M, "Q must be 2-D (r, n), got shape [1, 2, 3]"],
     masked(Q=t(1, 2, 3))),
    ("masked: Q columns", ValueError, [M, "Q has 2 columns but R has 3 columns"],
     masked(Q=t(2, 2))),
    ("masked: P float32", TypeError, [M, "same dtype", "P Float"], masked(P=t(2, 4).float())),
    ("masked: huge rank mismatch", ValueError, [M, "P has rank 100000", "Q has rank 2"],
     masked(P=t(100000, 4))),
    ("masked: P columns", ValueError, [M, "P has 5 columns but R has 4 rows"], masked(P=t(2, 5))),
    ("masked: mask dtype", TypeError, [M, "mask must be a bool tensor", "Float"],
     masked(mask=torch.ones(4, 3))),
    ("masked: mask shape", ValueError, [M, "mask has shape [3, 4]"],
     masked(mask=torch.ones(3, 4, dtype=torch.bool))),
    ("masked: P on meta", ValueError, [M, "same device", "P on meta"], masked(P=t(2, 4, device="meta"))),
    ("masked: mask on meta", ValueError, [M, "mask is on meta"],
     masked(mask=torch.ones(4, 3, dtype=torch.bool, device="meta"))),
    ("masked: half", TypeError, [M, "float32 and float64", "Half"],
     masked(R=t(4, 3).half(), P=t(2, 4).half(), Q=t(2, 3).half())),
    ("masked: reduction", ValueError, [M, "reduction", '"avg"'], masked(reduction="avg")),
    ("masked: reduction type", TypeError, [M, "reduction must be a str", "int"], masked(reduction=1)),
    # ---- observed_mf_loss
    ("observed: row out of range", IndexError, [O, "rows[2] = 4", "[0, 4)"],
     observed(rows=idx(0, 1, 4))),
    ("observed: negative col", IndexError, [O, "cols[0] = -1", "[0, 3)"],
     observed(cols=idx(-1, 0, 0, dtype=torch.int32))),
    ("observed: huge index", IndexError, [O, "rows[1] = 9223372036854775807"],
     observed(rows=idx(0, 2**63 - 1, 0))),
    ("observed: float indices", TypeError, [O, "rows must be an int32 or int64", "Float"],
     observed(rows=torch.tensor([0.0, 1.0, 2.0]))),
    ("observed: bool indices", TypeError, [O, "cols must be an int32 or int64", "Bool"],
     observed(cols=torch.tensor([True, False, True]))),
    ("observed: rows 2-D", ValueError, [O, "rows must be 1-D", "[3, 1]"],
     observed(rows=idx(0, 1, 2).reshape(3, 1))),
    ("observed: lengths", ValueError, [O, "same length", "values 4"], observed(values=t(4))),
    ("observed: huge rank mismatch", ValueError, [O, "P has rank 100000", "Q has rank 2"],
     observed(P=t(100000, 4))),
    ("observed: row_bias length", ValueError, [O, "row_bias must have shape (4,)", "[5]"],
     observed(row_bias=t(5))),
    ("observed: weights dtype", TypeError, [O, "weights must have the dtype of values", "Float"],
     observed(weights=t(3).float())),
    ("observed: values int", TypeError, [O, "values must be a floating-point", "Long"],
     observed(values=idx(1, 2, 3))),
    ("observed: Q on meta", ValueError, [O, "same device", "Q on meta"],
     observed(Q=t(2, 3, device="meta"))),
    ("observed: col_bias on meta", ValueError, [O, "col_bias is on meta"],
     observed(col_bias=t(3, device="meta"))),
    ("observed: empty P with triples", IndexError, [O, "rows[0] = 0", "[0, 0)"],
     observed(P=t(2, 0))),
    ("observed: half", TypeError, [O, "the CPU kernel supports float32 and float64, got Half"],
     observed(values=t(3).half(), P=t(2, 4).half(), Q=t(2, 3).half())),
    ("observed: reduction type", TypeError, [O, "reduction must be a str, got <class 'int'>"],
     observed(reduction=1)),
    ("observed: reduction", ValueError, [O, "reduction", '"none"'],
     lambda: observed_mf_loss(idx(0), idx(0), t(1), t(2, 4), t(2, 3), reduction="none")),
    # ---- factorize
    ("factorize: rank 0", ValueError, [F, "rank", "got 0"], lambda: factorize(t(4, 3), rank=0)),
    ("factorize: rank 1.5", TypeError, [F, "rank", "1.5"], lambda: factorize(t(4, 3), rank=1.5)),
    ("factorize: NaN observed", ValueError, [F, "NaN or Inf", "(1, 2)", "nan"],
     lambda: factorize(torch.tensor([[1.0, 2, 3], [1, 2, NAN]]), steps=1)),
    ("factorize: Inf observed", ValueError, [F, "NaN or Inf", "inf"],
     lambda: factorize(torch.tensor([[INF, 2.0]]), steps=1)),
    ("factorize: R 3-D", ValueError, [F, "R must be 2-D", "[2, 2, 2]"],
     lambda: factorize(t(2, 2, 2))),
    ("factorize: R strings", TypeError, [F, "R must be a 2-D array of numbers"],
     lambda: factorize([["a", "b"]])),
    ("factorize: lr nan", ValueError, [F, "lr", "nan"], lambda: factorize(t(4, 3), lr=NAN)),
    ("factorize: steps -1", ValueError, [F, "steps", "-1"], lambda: factorize(t(4, 3), steps=-1)),
    ("factorize: device", ValueError, [F, "device", "'gpu9'"],
     lambda: factorize(t(4, 3), device="gpu9")),
    ("factorize: mask shape", ValueError, [F, "mask has shape [3, 4]"],
     lambda: factorize(t(4, 3), mask=torch.ones(3, 4, dtype=torch.bool))),
    ("factorize: huge init rank mismatch", ValueError, [F, "init", "[100000, 4]", "[2, 3]"],
     lambda: factorize(t(4, 3), init=(t(100000, 4), t(2, 3)))),
    # ---- MatrixFactorization
    ("model: rank 0", ValueError, [MF, "rank", "got 0"], lambda: MatrixFactorization(rank=0)),
    ("model: lr inf", ValueError, [MF, "lr", "inf"], lambda: MatrixFactorization(lr=INF)),
    ("model: reg nan", ValueError, [MF, "reg", "nan"], lambda: MatrixFactorization(reg=NAN)),
    ("model: dtype", TypeError, [MF, "dtype", "int32"],
     lambda: MatrixFactorization(dtype=torch.int32)),
    ("model: fit empty", ValueError, [MF + ".fit", "no ratings"],
     lambda: MatrixFactorization().fit([], [], [])),
    ("model: fit NaN rating", ValueError, [MF + ".fit", "NaN or Inf", "position 1", "nan"],
     lambda: MatrixFactorization().fit([1, 2], [1, 2], [3.0, NAN])),
    ("model: fit lengths", ValueError, ["same length", "2, 1 and 2"],
     lambda: MatrixFactorization().fit([1, 2], [1], [3.0, 4.0])),
    ("model: fit ratings not numbers", TypeError, ["ratings must be numbers"],
     lambda: MatrixFactorization().fit([1, 2], [1, 2], ["x", "y"])),
    ("model: predict unfitted", RuntimeError, [MF, "call fit()"],
     lambda: MatrixFactorization().predict([1], [1])),
    ("model: predict 2-D", ValueError, [MF + ".predict", "shapes [1, 2] and [1, 2]"],
     lambda: fitted_model().predict([[1, 2]], [[1, 2]])),
    ("model: recommend unknown user", KeyError, [MF + ".recommend", "unknown user 'nobody'"],
     lambda: fitted_model().recommend("nobody")),
    ("model: load missing", FileNotFoundError, [MF + ".load", "no such file", "missing.pt"],
     lambda: MatrixFactorization.load(os.path.join(SCRATCH, "missing.pt"))),
    ("model: load junk", ValueError, [MF + ".load", "junk.pt", "is not an mf_ext model"],
     lambda: MatrixFactorization.load(in_dir("junk.pt", b"\x00not a model"))),
    ("model: load empty", ValueError, [MF + ".load", "empty.pt", "is not an mf_ext model"],
     lambda: MatrixFactorization.load(in_dir("empty.pt", b""))),
    # ---- load_ratings
    ("load_ratings: missing", ValueError, ["mf_ext.load_ratings", "cannot read", "nope.csv"],
     lambda: load_ratings(os.path.join(SCRATCH, "nope.csv"))),
    ("load_ratings: format", ValueError, ["mf_ext.load_ratings", "unknown format", "'xls'"],
     lambda: load_ratings(in_dir("r.csv", "1,2,3\n"), format="xls")),
    ("load_ratings: empty", ValueError, ["mf_ext.load_ratings", "empty.csv", "no ratings"],
     lambda: load_ratings(in_dir("empty.csv", ""))),
    ("load_ratings: short line", ValueError, ["mf_ext.load_ratings", "line 2", "'3,4'"],
     lambda: load_ratings(in_dir("short.csv", "1,2,3\n3,4\n"))),
    ("load_ratings: rating", ValueError, ["mf_ext.load_ratings", "line 2", "'five'"],
     lambda: load_ratings(in_dir("word.csv", "1,2,3\n1,2,five\n"))),
    ("load_ratings: binary", ValueError, ["mf_ext.load_ratings", "bin.csv", "not UTF-8"],
     lambda: load_ratings(in_dir("bin.csv", b"\xff\xfe\x00\x01"))),
    # ---- load_matrix
    ("load_matrix: missing", FileNotFoundError, ["nope.txt", "no such file"],
     lambda: load_matrix(os.path.join(SCRATCH, "nope.txt"))),
    ("load_matrix: extension", ValueError, ["m.xlsx", "unsupported file type", "'.xlsx'"],
     lambda: load_matrix(in_dir("m.xlsx", "1 2\n"))),
    ("load_matrix: empty", ValueError, ["e.txt", "no numbers"],
     lambda: load_matrix(in_dir("e.txt", "\n\n"))),
    ("load_matrix: ragged", ValueError, ["rag.txt", "line 2"],
     lambda: load_matrix(in_dir("rag.txt", "1 2 3\n4 5\n"))),
    ("load_matrix: word", ValueError, ["w.txt", "line 1", "'x'"],
     lambda: load_matrix(in_dir("w.txt", "1 x\n"))),
    ("load_matrix: npy 3-D", ValueError, ["a.npy", "must be 2-D", "[2, 2, 2]"],
     lambda: (np.save(os.path.join(SCRATCH, "a.npy"), np.ones((2, 2, 2))),
              load_matrix(os.path.join(SCRATCH, "a.npy")))),
    ("load_matrix: npy strings", ValueError, ["s.npy", "real numbers"],
     lambda: (np.save(os.path.join(SCRATCH, "s.npy"), np.array([["a", "b"]])),
              load_matrix(os.path.join(SCRATCH, "s.npy")))),
 # ---- the command line (exit 1: bad data, exit 2: bad options; one line, no traceback)
    ("cli: fit missing file", CliExit, ["exit 1", "mf-ext fit: error", "nope.csv"],
     lambda: cli("fit", os.path.join(SCRATCH, "nope.csv"), "--no-progress")()),
    ("cli: fit NaN rating", CliExit, ["exit 1", "mf-ext fit: error", "nan"],
     lambda: cli("fit", in_dir("nan.csv", "1,1,3\n2,2,nan\n"), "--no-progress")()),
    ("cli: fit rank 0", CliExit, ["exit 2", "--rank", "'0'"],
     lambda: cli("fit", "x.csv", "--rank", "0")()),
    ("cli: fit lr nan", CliExit, ["exit 2", "--lr", "'nan'"],
     lambda: cli("fit", "x.csv", "--lr", "nan")()),
    ("cli: recommend junk model", CliExit, ["exit 1", "mf-ext recommend: error", "junk.pt"],
     lambda: cli("recommend", in_dir("junk.pt", b"junk"), "1")()),
    ("cli: demo bad matrix", CliExit, ["exit 1", "mf-ext demo: error", "rag.txt", "line 2"],
     lambda: cli("demo", "--matrix", in_dir("rag.txt", "1 2 3\n4 5\n"), "--steps", "1")()),
    ("cli: unknown command", CliExit, ["exit 2", "invalid choice", "'frobnicate'"],
     lambda: cli("frobnicate")()),
]


def main() -> None:
    torch.manual_seed(0)
    assert mf_ext.__file__  # the package under test is importable
    for name, _, _, call in CASES:
        try:
            call()
            kind, message = "none", ""
        except Exception as exc:  # noqa: BLE001 - reporting whatever was raised is the point
            kind, message = type(exc).__name__, str(exc.args[0]) if exc.args else str(exc)
        print(json.dumps({"name": name, "type": kind, "message": message}), flush=True)


if __name__ == "__main__":
    main()

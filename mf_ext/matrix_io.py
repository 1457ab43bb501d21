"""Reading a rating matrix from a file: `load_matrix(path)` → float64 array (m, n).

Text (.csv, .txt): one row per line, numbers separated by commas or by whitespace; blank lines
and '#' comments (whole-line or trailing) are skipped. Parsed by hand so that a bad file is
reported by line and token. Binary (.npy): a 2-D numeric array, loaded without pickle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Union

import numpy as np

TEXT_SUFFIXES = (".csv", ".txt")
NPY_SUFFIXES = (".npy",)

PathLike = Union[str, "os.PathLike[str]"]


def load_matrix(path: PathLike) -> np.ndarray:
    """The matrix stored at `path`, as a float64 array of shape (m, n), m, n >= 1.

    Zeros keep the notebook's meaning ("not observed"); NaN/Inf are read as written (training
    rejects them where observed). Raises FileNotFoundError for a missing path, ValueError for an
    unknown extension or a malformed file; every message names the file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES + NPY_SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; "
                         f"use .csv, .txt (numbers separated by commas or spaces) or .npy")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, not a matrix file")
    if suffix in NPY_SUFFIXES:
        return _load_npy(path)
    return _load_text(path)


def _load_text(path: Path) -> np.ndarray:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})"
                         ) from None
    rows: List[List[float]] = []
    first_line = 0
    for line_number, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        row = _parse_row(content, path, line_number)
        if rows and len(row) != len(rows[0]):
            raise ValueError(f"{path}, line {line_number}: {_count(len(row))}, but line "
                             f"{first_line} has {len(rows[0])} (rows must all be the same length)")
        if not rows:
            first_line = line_number
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no numbers (the file is empty, or only blank lines and "
                         f"comments)")
    return np.array(rows, dtype=np.float64)


def _count(k: int) -> str:
    return f"{k} value" if k == 1 else f"{k} values"


def _parse_row(content: str, path: Path, line_number: int) -> List[float]:
    """The numbers on one (comment-free, non-blank) line: comma-separated if it has a comma,
    whitespace-separated otherwise."""
    tokens = [t.strip() for t in content.split(",")] if "," in content else content.split()
    row = []
    for column, token in enumerate(tokens, start=1):
        if not token:
            raise ValueError(f"{path}, line {line_number}: empty value in column {column}")
        try:
            row.append(float(token))
        except ValueError:
            raise ValueError(f"{path}, line {line_number}: {token!r} (column {column}) is not "
                             f"a number") from None
    return row


NPY_MAGIC = b"\x93NUMPY"


def _load_npy(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        if f.read(len(NPY_MAGIC)) != NPY_MAGIC:
            raise ValueError(f"{path}: not a .npy file (it does not start with the NumPy header)")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:  # object arrays, or not a .npy file at all
        raise ValueError(f"{path}: not a readable .npy array of numbers ({exc})") from None
    except EOFError:
        raise ValueError(f"{path}: not a readable .npy array (the file is cut short)") from None
    if array.ndim != 2:
        raise ValueError(f"{path}: the array must be 2-D (m, n), got shape {list(array.shape)}")
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{path}: the array must hold real numbers (integers or floats), got "
                         f"dtype {array.dtype}")
    if array.size == 0:
        raise ValueError(f"{path}: the array is empty (shape {list(array.shape)})")
    return array.astype(np.float64)

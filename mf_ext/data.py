"""Rating data in: MovieLens files, generic CSV/TSV, arrays, DataFrames, sparse matrices; raw ids
mapped to dense indices and back; a seeded train/test split.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

FORMATS = ("u.data", "ratings.dat", "csv", "tsv")


@dataclass
class Ratings:
    """Observed ratings as three equal-length 1-D arrays of raw ids and values."""

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray

    def __len__(self) -> int:
        return len(self.ratings)

    def subset(self, index: np.ndarray) -> "Ratings":
        return Ratings(self.users[index], self.items[index], self.ratings[index])


def guess_format(path: str) -> str:
    """The format of a ratings file from its name (u.data, ratings.dat, *.csv, *.tsv)."""
    name = os.path.basename(path).lower()
    if name == "u.data" or name.endswith(".data"):
        return "u.data"
    if name.endswith(".dat"):
        return "ratings.dat"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".tsv", ".tab", ".txt")):
        return "tsv"
    raise ValueError(f"mf_ext.load_ratings: cannot tell the format of {path!r} from its name; "
                     f"pass format= one of {', '.join(FORMATS)}")


def load_ratings(path: str, format: Optional[str] = None) -> Ratings:
    """Read `user item rating [...]` lines.

    Formats: "u.data" (MovieLens 100K, tab-separated, no header), "ratings.dat" (MovieLens
    1M/10M, `::`-separated), "csv" (comma-separated, e.g. MovieLens 20M/25M ratings.csv; a
    header line is skipped), "tsv" (tab or whitespace separated; a header is skipped). Extra
    columns (timestamps) are ignored. User and item ids are kept as strings unless every one is
    an integer. Raises ValueError naming the file and line for malformed lines.
    """
    if format is None:
        format = guess_format(path)
    if format not in FORMATS:
        raise ValueError(f"mf_ext.load_ratings: unknown format {format!r}; expected one of "
                         f"{', '.join(FORMATS)}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ValueError(f"mf_ext.load_ratings: cannot read {path!r}: {exc.strerror}") from None
    separator = {"u.data": "\t", "ratings.dat": "::", "csv": ",", "tsv": None}[format]
    fast = _parse_numeric(raw, separator, skip_header=format in ("csv", "tsv"))
    if fast is not None:
        return fast
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"mf_ext.load_ratings: {path} is not UTF-8 text ({exc.reason} at byte "
                         f"{exc.start})") from None
    return _parse_lines(path, text, separator, format)


# Bytes a purely numeric ratings file is made of. Only such a body takes the fast path: with no
# letters, '#', or line breaks other than \n and \r\n, numpy's parser reads it exactly as
# _parse_lines would, and anything else (string ids, comments, malformed lines) goes there.
_NUMERIC_BYTES = b"0123456789+-.eE,:\t \r\n"


def _parse_numeric(raw: bytes, separator: Optional[str], skip_header: bool) -> Optional[Ratings]:
    """The ratings of an all-numeric file with integer ids, through numpy's C parser (about 3x
    faster than _parse_lines and under a third of its peak memory on a 5M-line csv:
    benchmarks/bench_load_ratings.py), or None where the file needs _parse_lines."""
    if not raw.isascii():
        return None
    start = 0
    while True:  # the first non-blank line: a header to skip?
        end = raw.find(b"\n", start)
        line = raw[start:end if end >= 0 else len(raw)]
        if line.strip() or end < 0:
            break
        start = end + 1
    if skip_header and _is_header(line.decode("ascii"), separator):
        if any(c in line.rstrip(b"\r") for c in b"\r\x0b\x0c\x1c\x1d\x1e"):
            return None  # str.splitlines() would cut this line: not the header it looks like
        start = end + 1 if end >= 0 else len(raw)
    body = raw[start:]
    if body.translate(None, _NUMERIC_BYTES) or body.count(b"\r") != body.count(b"\r\n"):
        return None
    delimiter = separator
    if separator == "::":  # numpy takes one-character delimiters
        if b"\t" in body:
            return None
        body, delimiter = body.replace(b"::", b"\t"), "\t"
    fields = [("users", np.int64), ("items", np.int64), ("ratings", np.float64)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data": None, and the slow path says it
            table = np.loadtxt(io.BytesIO(body), delimiter=delimiter, usecols=(0, 1, 2),
                               dtype=fields, comments=None, ndmin=1, encoding="ascii")
    except (ValueError, OverflowError):
        return None
    if len(table) == 0:
        return None
    return Ratings(table["users"].copy(), table["items"].copy(), table["ratings"].copy())


def _parse_lines(path: str, text: str, separator: Optional[str], format: str) -> Ratings:
    """Line by line: any ids, comments, and errors that name the line."""
    lines = text.splitlines()
    first = 0
    while first < len(lines) and not lines[first].strip():
        first += 1
    if first < len(lines) and format in ("csv", "tsv") and _is_header(lines[first], separator):
        first += 1
    users, items, values = [], [], []
    for number in range(first, len(lines)):
        line = lines[number].strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(separator)
        if len(fields) < 3:
            raise ValueError(f"mf_ext.load_ratings: {path}, line {number + 1}: expected "
                             f"user{_sep_name(separator)}item{_sep_name(separator)}rating, "
                             f"got {line[:80]!r}")
        try:
            value = float(fields[2])
        except ValueError:
            raise ValueError(f"mf_ext.load_ratings: {path}, line {number + 1}: rating "
                             f"{fields[2].strip()[:40]!r} is not a number") from None
        users.append(fields[0].strip())
        items.append(fields[1].strip())
        values.append(value)
    if not values:
        raise ValueError(f"mf_ext.load_ratings: {path} holds no ratings")
    return Ratings(_ids(users), _ids(items), np.asarray(values, dtype=np.float64))


def _sep_name(separator: Optional[str]) -> str:
    return {"\t": "<tab>", "::": "::", ",": ",", None: " "}[separator]


def _is_header(line: str, separator: Optional[str]) -> bool:
    fields = line.split(separator)
    if len(fields) < 3:
        return False
    try:
        float(fields[2])
        return False
    except ValueError:
        return True


def _ids(raw: list) -> np.ndarray:
    """Integer ids as int64 when every id is an integer, else strings."""
    try:
        return np.asarray([int(x) for x in raw], dtype=np.int64)
    except (ValueError, OverflowError):  # OverflowError: an integer id past int64
        return np.asarray(raw, dtype=str)


def as_ratings(data: Any, items: Any = None, ratings: Any = None) -> Ratings:
    """Ratings from (users, items, ratings) array-likes, a pandas DataFrame (columns
    user/item/rating, or userId/movieId/rating, or the first three), a scipy.sparse matrix
    (rows = users, columns = items, stored entries = ratings) or a Ratings."""
    if isinstance(data, Ratings) and items is None and ratings is None:
        return data
    if items is None and ratings is None:
        if hasattr(data, "tocoo") and hasattr(data, "shape"):  # scipy.sparse
            coo = data.tocoo()
            return _checked(coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data)
        if hasattr(data, "columns") and hasattr(data, "iloc"):  # pandas DataFrame
            return _checked(*_frame_columns(data))
        raise TypeError("mf_ext: pass users, items and ratings, a DataFrame or a scipy.sparse "
                        f"matrix, got {type(data).__name__}")
    if items is None or ratings is None:
        raise TypeError("mf_ext: pass users, items and ratings together")
    return _checked(data, items, ratings)


def _frame_columns(frame) -> Tuple[Any, Any, Any]:
    columns = [str(c) for c in frame.columns]
    for names in (("user", "item", "rating"), ("userId", "movieId", "rating"),
                  ("user_id", "item_id", "rating")):
        if all(n in columns for n in names):
            return tuple(frame[n].to_numpy() for n in names)
    if frame.shape[1] < 3:
        raise ValueError(f"mf_ext: a ratings DataFrame needs user, item and rating columns, got "
                         f"{columns}")
    return tuple(frame.iloc[:, k].to_numpy() for k in range(3))


def _checked(users: Any, items: Any, ratings: Any) -> Ratings:
    users, items = np.asarray(users), np.asarray(items)
    try:
        values = np.asarray(ratings, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError("mf_ext: ratings must be numbers") from None
    for name, a in (("users", users), ("items", items), ("ratings", values)):
        if a.ndim != 1:
            raise ValueError(f"mf_ext: {name} must be 1-D, got shape {list(a.shape)}")
    if not (len(users) == len(items) == len(values)):
        raise ValueError(f"mf_ext: users, items and ratings must have the same length, got "
                         f"{len(users)}, {len(items)} and {len(values)}")
    return Ratings(users, items, values)


class IdMap:
    """Raw ids (ints or strings) ↔ dense indices 0 … len-1, in sorted order of the ids."""

    def __init__(self, ids: np.ndarray):
        self.ids = np.unique(np.asarray(ids))

    def __len__(self) -> int:
        return len(self.ids)

    def index(self, raw: np.ndarray, unknown: int = -1) -> np.ndarray:
        """Indices of raw ids; ids never seen get `unknown`."""
        raw = np.asarray(raw)
        if len(self.ids) == 0:
            return np.full(raw.shape, unknown, dtype=np.int64)
        if raw.dtype.kind != self.ids.dtype.kind and not (
                raw.dtype.kind in "iu" and self.ids.dtype.kind in "iu"):
            raw = raw.astype(self.ids.dtype) if self.ids.dtype.kind == "U" else raw
        try:
            pos = np.searchsorted(self.ids, raw)
        except TypeError:
            return np.full(raw.shape, unknown, dtype=np.int64)
        pos = np.clip(pos, 0, len(self.ids) - 1)
        found = self.ids[pos] == raw
        return np.where(found, pos, unknown).astype(np.int64)

    def raw(self, index: np.ndarray) -> np.ndarray:
        return self.ids[np.asarray(index)]


def train_test_split(data: Ratings, test_fraction: float = 0.2,
                     seed: Optional[int] = 0) -> Tuple[Ratings, Ratings]:
    """A seeded random split of the ratings (by rating)."""
    if not (0 <= test_fraction < 1):
        raise ValueError(f"mf_ext.train_test_split: test_fraction must be in [0, 1), got "
                         f"{test_fraction!r}")
    order = np.random.default_rng(seed).permutation(len(data))
    n_test = int(round(len(data) * test_fraction))
    return data.subset(np.sort(order[n_test:])), data.subset(np.sort(order[:n_test]))


def kfold(n: int, folds: int = 5, seed: Optional[int] = 0):
    """Yields (train_index, test_index) of a seeded k-fold split of n ratings."""
    if folds < 2 or folds > n:
        raise ValueError(f"mf_ext.kfold: folds must be in [2, {n}], got {folds}")
    parts = np.array_split(np.random.default_rng(seed).permutation(n), folds)
    for k in range(folds):
        test = np.sort(parts[k])
        train = np.sort(np.concatenate([parts[j] for j in range(folds) if j != k]))
        yield train, test


__all__ = ["Ratings", "load_ratings", "as_ratings", "IdMap", "train_test_split", "kfold",
           "guess_format"]

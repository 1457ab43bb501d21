"""load_matrix (mf_ext/matrix_io.py): text and .npy matrices, on small files the tests write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mf_ext.matrix_io import load_matrix


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, expected", [
    ("1,2,3\n4,5,6\n", [[1, 2, 3], [4, 5, 6]]),
    ("# header comment\n\n1, 2 ,3   # trailing\n\n4,5,6", [[1, 2, 3], [4, 5, 6]]),
    ("1 2\t3\n  4   5 6  \n", [[1, 2, 3], [4, 5, 6]]),
    ("\ufeff1,2\n3,4\n", [[1, 2], [3, 4]]),           # a UTF-8 byte-order mark
    ("1\n2\n3\n", [[1], [2], [3]]),                    # one column
    ("0,-1.5e2,+3\n", [[0, -150, 3]]),                 # one row, signs and exponents
])
def test_load_matrix_text(tmp_path, text, expected):
    for name in ("m.csv", "m.txt", "M.CSV"):
        matrix = load_matrix(write(tmp_path, name, text))
        assert matrix.dtype == np.float64
        np.testing.assert_array_equal(matrix, np.array(expected, dtype=np.float64))


def test_load_matrix_keeps_nan(tmp_path):
    matrix = load_matrix(write(tmp_path, "m.csv", "nan,1\ninf,0\n"))
    assert np.isnan(matrix[0, 0]) and np.isinf(matrix[1, 0])


@pytest.mark.parametrize("text, message", [
    ("1,2\n3,x\n", r"m\.csv, line 2: 'x' \(column 2\) is not a number"),
    ("\n# c\n1 2 3\n4 5 6 7\n", r"m\.csv, line 4: 4 values, but line 3 has 3"),
    ("1,2\n3\n", r"m\.csv, line 2: 1 value, but line 1 has 2"),
    ("1,,2\n", r"m\.csv, line 1: empty value in column 2"),
    ("1,2,\n", r"m\.csv, line 1: empty value in column 3"),
    ("1 2, 3\n", r"m\.csv, line 1: '1 2' \(column 1\) is not a number"),
    ("", r"m\.csv: no numbers \(the file is empty"),
    ("# only\n\n   \n", r"m\.csv: no numbers"),
])
def test_load_matrix_text_errors(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_matrix(write(tmp_path, "m.csv", text))


def test_load_matrix_not_utf8(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(b"1,2\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"m\.csv: not a UTF-8 text file"):
        load_matrix(path)


@pytest.mark.parametrize("array", [np.arange(6.0).reshape(2, 3), np.eye(3, dtype=np.int64),
                                   np.ones((1, 4), dtype=np.float32)])
def test_load_matrix_npy(tmp_path, array):
    np.save(tmp_path / "m.npy", array)
    matrix = load_matrix(tmp_path / "m.npy")
    assert matrix.dtype == np.float64
    np.testing.assert_array_equal(matrix, array)


@pytest.mark.parametrize("array, message", [
    (np.ones(3), r"the array must be 2-D \(m, n\), got shape \[3\]"),
    (np.ones((2, 2, 2)), r"the array must be 2-D \(m, n\), got shape \[2, 2, 2\]"),
    (np.array([["a", "b"]]), r"the array must hold real numbers .* got dtype <U1"),
    (np.ones((2, 2), dtype=bool), r"the array must hold real numbers .* got dtype bool"),
    (np.ones((2, 2), dtype=complex), r"the array must hold real numbers .* got dtype complex128"),
    (np.zeros((0, 3)), r"the array is empty \(shape \[0, 3\]\)"),
    (np.array([[1, None]], dtype=object), r"not a readable \.npy array of numbers"),
])
def test_load_matrix_npy_errors(tmp_path, array, message):
    np.save(tmp_path / "m.npy", array)
    with pytest.raises(ValueError, match=r"m\.npy: " + message):
        load_matrix(tmp_path / "m.npy")


def test_load_matrix_npy_not_numpy(tmp_path):
    (tmp_path / "m.npy").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"m\.npy: not a \.npy file"):
        load_matrix(tmp_path / "m.npy")


def test_load_matrix_missing_and_unknown(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.csv: no such file"):
        load_matrix(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match=r"m\.json: unsupported file type '\.json'"):
        load_matrix(write(tmp_path, "m.json", "[]"))
    with pytest.raises(ValueError, match=r"matrix: unsupported file type '\(no extension\)'"):
        load_matrix(write(tmp_path, "matrix", "1"))
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(IsADirectoryError, match=r"d\.csv: is a directory"):
        load_matrix(tmp_path / "d.csv")

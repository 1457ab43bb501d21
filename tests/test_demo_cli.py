"""`python -m mf_ext demo` end to end (once in a real process, the rest through the same main()
in this process), its error exits, and the side-by-side report (load_matrix's own tests:
tests/test_matrix_io.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

from mf_ext import factorize, masked_mf_loss
from mf_ext.cli import main
from mf_ext.commands.demo import NOTEBOOK_R
from mf_ext.plot import save_loss_curve
from mf_ext.report import format_side_by_side

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FINAL_LOSS = re.compile(r"^final loss: (\S+)", re.MULTILINE)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m mf_ext ARGS` in a fresh interpreter that imports this checkout's mf_ext."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return subprocess.run([sys.executable, "-m", "mf_ext", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_valid_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] >= 100 and image.shape[1] >= 100


def final_loss_of(R: np.ndarray, steps: int, rank: int = 2, seed: int = 0, lr: float = 0.05,
                  dtype=torch.float64) -> float:
    """The loss after `steps` steps of the run the demo makes with these options."""
    Rt = torch.as_tensor(R, dtype=dtype)
    result = factorize(Rt, rank=rank, steps=steps, lr=lr, seed=seed)
    return float(masked_mf_loss(Rt, result.P, result.Q))


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ------------------------------------------------------------------------ end to end

def test_demo_on_the_notebook_matrix(tmp_path):
    proc = run_cli("demo", "--steps", "20", "--out", "curve.png", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "R (. = not observed)" in out and "P^T Q (* = predicted, not observed)" in out
    table = [line for line in out.splitlines() if " |  " in line][1:]
    assert len(table) == 5
    for line, row in zip(table, NOTEBOOK_R):
        left, right = line.split(" |  ")
        assert left.split() == [f"{v:.3f}" if v else "." for v in row]
        assert right.count("*") == sum(v == 0 for v in row)
    loss = float(FINAL_LOSS.search(out).group(1))
    assert loss == pytest.approx(final_loss_of(NOTEBOOK_R, steps=20), rel=1e-9)
    assert_valid_png(tmp_path / "curve.png")


def demo_in_process(capsys, monkeypatch, tmp_path, *args: str) -> str:
    """main(["demo", *args]) run in tmp_path; its stdout (the status must be 0)."""
    monkeypatch.chdir(tmp_path)
    assert main(["demo", *args]) == 0
    return capsys.readouterr().out


def test_demo_with_a_csv_matrix(tmp_path, capsys, monkeypatch):
    R = np.array([[5.0, 3, 0, 1], [4, 0, 0, 1], [1, 1, 0, 5], [1, 0, 0, 4], [0, 1, 5, 4],
                  [2, 0, 3, 0]])
    text = "# ratings, 0 = not rated\n\n" + "\n".join(
        ", ".join(f"{v:g}" for v in row) + ("  # a comment" if i == 2 else "")
        for i, row in enumerate(R)) + "\n"
    (tmp_path / "r.csv").write_text(text)
    out = demo_in_process(capsys, monkeypatch, tmp_path, "--matrix", "r.csv", "--steps", "15",
                          "--rank", "3", "--dtype", "float32", "--lr", "0.1", "--seed", "4",
                          "--out", "c.png")
    assert "r.csv: R (6 x 4, 15 observed)" in out
    assert "float32" in out
    loss = float(FINAL_LOSS.search(out).group(1))
    expected = final_loss_of(R, steps=15, rank=3, seed=4, lr=0.1, dtype=torch.float32)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert_valid_png(tmp_path / "c.png")


def test_demo_with_an_npy_matrix(tmp_path, capsys, monkeypatch):
    R = np.array([[1, 0, 2], [0, 3, 1], [4, 1, 0]], dtype=np.int32)
    np.save(tmp_path / "r.npy", R)
    out = demo_in_process(capsys, monkeypatch, tmp_path, "--matrix", "r.npy", "--steps", "5",
                          "--out", "n.png")
    assert "R (3 x 3, 6 observed)" in out
    loss = float(FINAL_LOSS.search(out).group(1))
    assert loss == pytest.approx(final_loss_of(R.astype(float), steps=5), rel=1e-9)
    assert_valid_png(tmp_path / "n.png")


def test_bad_file_exits_cleanly_in_a_real_process(tmp_path):
    """Status 1 and one line on stderr, nothing else (no start-up warning) in a real process
    (bad options, status 2: test_bad_options_exit_2_with_one_line)."""
    (tmp_path / "bad.csv").write_text("1,2,3\n4,five,6\n")
    proc = run_cli("demo", "--matrix", "bad.csv", "--out", "x.png", cwd=tmp_path)
    assert proc.returncode == 1
    assert_one_line_error(proc.stderr, "bad.csv, line 2", "'five'")
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------- error exits, through the same main()

BAD_FILES = {
    "missing": (None, "missing.csv: no such file"),
    "malformed": ("1,2\n\n# c\n3,abc\n", "malformed.csv, line 4: 'abc' (column 2) is not a number"),
    "ragged": ("1 2 3\n4 5\n", "ragged.csv, line 2: 2 values, but line 1 has 3"),
    "empty": ("", "empty.csv: no numbers"),
    "comments_only": ("# nothing\n\n", "comments_only.csv: no numbers"),
    "nan_observed": ("1,2\nnan,4\n", "nan_observed.csv: R has 1 NaN or Inf observed entries"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_exits_with_one_line(case, tmp_path, capsys):
    content, message = BAD_FILES[case]
    path = tmp_path / f"{case}.csv"
    if content is not None:
        path.write_text(content)
    status = main(["demo", "--matrix", str(path), "--steps", "2",
                   "--out", str(tmp_path / "x.png")])
    assert status == 1
    assert_one_line_error(capsys.readouterr().err, "mf-ext demo: error:", message)


@pytest.mark.parametrize("name, content, message", [
    ("bad.npy", b"not numpy", "bad.npy: not a .npy file"),
    ("m.xlsx", b"", "m.xlsx: unsupported file type '.xlsx'"),
])
def test_bad_file_types_exit_with_one_line(name, content, message, tmp_path, capsys):
    (tmp_path / name).write_bytes(content)
    assert main(["demo", "--matrix", str(tmp_path / name), "--out", str(tmp_path / "x.png")]) == 1
    assert_one_line_error(capsys.readouterr().err, message)


@pytest.mark.parametrize("args, fragment", [
    (["--rank", "0"], "argument --rank: must be an integer >= 1, got '0'"),
    (["--rank", "two"], "argument --rank: must be an integer, got 'two'"),
    (["--steps", "-1"], "argument --steps: must be an integer >= 0, got '-1'"),
    (["--lr", "0"], "argument --lr: must be a finite number > 0, got '0'"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0, got 'nan'"),
    (["--seed", "-1"], "argument --seed: must be an integer in [0, 2**64), got '-1'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_options_exit_2_with_one_line(args, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("mf-ext")
    assert_one_line_error(err, "error:", fragment, "--help")


@pytest.mark.parametrize("out, fragment", [
    ("curve.jpg", "give a path ending in .png"),
    ("no/such/dir/curve.png", "does not exist"),
])
def test_bad_out_exits_before_training(out, fragment, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / out)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line_error(captured.err, "--out", fragment)


def test_cuda_without_a_gpu_exits_with_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert main(["demo", "--device", "cuda", "--out", str(tmp_path / "x.png")]) == 1
    assert_one_line_error(capsys.readouterr().err, "--device cuda: CUDA is not available")


def test_no_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "mf-ext: error:")


# --------------------------------------------------------------------- report and plot

def test_side_by_side_marks_unobserved_entries():
    R = np.array([[1.0, 0.0], [0.0, 4.0]])
    fit = np.array([[1.1, 2.2], [3.3, 3.9]])
    lines = format_side_by_side(R, fit, R != 0).splitlines()
    assert lines[1].split(" |  ")[0].split() == ["1.000", "."]
    assert lines[1].split(" |  ")[1].split() == ["1.100", "2.200*"]
    assert lines[2].split(" |  ")[1].split() == ["3.300*", "3.900"]


def test_side_by_side_shows_a_corner_of_large_matrices():
    R = np.ones((30, 12))
    text = format_side_by_side(R, R, R != 0, max_rows=20, max_cols=10)
    lines: List[str] = text.splitlines()
    assert len(lines) == 1 + 20 + 1
    assert lines[-1] == "(showing rows 1-20 of 30, columns 1-10 of 12)"


def test_loss_curve_with_zero_losses(tmp_path):
    save_loss_curve([0.0, 0.0, 0.0], tmp_path / "z.png")  # log scale impossible: linear
    assert_valid_png(tmp_path / "z.png")

"""`mf-ext fit` and `mf-ext recommend` on a small ratings file the test writes: one run of both
in real processes (`python -m mf_ext`), the rest through the same main() in this process."""

import os
import subprocess
import sys

import numpy as np
import pytest

from mf_ext.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "mf_ext", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def cli(capsys, *argv):
    """main(argv) in this process: (exit status, stdout, stderr)."""
    try:
        status = main(list(argv))
    except SystemExit as exc:  # argparse's exit for bad options
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def ratings_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    users, items = rng.normal(size=(40, 2)), rng.normal(size=(30, 2))
    lines = []
    for u in range(40):
        for i in rng.choice(30, size=12, replace=False):
            r = np.clip(np.round(3 + users[u] @ items[i]), 1, 5)
            lines.append(f"{u + 1}\t{i + 1}\t{int(r)}\t0")
    path = tmp_path_factory.mktemp("data") / "u.data"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_fit_then_recommend_in_real_processes(ratings_file, tmp_path):
    model, curve = str(tmp_path / "model.pt"), str(tmp_path / "curve.png")
    fit = run_cli("fit", ratings_file, "--epochs", "30", "--rank", "4", "--out", model,
                  "--plot", curve, "--validation-fraction", "0.1", "--no-progress")
    assert fit.returncode == 0, fit.stderr
    assert "480 ratings, 40 users, 30 items" in fit.stdout
    assert "test RMSE" in fit.stdout and "MAE" in fit.stdout and "trained" in fit.stdout
    assert "validation RMSE" in fit.stderr  # the per-epoch log
    with open(curve, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    rec = run_cli("recommend", model, "1", "-k", "3")
    assert rec.returncode == 0, rec.stderr
    assert len(rec.stdout.strip().splitlines()) == 3


def test_fit_reports_bad_lines(tmp_path, capsys):
    path = tmp_path / "u.data"
    path.write_text("1\t2\t3\t0\n1\t2\n")
    status, _, err = cli(capsys, "fit", str(path))
    assert status == 1
    assert "line 2" in err and "Traceback" not in err


def test_recommend_errors(ratings_file, tmp_path, capsys):
    status, _, err = cli(capsys, "recommend", str(tmp_path / "missing.pt"), "1")
    assert status == 1 and "no such file" in err
    model = str(tmp_path / "m.pt")
    status, _, _ = cli(capsys, "fit", ratings_file, "--epochs", "2", "--out", model, "--no-progress")
    assert status == 0
    status, _, err = cli(capsys, "recommend", model, "999")
    assert status == 1 and "unknown user 999" in err


def test_fit_options_are_the_config_fields():
    from dataclasses import fields

    from mf_ext.cli import build_parser
    from mf_ext.model import MatrixFactorizationConfig

    args = build_parser().parse_args(["fit", "r.csv"])
    options = MatrixFactorizationConfig.options()
    assert [f.name for f in options] == ["rank", "epochs", "lr", "reg", "bias_reg",
                                         "bias_count_exponent", "factor_count_exponent",
                                         "batch_size",
                                         "validation_fraction", "seed", "device",
                                         "shard_factors"]
    for f in fields(MatrixFactorizationConfig):
        if f in options:
            assert getattr(args, f.name) == f.default, f.name
    from mf_ext.commands.options import config_settings
    model = MatrixFactorizationConfig(**config_settings(MatrixFactorizationConfig, args))
    assert model == MatrixFactorizationConfig()  # the command's defaults are the model's


@pytest.mark.parametrize("argv, message", [
    (["--rank", "0"], "argument --rank: must be an integer >= 1, got '0'"),
    (["--epochs", "x"], "argument --epochs: must be an integer, got 'x'"),
    (["--lr", "inf"], "argument --lr: must be a finite number > 0, got 'inf'"),
    (["--reg", "-1"], "argument --reg: must be a finite number >= 0, got '-1'"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got '0'"),
    (["--validation-fraction", "1"], "argument --validation-fraction: must be in [0, 1), got '1'"),
    (["--seed", "-1"], "argument --seed: must be an integer in [0, 2**64), got '-1'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    # read with the setting's own check: a bad value is a bad option (status 2)
    (["--bias-count-exponent", "2"],
     "argument --bias-count-exponent: must be a number in [0, 1], got '2'"),
])
def test_fit_bad_options_exit_2(argv, message, capsys):
    status, _, err = cli(capsys, "fit", "r.csv", *argv)
    assert status == 2
    assert message in err

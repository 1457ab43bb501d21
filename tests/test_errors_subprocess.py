"""Every public entry point rejects bad input with a Python exception that names the argument
and the value: no crash, no abort, no C++ assertion text. The cases (tests/bad_input_cases.py)
run in one subprocess, so a segfault fails these tests instead of killing pytest."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bad_input_cases import CASES

HERE = os.path.dirname(os.path.abspath(__file__))
CPP_INTERNALS = ("INTERNAL ASSERT", "Exception raised from", "c10::", "frame #")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """{case name: (exception type name, message)} from one run of the cases script."""
    scratch = tmp_path_factory.mktemp("bad_inputs")
    # this checkout's mf_ext first, whatever the caller's PYTHONPATH (a relative one included)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE),
                                                       os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, os.path.join(HERE, "bad_input_cases.py"), str(scratch)],
                         capture_output=True, text=True, timeout=300, cwd=str(scratch), env=env)
    assert run.returncode == 0, f"the cases script died (status {run.returncode}):\n{run.stderr}"
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return {line["name"]: (line["type"], line["message"]) for line in lines}


def test_every_case_ran(outcomes):
    assert [name for name, *_ in CASES if name not in outcomes] == []


@pytest.mark.parametrize("name,exc,fragments", [case[:3] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_bad_input_raises_a_clear_python_error(outcomes, name, exc, fragments):
    kind, message = outcomes[name]
    assert kind == exc.__name__, f"{name}: expected {exc.__name__}, got {kind}: {message}"
    for fragment in fragments:
        assert fragment in message, f"{name}: {fragment!r} not in {message!r}"
    for internal in CPP_INTERNALS:
        assert internal not in message, f"{name}: C++ internals in {message!r}"
    if kind == "CliExit":
        assert "Traceback" not in message and message.count("\n") == 1, message

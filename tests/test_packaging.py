"""The wheel installs and works outside the source tree. Opt-in (MF_EXT_SLOW=1): it builds a
wheel (`pip wheel --no-build-isolation`, reusing the build folder's objects) and a venv.

The fresh venv must see this venv's torch without copying it: `venv --system-site-packages`
would expose the *base* interpreter's packages, not this venv's, so instead a .pth file in the
new venv appends this venv's site-packages to sys.path. Entries from .pth files come after the
venv's own site-packages, so the installed wheel, not the source tree, provides mf_ext.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("MF_EXT_SLOW") != "1",
                                reason="slow (builds a wheel and a venv): set MF_EXT_SLOW=1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMOKE = """
import os, sys, torch, mf_ext
venv = sys.argv[1]
assert os.path.realpath(mf_ext.__file__).startswith(os.path.realpath(venv)), mf_ext.__file__
R = torch.tensor([[1., 0, 3], [0, 2, 1]])
P = torch.rand(2, 2, requires_grad=True)
Q = torch.rand(2, 3, requires_grad=True)
loss = mf_ext.masked_mf_loss(R, P, Q)
loss.backward()
torch.testing.assert_close(loss, mf_ext.masked_mf_loss_reference(R, P, Q))
rows, cols = torch.tensor([0, 1]), torch.tensor([2, 0])
mf_ext.observed_mf_loss(rows, cols, torch.ones(2), P, Q).backward()
print("smoke ok", mf_ext.__file__)
"""


def run(cmd, **kwargs):
    # Without PYTHONPATH (./dev points it at the source tree, whose mf_ext.egg-info would make
    # pip think mf_ext is already installed, and whose mf_ext would shadow the wheel's).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env, **kwargs)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_wheel_installs_and_runs_outside_the_tree(tmp_path):
    wheels, venv, elsewhere = tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
         "--disable-pip-version-check", "-q", ROOT, "-w", str(wheels)], cwd=ROOT)
    (wheel,) = wheels.glob("mf_ext-*.whl")
    assert "abi3" in wheel.name, wheel.name

    run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    with open(os.path.join(site, "_mf_ext_test_parent_venv.pth"), "w") as pth:
        pth.write(sysconfig.get_paths()["purelib"] + "\n")  # this venv's torch, numpy, ...
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
         "--disable-pip-version-check", str(wheel)])

    assert "smoke ok" in run([python, "-c", SMOKE, str(venv)], cwd=elsewhere)
    info = run([str(venv / "bin" / "mf-ext"), "info"], cwd=elsewhere)
    assert str(venv) in info and "built against torch" in info

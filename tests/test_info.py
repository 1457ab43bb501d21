"""`mf-ext info` and the import-time check that the kernels match the installed torch."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch

from mf_ext import ops
from mf_ext.cli import main
from mf_ext.commands.info import kernel_instruction_set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_info_reports_versions_and_build(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    import mf_ext

    assert "mf_ext:" in out and mf_ext.__version__ in out
    assert "torch:" in out and torch.__version__ in out
    assert "python:" in out and "CPU threads:" in out and "CPU kernels:" in out
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(
        "mf_ext::masked_mf_loss_and_grads", "CUDA")
    assert ("CUDA kernels:         compiled in (TORCH_CUDA_ARCH_LIST=" in out) == has_cuda
    assert f"built against torch:  {torch.__version__}" in out


def test_info_in_a_real_process():
    out = subprocess.run([sys.executable, "-m", "mf_ext", "info"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "CUDA kernels:" in out.stdout


@pytest.mark.parametrize("machine,flags,expected", [
    ("x86_64", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma",
                "bmi1", "bmi2", "movbe", "f16c", "abm"}, "x86-64-v4"),
    ("x86_64", {"avx2", "fma", "bmi1", "bmi2", "movbe", "f16c", "abm", "avx512f"}, "x86-64-v3"),
    ("x86_64", {"sse2"}, "baseline"),
    ("x86_64", None, "unknown"),
    ("aarch64", None, "generic"),
])
def test_kernel_instruction_set(machine, flags, expected):
    assert expected in kernel_instruction_set(machine, flags)


def test_build_for_another_torch_is_refused():
    fake = types.SimpleNamespace(TORCH_VERSION="1.0.0")
    with pytest.raises(ImportError, match=r"built against torch 1\.0\.0, but torch 2\.14\.1 is "
                                          r"installed\. Rebuild mf_ext with this torch"):
        ops._check_build_matches(fake, "2.14.1")
    ops._check_build_matches(types.SimpleNamespace(TORCH_VERSION="2.14.1"), "2.14.1")
    ops._check_build_matches(None, "2.14.1")  # a build from before _build_info.py


def test_import_with_a_mismatched_build_info_fails_readably():
    """The whole import path, in a fresh process, with a fake mf_ext._build_info."""
    script = ("import sys, types\n"
              "sys.modules['mf_ext._build_info'] = types.SimpleNamespace(TORCH_VERSION='0.1.2')\n"
              "try:\n    import mf_ext\nexcept ImportError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "built against torch 0.1.2, but torch" in out.stdout
    assert "Rebuild mf_ext with this torch" in out.stdout

"""Builds mf_ext._C: the CPU kernels always, the CUDA kernels when a CUDA toolkit and a CUDA
build of torch are both present (whether or not a GPU is visible).

Switches (environment variables):
  MF_EXT_CUDA=1 / MF_EXT_CUDA=0   force the CUDA kernels on / off
  CUDA_HOME                        the toolkit folder (else found from `nvcc` on the PATH)
  TORCH_CUDA_ARCH_LIST             GPU targets (default "9.0+PTX": H200 code plus portable PTX)
  MAX_JOBS                         parallel compile jobs
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home() -> str | None:
    """The real toolkit folder. `nvcc` on the PATH may be a wrapper script, so torch's guess
    (the folder above it) can be wrong: ask nvcc itself where its toolkit is."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        candidates = sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))
        return os.path.dirname(os.path.dirname(candidates[-1])) if candidates else None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.MULTILINE)
    if match:
        return os.path.realpath(match.group(1).strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def pip_cuda_dirs() -> tuple[list[str], list[str]]:
    """Headers and libraries of the `nvidia` pip packages that come with a CUDA build of torch
    (cuBLAS, cuSPARSE, ... which a bare nvcc toolkit may lack)."""
    site = sysconfig.get_paths()["purelib"]
    includes, libs = [], []
    for root in sorted(glob.glob(os.path.join(site, "nvidia", "cu*"))):
        if os.path.isdir(os.path.join(root, "include")):
            includes.append(os.path.join(root, "include"))
        if os.path.isdir(os.path.join(root, "lib")):
            libs.append(os.path.join(root, "lib"))
    return includes, libs


def want_cuda(cuda_home: str | None) -> bool:
    import torch

    forced = os.environ.get("MF_EXT_CUDA")
    if forced is not None and forced.strip() in ("0", "1"):
        if forced.strip() == "1" and (cuda_home is None or torch.version.cuda is None):
            sys.exit("mf_ext setup: MF_EXT_CUDA=1 but " + (
                "no CUDA toolkit was found (set CUDA_HOME)" if cuda_home is None
                else f"torch {torch.__version__} is not a CUDA build"))
        return forced.strip() == "1"
    return cuda_home is not None and torch.version.cuda is not None


CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = CUDA_HOME
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0+PTX")

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

WITH_CUDA = want_cuda(CUDA_HOME)

sources = ["csrc/mf_ext.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"]
extra_link = ["-fopenmp"]
define_macros = []  # py_limited_api=True makes torch define Py_LIMITED_API
include_dirs = [os.path.join(ROOT, "csrc")]

if WITH_CUDA:
    cuda_includes, cuda_libs = pip_cuda_dirs()
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    define_macros.append(("MF_EXT_WITH_CUDA", "1"))
    ext = CUDAExtension(
        "mf_ext._C",
        sources,
        include_dirs=include_dirs + cuda_includes,
        library_dirs=cuda_libs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=extra_link,
        py_limited_api=True,
    )
else:
    ext = CppExtension(
        "mf_ext._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=extra_link,
        py_limited_api=True,
    )

print(f"mf_ext setup: CUDA kernels {'ON' if WITH_CUDA else 'OFF'} (CUDA_HOME={CUDA_HOME}, "
      f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})", flush=True)

setup(
    packages=find_packages(include=["mf_ext", "mf_ext.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)

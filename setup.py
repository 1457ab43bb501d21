"""Builds mf_ext._C: the CPU kernels always, the CUDA kernels when a CUDA toolkit and a CUDA
build of torch are both present (whether or not a GPU is visible).

Switches (environment variables):
  MF_EXT_CUDA=1 / MF_EXT_CUDA=0   force the CUDA kernels on / off
  CUDA_HOME                        the toolkit folder (else found from `nvcc` on the PATH)
  TORCH_CUDA_ARCH_LIST             GPU targets (default "9.0+PTX": H200 code plus portable PTX)
  MAX_JOBS                         parallel compile jobs
  MF_EXT_SANITIZE=1                build with AddressSanitizer + UBSan (scripts/sanitize.sh)

Also writes mf_ext/_build_info.py (not in git): the torch version built against, CUDA on/off
and the GPU targets, read by `mf-ext info` and checked when mf_ext is imported.
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
# Headers: setuptools rebuilds an extension only when a source or one of these is newer.
headers = sorted(glob.glob("csrc/**/*.h", recursive=True))
# -g0: Python's own CFLAGS carry -g, which made ~90 % of the 15 MB library debug info and cost
# ~15 % of the compile time (the sanitizer build below adds -g back).
cxx_flags = ["-O3", "-g0", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"]
extra_link = ["-fopenmp"]
# py_limited_api=True makes torch define Py_LIMITED_API. AT_PER_OPERATOR_HEADERS, as in torch's
# own build: a unit that defines TORCH_ASSERT_ONLY_METHOD_OPERATORS (every kernel unit) then
# fails to compile if it includes ATen/ATen.h, which cost ~5-10 CPU-s per .cpp unit and ~15 per
# .cu unit more than ATen/core/Tensor.h + the ATen/ops/<op>.h it needs (see
# benchmarks/results/ci_time.md).
define_macros = [("AT_PER_OPERATOR_HEADERS", None)]
include_dirs = [os.path.join(ROOT, "csrc")]

if os.environ.get("MF_EXT_SANITIZE") == "1":
    if WITH_CUDA:
        sys.exit("mf_ext setup: MF_EXT_SANITIZE=1 builds the CPU kernels only; set MF_EXT_CUDA=0")
    # Debug-friendly sanitizer build for scripts/sanitize.sh (CPU only: nvcc objects would not be
    # instrumented). -O1 keeps stack traces readable; the runtime must be LD_PRELOADed.
    sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
    cxx_flags = [f for f in cxx_flags if f != "-O3"] + ["-O1"] + sanitize
    extra_link += sanitize


def write_build_info() -> None:
    """mf_ext/_build_info.py: what this build was made with (rewritten only when it changes)."""
    import torch

    text = (
        '"""Written by setup.py at build time; not in git."""\n'
        f"TORCH_VERSION = {str(torch.__version__)!r}\n"
        f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n"
        f"WITH_CUDA = {WITH_CUDA!r}\n"
        f"CUDA_ARCH_LIST = {os.environ['TORCH_CUDA_ARCH_LIST'] if WITH_CUDA else None!r}\n"
        f"SANITIZE = {os.environ.get('MF_EXT_SANITIZE') == '1'!r}\n"
    )
    path = os.path.join(ROOT, "mf_ext", "_build_info.py")
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


write_build_info()

if WITH_CUDA:
    cuda_includes, cuda_libs = pip_cuda_dirs()
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    headers += sorted(glob.glob("csrc/cuda/*.cuh"))
    define_macros.append(("MF_EXT_WITH_CUDA", "1"))
    ext = CUDAExtension(
        "mf_ext._C",
        sources,
        depends=headers,
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
        depends=headers,
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

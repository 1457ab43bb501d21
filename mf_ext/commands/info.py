"""`mf-ext info`: versions and build facts, for bug reports and "is my build the right one?"."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import List, Optional, Set, Tuple

import torch

HELP = "print mf_ext, torch, CUDA and CPU facts about this installation (for bug reports)"

# The x86-64 levels the CPU kernels are cloned for (csrc/cpu/simd.h, MF_EXT_TARGET_CLONES) and
# the /proc/cpuinfo flags each needs: the loader picks the first level the CPU supports.
_X86_64_LEVELS = (
    ("x86-64-v4 (AVX-512)", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2",
                             "fma", "bmi1", "bmi2", "movbe", "f16c", "abm"}),
    ("x86-64-v3 (AVX2)", {"avx2", "fma", "bmi1", "bmi2", "movbe", "f16c", "abm"}),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def cpu_flags() -> Optional[Set[str]]:
    """The CPU's feature flags from /proc/cpuinfo, or None where there is none."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def kernel_instruction_set(machine: str, flags: Optional[Set[str]]) -> str:
    """Which clone of the CPU kernels this machine runs."""
    if machine not in ("x86_64", "AMD64"):
        return f"{machine}: generic build (no per-level clones)"
    if flags is None:
        return "x86-64 (level unknown: no /proc/cpuinfo)"
    for name, needs in _X86_64_LEVELS:
        if needs <= flags:
            return name
    return "x86-64 baseline (SSE2)"


def facts() -> List[Tuple[str, str]]:
    """(label, value) lines of the report."""
    import mf_ext
    from mf_ext import ops

    info = ops._build_info
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(
        "mf_ext::masked_mf_loss_and_grads", "CUDA")
    if has_cuda:
        archs = getattr(info, "CUDA_ARCH_LIST", None) or "unknown"
        cuda_kernels = f"compiled in (TORCH_CUDA_ARCH_LIST={archs})"
    else:
        cuda_kernels = "not compiled in (CPU only)"
    gpu = (f"{torch.cuda.device_count()} visible ({torch.cuda.get_device_name(0)})"
           if torch.cuda.is_available() else "none visible")
    built = getattr(info, "TORCH_VERSION", None) or "unknown (no mf_ext/_build_info.py)"
    return [
        ("mf_ext", f"{mf_ext.__version__} ({os.path.dirname(mf_ext.__file__)})"),
        ("built against torch", built),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none: a CPU build'})"),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("CUDA kernels", cuda_kernels),
        ("GPUs", gpu),
        ("CPU kernels", kernel_instruction_set(platform.machine(), cpu_flags())),
        ("torch CPU capability", torch.backends.cpu.get_cpu_capability()),
        ("CPU threads", f"{torch.get_num_threads()} used by torch, {os.cpu_count()} logical CPUs"),
    ]


def run(args: argparse.Namespace) -> int:
    del args
    lines = facts()
    width = max(len(label) for label, _ in lines)
    for label, value in lines:
        print(f"{label + ':':<{width + 2}}{value}")
    return 0

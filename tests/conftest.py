"""Fixtures for every test (the backend, thread and determinism guards, the emulator).

Keeping a new test fast (CI runs the whole suite on a clean clone):
- No subprocess unless the test is about a process (a crash, an exit status, a fresh import):
  each costs a Python + torch start, ~4 CPU-s. Run CLI commands through mf_ext.cli.main(argv)
  with capsys; add a case to tests/bad_input_cases.py (one subprocess for all) for bad input.
- Small shapes. A path that needs size (several chunks, tiles, segments) is asserted through
  mf_ext.ops._observed_partition / _dense_partition on the smallest shape that reaches it.
- Emulated cases cost ~1000x a GPU: restrict them with helpers.cases(...) to the shapes that
  reach a CUDA path the others do not.
- torch.compile with Inductor costs seconds per cold graph: one dtype, or backend="aot_eager"
  where the test is about tracing (fullgraph) rather than Inductor.
- Share expensive set-up (fits, launches) through module- or session-scoped fixtures.
- Find the slow ones: `pytest tests/test_x.py --durations=10`.

`./dev test` runs the tests in parallel: pytest-xdist, one worker per core (`-n 0`: one
process), each module on one worker (`--dist loadscope`: a module-scoped fixture, a launch of
ranks or a fit, is set up once). The workers' OpenMP threads sleep when idle instead of spinning
(OMP_WAIT_POLICY=PASSIVE: there are more threads than cores).
"""

import os
import shutil

import pytest
import torch

from helpers import HALF, Backend, register_emulated_autograd

try:
    from hypothesis import settings
except ImportError:  # the property tests skip themselves; everything else runs
    settings = None

# Hypothesis example counts: the default keeps the whole property suite to a few hundred
# examples, derandomized (CI sees the same examples on every run: no flaky reds);
# MF_EXT_HYPOTHESIS_PROFILE=large runs a longer search with fresh random examples.
if settings is not None:
    settings.register_profile("mf_ext", max_examples=300, deadline=None, derandomize=True)
    settings.register_profile("large", max_examples=3000, deadline=None)
    settings.load_profile(os.environ.get("MF_EXT_HYPOTHESIS_PROFILE", "mf_ext"))


def pytest_configure(config):
    if getattr(config.option, "numprocesses", None):  # xdist: the workers inherit it, set before
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # they start (and load OpenMP)
    config.addinivalue_line(
        "markers", "cases(predicate): the parametrized cases (parameters as keywords, backend "
                   "included) a test runs; the others are deselected")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (so do the cuda backend's cases)")


def _runs(item):
    """Whether a parametrized case runs: the CPU kernels refuse half precision (tested as an
    error) and have one algorithm (no deterministic mode); and a test's `cases` marker may
    choose a subset, mostly for the emulator, about 1000x slower than a GPU."""
    params = item.callspec.params if hasattr(item, "callspec") else {}
    if params.get("backend") == "cpu" and (params.get("dtype") in HALF
                                           or params.get("mode") == "deterministic"):
        return False
    marker = item.get_closest_marker("cases")
    return marker is None or marker.args[0](**params)


def pytest_collection_modifyitems(config, items):
    for item in items:  # -m gpu selects every CUDA test (scripts/gpu_check.sh)
        if hasattr(item, "callspec") and item.callspec.params.get("backend") == "cuda":
            item.add_marker("gpu")
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="no CUDA device"))
    dropped = [item for item in items if not _runs(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if _runs(item)]


@pytest.fixture(autouse=True)
def _restore_threads():
    """Tests that change torch's thread count must not leak it into the others."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) for one test (new tensors are then filled with
    NaN: an output entry a kernel leaves unwritten shows)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture(params=["default", "deterministic"])
def mode(request):
    """The CUDA observed op's two algorithms: atomics, or deterministic (sort-based)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param == "deterministic")
    yield request.param
    torch.use_deterministic_algorithms(before)


@pytest.fixture(scope="session")
def emu():
    """torch.ops.mf_ext_emu: csrc/cuda/*.cu translated by tests/cuda_emulation/translate.py and
    built (cached by source hash, see its README); a build error fails the tests using it."""
    from torch.utils.cpp_extension import get_cxx_compiler
    if not shutil.which(get_cxx_compiler()):
        pytest.skip("no C++ compiler: the CUDA emulation cannot be built")
    prebuilt = os.environ.get("MF_EXT_EMU_LIBRARY")
    if prebuilt:  # a library built elsewhere (see cuda_emulation/README.md)
        torch.ops.load_library(prebuilt)
    else:
        from cuda_emulation import translate
        translate.load()
    register_emulated_autograd("mf_ext_emu")
    return torch.ops.mf_ext_emu


@pytest.fixture(params=["cpu", "cuda", "emulated"])
def backend(request):
    """Where the kernels run (helpers.Backend)."""
    ops = request.getfixturevalue("emu") if request.param == "emulated" else torch.ops.mf_ext
    return Backend(request.param, "cuda" if request.param == "cuda" else "cpu", ops)

import os

import pytest
import torch

try:
    from hypothesis import settings
except ImportError:  # the property tests skip themselves; everything else runs
    settings = None

# Hypothesis example counts: the default keeps the whole property suite to a few hundred
# examples (well under a minute); MF_EXT_HYPOTHESIS_PROFILE=large runs a longer search.
if settings is not None:
    # The default profile is derandomized: CI sees the same examples on every run (no flaky
    # reds); the large profile explores with fresh random examples.
    settings.register_profile("mf_ext", max_examples=300, deadline=None, derandomize=True)
    settings.register_profile("large", max_examples=3000, deadline=None)
    settings.load_profile(os.environ.get("MF_EXT_HYPOTHESIS_PROFILE", "mf_ext"))


@pytest.fixture(autouse=True)
def _restore_threads():
    """Tests that change torch's thread count must not leak it into the others."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) for one test (the CUDA observed op's sort-based
    path, for example), restored afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)

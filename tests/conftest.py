import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_threads():
    """Tests that change torch's thread count must not leak it into the others."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)

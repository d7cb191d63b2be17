import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py, peers.py, torch_helpers.py


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny tensors: on a 2-core machine extra threads only add contention (BatchNorm calls were
    measured 3x slower with 2 threads than with 1 when the other core was busy)."""
    try:
        import torch
    except ImportError:  # the NumPy-only tests run without torch
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(items):
    """The JAX tests run last: once JAX has started its runtime (threads), an os.fork() in this
    process (the study's forked workers) warns and could deadlock."""
    items.sort(key=lambda item: item.path.name.startswith("test_jax"))

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


def pytest_addoption(parser):
    parser.addoption(
        "--all",
        action="store_true",
        help="run every test: the fast tier and the slow one (peers' sweeps, multi-process "
        "runs, framework runs, deep fuzzing). Without it (and without -m), only the fast tier.",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: the slow tier (run with --all, or alone with -m slow): peers' differential "
        "sweeps, multi-process runs, framework runs beyond one smoke test, deep fuzzing",
    )


def pytest_collection_modifyitems(config, items):
    """Without --all or -m, the slow tier is left out. The JAX tests run last: once JAX has
    started its runtime (threads), an os.fork() in this process (the study's forked workers)
    warns and could deadlock."""
    if not config.getoption("--all") and not config.getoption("-m"):
        slow = [item for item in items if item.get_closest_marker("slow")]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if not item.get_closest_marker("slow")]
    items.sort(key=lambda item: item.path.name.startswith("test_jax"))

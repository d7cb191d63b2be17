import ast
import importlib.util
import sys
from functools import cache
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # tests/reference.py, peers.py, torch_helpers.py


@cache
def _missing(path: Path) -> tuple[str, ...]:
    """The packages ``path`` imports at its top level (directly or through the tests' own helper
    modules) that are not installed: such a file is not collected, and the header says so. The
    oldest-versions CI job installs only what the package requires."""
    return _missing_in(path.read_text())


def _missing_in(source: str) -> tuple[str, ...]:
    """What :func:`_missing` finds in Python ``source`` (also the code of a docs page)."""
    out: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import):
            roots = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots = [node.module.split(".")[0]]
        else:
            continue
        for root in roots:
            local = HERE / f"{root}.py"
            if local.is_file():
                out.update(_missing(local))
            elif root not in sys.stdlib_module_names and importlib.util.find_spec(root) is None:
                out.add(root)
    return tuple(sorted(out))


collect_ignore = [p.name for p in sorted(HERE.glob("*.py")) if _missing(p)]


def pytest_report_header(config):
    if collect_ignore:
        missing = sorted({m for name in collect_ignore for m in _missing(HERE / name)})
        return f"not collected, {', '.join(missing)} not installed: {', '.join(collect_ignore)}"
    return None


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

"""The package's shape: the library never imports its tools, the tools use only public modules of
other packages, and ``dir(polyak)`` shows the public names only."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import polyak

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(polyak.__file__).resolve().parents[1]  # src/, or site-packages for an installed wheel
TOOLS = ("polyak.cli", "polyak.__main__")


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "polyak").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _tool(module: str) -> str | None:
    """The tool ``module`` belongs to (``polyak.cli`` for ``polyak.cli.bench.run``), or None."""
    return next((t for t in TOOLS if module == t or module.startswith(t + ".")), None)


def imports(path: Path) -> set[str]:
    """The polyak modules ``path`` imports: statements anywhere (functions included), and the
    import lines of code held in strings (code run in a subprocess)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found |= set(re.findall(r"(?:^|\n)\s*(?:from|import) (polyak[\w.]*)", node.value))
    return {m for m in found if m in MODULES}


def test_the_library_never_imports_its_tools():
    bad = {
        module: sorted(m for m in imports(path) if _tool(m))
        for module, path in MODULES.items()
        if not _tool(module)
    }
    assert not {k: v for k, v in bad.items() if v}


def test_tools_import_no_private_module_of_another_package():
    assert {_tool(m) for m in MODULES} >= set(TOOLS)  # every tool is found
    bad = {}
    for module, path in MODULES.items():
        tool = _tool(module)
        if tool is None:
            continue
        private = [
            m
            for m in imports(path)
            if _tool(m) != tool and any(p.startswith("_") for p in m.split(".")[1:])
        ]
        if private:
            bad[module] = private
    assert not bad


def test_the_check_sees_private_imports(tmp_path):
    """The two checks above would fail on the imports this package had before."""
    path = tmp_path / "probe.py"
    path.write_text(
        "from polyak._torch.ema import EMA\n"
        "from polyak.workflows import progress\n"
        "def f():\n    import polyak.cli.bench.run\n"
        "CODE = 'import time\\nfrom polyak.workflows._epoch import length\\n'\n"
    )
    assert imports(path) == {
        "polyak._torch.ema",
        "polyak.workflows",
        "polyak.workflows.progress",
        "polyak.cli.bench.run",
        "polyak.workflows._epoch",
    }


def test_dir_shows_public_names_only():
    names = dir(polyak)
    assert names == sorted(polyak.__all__)
    assert set(polyak._LAZY) <= set(names)  # every name imported on first use is public
    for leak in ("Any", "TYPE_CHECKING", "annotations", "importlib"):
        assert leak not in names
    assert {"EMA", "ArrayEMA", "schedules", "metrics", "train_with_ema", "ema_update_"} <= set(
        names
    )
    for name in names:
        assert getattr(polyak, name) is not None, name


def test_import_polyak_imports_numpy_only():
    code = "import sys, polyak; print(sorted({m.split('.')[0] for m in sys.modules}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heavy = {"torch", "sklearn", "matplotlib", "scipy", "jax"} & set(ast.literal_eval(done.stdout))
    assert not heavy


def test_metrics_all_lists_every_public_function():
    import inspect

    from polyak import metrics

    defined = {
        name
        for name, value in vars(metrics).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == metrics.__name__
    }
    assert set(metrics.__all__) == defined


def test_the_version_is_written_once_in_pyproject():
    import re as _re
    from importlib import metadata

    pyproject = (ROOT / "pyproject.toml").read_text()
    declared = _re.search(r'^version = "(.+)"$', pyproject, flags=_re.M)
    assert declared and polyak.__version__ == metadata.version("polyak") == declared.group(1)
    hard_coded = [p for p in MODULES.values() if _re.search(r'__version__ = "', p.read_text())]
    assert not hard_coded


def test_benchmark_scripts_import_each_other_without_cycles():
    folder = ROOT / "benchmarks"
    scripts = {p.stem: p for p in folder.glob("*.py")}
    edges = {}
    for name, path in scripts.items():
        tree = ast.parse(path.read_text())
        edges[name] = {
            a.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for a in node.names
            if a.name in scripts
        } | {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module in scripts
        }

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(
            n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in edges[start]
        )

    assert not [n for n in scripts if reaches(n, n, set())]
    assert "posthoc_report" in edges["posthoc"]  # the check sees the imports in functions

"""Every ```python block of the docs runs as-is, top to bottom in one namespace per page, on CPU
(each page in its own temporary working folder).

A block that is only an include of an example (``--8<-- "examples/x.py"``, shown in full on the
site) is run by ``tests/test_examples.py`` instead; here the file must exist. ```bash blocks
(install commands, ``torchrun``) and ```text blocks (output) are not run.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INCLUDE = re.compile(r'^--8<-- "([^"]+)"$')
PAGES = [
    p for p in sorted((ROOT / "docs").rglob("*.md")) if re.search(r"```python\n", p.read_text())
]


def _blocks(page: Path) -> tuple[list[str], list[str]]:
    code, included = [], []
    for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S):
        lines = block.strip().splitlines()
        if len(lines) == 1 and INCLUDE.match(lines[0]):
            included.append(INCLUDE.match(lines[0]).group(1))  # type: ignore[union-attr]
        else:
            code.append(block)
    return code, included


def _imports(code: list[str]) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse("\n".join(code))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_the_pages_with_code_are_found():
    names = {p.relative_to(ROOT / "docs").as_posix() for p in PAGES}
    assert {"guides/quickstart.md", "guides/posthoc.md", "guides/numpy.md"} <= names


@pytest.mark.parametrize(
    "page", PAGES, ids=[p.relative_to(ROOT / "docs").as_posix() for p in PAGES]
)
def test_docs_code_runs(page, tmp_path, monkeypatch):
    code, included = _blocks(page)
    for path in included:
        assert path.startswith("examples/") and (ROOT / path).is_file(), path
    missing = sorted(name for name in _imports(code) if importlib.util.find_spec(name) is None)
    if missing:  # the oldest-versions job installs only what polyak requires
        pytest.skip(f"{', '.join(missing)} not installed")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__guide__"}
    for i, block in enumerate(code):
        exec(compile(block, f"{page.name} block {i + 1}", "exec"), namespace)

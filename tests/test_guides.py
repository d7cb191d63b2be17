"""Every ```python block of the docs runs as-is, top to bottom in one namespace per page, on CPU
(each page in its own temporary working folder).

A block that is only an include of an example (``--8<-- "examples/x.py"``, shown in full on the
site) is run by ``tests/test_examples.py`` instead; here the file must exist. ```bash blocks
(install commands, ``torchrun``) are not run. A ```text block right after a python block is
its output: what that block printed must end with it (a Trainer's own log lines may come
before).

Pages in ``OWN_PROCESS`` run in a fresh interpreter, in the slow tier: they start a process
group and set DeepSpeed's environment variables, which no other test may inherit.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import _missing_in

ROOT = Path(__file__).resolve().parents[1]
INCLUDE = re.compile(r'^--8<-- "([^"]+)"$')
BLOCK = re.compile(r"```(python|text)\n(.*?)```", flags=re.S)
PAGES = [
    p for p in sorted((ROOT / "docs").rglob("*.md")) if re.search(r"```python\n", p.read_text())
]
OWN_PROCESS = {"guides/deepspeed.md"}


def _name(page: Path) -> str:
    return page.relative_to(ROOT / "docs").as_posix()


def _pages():
    for page in PAGES:
        marks = [pytest.mark.slow] if _name(page) in OWN_PROCESS else []
        yield pytest.param(page, id=_name(page), marks=marks)


def _blocks(page: Path) -> list[tuple[str, str]]:
    """The page's python and text blocks in order; a python block that only includes an example
    is ``("include", path)``."""
    out = []
    for kind, block in BLOCK.findall(page.read_text()):
        include = INCLUDE.match(block.strip()) if kind == "python" else None
        out.append(("include", include.group(1)) if include else (kind, block))
    return out


def test_the_pages_with_code_are_found():
    names = {_name(p) for p in PAGES}
    assert {"guides/quickstart.md", "guides/posthoc.md", "guides/numpy.md"} <= names


@pytest.mark.parametrize("page", list(_pages()))
def test_docs_code_runs(page, tmp_path, monkeypatch):
    blocks = _blocks(page)
    for kind, path in blocks:
        if kind == "include":
            assert path.startswith("examples/") and (ROOT / path).is_file(), path
    code = [block for kind, block in blocks if kind == "python"]
    missing = _missing_in("\n".join(code))
    if missing:  # the oldest-versions job installs only what polyak requires
        pytest.skip(f"{', '.join(missing)} not installed")
    if _name(page) in OWN_PROCESS:
        script = tmp_path / "guide_page.py"  # not deepspeed.py: it would shadow the package
        script.write_text("\n".join(code))
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, str(script)]
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{page.name}:\n{done.stderr[-4000:]}"
        return
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__guide__"}
    printed = None  # what the python block just run printed, until the next block
    for i, (kind, block) in enumerate(blocks):
        if kind == "python":
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(block, f"{page.name} block {i + 1}", "exec"), namespace)
            printed = out.getvalue()
        elif kind == "text" and printed is not None:  # the output of the block before
            assert printed.strip().endswith(block.strip()), f"{page.name} block {i + 1}"
            printed = None
        else:
            printed = None

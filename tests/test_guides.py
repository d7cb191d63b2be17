"""Every ```python block of each ``docs/guides/*.md`` page runs as-is, top to bottom in one
namespace, on CPU (each page in its own temporary working folder), and every line of a ```text
block that directly follows a python block is printed by it (the output a page shows is true)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

GUIDES = sorted((Path(__file__).resolve().parents[1] / "docs" / "guides").glob("*.md"))

# A python block, and the text block right after it (only blank space between), if any.
BLOCK = re.compile(r"```python\n(.*?)```\s*(?:```text\n(.*?)```)?", flags=re.S)


@pytest.mark.parametrize("page", GUIDES, ids=[p.stem for p in GUIDES])
def test_guide_code_runs(page, tmp_path, monkeypatch, capsys):
    blocks = BLOCK.findall(page.read_text())
    assert blocks, f"{page.name} has no python block"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__guide__"}
    for i, (code, shown) in enumerate(blocks):
        capsys.readouterr()
        exec(compile(code, f"{page.name} block {i + 1}", "exec"), namespace)
        printed = capsys.readouterr().out
        for line in filter(None, map(str.strip, shown.splitlines())):
            assert line in printed, f"{page.name} block {i + 1} shows {line!r}, printed {printed!r}"

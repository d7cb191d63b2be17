"""Every ```python block of each ``docs/guides/*.md`` page runs as-is, top to bottom in one
namespace, on CPU (each page in its own temporary working folder), and ends its printed
output with what the ```text block right after it shows (where one follows; a Trainer's own
log lines may come before it)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

GUIDES = sorted((Path(__file__).resolve().parents[1] / "docs" / "guides").glob("*.md"))
BLOCK = re.compile(r"```(python|text)\n(.*?)```", flags=re.S)


@pytest.mark.parametrize("page", GUIDES, ids=[p.stem for p in GUIDES])
def test_guide_code_runs(page, tmp_path, monkeypatch):
    blocks = BLOCK.findall(page.read_text())
    assert any(kind == "python" for kind, _ in blocks), f"{page.name} has no python block"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__guide__"}
    printed = None  # what the block just run printed, until a text block or another block
    for i, (kind, code) in enumerate(blocks):
        if kind == "python":
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"{page.name} block {i + 1}", "exec"), namespace)
            printed = out.getvalue()
        elif printed is not None:  # a text block right after code: its expected output
            assert printed.strip().endswith(code.strip()), f"{page.name} block {i + 1}"
            printed = None

"""The guide pages of BEMA, SWAG, write-back and weighted averages: every ```python block runs
as-is, top to bottom in one namespace per page, and prints what the ```text block after it
shows (where one follows)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

GUIDES = Path(__file__).resolve().parent.parent / "docs" / "guides"
PAGES = ["bema.md", "swag.md", "write-back.md", "weighted-averages.md"]
BLOCK = re.compile(r"```(python|text)\n(.*?)```", re.DOTALL)


@pytest.mark.parametrize("page", PAGES)
def test_guide_code_runs_and_prints_what_it_shows(page):
    blocks = BLOCK.findall((GUIDES / page).read_text())
    namespace: dict[str, object] = {"__name__": "__guide__"}
    printed = None
    ran = 0
    for kind, code in blocks:
        if kind == "python":
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"{page}:block{ran}", "exec"), namespace)
            printed, ran = out.getvalue(), ran + 1
        elif printed is not None:  # a text block right after code: its expected output
            assert printed.strip() == code.strip(), (page, ran)
            printed = None
    assert ran >= 2

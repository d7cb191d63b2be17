"""Every ```python block of each ``docs/guides/*.md`` page runs as-is, top to bottom in one
namespace, on CPU (each page in its own temporary working folder).

Pages in ``OWN_PROCESS`` run in a fresh interpreter, in the slow tier: they start a process
group and set DeepSpeed's environment variables, which no other test may inherit."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDES = sorted((ROOT / "docs" / "guides").glob("*.md"))
OWN_PROCESS = {"deepspeed": "deepspeed"}  # page: the package it needs


def _pages():
    for page in GUIDES:
        marks = [pytest.mark.slow] if page.stem in OWN_PROCESS else []
        yield pytest.param(page, id=page.stem, marks=marks)


@pytest.mark.parametrize("page", list(_pages()))
def test_guide_code_runs(page, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert blocks, f"{page.name} has no python block"
    if page.stem in OWN_PROCESS:
        if importlib.util.find_spec(OWN_PROCESS[page.stem]) is None:
            pytest.skip(f"{OWN_PROCESS[page.stem]} not installed")
        script = tmp_path / f"guide_{page.stem}.py"  # not deepspeed.py: it would shadow it
        script.write_text("\n".join(blocks))
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, str(script)]
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{page.name}:\n{done.stderr[-4000:]}"
        return
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__guide__"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{page.name} block {i + 1}", "exec"), namespace)

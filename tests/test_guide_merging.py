"""The figures ``docs/guides/merging.md`` quotes are those of the result file it names (its
code and the output it shows are checked by tests/test_guides.py)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDE = (ROOT / "docs" / "guides" / "merging.md").read_text()


def test_the_figures_come_from_the_result_file_named():
    section = GUIDE.split("## Memory and speed", 1)[1].split("\n## ", 1)[0]
    (name,) = set(re.findall(r"benchmarks/results/([\w.+-]+_merge_[\w.+-]+\.md)", section))
    result = (ROOT / "benchmarks" / "results" / name).read_text()
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert len(rows) >= 8  # both tables, headers included
    assert [line for line in rows if line not in result] == []

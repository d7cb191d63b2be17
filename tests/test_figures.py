"""Every figure the README and the docs quote from a result file is in that file.

A quoted figure carries its source right after it, invisible once rendered:
``+11.9<!-- docs/study/report.md: Label noise 40% -->``. The check: the file exists, holds a line
containing the context after the colon (if any), and that line has a number that, written with
as many decimals as the figure, gives the figure (so ``0.78`` matches ``0.7812`` in a JSON file
but not ``0.79``). A figure without a marker is not checked, so every page names its sources.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MARKER = re.compile(r"([^\s(|]+?)<!-- ([\w./+-]+\.(?:md|json|txt))(?:: (.*?))? -->")
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?")


def _figures(page: Path) -> list[tuple[str, str, str]]:
    return [m.groups(default="") for m in MARKER.finditer(page.read_text())]  # type: ignore[misc]


def _written_like(figure: str, value: float) -> bool:
    decimals = len(figure.split(".")[1].split("e")[0]) if "." in figure else 0
    if "e" in figure:
        return f"{value:.{decimals}e}" == figure
    return f"{value:.{decimals}f}" == figure.replace(",", "")


def _in_line(figure: str, line: str) -> bool:
    return any(_written_like(figure, float(t.replace(",", ""))) for t in NUMBER.findall(line))


CASES = [(page, *fig) for page in PAGES for fig in _figures(page)]


def test_the_readme_quotes_its_figures_from_files():
    assert sum(page.name == "README.md" for page, *_ in CASES) >= 10


@pytest.mark.parametrize(
    ("page", "text", "source", "context"),
    CASES,
    ids=[f"{p.relative_to(ROOT)}:{t}" for p, t, *_ in CASES],
)
def test_a_quoted_figure_is_in_its_source(page, text, source, context):
    figure = NUMBER.search(text)
    assert figure, f"{page.name}: no number before the marker of {source} ({text!r})"
    path = ROOT / source
    assert path.is_file(), f"{page.name}: {source} is not a committed file"
    lines = [line for line in path.read_text().splitlines() if context in line]
    assert lines, f"{page.name}: no line of {source} contains {context!r}"
    assert any(_in_line(figure.group(), line) for line in lines), (
        f"{page.name}: {figure.group()} is not on a line of {source} containing {context!r}"
    )

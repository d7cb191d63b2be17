"""Write docs/reference/cli.md from the `polyak` command's own parser (tests/test_readme.py
checks that the committed page is what this writes): python scripts/cli_reference.py"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "reference" / "cli.md"
INTRO = """# Command line

`polyak` (also `python -m polyak`) runs the programs built on the library. A mistake on the
command line (a bad value, an unknown name, a missing data directory, an output directory that
cannot be written) is one line on stderr and exit status 2, found before any work starts;
`--debug` shows the traceback instead. This page is written from the parser itself
(`python scripts/cli_reference.py`).
"""


def render() -> str:
    os.environ["COLUMNS"] = "100"
    from polyak.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = [INTRO, "```text\n" + parser.format_help().rstrip() + "\n```\n"]
    for name, child in sub.choices.items():
        parts.append(f"## polyak {name}\n\n```text\n{child.format_help().rstrip()}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    PAGE.write_text(render())
    print(f"wrote {PAGE}", file=sys.stderr)

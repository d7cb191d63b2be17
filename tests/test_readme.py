"""The README stays true: its commands, its quickstart and its tables."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_readme_test_command_is_what_ci_runs():
    test_cmd = next(b.strip() for b in bash_blocks() if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci, f"{test_cmd!r} is not a line of .ci/run"


def test_readme_main_command_names_files_that_exist():
    main_cmd = bash_blocks()[0].strip()
    for path in re.findall(r"(?:scripts|examples)/[\w./-]+\.(?:py|sh)", main_cmd):
        assert (ROOT / path).is_file(), path


def test_quickstart_block_runs(tmp_path, monkeypatch):
    code = re.findall(r"```python\n(.*?)```", README, flags=re.S)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README quickstart", "exec"), {})
    assert (tmp_path / "ema.pt").is_file()


def test_horizon_table_matches_the_code():
    table = runpy.run_path(str(ROOT / "examples" / "horizon_table.py"))
    text = table["decay_table"]() + "\n\n" + table["power_table"]()
    page = (ROOT / "docs" / "guides" / "horizon.md").read_text()
    block = page.split("<!-- horizon-table:start -->\n")[1].split("\n<!-- horizon-table:end")[0]
    assert block.strip() == text.strip()


def test_the_test_command_runs_the_docstring_examples():
    pyproject = (ROOT / "pyproject.toml").read_text()
    addopts = re.search(r'^addopts = "(.*)"$', pyproject, flags=re.M)
    assert addopts and "--doctest-modules" in addopts.group(1).split()
    assert 'testpaths = ["tests", "src/polyak"]' in pyproject


def test_ci_script_fails_on_errors_and_uses_pinned_torch():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "constraints.txt" in setup and "set -euo pipefail" in setup


def test_pytest_exits_nonzero_when_no_tests_run(tmp_path):
    # .ci/run relies on pytest failing (exit 5) when nothing is collected.
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", str(tmp_path)], capture_output=True)
    assert r.returncode == 5


def test_the_command_line_page_is_the_parser():
    page = runpy.run_path(str(ROOT / "scripts" / "cli_reference.py"))
    text = (ROOT / "docs" / "reference" / "cli.md").read_text()
    assert text == page["render"](), "run: python scripts/cli_reference.py"

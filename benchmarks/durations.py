"""How long the README's two commands take here, set-up excluded: the study, the fast test tier
and every test (``--all``), each timed once, with the load before and after.

    python benchmarks/durations.py                 # about 10 minutes on 2 idle cores
    python benchmarks/durations.py --only study    # one of them

Writes ``benchmarks/results/<date>_durations_<machine>.json`` and ``.md``; the README quotes it.
The load average is recorded beside every time: on a shared machine the times grow with it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from polyak.cli.common import load, machine, result_stem, versions, write_result

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent


def commands(out: Path) -> dict[str, list[str]]:
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    return {
        "study": [str(VENV / "polyak"), "study", "--out", str(out / "study")],
        "fast tier": pytest,
        "all tests": [*pytest, "--all"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["study", "fast tier", "all tests"], nargs="*")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cmd in commands(Path(tmp)).items():
            if args.only and name not in args.only:
                continue
            before = load()
            print(f"{name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            tail = (proc.stdout.strip().splitlines() or [""])[-1]
            rows.append(
                {
                    "command": name,
                    "argv": cmd[1:],
                    "seconds": seconds,
                    "exit": proc.returncode,
                    "load_before": before,
                    "load_after": load(),
                    "last_line": tail,
                }
            )
            print(f"  {seconds:.0f} s, exit {proc.returncode}: {tail}", file=sys.stderr)
    m, v = machine(), versions()
    md = [
        f"# Durations of the README's commands, {m['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; {v}.",
        "",
        "| command | seconds | minutes | exit | load before (1/5/15) | load after | last line |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['command']} | {r['seconds']:.0f} | {r['seconds'] / 60:.1f} | {r['exit']} | "
            f"{'/'.join(f'{x:.2f}' for x in r['load_before'])} | "
            f"{'/'.join(f'{x:.2f}' for x in r['load_after'])} | {r['last_line']} |"
        )
    stem = result_stem(m, v, kind="durations")
    for path in write_result(
        args.out, stem, {"machine": m, "versions": v, "rows": rows}, "\n".join(md) + "\n"
    ):
        print(path, file=sys.stderr)


if __name__ == "__main__":
    main()

"""What the programs share: output folders, the machine and load a result was measured on, the
versions it ran with, and result files named after them.

Every figure polyak's programs (and the scripts in ``benchmarks/``) publish comes from a result
file written through :func:`write_result`: JSON (and Markdown) whose ``machine`` block names the
CPU, the cores, the load average before (and after) the run and the date, and whose
``versions`` block names the packages, so that a number quoted elsewhere can be traced to the
machine it came from. Imports nothing heavy: torch is asked for its threads only when loaded.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from polyak import files

__all__ = ["check_output_dir", "load", "machine", "result_stem", "versions", "write_result"]

DISTS = ("polyak", "torch", "numpy")


def check_output_dir(directory: str | os.PathLike[str], what: str = "output directory") -> None:
    """Create ``directory`` if needed; a ``ValueError`` naming ``what`` and the path if it is a
    file, cannot be created or cannot be written (checked before a run, not at its end)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{what} {directory} is a file, not a directory")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{what} {directory}: cannot create the directory ({e.strerror})") from e
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {directory}: the directory is not writable")


def load() -> list[float]:
    """The 1, 5 and 15-minute load averages (empty where the system does not report them)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The machine a measurement ran on: CPU model, cores, load now, platform, Python, date
    (and torch's threads and CPU capability when torch is loaded)."""
    out: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "load": load(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch_threads"] = torch.get_num_threads()
        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return out


def versions(dists: Iterable[str] = DISTS) -> dict[str, str]:
    """``{distribution: version or "not installed"}``."""
    out = {}
    for name in dists:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def result_stem(m: dict[str, Any], v: dict[str, str], kind: str = "", tag: str = "") -> str:
    """``<date>[_<kind>]_<cpu>_<cores>c_torch-<v>_py<v>[_<tag>]``: a result file's name says
    when, what and where it was measured."""
    cpu = _slug(re.sub(r"\(R\)|\(TM\)|CPU|Processor|@.*", "", m["cpu"]))
    parts = [m["date"][:10], *([kind] if kind else []), cpu, f"{m['cores']}c"]
    if v.get("torch", "not installed") != "not installed":
        parts.append(f"torch-{v['torch']}")
    parts.append(f"py{m['python']}")
    return "_".join(parts + ([tag] if tag else []))


def write_result(
    directory: str | os.PathLike[str],
    stem: str,
    result: dict[str, Any],
    markdown: str | None = None,
) -> list[Path]:
    """Write ``<stem>.json`` (and ``<stem>.md``) in ``directory``, all or none, atomically."""
    check_output_dir(directory)
    base = Path(directory)
    out = [base / f"{stem}.json"] + ([base / f"{stem}.md"] if markdown is not None else [])
    with files.Outputs() as staged:
        staged.stage(out[0]).write_text(json.dumps(result, indent=1, default=str) + "\n")
        if markdown is not None:
            staged.stage(out[1]).write_text(markdown)
        staged.commit()
    return out


def evict_page_cache(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Write ``paths`` to disk and drop them from the page cache, so that the next read of
    them comes from the disk (a cold-cache measurement; Linux ``posix_fadvise``)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

"""Files polyak writes and reads back: atomic writes, all-or-none outputs, checked reads.

Everything polyak reads back from disk (a post-hoc store's manifest, a callback's checkpoint
files, a state) is treated as untrusted input. The rules, one implementation each:

* **Writes are atomic**: a temporary file in the same directory, flushed, fsynced, renamed over
  the target, then the directory fsynced (:func:`write_bytes_atomic`, :func:`write_json_atomic`).
  A crash leaves either the old file or the new one, never a mix.
* **Several outputs are committed together** (:class:`Outputs`): each is written to a temporary
  file first; only when every one is complete are they renamed into place, the files they
  replace moved aside first and put back if any rename fails. On any failure no output is
  replaced and no temporary file is left.
* **A name read from a file is a plain name** (:func:`plain_name`): no separator, not ``.`` or
  ``..``, not absolute, no NUL, and of the pattern the writer uses. :func:`regular_file`
  resolves it inside the given folder and accepts only a regular file whose real path stays in
  that folder (a symlink leaving it, a device such as ``/dev/zero``, a fifo or a directory are
  refused), so nothing outside the folder is ever read, written or deleted.
* **JSON is read bounded** (:func:`read_json`): a regular file of at most ``max_bytes``.

Every violation raises :class:`polyak.CheckpointError` naming the file and the field.
This module imports only the standard library.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> write_json_atomic(d / "state.json", {"step": 3})
    >>> read_json(d / "state.json")
    {'step': 3}
    >>> plain_name("../etc/passwd", what="a file name", where="state.json")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    polyak.errors.CheckpointError: state.json: a file name '../etc/passwd' is not a plain ...
"""

from __future__ import annotations

import json
import os
import re
import stat
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from polyak.errors import CheckpointError

__all__ = [
    "Outputs",
    "fsync_dir",
    "fsync_file",
    "open_regular",
    "plain_name",
    "read_json",
    "regular_file",
    "temp_path",
    "write_bytes_atomic",
    "write_json_atomic",
]

MAX_JSON_BYTES = 64 << 20


def temp_path(path: Path) -> Path:
    """A fresh temporary name beside ``path`` (``.<name>.<8 hex>.tmp``: hidden, recognisable)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Persist a rename in ``path`` (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def _staged(path: Path, mode: str) -> Iterator[IO[Any]]:
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename, fsync of the dir)."""
    with _staged(Path(path), "wb") as f:
        f.write(data)


def write_json_atomic(path: str | os.PathLike[str], data: object) -> None:
    """Write ``data`` as JSON to ``path`` atomically."""
    with _staged(Path(path), "w") as f:
        json.dump(data, f, indent=1)


class Outputs:
    """Several output files committed together, or none of them.

    :meth:`stage` gives a temporary path to write each output to; :meth:`commit` renames them
    all into place once every one is complete. Used as a context manager, any exception before
    the commit removes the temporary files and replaces nothing.

    Examples:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> with Outputs() as out:
        ...     out.stage(d / "a.txt").write_text("a")
        ...     out.stage(d / "b.txt").write_text("b")
        ...     out.commit()
        1
        1
        >>> sorted(p.name for p in d.iterdir())
        ['a.txt', 'b.txt']
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []
        self.committed = False

    def stage(self, path: str | os.PathLike[str]) -> Path:
        """The temporary path to write ``path``'s new content to (beside it, same filesystem).

        Raises:
            IsADirectoryError: ``path`` is a directory (found now, before anything is written).
        """
        path = Path(path)
        if path.is_dir() and not path.is_symlink():
            raise IsADirectoryError(f"cannot write {path}: it is a directory")
        tmp = temp_path(path)
        self._staged.append((tmp, path))
        return tmp

    def commit(self) -> None:
        """fsync every staged file, then rename each into place (all, or none on failure)."""
        for tmp, _ in self._staged:
            fsync_file(tmp)
        moved: list[tuple[Path, Path]] = []  # (backup, original) of the files replaced
        done: list[Path] = []
        try:
            for tmp, path in self._staged:
                if path.exists() or path.is_symlink():
                    backup = temp_path(path)
                    os.replace(path, backup)
                    moved.append((backup, path))
                os.replace(tmp, path)
                done.append(path)
        except BaseException:
            for path in done:
                path.unlink(missing_ok=True)
            for backup, path in reversed(moved):
                os.replace(backup, path)
            raise
        for backup, _ in moved:
            backup.unlink(missing_ok=True)
        for parent in {path.parent for _, path in self._staged}:
            fsync_dir(parent)
        self.committed = True

    def discard(self) -> None:
        """Remove the staged temporary files that were not committed."""
        for tmp, _ in self._staged:
            tmp.unlink(missing_ok=True)
        self._staged.clear()

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            self.discard()


_SEPARATORS = tuple(s for s in (os.sep, os.altsep, "/", "\\") if s)


def plain_name(
    name: object,
    *,
    what: str,
    where: str | os.PathLike[str],
    pattern: str | re.Pattern[str] | None = None,
) -> str:
    """``name`` if it is a plain file name (and matches ``pattern`` in full), else an error.

    Args:
        name: the value read from an untrusted file.
        what: what the name is, for the message (``"snapshots[3].files.live.name"``).
        where: the file it was read from, for the message.
        pattern: a regular expression the whole name must match.

    Raises:
        CheckpointError: naming ``where``, ``what`` and the value.
    """
    if not isinstance(name, str):
        raise CheckpointError(f"{where}: {what} must be a string, got {name!r}")
    if (
        not name
        or name in (".", "..")
        or "\0" in name
        or any(s in name for s in _SEPARATORS)
        or os.path.isabs(name)
    ):
        raise CheckpointError(
            f"{where}: {what} {name!r} is not a plain file name (no path separators, '.', '..' "
            "or absolute paths)"
        )
    if pattern is not None and not re.fullmatch(pattern, name):
        shown = pattern if isinstance(pattern, str) else pattern.pattern
        raise CheckpointError(f"{where}: {what} {name!r} is not of the form {shown}")
    return name


def regular_file(directory: str | os.PathLike[str], name: str, *, what: str = "file") -> Path:
    """``directory / name`` if it is a regular file whose real path is inside ``directory``.

    ``name`` must already be a plain name (:func:`plain_name`). A missing file raises
    ``FileNotFoundError``; a symlink that leaves the folder, a device, a fifo, a socket or a
    directory raise :class:`polyak.CheckpointError`.
    """
    folder = Path(directory)
    path = folder / name
    try:
        st = os.stat(path)  # follows a symlink; FileNotFoundError when missing or dangling
    except FileNotFoundError:
        raise
    except OSError as e:  # a symlink loop, a name too long, no permission
        raise CheckpointError(f"{what} {path} cannot be read ({e.strerror}); refusing it") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{what} {path} is not a regular file; refusing to read it")
    if path.is_symlink() and folder.resolve() not in path.resolve().parents:
        raise CheckpointError(
            f"{what} {path} is a symlink to {path.resolve()}, outside {folder}; refusing it"
        )
    return path


def open_regular(directory: str | os.PathLike[str], name: str, *, what: str = "file") -> IO[bytes]:
    """Open ``directory / name`` for reading, unbuffered, if it is a regular file inside it.

    :func:`regular_file` first; then the file is opened without blocking and checked again on
    the open descriptor, so that one swapped for a fifo or a device between the check and the
    open is refused, never waited on or read.

    Raises:
        FileNotFoundError: missing. CheckpointError: as :func:`regular_file`.
    """
    path = regular_file(directory, name, what=what)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{what} {path} is not a regular file; refusing to read it")
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def read_json(
    path: str | os.PathLike[str],
    *,
    max_bytes: int = MAX_JSON_BYTES,
    missing: Callable[[Path], BaseException] | None = None,
) -> object:
    """The JSON in ``path``: a regular file of at most ``max_bytes`` bytes, valid UTF-8 JSON.

    Args:
        missing: makes the exception to raise when the file does not exist (default:
            ``FileNotFoundError``).

    Raises:
        CheckpointError: not a regular file, too large, or not valid JSON (naming the file).
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if missing is None:
            raise
        raise missing(path) from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path} is not a regular file; refusing to read it")
    if st.st_size > max_bytes:
        raise CheckpointError(f"{path} is {st.st_size} bytes, more than {max_bytes}; refusing it")
    with open(path, "rb") as f:
        limit = max_bytes + 1  # read what the file holds, not a buffer of max_bytes
        data = f.read(min(st.st_size + 1, limit))
        if len(data) > st.st_size:  # it grew since the stat
            data += f.read(limit - len(data))
    if len(data) > max_bytes:
        raise CheckpointError(f"{path} grew past {max_bytes} bytes while read; refusing it")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None

"""A one-line progress bar on stderr, drawn only when stderr is a terminal (no tqdm).

:func:`polyak.train_with_ema` draws it (``progress=``), and so does ``polyak study``.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """``prefix [#####-----] 12/40 loss 0.4321``, redrawn at most ten times a second.

    Examples:
        >>> import io
        >>> stream = io.StringIO()
        >>> bar = Progress(4, "train", enabled=True, stream=stream, width=4)
        >>> bar.update(4, "loss 0.5")
        >>> stream.getvalue().split(chr(13))[-1].replace(chr(27) + "[K", "")  # after the last CR
        'train [####] 4/4 loss 0.5'

    Args:
        total: number of items, or ``None`` when unknown (then only the count is shown).
        prefix: text in front of the bar.
        enabled: ``None`` draws when ``stream.isatty()``; ``True``/``False`` force it.
        stream: where to draw (default ``sys.stderr``).
    """

    def __init__(
        self,
        total: int | None,
        prefix: str = "",
        enabled: bool | None = None,
        stream: TextIO | None = None,
        width: int = 24,
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty()) if callable(isatty) else False
        self.enabled = enabled
        self.total, self.prefix, self.width = total, prefix, width
        self.count = 0
        self._last = 0.0

    def update(self, n: int = 1, note: str = "") -> None:
        self.count += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and self.count != self.total:
            return
        self._last = now
        self._draw(note)

    def _draw(self, note: str) -> None:
        if self.total:
            filled = min(self.width, self.width * self.count // self.total)
            bar = f"[{'#' * filled}{'-' * (self.width - filled)}] {self.count}/{self.total}"
        else:
            bar = f"{self.count}"
        self.stream.write(f"\r{self.prefix} {bar} {note}".rstrip() + "\x1b[K")
        self.stream.flush()

    def close(self, message: str = "") -> None:
        """Replace the bar by ``message`` (or just end the line)."""
        if not self.enabled:
            return
        self.stream.write(f"\r{message}\x1b[K\n" if message else "\n")
        self.stream.flush()

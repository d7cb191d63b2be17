"""Warnings that point at the user's line, however deep in polyak they are raised (pure core).

A fixed ``stacklevel`` is right for one call path only: ``reconstruct`` reaches the same warning
through more frames than ``reconstruct_many`` does, so a fixed level names a line inside polyak
for one of them. :func:`warn` counts the frames instead: the warning is attributed to the first
frame outside the polyak package (what ``warnings.warn(skip_file_prefixes=...)`` does from
Python 3.12 on), so the filters and the message name the caller's file and line.

Example:
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     warn("careful")
    >>> w[0].filename.startswith("<doctest")  # this example's line, not polyak's
    True
"""

from __future__ import annotations

import os
import sys
import warnings

__all__ = ["warn"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _outside(filename: str) -> bool:
    return not os.path.abspath(filename).startswith(_PACKAGE)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the first caller outside polyak."""
    level = 2  # 1 is this line; 2 the polyak function that called warn()
    frame = sys._getframe(1)
    while frame.f_back is not None and not _outside(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)

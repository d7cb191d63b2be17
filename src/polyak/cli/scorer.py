"""The user's scoring function, named on the command line as ``MODULE:FUNCTION``.

``polyak posthoc --score`` and ``polyak merge --greedy-soup`` take the same scorer: a function
``score(state_dict) -> float`` (higher is better) that loads the weights it is given into the
user's model and evaluates it, e.g. validation accuracy. ``MODULE`` is a module importable from
the current directory (``myproject.evaluate``) or a path to a ``.py`` file
(``scripts/score.py``). A scorer that cannot be imported is a user's mistake found before any
work (a ``ValueError``: one line, exit status 2); a scorer that fails or returns anything but a
finite number while the command runs raises :class:`polyak.merge.ScoreError` (also one line and
exit 2; ``--debug`` shows the scorer's traceback).

Example:
    >>> score = load_scorer("math:fsum", "--score")
    >>> score([0.25, 0.5])
    0.75
    >>> load_scorer("math", "--score")
    Traceback (most recent call last):
    ...
    ValueError: --score math: give MODULE:FUNCTION (e.g. mymodule:score or path/to/file.py:score)
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["load_scorer"]


def _module(name: str, flag: str, spec_text: str) -> Any:
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"{flag} {spec_text}: {path} is not a file")
        spec = importlib.util.spec_from_file_location(f"_polyak_scorer_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ValueError(f"{flag} {spec_text}: cannot load {path} as a Python module")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise ValueError(
                f"{flag} {spec_text}: importing {path} raised {type(e).__name__}: {e}"
            ) from e
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: the user's own modules
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ValueError(f"{flag} {spec_text}: cannot import {name} ({e})") from e
    except Exception as e:
        raise ValueError(
            f"{flag} {spec_text}: importing {name} raised {type(e).__name__}: {e}"
        ) from e


def load_scorer(spec_text: str, flag: str) -> Callable[[Any], Any]:
    """The function ``spec_text`` (``MODULE:FUNCTION``) names; a ``ValueError`` naming ``flag``
    and what is wrong otherwise."""
    name, sep, function = spec_text.rpartition(":")
    if not sep or not name or not function:
        raise ValueError(
            f"{flag} {spec_text}: give MODULE:FUNCTION (e.g. mymodule:score or "
            "path/to/file.py:score)"
        )
    module = _module(name, flag, spec_text)
    score = getattr(module, function, None)
    if score is None:
        raise ValueError(f"{flag} {spec_text}: {name} has no attribute {function!r}")
    if not callable(score):
        raise ValueError(f"{flag} {spec_text}: {name}.{function} is not callable")
    return score

"""The one message for two sets of names that should be equal (pure core: imports nothing)."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["check_names"]


def check_names(expected: Iterable[str], given: Iterable[str], what: str) -> None:
    """Raise a ``ValueError`` that names what ``given`` lacks and what it has in excess.

    The order of the names does not matter; the message lists them in their own order.

    Examples:
        >>> check_names(["a", "b"], ["b", "c"], "the state")
        Traceback (most recent call last):
        ...
        ValueError: the state: missing ['a'], unexpected ['c']
    """
    exp, got = list(expected), list(given)
    exp_set, got_set = set(exp), set(got)
    missing = [n for n in exp if n not in got_set]
    extra = [n for n in got if n not in exp_set]
    if missing or extra:
        raise ValueError(f"{what}: missing {missing}, unexpected {extra}")

"""Checks of the options users pass: each returns the value in its plain Python type or raises a
``ValueError`` that names the option, what it must be, and the value given.

Integers are Python's or numpy's, never ``bool`` (``True`` is an ``int`` to Python, but
``workers=True`` is a mistake); flags are Python's or numpy's booleans.
"""

from __future__ import annotations

import numpy as np


def is_whole(value: object) -> bool:
    """Whether ``value`` is an integer, Python's or numpy's, and not a ``bool``."""
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def whole(name: str, value: object, minimum: int) -> int:
    """``value`` as an ``int``, if it is an integer ``>= minimum``."""
    if not is_whole(value) or value < minimum:  # type: ignore[operator]
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def whole_or_none(name: str, value: object, minimum: int) -> int | None:
    """None, or ``value`` as an ``int`` if it is an integer ``>= minimum``."""
    if value is None:
        return None
    if not is_whole(value) or value < minimum:  # type: ignore[operator]
        raise ValueError(f"{name} must be None or an integer >= {minimum}, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def flag(name: str, value: object) -> bool:
    """``value`` as a ``bool``, if it is ``True`` or ``False`` (numpy's too)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)

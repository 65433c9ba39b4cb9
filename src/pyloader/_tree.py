"""The one walker of nested batches: which values are containers, and mapping over their leaves.

A batch (or a sample) is a tree whose containers are an exact ``tuple``, an exact ``list``, an
exact ``dict`` or a namedtuple (a ``tuple`` subclass with ``_fields``), the structures the native
stack and layout code keep (``csrc/python/layout.cpp`` detects the same four); every other value,
a subclass of ``list`` or ``dict`` included, is a leaf. Every Python module that walks a batch asks
:func:`kind` instead of re-detecting these, and :func:`map_structure` rebuilds the same kinds.

Two call sites want slightly other rules, as options of :func:`map_structure`:
``tuples_to_lists`` (torch's ``default_convert`` turns a tuple into a list) and ``subclasses``
(Keras's conversion takes any ``tuple``, ``list`` or ``dict`` instance for a container, and
rebuilds it as the plain built-in type).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Kind", "kind", "leaves", "map_structure", "rebuild"]


class Kind(enum.Enum):
    """The kinds of container a tree has."""

    TUPLE = "tuple"
    LIST = "list"
    DICT = "dict"
    NAMEDTUPLE = "namedtuple"


TUPLE, LIST, DICT, NAMEDTUPLE = Kind.TUPLE, Kind.LIST, Kind.DICT, Kind.NAMEDTUPLE


def kind(obj: Any) -> Kind | None:
    """The container kind of ``obj``, or None for a leaf.

    Args:
        obj: any value.

    Returns:
        :data:`TUPLE`, :data:`LIST`, :data:`DICT` for exactly those types, :data:`NAMEDTUPLE` for
        a namedtuple, None for anything else (subclasses of ``list`` and ``dict`` included).
    """
    tp = type(obj)
    if tp is tuple:
        return TUPLE
    if tp is list:
        return LIST
    if tp is dict:
        return DICT
    if isinstance(obj, tuple) and hasattr(tp, "_fields"):
        return NAMEDTUPLE
    return None


def rebuild(like: Any, children: list[Any]) -> Any:
    """A container of the kind of ``like`` holding ``children`` (a dict's in its key order).

    Args:
        like: a container (see :func:`kind`).
        children: its new children, one per child of ``like``, in order.

    Raises:
        TypeError: ``like`` is a leaf.
    """
    k = kind(like)
    if k is TUPLE:
        return tuple(children)
    if k is LIST:
        return children
    if k is DICT:
        return dict(zip(like, children))
    if k is NAMEDTUPLE:
        return type(like)(*children)
    raise TypeError(f"rebuild: {type(like).__name__} is not a container (tuple, list, dict, namedtuple)")


def leaves(obj: Any) -> Iterator[Any]:
    """The leaves of ``obj``, depth first, in order (a dict's values in its key order)."""
    k = kind(obj)
    if k is None:
        yield obj
        return
    for child in obj.values() if k is DICT else obj:
        yield from leaves(child)


def map_structure(
    fn: Callable[[Any], Any], obj: Any, *, tuples_to_lists: bool = False, subclasses: bool = False
) -> Any:
    """``obj`` with every leaf replaced by ``fn(leaf)``, the containers rebuilt.

    Args:
        fn: called on each leaf.
        obj: a tree (a leaf alone is a tree too).
        tuples_to_lists: rebuild an exact tuple as a list (torch's ``default_convert`` rule);
            namedtuples stay namedtuples.
        subclasses: take any ``tuple``, ``list`` or ``dict`` instance for a container and
            rebuild it as the plain built-in type (a namedtuple becomes a tuple).

    Returns:
        the mapped tree; containers are new objects, ``obj`` is not changed.
    """
    if subclasses:
        if isinstance(obj, tuple):
            return tuple([map_structure(fn, x, subclasses=True) for x in obj])
        if isinstance(obj, list):
            return [map_structure(fn, x, subclasses=True) for x in obj]
        if isinstance(obj, dict):
            return {k: map_structure(fn, v, subclasses=True) for k, v in obj.items()}
        return fn(obj)
    k = kind(obj)
    if k is None:
        return fn(obj)
    if k is DICT:
        return {key: map_structure(fn, v, tuples_to_lists=tuples_to_lists) for key, v in obj.items()}
    children = [map_structure(fn, x, tuples_to_lists=tuples_to_lists) for x in obj]
    if k is LIST or (k is TUPLE and tuples_to_lists):
        return children
    return tuple(children) if k is TUPLE else type(obj)(*children)

"""Tensors across the engine: marked numpy views on the way in, torch's batches on the way out.

The engine copies numpy arrays, not tensors. So a worker :func:`_pack`\\ s the tensors of what it
returns into zero-copy ``.numpy()`` views whose dtype carries a mark (numpy dtype metadata under
:data:`_KEY`, valued with the tensor's dtype name when numpy lacks it, e.g. ``bfloat16``, whose
bits then travel as an integer of the same size). The engine keeps dtype metadata, so on the
consumer's side a marked array is a tensor again (:func:`_restore`, a view of the slot memory).

The consumer turns a delivered batch into torch's result three ways: :func:`_collated`
(``default_collate`` of what the native stack built), :func:`_converted` (``default_convert``,
for ``batch_size=None``) and :func:`_as_tensors` (every array a tensor, the structure unchanged,
for :func:`pyloader.torch.prefetch`); :func:`_unpack` just undoes :func:`_pack`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data._utils.collate import (
    default_collate,
    default_collate_err_msg_format,
    default_convert,
    np_str_obj_array_pattern,
)

from .. import _tree

_KEY = "pyloader.torch"  # numpy dtype metadata: the array is a torch tensor's view (value: dtype name)
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_marked: dict[tuple[np.dtype, str], np.dtype] = {}


def _marked_dtype(dtype: np.dtype, name: str) -> np.dtype:
    key = (dtype, name)
    marked = _marked.get(key)
    if marked is None:
        marked = _marked[key] = np.dtype(dtype, metadata={_KEY: name})
    return marked


def _tensor_view(t: torch.Tensor) -> Any:
    """A numpy view of a CPU tensor, its dtype marked as a tensor's; ``t`` itself if none exists."""
    if t.device.type != "cpu" or t.layout != torch.strided or t.requires_grad:
        return t
    try:
        a = t.numpy()
        name = ""
    except TypeError:  # a dtype numpy lacks (bfloat16, float8...): carry the bits
        itype = _INT_OF_SIZE.get(t.element_size())
        if itype is None:
            return t
        try:
            a = t.view(itype).numpy()
        except (TypeError, RuntimeError):
            return t
        name = str(t.dtype).rpartition(".")[2]
    except RuntimeError:  # conjugate or negative bit set
        return t
    return a.view(_marked_dtype(a.dtype, name))


def _restore(a: np.ndarray) -> torch.Tensor:
    """The tensor of a marked array (a zero-copy view of the same memory)."""
    t = torch.from_numpy(a)
    metadata = a.dtype.metadata
    assert metadata is not None, "only marked arrays are restored"
    name = metadata[_KEY]
    return t.view(getattr(torch, name)) if name else t


def _is_marked(a: np.ndarray) -> bool:
    md = a.dtype.metadata
    return md is not None and _KEY in md


# ---- the worker's side: tensors in -------------------------------------------------------------


def _holds_tensor(obj: Any) -> bool:
    """Whether a tensor sits anywhere the engine looks (the containers of :mod:`pyloader._tree`)."""
    return any(type(x) is torch.Tensor for x in _tree.leaves(obj))


def _packed_leaf(x: Any) -> Any:
    return _tensor_view(x) if type(x) is torch.Tensor else x


def _pack(obj: Any) -> Any:
    """Replaces tensors with marked numpy views, where the engine looks (it copies those)."""
    return _tree.map_structure(_packed_leaf, obj)


# ---- the consumer's side: torch's batches out --------------------------------------------------


def _unpacked_leaf(x: Any) -> Any:
    return _restore(x) if type(x) is np.ndarray and _is_marked(x) else x


def _unpack(obj: Any) -> Any:
    """Inverse of :func:`_pack` on a delivered batch: marked arrays become tensors again."""
    return _tree.map_structure(_unpacked_leaf, obj)


def _collated_array(a: np.ndarray) -> torch.Tensor:
    if _is_marked(a):
        return _restore(a)
    if np_str_obj_array_pattern.search(a.dtype.str) is not None:
        raise TypeError(default_collate_err_msg_format.format(a.dtype))
    return torch.from_numpy(a)


def _is_field(x: Any) -> bool:
    """Whether ``x`` can be a field the native stack built (else it is a sample's raw value)."""
    return type(x) is np.ndarray or _tree.kind(x) is not None


def _collated(obj: Any, in_sequence: bool = False) -> Any:
    """Torch's ``default_collate`` result from what the native stack delivered.

    The stack keeps the samples' structure (exact tuple, list, dict, namedtuple), stacks arrays,
    and turns a leaf it cannot stack into the list of the samples' values: torch's own
    ``default_collate`` collates that, so the result is torch's whatever the leaf holds. Torch
    transposes sequences with ``zip``, so a leaf under a tuple, list or namedtuple reaches its
    collate function as a tuple of values (and strings stay that tuple), under a dict as a list.
    """
    if type(obj) is np.ndarray:
        return _collated_array(obj)
    kind = _tree.kind(obj)
    if kind is None:
        return obj
    if kind is _tree.DICT:
        return {k: _collated(v) for k, v in obj.items()}
    if kind is _tree.LIST and not all(_is_field(x) for x in obj):
        return default_collate(tuple(obj) if in_sequence else obj)  # the samples' values of a leaf
    fields = [_collated(x, True) for x in obj]
    # torch: a tuple (or list) of fields collates into a list, a namedtuple into its type
    return type(obj)(*fields) if kind is _tree.NAMEDTUPLE else fields


def _converted_leaf(obj: Any) -> Any:
    tp = type(obj)
    if tp is np.ndarray:
        if _is_marked(obj):
            return _restore(obj)
        if np_str_obj_array_pattern.search(obj.dtype.str) is not None:
            return obj
        return torch.from_numpy(obj)
    if tp is int or tp is float or tp is str or tp is bytes or tp is bool or obj is None:
        return obj
    return default_convert(obj)


def _converted(obj: Any) -> Any:
    """Torch's ``default_convert`` of a delivered batch (fast paths for the exact types)."""
    return _tree.map_structure(_converted_leaf, obj, tuples_to_lists=True)


def _tensor_leaf(obj: Any) -> Any:
    if type(obj) is not np.ndarray:
        return obj
    if _is_marked(obj):
        return _restore(obj)
    if obj.dtype.hasobject or np_str_obj_array_pattern.search(obj.dtype.str) is not None:
        return obj
    return torch.from_numpy(obj)


def _as_tensors(obj: Any) -> Any:
    """Every array of a delivered batch as a tensor view, the structure unchanged (for prefetch)."""
    return _tree.map_structure(_tensor_leaf, obj)

"""Collated batches as trees: tensors in mappings, lists, tuples and dataclasses, counted, sliced, moved and compared.

A query splits a test batch into its samples, and replay moves rebuilt training batches to the module's device
and compares dataset items, without knowing the batch's type. A mapping is any ``collections.abc.Mapping``
(``dict``, ``UserDict``, a tokenizer's ``BatchEncoding``), rebuilt as its own type where its constructor takes a
dict. A list or tuple inside a mapping, dataclass or list is either the batch's fields (``default_collate`` of a
list-valued field: each item batched) or one item per sample (a ``collate_fn`` that keeps ragged sequences as a
list); :func:`count_samples` and :func:`batch_rows` tell them apart by the items' first dimensions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any

import numpy as np
import torch

from .errors import ConfigError


def is_dataclass_value(value: Any) -> bool:
    """Whether ``value`` is a dataclass instance (a batch type Lightning moves to the device field by field)."""
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def with_fields(value: Any, transform: Callable[[Any], Any]) -> Any:
    """A copy of the dataclass instance ``value`` with ``transform`` applied to each field that ``__init__`` takes
    (the others, e.g. computed in ``__post_init__``, are computed again)."""
    changes = {f.name: transform(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    return dataclasses.replace(value, **changes)


def rebuilt(sequence: list[Any] | tuple[Any, ...], items: Iterable[Any]) -> list[Any] | tuple[Any, ...]:
    """A list or tuple of ``sequence``'s type holding ``items``; a namedtuple takes them as positional fields."""
    if hasattr(sequence, "_fields"):
        return type(sequence)(*items)
    return type(sequence)(items)


def with_values(mapping: Mapping[Any, Any], transform: Callable[[Any], Any]) -> Mapping[Any, Any]:
    """``mapping`` with ``transform`` applied to each value, as its own type where its constructor takes a dict
    (``UserDict``, ``BatchEncoding``, ``OrderedDict``), else as a ``dict``."""
    values = {key: transform(value) for key, value in mapping.items()}
    if type(mapping) is dict:
        return values
    try:
        return type(mapping)(values)
    except TypeError:  # e.g. a defaultdict, whose first argument is its default factory
        return values


def map_tensors(batch: Any, transform: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``batch`` with its mappings, lists, tuples and dataclasses rebuilt at every level and ``transform`` applied to
    each tensor (other values kept)."""
    if isinstance(batch, torch.Tensor):
        return transform(batch)
    if isinstance(batch, Mapping):
        return with_values(batch, lambda value: map_tensors(value, transform))
    if isinstance(batch, (list, tuple)):
        return rebuilt(batch, (map_tensors(value, transform) for value in batch))
    return with_fields(batch, lambda value: map_tensors(value, transform)) if is_dataclass_value(batch) else batch


def shallow_copy(batch: Any) -> Any:
    """``batch`` with its containers copied at every level and its tensors shared, for a ``training_step`` that
    edits its batch (``ids = batch.pop("index")``, ``batch["inputs"]["x"] = ...``)."""
    return map_tensors(batch, lambda tensor: tensor)


def as_started(batch: Any, start: Any) -> Any:
    """``batch`` after a ``training_step`` that may have edited it, for reading its ids: a mapping with the keys the
    step popped put back (in place) from ``start`` (its :func:`shallow_copy` as it started), ``start`` for a list
    the step made shorter or longer; else ``batch``, so ids the step filtered in place with the samples are read
    as such."""
    if isinstance(batch, list) and isinstance(start, list) and len(batch) != len(start):
        return start
    if isinstance(batch, MutableMapping) and isinstance(start, Mapping):
        batch.update({key: value for key, value in start.items() if key not in batch})
    return batch


def same_items(a: Any, b: Any, _seen: set[tuple[int, int]] | None = None) -> bool:
    """Whether two dataset items (nested tensors, arrays, containers, numbers, plain objects) are identical. NaN
    equals NaN (a missing value read twice), and an object without an ``__eq__`` of its own compares by its
    attributes (``==`` is identity there, false for two reads of the same item; one object read twice, a cached
    item, is the same without looking inside); a bound method by its function and object. A pair met again inside
    itself (an object referring to itself) counts as the same there."""
    if a is b:
        return True
    seen = set() if _seen is None else _seen
    if (id(a), id(b)) in seen:
        return True
    seen.add((id(a), id(b)))
    return _same(a, b, functools.partial(same_items, _seen=seen))


def _same(a: Any, b: Any, same_items: Callable[[Any, Any], bool]) -> bool:
    """:func:`same_items` of ``a is not b``, with ``same_items`` for their parts."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b) or (
            (a.is_floating_point() or a.is_complex()) and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same_items(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_items(x, y) for x, y in zip(a, b))
    if is_dataclass_value(a) and type(a) is type(b):
        return all(same_items(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, (np.ndarray, np.void)) and isinstance(b, (np.ndarray, np.void)):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.dtype.names:  # a structured array or record: field by field
            return all(same_items(a[name], b[name]) for name in a.dtype.names)
        if a.dtype.kind == "O":  # e.g. a pandas row: element by element
            return all(same_items(x, y) for x, y in zip(a.ravel().tolist(), b.ravel().tolist()))
        return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fcmM"))  # NaN, NaT
    if isinstance(a, types.MethodType) and isinstance(b, types.MethodType):  # e.g. a transform bound to the item
        return a.__func__ is b.__func__ and same_items(a.__self__, b.__self__)
    if isinstance(a, _NUMBERS) and isinstance(b, _NUMBERS):
        return _same_number(a, b)
    if isinstance(a, _TIMES) and isinstance(b, _TIMES):
        return type(a) is type(b) and bool(np.isnat(a) and np.isnat(b) or a == b)
    if type(a) is type(b) and type(a).__eq__ is object.__eq__ and (hasattr(a, "__dict__") or hasattr(a, "__slots__")):
        return same_items(_state(a), _state(b))
    try:
        return bool(a == b)
    except (RuntimeError, ValueError):  # e.g. other array types
        return bool((a == b).all())


_NUMBERS = (float, complex, np.floating, np.complexfloating)
_TIMES = (np.datetime64, np.timedelta64)


def _same_number(a: Any, b: Any) -> bool:
    """Real and imaginary parts equal, NaN equal to NaN."""
    x, y = complex(a), complex(b)
    return all(p == q or (math.isnan(p) and math.isnan(q)) for p, q in ((x.real, y.real), (x.imag, y.imag)))


def _state(x: Any) -> dict[str, Any]:
    """An object's attributes: its ``__dict__`` and ``__slots__`` (a single name, private names mangled)."""
    names = []
    for cls in type(x).__mro__:
        slots = getattr(cls, "__slots__", ())
        for slot in {slots} if isinstance(slots, str) else set(slots) - {"__weakref__", "__dict__"}:
            private = slot.startswith("__") and not slot.endswith("__")
            names.append(f"_{cls.__name__.lstrip('_')}{slot}" if private else slot)
    return {**getattr(x, "__dict__", {}), **{n: getattr(x, n) for n in names if hasattr(x, n)}}


def to_device(batch: Any, device: torch.device | None, float_dtype: torch.dtype | None = None) -> Any:
    """``batch`` with every tensor (in mappings, lists, tuples, dataclasses) moved to ``device`` and its floating
    tensors converted to ``float_dtype`` (``None``: unchanged)."""
    def move(tensor: torch.Tensor) -> torch.Tensor:
        dtype = float_dtype if float_dtype is not None and tensor.is_floating_point() else tensor.dtype
        return tensor.to(device or tensor.device, dtype)

    return map_tensors(batch, move)


def split_batch(batch: Any) -> list[Any]:
    """A collated batch as one-sample batches (tensors sliced ``[i:i+1]`` along dim 0, lists indexed)."""
    n = count_samples(batch)
    return [batch_rows(batch, slice(i, i + 1), n) for i in range(n)]


def _batched_fields(items: list[Any] | tuple[Any, ...]) -> int | None:
    """The common first dimension of a nested list's items if they are all batched tensors (a list-valued field
    collated by ``default_collate``), else ``None`` (one item per sample, or not tensors)."""
    sizes = {x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else None for x in items}
    return next(iter(sizes)) if len(sizes) == 1 else None


def batch_rows(batch: Any, rows: slice, n: int | None = None) -> Any:
    """The samples ``rows`` of a collated batch of ``n`` samples (found if ``None``): every tensor with ``n`` rows
    and every list of ``n`` per-sample items sliced (in mappings, lists, tuples and dataclasses), other values
    kept. A list of ``n`` tensors of ``n`` rows each is batched fields, unless the batch's size was found as a
    list's length (a batch of per-sample lists: :func:`count_samples`)."""
    n = count_samples(batch) if n is None else n
    listwise = (_sample_count(batch) or (0, False))[1] or n in _record_list_lengths(batch)

    def pick(x: Any, top: bool = False) -> Any:
        if isinstance(x, torch.Tensor):
            return x[rows] if x.dim() and x.shape[0] == n else x
        if isinstance(x, Mapping):
            return with_values(x, pick)
        if is_dataclass_value(x):
            return with_fields(x, pick)
        if not isinstance(x, (list, tuple)):
            return x
        nested = any(isinstance(v, (torch.Tensor, Mapping, list, tuple)) or is_dataclass_value(v) for v in x)
        per_sample = listwise or _batched_fields(x) != n
        if len(x) == n and not hasattr(x, "_fields") and not (top and nested) and per_sample and (
                nested or isinstance(x, list)):  # a tuple of numbers is metadata (an image size)
            return x[rows]
        return rebuilt(x, (pick(v) for v in x)) if nested else x

    return pick(batch, top=True)


def _children(x: Any) -> Iterable[Any]:
    """The values a batch's mapping, list, tuple or dataclass ``x`` holds (none for other values)."""
    if is_dataclass_value(x):
        return [getattr(x, f.name) for f in dataclasses.fields(x)]
    return x.values() if isinstance(x, Mapping) else x if isinstance(x, (list, tuple)) else ()


def _is_records(x: Any) -> bool:
    """Whether ``x`` is a non-empty list or tuple of records (mappings, lists, tuples, dataclasses): one per sample,
    as a ``collate_fn`` keeps a detection batch's target dicts."""
    return (isinstance(x, (list, tuple)) and not hasattr(x, "_fields") and len(x) > 0
            and all(isinstance(v, (Mapping, list, tuple)) or is_dataclass_value(v) for v in x))


def _record_list_lengths(x: Any, top: bool = True) -> set[int]:
    """The lengths of the lists of records (:func:`_is_records`) nested in a batch."""
    if not top and _is_records(x):
        return {len(x)}
    return set().union(*(_record_list_lengths(v, False) for v in _children(x)))


def _sample_count(batch: Any) -> tuple[int, bool] | None:
    """``(n, whether n is a nested list's length)`` of :func:`count_samples`; ``None`` if nothing gives it."""
    def size(x: Any, top: bool, nested: int) -> tuple[int, bool] | None:
        if isinstance(x, torch.Tensor):
            return (x.shape[0], False) if x.dim() else None
        if isinstance(x, (list, tuple)) and not top and not hasattr(x, "_fields"):  # a namedtuple holds fields
            if nested == 1 and _is_records(x):
                return len(x), True  # per-sample records; a list of numbers may be metadata
            if nested < 2 or not x or not all(isinstance(v, torch.Tensor) for v in x):
                return None
            fields = _batched_fields(x)
            return (fields, False) if fields is not None else (len(x), True)
        return next((s for s in (size(v, False, nested) for v in _children(x)) if s is not None), None)

    return next((s for s in (size(batch, True, nested) for nested in range(3)) if s is not None), None)


def count_samples(batch: Any) -> int:
    """The number of samples of a collated batch: the first dimension of its first batched tensor outside nested
    lists, else the length of its first nested list of records (mappings, lists, tuples, dataclasses: a detection
    batch's target dicts), else of its first nested list of tensors: their common first dimension (a list-valued
    field that ``default_collate`` batched), or its length if they have none (ragged per-sample tensors).

    Raises:
        ConfigError: if no tensor has a batch dimension.
    """
    found = _sample_count(batch)
    if found is None and isinstance(batch, torch.utils.data.DataLoader):
        raise ConfigError("the test batch is a DataLoader; a query takes one collated batch: pass "
                          "next(iter(loader)), or query each batch of the loader and concatenate the results' scores.")
    if found is None:
        raise ConfigError(f"cannot split the test batch ({type(batch).__name__}) into samples: no tensor with a "
                          "batch dimension. Pass loss_fn(module, batch) -> Tensor[n] of per-sample test losses.")
    return found[0]

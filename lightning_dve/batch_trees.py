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
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any

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


def shallow_copy(batch: Any) -> Any:
    """A new top-level mapping of ``batch``'s values (the values shared), for :func:`restore_keys`; other batches
    as they are."""
    return with_values(batch, lambda value: value) if isinstance(batch, Mapping) else batch


def restore_keys(batch: Any, before: Any) -> None:
    """Put back, in place, the keys of ``before`` (:func:`shallow_copy` of ``batch`` earlier) that ``batch`` no
    longer has: a ``training_step`` may pop one (``ids = batch.pop("index")`` before ``self.model(**batch)``),
    while keys it adds or changes (per-sample loss weights written into the batch) stay."""
    if isinstance(batch, MutableMapping) and isinstance(before, Mapping):
        batch.update({key: value for key, value in before.items() if key not in batch})


def same_items(a: Any, b: Any) -> bool:
    """Whether two dataset items (nested tensors, containers, numbers) are identical."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same_items(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_items(x, y) for x, y in zip(a, b))
    if is_dataclass_value(a) and type(a) is type(b):
        return all(same_items(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    try:
        return bool(a == b)
    except (RuntimeError, ValueError):  # e.g. numpy arrays
        return bool((a == b).all())


def to_device(batch: Any, device: torch.device | None, float_dtype: torch.dtype | None = None) -> Any:
    """``batch`` with every tensor (in mappings, lists, tuples, dataclasses) moved to ``device`` and its floating
    tensors converted to ``float_dtype`` (``None``: unchanged)."""
    if isinstance(batch, torch.Tensor):
        dtype = float_dtype if float_dtype is not None and batch.is_floating_point() else batch.dtype
        return batch.to(device or batch.device, dtype)
    if isinstance(batch, Mapping):
        return with_values(batch, lambda v: to_device(v, device, float_dtype))
    if isinstance(batch, (list, tuple)):
        return rebuilt(batch, (to_device(v, device, float_dtype) for v in batch))
    if is_dataclass_value(batch):
        return with_fields(batch, lambda v: to_device(v, device, float_dtype))
    return batch


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
    kept."""
    n = count_samples(batch) if n is None else n

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
        if len(x) == n and not hasattr(x, "_fields") and not (top and nested) and _batched_fields(x) != n:
            return x[rows]  # one item per sample
        return rebuilt(x, (pick(v) for v in x)) if nested else x

    return pick(batch, top=True)


def count_samples(batch: Any) -> int:
    """The number of samples of a collated batch: the first dimension of its first batched tensor outside nested
    lists, else the length of its first nested list of per-sample items that are not tensors (a detection batch's
    target dicts), else of its first nested list of tensors: their common first dimension (a list-valued field
    that ``default_collate`` batched), or its length if they have none (ragged per-sample tensors). A list of
    ``n`` tensors of ``n`` rows each is taken for batched fields.

    Raises:
        ConfigError: if no tensor has a batch dimension.
    """
    def size(x: Any, top: bool, nested: int) -> int | None:
        if isinstance(x, torch.Tensor):
            return x.shape[0] if x.dim() else None
        if isinstance(x, (list, tuple)) and not top:
            tensors = x and all(isinstance(v, torch.Tensor) for v in x)
            if nested == 1 and x and not tensors and not all(isinstance(v, (str, bytes)) for v in x):
                return len(x)  # per-sample items a collate_fn keeps (target dicts); strings are no evidence
            fields = _batched_fields(x) if nested == 2 and tensors else None
            return fields if fields is not None or nested < 2 or not tensors else len(x)
        values = x.values() if isinstance(x, Mapping) else x if isinstance(x, (list, tuple)) else ()
        if is_dataclass_value(x):
            values = [getattr(x, f.name) for f in dataclasses.fields(x)]
        return next((s for s in (size(v, False, nested) for v in values) if s is not None), None)

    n = next((s for s in (size(batch, True, nested) for nested in range(3)) if s is not None), None)
    if n is None and isinstance(batch, torch.utils.data.DataLoader):
        raise ConfigError("the test batch is a DataLoader; a query takes one collated batch: pass "
                          "next(iter(loader)), or query each batch of the loader and concatenate the results' scores.")
    if n is None:
        raise ConfigError(f"cannot split the test batch ({type(batch).__name__}) into samples: no tensor with a "
                          "batch dimension. Pass loss_fn(module, batch) -> Tensor[n] of per-sample test losses.")
    return n

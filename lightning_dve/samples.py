"""Find training samples by id in the training data and render them for top-k tables.

A sample is read from the training dataset at its position (the id -> position map of
:class:`~lightning_dve.replay_data.BatchSource`, the one exact replay uses), so neither the loader's shuffle nor
a DDP shard decides which samples are found. A dataset that cannot be indexed is scanned in one pass of the loader.

A sample is one row of a collated batch: every tensor (or list of strings) whose first dimension is the batch
size is indexed, everything else is kept as it is. Its label and input are read from common keys of a dict
batch (or positions 1 and 0 of a tuple batch); the text is the user's ``describe(sample)`` when given.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler
from tqdm.auto import tqdm

from .batch_trees import rebuilt
from .errors import ConfigError, DVEError
from .figures import image_array
from .replay_data import BatchSource, TrainingData, training_data_of

LABEL_KEYS = ("label", "labels", "y", "target", "targets")
INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values", "input_ids", "text")
_TEXT_LIMIT = 120


@dataclasses.dataclass(frozen=True)
class SampleView:
    """How a sample is shown in a top-k table.

    Attributes:
        label: the sample's label as text, if one was found.
        text: ``describe(sample)``, the text input, or a short summary of the input tensor.
        image: ``[H, W]`` or ``[H, W, C]`` uint8 if the input looks like an image, else ``None``.
    """

    label: str | None
    text: str
    image: np.ndarray | None


def batch_ids(batch: Any, sample_ids: str | Callable[[Any], Any]) -> torch.Tensor | None:
    """The ``[B]`` sample ids of a batch, or ``None`` if they cannot be read."""
    try:
        ids = sample_ids(batch) if callable(sample_ids) else batch[sample_ids]
        return torch.as_tensor(ids).reshape(-1).to("cpu", torch.int64)
    except (KeyError, TypeError, IndexError, ValueError, RuntimeError):
        return None


def row(batch: Any, index: int, size: int) -> Any:
    """Row ``index`` of a collated batch of ``size`` samples."""
    if isinstance(batch, (torch.Tensor, np.ndarray)) and batch.ndim > 0 and batch.shape[0] == size:
        return batch[index]
    if isinstance(batch, Mapping):
        return {key: row(value, index, size) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        if len(batch) == size and all(isinstance(item, str) for item in batch):
            return batch[index]
        return rebuilt(batch, (row(value, index, size) for value in batch))
    return batch


def training_samples(
    loader: Any,
    wanted: set[int],
    sample_ids: str | Callable[[Any], Any],
    describe: Callable[[Any], str] | None,
    max_batches: int,
    show_progress: bool,
) -> dict[int, SampleView]:
    """The ``wanted`` sample ids of the training data, looked up in its dataset, else scanned in its loader; in
    each loader's in turn where several were combined (a list or dict of them, a ``CombinedLoader``'s).

    A map-style dataset is read at each sample's position (whatever the loader's shuffle or sampler, and every
    rank's samples under DDP). Otherwise :func:`find_samples` scans one pass: of the whole dataset in order if the
    loader shuffles it, else of at most ``max_batches`` batches of the loader. Samples not found are left out.
    """
    found: dict[int, SampleView] = {}
    for single in _loaders(loader):
        missing = wanted - found.keys()
        if not missing:
            break
        got = by_position(training_data_of(single, sample_ids), missing, describe)
        if got is None:
            whole, limit = sequential(single)
            got = find_samples(whole, missing, sample_ids, describe, max_batches if limit is None else limit,
                               show_progress)
        found.update(got)
    return found


def by_position(
    data: TrainingData | None, wanted: set[int], describe: Callable[[Any], str] | None
) -> dict[int, SampleView] | None:
    """The ``wanted`` samples read from a map-style dataset at their positions, or ``None`` if it cannot be indexed.

    Positions come from :meth:`BatchSource.positions` (the ids themselves if the dataset says so, else one scan
    of the dataset); each read item must carry its id. Ids that are not in the dataset are left out.
    """
    dataset = None if data is None else data.dataset
    if dataset is None or isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
        return None
    source, ids = BatchSource(data), sorted(wanted)
    try:
        try:
            positions = dict(zip(ids, source.positions(torch.tensor(ids))))
        except ConfigError:  # some ids are not in the dataset: the rest one by one (the map is built once)
            positions = {i: p for i in ids for p in _position(source, i)}
        found = {}
        for sample_id, position in positions.items():
            batch = source.collate([dataset[position]])
            if _carries(batch, data.sample_ids, sample_id):
                found[sample_id] = view(row(batch, 0, 1), describe)
        return found
    except (DVEError, IndexError, KeyError, TypeError, ValueError, RuntimeError):
        return None  # not indexable by position: scan the loader instead


def _carries(batch: Any, sample_ids: str | Callable[[Any], Any] | None, sample_id: int) -> bool:
    """Whether a one-sample batch is sample ``sample_id`` (always, when ids are dataset positions)."""
    if sample_ids is None:
        return True
    ids = batch_ids(batch, sample_ids)
    return ids is not None and ids.tolist() == [sample_id]


def _position(source: BatchSource, sample_id: int) -> list[int]:
    """``[position]`` of one id in ``source``'s dataset, ``[]`` if it is not there."""
    try:
        return source.positions(torch.tensor([sample_id]))
    except ConfigError:
        return []


def sequential(loader: Iterable[Any]) -> tuple[Iterable[Any], int | None]:
    """``(loader, None)``, or for a ``DataLoader`` that shuffles or shards positions ``range(len(dataset))``
    ``(a sequential loader over its whole dataset, its number of batches)`` (same batch size and collate function,
    no workers; ``batch_size=None`` for a dataset of whole batches, which a batch size of 1 would wrap in a list).
    Another sampler's keys may not be positions: its loader is read as it is."""
    if not isinstance(loader, DataLoader) or not isinstance(loader.sampler, (RandomSampler, DistributedSampler)):
        return loader, None
    whole = DataLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn)
    return whole, len(whole)


def find_samples(
    loader: Any,
    wanted: set[int],
    sample_ids: str | Callable[[Any], Any],
    describe: Callable[[Any], str] | None,
    max_batches: int,
    show_progress: bool,
) -> dict[int, SampleView]:
    """Scan the training dataloader (at most ``max_batches`` batches) for the ``wanted`` sample ids.

    Samples that are not found (e.g. on another rank's shard, or a loader that is gone) are left out.
    """
    found: dict[int, SampleView] = {}
    with tqdm(total=len(wanted), desc="DVE top-k samples", disable=not show_progress, leave=False) as bar:
        for batch in itertools.islice(loader, max_batches):
            ids = batch_ids(batch, sample_ids)
            if ids is None:
                return found
            for index, sample_id in enumerate(ids.tolist()):
                if sample_id in wanted and sample_id not in found:
                    found[sample_id] = view(row(batch, index, ids.numel()), describe)
                    bar.update(1)
            if len(found) == len(wanted):
                break
    return found


def _loaders(loaders: Any) -> list[Iterable[Any]]:
    """The training loaders (every one of a list or dict of them), each over its whole dataset."""
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    return [unsharded(one) for one in (loaders if isinstance(loaders, (list, tuple)) else [loaders])
            if one is not None]


def unsharded(loader: Iterable[Any]) -> Iterable[Any]:
    """``loader`` itself, or, if a ``DistributedSampler`` shards it (DDP), a sequential loader over its dataset.

    Rank 0 alone builds the report, so it reads every rank's part of the data (same batch size and collate
    function, no workers).
    """
    if isinstance(loader, DataLoader) and isinstance(loader.sampler, DistributedSampler):
        # Lightning wraps a loader's own sampler (a subset, weights, ...) in a DistributedSamplerWrapper, whose
        # ``dataset`` holds it as ``_sampler``: read what that sampler picks, as one process would, not the dataset
        wrapped = loader.sampler.dataset
        inner = getattr(wrapped, "_sampler", None) if wrapped is not loader.dataset else None
        return DataLoader(loader.dataset, batch_size=loader.batch_size or 1, sampler=inner,
                          collate_fn=loader.collate_fn, drop_last=loader.drop_last)
    return loader


def _pick(sample: Any, keys: tuple[str, ...], position: int) -> Any:
    """The first of ``keys`` in a dict sample, else element ``position`` of a tuple sample."""
    if isinstance(sample, Mapping):
        return next((sample[key] for key in keys if key in sample), None)
    if isinstance(sample, (list, tuple)) and len(sample) > position:
        return sample[position]
    return sample if position == 0 else None


def _label_text(value: Any) -> str | None:
    """A scalar label as text; ``None`` if absent or not a scalar."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (np.generic, np.ndarray)) and np.size(value) == 1:
        value = np.asarray(value).item()
    return None if value is None or isinstance(value, (torch.Tensor, np.ndarray)) else str(value)


def summarise_tensor(value: Any) -> str:
    """A short text for an input: the string itself, integer tokens, or shape and value range."""
    if isinstance(value, str):
        return value if len(value) <= _TEXT_LIMIT else value[: _TEXT_LIMIT - 3] + "..."
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        return repr(value)[:_TEXT_LIMIT]
    shape = "x".join(map(str, value.shape)) or "scalar"
    dtype = str(value.dtype).removeprefix("torch.")
    if not value.dtype.is_floating_point:
        head = " ".join(map(str, value.reshape(-1)[:16].tolist()))
        return f"{dtype}[{shape}]: {head}{' ...' if value.numel() > 16 else ''}"
    flat = value.detach().to(torch.float64).reshape(-1)
    return f"{dtype}[{shape}] mean {flat.mean():.3g}, min {flat.min():.3g}, max {flat.max():.3g}"


def view(sample: Any, describe: Callable[[Any], str] | None) -> SampleView:
    """Label, text and image of one sample; a ``describe`` that fails gives its error as the text (the tables
    show it, and the finished fit's report is kept)."""
    value = _pick(sample, INPUT_KEYS, 0)
    image = image_array(value) if isinstance(value, torch.Tensor) else None
    try:
        text = str(describe(sample)) if describe is not None else summarise_tensor(value)
    except Exception as err:  # noqa: BLE001 -- the user's describe, after the fit
        text = f"describe failed: {type(err).__name__}: {err}"[:_TEXT_LIMIT]
    return SampleView(_label_text(_pick(sample, LABEL_KEYS, 1)), text, image)

"""Embeddings on disk: one memory-mapped array per tracked layer, rows in step order.

The backward recursion (method.md §2) yields one embedding ``e_t(z) [k_l]`` per occurrence and layer. They go to
``layer_NNN.npy [N, k_l]`` (numpy's ``.npy`` format, read with ``mmap_mode="r"``; nothing is pickled), with the
occurrences' sample ids in ``sample_ids.npy [N]`` and the row range of every step in ``index.safetensors``. The
recursion writes a step's rows wherever they fall (``os.pwrite`` at the step's offset, in any order and from
several threads, and from other DDP ranks that see the folder: ``EmbeddingWriter.share``), into a folder that is
renamed into place once every step is written: a folder that exists is complete. Queries read contiguous row
ranges of many steps at once.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from .errors import StoreError
from .files import RUN_KEY, read_checked, write_atomic, write_error, write_text_atomic

INDEX = "index.safetensors"
TOKEN = "ranks.token"  # what a writer shares with the ranks that join it (EmbeddingWriter.share)
IDS = "sample_ids.npy"
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.int64: np.int64}


def _layer_file(position: int) -> str:
    return f"layer_{position:03d}.npy"


def _create_array(path: Path, shape: tuple[int, int] | tuple[int], dtype: torch.dtype
                  ) -> tuple[Path, int, int, tuple[int, ...], torch.dtype]:
    """Create ``path`` as an ``.npy`` file of ``shape`` with its space reserved; return ``(path, fd, data offset,
    row shape, dtype)``.

    Raises:
        StoreError: if the disk cannot hold it (checked now, before any row is computed).
    """
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(_NUMPY[dtype])), "fortran_order": False,
              "shape": shape}
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(os.dup(fd), "wb") as handle:
            np.lib.format.write_array_header_1_0(handle, header)
            offset = handle.tell()
        size = offset + int(np.prod(shape)) * np.dtype(_NUMPY[dtype]).itemsize
        _reserve(fd, size)
        return path, fd, offset, shape[1:], dtype
    except OSError as err:
        os.close(fd)
        raise write_error(path, err) from err


def _array_header(fd: int, shape: tuple[int, int], dtype: torch.dtype) -> tuple[int, tuple[int, ...], torch.dtype]:
    """``(data offset, row shape, dtype)`` of the ``.npy`` file open at ``fd``, which :func:`_create_array` created
    with ``shape`` and ``dtype``.

    Raises:
        StoreError: if it is another array.
    """
    with os.fdopen(os.dup(fd), "rb") as handle:
        np.lib.format.read_magic(handle)
        found, _, descr = np.lib.format.read_array_header_1_0(handle)
        offset = handle.tell()
    if found != shape or descr != np.dtype(_NUMPY[dtype]):
        raise StoreError(f"found {found} {descr}, not {shape} {np.dtype(_NUMPY[dtype])}")
    return offset, shape[1:], dtype


def _reserve(fd: int, size: int) -> None:
    """Give the file ``size`` bytes, reserved on disk where the system can (a full disk fails here, not as a torn
    array later); elsewhere (macOS, file systems without fallocate) a full disk fails at the first write."""
    allocate = getattr(os, "posix_fallocate", None)  # none on macOS
    try:
        if allocate is not None:
            allocate(fd, 0, size)
            return
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
    os.ftruncate(fd, size)


def _pwrite_all(fd: int, data: memoryview, offset: int, path: Path) -> None:
    """Write all of ``data`` at ``offset`` (``pwrite`` may write less than asked)."""
    try:
        while data:
            written = os.pwrite(fd, data, offset)
            if written == 0:
                raise OSError(errno.EIO, f"pwrite wrote nothing to {path}")
            data, offset = data[written:], offset + written
    except OSError as err:
        raise write_error(path, err) from err


def _bytes(tensor: torch.Tensor, dtype: torch.dtype) -> memoryview:
    return memoryview(tensor.detach().to("cpu", dtype).contiguous().numpy().reshape(-1)).cast("B")


def remove_embeddings(folder: Path) -> None:
    """Delete the embeddings in ``folder``, finished or not."""
    for path in (folder, _partial(folder)):
        shutil.rmtree(path, ignore_errors=True)


def _stamp(folder: Path) -> tuple[int, int] | None:
    """The index file's inode and modification time: a folder renamed into place anew has another."""
    try:
        stat = (folder / INDEX).stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _partial(folder: Path) -> Path:
    return folder.with_name(folder.name + ".partial")


class EmbeddingWriter:
    """Writes the embeddings of every step into a new folder, then renames it into place (:meth:`finish`); or,
    joined to another rank's writer through the folder they share (:meth:`share`), its layers' rows into it."""

    def __init__(self, folder: Path, settings_hash: str, layers: dict[str, tuple[int, int]], dtype: torch.dtype,
                 steps: Sequence[int], rows: Sequence[int], token: int | None = None, run_id: str | None = None
                 ) -> None:
        """Create the arrays for ``steps`` with ``rows`` occurrences each, in ``folder`` + ``.partial``.

        Args:
            folder: where the finished arrays go (replaced by :meth:`finish`).
            settings_hash: the store's; the index carries it.
            layers: ``{layer: (position in the manifest, k_l)}`` of the layers this store holds (a DDP rank's
                own before rank 0 merges them; every one on rank 0); a layer's file is named by its position.
            dtype: the embeddings' dtype (the accumulators', float32 or float64).
            steps, rows: every recorded step and its number of occurrences.
            token: join the unfinished folder another writer shared with this token instead (:meth:`share`):
                open its arrays of ``layers`` to write their rows; the sample ids and the rename stay its own.
            run_id: the recording's run id (the store manifest's), which the index carries too.

        Raises:
            StoreError: if the disk cannot hold the arrays; when joining, if the folder does not hold ``token``
                (another machine's disk) or its arrays are not those of ``layers``.
        """
        self.folder, self.dtype, self.joined = folder, dtype, token is not None
        self.layers = list(layers)
        self.partial = _partial(folder)
        offsets = np.concatenate([[0], np.cumsum(np.asarray(rows, dtype=np.int64))]).astype(np.int64)
        self._slot = {step: (int(offsets[i]), int(rows[i])) for i, step in enumerate(steps)}
        self._missing = {(step, name) for step in steps for name in [*layers, *([] if self.joined else [IDS])]}
        self._files: list[tuple[str, Path, int, int, tuple[int, ...], torch.dtype]] = []  # name, path, fd, data
        # offset, row shape, dtype
        if token is not None:
            self._join(layers, dtype, int(offsets[-1]), token)
            return
        shutil.rmtree(self.partial, ignore_errors=True)  # an interrupted earlier attempt
        try:
            self.partial.mkdir(parents=True)
        except OSError as err:
            raise write_error(self.partial, err) from err
        total = int(offsets[-1])
        try:
            for name, (position, width) in layers.items():
                self._files.append((name, *_create_array(self.partial / _layer_file(position), (total, width),
                                                         dtype)))
            self._files.append((IDS, *_create_array(self.partial / IDS, (total,), torch.int64)))
            write_atomic(self.partial / INDEX, {"steps": torch.tensor(list(steps), dtype=torch.int64),
                                                "offsets": torch.from_numpy(offsets)},
                         {"settings_hash": settings_hash, **({RUN_KEY: run_id} if run_id else {})})
        except BaseException:
            self.discard()
            raise

    def _join(self, layers: dict[str, tuple[int, int]], dtype: torch.dtype, total: int, token: int) -> None:
        """Open the shared folder's arrays of ``layers`` (``[total, k_l]`` of ``dtype``) for writing."""
        try:
            if int((self.partial / TOKEN).read_text()) != token:
                raise StoreError(f"{self.partial} holds another writer's token")
            for name, (position, width) in layers.items():
                path = self.partial / _layer_file(position)
                fd = os.open(path, os.O_RDWR)
                self._files.append((name, path, fd, *_array_header(fd, (total, width), dtype)))
        except (OSError, ValueError, StoreError) as err:
            self.close()
            raise StoreError(f"cannot join the embeddings being written in {self.partial} ({err})") from err

    def share(self, token: int) -> None:
        """Leave ``token`` in the unfinished folder, for writers of other processes (DDP ranks) that see the same
        folder to join it."""
        write_text_atomic(self.partial / TOKEN, str(token))

    def write(self, step: int, embeddings: dict[str, torch.Tensor], sample_ids: torch.Tensor | None) -> None:
        """Write one step's rows: ``{layer: [B, k_l]}`` for any of the layers, and its ``sample_ids [B]`` (``None``:
        written before).

        Raises:
            StoreError: if the disk is full, or the rows do not fit the step's slot (a bug, not a user error).
        """
        if step not in self._slot:
            raise StoreError(f"step {step} has no rows in the embeddings being written ({len(self._slot)} steps): "
                             "the store changed during the recursion. Record the run again.")
        start, count = self._slot[step]
        blocks = {**embeddings, IDS: sample_ids}
        for name, path, fd, offset, row, dtype in self._files:
            block = blocks.get(name)
            if block is None:
                continue
            if tuple(block.shape) != (count, *row):
                raise StoreError(f"step {step}'s rows for {path.name} are {tuple(block.shape)}, not {(count, *row)} "
                                 "(the occurrences the store recorded at that step, by the layer's projected width): "
                                 "the recursion and the store disagree. Record the run again.")
            row_bytes = int(np.prod(row)) * dtype.itemsize
            _pwrite_all(fd, _bytes(block, dtype), offset + start * row_bytes, path)
            self._missing.discard((step, name))

    def finish(self, elsewhere: Sequence[str] = ()) -> None:
        """Close the arrays and rename the folder into place (replacing an earlier one); a joined writer only
        closes its arrays.

        Args:
            elsewhere: layers whose rows the writers that joined this one wrote (their success is agreed on by
                the caller).

        Raises:
            StoreError: if a step was never written, or the disk fails.
        """
        missing = sorted((step, name) for step, name in self._missing if name not in elsewhere)
        if missing:
            step, name = missing[0]
            raise StoreError(f"{len(missing)} rows of steps and layers were never written (first: step {step}, "
                             f"{name}); the recursion stopped early. Record the run again.")
        try:  # no fsync, as for every store file: a process that dies keeps what it wrote (not a power cut)
            self.close()
            if not self.joined:
                (self.partial / TOKEN).unlink(missing_ok=True)
                shutil.rmtree(self.folder, ignore_errors=True)
                os.replace(self.partial, self.folder)
        except OSError as err:
            raise write_error(self.folder, err) from err

    def discard(self) -> None:
        """Close the files and delete the unfinished folder (its reserved space is free again); a joined writer
        leaves the folder to its owner."""
        self.close()
        if not self.joined:
            shutil.rmtree(self.partial, ignore_errors=True)

    def close(self) -> None:
        """Close the files (the folder stays ``.partial``: never read as embeddings)."""
        for _, _, fd, *_ in self._files:
            os.close(fd)
        self._files = []


class EmbeddingArrays:
    """Finished embeddings, memory-mapped read-only and checked against the store's manifest."""

    def __init__(self, folder: Path, settings_hash: str, widths: dict[str, int | None], required: Sequence[str],
                 steps: Sequence[int], rows: Sequence[int], run_id: str | None = None) -> None:
        """Open the arrays in ``folder``.

        Args:
            widths: the manifest's ``{layer: k_l}`` (``None``: not checked).
            required: the layers to open (each must be there).
            steps, rows: the store's recorded steps and their occurrences; the index must list the same.
            run_id: the store's recording, which the index must name where it names one (another recording's
                embeddings of the same settings and steps, copied in, were read as this one's).

        Raises:
            StoreError: if the folder is missing, an array is truncated, damaged, of another shape or dtype, or
                the index is of other settings or lacks a ``required`` layer.
        """
        self.folder = folder
        self.stamp = _stamp(folder)
        index = read_checked(folder / INDEX, settings_hash, run_id=run_id)
        fix = ("The embeddings are damaged or from another recording: record the run again, or restore the "
               f"folder {folder} from a backup.")
        listed, offsets = index.get("steps"), index.get("offsets")
        if listed is None or offsets is None or listed.dim() != 1 or offsets.shape != (len(listed) + 1,):
            raise StoreError(f"the index {folder / INDEX} is not [T] steps with [T + 1] row offsets. {fix}")
        self.steps, self.offsets = listed.tolist(), offsets.tolist()
        held = [b - a for a, b in zip(self.offsets, self.offsets[1:])]
        if (self.steps, held) != (list(steps), list(rows)):
            raise StoreError(f"the embeddings in {folder} hold {len(held)} steps of {self.offsets[-1]} occurrences, "
                             f"the store {len(steps)} of {sum(rows)}, or another step or row count at some step: "
                             "they belong to another trajectory. Record the run again.")
        self._position = {step: i for i, step in enumerate(self.steps)}
        total = self.offsets[-1]
        self.ids = self._load(folder / IDS, (total,), (np.int64,), fix)
        positions = {name: i for i, name in enumerate(widths)}
        unknown = [name for name in required if name not in positions]
        if unknown:
            raise StoreError(f"layers {unknown} are not tracked layers of this store (it tracks {list(widths)}); "
                             "ask for one of those.")
        self.arrays = {name: self._load(folder / _layer_file(positions[name]), (total, widths.get(name)),
                                        (np.float32, np.float64), fix) for name in required}
        if len({array.dtype for array in self.arrays.values()}) > 1:
            raise StoreError(f"the embeddings in {folder} mix dtypes "
                             f"{ {name: str(a.dtype) for name, a in self.arrays.items()} }. {fix}")

    @staticmethod
    def _load(path: Path, shape: tuple[int | None, ...], dtypes: tuple[type, ...], fix: str) -> np.ndarray:
        """``path`` memory-mapped, if it is an ``.npy`` array of ``shape`` (``None``: any size) and one of
        ``dtypes``."""
        if not path.is_file():
            raise StoreError(f"embeddings file {path} is missing. {fix}")
        try:  # .npy only (no .npz, no pickled objects)
            array = np.lib.format.open_memmap(path, mode="r")
        except (ValueError, OSError, EOFError) as err:
            raise StoreError(f"embeddings file {path} is truncated or corrupt ({err}). {fix}") from err
        fits = array.ndim == len(shape) and all(want is None or got == want for got, want in zip(array.shape, shape))
        if not fits or array.dtype not in dtypes:
            expected = " or ".join(np.dtype(d).name for d in dtypes)
            raise StoreError(f"embeddings file {path} is {array.shape} {array.dtype}, not {shape} {expected}. {fix}")
        return array

    def serves(self, layers: Sequence[str]) -> bool:
        """Whether these arrays hold ``layers`` and the folder on disk is still the one they map (not replaced by a
        later recursion, through another handle or process)."""
        return set(layers) <= set(self.arrays) and _stamp(self.folder) == self.stamp

    @property
    def row_bytes(self) -> int:
        """Bytes of one occurrence's embeddings over the opened layers."""
        return sum(array.shape[1] * array.itemsize for array in self.arrays.values())

    def rows(self, lo: int, hi: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(sample_ids [n], {layer: [n, k_l]})`` of the steps with index in ``[lo, hi)``, copied into memory."""
        start, stop = self.offsets[lo], self.offsets[hi]
        return (torch.from_numpy(np.array(self.ids[start:stop])),
                {name: torch.from_numpy(np.array(array[start:stop])) for name, array in self.arrays.items()})

    def sample_ids(self, lo: int, hi: int) -> torch.Tensor:
        """``[n]``: the sample id of each row of :meth:`rows` ``(lo, hi)`` (8 bytes a row, without the embeddings)."""
        return torch.from_numpy(np.array(self.ids[self.offsets[lo]:self.offsets[hi]]))

    def row_steps(self, lo: int, hi: int) -> torch.Tensor:
        """``[n]``: the step of each row of :meth:`rows` ``(lo, hi)``."""
        counts = torch.tensor(self.offsets[lo:hi + 1], dtype=torch.int64).diff()
        return torch.tensor(self.steps[lo:hi], dtype=torch.int64).repeat_interleave(counts)

    def chunks(self, lo: int, hi: int, max_rows: int) -> Iterator[tuple[int, int]]:
        """Split the steps with index in ``[lo, hi)`` into consecutive ranges of at most ``max_rows`` rows each
        (a range holds at least one step, whatever its rows)."""
        start = lo
        for end in range(lo + 1, hi + 1):
            if end == hi or self.offsets[end + 1] - self.offsets[start] > max_rows:
                yield start, end
                start = end

    def step(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(sample_ids [B], {layer: [B, k_l]})`` of one step."""
        if step not in self._position:
            raise StoreError(f"the embeddings in {self.folder} hold no step {step}: they were computed for another "
                             "trajectory. Record the run again.")
        position = self._position[step]
        return self.rows(position, position + 1)

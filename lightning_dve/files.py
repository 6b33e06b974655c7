"""Store files: safetensors written atomically (temporary name, then rename) and read back with integrity checks.

Nothing is pickled: tensors are safetensors, metadata the header's text fields. Every file this module writes
holds a CRC32 of its tensor entries (names, dtypes, shapes, offsets: :func:`entries_text`) and data bytes in its
metadata (:data:`CRC_KEY`); reads recompute it, so a file damaged on disk or in a copy is refused, not read as
other numbers or without a renamed tensor (files without one, written before, are read unchecked).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from .errors import StoreError

#: safetensors' codes of the dtypes :func:`write_safetensors` writes itself, in the order ``save_file`` lays the
#: tensors out (its dtype enum, descending).
_DTYPE_CODES = {torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.int32: "I32",
                torch.bfloat16: "BF16", torch.float16: "F16", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}
_LAYOUT_ORDER = {dtype: rank for rank, dtype in enumerate(_DTYPE_CODES)}
#: The metadata key of a file's CRC32 (8 hex digits) of its tensor entries and data bytes (:func:`entries_text`).
CRC_KEY = "crc32"
#: The metadata key of a file of several groups (a pack of steps): each group's CRC32, comma-separated.
CRCS_KEY = "crc32s"
#: The metadata key of the recording (the manifest's ``run_id``) a step file belongs to; of a pack, its steps'
#: run ids, comma-separated.
RUN_KEY, RUNS_KEY = "run_id", "run_ids"
_IOV_MAX = max(16, os.sysconf("SC_IOV_MAX")) if "SC_IOV_MAX" in os.sysconf_names else 1024


def write_safetensors(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str]) -> None:
    """Write a safetensors file: the JSON header, then every tensor's bytes straight from its memory.

    The layout ``safetensors.torch.save_file`` writes (tensors ordered by dtype, then name; data 8-byte aligned;
    byte for byte the same file up to the order of the metadata keys, which ``save_file`` does not fix), with
    one ``writev`` instead of its per-tensor copies and checks, which cost more than the write itself for the
    small per-step files. Other dtypes go through ``save_file``. The metadata gains the CRC32 of the tensor
    entries and data (:data:`CRC_KEY`; not for the other dtypes).

    Raises:
        OSError: if the file cannot be written (disk full, permissions), or the system writes nothing.
    """
    if not all(t.dtype in _DTYPE_CODES for t in tensors.values()):
        save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, filename, metadata=metadata)
        return
    entries, buffers, crcs = _layout([("", tensors)])
    _write_file(filename, {**metadata, CRC_KEY: crcs[0]}, entries, buffers)


def write_groups_atomic(path: Path, groups: list[tuple[str, dict[str, torch.Tensor]]],
                        metadata: dict[str, str]) -> None:
    """Write the tensors of several groups (a pack's steps) into one safetensors file, atomically: group after
    group, each group's tensors named ``prefix + name`` and laid out contiguously, with each group's CRC32 in
    the metadata (:data:`CRCS_KEY`), as :func:`write_concatenated_atomic` writes them.

    Raises:
        StoreError: if the disk is full or the write fails (as :func:`write_atomic`).
    """
    entries, buffers, crcs = _layout(groups)
    _replace_atomically(path, lambda tmp: _write_file(str(tmp), {**metadata, CRCS_KEY: ",".join(crcs)}, entries,
                                                      buffers))


def _layout(groups: list[tuple[str, dict[str, torch.Tensor]]]) -> tuple[dict[str, Any], list[memoryview], list[str]]:
    """Header entries, data buffers and each group's CRC32 of ``(prefix, tensors)`` groups laid out one after the
    other, each group's tensors in ``save_file``'s order (dtype, then name)."""
    entries: dict[str, Any] = {}
    buffers: list[memoryview] = []
    crcs, offset = [], 0
    for prefix, tensors in groups:
        group, own, start = [], {}, offset
        for name, tensor in sorted(tensors.items(), key=lambda item: (_LAYOUT_ORDER[item[1].dtype], item[0])):
            tensor = tensor.detach().cpu().contiguous()
            array = (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()
            own[prefix + name] = {"dtype": _DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape),
                                  "data_offsets": [offset, offset + array.nbytes]}
            offset += array.nbytes
            group.append(memoryview(array.reshape(-1)).cast("B"))
        crcs.append(crc32([entries_text(own, prefix, start), *group]))  # this group's entries only: linear in a pack
        entries.update(own)
        buffers += group
    return entries, buffers, crcs


def entries_text(entries: dict[str, Any], prefix: str = "", start: int = 0) -> bytes:
    """What a CRC32 covers of a header besides the data: the entries of the tensors named ``prefix...`` (one
    step of a pack, or every tensor), as canonical JSON of (name without ``prefix``, dtype, shape, offsets from
    ``start``), so a step's text in a pack is its loose file's."""
    rows = sorted((name[len(prefix):], entry["dtype"], entry["shape"], entry["data_offsets"][0] - start,
                   entry["data_offsets"][1] - start)
                  for name, entry in entries.items() if name != "__metadata__" and name.startswith(prefix))
    return json.dumps(rows, separators=(",", ":")).encode()


def _write_file(filename: str, metadata: dict[str, str], entries: dict[str, Any], buffers: list[memoryview]) -> None:
    """Write a safetensors file of header ``entries`` and ``metadata``, then the data ``buffers``."""
    text = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    _write_all(filename, [memoryview(len(text).to_bytes(8, "little") + text), *buffers])


def crc32(buffers: Iterable[bytes | memoryview]) -> str:
    """The CRC32 of the concatenated ``buffers``, as 8 hex digits."""
    value = 0
    for buffer in buffers:
        value = zlib.crc32(buffer, value)
    return f"{value:08x}"


def check_crc(path: Path, covered: list[bytes | memoryview], expected: str | None) -> None:
    """Refuse a file whose entries and data (``covered``) do not have the CRC32 written with them (``None``: a
    file without one).

    Raises:
        StoreError: naming the file and what to do.
    """
    if expected is not None and (actual := crc32(covered)) != expected:
        raise StoreError(f"store file {path} is corrupt: its tensor entries and data bytes have CRC32 {actual}, not "
                         f"the {expected} written with them (damaged on disk or in a copy). Restore the file from a "
                         "backup, or record the run again.")


def _write_all(filename: str, buffers: list[memoryview]) -> None:
    """Write ``buffers`` to a new file, as many per ``writev`` as the system takes."""
    fd = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        while buffers:  # writev may write less than asked: drop what was written, write the rest
            written = os.writev(fd, buffers[:_IOV_MAX])
            if written == 0:
                raise OSError(errno.EIO, f"writev wrote nothing to {filename}")
            while buffers and written >= len(buffers[0]):
                written -= len(buffers.pop(0))
            if buffers:
                buffers[0] = buffers[0][written:]
    finally:
        os.close(fd)


def write_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file (:func:`write_safetensors`) under a temporary name, then rename it into place.

    Raises:
        StoreError: if the disk is full or the write fails; the temporary file is removed and files written
            earlier are untouched.
    """
    _replace_atomically(path, lambda tmp: write_safetensors(tensors, str(tmp), metadata))


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (tensor entries and ``__metadata__``) and where its data starts, from its first
    bytes only; the entries are checked to cover the rest of the file exactly.

    Raises:
        StoreError: if the file is missing, or its header is corrupt or does not match its size.
    """
    try:
        with open(path, "rb") as file:
            length = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(length))
            size = os.fstat(file.fileno()).st_size
        end = _data_end(header)
        if end != size - 8 - length:
            raise ValueError(f"its tensors cover {end} bytes of {size - 8 - length}")
    except (ValueError, OSError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise StoreError(f"store file {path} is missing, corrupt or truncated ({err}). Delete the store and record "
                         "the run again, or restore the file from a backup.") from err
    return header, 8 + length


def _data_end(header: dict[str, Any]) -> int:
    """Bytes of a safetensors file's data that its header's tensor entries cover (they leave no hole)."""
    return max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)


def write_concatenated_atomic(path: Path, parts: list[tuple[str, Path, dict[str, Any], int]],
                              metadata: dict[str, str]) -> None:
    """Write one safetensors file holding the tensors of several: each ``(prefix, file, its header, its data
    start)`` part's tensors are named ``prefix + name`` and their bytes copied as they are, by the kernel
    (``copy_file_range``), never decoded (safetensors reads a tensor at any offset), so each part's CRC32 carries
    over (:data:`CRCS_KEY`, empty for a part without one). Atomic as :func:`write_atomic`.

    Raises:
        StoreError: if the disk is full or the write fails (as :func:`write_atomic`).
    """
    crcs = ",".join((entries.get("__metadata__") or {}).get(CRC_KEY, "") for _, _, entries, _ in parts)
    header: dict[str, Any] = {"__metadata__": {**metadata, CRCS_KEY: crcs}}
    base = 0
    for prefix, _, entries, _ in parts:
        for name, entry in entries.items():
            if name != "__metadata__":
                start, end = entry["data_offsets"]
                header[prefix + name] = {**entry, "data_offsets": [base + start, base + end]}
        base += _data_end(entries)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def write(tmp: Path) -> None:
        _write_all(str(tmp), [memoryview(len(text).to_bytes(8, "little") + text)])
        with open(tmp, "r+b") as out:
            end = 8 + len(text)
            for _, source, _, start in parts:
                with open(source, "rb") as src:
                    end = _copy_rest(src.fileno(), start, out.fileno(), end)

    _replace_atomically(path, write)


def _copy_rest(src: int, offset: int, dst: int, at: int) -> int:
    """Copy the bytes of file ``src`` from ``offset`` to its end into file ``dst`` at ``at`` (in the kernel where it
    can); return where they end in ``dst``."""
    remaining = os.fstat(src).st_size - offset
    kernel_copy = getattr(os, "copy_file_range", None)  # Linux only
    while remaining > 0:
        try:
            if kernel_copy is None:
                raise OSError(errno.ENOSYS, "no copy_file_range on this system")
            copied = kernel_copy(src, dst, remaining, offset, at)
        except OSError as err:  # not on this system or file system: copy through memory
            if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            copied = os.pwrite(dst, os.pread(src, remaining, offset), at)
        if copied == 0:
            raise OSError(errno.EIO, "copy_file_range copied nothing")
        offset, at, remaining = offset + copied, at + copied, remaining - copied
    return at


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (a manifest) under a temporary name, then rename it into place.

    Raises:
        StoreError: as :func:`write_atomic`.
    """
    _replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _replace_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(temporary path)``, then rename it to ``path``; no temporary file is left behind on any error."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_error(path, err) from err
    except BaseException:  # an interrupt or another error
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict[str, Any]:
    """A JSON manifest (one JSON object).

    Raises:
        StoreError: if it is truncated or corrupt, or valid JSON but not an object (``null``, a list, ...).
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{path} is truncated or corrupt ({err}); the store cannot be trusted. Record the run "
                         "again into a fresh save_dir.") from err
    if not isinstance(data, dict):
        raise StoreError(f"{path} holds a JSON {type(data).__name__}, not a JSON object: it is not a manifest "
                         "lightning_dve wrote (overwritten or damaged). Restore the file, or record the run again "
                         "into a fresh save_dir.")
    return data


def corrupt_error(path: Path, err: Exception) -> StoreError:
    """The error of a store file that cannot be parsed: which, why, and what to do."""
    return StoreError(f"store file {path} is corrupt or truncated ({err}). Delete the store and record the run "
                      "again, or restore the file from a backup.")


def write_error(path: Path, err: OSError) -> StoreError:
    """The error of a failed store write: what failed, what is kept (:func:`_kept`), and what to do."""
    reason = "the disk is full" if err.errno == errno.ENOSPC else f"the write failed ({err})"
    fix = ("make the folder writable (or point save_dir elsewhere)" if err.errno in (errno.EROFS, errno.EACCES,
                                                                                     errno.EPERM)
           else "free space (or point save_dir elsewhere)")
    return StoreError(f"could not write {path}: {reason}. {_kept(path)}; {fix} and run again.")


def _kept(path: Path) -> str:
    """What a failed write of ``path`` leaves intact, by the kind of file (a step, an appended log, any other)."""
    if path.parent.name == "steps":
        return f"Every step written before is kept in {path.parent}"
    if path.parent.name.endswith(".partial"):  # the embeddings, at train end
        return (f"Every recorded step is kept; the unfinished embeddings in {path.parent} are deleted (resuming the "
                "fit from its last checkpoint computes them again)")
    if path.suffix == ".jsonl":  # one line per step, appended: a partly written line is cut off again
        return f"Every step written before is kept in {path}"
    return f"{path.name} is unchanged (its previous version, if any, is kept), and so are the files in {path.parent}"


def remove_files(paths: Iterable[Path]) -> None:
    """Delete the files at ``paths`` (missing ones are skipped)."""
    for path in paths:
        path.unlink(missing_ok=True)


def disk_bytes(paths: Iterable[Path]) -> int:
    """Total size of the files at ``paths``, and of every file under those that are folders (missing: 0).

    Another rank may be writing under a folder meanwhile (rank 0 counts ``shards/``): a file or folder renamed
    away between the listing and its size counts 0 (each file is looked at once), never an error.
    """
    total = 0
    for path in paths:
        total += _file_size(path)
        for folder, _, names in os.walk(path):  # nothing for a file or a missing path; unreadable folders skipped
            total += sum(_file_size(Path(folder, name)) for name in names)
    return total


def _file_size(path: Path) -> int:
    """The size of the regular file at ``path``; 0 if it is missing (renamed away just now) or not a file."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return 0
    return status.st_size if stat.S_ISREG(status.st_mode) else 0


def read_checked(path: Path, settings_hash: str, step: int | None = None,
                 run_id: str | None = None) -> dict[str, torch.Tensor]:
    """Read a store file, refusing a missing, corrupt or foreign one (:func:`read_checked_metadata`)."""
    return read_checked_metadata(path, settings_hash, step, run_id)[0]


def read_checked_metadata(path: Path, settings_hash: str, step: int | None = None,
                          run_id: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a store file, refusing a missing, corrupt or foreign one: its tensors and its metadata.

    Args:
        path: the file.
        settings_hash: the manifest's; the file's metadata must hold the same.
        step: if given, the step the file's metadata must name (a file of one step is never another's).
        run_id: if given, the recording the file's metadata must name where it names one (:data:`RUN_KEY`).

    Raises:
        StoreError: if the file is missing, cannot be parsed (truncated or corrupt), its tensor entries and data
            do not have their CRC32, it was written with other settings than the manifest's, or holds another step
            than ``step``.
    """
    if not path.is_file():
        raise StoreError(f"store file {path} is missing: the store is incomplete (deleted or not copied). "
                         "Restore the file or record the run again.")
    try:  # one read; safetensors parses and checks the whole file at once (per-tensor reads cost twice as much)
        data = path.read_bytes()
        tensors = dict(sorted(load_safetensors(data).items()))  # by name, as safe_open lists them
        start = 8 + int.from_bytes(data[:8], "little")
        header = json.loads(data[8:start])
        metadata = header.get("__metadata__") or {}
    except (SafetensorError, ValueError, OSError) as err:
        raise corrupt_error(path, err) from err
    check_crc(path, [entries_text(header), memoryview(data)[start:]], metadata.get(CRC_KEY))
    check_metadata(path, metadata, settings_hash, step, run_id)
    return tensors, metadata


def check_metadata(path: Path, metadata: dict[str, str], settings_hash: str, step: int | None = None,
                   run_id: str | None = None) -> None:
    """Refuse a store file written with other settings than the manifest's, holding another step than ``step``,
    or written by another recording than ``run_id``.

    Raises:
        StoreError: naming both and what to do.
    """
    if metadata.get("settings_hash") != settings_hash:
        raise StoreError(f"store file {path} was written with settings {metadata.get('settings_hash')}, but the "
                         f"manifest says {settings_hash}: files of two runs are mixed in one directory. Use a "
                         "fresh save_dir for each run (or overwrite=True).")
    if step is not None and metadata.get("step") != str(step):
        raise StoreError(f"store file {path} holds step {metadata.get('step')}'s data, not step {step}'s: a file "
                         "of another step was copied or renamed over it (the store is damaged). Restore the file "
                         "from a backup, or record the run again.")
    if run_id is not None and metadata.get(RUN_KEY, run_id) != run_id:
        raise StoreError(f"store file {path} was written by another recording (run {metadata[RUN_KEY]}) than its "
                         f"manifest's (run {run_id}), with the same settings: files of two runs are mixed in one "
                         "directory. Restore the file from this run's backup, or record the run again.")


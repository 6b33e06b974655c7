"""Store files: safetensors written atomically (temporary name, then rename) and read back with integrity checks.

Nothing is pickled: tensors are safetensors, metadata the header's text fields.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import StoreError

#: safetensors' codes of the dtypes :func:`write_safetensors` writes itself, in the order ``save_file`` lays the
#: tensors out (its dtype enum, descending).
_DTYPE_CODES = {torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.int32: "I32",
                torch.bfloat16: "BF16", torch.float16: "F16", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}
_LAYOUT_ORDER = {dtype: rank for rank, dtype in enumerate(_DTYPE_CODES)}
_IOV_MAX = max(16, os.sysconf("SC_IOV_MAX")) if "SC_IOV_MAX" in os.sysconf_names else 1024


def write_safetensors(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str]) -> None:
    """Write a safetensors file: the JSON header, then every tensor's bytes straight from its memory.

    The layout ``safetensors.torch.save_file`` writes (tensors ordered by dtype, then name; data 8-byte aligned;
    byte for byte the same file up to the order of the metadata keys, which ``save_file`` does not fix), with
    one ``writev`` instead of its per-tensor copies and checks, which cost more than the write itself for the
    small per-step files. Other dtypes go through ``save_file``.

    Raises:
        OSError: if the file cannot be written (disk full, permissions), or the system writes nothing.
    """
    if not all(t.dtype in _DTYPE_CODES for t in tensors.values()):
        save_file(tensors, filename, metadata=metadata)
        return
    header: dict[str, Any] = {"__metadata__": metadata}
    buffers, offset = [], 0
    for name, tensor in sorted(tensors.items(), key=lambda item: (_LAYOUT_ORDER[item[1].dtype], item[0])):
        tensor = tensor.detach().cpu().contiguous()
        array = (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()
        header[name] = {"dtype": _DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        buffers.append(memoryview(array.reshape(-1)).cast("B"))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    buffers.insert(0, memoryview(len(text).to_bytes(8, "little") + text))
    _write_all(filename, buffers)


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
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write_safetensors(tensors, str(tmp), metadata)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        reason = "the disk is full" if err.errno == errno.ENOSPC else f"the write failed ({err})"
        raise StoreError(
            f"could not write {path}: {reason}. Every step written before is kept in {path.parent.parent}; "
            "free space (or point save_dir elsewhere) and run again."
        ) from err
    except BaseException:  # an interrupt or another error: no temporary file is left behind either
        tmp.unlink(missing_ok=True)
        raise


def read_checked(path: Path, settings_hash: str) -> dict[str, torch.Tensor]:
    """Read a store file, refusing a missing, corrupt or foreign one.

    Raises:
        StoreError: if the file is missing, cannot be parsed (truncated or corrupt), or was written with
            other settings than the manifest's.
    """
    if not path.is_file():
        raise StoreError(f"store file {path} is missing: the store is incomplete (deleted or not copied). "
                         "Restore the file or record the run again.")
    try:
        with safe_open(str(path), framework="pt") as handle:  # one read for the header and the tensors
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, ValueError, OSError) as err:
        raise StoreError(f"store file {path} is corrupt or truncated ({err}). Delete the store and record the "
                         "run again, or restore the file from a backup.") from err
    if metadata.get("settings_hash") != settings_hash:
        raise StoreError(f"store file {path} was written with settings {metadata.get('settings_hash')}, but the "
                         f"manifest says {settings_hash}: files of two runs are mixed in one directory. Use a "
                         "fresh save_dir for each run (or overwrite=True).")
    return tensors

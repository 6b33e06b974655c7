"""Append-only JSON-lines logs (one record per training step, e.g. the replay checkpoints' ``hyper.jsonl``): one
``write`` per line, no temporary file, and a reader that drops a torn last line. Each line carries the CRC32 of
its record's compact JSON (``"crc32"``, last), checked on reading (a file whose first line has none, written
before, is read unchecked; a resumed one may mix both)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import warnings
import weakref
from pathlib import Path
from typing import Any

from .errors import StoreError
from .files import CRC_KEY, crc32, write_error

_write = os.write  # the appends of a LineLog (a seam for the disk-full tests)


def json_line(record: dict[str, Any]) -> str:
    """One line of a JSON-lines file: compact JSON with the CRC32 of the record's own, newline-terminated."""
    return json.dumps({**record, CRC_KEY: crc32([_compact(record)])}, separators=(",", ":")) + "\n"


def _compact(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode()


def _parse_line(raw: bytes, checked: bool) -> dict[str, Any] | str:
    """The record of one line, or why it is none: not a JSON object with an integer ``step``, or a CRC32 that its
    record does not have, or none where the file's lines have one (``checked``; JSON floats and key order survive
    a parse, so the record's compact JSON is rebuilt)."""
    try:
        record = json.loads(raw)
    except ValueError:
        return "is not a JSON record of a step"
    if not isinstance(record, dict) or type(record.get("step")) is not int:
        return "is not a JSON record of a step"
    expected = record.pop(CRC_KEY, None)
    if (expected is None and checked) or (expected is not None and crc32([_compact(record)]) != expected):
        return "does not have the CRC32 written with it (changed on disk or in a copy)"
    return record


def read_json_lines(path: Path) -> dict[int, dict[str, Any]]:
    """Every record of a :class:`LineLog` file by its ``step`` (the last line of a step wins; none if missing).

    A torn last line (a run killed while writing it: no newline at its end) is dropped with a warning.

    Raises:
        StoreError: if a newline-terminated line is not a record or not the record written (each line is one write
            ending in its newline, so that is corruption, not an interrupted run).
    """
    if not path.is_file():
        return {}
    lines = path.read_bytes().split(b"\n")  # a complete file ends with a newline: its last item is empty
    torn = lines.pop() != b""
    records = {}
    checked = bool(lines) and f'"{CRC_KEY}":'.encode() in lines[0]  # (an earlier version's first line has none)
    for number, raw in enumerate(lines, start=1):
        record = _parse_line(raw, checked)
        if isinstance(record, str):
            raise StoreError(f"{path} is corrupt: line {number} {record}. Record the run again (with a fresh "
                             "save_dir or overwrite=True).")
        records[record["step"]] = record
    if torn:
        warnings.warn(f"{path}: the last line was incomplete (the run was interrupted while writing it) and is "
                      "dropped; its step's record is missing.", stacklevel=2)
    return records


class LineLog:
    """An append-only text file written one line per :meth:`append` (one ``write`` each, no temporary file).

    The file is opened on the first append and kept open (closed by :meth:`close`, or when the log is dropped).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._size = 0  # bytes after the last complete append
        self._closer: weakref.finalize | None = None

    def append(self, line: str) -> None:
        """Append ``line`` (newline-terminated).

        Raises:
            StoreError: if the disk is full or the write fails; a partly written line is cut off again.
        """
        data = rest = line.encode()
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
                self._size, self._closer = os.fstat(self._fd).st_size, weakref.finalize(self, os.close, self._fd)
            while rest:  # one write, unless the system writes less than asked
                written = _write(self._fd, rest)
                if written == 0:
                    raise OSError(errno.EIO, f"write wrote nothing to {self.path}")
                rest = rest[written:]
        except OSError as err:
            if self._fd is not None:  # best effort: a read would drop the torn line anyway
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._size)
            raise write_error(self.path, err) from err
        self._size += len(data)

    def close(self) -> None:
        """Close the file (safe to call twice; a later :meth:`append` opens it again)."""
        if self._closer is not None:
            self._closer()
        self._fd, self._closer = None, None

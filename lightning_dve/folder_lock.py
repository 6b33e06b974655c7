"""One recording per store folder: an advisory lock that a second fit into the same ``save_dir`` is refused by.

Two fits recording into one folder at once (parallel W&B sweep agents with one ``save_dir`` and
``overwrite=True``) would write the same step files over each other: a trajectory of neither run. The lock is an
``flock`` on ``save_dir/.lock`` (each DDP rank locks its own folder), held from the store's creation (or reopening
for a resume) until the fit's teardown. It belongs to the lock's open file description, so other code of the
process that opens and closes the file (a copy of the folder, a W&B artifact of it) leaves it held; a POSIX
``lockf``, used before session 30, was dropped by any such close. The system drops it when the process and the
children that share the descriptor (forked DataLoader workers, which end with it) end; released, it is unlocked
explicitly, so a persistent worker's copy of the descriptor never keeps a later fit out. Within one process it
does not exclude (one fit at a time runs there): the locks of one folder share one descriptor, unlocked and closed
with the last of them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import weakref
from collections.abc import Callable
from pathlib import Path

from .errors import StoreError
from .files import write_error

try:
    import fcntl
except ImportError:  # not on Windows: recordings there are not locked
    fcntl = None  # type: ignore[assignment]

#: The lock file in a store folder a recording holds (:class:`FolderLock`).
LOCK_FILE = ".lock"


class FolderLock:
    """An exclusive advisory lock on ``folder/.lock`` for as long as one recording writes there (module docstring)."""

    #: ``{lock file: [descriptor, locks holding it, process id]}`` of this process (module docstring).
    _shared: dict[str, list[int]] = {}

    def __init__(self, folder: Path) -> None:
        """Take the lock, writing this process's id and host into the file.

        Raises:
            StoreError: if another process holds it (naming that process), or the folder cannot be written.
        """
        self._closer: Callable[[], None] | None = None
        if fcntl is None:
            return
        key = str((folder / LOCK_FILE).resolve())
        shared = self._shared.get(key)
        if shared is not None and shared[2] == os.getpid():  # held in this process already: share its descriptor
            shared[1] += 1
            self._closer = weakref.finalize(self, FolderLock._drop, key)
            return
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise write_error(folder / LOCK_FILE, err) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise write_error(folder / LOCK_FILE, err) from err
            raise StoreError(f"{folder} is being recorded by another fit ({holder}): two fits in one save_dir would "
                             "mix their steps. Give each fit its own save_dir (e.g. one per W&B run, "
                             "save_dir=f\"dve/{wandb.run.id}\"), or wait for that fit to finish.") from err
        with contextlib.suppress(OSError):  # who holds it, for the message above (the lock itself is taken)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._shared[key] = [fd, 1, os.getpid()]
        self._closer = weakref.finalize(self, FolderLock._drop, key)  # dropped unreleased: released then

    @staticmethod
    def _drop(key: str) -> None:
        """Release one lock of ``key``; the last one unlocks the file (for forked children's copies of the
        descriptor too) and closes the descriptor. In a forked child, which shares the parent's lock, it only
        closes the child's copy: the parent's fit still records."""
        shared = FolderLock._shared[key]
        shared[1] -= 1
        if shared[1] == 0:
            del FolderLock._shared[key]
            if shared[2] == os.getpid():
                with contextlib.suppress(OSError):
                    fcntl.flock(shared[0], fcntl.LOCK_UN)
            os.close(shared[0])

    @property
    def held(self) -> bool:
        """Whether this lock is still held (not released, and taken where locks exist)."""
        return self._closer is not None and self._closer.alive

    def release(self) -> None:
        """Drop the lock (safe to call twice)."""
        if self._closer is not None:
            self._closer()

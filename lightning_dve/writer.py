"""Appending recorded steps to the store from a background thread, so disk writes overlap training.

The float16 encode and the safetensors write of a step (:meth:`TrajectoryStore.append`) run in one worker
thread, in submission order, behind a bounded queue (the training loop waits only when it is full). Each file
is still written under a temporary name and renamed, so a run that dies keeps every step that was completely
written. The first write error stops the worker: later steps are dropped, never written after a gap, and the
error is raised in the training thread at the next :meth:`StepWriter.check`, :meth:`~StepWriter.flush` or
:meth:`~StepWriter.close`.
"""

from __future__ import annotations

import queue
import threading

from .store import StepRecord, TrajectoryStore

QUEUE_DEPTH = 4  # steps waiting to be written, at most (their gradients are held in memory)


class StepWriter:
    """One background thread that appends :class:`StepRecord` s to a :class:`TrajectoryStore`, in order.

    Args:
        store: the store to append to; its manifest lists a step once that step's file is in place.
        depth: steps that may wait in the queue before :meth:`append` blocks.
    """

    def __init__(self, store: TrajectoryStore, depth: int = QUEUE_DEPTH) -> None:
        self.store = store
        self._queue: queue.Queue[StepRecord | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lightning_dve-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            record = self._queue.get()
            try:
                if record is None:
                    return
                if self._error is None:  # after a failure nothing more is written: no gaps in the trajectory
                    self.store.append(record)
            except BaseException as err:  # noqa: BLE001 - handed to the training thread, raised there
                self._error = err
            finally:
                self._queue.task_done()

    def append(self, record: StepRecord) -> None:
        """Queue one step for writing (blocks while the queue is full); after a failed write it is dropped.

        Raises:
            RuntimeError: if the writer is closed.
        """
        if not self._thread.is_alive():
            raise RuntimeError("StepWriter.append after close(): open a new writer for the store.")
        self._queue.put(record)

    def check(self) -> None:
        """Raise the error of a failed write, if any (the steps before it are on disk).

        Raises:
            StoreError: the write error, e.g. a full disk.
        """
        if self._error is not None:
            raise self._error

    def flush(self) -> None:
        """Wait until every queued step is written (or dropped after an error), then :meth:`check`."""
        self._queue.join()
        self.check()

    def close(self, raise_error: bool = True) -> None:
        """Write what is queued, stop the thread (idempotent), and with ``raise_error`` :meth:`check`.

        Args:
            raise_error: raise a write error; ``False`` on a path that is already failing (an exception).
        """
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if raise_error:
            self.check()

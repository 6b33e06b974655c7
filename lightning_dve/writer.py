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
    """Appends :class:`StepRecord` s to a :class:`TrajectoryStore` in order, in one background thread or inline.

    The thread pays off where the training thread leaves the CPU idle (an accelerator runs the step). When
    training itself runs on the CPU the writer would compete with torch's threads for the same cores (tiny steps
    ran 1.7x slower on 2 cores), so the callback writes inline there; errors surface the same way in both modes.

    Args:
        store: the store to append to; its manifest lists a step once that step's file is in place.
        depth: steps that may wait in the queue before :meth:`append` blocks.
        background: write in a worker thread (``False``: inside :meth:`append`).
    """

    def __init__(self, store: TrajectoryStore, depth: int = QUEUE_DEPTH, background: bool = True) -> None:
        self.store = store
        self._queue: queue.Queue[StepRecord | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="lightning_dve-writer", daemon=True) if background \
            else None
        if self._thread is not None:
            self._thread.start()

    def _write(self, record: StepRecord) -> None:
        """Append one step unless an earlier write failed (no gaps in the trajectory); keep the first error."""
        if self._error is None:
            try:
                self.store.append(record)
            except BaseException as err:  # noqa: BLE001 - raised in the training thread by check()
                self._error = err

    def _run(self) -> None:
        while True:
            record = self._queue.get()
            try:
                if record is None:
                    return
                self._write(record)
            finally:
                self._queue.task_done()

    def append(self, record: StepRecord) -> None:
        """Write one step, or queue it (blocks while the queue is full); after a failed write it is dropped.

        Raises:
            RuntimeError: if the writer is closed.
        """
        if self._closed:
            raise RuntimeError("StepWriter.append after close(): open a new writer for the store.")
        if self._thread is None:
            self._write(record)
        else:
            self._queue.put(record)

    def check(self) -> None:
        """Raise the error of a failed write, if any (the steps before it are on disk).

        Raises:
            StoreError: the write error, e.g. a full disk.
        """
        if self._error is not None:
            raise self._error

    def wait(self) -> None:
        """Wait until every queued step is written (or dropped after an error); raise nothing."""
        self._queue.join()

    def flush(self) -> None:
        """:meth:`wait`, then :meth:`check`."""
        self.wait()
        self.check()

    def close(self, raise_error: bool = True) -> None:
        """Write what is queued, stop the thread (idempotent), and with ``raise_error`` :meth:`check`.

        Args:
            raise_error: raise a write error; ``False`` on a path that is already failing (an exception).
        """
        if not self._closed:
            self._closed = True
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
        if raise_error:
            self.check()

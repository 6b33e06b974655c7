"""The background step writer: order, errors surfacing in the training thread, nothing lost or written after a
failure, and the callback's use of it (train end waits, a checkpoint's ``last_step`` is on disk)."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import pytest
import torch

import lightning_dve.files
from lightning_dve import DataValueEmbedding, StoreError
from lightning_dve.store import StepRecord, TrajectoryStore
from lightning_dve.writer import StepWriter

MANIFEST = {"settings": {}, "settings_hash": "h", "storage_dtype": "float32", "layers": [{"name": "a"}]}


def record(step: int) -> StepRecord:
    ids = torch.arange(4) + 4 * step
    return StepRecord(step, ids, torch.full((4,), 0.25, dtype=torch.float64), torch.tensor([0.1], dtype=torch.float64),
                      {"a": torch.full((4, 3), float(step))}, epoch=step // 3)


def step_files(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "steps").glob("*.safetensors"))


def slow_save_file(monkeypatch: pytest.MonkeyPatch, seconds: float, fail_at: str | None = None) -> None:
    real = lightning_dve.files.write_safetensors

    def save_file(tensors, filename, metadata=None):
        time.sleep(seconds)
        if fail_at is not None and fail_at in filename:
            Path(filename).write_bytes(b"\0" * 10)  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(lightning_dve.files, "write_safetensors", save_file)


@pytest.mark.parametrize("background", [True, False])
def test_steps_are_written_in_order_and_listed_once_written(tmp_path: Path, monkeypatch, background: bool) -> None:
    slow_save_file(monkeypatch, 0.01)
    store = TrajectoryStore.create(tmp_path, MANIFEST, overwrite=False)
    writer = StepWriter(store, depth=2, background=background)
    for step in range(8):
        writer.append(record(step))
    writer.close()
    assert store.steps == list(range(8)) and store.epochs == [s // 3 for s in range(8)]
    assert step_files(tmp_path) == [f"step_{s:08d}.safetensors" for s in range(8)]
    for step in range(8):
        got = store.read_step(step)
        assert got.sample_ids.tolist() == record(step).sample_ids.tolist()
        torch.testing.assert_close(got.grads["a"], record(step).grads["a"])


def test_training_thread_does_not_wait_for_the_disk(tmp_path: Path, monkeypatch) -> None:
    slow_save_file(monkeypatch, 0.2)
    writer = StepWriter(TrajectoryStore.create(tmp_path, MANIFEST, overwrite=False), depth=4)
    started = time.perf_counter()
    for step in range(3):
        writer.append(record(step))
    assert time.perf_counter() - started < 0.2
    writer.flush()
    assert writer.store.steps == [0, 1, 2]
    writer.close()


@pytest.mark.parametrize("background", [True, False])
def test_write_error_surfaces_and_nothing_is_written_after_it(tmp_path: Path, monkeypatch, background: bool) -> None:
    slow_save_file(monkeypatch, 0.0, fail_at="step_00000003")
    store = TrajectoryStore.create(tmp_path, MANIFEST, overwrite=False)
    writer = StepWriter(store, background=background)
    for step in range(6):
        writer.append(record(step))  # never raises: the error is reported by check / flush / close
    with pytest.raises(StoreError, match=r"step_00000003\.safetensors: the disk is full.*kept"):
        writer.flush()
    with pytest.raises(StoreError, match="the disk is full"):
        writer.check()
    with pytest.raises(StoreError, match="the disk is full"):
        writer.close()
    assert step_files(tmp_path) == [f"step_{s:08d}.safetensors" for s in range(3)]  # no gap: 4, 5 dropped
    assert store.steps == [0, 1, 2]
    assert not [p for p in (tmp_path / "steps").iterdir() if p.name.endswith(".tmp")]
    assert TrajectoryStore.open(tmp_path).steps == [0, 1, 2]  # what an interrupted run keeps


def test_close_without_raising_writes_what_was_queued(tmp_path: Path, monkeypatch) -> None:
    slow_save_file(monkeypatch, 0.02)
    writer = StepWriter(TrajectoryStore.create(tmp_path, MANIFEST, overwrite=False))
    for step in range(4):
        writer.append(record(step))
    writer.close(raise_error=False)
    writer.close(raise_error=False)  # idempotent
    assert TrajectoryStore.open(tmp_path).steps == [0, 1, 2, 3]


@pytest.mark.parametrize("background", [True, False])
def test_append_after_close_is_refused(tmp_path: Path, background: bool) -> None:
    writer = StepWriter(TrajectoryStore.create(tmp_path, MANIFEST, overwrite=False), background=background)
    writer.close()
    with pytest.raises(RuntimeError, match="after close"):
        writer.append(record(0))


@pytest.fixture
def background_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The callback's writer in its worker thread, as on an accelerator: on the CPU the callback writes inline
    (``test_callback_writes_inline_when_training_on_the_cpu``), where no wait for the queue can be missed."""
    import lightning_dve.callback

    monkeypatch.setattr(lightning_dve.callback, "StepWriter",
                        lambda store, **kwargs: StepWriter(store, **{**kwargs, "background": True}))


def test_callback_waits_for_the_writes_at_train_end(fit, mlp_cls, save_dir, monkeypatch,
                                                    background_writer) -> None:
    slow_save_file(monkeypatch, 0.05)
    fit(mlp_cls(), DataValueEmbedding(save_dir, projection_dim=16, report=None))
    store = TrajectoryStore.open(save_dir)
    assert store.manifest["status"] == "complete" and store.steps == [0, 1, 2, 3]
    arrays = store.embedding_arrays()
    assert arrays.steps == [0, 1, 2, 3] and arrays.offsets[-1] == sum(store.manifest["rows"]) > 0


def test_checkpoint_state_lists_only_steps_on_disk(fit, mlp_cls, save_dir, monkeypatch, background_writer) -> None:
    slow_save_file(monkeypatch, 0.05)
    seen: list[tuple[int, list[str]]] = []
    dve = DataValueEmbedding(save_dir, projection_dim=16, report=None)

    class Checkpointing(mlp_cls):
        def on_train_batch_end(self, outputs, batch, batch_idx):
            state = dve.state_dict()  # what a checkpoint taken now would record
            seen.append((state["last_step"], step_files(save_dir)))

    fit(Checkpointing(), dve)
    assert [last for last, _ in seen] == [0, 1, 2, 3]  # the module's hook runs after the callback's
    for last, files in seen:
        assert files == [f"step_{s:08d}.safetensors" for s in range(last + 1)]


def test_failed_write_stops_the_fit_at_a_later_step(fit, mlp_cls, save_dir, monkeypatch) -> None:
    slow_save_file(monkeypatch, 0.0, fail_at="step_00000001")
    model = mlp_cls()
    with pytest.raises(StoreError, match=r"step_00000001\.safetensors: the disk is full"):
        fit(model, DataValueEmbedding(save_dir, projection_dim=16, report=None))
    assert step_files(save_dir) == ["step_00000000.safetensors"]
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert not [t for t in threading.enumerate() if t.name == "lightning_dve-writer"]


def test_callback_writes_inline_when_training_on_the_cpu(fit, mlp_cls, save_dir, monkeypatch) -> None:
    """On the CPU a writer thread would compete with torch's threads: the callback writes inside the step."""
    threads: list[str] = []
    real = TrajectoryStore.append
    monkeypatch.setattr(TrajectoryStore, "append", lambda self, r: (threads.append(threading.current_thread().name),
                                                                     real(self, r))[1])
    fit(mlp_cls(), DataValueEmbedding(save_dir, projection_dim=16, report=None))
    assert threads and set(threads) == {threading.main_thread().name}

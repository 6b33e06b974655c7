"""The per-step hyperparameters of the replay checkpoints: one append-only ``hyper.jsonl`` (real files on disk)."""

from __future__ import annotations

import errno
import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest

from lightning_dve import StoreError
from lightning_dve import checkpoints, files
from lightning_dve.checkpoints import HYPER_FILE, CheckpointStore
from lightning_dve.files import read_json_lines


def _record(step: int) -> dict[str, Any]:
    """A record with the shape the recorder writes (floats that must come back exactly)."""
    return {"groups": [{"lr": 0.1 / (step + 3), "betas": [0.9, 0.999], "weight_decay": 0.0},
                       {"lr": 1e-3 * step, "momentum": 0.0}],
            "clip_factor": 1.0 / (step + 7)}


def _store(root: Path, steps: range) -> CheckpointStore:
    store = CheckpointStore.create(root, {"settings_hash": "h", "interval": 2, "final_step": None})
    for step in steps:
        store.write_hyper(step, _record(step))
    return store


def _steps(root: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (root / HYPER_FILE).read_text().splitlines()]


def test_appends_one_line_per_step_and_reads_back_exactly(tmp_path: Path) -> None:
    store = _store(tmp_path, range(5))
    assert store.read_hyper(3) == _record(3)  # read while the file is open for appending
    store.write_hyper(5, _record(5))  # an append after a read: the cache is dropped
    assert store.read_hyper(5) == _record(5)
    store.close()
    store.close()  # safe twice
    lines = (tmp_path / HYPER_FILE).read_text().splitlines(keepends=True)
    assert lines[2] == json.dumps({"step": 2, **_record(2)}, separators=(",", ":")) + "\n"
    assert _steps(tmp_path) == list(range(6)) and not (tmp_path / "steps").exists()
    opened = CheckpointStore.open(tmp_path)
    for step in range(6):
        assert opened.read_hyper(step) == _record(step)
    with pytest.raises(StoreError, match="hyperparameters of step 6 were not recorded"):
        opened.read_hyper(6)
    store.write_hyper(6, _record(6))  # a write after close opens the file again
    store.close()
    assert _steps(tmp_path) == list(range(7))


def test_read_parses_the_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _store(tmp_path, range(3)).close()
    opened, calls = CheckpointStore.open(tmp_path), []
    parse = checkpoints.read_json_lines
    monkeypatch.setattr(checkpoints, "read_json_lines", lambda path: calls.append(path) or parse(path))
    assert [opened.read_hyper(s)["clip_factor"] for s in (0, 1, 2, 1)] == [_record(s)["clip_factor"]
                                                                           for s in (0, 1, 2, 1)]
    assert calls == [tmp_path / HYPER_FILE]


def test_last_line_of_a_step_written_twice_wins(tmp_path: Path) -> None:
    store = _store(tmp_path, range(3))
    store.write_hyper(1, _record(9))
    store.close()
    assert CheckpointStore.open(tmp_path).read_hyper(1) == _record(9)


@pytest.mark.parametrize("torn", ['{"step":3,"groups":[{"lr"', '{"step":3,"groups":[]}'])
def test_torn_last_line_is_dropped_with_a_warning(tmp_path: Path, torn: str) -> None:
    _store(tmp_path, range(3)).close()
    with open(tmp_path / HYPER_FILE, "a") as handle:  # a run killed while writing step 3's line
        handle.write(torn)
    opened = CheckpointStore.open(tmp_path)
    with pytest.warns(UserWarning, match=r"hyper\.jsonl: the last line was incomplete .* dropped"):
        assert opened.read_hyper(2) == _record(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # parsed once: no second warning
        assert [opened.read_hyper(s) for s in (0, 1)] == [_record(0), _record(1)]
        with pytest.raises(StoreError, match="hyperparameters of step 3 were not recorded"):
            opened.read_hyper(3)


def test_a_complete_but_unreadable_last_line_is_refused(tmp_path: Path) -> None:
    """Each line is one write ending in its newline, so a newline-terminated bad line is corruption, not a crash."""
    _store(tmp_path, range(3)).close()
    with open(tmp_path / HYPER_FILE, "a") as handle:
        handle.write('{"step":3,"gro\n')
    with pytest.raises(StoreError, match=r"hyper\.jsonl is corrupt: line 4"):
        CheckpointStore.open(tmp_path).read_hyper(0)


def test_corrupt_line_before_the_last_is_refused(tmp_path: Path) -> None:
    _store(tmp_path, range(4)).close()
    path = tmp_path / HYPER_FILE
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:10] + "\n"
    path.write_text("".join(lines))
    with pytest.raises(StoreError, match=r"hyper\.jsonl is corrupt: line 2 is not .* Record the run again"):
        CheckpointStore.open(tmp_path).read_hyper(0)
    with pytest.raises(StoreError, match="line 2"):
        CheckpointStore.reopen(tmp_path, last_step=3)


def test_reopen_keeps_steps_up_to_the_last_and_appends_after_it(tmp_path: Path) -> None:
    _store(tmp_path, range(6)).close()
    with open(tmp_path / HYPER_FILE, "a") as handle:
        handle.write('{"step":6,"gr')  # torn as well: dropped by the rewrite
    with pytest.warns(UserWarning, match="last line was incomplete"):
        store = CheckpointStore.reopen(tmp_path, last_step=2)
    assert (tmp_path / HYPER_FILE).read_text().endswith('{"step":6,"gr')  # nothing changes until the next write
    for step in (3, 4):  # the resumed run records its steps 3, 4 again, differently
        store.write_hyper(step, _record(10 + step))
    store.close()
    assert _steps(tmp_path) == [0, 1, 2, 3, 4]
    opened = CheckpointStore.open(tmp_path)
    assert [opened.read_hyper(s) for s in range(5)] == [*map(_record, range(3)), _record(13), _record(14)]
    with pytest.raises(StoreError, match="hyperparameters of step 5 were not recorded"):
        opened.read_hyper(5)


def test_disk_full_keeps_the_lines_written_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(tmp_path, range(3))
    before = (tmp_path / HYPER_FILE).read_bytes()

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files, "_write", full)
    with pytest.raises(StoreError, match=r"could not write .*hyper\.jsonl: the disk is full\. Every step written "
                                         r"before is kept .* free space \(or point save_dir elsewhere\)"):
        store.write_hyper(3, _record(3))
    monkeypatch.undo()
    assert (tmp_path / HYPER_FILE).read_bytes() == before
    assert [store.read_hyper(s) for s in range(3)] == [_record(s) for s in range(3)]
    with pytest.raises(StoreError, match="hyperparameters of step 3 were not recorded"):
        store.read_hyper(3)
    store.close()


def test_partly_written_line_is_cut_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(tmp_path, range(2))
    before = (tmp_path / HYPER_FILE).read_bytes()
    write, calls = os.write, []

    def short(fd: int, data: bytes) -> int:  # half the line lands, then the disk is full
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(fd, bytes(data[:len(data) // 2]))

    monkeypatch.setattr(files, "_write", short)
    with pytest.raises(StoreError, match="the disk is full"):
        store.write_hyper(2, _record(2))
    monkeypatch.undo()
    assert (tmp_path / HYPER_FILE).read_bytes() == before
    store.write_hyper(2, _record(2))  # appending goes on after the failure
    store.close()
    assert [CheckpointStore.open(tmp_path).read_hyper(s) for s in range(3)] == [_record(s) for s in range(3)]


def test_create_removes_earlier_hyperparameters_of_both_layouts(tmp_path: Path) -> None:
    _store(tmp_path, range(3)).close()
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps" / "step_00000000.json").write_text(json.dumps(_record(0)))
    store = _store(tmp_path, range(1))
    store.close()
    assert _steps(tmp_path) == [0] and not (tmp_path / "steps").exists()


def test_open_refuses_the_per_step_files_of_older_versions(tmp_path: Path) -> None:
    CheckpointStore.create(tmp_path, {"settings_hash": "h", "interval": 2, "final_step": 1})
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps" / "step_00000000.json").write_text(json.dumps(_record(0)))
    with pytest.raises(StoreError, match=r"written by an older version .*steps.* no hyper\.jsonl.* record the run "
                                         "again"):
        CheckpointStore.open(tmp_path)
    with pytest.raises(StoreError, match="older version"):
        CheckpointStore.reopen(tmp_path, last_step=0)


def test_a_failed_hyperparameter_append_stops_the_fit_at_the_step_end(fit, mlp_cls, save_dir, monkeypatch) -> None:
    """The append runs in ``on_before_optimizer_step`` on rank 0 only; its error is kept and raised where the ranks
    agree on errors (the step's end), so under DDP every rank stops, and the steps before are kept."""
    from lightning_dve import DataValueEmbedding
    from lightning_dve.store import TrajectoryStore

    write, calls = files._write, []

    def full_at_step_3(fd: int, data: bytes) -> int:
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(fd, data)

    monkeypatch.setattr(files, "_write", full_at_step_3)
    with pytest.raises(StoreError, match=r"could not write .*hyper\.jsonl: the disk is full"):
        fit(mlp_cls(), DataValueEmbedding(save_dir, report=None))
    assert TrajectoryStore.open(save_dir).steps == [0, 1, 2]  # step 3 was stopped before it was recorded
    assert sorted(read_json_lines(save_dir / "checkpoints" / HYPER_FILE)) == [0, 1, 2]


def test_recorder_keeps_a_write_error_for_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = checkpoints.CheckpointRecorder(tmp_path, "auto", "hash", None)
    failure = StoreError("boom")

    def fail(*args: Any) -> None:
        raise failure

    monkeypatch.setattr(recorder, "_record", fail)
    recorder.before_step(0, None, None, {}, 1.0)  # type: ignore[arg-type]  (kept, not raised here)
    with pytest.raises(StoreError, match="boom"):
        recorder.check()
    with pytest.raises(StoreError, match="boom"):
        recorder.finish(1, None, None, 0.0)  # type: ignore[arg-type]

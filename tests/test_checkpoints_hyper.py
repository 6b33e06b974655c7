"""The per-step hyperparameters of the replay checkpoints: one append-only ``hyper.jsonl`` (real files on disk)."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import warnings
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_dve import StoreError
from lightning_dve import checkpoints, line_log, replay
from lightning_dve.checkpoints import HYPER_FILE, CheckpointStore
from lightning_dve.line_log import read_json_lines
from lightning_dve.records import StepRecord


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
    record = json.dumps({"step": 2, **_record(2)}, separators=(",", ":"))
    assert lines[2] == f'{record[:-1]},"crc32":"{zlib.crc32(record.encode()):08x}"}}\n'  # the CRC32 of the record
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


def test_a_changed_digit_is_refused_by_the_line_checksum_and_lines_without_one_are_read(tmp_path: Path) -> None:
    """A learning rate changed by one digit is a valid record: exact replay then refused the run as not
    reproducing its checkpoints (randomness, dropout, ...), or, below its tolerance, used it (found by a helper
    damaging stores). Each line's CRC32 names the line instead; lines written before it carry none."""
    _store(tmp_path, range(4)).close()
    path = tmp_path / HYPER_FILE
    lines = path.read_text().splitlines(keepends=True)
    assert '"lr":0.02,' in lines[2]
    changed = lines[2].replace('"lr":0.02,', '"lr":0.03,')
    path.write_text("".join([*lines[:2], changed, *lines[3:]]))
    with pytest.raises(StoreError, match=r"hyper\.jsonl is corrupt: line 3 does not have the CRC32 written with it"):
        CheckpointStore.open(tmp_path).read_hyper(0)
    plain = [json.dumps({k: v for k, v in json.loads(line).items() if k != "crc32"}, separators=(",", ":")) + "\n"
             for line in lines]
    path.write_text("".join([lines[0], plain[1], *lines[2:]]))  # a line stripped of its CRC among checked ones
    with pytest.raises(StoreError, match=r"line 2 does not have the CRC32 written with it"):
        CheckpointStore.open(tmp_path).read_hyper(0)
    path.write_text("".join([*plain[:2], *lines[2:]]))  # an earlier store resumed by this version: read
    assert CheckpointStore.open(tmp_path).read_hyper(1) == _record(1)
    path.write_text("".join(plain))
    assert CheckpointStore.open(tmp_path).read_hyper(2) == _record(2)


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

    monkeypatch.setattr(line_log, "_write", full)
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

    monkeypatch.setattr(line_log, "_write", short)
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

    write, calls = line_log._write, []

    def full_at_step_3(fd: int, data: bytes) -> int:
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(fd, data)

    monkeypatch.setattr(line_log, "_write", full_at_step_3)
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


# --- replay.json: a JSON that is no object; overwriting; the interval of a resumed run ----------------------


def test_a_replay_manifest_that_is_json_but_not_an_object_is_refused(tmp_path: Path) -> None:
    _store(tmp_path, range(1)).close()
    (tmp_path / "replay.json").write_text("[]")
    with pytest.raises(StoreError, match=r"replay\.json holds a JSON list, not a JSON object"):
        CheckpointStore.open(tmp_path)


@pytest.mark.parametrize("write", ["write_manifest", "write_snapshot", "write_hyper"])
def test_create_keeps_earlier_checkpoints_until_the_first_write(tmp_path: Path, write: str) -> None:
    old = _store(tmp_path, range(3))
    old.write_snapshot(0, {"w": torch.ones(2)}, {})
    old.close()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    store = CheckpointStore.create(tmp_path, {"settings_hash": "h2", "interval": 4, "final_step": None})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # a fit that trains nothing
    args = {"write_snapshot": (5, {"w": torch.zeros(2)}, {}), "write_hyper": (5, _record(5))}
    getattr(store, write)(*args.get(write, ()))
    store.close()
    expected = {"replay.json", *{"write_snapshot": ["state_00000005.safetensors"], "write_hyper": [HYPER_FILE]}.get(
        write, [])}
    assert {p.name for p in tmp_path.iterdir()} == expected
    assert CheckpointStore.open(tmp_path).manifest["settings_hash"] == "h2"


def test_an_int_interval_is_recorded_at_create(tmp_path: Path) -> None:
    checkpoints.CheckpointRecorder(tmp_path / "int", 3, "hash", None)
    checkpoints.CheckpointRecorder(tmp_path / "auto", "auto", "hash", None)
    assert CheckpointStore.open(tmp_path / "int").manifest["interval"] == 3
    assert CheckpointStore.open(tmp_path / "auto").manifest["interval"] is None  # resolved at the first step


@pytest.mark.parametrize("requested", [2, "auto"])
def test_a_reopened_recorder_without_a_resolved_interval_uses_the_requested_one(tmp_path: Path,
                                                                               requested: int | str) -> None:
    """A run killed before ``finish`` with ``interval`` unset in ``replay.json`` (an ``"auto"`` not resolved yet,
    or an int written by an older version): the resumed recorder keeps replay on (``"auto"`` is resolved again)."""
    store = CheckpointStore.create(tmp_path, {"settings_hash": "hash", "requested_interval": requested,
                                              "interval": None, "kind": "SGD", "refusal": None})
    store.write_hyper(0, _record(0))
    store.close()
    recorder = checkpoints.CheckpointRecorder(tmp_path, requested, "hash", resume_after=0)
    assert recorder.interval == requested and recorder.enabled


def test_a_crashed_run_with_an_int_interval_resumes_with_exact_replay(mlp_cls, make_loader, tmp_path: Path) -> None:
    """Killed in epoch 1 (after step 5), resumed from the epoch-0 checkpoint: the replay checkpoints go on every 2
    steps to the end, as in an uninterrupted run, so exact replay stays available."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_dve import DataValueEmbedding

    class Crashes(mlp_cls):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if self.trainer.global_step == 6:
                raise RuntimeError("killed")
            return super().training_step(batch, batch_idx)

    def run(model: Any, callbacks: list, **fit: Any) -> None:
        L.Trainer(accelerator="cpu", devices=1, max_epochs=3, precision="64-true", logger=False,
                  enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                  callbacks=callbacks).fit(model, make_loader(), **fit)

    def dve() -> DataValueEmbedding:
        return DataValueEmbedding(tmp_path / "dve", projection_dim=32, checkpoint_interval=2, report=None)

    with pytest.raises(RuntimeError, match="killed"):
        run(Crashes().double(), [dve(), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)])
    epoch0 = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0]
    run(mlp_cls().double(), [dve()], ckpt_path=epoch0)
    store = CheckpointStore.open(tmp_path / "dve" / "checkpoints")
    assert store.manifest["interval"] == 2 and store.manifest["final_step"] == 12
    assert store.snapshot_steps == list(range(0, 13, 2))
    assert sorted(read_json_lines(store.root / HYPER_FILE)) == list(range(12))


@pytest.mark.parametrize("storage", ["float16", "float32"])
@pytest.mark.parametrize("kinds", [1, 2])
def test_step_bytes_count_the_rows_other_ranks_keep_as_a_step_file_holds_them(storage: str, kinds: int) -> None:
    """Oracle: the tensors of one step file. Under DDP each rank stores its own layers; the rows of layer ``b`` that
    another rank keeps (``kinds`` kinds of rows: gradients, and GGN curvature rows) count as many bytes as they take
    in a step file that holds them, float16's per-row float32 scale included."""
    gen = torch.Generator().manual_seed(0)
    rows = {"a": torch.randn(5, 6, generator=gen), "b": torch.randn(5, 12, generator=gen)}
    extra = {"curvature": rows} if kinds == 2 else {}
    whole = StepRecord(0, torch.arange(5), torch.full((5,), 0.2, dtype=torch.float64),
                       torch.tensor([0.1, 0.1], dtype=torch.float64), rows, **extra)
    own = dataclasses.replace(whole, grads={"a": rows["a"]}, **{k: {"a": rows["a"]} for k in extra})
    file_bytes = sum(t.numel() * t.element_size() for t in whole.to_tensors(storage).values())
    assert checkpoints.step_store_bytes(whole, storage, [], kinds) == file_bytes
    assert checkpoints.step_store_bytes(own, storage, [12], kinds) == file_bytes


@pytest.mark.parametrize("snapshot, step", [(1000, 30), (4000, 7), (12345, 11), (80, 1000), (10**7, 10**5),
                                            (10**8, 10**8), (10**9, 10**6)])
def test_auto_interval_is_the_fewest_steps_whose_bytes_cover_a_snapshot_within_the_budget(snapshot: int,
                                                                                          step: int) -> None:
    """Oracle: the budget itself. One snapshot per interval costs at most ``AUTO_BUDGET`` of the interval's step
    bytes, and one step fewer would exceed it, unless the interval is the free length (the longest segment the
    replay holds in memory, within ``AUTO_SEGMENT_BYTES``)."""
    interval = checkpoints.auto_interval(snapshot, step)
    free = max(checkpoints.AUTO_MIN_INTERVAL,
               min(checkpoints.SEGMENT_STATES, checkpoints.AUTO_SEGMENT_BYTES // snapshot))
    assert interval >= free
    assert snapshot <= checkpoints.AUTO_BUDGET * step * interval
    assert interval == free or snapshot > checkpoints.AUTO_BUDGET * step * (interval - 1)


def test_auto_interval_of_a_small_model_is_one_replayed_segment_within_its_memory() -> None:
    """Oracle: the replay's own limits. Whatever the step bytes, a small model gets ``SEGMENT_STATES`` (64) steps
    per snapshot, a segment the replay runs forward once (no step replayed twice): 314 snapshots at 20,000 steps,
    not 2,501; a larger model as many steps as fit ``AUTO_SEGMENT_BYTES``, and never fewer than 8."""
    huge_steps = 10**12
    tiny = checkpoints.auto_interval(15_000, huge_steps)  # 1,210 parameters and Adam's two moments, float32
    assert tiny == checkpoints.SEGMENT_STATES == replay.MAX_STATES_IN_MEMORY == 64
    assert len(range(0, 20_000, tiny)) + 1 == 314
    assert tiny * 15_000 <= checkpoints.AUTO_SEGMENT_BYTES
    assert checkpoints.auto_interval(10 * 2**20, huge_steps) == 25  # 25 states of 10 MiB in 256 MiB
    assert checkpoints.auto_interval(2**30, huge_steps) == checkpoints.AUTO_MIN_INTERVAL == 8
    assert checkpoints.auto_interval(15_000, 100) == 1500  # the byte budget, when longer, still decides
    assert checkpoints.auto_interval(15_000, huge_steps, segment_bytes=15_000 * 40) == 40


@pytest.mark.parametrize("interval", ["auto", 4])
def test_a_recording_that_starts_after_step_0_snapshots_its_first_step(tmp_path: Path, interval: int | str) -> None:
    """Oracle: exact replay starts from a snapshot at or before the steps it replays. A resumed fit whose
    checkpoint folder is gone (deleted to save space, or not copied) records from step 6 on: that first step is
    snapshotted whatever the interval, and the next due one follows the interval."""
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    recorder = checkpoints.CheckpointRecorder(tmp_path / "checkpoints", interval, "h", resume_after=5)
    for step in (6, 7):
        recorder.before_step(step, module, optimizer, {}, 1.0)
        recorder.check()
    recorder.before_step(8, module, optimizer, {}, 1.0)
    recorder.store.close()
    assert recorder.store.snapshot_steps == ([6] if interval == "auto" else [6, 8])


def test_the_training_time_of_a_resumed_recording_adds_up_over_its_fits(tmp_path: Path) -> None:
    """Oracle: the fits' own training times. A recording interrupted after step 2 and resumed there trained for the
    first fit's seconds plus the resumed fit's; ``replay.json`` holds their sum, not the last fit's alone."""
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    first = checkpoints.CheckpointRecorder(tmp_path, 2, "h", resume_after=None)
    for step in range(3):
        first.before_step(step, module, optimizer, {}, 1.0)
    first.finish(3, module, optimizer, 2.0)
    first.store.close()
    resumed = checkpoints.CheckpointRecorder(tmp_path, 2, "h", resume_after=2)
    resumed.before_step(3, module, optimizer, {}, 1.0)
    resumed.finish(4, module, optimizer, 3.0)
    resumed.store.close()
    assert CheckpointStore.open(tmp_path).manifest["training_seconds"] == 5.0


def test_a_resumed_recording_keeps_the_interval_its_first_fit_resolved(tmp_path: Path) -> None:
    """Oracle: the first fit's snapshot grid. ``"auto"`` is resolved once, after the first step; a fit resumed after
    the step before the next due one continues on that grid, so that step is snapshotted as in an uninterrupted run."""
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    interval = checkpoints.auto_interval(8 * 4, 10**9)  # steps far larger than a snapshot: the free length
    first = checkpoints.CheckpointRecorder(tmp_path, "auto", "h", resume_after=None)
    for step in range(interval):
        first.before_step(step, module, optimizer, {}, 1.0)
        first.after_step(lambda: 10**9, module)
    first.store.close()
    resumed = checkpoints.CheckpointRecorder(tmp_path, "auto", "h", resume_after=interval - 1)
    resumed.before_step(interval, module, optimizer, {}, 1.0)
    resumed.store.close()
    assert resumed.interval == interval == checkpoints.SEGMENT_STATES
    assert resumed.store.snapshot_steps == [0, interval]


def test_auto_interval_budgets_the_snapshot_with_the_optimizer_state(tmp_path: Path) -> None:
    """Oracle: the bytes a snapshot holds, parameters and Adam's two moments, from the optimizer's own state after a
    step. The interval keeps one such snapshot per interval within the budget of the steps' bytes."""
    module = torch.nn.Linear(30, 20)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1)
    module(torch.randn(4, 30)).square().sum().backward()
    optimizer.step()
    snapshot = sum(t.numel() * t.element_size() for p in module.parameters()
                   for t in (p, optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"]))
    recorder = checkpoints.CheckpointRecorder(tmp_path, "auto", "h", resume_after=None)
    recorder.before_step(1, module, optimizer, {}, 1.0)
    recorder.after_step(lambda: 100, module)
    recorder.store.close()
    assert recorder.interval == checkpoints.auto_interval(snapshot, 100) > checkpoints.AUTO_MIN_INTERVAL

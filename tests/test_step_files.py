"""Packed step files (``lightning_dve.step_files``): a long run's loose step files are packed into files of
consecutive steps; reads, listings, resumes and the leftovers of a crash give the same steps as loose files."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_dve import DataValueEmbedding, DataValueEmbeddings, StoreError, files, step_files
from lightning_dve.step_files import RunIds, StepFolder

HASH = "settings-a"


def step_tensors(step: int) -> dict[str, torch.Tensor]:
    """A step's tensors of several dtypes and a row count that varies with the step."""
    g = torch.Generator().manual_seed(step)
    rows = 2 + step % 3
    return {"sample_ids": torch.arange(rows) + 10 * step, "weights": torch.full((rows,), 1 / rows, dtype=torch.float64),
            "lrs": torch.tensor([0.1 * step, 0.2], dtype=torch.float64),
            "grad/net.0": torch.randn(rows, 6, generator=g).to(torch.float16),
            "scale/net.0": torch.rand(rows, generator=g)}


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def pack_every_3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(step_files, "PACK_STEPS", 3)


def written(folder: Path, steps: list[int], runs: RunIds = RunIds()) -> StepFolder:
    folder.mkdir(parents=True, exist_ok=True)
    files = StepFolder(folder, HASH, runs)
    for step in steps:
        files.write(step, step // 4, step_tensors(step))
    return files


def assert_reads(files: StepFolder, steps: list[int]) -> None:
    assert [e.step for e in files.scan()] == steps
    for entry in files.scan():
        expected = step_tensors(entry.step)
        assert (entry.epoch, entry.lrs, entry.rows) == (entry.step // 4, expected["lrs"].tolist(),
                                                        expected["sample_ids"].numel())
        got = files.read(entry.step)
        assert sorted(got) == sorted(expected)
        for name, value in expected.items():
            assert got[name].dtype == value.dtype and torch.equal(got[name], value)


def test_steps_are_packed_and_read_back_bitwise(pack_every_3: None, tmp_path: Path) -> None:
    steps = [0, 1, 2, 4, 5, 6, 7, 9]  # gaps: steps an fp16 grad scaler skipped
    files = written(tmp_path / "steps", steps)
    assert names(tmp_path / "steps") == ["pack_00000000_00000002.safetensors", "pack_00000004_00000006.safetensors",
                                         "step_00000007.safetensors", "step_00000009.safetensors"]
    assert_reads(files, steps)
    assert_reads(StepFolder(tmp_path / "steps", HASH), steps)  # a fresh reader
    assert files.missing([0, 3, 5, 9, 10]) == [3, 10]  # by the packs' ranges and the loose files' names


def test_packs_bound_the_file_count_of_a_long_run(tmp_path: Path) -> None:
    """Defaults: 1000 steps of a small model leave 3 packs of 256 steps and 232 loose files."""
    written(tmp_path / "steps", list(range(1000)))
    assert len(names(tmp_path / "steps")) == 3 + 1000 - 3 * 256


def test_a_pack_of_many_bytes_is_written_early(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(step_files, "PACK_BYTES", 1400)  # the step files are 472-536 bytes
    files = written(tmp_path / "steps", list(range(7)))
    assert names(tmp_path / "steps") == ["pack_00000000_00000002.safetensors", "pack_00000003_00000005.safetensors",
                                         "step_00000006.safetensors"]
    assert_reads(files, list(range(7)))


def test_a_run_killed_between_pack_and_delete_keeps_each_step_once(
    pack_every_3: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(step_files, "remove_files", lambda paths: None)  # killed before the loose files went
    written(tmp_path / "steps", [0, 1, 2, 3])
    monkeypatch.undo()
    monkeypatch.setattr(step_files, "PACK_STEPS", 3)
    assert len(names(tmp_path / "steps")) == 5  # the pack and its three loose copies, step 3
    files = StepFolder(tmp_path / "steps", HASH)
    assert_reads(files, [0, 1, 2, 3])
    files.write(4, 1, step_tensors(4))  # the next write deletes the loose copies
    assert names(tmp_path / "steps") == ["pack_00000000_00000002.safetensors", "step_00000003.safetensors",
                                         "step_00000004.safetensors"]
    assert_reads(files, [0, 1, 2, 3, 4])


def test_the_temporary_files_of_killed_writes_are_deleted_at_the_next_write(pack_every_3: None,
                                                                              tmp_path: Path) -> None:
    """A SIGKILL during a write leaves its temporary file (up to a pack's 32 MiB); no listing reads it, and the
    recording's first write (a resume's too) deletes it."""
    written(tmp_path / "steps", [0, 1, 2, 3])
    killed = [tmp_path / "steps" / name for name in (".step_00000004.safetensors.tmp",
                                                      ".pack_00000003_00000005.safetensors.tmp")]
    for path in killed:
        path.write_bytes(b"partial")
    assert_reads(StepFolder(tmp_path / "steps", HASH), [0, 1, 2, 3])
    assert all(path.exists() for path in killed)  # a reader leaves them
    resumed = StepFolder(tmp_path / "steps", HASH)
    resumed.write(4, 1, step_tensors(4))
    assert not any(path.exists() for path in killed)
    assert_reads(resumed, [0, 1, 2, 3, 4])


def test_a_resume_inside_a_pack_keeps_its_earlier_steps_and_redoes_the_rest(pack_every_3: None, tmp_path: Path) -> None:
    files = written(tmp_path / "steps", list(range(8)))
    kept = files.scan(after=4, drop=True)
    assert [e.step for e in kept] == [0, 1, 2, 3, 4]
    assert names(tmp_path / "steps") == ["pack_00000000_00000002.safetensors", "pack_00000003_00000004.safetensors"]
    files.write(5, 1, step_tensors(5))
    assert_reads(files, [0, 1, 2, 3, 4, 5])
    assert files.scan(after=1, drop=True) and names(tmp_path / "steps") == ["pack_00000000_00000001.safetensors"]
    assert files.scan(after=-1, drop=True) == [] and names(tmp_path / "steps") == []


def test_a_resume_killed_while_rewriting_a_pack_reads_the_shorter_pack(pack_every_3: None, tmp_path: Path) -> None:
    files = written(tmp_path / "steps", list(range(6)))
    old = tmp_path / "steps" / "pack_00000003_00000005.safetensors"
    shutil.copy(old, tmp_path / "old")
    files.scan(after=3, drop=True)
    shutil.copy(tmp_path / "old", old)  # the old pack was not deleted yet
    assert_reads(StepFolder(tmp_path / "steps", HASH), [0, 1, 2, 3])
    assert [e.step for e in StepFolder(tmp_path / "steps", HASH).scan(drop=True)] == [0, 1, 2, 3]
    assert names(tmp_path / "steps") == ["pack_00000000_00000002.safetensors", "pack_00000003_00000003.safetensors"]


class Killed(BaseException):
    """The process dying at that moment (nothing after it runs)."""


def test_a_resume_killed_while_dropping_later_steps_leaves_a_prefix_of_them(
    pack_every_3: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Killed before any of its deletions, a resume after step 1 leaves steps 0..k (k >= 1), never a gap: a gap
    (steps 0, 1, 3..9) let a checkpoint of the earlier branch at step 5 resume over steps 2 missing from its
    trajectory, silently (seen with real SIGKILLs: the resumed store's scores lacked those steps)."""
    real_unlink, kills = Path.unlink, 0
    while True:
        shutil.rmtree(tmp_path / "steps", ignore_errors=True)
        written(tmp_path / "steps", list(range(10)))  # packs 0-2, 3-5, 6-8; step 9
        calls = 0

        def unlink(path: Path, missing_ok: bool = False) -> None:
            nonlocal calls
            calls += 1
            if calls > kills:
                raise Killed
            real_unlink(path, missing_ok=missing_ok)

        monkeypatch.setattr(Path, "unlink", unlink)
        try:
            StepFolder(tmp_path / "steps", HASH).scan(after=1, drop=True)
        except Killed:
            pass
        else:
            break
        finally:
            monkeypatch.setattr(Path, "unlink", real_unlink)
        steps = [e.step for e in StepFolder(tmp_path / "steps", HASH).scan()]
        assert steps == list(range(len(steps))) and len(steps) >= 2, f"killed before deletion {kills + 1}: {steps}"
        kills += 1
    assert kills == 4 and names(tmp_path / "steps") == ["pack_00000000_00000001.safetensors"]


@pytest.mark.parametrize("where", ["loose", "pack"])
def test_a_step_of_another_recording_with_the_same_settings_is_refused(pack_every_3: None, tmp_path: Path,
                                                                       where: str) -> None:
    mine, other = RunIds("run-b", (("run-a", 1),)), RunIds("run-x")  # run-b continues run-a after its step 1
    written(tmp_path / "a", [0, 1, 2], RunIds("run-a"))
    written(tmp_path / "x", [0, 1, 2, 3], other)
    folder = tmp_path / "steps"
    shutil.copytree(tmp_path / "a", folder)  # run-a's pack of steps 0-2; run-b drops step 2 and records 2-3 anew
    files = StepFolder(folder, HASH, RunIds("run-a"))
    files.scan(after=1, drop=True)
    files.runs = mine
    for step in (2, 3):
        files.write(step, 0, step_tensors(step))
    assert_reads(StepFolder(folder, HASH, mine), [0, 1, 2, 3])  # run-a's steps 0-1 in a pack, run-b's loose
    src, dst = (("step_00000003.safetensors",) * 2 if where == "loose"
                else ("pack_00000000_00000002.safetensors", "pack_00000000_00000001.safetensors"))
    shutil.copy(tmp_path / "x" / src, folder / dst)  # another fit's file, the same settings and step numbers
    message = r"holds step \d of another recording \(run run-x; this store records run run-b.*copied into its folder"
    for use in (lambda f: f.read(3 if where == "loose" else 1), lambda f: f.scan()):
        with pytest.raises(StoreError, match=message):
            use(StepFolder(folder, HASH, mine))
    written(tmp_path / "a2", [2], RunIds("run-a"))
    shutil.copy(tmp_path / "a2" / "step_00000002.safetensors", folder)  # run-a's step 2: after the share
    with pytest.raises(StoreError, match=r"holds step 2 of another recording \(run run-a"):
        StepFolder(folder, HASH, mine).read(2)
    assert StepFolder(folder, HASH).read(2)  # a store of an earlier version, without run ids: not checked


@pytest.mark.parametrize("damage", ["truncated", "other settings", "step not in the pack"])
def test_a_damaged_pack_is_refused(pack_every_3: None, tmp_path: Path, damage: str) -> None:
    written(tmp_path / "steps", [0, 1, 2])
    pack = tmp_path / "steps" / "pack_00000000_00000002.safetensors"
    if damage == "truncated":
        pack.write_bytes(pack.read_bytes()[:-50])
        message = r"pack_00000000_00000002\.safetensors is corrupt or truncated"
    elif damage == "other settings":
        with pytest.raises(StoreError, match=r"written with settings settings-a, but the manifest says settings-b"):
            StepFolder(tmp_path / "steps", "settings-b").read(1)
        return
    else:
        pack.rename(tmp_path / "steps" / "pack_00000000_00000003.safetensors")
        with pytest.raises(StoreError, match=r"does not hold step 3 \(it holds steps \[0, 1, 2\]\.\.\.\)"):
            StepFolder(tmp_path / "steps", HASH).read(3)
        return
    with pytest.raises(StoreError, match=message):
        StepFolder(tmp_path / "steps", HASH).scan()
    with pytest.raises(StoreError, match=message):
        StepFolder(tmp_path / "steps", HASH).read(1)


def test_a_failed_pack_write_keeps_every_loose_step(
    pack_every_3: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = files._write_all

    def full_disk(filename: str, buffers: list) -> None:
        if ".pack_" in filename:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(filename, buffers)

    monkeypatch.setattr(files, "_write_all", full_disk)
    with pytest.raises(StoreError, match=r"pack_00000000_00000002\.safetensors: the disk is full\. Every step "
                                         r"written before is kept in .*steps"):
        written(tmp_path / "steps", [0, 1, 2])
    assert names(tmp_path / "steps") == [f"step_0000000{s}.safetensors" for s in range(3)]
    assert_reads(StepFolder(tmp_path / "steps", HASH), [0, 1, 2])


@pytest.mark.parametrize("kernel", ["refuses", "absent"])
def test_a_pack_is_copied_through_memory_where_the_kernel_cannot_copy(
    pack_every_3: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kernel: str
) -> None:
    """Across file systems ``copy_file_range`` fails with EXDEV; macOS and Windows have none."""
    calls = []

    def unsupported(*args: int) -> int:
        calls.append(args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    if kernel == "absent":
        monkeypatch.delattr(files.os, "copy_file_range")
    else:
        monkeypatch.setattr(files.os, "copy_file_range", unsupported)
    files_ = written(tmp_path / "steps", [0, 1, 2, 3])
    assert len(calls) == (3 if kernel == "refuses" else 0)
    assert names(tmp_path / "steps")[0] == "pack_00000000_00000002.safetensors"
    assert_reads(files_, [0, 1, 2, 3])


def test_a_fit_with_packed_steps_scores_like_one_with_loose_steps(
    mlp_cls: type, make_loader: Callable[..., DataLoader], fit: Callable, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path, test_batch: dict
) -> None:
    scores = {}
    for pack_steps in (256, 3):
        monkeypatch.setattr(step_files, "PACK_STEPS", pack_steps)
        model, dve = mlp_cls(), DataValueEmbedding(tmp_path / str(pack_steps), projection_dim=32)
        fit(model, dve, make_loader(), max_epochs=2)
        loaded = DataValueEmbeddings.load(tmp_path / str(pack_steps))
        scores[pack_steps] = loaded.influence(model, test_batch, per_step=True).scores
    assert len(names(tmp_path / "3" / "steps")) == 4 and len(names(tmp_path / "256" / "steps")) == 8
    assert torch.equal(scores[3], scores[256])
    (tmp_path / "3" / "steps" / "pack_00000003_00000005.safetensors").unlink()
    with pytest.raises(StoreError, match=r"missing the steps file\(s\) of 3 step\(s\), first of steps \[3, 4, 5\]"):
        DataValueEmbeddings.load(tmp_path / "3")


def test_a_resume_at_the_last_step_of_a_pack_keeps_the_pack(pack_every_3: None, tmp_path: Path) -> None:
    """A checkpoint after a pack's last step: the pack holds only kept steps, so it stays as it is (not rewritten
    over itself, nor deleted)."""
    files = written(tmp_path / "steps", list(range(8)))
    assert [e.step for e in files.scan(after=5, drop=True)] == list(range(6))
    assert names(tmp_path / "steps") == ["pack_00000000_00000002.safetensors", "pack_00000003_00000005.safetensors"]
    assert_reads(StepFolder(tmp_path / "steps", HASH), list(range(6)))


def test_packed_steps_keep_their_applied_learning_rates(pack_every_3: None, tmp_path: Path) -> None:
    """A step's param-group learning rates (``applied_lrs``, written where they differ from the recursion's rates)
    are listed from a pack as from a loose file, e.g. when an interrupted run is opened or resumed."""
    folder = tmp_path / "steps"
    folder.mkdir()
    files = StepFolder(folder, HASH)
    for step in range(4):
        tensors = step_tensors(step)
        if step % 2:
            tensors["applied_lrs"] = torch.tensor([0.5 + step, 0.25], dtype=torch.float64)
        files.write(step, 0, tensors)
    assert names(folder)[0] == "pack_00000000_00000002.safetensors"
    expected = [[0.5 + s, 0.25] if s % 2 else [0.1 * s, 0.2] for s in range(4)]
    assert [e.applied_lrs for e in StepFolder(folder, HASH).scan()] == expected


def test_a_resumed_run_packs_by_the_bytes_of_the_loose_steps_it_continues(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The byte bound of a pack counts the loose steps a resumed run finds on disk, not only those it writes."""
    monkeypatch.setattr(step_files, "PACK_BYTES", 1400)  # the step files are 472-536 bytes
    written(tmp_path / "steps", [0, 1])
    files = StepFolder(tmp_path / "steps", HASH)  # a new process continues the run
    files.scan(after=1, drop=True)
    files.write(2, 0, step_tensors(2))
    assert names(tmp_path / "steps") == ["pack_00000000_00000002.safetensors"]


def test_a_pack_rewritten_under_the_same_name_is_read_anew(pack_every_3: None, tmp_path: Path) -> None:
    """A pack read, then dropped by a resume and recorded again with other data under its name: reads give the
    new data, not the deleted file's (kept open for the next read)."""
    files = written(tmp_path / "steps", list(range(6)))
    assert torch.equal(files.read(4)["lrs"], step_tensors(4)["lrs"])
    assert files.scan(after=-1, drop=True) == []
    for step in range(6):
        files.write(step, 0, {**step_tensors(step), "lrs": torch.tensor([-1.0, float(step)], dtype=torch.float64)})
    assert names(tmp_path / "steps")[-1] == "pack_00000003_00000005.safetensors"
    assert files.read(4)["lrs"].tolist() == [-1.0, 4.0]


def test_a_pack_spans_the_steps_a_grad_scaler_skipped(pack_every_3: None, tmp_path: Path) -> None:
    """Skipped steps inside a pack: its name gives the range from its first to its last recorded step."""
    files = written(tmp_path / "steps", [0, 2, 5, 6])
    assert names(tmp_path / "steps") == ["pack_00000000_00000005.safetensors", "step_00000006.safetensors"]
    assert_reads(StepFolder(tmp_path / "steps", HASH), [0, 2, 5, 6])
    assert files.missing([0, 2, 5, 6, 7]) == [7]


@pytest.mark.parametrize("damage", ["truncated", "extended", "another step", "other settings"])
def test_a_damaged_loose_step_is_not_packed(pack_every_3: None, tmp_path: Path, damage: str) -> None:
    """Packing copies bytes without decoding them, but checks each loose file as a read would: one whose size does
    not match its header, copied over another step's name, or of another run is refused (every loose file kept)
    instead of being packed into a corrupt pack, or as this run's step."""
    folder = tmp_path / "steps"
    files = written(folder, [0, 1])
    path = folder / "step_00000001.safetensors"
    if damage in ("truncated", "extended"):  # e.g. a power loss after the rename, before the data reached the disk
        data = path.read_bytes()
        path.write_bytes(data[:-10] if damage == "truncated" else data + bytes(10))
        message = r"step_00000001\.safetensors is missing, corrupt or truncated"
    elif damage == "another step":
        shutil.copy(folder / "step_00000000.safetensors", path)
        message = r"step_00000001\.safetensors holds step 0's data, not step 1's"
    else:
        (tmp_path / "other").mkdir()
        StepFolder(tmp_path / "other", "settings-b").write(1, 0, step_tensors(1))
        shutil.copy(tmp_path / "other" / "step_00000001.safetensors", path)
        message = r"written with settings settings-b, but the manifest says settings-a"
    with pytest.raises(StoreError, match=message):
        files.write(2, 0, step_tensors(2))
    assert names(folder) == [f"step_0000000{s}.safetensors" for s in range(3)]


def test_a_pack_is_whole_when_the_kernel_copies_a_file_in_several_calls(
    pack_every_3: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``copy_file_range`` may copy less than asked (large files, some file systems): the rest is copied after."""
    real = files.os.copy_file_range

    def short(src: int, dst: int, count: int, offset_src: int, offset_dst: int) -> int:
        return real(src, dst, min(count, 100), offset_src, offset_dst)

    monkeypatch.setattr(files.os, "copy_file_range", short)
    files_ = written(tmp_path / "steps", [0, 1, 2, 3])
    assert names(tmp_path / "steps")[0] == "pack_00000000_00000002.safetensors"
    assert_reads(files_, [0, 1, 2, 3])


def flip_data_byte(path: Path, step: int | None = None, tensor: str = "grad/net.0") -> None:
    """Change one byte of a gradient's data (of ``step``'s tensor in a pack) in place: the header stays valid."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    header = files.safetensors_header(path)[0]
    name = tensor if step is None else f"{step:08d}/{tensor}"
    raw[start + header[name]["data_offsets"][0] + 1] ^= 0x40
    path.write_bytes(bytes(raw))


def test_a_changed_data_byte_is_refused_by_its_checksum_loose_packed_and_rewritten(pack_every_3: None,
                                                                                    tmp_path: Path) -> None:
    """Oracle: safetensors itself reads the damaged files as other numbers without complaint. A loose step, a
    step inside a pack (the other steps of that pack still read bitwise), and a pack rewritten by a resume inside
    it are each refused with a message naming the file; a resume does not launder a damaged step into a
    rewritten pack with a fresh checksum."""
    folder = tmp_path / "steps"
    written(folder, [0, 1, 2, 3, 4])  # pack 0-2, loose 3 and 4
    loose, pack = folder / "step_00000004.safetensors", folder / "pack_00000000_00000002.safetensors"
    flip_data_byte(loose)
    flip_data_byte(pack, step=1)
    from safetensors.torch import load_file

    assert not torch.equal(load_file(str(loose))["grad/net.0"], step_tensors(4)["grad/net.0"])
    assert not torch.equal(load_file(str(pack))["00000001/grad/net.0"], step_tensors(1)["grad/net.0"])
    reader = StepFolder(folder, HASH)
    for step, path in ((4, loose), (1, pack)):
        with pytest.raises(StoreError, match=rf"{path.name} is corrupt: its tensor entries and data bytes have "
                                             r"CRC32 \w+, not the \w+ written with them \(damaged on disk or in a "
                                             r"copy\)"):
            reader.read(step)
    for step in (0, 2, 3):
        assert torch.equal(reader.read(step)["grad/net.0"], step_tensors(step)["grad/net.0"])
    with pytest.raises(StoreError, match=r"pack_00000000_00000002\.safetensors is corrupt: its tensor entries"):
        StepFolder(folder, HASH).scan(after=1, drop=True)  # a resume keeping step 1: refused, the pack kept
    assert names(folder) == ["pack_00000000_00000002.safetensors"]  # the later steps, which it redoes, deleted
    pristine = tmp_path / "pristine"
    written(pristine, [0, 1, 2])
    StepFolder(pristine, HASH).scan(after=1, drop=True)  # rewritten as the pack of steps 0-1
    rewritten = pristine / "pack_00000000_00000001.safetensors"
    assert_reads(StepFolder(pristine, HASH), [0, 1])
    flip_data_byte(rewritten, step=0, tensor="weights")
    with pytest.raises(StoreError, match=r"pack_00000000_00000001\.safetensors is corrupt: its tensor entries"):
        StepFolder(pristine, HASH).read(0)
    assert torch.equal(StepFolder(pristine, HASH).read(1)["weights"], step_tensors(1)["weights"])


def test_packs_and_files_written_without_checksums_are_still_read(pack_every_3: None, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Stores written before the checksums (no ``crc32`` / ``crc32s`` metadata: safetensors' own writer) read as
    before, and a resume inside such a pack rewrites it with checksums."""
    from safetensors.torch import save_file

    monkeypatch.setattr(files, "write_safetensors",
                        lambda tensors, name, metadata: save_file({k: v.contiguous() for k, v in tensors.items()},
                                                                  name, metadata=metadata))
    folder = tmp_path / "steps"
    written(folder, [0, 1, 2, 3])
    monkeypatch.undo()
    pack = folder / "pack_00000000_00000002.safetensors"
    assert files.safetensors_header(pack)[0]["__metadata__"]["crc32s"] == ",,"
    assert_reads(StepFolder(folder, HASH), [0, 1, 2, 3])
    StepFolder(folder, HASH).scan(after=1, drop=True)
    flip_data_byte(folder / "pack_00000000_00000001.safetensors", step=1)
    with pytest.raises(StoreError, match=r"pack_00000000_00000001\.safetensors is corrupt: its tensor entries"):
        StepFolder(folder, HASH).read(1)


@pytest.mark.parametrize("where", ["loose", "pack"])
def test_a_renamed_tensor_entry_is_refused_by_the_checksum(pack_every_3: None, tmp_path: Path, where: str) -> None:
    """A header byte that renames an optional tensor (``scale/net.0``, which a reader takes with ``.get``) keeps a
    valid safetensors file whose data bytes are untouched: the step read silently without its row scales (scores
    off by up to 55 % after a resume, found by a helper). The CRC32 covers the tensor entries too."""
    folder = tmp_path / "steps"
    written(folder, [0, 1, 2, 3])
    path = folder / ("step_00000003.safetensors" if where == "loose" else "pack_00000000_00000002.safetensors")
    raw = path.read_bytes()
    name = b"scale/net.0" if where == "loose" else b"00000001/scale/net.0"
    assert raw.count(name) == 1
    path.write_bytes(raw.replace(name, name.replace(b"scale", b"scald")))
    from safetensors.torch import load_file

    assert any("scald" in key for key in load_file(str(path)))  # a valid file: safetensors reads it
    with pytest.raises(StoreError, match=rf"{path.name} is corrupt: its tensor entries and data bytes"):
        StepFolder(folder, HASH).read(3 if where == "loose" else 1)

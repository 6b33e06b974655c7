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
from lightning_dve.step_files import StepFolder

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


def written(folder: Path, steps: list[int]) -> StepFolder:
    folder.mkdir(parents=True, exist_ok=True)
    files = StepFolder(folder, HASH)
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

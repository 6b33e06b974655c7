"""One recording per save_dir: a fit into a folder another process records into is refused, and nothing there
changes; the lock ends with the fit (teardown, an exception) or its process, and forked workers do not keep it."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_dve import DataValueEmbedding, StoreError
from lightning_dve.errors import RemoteRankError
from lightning_dve.folder_lock import LOCK_FILE, FolderLock
from lightning_dve.store import TrajectoryStore
from tests.helpers import PeerFailed, can_lock_elsewhere

def files_of(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != LOCK_FILE}


@pytest.mark.slow
def test_a_fit_into_a_folder_another_process_records_into_is_refused_and_changes_nothing(
    mlp_cls: type, make_loader: Callable[..., DataLoader], fit: Callable, save_dir: Path,
    holder: Callable[[Path], subprocess.Popen]
) -> None:
    fit(mlp_cls(), DataValueEmbedding(save_dir, projection_dim=16), make_loader(n=32), max_epochs=1)
    before = files_of(save_dir)
    other = holder(save_dir)  # e.g. a parallel sweep agent with the same save_dir
    with pytest.raises(StoreError, match=rf"{save_dir} is being recorded by another fit \(process {other.pid} on "
                                         r".*\): two fits in one save_dir would mix their steps\. Give each fit its "
                                         r"own save_dir"):
        fit(mlp_cls(), DataValueEmbedding(save_dir, projection_dim=16, overwrite=True), make_loader(n=32),
            max_epochs=1)
    assert files_of(save_dir) == before
    other.communicate(timeout=60)  # that process ends: its lock with it
    fit(mlp_cls(), DataValueEmbedding(save_dir, projection_dim=16, overwrite=True), make_loader(n=32), max_epochs=1)
    assert can_lock_elsewhere(save_dir)


def test_the_lock_ends_with_a_failed_fit(mlp_cls: type, make_loader: Callable[..., DataLoader], fit: Callable,
                                         save_dir: Path) -> None:
    class Fails(mlp_cls):  # type: ignore[misc, valid-type]
        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            if self.global_step == 1:
                raise RuntimeError("user error at step 1")
            return super().training_step(batch, batch_idx)

    with pytest.raises(RuntimeError, match="user error at step 1"):
        fit(Fails(), DataValueEmbedding(save_dir, projection_dim=16), make_loader(n=32), max_epochs=1)
    assert can_lock_elsewhere(save_dir)


class OtherRankFails(PeerFailed):
    """Rank 0's view of a 2-rank run whose rank 1 fails at the ``at``-th agreement (``distributed.Communicator``)."""

    rank = 0

    def __init__(self, error: str, at: int) -> None:
        super().__init__(error)
        self.left = at

    def any(self, flag: bool) -> bool:
        self.left -= 1
        return flag or self.left == 0

    def all_gather_rows(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return super().all_gather_rows(tensor)[::-1]


@pytest.mark.parametrize("resume", [False, True])
def test_the_lock_ends_when_another_rank_fails_to_open_its_store(tmp_path: Path, resume: bool) -> None:
    """Rank 0 opened (and locked) its store, rank 1 failed (its shard missing on resume, where every rank opens its
    store in the first round; or unwritable in a fresh fit, where the other ranks open theirs in the second): rank
    0's lock was held until its process ended (before session 40), refusing a next fit of a notebook into save_dir."""
    from lightning_dve.callback_store import open_rank_store

    manifest = {"settings_hash": "h", "layers": [], "world_size": 2, "rank": 0, "precision": "32-true",
                "sample_ids": "index"}
    if resume:
        TrajectoryStore.create(tmp_path, manifest, overwrite=False).unlock()
    state = {"settings_hash": "h", "world_size": 2, "last_step": -1} if resume else None
    with pytest.raises(RemoteRankError, match=r"another rank failed in DataValueEmbedding \(rank 1: StoreError: no "):
        open_rank_store(OtherRankFails("StoreError: no shard", at=1 if resume else 2), tmp_path, manifest, state,
                        overwrite=False)
    assert can_lock_elsewhere(tmp_path)


class RankOne:
    """Rank 1's view of a 2-rank run where no rank fails, rank 0 holding ``text`` in a gather."""

    rank, world_size = 1, 2

    def __init__(self, text: str) -> None:
        self.text = text

    def any(self, flag: bool) -> bool:
        return flag

    def all_gather_rows(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [torch.tensor(list(self.text.encode()), dtype=torch.uint8).reshape(1, -1), tensor]


def test_a_ddp_shard_of_another_recording_is_refused_on_resume(tmp_path: Path) -> None:
    """Each rank's shard drew its own run id, and only rank 0's was checked against the checkpoint: rank 1's shard
    of another recording with the same settings (another machine's, on a multi-node resume) was continued
    silently, its steps mixed into the trajectory (a session-40 audit: embeddings off by 4e-3 against a largest
    value of 1.1e-2). Every rank's store now holds rank 0's run id, and a resume checks each against the
    checkpoint's; a shard of an earlier version (without ``shared_run_id``) is not checked, as before."""
    from lightning_dve.callback_store import open_rank_store, resume_store

    manifest = {"settings_hash": "h", "layers": [], "world_size": 2, "rank": 1, "precision": "32-true",
                "sample_ids": "index"}
    for root, run in ((tmp_path / "a", "run-a"), (tmp_path / "x", "run-x")):
        open_rank_store(RankOne(run), root, manifest, None, overwrite=False).unlock()
    shard = tmp_path / "a" / "shards" / "rank_1"
    assert json.loads((shard / "manifest.json").read_text())["run_id"] == "run-a"
    state = {"settings_hash": "h", "world_size": 2, "last_step": -1, "run_id": "run-a"}
    resume_store(shard, state, manifest).unlock()
    shutil.rmtree(shard)
    shutil.copytree(tmp_path / "x" / "shards" / "rank_1", shard)  # another recording's shard, the same settings
    with pytest.raises(StoreError, match=r"shards/rank_1 holds another recording than the checkpoint's \(store "
                                         r"run run-x, checkpoint run run-a after step -1\)"):
        resume_store(shard, state, manifest)
    old = json.loads((shard / "manifest.json").read_text())
    del old["shared_run_id"]
    (shard / "manifest.json").write_text(json.dumps(old))
    resume_store(shard, state, manifest).unlock()


def test_a_forked_child_does_not_keep_the_lock(tmp_path: Path) -> None:
    """A DataLoader worker is forked while its fit holds the lock; once the fit releases it, another process can
    record there even while the worker lives (the ``flock`` is unlocked explicitly: closing the descriptor alone
    would leave it with the worker's copy)."""
    lock = FolderLock(tmp_path)
    worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    worker.start()
    try:
        assert not can_lock_elsewhere(tmp_path)
        lock.release()
        assert worker.is_alive() and can_lock_elsewhere(tmp_path)
    finally:
        worker.terminate()
        worker.join()


def test_a_second_lock_in_the_process_released_keeps_the_first(tmp_path: Path) -> None:
    """Closing any descriptor of the lock file drops every lock the process holds on it: a second ``FolderLock``
    of the same folder (a separately loaded handle's ``replay_embeddings`` while the fit still records), released,
    let another process lock the folder the fit was recording into. The locks now share one descriptor."""
    first = FolderLock(tmp_path)
    second = FolderLock(tmp_path / "." / "")
    second.release()
    assert first.held and not can_lock_elsewhere(tmp_path)
    first.release()
    assert can_lock_elsewhere(tmp_path)
    FolderLock(tmp_path).release()  # taken afresh once every lock of the folder is gone
    assert can_lock_elsewhere(tmp_path)


def test_the_process_opening_and_closing_the_lock_file_keeps_the_lock(tmp_path: Path) -> None:
    """A copy of the folder, or an artifact of it, opens and closes ``.lock`` in the fit's process: a POSIX
    ``lockf`` (before session 30) was dropped by that close, and another process's fit recorded over the first."""
    import shutil

    lock = FolderLock(tmp_path / "dve")
    (tmp_path / "dve" / LOCK_FILE).open().close()
    shutil.copytree(tmp_path / "dve", tmp_path / "backup")
    assert lock.held and not can_lock_elsewhere(tmp_path / "dve")
    lock.release()
    assert can_lock_elsewhere(tmp_path / "dve")


def test_a_forked_child_that_releases_its_copy_leaves_the_parent_locked(tmp_path: Path) -> None:
    """``os.fork()`` copies the lock's registry: a child ending normally runs its finalizer, whose explicit unlock
    (session 30's flock) unlocked the parent's recording too."""
    import os

    lock = FolderLock(tmp_path)
    child = os.fork()
    if child == 0:  # the child: release its copy, then leave without the parent's test machinery
        lock.release()
        os._exit(0)
    os.waitpid(child, 0)
    assert lock.held and not can_lock_elsewhere(tmp_path)
    lock.release()
    assert can_lock_elsewhere(tmp_path)

"""The embeddings on disk, one memory-mapped array per layer (``lightning_dve/embedding_arrays.py``): rows written in
any order read back exactly, queries streamed in chunks score like one-shot ones, and damaged, unfinished or
unwritable arrays are refused with a ``StoreError`` that says what is wrong and what to do.

Damage covered elsewhere: a missing index or sample ids and a truncated layer file (test_store.py), embeddings of
other settings (test_store.py), a missing layer file, other shapes and dtypes, and an index of other steps
(test_queries.py).
"""

from __future__ import annotations

import errno
import os
import random
import re
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import lightning_dve.embedding_arrays
import lightning_dve.influence
from lightning_dve import DataValueEmbedding, DataValueEmbeddings, StoreError
from lightning_dve.embedding_arrays import EmbeddingArrays
from lightning_dve.folder_lock import LOCK_FILE
from lightning_dve.store import StepRecord, TrajectoryStore
from tests.conftest import DigitsDict, TinyMLP, run_fit
from tests.test_store import SMALL, files_of

LAYERS = {"a": 3, "b": 5}  # k_l of each layer, in manifest order (layer_000.npy, layer_001.npy)
ROWS = [3, 0, 4, 1, 2]  # occurrences of each step (steps 2, 5, 8, ...)
MANIFEST = {**SMALL, "layers": [{"name": name, "projection": {"out": {"projected_dim": 1}, "in": {"projected_dim": k}}}
                                for name, k in LAYERS.items()]}


def recording(root: Path, rows=ROWS, rank: int = 0) -> TrajectoryStore:
    """A finished recording of steps ``2, 5, 8, ...`` with ``rows`` occurrences each, without embeddings (a DDP
    shard of ``rank`` > 0 goes under ``root/shards/rank_N``)."""
    store = TrajectoryStore.create(root, {**MANIFEST, "rank": rank}, overwrite=False)
    for i, n in enumerate(rows):
        store.append(StepRecord(2 + 3 * i, torch.arange(n), torch.ones(n, dtype=torch.float64),
                                torch.full((len(LAYERS),), 0.1, dtype=torch.float64),
                                {name: torch.zeros(n, k) for name, k in LAYERS.items()}))
    store.finish_recording({})
    return store


def oracle(store: TrajectoryStore, dtype: torch.dtype, seed: int = 0) -> dict:
    """``{step: (sample ids [B], {layer: [B, k_l]})}``: distinct ids in no order, random values of ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(sum(store.manifest["rows"]) * 7, generator=gen)[:sum(store.manifest["rows"])]
    return {step: (step_ids, {name: torch.randn(len(step_ids), k, generator=gen, dtype=torch.float64).to(dtype)
                              for name, k in LAYERS.items()})
            for step, step_ids in zip(store.steps, ids.split(store.manifest["rows"]))}


def embed(store: TrajectoryStore, data: dict, dtype: torch.dtype, finish: bool = True) -> None:
    """Write ``data`` as the recursion does: steps in shuffled order from 4 threads; every other step in two writes
    (a DDP rank's own layer with the ids, then another rank's, merged on rank 0 without them)."""
    store.begin_embeddings(LAYERS, dtype)
    order = list(enumerate(data))
    random.Random(0).shuffle(order)

    def write(item):
        i, step = item
        ids, embeddings = data[step]
        if i % 2:
            store.write_embeddings(step, {"a": embeddings["a"]}, ids)
            store.write_embeddings(step, {"b": embeddings["b"]}, None)
        else:
            store.write_embeddings(step, embeddings, ids)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(write, order))
    if finish:
        store.finish_embeddings()


def embedded(root: Path, rows=ROWS, dtype=torch.float32) -> tuple[dict, EmbeddingArrays]:
    """A recording with its embeddings written (``oracle``), and the arrays of the store opened afresh."""
    store = recording(root, rows)
    data = oracle(store, dtype)
    embed(store, data, dtype)
    return data, TrajectoryStore.open(root).embedding_arrays()


# --- round trip --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_rows_written_in_any_order_from_several_threads_read_back_exactly(tmp_path, dtype):
    data, arrays = embedded(tmp_path / "dve", dtype=dtype)
    steps = list(data)
    for lo in range(len(steps) + 1):
        for hi in range(lo + 1, len(steps) + 1):
            ids, embeddings = arrays.rows(lo, hi)
            assert torch.equal(ids, torch.cat([data[s][0] for s in steps[lo:hi]]))
            for name in LAYERS:
                assert embeddings[name].dtype == dtype
                assert torch.equal(embeddings[name], torch.cat([data[s][1][name] for s in steps[lo:hi]]))
            assert arrays.row_steps(lo, hi).tolist() == [s for s in steps[lo:hi] for _ in data[s][0]]
    for step in steps:
        ids, embeddings = TrajectoryStore.open(tmp_path / "dve").embedding_arrays().step(step)
        assert torch.equal(ids, data[step][0]) and all(torch.equal(embeddings[n], data[step][1][n]) for n in LAYERS)
    with pytest.raises(StoreError, match=r"hold no step 3: they were computed for another trajectory"):
        arrays.step(3)


@pytest.mark.parametrize("system", ["no posix_fallocate", "fallocate not supported", "fallocate invalid"])
def test_arrays_without_fallocate_are_grown_and_read_back_exactly(tmp_path, monkeypatch, system):
    """macOS has no ``posix_fallocate``, and some file systems refuse it (``EOPNOTSUPP``, or ``EINVAL`` as on
    some network and FUSE file systems): the arrays are then grown to their size (a full disk fails at the first
    write instead) and read back the same."""
    if system == "no posix_fallocate":
        monkeypatch.delattr(lightning_dve.embedding_arrays.os, "posix_fallocate", raising=False)
    else:
        code = errno.EOPNOTSUPP if system == "fallocate not supported" else errno.EINVAL

        def refused(*args):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(lightning_dve.embedding_arrays.os, "posix_fallocate", refused)
    data, arrays = embedded(tmp_path / "dve")
    ids, embeddings = arrays.rows(0, len(data))
    assert torch.equal(ids, torch.cat([d[0] for d in data.values()]))
    assert all(torch.equal(embeddings[n], torch.cat([d[1][n] for d in data.values()])) for n in LAYERS)


def test_rows_written_a_few_bytes_at_a_time_read_back_exactly(tmp_path, monkeypatch):
    """``pwrite`` may write less than asked (a signal, a pipe-like or network file system): the rest is written
    after it, at the right offset."""
    real = os.pwrite
    monkeypatch.setattr(lightning_dve.embedding_arrays.os, "pwrite",
                        lambda fd, data, offset: real(fd, data[:5], offset))
    data, arrays = embedded(tmp_path / "dve", dtype=torch.float64)
    ids, embeddings = arrays.rows(0, len(data))
    assert torch.equal(ids, torch.cat([d[0] for d in data.values()]))
    assert all(torch.equal(embeddings[n], torch.cat([d[1][n] for d in data.values()])) for n in LAYERS)


def test_a_pwrite_that_writes_nothing_fails_instead_of_looping(tmp_path, monkeypatch):
    store = recording(tmp_path / "dve")
    store.begin_embeddings(LAYERS, torch.float32)
    calls = []

    def nothing(fd, data, offset):
        calls.append(offset)
        if len(calls) > 100:  # looping: stop the test instead of hanging
            raise RuntimeError("pwrite called again and again")
        return 0

    monkeypatch.setattr(lightning_dve.embedding_arrays.os, "pwrite", nothing)
    with pytest.raises(StoreError, match=r"layer_000\.npy.*pwrite wrote nothing"):
        store.write_embeddings(2, oracle(store, torch.float32)[2][1], torch.arange(3))


@pytest.mark.parametrize("max_rows", [1, 2, 4, 5, 7, 100])
def test_chunks_are_contiguous_ranges_of_whole_steps_of_at_most_max_rows(tmp_path, max_rows):
    rows = [3, 0, 4, 1, 0, 0, 6, 2]
    _, arrays = embedded(tmp_path / "dve", rows)
    for lo in range(len(rows) + 1):
        for hi in range(lo, len(rows) + 1):
            ranges = list(arrays.chunks(lo, hi, max_rows))
            assert [i for a, b in ranges for i in range(a, b)] == list(range(lo, hi))  # in order, each step once
            for a, b in ranges:
                assert a < b and (sum(rows[a:b]) <= max_rows or b == a + 1)  # one step may be larger
                assert b == hi or sum(rows[a:b + 1]) > max_rows  # as long as allowed: few reads


@pytest.mark.parametrize("rows", [[], [0, 0, 0]], ids=["no steps", "steps without rows"])
def test_a_trajectory_without_rows_reads_back_empty(tmp_path, rows):
    _, arrays = embedded(tmp_path / "dve", rows)
    ids, embeddings = arrays.rows(0, len(rows))
    assert ids.shape == (0,) and {n: e.shape for n, e in embeddings.items()} == {n: (0, k) for n, k in LAYERS.items()}
    assert list(arrays.chunks(0, len(rows), 1)) == ([(0, len(rows))] if rows else [])
    for step in arrays.steps:
        assert arrays.step(step)[0].shape == (0,)


def test_row_steps_of_no_steps_is_empty(tmp_path):
    _, arrays = embedded(tmp_path / "dve")
    assert arrays.row_steps(2, 2).tolist() == []


# --- queries stream the arrays -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
    """3 segments over 8 steps of 16, 16, 16 and 12 occurrences: ``(root, trained model)``."""
    root = tmp_path_factory.mktemp("segmented") / "dve"
    model = TinyMLP()
    run_fit(model, DataValueEmbedding(root, projection_dim=32, report=None, segments=3),
            DataLoader(DigitsDict(range(60)), batch_size=16), max_epochs=2)
    return root, model


@pytest.mark.parametrize("store", ["one segment", "three segments"])
def test_a_query_streamed_in_chunks_scores_like_one_read(trained, segmented, test_batch, monkeypatch, store):
    """Oracle: the same query reading every segment at once. Chunks of 1 row (one step each), of 24 (one step of
    16, not two), of 40 (two steps) and the default give the same columns, each chunk read at most CHUNK_BYTES
    or one step."""
    root, model = (trained.root, trained.model) if store == "one segment" else segmented
    embeddings = DataValueEmbeddings.load(root)
    rows = embeddings.store.manifest["rows"]
    row_bytes = embeddings.store.embedding_arrays().row_bytes
    assert row_bytes == 4 * sum(embeddings.store.layer_widths.values())  # float32 rows of every layer

    def query(chunk_rows):
        monkeypatch.setattr(lightning_dve.influence, "CHUNK_BYTES", chunk_rows * row_bytes + row_bytes - 1)
        reads.clear()
        return [embeddings.influence(model, test_batch, per_step=per_step) for per_step in (True, False)]

    real_rows = EmbeddingArrays.rows
    reads = []
    monkeypatch.setattr(EmbeddingArrays, "rows", lambda self, lo, hi: reads.append((lo, hi)) or real_rows(self, lo, hi))
    expected = query(10**9)
    assert expected[0].steps.tolist() == [s for s, n in zip(embeddings.steps, rows) for _ in range(n)]
    assert expected[0].scores.abs().max() > 0
    for chunk_rows in (1, 24, 40, lightning_dve.influence.CHUNK_BYTES // row_bytes):
        results = query(chunk_rows)
        assert all(sum(rows[lo:hi]) <= chunk_rows or hi == lo + 1 for lo, hi in reads)
        for result, reference in zip(results, expected):
            assert torch.equal(result.sample_ids, reference.sample_ids) and torch.equal(result.steps, reference.steps)
            torch.testing.assert_close(result.scores, reference.scores, rtol=1e-6, atol=0)
    assert max(hi - lo for lo, hi in reads) > 1  # the default reads several steps at once


@pytest.mark.parametrize("per_step", [True, False])
def test_a_query_holds_one_chunk_of_embeddings_at_a_time(trained, test_batch, monkeypatch, per_step):
    """A query's memory is one chunk of embeddings (CHUNK_BYTES) and its result: each chunk is released before the
    next is read (a chunk kept until the next one's read doubled the peak: 128 MB for 64 MiB chunks)."""
    embeddings = DataValueEmbeddings.load(trained.root)
    monkeypatch.setattr(lightning_dve.influence, "CHUNK_BYTES", 1)  # one step per chunk
    real_rows, live, reads = EmbeddingArrays.rows, [], []

    def rows(self: EmbeddingArrays, lo: int, hi: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        reads.append([ref() is not None for ref in live])
        ids, chunk = real_rows(self, lo, hi)
        live[:] = [weakref.ref(tensor) for tensor in chunk.values()]
        return ids, chunk

    monkeypatch.setattr(EmbeddingArrays, "rows", rows)
    embeddings.influence(trained.model, test_batch, per_step=per_step)
    assert len(reads) == len(embeddings.steps) == 8
    assert not any(any(alive) for alive in reads)


@pytest.mark.parametrize("store", ["one segment", "three segments"])
def test_the_embedding_matrix_scores_like_a_query(trained, segmented, test_batch, store):
    """Oracle: ``score(g, per_step=True)``, which carries ``g`` back to each segment, against ``g`` times the
    matrix's final-model embeddings (with segments: the stored segment-local rows carried forward through the
    later segments' factors). float32 rows: the two orders of the products agree to round-off."""
    root, model = (trained.root, trained.model) if store == "one segment" else segmented
    embeddings = DataValueEmbeddings.load(root)
    test = embeddings.test_gradients(model, test_batch)
    expected = embeddings.score(test, per_step=True)
    matrix = embeddings.embedding_matrix()
    assert torch.equal(matrix.sample_ids, expected.sample_ids) and torch.equal(matrix.steps, expected.steps)
    got = sum(test[name] @ e.T for name, e in matrix.embeddings.items())
    torch.testing.assert_close(got, expected.scores, rtol=1e-4, atol=1e-6 * float(expected.scores.abs().max()))
    stored = embeddings.store.embedding_arrays().rows(0, len(embeddings.steps))[1]
    changed = any(not torch.equal(stored[name], matrix.embeddings[name]) for name in stored)
    assert changed == (store == "three segments")  # only later segments' factors change the stored rows


# --- damaged arrays ----------------------------------------------------------------------------------------


class Unpickled:
    """Unpickling it creates ``marker``: a pickled array read by mistake leaves a trace."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[12:30] = b"x" * 18  # inside the header's dict
    path.write_bytes(bytes(data))


def swap_layers(path: Path) -> None:
    other = path.with_name("layer_001.npy")
    tmp = path.with_name("swap")
    path.rename(tmp)
    other.rename(path)
    tmp.rename(other)


def as_npz(path: Path) -> None:
    with path.open("wb") as handle:
        np.savez(handle, rows=np.zeros((10, 3), np.float32))


@pytest.mark.parametrize("damage, message", [
    (swap_layers, r"layer_000\.npy is \(10, 5\) float32, not \(10, 3\)"),
    (garble_header, r"layer_000\.npy is truncated or corrupt \(Header does not contain the correct keys"),
    (lambda path: np.save(path, np.array([Unpickled(path.with_name("unpickled"))] * 30, dtype=object)
                          .reshape(10, 3), allow_pickle=True), r"layer_000\.npy is truncated or corrupt"),
    (as_npz, r"layer_000\.npy is truncated or corrupt"),
], ids=["layers swapped", "garbled header", "pickled objects", "npz archive"])
def test_a_damaged_layer_file_is_refused_and_nothing_is_unpickled(tmp_path, damage, message):
    root = tmp_path / "dve"
    embedded(root)
    damage(root / "embeddings" / "layer_000.npy")
    with pytest.raises(StoreError, match=rf"embeddings file .*{message}.*record the run again, or restore the "
                                         r"folder .*embeddings from a backup"):
        TrajectoryStore.open(root).embedding_arrays()
    assert not (root / "embeddings" / "unpickled").exists()


def test_layer_files_of_two_dtypes_are_refused(tmp_path):
    """One layer file replaced by a float64 copy of the right shape (from a float64 recording, say): the layers
    would be scored at two precisions."""
    root = tmp_path / "dve"
    embedded(root)
    path = root / "embeddings" / "layer_000.npy"
    np.save(path, np.load(path).astype(np.float64))
    with pytest.raises(StoreError, match=r"embeddings in .*embeddings mix dtypes .*'a': 'float64', 'b': 'float32'.*"
                                         r"record the run again"):
        TrajectoryStore.open(root).embedding_arrays()


def test_every_file_of_the_embeddings_reads_without_pickle(trained):
    folder = trained.root / "embeddings"
    assert sorted(p.name for p in folder.iterdir()) == ["index.safetensors", "layer_000.npy", "layer_001.npy",
                                                        "sample_ids.npy"]
    total = load_file(folder / "index.safetensors")["offsets"][-1].item()
    shapes = {p.name: np.load(p, allow_pickle=False).shape for p in folder.glob("*.npy")}
    assert shapes == {"layer_000.npy": (total, 64), "layer_001.npy": (total, 64), "sample_ids.npy": (total,)}


# --- writing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [
    (4, 3),
    (1, 9),  # as many bytes as 3 x 3
], ids=["rows of another step", "rows of another width"])
def test_rows_of_the_wrong_count_for_a_step_are_refused(tmp_path, shape):
    store = recording(tmp_path / "dve")  # step 2 has 3 occurrences
    store.begin_embeddings(LAYERS, torch.float32)
    with pytest.raises(StoreError, match=rf"step 2's rows for layer_000\.npy are {re.escape(str(shape))}, not "
                                         r"\(3, 3\) \(the occurrences the store recorded at that step.*Record the "
                                         "run again"):
        store.write_embeddings(2, {"a": torch.ones(shape)}, torch.arange(3))


@pytest.mark.parametrize("gap", ["a step", "a layer of every step", "the sample ids of every step"])
def test_finishing_before_every_step_and_layer_is_written_is_refused(tmp_path, gap):
    """A step never written, one layer never written at any step (a DDP rank's layers that never arrived: zeros
    would be read as embeddings), or the sample ids never written (every row would read as sample 0)."""
    store = recording(tmp_path / "dve")
    data = oracle(store, torch.float32)
    if gap == "a step":
        del data[8]
        embed(store, data, torch.float32, finish=False)
    else:
        store.begin_embeddings(LAYERS, torch.float32)
        for step, (ids, embeddings) in data.items():
            if gap == "a layer of every step":
                store.write_embeddings(step, {"a": embeddings["a"]}, ids)
            else:
                store.write_embeddings(step, embeddings, None)
    first = {"a step": "step 8, a", "a layer of every step": r"step \d+, b",
             "the sample ids of every step": r"step \d+, sample_ids\.npy"}[gap]
    with pytest.raises(StoreError, match=rf"\d+ rows of steps and layers were never written \(first: {first}\); the "
                                         r"recursion stopped early\. Record the run again"):
        store.finish_embeddings()
    assert not (tmp_path / "dve" / "embeddings").exists()


def test_an_interrupted_recursion_leaves_only_a_partial_folder_that_the_next_one_replaces(tmp_path):
    root = tmp_path / "dve"
    store = recording(root)
    embed(store, dict(list(oracle(store, torch.float32).items())[:2]), torch.float32, finish=False)  # killed here
    assert not (root / "embeddings").exists() and any((root / "embeddings.partial").iterdir())
    with pytest.raises(StoreError, match=r"embeddings=None, expected 'complete'\. The backward recursion did not "
                                         r"finish\. If that fit is still running, wait.*if it was interrupted, "
                                         r"resume it"):
        DataValueEmbeddings.load(root)
    with pytest.raises(StoreError, match=r"embeddings/index\.safetensors is missing.*record the run again"):
        TrajectoryStore.open(root).embedding_arrays()

    again = TrajectoryStore.open(root)
    data = oracle(again, torch.float64, seed=1)
    again.begin_embeddings({"a": 3}, torch.float64)  # one layer this time: nothing of the first attempt may stay
    for step, (ids, embeddings) in data.items():
        again.write_embeddings(step, {"a": embeddings["a"]}, ids)
    again.finish_embeddings()
    assert sorted(files_of(root / "embeddings")) == ["index.safetensors", "layer_000.npy", "sample_ids.npy"]
    assert not (root / "embeddings.partial").exists()
    ids, embeddings = TrajectoryStore.open(root).embedding_arrays(["a"]).rows(0, len(data))
    assert torch.equal(ids, torch.cat([d[0] for d in data.values()]))
    assert torch.equal(embeddings["a"], torch.cat([d[1]["a"] for d in data.values()]))


@pytest.mark.parametrize("call", ["posix_fallocate", "pwrite"], ids=["at creation", "during a write"])
def test_a_full_disk_fails_the_fit_and_leaves_no_embeddings_to_read(fit, mlp_cls, save_dir, monkeypatch, call):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lightning_dve.embedding_arrays.os, call, full)
    with pytest.raises(StoreError, match=r"embeddings\.partial/layer_000\.npy: the disk is full\. Every recorded "
                                         r"step is kept; the unfinished embeddings in .*embeddings\.partial are "
                                         r"deleted \(resuming the fit from its last checkpoint computes them "
                                         r"again\); free space"):
        fit(mlp_cls(), DataValueEmbedding(save_dir, projection_dim=16, report=None))
    monkeypatch.undo()
    assert not (save_dir / "embeddings").exists()  # nothing renamed into place
    assert not (save_dir / "embeddings.partial").exists()  # deleted: its reserved space is free again
    if Path("/proc/self/fd").is_dir():  # and no descriptor keeps a deleted file's space
        assert not [p for p in Path("/proc/self/fd").iterdir() if str(save_dir) in os.path.realpath(p)]
    with pytest.raises(StoreError, match=r"expected 'complete'\. The backward recursion did not finish"):
        DataValueEmbeddings.load(save_dir)
    with pytest.raises(StoreError, match=r"embeddings/index\.safetensors is missing"):
        TrajectoryStore.open(save_dir).embedding_arrays()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files in /proc")
def test_arrays_the_disk_cannot_hold_leave_no_file_open(tmp_path, monkeypatch):
    """The reserved space of the arrays created before the full one is freed once the folder is removed: no file
    descriptor keeps it."""
    store = recording(tmp_path / "dve")
    real, calls = os.posix_fallocate, []

    def full_at_the_second(fd, offset, size):
        calls.append(size)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, offset, size)

    monkeypatch.setattr(lightning_dve.embedding_arrays.os, "posix_fallocate", full_at_the_second)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(StoreError, match=r"layer_001\.npy: the disk is full"):
        store.begin_embeddings(LAYERS, torch.float32)
    assert len(os.listdir("/proc/self/fd")) == before


def _open_files(root: Path) -> list[str]:
    """Files under ``root`` this process holds open, but the lock its recording holds until teardown."""
    paths = (os.path.realpath(p) for p in Path("/proc/self/fd").iterdir())
    return [p for p in paths if str(root) in p and not p.endswith(f"/{LOCK_FILE}")]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files in /proc")
@pytest.mark.parametrize("attempts", [1, 2], ids=["finished", "begun again after an abandoned attempt"])
def test_finished_embeddings_leave_no_file_open(tmp_path, attempts):
    """A recursion begun again in the same process (the first attempt abandoned) and a finished one keep no
    descriptor of the arrays: none holds the space of a deleted or replaced file."""
    root = tmp_path / "dve"
    store = recording(root)
    for _ in range(attempts - 1):
        store.begin_embeddings(LAYERS, torch.float32)
    embed(store, oracle(store, torch.float32), torch.float32)
    assert _open_files(root) == []


@pytest.mark.parametrize("handle", ["same store", "store opened afresh"])
def test_embeddings_computed_again_replace_the_earlier_ones(tmp_path, handle):
    """A second recursion over finished embeddings replaces them, also through a store whose arrays were read
    before, and whether it ran through that store or another handle: every store reads the new rows, never the
    old ones."""
    root = tmp_path / "dve"
    store = recording(root)
    embed(store, oracle(store, torch.float32), torch.float32)
    store.embedding_arrays()  # read (opened) before the second recursion
    again = store if handle == "same store" else TrajectoryStore.open(root)
    new = oracle(again, torch.float64, seed=1)
    embed(again, new, torch.float64)
    for reader in (store, again, TrajectoryStore.open(root)):
        ids, embeddings = reader.embedding_arrays().rows(0, len(new))
        assert torch.equal(ids, torch.cat([d[0] for d in new.values()]))
        assert all(torch.equal(embeddings[n], torch.cat([d[1][n] for d in new.values()])) for n in LAYERS)


@pytest.mark.parametrize("state", ["finished", "unfinished"])
def test_deleted_embeddings_are_gone_from_disk_and_from_an_open_store(tmp_path, state):
    """``delete_embeddings`` (a resume, an overwrite) leaves neither the folder nor an unfinished ``.partial``
    one, and a store whose arrays were open reads them no more."""
    root = tmp_path / "dve"
    store = recording(root)
    embed(store, oracle(store, torch.float32), torch.float32, finish=state == "finished")
    if state == "finished":
        store.embedding_arrays()
    else:
        store = TrajectoryStore.open(root)  # the process that wrote them died
    store.delete_embeddings()
    assert not (root / "embeddings").exists() and not (root / "embeddings.partial").exists()
    with pytest.raises(StoreError, match=r"embeddings/index\.safetensors is missing"):
        store.embedding_arrays()


def test_a_store_of_some_layers_names_each_file_by_the_layers_manifest_position(tmp_path):
    """A DDP rank holds only its own layers (here the second): its file is the one that layer has in every
    store, ``layer_001.npy``, and reads back."""
    root = tmp_path / "dve"
    store = recording(root)
    data = oracle(store, torch.float32)
    store.begin_embeddings({"b": LAYERS["b"]}, torch.float32)
    for step, (ids, embeddings) in data.items():
        store.write_embeddings(step, {"b": embeddings["b"]}, ids)
    store.finish_embeddings()
    assert sorted(files_of(root / "embeddings")) == ["index.safetensors", "layer_001.npy", "sample_ids.npy"]
    ids, embeddings = TrajectoryStore.open(root).embedding_arrays(["b"]).rows(0, len(data))
    assert torch.equal(embeddings["b"], torch.cat([d[1]["b"] for d in data.values()]))


def test_arrays_opened_for_some_layers_open_the_others_when_asked(tmp_path):
    data, _ = embedded(tmp_path / "dve")
    store = TrajectoryStore.open(tmp_path / "dve")
    assert list(store.embedding_arrays(["b"]).arrays) == ["b"]
    ids, embeddings = store.embedding_arrays().rows(0, len(data))
    assert all(torch.equal(embeddings[n], torch.cat([d[1][n] for d in data.values()])) for n in LAYERS)


def test_a_failed_rename_at_finish_is_refused_and_discarded_cleanly(tmp_path, monkeypatch):
    """The folder cannot be renamed into place: the error names it, and discarding the attempt afterwards (as the
    recursion does) closes nothing twice and leaves no embeddings."""
    root = tmp_path / "dve"
    store = recording(root)
    embed(store, oracle(store, torch.float32), torch.float32, finish=False)

    def refused(*args):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(lightning_dve.embedding_arrays.os, "replace", refused)
    with pytest.raises(StoreError, match=r"could not write .*embeddings: the write failed.*Permission denied"):
        store.finish_embeddings()
    monkeypatch.undo()
    store.discard_embeddings()
    assert not (root / "embeddings").exists() and not (root / "embeddings.partial").exists()


def test_a_rank_that_sees_rank_zeros_folder_writes_its_own_layers_into_rank_zeros_arrays(tmp_path):
    """DDP on one machine (or a shared file system): rank 1's shard joins the arrays rank 0 is writing, through the
    token rank 0 left in the unfinished folder, and writes its own layer's rows there; rank 0 finishes them with
    that layer written elsewhere, and the token is gone. Another token (a stale folder on another machine's disk),
    another width, or a shard that left rows unwritten are refused; a joined writer discarded leaves rank 0's
    folder in place."""
    root = tmp_path / "dve"
    store = recording(root)
    shard = recording(root / "shards" / "rank_1", rank=1)
    data = oracle(store, torch.float64)
    with pytest.raises(StoreError, match=r"cannot join the embeddings being written in .*embeddings\.partial"):
        shard.begin_embeddings({"b": LAYERS["b"]}, torch.float64, 12345)  # rank 0 has not begun: no folder
    token = 12345
    store.begin_embeddings(LAYERS, torch.float64, token)
    with pytest.raises(StoreError, match=r"embeddings\.partial \(.*holds another writer's token\)"):
        shard.begin_embeddings({"b": LAYERS["b"]}, torch.float64, token + 1)
    with pytest.raises(StoreError, match=r"found \(10, 5\) float64, not \(10, 4\) float64"):
        shard.begin_embeddings({"b": 4}, torch.float64, token)
    shard.begin_embeddings({"b": LAYERS["b"]}, torch.float64, token)
    shard.write_embeddings(2, {"b": data[2][1]["b"]}, data[2][0])
    with pytest.raises(StoreError, match=r"4 rows of steps and layers were never written \(first: step 5, b\)"):
        shard.finish_embeddings()
    shard.discard_embeddings()
    assert (root / "embeddings.partial" / "layer_001.npy").is_file()
    shard.begin_embeddings({"b": LAYERS["b"]}, torch.float64, token)
    for step, (ids, embeddings) in data.items():
        store.write_embeddings(step, {"a": embeddings["a"]}, ids)
        shard.write_embeddings(step, {"b": embeddings["b"]}, ids)  # (the ids are rank 0's to write)
    shard.finish_embeddings()
    with pytest.raises(StoreError, match=r"5 rows of steps and layers were never written \(first: step 2, b\)"):
        store.finish_embeddings()
    store.finish_embeddings(elsewhere=["b"])
    assert sorted(files_of(root / "embeddings")) == ["index.safetensors", "layer_000.npy", "layer_001.npy",
                                                     "sample_ids.npy"]
    ids, embeddings = TrajectoryStore.open(root).embedding_arrays().rows(0, len(data))
    assert torch.equal(ids, torch.cat([d[0] for d in data.values()]))
    assert all(torch.equal(embeddings[n], torch.cat([d[1][n] for d in data.values()])) for n in LAYERS)

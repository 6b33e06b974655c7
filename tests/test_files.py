"""``files.py``: the safetensors writer against ``safetensors`` itself, short writes, many buffers, failures."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lightning_dve.files
from lightning_dve import StoreError

def mixed_tensors() -> dict[str, torch.Tensor]:
    """Every dtype the writer handles itself, equal element sizes of two dtypes, empty, 0-dim and strided tensors."""
    gen = torch.Generator().manual_seed(0)
    return {"b": torch.randn(3, 4, generator=gen), "a": torch.randn(2, dtype=torch.float64, generator=gen),
            "ids": torch.arange(5), "i32": torch.arange(3, dtype=torch.int32), "h": torch.randn(2, 2).half(),
            "bf": torch.randn(3, generator=gen).bfloat16(), "i16": torch.arange(2, dtype=torch.int16),
            "i8": torch.arange(2, dtype=torch.int8), "u8": torch.arange(2, dtype=torch.uint8),
            "flag": torch.tensor([True, False]), "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5),
            "strided": torch.randn(4, 3, generator=gen).T}


def header_and_data(path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def test_writer_bytes_equal_safetensors_save_file(tmp_path):
    """The same file as ``save_file`` given the same metadata plus the CRC32, which ours adds: the same data
    section and parsed header (``save_file`` orders the metadata keys at random, a hash map; with one key the
    files are the same bytes). The CRC32 is zlib's of the tensor entries (sorted ``[name, dtype, shape, start,
    end]`` as compact JSON) followed by the data section."""
    tensors = mixed_tensors()
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    save_file(contiguous, tmp_path / "plain", metadata={"step": "3"})
    header, data = header_and_data(tmp_path / "plain")
    entries = sorted([name, e["dtype"], e["shape"], *e["data_offsets"]] for name, e in header.items()
                     if name != "__metadata__")
    crc = f"{zlib.crc32(json.dumps(entries, separators=(',', ':')).encode() + data):08x}"
    save_file(contiguous, tmp_path / "reference", metadata={"crc32": crc})
    lightning_dve.files.write_safetensors(tensors, str(tmp_path / "ours"), {})
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "reference").read_bytes()
    metadata = {"step": "3", "epoch": "1", "settings_hash": "abc"}
    save_file(contiguous, tmp_path / "reference3", metadata={**metadata, "crc32": crc})
    lightning_dve.files.write_safetensors(tensors, str(tmp_path / "ours3"), metadata)
    assert header_and_data(tmp_path / "ours3") == header_and_data(tmp_path / "reference3")
    back = load_file(tmp_path / "ours3")
    assert set(back) == set(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    with safe_open(str(tmp_path / "ours3"), framework="pt") as handle:
        assert handle.metadata() == {**metadata, "crc32": crc}


def test_writer_takes_more_tensors_than_one_writev_does(tmp_path, monkeypatch):
    monkeypatch.setattr(lightning_dve.files, "_IOV_MAX", 16)
    tensors = {f"t{i:04d}": torch.full((i % 3 + 1,), float(i)) for i in range(100)}
    lightning_dve.files.write_safetensors(tensors, str(tmp_path / "f"), {})
    back = load_file(tmp_path / "f")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_writer_refuses_a_writev_that_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "writev", lambda fd, buffers: 0)
    with pytest.raises(StoreError, match="writev wrote nothing"):
        lightning_dve.files.write_atomic(tmp_path / "f.safetensors", {"x": torch.ones(3)}, {})
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def interrupted(fd, buffers):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "writev", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lightning_dve.files.write_atomic(tmp_path / "f.safetensors", {"x": torch.ones(3)}, {})
    assert list(tmp_path.iterdir()) == []


def test_writer_falls_back_to_save_file_for_other_dtypes(tmp_path):
    tensors = {"c": torch.randn(2, dtype=torch.complex64), "x": torch.ones(2)}
    lightning_dve.files.write_safetensors(tensors, str(tmp_path / "f"), {"k": "v"})
    back = load_file(tmp_path / "f")
    assert torch.equal(back["c"], tensors["c"]) and torch.equal(back["x"], tensors["x"])


def test_writer_finishes_short_writes(tmp_path, monkeypatch):
    """``writev`` may write fewer bytes than asked (signals, pipes, some file systems): the rest is written."""
    real = os.writev

    def at_most_seven_bytes(fd, buffers):
        first = bytes(buffers[0])[:7]
        return real(fd, [first])

    monkeypatch.setattr(os, "writev", at_most_seven_bytes)
    tensors = mixed_tensors()
    lightning_dve.files.write_safetensors(tensors, str(tmp_path / "f"), {})
    back = load_file(tmp_path / "f")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_writer_disk_full_raises_a_store_error_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    real = os.writev
    calls = []

    def full_after_the_header(fd, buffers):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, buffers[:1])

    monkeypatch.setattr(os, "writev", full_after_the_header)
    with pytest.raises(StoreError, match=r"could not write .*f\.safetensors: the disk is full"):
        lightning_dve.files.write_atomic(tmp_path / "f.safetensors", {"x": torch.ones(1000)}, {})
    assert list(tmp_path.iterdir()) == []


# --- manifests that are valid JSON but no object; what a failed write says is kept --------------------------


@pytest.mark.parametrize("text", ["null", "[]", "[1, 2]", "3", '"manifest"'])
def test_read_json_refuses_valid_json_that_is_not_an_object(tmp_path, text):
    path = tmp_path / "manifest.json"
    path.write_text(text)
    with pytest.raises(StoreError, match=r"manifest\.json holds a JSON \w+, not a JSON object.*Restore the file, or "
                                         r"record the run again"):
        lightning_dve.files.read_json(path)


@pytest.mark.parametrize("sub, name, kept", [
    ("steps", "step_00000003.safetensors", r"Every step written before is kept in .*steps;"),
    ("embeddings", "step_00000003.safetensors", r"step_00000003\.safetensors is unchanged .* files in .*embeddings;"),
    ("", "segments.safetensors", r"segments\.safetensors is unchanged \(its previous version, if any, is kept\)"),
    ("checkpoints", "state_00000004.safetensors", r"state_00000004\.safetensors is unchanged .*checkpoints;"),
    ("", "manifest.json", r"manifest\.json is unchanged \(its previous version, if any, is kept\)"),
])
def test_a_failed_write_says_what_is_kept_for_each_kind_of_file(tmp_path, monkeypatch, sub, name, kept):
    def full(tensors, filename, metadata):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lightning_dve.files, "write_safetensors", full)
    monkeypatch.setattr(lightning_dve.files.Path, "write_text", lambda self, text, **kwargs: full(None, self, None))
    (tmp_path / sub).mkdir(exist_ok=True)
    path = tmp_path / sub / name
    with pytest.raises(StoreError, match=rf"could not write .*{name}: the disk is full\. {kept}.* free space") as info:
        if name.endswith(".json"):
            lightning_dve.files.write_text_atomic(path, "{}")
        else:
            lightning_dve.files.write_atomic(path, {"x": torch.ones(2)}, {})
    assert sub == "steps" or "Every step" not in str(info.value)


@pytest.mark.parametrize("writer", ["ours", "save_file"])
def test_reader_returns_what_safetensors_returns(tmp_path, writer):
    """``read_checked`` (one read, one ``safetensors.torch.load``) against ``load_file``: every dtype, empty and
    0-dim tensors; the tensors are writable and independent of each other and of the file's bytes."""
    path, tensors = tmp_path / "x.safetensors", mixed_tensors()
    if writer == "ours":
        lightning_dve.files.write_safetensors(tensors, str(path), {"settings_hash": "h", "step": "3"})
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"settings_hash": "h", "step": "3"})
    got = lightning_dve.files.read_checked(path, "h", step=3)
    expected = load_file(str(path))
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    got["b"].add_(1.0)
    assert torch.equal(got["a"], expected["a"]) and torch.equal(got["b"], expected["b"] + 1.0)


def test_a_small_tensor_kept_from_a_read_does_not_keep_the_file_in_memory(tmp_path):
    """Callers keep a step's sample ids and weights (the replay caches them for every step): they must not hold
    the step file's buffer, or a replay keeps the whole gradient store in memory."""
    import tracemalloc

    path = tmp_path / "x.safetensors"
    lightning_dve.files.write_safetensors({"ids": torch.arange(4), "grads": torch.randn(4, 2**18)}, str(path),
                                          {"settings_hash": "h"})
    tracemalloc.start()
    try:
        kept = [lightning_dve.files.read_checked(path, "h")["ids"] for _ in range(3)]
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(kept) == 3 and held < 2**20  # each file holds 4 MiB of gradients


def test_reader_refuses_every_truncation_and_what_safetensors_refuses(tmp_path):
    """Every prefix of a file is refused with a ``StoreError``; a changed header byte gives a ``StoreError``
    exactly where ``safetensors`` refuses the bytes too, and otherwise the tensors ``safetensors`` reads from them
    (a changed name or metadata byte is a valid file; a changed settings hash or checksum is refused), never
    another exception."""
    path, probe = tmp_path / "x.safetensors", tmp_path / "probe.safetensors"
    lightning_dve.files.write_safetensors(mixed_tensors(), str(path), {"settings_hash": "h"})
    raw = path.read_bytes()
    for n in range(len(raw)):
        probe.write_bytes(raw[:n])
        with pytest.raises(StoreError, match="corrupt or truncated"):
            lightning_dve.files.read_checked(probe, "h")
    header_end = 8 + int.from_bytes(raw[:8], "little")
    gen = torch.Generator().manual_seed(0)
    refused = 0
    for position, value in torch.randint(0, 256, (600, 2), generator=gen).tolist():
        changed = bytearray(raw)
        changed[position * header_end // 256] = value
        probe.write_bytes(bytes(changed))
        try:
            expected = load_file(str(probe))
        except Exception:  # noqa: BLE001 - safetensors refuses the bytes: so must we
            refused += 1
            with pytest.raises(StoreError, match="corrupt or truncated"):
                lightning_dve.files.read_checked(probe, "h")
            continue
        try:
            got = lightning_dve.files.read_checked(probe, "h")
        except StoreError as err:  # the metadata changed: the settings check or the checksum refuses it
            assert "written with settings" in str(err) or "and data bytes have CRC32" in str(err)
            continue
        assert set(got) == set(expected) and all(torch.equal(got[k], v) for k, v in expected.items())
    assert refused > 100


@pytest.mark.parametrize("looks", [0, 1, 2])
def test_disk_bytes_counts_a_file_renamed_away_meanwhile_as_nothing(tmp_path, monkeypatch, looks):
    """Rank 0 counts ``shards/`` while rank 1 renames its manifest's temporary file into place (a DDP crash seen
    in CI: ``FileNotFoundError`` between a file's listing and its size). Here the temporary file is listed but
    gone after ``looks`` looks at it; the count is the other files' (plus its size if it was still there)."""
    shard = tmp_path / "shards" / "rank_1"
    shard.mkdir(parents=True)
    (shard / "manifest.json").write_bytes(b"x" * 10)
    (shard / ".manifest.json.tmp").write_bytes(b"y" * 7)
    real_stat, seen = os.stat, []

    def stat(path, *args, **kwargs):
        if str(path).endswith(".tmp"):
            seen.append(path)
            if len(seen) > looks:
                raise FileNotFoundError(errno.ENOENT, "renamed away", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    total = lightning_dve.files.disk_bytes([tmp_path / "shards", tmp_path / "missing"])
    assert total in ({10} if looks == 0 else {10, 17}) and seen


#: A second process rewriting ``manifest.json`` as ``write_text_atomic`` does (temporary name, then rename) for 2 s.
REWRITER = """
import os, sys, time
path, tmp = sys.argv[1], os.path.join(os.path.dirname(sys.argv[1]), ".manifest.json.tmp")
end = time.monotonic() + 2.0
while time.monotonic() < end:
    with open(tmp, "w") as out:
        out.write("z" * 100)
    os.replace(tmp, path)
"""


def test_disk_bytes_never_fails_while_another_process_rewrites_a_file(tmp_path):
    """The same race with a real second process (before the fix, about one count in five thousand raised): every
    count succeeds and is the manifest's 100 bytes, or that plus its temporary copy's (0 to 100 bytes)."""
    (tmp_path / "shards").mkdir()
    manifest = tmp_path / "shards" / "manifest.json"
    manifest.write_text("z" * 100)
    writer = subprocess.Popen([sys.executable, "-c", REWRITER, str(manifest)])
    counts = set()
    try:
        while writer.poll() is None:
            counts.add(lightning_dve.files.disk_bytes([tmp_path / "shards"]))
    finally:
        writer.wait()
    assert writer.returncode == 0 and len(counts) > 0 and counts <= set(range(100, 201))


@pytest.mark.parametrize("code, fix", [(errno.ENOSPC, "free space"), (errno.EROFS, "make the folder writable"),
                                       (errno.EACCES, "make the folder writable")])
def test_a_failed_write_names_the_fix_of_its_cause(tmp_path: Path, code: int, fix: str) -> None:
    """A read-only folder was told to free space (before session 30)."""
    from lightning_dve.files import write_error

    message = str(write_error(tmp_path / "manifest.json", OSError(code, os.strerror(code))))
    assert f"; {fix} (or point save_dir elsewhere) and run again." in message

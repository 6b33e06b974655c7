"""The ``steps/`` folder of a store: one file per recorded step, packed into files of consecutive steps.

Each step is first written as its own file (atomically: a temporary name, then rename), so a run that dies keeps
every step it finished. Once :data:`PACK_STEPS` loose steps, or :data:`PACK_BYTES` of them, have accumulated,
they are copied into one pack file (written atomically too) and their loose files deleted: a long run holds one
file per pack instead of one per step (a run of 100k steps: ~400 files instead of 100k inodes). Layout::

    steps/step_00000042.safetensors            one step: StepRecord tensors; metadata step, epoch, settings_hash,
                                               run_id
    steps/pack_00000000_00000255.safetensors   the recorded steps 0..255 (fp16 skipped steps leave gaps): tensors
                                               "00000042/<name>"; metadata steps, epochs, settings_hash, crc32s
                                               (each step's CRC32, :data:`~lightning_dve.files.CRC_KEY`), run_ids

A pack's tensors of one step are contiguous (its loose file's bytes, copied), so the loose file's CRC32 carries
over; a read of a step from a pack checks it (packs written before there were checksums are read unchecked).
Each step carries the run id of the recording that wrote it (:class:`RunIds`), so a step file of another fit
with the same settings, copied into the folder, is refused where it is listed or read.

A run killed between writing a pack and deleting its loose files leaves both; the pack is read (the same bytes)
and the loose copies are deleted at the next write (so is the temporary file of a write that was killed). A
resume deletes the later steps from the last one back, then rewrites a pack it falls inside with the steps it
keeps (new pack first, then the old one deleted; killed in between, the shorter of two packs that start at the
same step is the one kept): killed at any moment, it leaves the steps up to some step, never later steps without
the ones before them.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .errors import StoreError
from .files import (CRCS_KEY, RUN_KEY, RUNS_KEY, check_crc, check_metadata, corrupt_error, entries_text,
                    read_checked_metadata, remove_files, safetensors_header, write_atomic, write_concatenated_atomic,
                    write_groups_atomic)

#: Loose steps packed into one file once this many have accumulated.
PACK_STEPS = 256
#: ... or once their files hold this many bytes (a pack is read back whole into memory when it is written).
PACK_BYTES = 32 * 2**20


@dataclass(frozen=True)
class StepEntry:
    """What a store lists of one recorded step without reading its gradients.

    Attributes:
        step: the optimizer step.
        epoch: its training epoch.
        lrs: the recursion's rate of each tracked layer ``[L]`` (``StepRecord.lrs``).
        applied_lrs: the param-group learning rate of each tracked layer ``[L]``.
        rows: its number of occurrences.
    """

    step: int
    epoch: int
    lrs: list[float]
    applied_lrs: list[float]
    rows: int


@dataclass(frozen=True)
class RunIds:
    """The recordings whose steps a store holds (its manifest's ``run_id`` and ``run_lineage``): its own run's at
    any step, and an earlier branch's (before a resume from an earlier checkpoint) up to the last step the branches
    share. Steps and manifests written before run ids were recorded carry none and are not checked.

    Attributes:
        current: the run id of the recording that writes now.
        shared: ``(run id, last step it shares)`` of each earlier branch.
    """

    current: str | None = None
    shared: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, manifest: dict[str, Any]) -> RunIds:
        """The run ids a store's manifest lists."""
        lineage = manifest.get("run_lineage", [])
        return cls(manifest.get("run_id"), tuple((str(run), int(last)) for run, last in lineage))

    def check(self, path: Path, run: str | None, step: int) -> None:
        """Refuse step ``step`` of the file at ``path``, written by recording ``run``, if this store does not hold it.

        Raises:
            StoreError: naming both runs and what to do.
        """
        if not run or not self.current or run == self.current or step <= dict(self.shared).get(run, -1):
            return
        raise StoreError(f"store file {path} holds step {step} of another recording (run {run}; this store records "
                         f"run {self.current}, and earlier branches {[list(b) for b in self.shared]}): a step file of "
                         "another fit with the same settings was copied into its folder. Put back this run's own "
                         "file, resume from a checkpoint before that step, or record the run again.")


def read_step_header(path: Path) -> tuple[int, list[float], list[float], int, str | None]:
    """The epoch, learning rates ``[L]``, applied learning rates ``[L]`` (``StepRecord.applied_lrs``; the
    rates where none were written), number of occurrences and run id (``None`` in files written before run ids)
    of a step file, read without its gradients.

    Raises:
        StoreError: if the file is corrupt or truncated.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            lrs = handle.get_tensor("lrs").tolist()
            applied = handle.get_tensor("applied_lrs").tolist() if "applied_lrs" in handle.keys() else lrs
            rows = handle.get_slice("sample_ids").get_shape()[0]
            metadata = handle.metadata()
            return int(metadata["epoch"]), lrs, applied, int(rows), metadata.get(RUN_KEY)
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, IndexError) as err:
        raise StoreError(f"store file {path} is corrupt or truncated ({err}). Delete it (and every later step "
                         "file) to keep the steps before it, or record the run again.") from err


def step_name(step: int) -> str:
    """File name of one loose step."""
    return f"step_{step:08d}.safetensors"


def _pack_name(first: int, last: int) -> str:
    return f"pack_{first:08d}_{last:08d}.safetensors"


def _pack_range(path: Path) -> tuple[int, int]:
    _, first, last = path.stem.split("_")
    return int(first), int(last)


@dataclass(frozen=True)
class _OpenPack:
    """A pack opened for reading: its path, safetensors handle, tensor names and checksummed byte range by step."""

    path: Path
    handle: Any
    names: dict[int, list[str]]
    runs: dict[int, str]  # step -> run id ("" or none: written before run ids)
    checked: dict[int, tuple[str, bytes, int, int]]  # step -> CRC32, its entries' text, its tensors' bytes [start, end)


@dataclass(frozen=True)
class _Listing:
    """One listing of the folder, resolved: the loose steps and packs to read, and stale leftovers of a crash."""

    loose: dict[int, Path]
    packs: list[tuple[int, int, Path]]  # (first, last, path), disjoint, in step order
    stale: list[Path]

    def pack_of(self, step: int) -> Path | None:
        """The pack whose range holds ``step`` (a binary search: the recursion asks once per step)."""
        index = bisect.bisect_right(self.packs, step, key=lambda pack: pack[0]) - 1
        return self.packs[index][2] if index >= 0 and step <= self.packs[index][1] else None


class StepFolder:
    """Write, list and read the recorded steps of one store (its ``steps/`` folder)."""

    def __init__(self, folder: Path, settings_hash: str, runs: RunIds = RunIds()) -> None:
        self.folder = folder
        self.settings_hash = settings_hash
        self.runs = runs  # the store's; a resume's new branch replaces it
        self._loose: list[tuple[int, int]] | None = None  # (step, epoch) written since the last pack; None: unlisted
        self._loose_bytes = 0
        self._listing: _Listing | None = None  # for reads (a finished store does not change)
        self._open_pack: _OpenPack | None = None  # the pack read last

    def _list(self) -> _Listing:
        """List the folder once and resolve packs against loose files (module docstring)."""
        loose = {int(p.stem.split("_")[1]): p for p in self.folder.glob("step_*.safetensors")}
        packs: dict[int, tuple[int, Path]] = {}
        stale = list(self.folder.glob(".*.tmp"))  # the temporary file of a write that was killed
        for path in sorted(self.folder.glob("pack_*.safetensors")):
            first, last = _pack_range(path)
            if first in packs:  # a rewrite killed before the old pack was deleted: sorted, the shorter is kept
                stale.append(path)
                continue
            packs[first] = (last, path)
        ranges = sorted((first, last, path) for first, (last, path) in packs.items())
        listing = _Listing(loose, ranges, stale)
        for step in [s for s in loose if listing.pack_of(s) is not None]:
            stale.append(loose.pop(step))  # packed before the run was killed
        return listing

    def listed_steps(self) -> list[int]:
        """The steps the files hold by their names, from one listing of the folder (no file is read)."""
        listing = self._list()
        return sorted({*listing.loose, *(s for first, last, _ in listing.packs for s in range(first, last + 1))})

    def missing(self, steps: Iterable[int]) -> list[int]:
        """The ``steps`` no file holds, from one listing of the folder (no file is read)."""
        listing = self._list()
        return [s for s in steps if s not in listing.loose and listing.pack_of(s) is None]

    def scan(self, after: int | None = None, drop: bool = False) -> list[StepEntry]:
        """The recorded steps in order, from the files' headers (complete by construction: renamed into place).

        Args:
            after: leave out the steps after this one, unread (``None`` lists all).
            drop: delete them (rewriting a pack that holds steps on both sides), and the leftovers of a crash.

        Raises:
            StoreError: if a file is corrupt or truncated.
        """
        listing = self._list()
        if drop:
            remove_files(listing.stale)
        entries = []
        for first, _, path in listing.packs:
            if after is None or first <= after:
                entries += self._pack_entries(path, after)
        for step, path in sorted(listing.loose.items()):
            if after is None or step <= after:
                *header, run = read_step_header(path)
                self.runs.check(path, run, step)
                entries.append(StepEntry(step, *header))
        entries.sort(key=lambda e: e.step)
        if drop and after is not None:
            self._drop_after(listing, after, [e.step for e in entries])
        if drop:  # the folder as the next write finds it
            self._loose = [(e.step, e.epoch) for e in entries if e.step in listing.loose]
            self._loose_bytes = sum(listing.loose[s].stat().st_size for s, _ in self._loose)
        self._listing = self._open_pack = None
        return entries

    def _pack_entries(self, path: Path, after: int | None) -> list[StepEntry]:
        """The entries of a pack's steps up to ``after``, from its header and small tensors."""
        pack = self._open(path)
        handle, names = pack.handle, pack.names
        steps, epochs = (_ints(handle.metadata()[key]) for key in ("steps", "epochs"))
        out = []
        for step, epoch in zip(steps, epochs):
            if after is not None and step > after:
                break
            self.runs.check(path, pack.runs.get(step), step)
            lrs = handle.get_tensor(f"{step:08d}/lrs").tolist()
            key = f"{step:08d}/applied_lrs"
            applied = handle.get_tensor(key).tolist() if key in names[step] else lrs
            rows = handle.get_slice(f"{step:08d}/sample_ids").get_shape()[0]
            out.append(StepEntry(step, epoch, lrs, applied, int(rows)))
        return out

    def write(self, step: int, epoch: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write one step as a loose file, then pack the loose steps once there are enough.

        Raises:
            StoreError: if the disk is full or a write fails (every step written before is kept).
        """
        if self._loose is None:
            self.scan(drop=True)  # the loose steps a resumed run continues (and the leftovers of a crash)
        path = self.folder / step_name(step)
        metadata = {"step": str(step), "epoch": str(epoch), "settings_hash": self.settings_hash}
        write_atomic(path, tensors, {**metadata, RUN_KEY: self.runs.current} if self.runs.current else metadata)
        assert self._loose is not None
        self._loose.append((step, epoch))
        self._loose_bytes += path.stat().st_size
        self._listing = None
        if len(self._loose) >= PACK_STEPS or self._loose_bytes >= PACK_BYTES:
            self.pack()

    def pack(self) -> None:
        """Copy the loose steps into one pack file (their bytes, not decoded), then delete them (module docstring).

        Raises:
            StoreError: if the pack cannot be written; the loose files are kept.
        """
        if not self._loose:
            return
        steps, epochs = zip(*self._loose)
        parts, runs = [], []
        for step in steps:
            path = self.folder / step_name(step)
            header, start = safetensors_header(path)
            metadata = header.get("__metadata__") or {}
            check_metadata(path, metadata, self.settings_hash, step)
            self.runs.check(path, metadata.get(RUN_KEY), step)
            parts.append((f"{step:08d}/", path, header, start))
            runs.append(metadata.get(RUN_KEY, ""))
        write_concatenated_atomic(self.folder / _pack_name(steps[0], steps[-1]), parts,
                                  {"steps": _text(steps), "epochs": _text(epochs), "settings_hash": self.settings_hash,
                                   RUNS_KEY: ",".join(runs)})
        remove_files(self.folder / step_name(step) for step in steps)
        self._loose, self._loose_bytes, self._listing = [], 0, None

    def _drop_after(self, listing: _Listing, after: int, kept: list[int]) -> None:
        """Delete the steps after ``after``, the last first, then rewrite the pack that holds steps on both sides:
        killed at any moment, the folder holds steps ``0..k`` (``k >= after``), never a gap that a checkpoint of
        the earlier branch could resume over."""
        later = [(step, path) for step, path in listing.loose.items() if step > after]
        later += [(first, path) for first, _, path in listing.packs if first > after]
        for _, path in sorted(later, reverse=True):
            path.unlink()
        for first, last, path in listing.packs:
            if first <= after < last:
                self._rewrite_pack(path, [step for step in kept if first <= step <= last])

    def _rewrite_pack(self, path: Path, keep: list[int]) -> None:
        """Replace a pack by one of only its steps ``keep`` (a resume inside it): the new one first."""
        pack = self._open(path)
        epochs = dict(zip(_ints(pack.handle.metadata()["steps"]), _ints(pack.handle.metadata()["epochs"])))
        if keep:
            groups = [(f"{step:08d}/", self._read_packed(path, step)) for step in keep]
            write_groups_atomic(self.folder / _pack_name(keep[0], keep[-1]), groups,
                                {"steps": _text(keep), "epochs": _text(epochs[s] for s in keep),
                                 "settings_hash": self.settings_hash,
                                 RUNS_KEY: ",".join(pack.runs.get(s, "") for s in keep)})
        self._open_pack = None
        path.unlink()

    def read(self, step: int) -> dict[str, torch.Tensor]:
        """The tensors of one step, by name (as :meth:`write` was given them).

        Raises:
            StoreError: if no file holds it, or its file is corrupt, truncated or of another run.
        """
        if self._listing is None:
            self._listing = self._list()
        pack = self._listing.pack_of(step)
        if pack is None:
            tensors, metadata = read_checked_metadata(path := self.folder / step_name(step), self.settings_hash, step)
            self.runs.check(path, metadata.get(RUN_KEY), step)
            return tensors
        return self._read_packed(pack, step)

    def _read_packed(self, path: Path, step: int) -> dict[str, torch.Tensor]:
        """The tensors of one step of the pack at ``path``, its bytes checked against their CRC32 (:meth:`read`)."""
        pack = self._open(path)
        if step not in pack.names:
            raise StoreError(f"store file {path} does not hold step {step} (it holds steps "
                             f"{sorted(pack.names)[:3]}...): the store is damaged. Restore the file, or record the run "
                             "again.")
        self.runs.check(path, pack.runs.get(step), step)
        checked = pack.checked.get(step)
        try:
            tensors = {name.split("/", 1)[1]: pack.handle.get_tensor(name) for name in sorted(pack.names[step])}
            covered = [checked[1], _pread(path, checked[2], checked[3])] if checked else []
        except (SafetensorError, OSError) as err:
            raise corrupt_error(path, err) from err
        if checked:
            check_crc(path, covered, checked[0])
        return tensors

    def _open(self, path: Path) -> _OpenPack:
        """The open pack at ``path`` (kept open for the next read), checked against this store's settings."""
        if self._open_pack is not None and self._open_pack.path == path:
            return self._open_pack
        try:
            handle = safe_open(str(path), framework="pt")
            metadata = handle.metadata() or {}
            names: dict[int, list[str]] = {step: [] for step in _ints(metadata.get("steps", ""))}
            for name in handle.keys():
                names[int(name.split("/", 1)[0])].append(name)
            header, start = safetensors_header(path)
        except (SafetensorError, OSError, ValueError, KeyError) as err:
            raise corrupt_error(path, err) from err
        if metadata.get("settings_hash") != self.settings_hash:
            raise StoreError(f"store file {path} was written with settings {metadata.get('settings_hash')}, but the "
                             f"manifest says {self.settings_hash}: files of two runs are mixed in one directory. Use "
                             "a fresh save_dir for each run (or overwrite=True).")
        runs = dict(zip(_ints(metadata.get("steps", "")), metadata.get(RUNS_KEY, "").split(",")))
        self._open_pack = _OpenPack(path, handle, names, runs, _checked_ranges(header, start, names, metadata))
        return self._open_pack


def _pread(path: Path, start: int, end: int) -> bytes:
    """The bytes ``[start, end)`` of the file at ``path``."""
    with open(path, "rb") as file:
        return os.pread(file.fileno(), end - start, start)


def _checked_ranges(header: dict[str, Any], start: int, names: dict[int, list[str]],
                    metadata: dict[str, str]) -> dict[int, tuple[str, bytes, int, int]]:
    """Each step's CRC32, the text of its tensor entries and the file bytes its tensors span (contiguous:
    :mod:`files` writes a step's tensors together), for the steps of a pack that has checksums."""
    crcs = metadata.get(CRCS_KEY, "").split(",")
    out = {}
    for step, crc in zip(_ints(metadata.get("steps", "")), crcs):
        offsets = [header[name]["data_offsets"] for name in names[step]]
        if crc and offsets:
            first, end = min(o[0] for o in offsets), max(o[1] for o in offsets)
            own = {name: header[name] for name in names[step]}  # not the whole header per step: linear in a pack
            out[step] = (crc, entries_text(own, f"{step:08d}/", first), start + first, start + end)
    return out


def _text(values: Iterable[int]) -> str:
    return ",".join(str(v) for v in values)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]

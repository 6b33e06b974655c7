"""The on-disk trajectory and embeddings: manifest, atomic appends, backward reads, integrity checks.

Layout of a store directory::

    manifest.json                      schema version, settings (+ hash), layers and projections, status
    steps/                             the recorded optimizer steps (:class:`StepRecord`; ``step_files``)
    embeddings/                        one array per layer ``[N, k_l]`` and the sample ids (``embedding_arrays``)

Every file (the embeddings: their folder) is written under a temporary name and renamed, so one that exists is
complete; a run that dies keeps every step it finished. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .embedding_arrays import EmbeddingArrays, EmbeddingWriter, remove_embeddings
from .errors import StoreError
from .files import RUN_KEY, disk_bytes, read_checked, read_json, remove_files, write_atomic, write_text_atomic
from .folder_lock import LOCK_FILE, FolderLock
from .manifest_checks import LAYERS_CHECKSUM, check_manifest, layers_checksum
from .records import StepRecord
from .step_files import RunIds, StepFolder, step_name
from .store_resume import branch_run_id, check_resumable

SCHEMA_VERSION = 2  # 2: embeddings as one array per layer
MANIFEST = "manifest.json"
STEPS = "steps"
EMBEDDINGS = "embeddings"
SHARDS = "shards"
SEGMENTS = "segments.safetensors"
REFERENCES = "references"
CHECKPOINTS = "checkpoints"


class TrajectoryStore:
    """A store directory: create or open it, append steps, read them backwards, hold embeddings."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = Path(root).absolute()  # a handle keeps its store after the working directory changes
        self.manifest = manifest
        self._resume_after: int | None = None  # reopened: drop later steps at the first write (reopen)
        self._replaces = False  # created over an earlier store: clear it at the first write (create)
        self._embedding_writer: EmbeddingWriter | None = None  # between begin_ and finish_embeddings
        self._embedding_arrays: EmbeddingArrays | None = None  # opened by the first embedding_arrays
        self.step_files = StepFolder(self.root / STEPS, manifest["settings_hash"], RunIds.of(manifest))
        self._lock: FolderLock | None = None  # held while recording (create, reopen) until unlock

    @property
    def settings_hash(self) -> str:
        """Hash of the settings that wrote this store."""
        return self.manifest["settings_hash"]

    @property
    def layer_names(self) -> list[str]:
        """Tracked layer names in manifest order."""
        return [layer["name"] for layer in self.manifest["layers"]]

    @property
    def layer_widths(self) -> dict[str, int | None]:
        """Projected width ``k_l = k_out k_in`` of each tracked layer's per-sample block (from the manifest; ``None``
        for an entry without its projection)."""
        return {e["name"]: e["projection"]["out"]["projected_dim"] * e["projection"]["in"]["projected_dim"]
                if "projection" in e else None for e in self.manifest["layers"]}

    @property
    def projected_dim(self) -> int:
        """Projected dimensions of all tracked layers together, ``sum_l k_out k_in`` (from the manifest)."""
        return sum(self.layer_widths.values())

    @classmethod
    def create(cls, root: str | os.PathLike[str], manifest: dict[str, Any], overwrite: bool) -> TrajectoryStore:
        """Start a new store in ``root`` (into an empty one: its manifest is written now). With ``overwrite``, an
        earlier store there is cleared only at the first write (:meth:`truncate_for_resume`, as for :meth:`reopen`),
        so a fit that trains nothing keeps it.

        Raises:
            StoreError: if ``root`` already holds files and ``overwrite`` is False, or it or a parent is a file.
        """
        root = Path(root)
        if blocker := next((p for p in (root, *root.parents) if p.exists() and not p.is_dir()), None):
            raise StoreError(f"save_dir {root} cannot be a folder: {blocker} is a file. Point save_dir to a folder (it "
                             "is made if missing).")
        store = cls(root, {"format": "lightning_dve", "schema_version": SCHEMA_VERSION, "status": "recording",
                           "run_id": uuid.uuid4().hex, "steps": [], "epochs": [], "lrs": [],
                           "applied_lrs": [], "rows": [], **manifest,
                           LAYERS_CHECKSUM: layers_checksum(manifest["layers"])})
        store._replaces = root.exists() and any(p.name != LOCK_FILE for p in root.iterdir())
        if store._replaces and not overwrite:
            raise StoreError(f"save_dir {root} is not empty: each fit records a new run (a second fit of the same "
                             "Trainer too), and recording it there would mix two runs. Pass overwrite=True to replace "
                             "it, choose another save_dir, or continue an interrupted run with trainer.fit(..., "
                             "ckpt_path=<its Lightning checkpoint>).")
        store._lock = FolderLock(root)
        if not store._replaces:
            store.write_manifest()
        return store

    def _clear_replaced(self) -> None:
        """The deferred part of :meth:`create`: delete the earlier store's files in this store's folder, manifest
        first (a run killed meanwhile leaves no store, not a damaged one), then write this store's manifest. Each
        DDP rank clears its own folder; rank 0 also the shard folders of ranks this run does not have."""
        if not self._replaces:
            return
        (self.root / MANIFEST).unlink(missing_ok=True)
        remove_files([self.root / SEGMENTS, *(f for sub in (STEPS, REFERENCES)
                                              for f in (self.root / sub).glob("*.safetensors"))])
        self.delete_embeddings()
        ranks = {f"rank_{r}" for r in range(self.manifest.get("world_size", 1))}
        for shard in (s for s in (self.root / SHARDS).glob("rank_*") if s.name not in ranks):
            shutil.rmtree(shard, ignore_errors=True)
        self._write_manifest()
        self._replaces = False  # done (a failed manifest write is retried by the next write)

    @property
    def replaces_earlier(self) -> bool:
        """Whether this new store will clear an earlier one at its first write (``create`` with ``overwrite``)."""
        return self._replaces

    @classmethod
    def open(cls, root: str | os.PathLike[str], until: int | None = None, scan: bool = True) -> TrajectoryStore:
        """Open an existing store and validate its manifest.

        Args:
            until: of an unfinished recording, list (and read) only the step files up to this step.
            scan: list an unfinished recording's steps from its step files (``False``: as its manifest lists them).

        Raises:
            StoreError: if the manifest is missing, truncated, of another schema, lacks a key or holds one of another
                type (:func:`~lightning_dve.manifest_checks.check_manifest`), or the recording never finished.
        """
        if not (path := Path(root) / MANIFEST).is_file():
            raise StoreError(f"no store at {root}: {MANIFEST} is missing. Point to the save_dir of a finished fit.")
        manifest = read_json(path)
        if manifest.get("schema_version") != SCHEMA_VERSION or manifest.get("format") != "lightning_dve":
            raise StoreError(f"{path} has schema {manifest.get('schema_version')!r} (format "
                             f"{manifest.get('format')!r}); this version reads schema {SCHEMA_VERSION}. Use the "
                             "lightning_dve version that wrote it.")
        check_manifest(path, manifest)
        store = cls(Path(root), manifest)
        if scan and manifest.get("status") == "recording":  # interrupted (or running): list the steps it completed
            store._scan_steps(until)
        return store

    def write_manifest(self) -> None:
        """Write the manifest atomically (after clearing the store it replaces, :meth:`create`).

        Raises:
            StoreError: if the disk is full or the write fails (the previous manifest is kept).
        """
        self._clear_replaced()
        self._write_manifest()

    def _write_manifest(self) -> None:
        """:meth:`write_manifest` with nothing deferred applied first (its folders made if needed)."""
        (self.root / STEPS).mkdir(parents=True, exist_ok=True)
        lines = (f"{json.dumps(k)}: {json.dumps(value, sort_keys=True)}" for k, value in sorted(self.manifest.items()))
        write_text_atomic(self.root / MANIFEST, "{\n  " + ",\n  ".join(lines) + "\n}\n")  # a key a line: C encoder

    def _scan_steps(self, after: int | None = None, drop: bool = False) -> None:
        """Rebuild the step list from the step files (:meth:`StepFolder.scan`: ``after`` and ``drop`` as there)."""
        entries = self.step_files.scan(after, drop)
        self.manifest.update(steps=[e.step for e in entries], epochs=[e.epoch for e in entries],
                             lrs=[e.lrs for e in entries], applied_lrs=[e.applied_lrs for e in entries],
                             rows=[e.rows for e in entries])

    @classmethod
    def reopen(cls, root: str | os.PathLike[str], last_step: int, layers: list[dict[str, Any]] | None = None,
               run_id: str | None = None, recorded_steps: int | None = None) -> TrajectoryStore:
        """Reopen a store to continue recording after ``last_step`` (resume from a checkpoint).

        Steps after ``last_step``, which the resumed run redoes, are deleted, and so are the embeddings, but only
        when the resumed run first writes (:meth:`append` or :meth:`finish_recording`): a resumed fit that trains
        no further (its checkpoint was at the end) leaves the store as it was.

        Args:
            layers: the resuming run's manifest layer entries (names, shapes, projection seeds and checksums).
            run_id: the ``run_id`` of the store the checkpoint was saved with (``None``: not checked); a checkpoint
                of an earlier branch of this store is accepted up to the last step the branches share.
            recorded_steps: how many steps the checkpoint's fit recorded up to ``last_step`` (``None``: not checked).

        Raises:
            StoreError: if the store recorded other ``layers``, is another fit's (``run_id``) or lacks a step up
                to ``last_step``; nothing in it has changed then.
        """
        store = cls.open(root, until=last_step)  # the later step files are deleted unread (a torn one too)
        check_resumable(store, last_step, layers, run_id, recorded_steps)
        store._lock = FolderLock(store.root)
        store._resume_after = last_step
        return store

    def lock(self) -> bool:
        """Take the folder's lock to rewrite a finished store (then :meth:`unlock`); ``False``: held (recording)."""
        taken = self._lock is None or not self._lock.held
        self._lock = FolderLock(self.root) if taken else self._lock
        return taken

    def unlock(self) -> None:
        """End this process's recording into the folder: another fit may record there now."""
        if self._lock is not None:
            self._lock.release()

    def truncate_for_resume(self) -> None:
        """The deferred part of :meth:`reopen` (drop the steps after the checkpoint's and the embeddings) or of
        :meth:`create` (clear the store it replaces): once, at the first write; the callback calls it at the first
        optimizer step, with the replay checkpoints' own."""
        self._clear_replaced()
        if (after := self._resume_after) is None:
            return
        self._scan_steps(after=after, drop=True)
        remove_files(f for f in (self.root / REFERENCES).glob("*.safetensors") if int(f.stem.split("_")[1]) > after)
        self.delete_embeddings()
        if self.manifest.get("run_id") is not None:  # a new branch: every earlier run now shares up to ``after``
            lineage = [*self.manifest.get("run_lineage", []), [self.manifest["run_id"], after]]
            self.manifest.update(run_lineage=[[run, min(k, after)] for run, k in lineage],
                                 run_id=branch_run_id(self.manifest["run_id"], after))
            self.step_files.runs = RunIds.of(self.manifest)
        self.manifest.update(status="recording", embeddings=None)
        self.write_manifest()
        self._resume_after = None  # done (a failed write above is retried by the next write)

    def _metadata(self, step: int) -> dict[str, str]:
        return {"step": str(step), "epoch": "0", "settings_hash": self.settings_hash}

    def append(self, record: StepRecord) -> None:
        """Persist one step (atomically) and list it (step, epoch, learning rates) in the in-memory manifest."""
        self.truncate_for_resume()
        tensors = record.to_tensors(self.manifest.get("storage_dtype", "float32"))
        self.step_files.write(record.step, record.epoch, tensors)
        applied = record.lrs if record.applied_lrs is None else record.applied_lrs
        for key, value in (("steps", record.step), ("epochs", record.epoch), ("lrs", record.lrs.tolist()),
                           ("applied_lrs", applied.tolist()), ("rows", record.sample_ids.numel())):
            self.manifest[key].append(value)

    def finish_recording(self, extra: dict[str, Any]) -> None:
        """Mark the trajectory complete and record ``extra`` (e.g. disk usage) in the manifest."""
        self.truncate_for_resume()
        self.manifest.update(status="complete", **extra)
        self.write_manifest()

    @property
    def steps(self) -> list[int]:
        """Recorded optimizer steps in increasing order."""
        return list(self.manifest["steps"])

    def read_step(self, step: int, epoch: int | None = None) -> StepRecord:
        """Read one recorded step (``epoch``: its epoch if the caller knows it, else looked up)."""
        if epoch is None:
            epoch = dict(zip(self.manifest["steps"], self.manifest["epochs"]))[step]
        return StepRecord.from_tensors(step, epoch, self.step_files.read(step))

    def iter_backward(self, lo: int = 0, hi: int | None = None) -> Iterator[StepRecord]:
        """Yield the recorded steps with index in ``[lo, hi)`` from the last to the first, one file at a time."""
        return (self.read_step(s, e) for s, e in zip(reversed(self.steps[lo:hi]), reversed(self.epochs[lo:hi])))

    @property
    def epochs(self) -> list[int]:
        """Training epoch of each recorded step."""
        return list(self.manifest["epochs"])

    @property
    def learning_rates(self) -> torch.Tensor:
        """The recursion's rate of each tracked layer at each recorded step, ``[T, L]`` (float64; ``StepRecord.lrs``:
        clipping and Adam's bias correction folded in)."""
        return torch.tensor(self.manifest["lrs"], dtype=torch.float64).reshape(len(self.steps), len(self.layer_names))

    @property
    def applied_learning_rates(self) -> torch.Tensor:
        """Each tracked layer's param-group learning rate at each recorded step, ``[T, L]`` (``StepRecord.applied_lrs``,
        or its ``lrs`` where none were given)."""
        applied = torch.tensor(self.manifest["applied_lrs"], dtype=torch.float64)
        return applied.reshape(len(self.steps), len(self.layer_names))

    def begin_embeddings(self, widths: dict[str, int], dtype: torch.dtype, token: int | None = None) -> None:
        """Create the embedding arrays ``{layer: k_l}`` of every step (:class:`EmbeddingWriter`): rank 0 leaves a DDP
        ``token`` in them, another rank's shard joins the arrays holding it (else, or on a full disk, StoreError)."""
        joins = token is not None and self.manifest.get("rank", 0) > 0
        if not joins:
            self.truncate_for_resume()
            self.discard_embeddings()
        layers = {name: (position, widths[name]) for position, name in enumerate(self.layer_names) if name in widths}
        self._embedding_writer = EmbeddingWriter(  # a shard's folder is rank 0's shards/rank_N
            (self.root.parents[1] if joins else self.root) / EMBEDDINGS, self.settings_hash, layers, dtype,
            self.steps, self.manifest["rows"], token if joins else None, self.manifest.get("run_id"))
        if token is not None and not joins:
            self._embedding_writer.share(token)

    def write_embeddings(self, step: int, embeddings: dict[str, torch.Tensor], sample_ids: torch.Tensor | None) -> None:
        """Persist the embeddings ``{layer: [B, k_l]}`` of one step's occurrences (any of the begun layers) and
        their ``sample_ids`` (``None``: written already); safe from several threads."""
        assert self._embedding_writer is not None, "begin_embeddings first"
        self._embedding_writer.write(step, embeddings, sample_ids)

    def finish_embeddings(self, elsewhere: Sequence[str] = ()) -> None:
        """Put the written embeddings in place (every row written, but those of ``elsewhere``: by joined ranks)."""
        if self._embedding_writer is not None:
            self._embedding_writer.finish(elsewhere)
        self._embedding_writer, self._embedding_arrays = None, None

    def discard_embeddings(self) -> None:
        """Close and delete embeddings being written (a failed recursion), and forget any open arrays."""
        if self._embedding_writer is not None:
            self._embedding_writer.discard()
        self._embedding_writer, self._embedding_arrays = None, None

    def delete_embeddings(self) -> None:
        """Delete the embeddings, finished or not."""
        self.discard_embeddings()
        remove_embeddings(self.root / EMBEDDINGS)

    def embedding_arrays(self, layers: Sequence[str] | None = None) -> EmbeddingArrays:
        """The finished embeddings, memory-mapped and checked against the manifest.

        Args:
            layers: the layers they must hold; default every tracked layer on rank 0 (merged there), a DDP
                rank's ``owned_layers`` on the others.

        Raises:
            StoreError: if they are missing, truncated, damaged, of other settings or another trajectory, or lack
                one of ``layers``.
        """
        if layers is None:
            layers = self.layer_names if self.manifest.get("rank", 0) == 0 else self.manifest["owned_layers"]
        if self._embedding_arrays is None or not self._embedding_arrays.serves(layers):
            self._embedding_arrays = EmbeddingArrays(self.root / EMBEDDINGS, self.settings_hash, self.layer_widths,
                                                     list(layers), self.steps, self.manifest["rows"],
                                                     self.manifest.get("run_id"))
        return self._embedding_arrays

    def write_segments(self, bounds: list[tuple[int, int]], factors: list[dict[str, torch.Tensor]]) -> None:
        """Persist the segment factors ``I - M_seg`` (segments 1..K-1; segment 0's is never needed)."""
        self.truncate_for_resume()
        segments = [[self.steps[lo], self.steps[hi - 1]] for lo, hi in bounds if hi > lo]
        tensors = {f"factor/{s}/{g}": f.contiguous() for s, fs in enumerate(factors) if s for g, f in fs.items()}
        if tensors:  # with the bounds they are for: a manifest whose segments were edited is refused (store_checks)
            write_atomic(self.root / SEGMENTS, tensors, {**self._metadata(-1), "segments": json.dumps(segments),
                                                         RUN_KEY: self.manifest.get("run_id") or ""})
        else:  # one segment: an earlier train end's factors (before a resume) would contradict it
            remove_files([self.root / SEGMENTS])
        self.manifest["segments"] = segments

    def read_segments(self) -> list[dict[str, torch.Tensor]]:
        """Segment factors by segment index, ``{group: I - M_seg}`` (segment 0 empty)."""
        segments = self.manifest.get("segments") or [[None, None]]
        factors: list[dict[str, torch.Tensor]] = [{} for _ in segments]
        if len(segments) > 1:
            for key, tensor in read_checked(self.root / SEGMENTS, self.settings_hash,
                                            run_id=self.manifest.get("run_id")).items():
                _, seg, group = key.split("/", 2)
                factors[int(seg)][group] = tensor
        return factors

    def write_reference(self, step: int, gradients: dict[str, torch.Tensor]) -> None:
        """Persist the report's reference gradient ``{layer: [1, k_l]}`` at the weights after ``step``."""
        self.truncate_for_resume()
        (self.root / REFERENCES).mkdir(exist_ok=True)
        write_atomic(self.root / REFERENCES / step_name(step), gradients, self._metadata(step))

    def read_references(self) -> dict[int, dict[str, torch.Tensor]]:
        """Reference gradients saved during training, by the step after which they were taken."""
        paths = sorted((self.root / REFERENCES).glob("step_*.safetensors"))
        return {int(p.stem.split("_")[1]): read_checked(p, self.settings_hash) for p in paths}

    def require(self, status_key: str, value: str, fix: str) -> None:
        """Raise a :class:`StoreError` naming the actual state and ``fix`` unless ``manifest[status_key] == value``."""
        if (actual := self.manifest.get(status_key)) != value:
            raise StoreError(f"store {self.root} has {status_key}={actual!r}, expected {value!r}. {fix}")

    def record_disk_use(self) -> None:
        """Write the manifest with the disk use of every rank's step files (``bytes_steps``, ``bytes_per_step``) and of
        the whole store (``bytes_total``): at train end, and once the embeddings are written (every rank's final)."""
        steps = disk_bytes([self.root / STEPS, *(self.root / SHARDS).glob(f"rank_*/{STEPS}")])
        self.manifest.update(bytes_steps=steps, bytes_per_step=steps // max(1, len(self.steps)))
        rest = disk_bytes([self.root / part for part in (STEPS, EMBEDDINGS, SEGMENTS, REFERENCES, SHARDS, CHECKPOINTS,
                                                         LOCK_FILE)])
        written = None  # the manifest as written included: until its size settles
        while written != (total := rest + disk_bytes([self.root / MANIFEST])):
            self.manifest["bytes_total"] = written = total
            self.write_manifest()

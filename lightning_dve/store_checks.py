"""What :meth:`~lightning_dve.DataValueEmbeddings.load` checks of a store before it opens its embeddings: a
finished recording and recursion, the settings it was recorded with, every step file, and a train end that
finished (the replay and the report come after the embeddings)."""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

from .config import ADDED_FIELDS, DVEConfig
from .errors import DVEError, StoreError
from .files import safetensors_header
from .store import SEGMENTS, STEPS, TrajectoryStore

#: Manifest key, 1 from the finished recording until the train end's replay and report are done, then 0 (one
#: digit either way, so the disk use logged before it changes stays exact; earlier versions' stores have none).
TRAIN_END = "train_end_pending"


def settings_changes(recorded: dict[str, Any], requested: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{setting: (recorded, requested)}`` for each of the ``requested`` settings (``DVEConfig.to_dict``) that differs
    from the ``recorded`` ones; a setting added after a store's version (:data:`ADDED_FIELDS`) that it lacks differs
    only where it is requested off its default."""
    defaults = DVEConfig().to_dict()
    lacked = {k for k in ADDED_FIELDS if k not in recorded and requested.get(k) == defaults[k]}  # as recorded then
    return {k: (recorded.get(k), v) for k, v in requested.items() if k not in lacked and recorded.get(k) != v}


def open_finished(path: str | os.PathLike[str], settings: DVEConfig | None) -> TrajectoryStore:
    """The store in ``path`` with its embeddings checked present and whole; warns if its train end did not finish.

    Raises:
        StoreError: if the store is incomplete, corrupt, or written with other ``settings`` or projection.
    """
    # not read while unfinished: a running fit packs its step files and deletes them as they are read
    store = TrajectoryStore.open(path, scan=False)
    steps = store.steps if store.manifest.get("status") == "complete" else store.step_files.listed_steps()
    resume = (("If that fit is still running, wait for it to return; if it was interrupted, resume it with "
               "trainer.fit(..., ckpt_path=<a Lightning checkpoint of that run>) (its steps on disk are kept), or "
               "record again") if steps else
              ("It holds no step: its fit is at its first step or failed there (overwrite=True cleared any "
               "earlier store in this save_dir at that step); record again"))
    store.require("status", "complete", f"The recording did not finish. {resume}.")
    store.require("embeddings", "complete", f"The backward recursion did not finish. {resume}.")
    check_settings_hash(store)
    check_segments(store)
    settings = None if settings is None else settings.resolved(store.projected_dim)  # "auto" as recorded
    if settings is not None and settings.settings_hash() != store.settings_hash:
        diff = settings_changes(store.manifest["settings"], settings.to_dict())
        raise StoreError(f"store {path} was written with other settings (recorded, requested): {diff}. Use the "
                         "recorded settings, or record a new run with the new ones.")
    missing = store.step_files.missing(store.steps)  # one listing, not T stats
    if missing:
        raise StoreError(f"store {path} is missing the {STEPS} file(s) of {len(missing)} step(s), first of steps "
                         f"{missing[:5]}; restore them or record the run again.")
    store.embedding_arrays(store.layer_names)  # present, whole and of this trajectory
    if store.manifest.get(TRAIN_END):
        warnings.warn(f"store {path}: its fit had not finished its train end after writing the recursion's "
                      "embeddings (it is still running there, or it stopped there), so a requested "
                      "embeddings='replay' or the report may be missing or partial. If that fit is still running, "
                      "wait for it to return and load again; if it stopped, resume it with trainer.fit(..., "
                      "ckpt_path=<a Lightning checkpoint of that run>) to finish them.", stacklevel=3)
    return store


def check_settings_hash(store: TrajectoryStore) -> None:
    """Refuse a manifest whose settings are not those its ``settings_hash`` was made from (edited by hand).

    Raises:
        StoreError: saying so.
    """
    try:
        matches = DVEConfig.from_dict(store.manifest["settings"]).settings_hash() == store.settings_hash
    except (DVEError, KeyError, TypeError, ValueError):
        matches = False
    if not matches:
        raise StoreError(f"store {store.root} has a damaged manifest: its settings are missing or not the ones its "
                         f"settings_hash {store.manifest.get('settings_hash')} was made from (edited by hand?). "
                         "Restore manifest.json, or record the run again.")


def check_segments(store: TrajectoryStore) -> None:
    """Refuse a manifest whose segments are not those its segment factors were written for (edited by hand: the
    queries chain the factors at the manifest's boundaries; with fewer than two segments, or none named, they leave
    the factors out). Stores written before session 37 do not name them.

    Raises:
        StoreError: saying so.
    """
    segments, path = store.manifest.get("segments"), store.root / SEGMENTS
    if not path.is_file():  # (a missing factors file is refused where they are read)
        return
    written = (safetensors_header(path)[0].get("__metadata__") or {}).get("segments")
    if written is not None and json.loads(written) != segments:
        raise StoreError(f"store {store.root} has a damaged manifest: its segments {segments} are not the ones its "
                         f"segment factors were written for, {json.loads(written)} (edited by hand?). Restore "
                         "manifest.json, or record the run again.")

"""A store manifest's shape, checked where the store is opened (:meth:`~lightning_dve.store.TrajectoryStore.open`).

The settings hash covers the recorded settings only. The keys the queries read besides them are checked here for
their types, and the layer entries (names, kinds, shapes, projections) against a checksum written with them, so a
manifest edited by hand or damaged is refused in one message instead of failing later with a ``TypeError`` or a
refusal that names another cause. Stores of earlier versions carry no checksum: only their layers' names are
checked.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import StoreError

#: Manifest key of :func:`layers_checksum`.
LAYERS_CHECKSUM = "layers_checksum"

REQUIRED = ("settings_hash", "layers", "steps", "rows")


def layers_checksum(layers: list[dict[str, Any]]) -> str:
    """CRC32 of the manifest's layer entries, as hex text (written with them by ``TrajectoryStore.create``)."""
    return f"{zlib.crc32(json.dumps(layers, sort_keys=True).encode()):08x}"


def _ints(value: Any) -> bool:
    """Whether ``value`` is a list of ints."""
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _layer(entry: Any) -> bool:
    """A layer entry as far as the store reads it (a name); the rest is covered by :func:`layers_checksum`."""
    return isinstance(entry, dict) and isinstance(entry.get("name"), str)


_SHAPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "layers": ("a list of named layer entries", lambda v: isinstance(v, list) and all(map(_layer, v))),
    "steps": ("a list of ints", _ints),
    "rows": ("a list of ints", _ints),
    "segments": ("a list of [first, last] step pairs", lambda v: isinstance(v, list) and all(
        _ints(pair) and len(pair) == 2 for pair in v)),
    "final_weights": ("a mapping or null", lambda v: v is None or isinstance(v, dict)),
    "boundary_weights": ("a mapping or null", lambda v: v is None or isinstance(v, dict)),
    "precision": ("a string", lambda v: isinstance(v, str)),
}


def check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Refuse a manifest that lacks a key the store needs, holds one of another type, or whose layer entries are
    not those written with it.

    Raises:
        StoreError: naming the key(s), and how to fix it.
    """
    fix = "(edited or damaged): restore it from a backup or record the run again."
    if missing := [key for key in REQUIRED if key not in manifest]:
        raise StoreError(f"{path} lacks the key(s) {missing} {fix}")
    wrong = [f"{key} is not {shape}" for key, (shape, valid) in _SHAPES.items()
             if key in manifest and not valid(manifest[key])]
    if wrong := wrong or _inconsistencies(manifest):
        raise StoreError(f"{path} is not the manifest its store wrote: {'; '.join(wrong)} {fix}")


def _inconsistencies(manifest: dict[str, Any]) -> list[str]:
    """What contradicts itself in a manifest whose keys are of their types: a layer named twice, a step count that
    is not the row counts', layer entries that are not those written with it."""
    names = [entry["name"] for entry in manifest["layers"]]
    out = [f"layers names a layer twice ({names})"] if len(set(names)) < len(names) else []
    if manifest.get("status") == "complete" and len(manifest["steps"]) != len(manifest["rows"]):
        out.append(f"steps lists {len(manifest['steps'])} steps and rows {len(manifest['rows'])}")
    if (written := manifest.get(LAYERS_CHECKSUM)) not in (None, layers_checksum(manifest["layers"])):
        out.append(f"its layer entries are not the ones written with it (checksum {written})")
    return out
